//! The posting engine's decision step: given the locked balances, accept or reject each
//! command of a batch on its own, in order, in memory. Pure: no I/O, so the batch
//! writers of both backends share it and it is the one place the money rules live.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::command::{Command, NewEntry, Op, Outcome, Resolution};
use super::hook::{Admit, HookBatch, Ticket};
use crate::kernel::error::{Error, Result};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::model::{Balance, Direction, Entry, EntryStatus, Metadata, Posting};

/// Balance state of one locked account during a batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AccountState {
    pub credit_normal: bool,
    pub allow_negative: bool,
    pub balance: Balance,
    /// Net change made by this batch's accepted commands.
    pub delta: Balance,
}

/// One row of `ledger_postings` to write.
#[derive(Debug, Clone)]
pub(crate) struct PostingRow {
    pub idx: i16,
    pub posting: Posting,
    pub pending: bool,
}

/// An accepted command, ready to write.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub id: String,
    pub kind: String,
    pub description: String,
    pub metadata_json: String,
    pub metadata: Metadata,
    pub status: EntryStatus,
    pub postings: Vec<PostingRow>,
    pub pending_entry_id: Option<String>,
    pub reverses_entry_id: Option<String>,
    pub expires_at_us: Option<i64>,
    pub created_by: String,
    pub sequence: i64,
}

impl Draft {
    pub fn to_entry(&self, created_at_us: i64) -> Entry {
        Entry {
            id: self.id.clone(),
            sequence: self.sequence,
            kind: self.kind.clone(),
            description: self.description.clone(),
            metadata: self.metadata.clone(),
            status: self.status,
            postings: self.postings.iter().map(|p| p.posting.clone()).collect(),
            pending_entry_id: self.pending_entry_id.clone(),
            reverses_entry_id: self.reverses_entry_id.clone(),
            expires_at_us: self.expires_at_us,
            created_by: self.created_by.clone(),
            created_at_us,
        }
    }
}

// Decisions live in one Vec per batch, and nearly all of them accept: boxing the draft
// would cost an allocation per entry to save space in the few that do not.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Decision {
    Accept(Draft),
    Reject(Error),
    /// Another process committed this idempotency key first; answered after commit.
    KeyTaken,
    /// The batch hook answered the command without a ledger decision.
    Answered(Result<Outcome>),
}

/// The accepted entries of a batch's decisions, in decision order.
pub(crate) fn accepted(decisions: &[Decision]) -> Vec<&Draft> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Accept(draft) => Some(draft),
            _ => None,
        })
        .collect()
}

/// Gives the accepted entries their journal sequence, `first` onwards in decision order.
pub(crate) fn number_accepted(decisions: &mut [Decision], first: i64) {
    let accepted = decisions.iter_mut().filter_map(|d| match d {
        Decision::Accept(draft) => Some(draft),
        _ => None,
    });
    for (draft, sequence) in accepted.zip(first..) {
        draft.sequence = sequence;
    }
}

/// What the transaction needs to know about a batch before deciding.
pub(crate) struct Plan<'a> {
    pub cmds: Vec<&'a Command>,
    /// Every account the batch touches, ascending: the lock order.
    pub account_ids: Vec<i64>,
    /// Pending entries the batch resolves, and entries it reverses.
    pub resolve_targets: Vec<String>,
    pub reverse_targets: Vec<String>,
    /// Indexes into `cmds` of commands with keys, sorted by (caller, key): the key
    /// insertion order.
    pub keyed: Vec<usize>,
    /// The id each command's entry gets if accepted, known before deciding so the
    /// idempotency record can name it.
    pub entry_ids: Vec<String>,
    pub now_us: i64,
}

impl<'a> Plan<'a> {
    /// Plans `cmds` as of `now_us`, the batch's one clock reading.
    pub(crate) fn new(cmds: Vec<&'a Command>, now_us: i64) -> Self {
        let mut ids = Vec::new();
        let mut resolve_targets = Vec::new();
        let mut reverse_targets = Vec::new();
        for cmd in &cmds {
            ids.extend(cmd.account_ids());
            match &cmd.op {
                Op::Post(_) => {}
                Op::Resolve { pending, .. } => resolve_targets.push(pending.id.clone()),
                Op::Reverse { original, .. } => reverse_targets.push(original.id.clone()),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let mut keyed: Vec<usize> = (0..cmds.len()).filter(|i| cmds[*i].idem.is_some()).collect();
        keyed.sort_by(|a, b| {
            let ka = (&cmds[*a].caller, cmds[*a].idem.as_ref().map(|i| &i.key));
            let kb = (&cmds[*b].caller, cmds[*b].idem.as_ref().map(|i| &i.key));
            ka.cmp(&kb)
        });
        let entry_ids = (0..cmds.len()).map(|_| new_entry_id()).collect();
        Plan { cmds, account_ids: ids, resolve_targets, reverse_targets, keyed, entry_ids, now_us }
    }

    /// The commands that carry a ticket for the batch hook, with their index.
    pub fn attached(&self) -> Vec<(usize, Ticket)> {
        self.cmds.iter().enumerate().filter_map(|(i, c)| c.ticket.map(|t| (i, t))).collect()
    }

    /// Decides every command in order against the locked balances. No I/O: the hook,
    /// if any, is consulted around each attached command's decision in memory.
    pub fn decide(
        &self,
        accounts: &mut HashMap<i64, AccountState>,
        resolved: &HashSet<String>,
        reversed: &HashSet<String>,
        keys_taken: &HashSet<usize>,
        mut hook: Option<&mut (dyn HookBatch + '_)>,
    ) -> Vec<Decision> {
        let mut resolved_now: HashSet<&str> = HashSet::new();
        let mut reversed_now: HashSet<&str> = HashSet::new();
        let mut out = Vec::with_capacity(self.cmds.len());
        for (i, cmd) in self.cmds.iter().enumerate() {
            if keys_taken.contains(&i) {
                out.push(Decision::KeyTaken);
                continue;
            }
            let hooked = hook.as_deref_mut().filter(|_| cmd.ticket.is_some());
            let hooked = match hooked.map(|h| (h.admit(i), h)) {
                Some((Admit::Answer(answer), _)) => {
                    out.push(Decision::Answered(*answer));
                    continue;
                }
                Some((Admit::Proceed, h)) => Some(h),
                None => None,
            };
            let decision = match &cmd.op {
                Op::Post(new) => self.decide_post(i, new, accounts),
                Op::Resolve { pending, action } => {
                    if resolved.contains(&pending.id) || resolved_now.contains(pending.id.as_str()) {
                        Decision::Reject(Error::FailedPrecondition {
                            reason: Reason::EntryNotPending,
                            message: format!("entry {} is no longer pending", pending.id),
                        })
                    } else {
                        let d = self.decide_resolve(i, pending, *action, accounts);
                        if matches!(d, Decision::Accept(_)) {
                            resolved_now.insert(pending.id.as_str());
                        }
                        d
                    }
                }
                Op::Reverse { original, description } => {
                    if reversed.contains(&original.id) || reversed_now.contains(original.id.as_str()) {
                        Decision::Reject(Error::FailedPrecondition {
                            reason: Reason::AlreadyReversed,
                            message: format!("entry {} is already reversed", original.id),
                        })
                    } else {
                        let d = self.decide_reverse(i, original, description, accounts);
                        if matches!(d, Decision::Accept(_)) {
                            reversed_now.insert(original.id.as_str());
                        }
                        d
                    }
                }
            };
            if let Some(h) = hooked {
                match &decision {
                    Decision::Accept(_) => h.decided(i, Ok(())),
                    Decision::Reject(e) => h.decided(i, Err(e)),
                    Decision::KeyTaken | Decision::Answered(_) => {}
                }
            }
            out.push(decision);
        }
        out
    }

    fn decide_post(&self, i: usize, new: &NewEntry, accounts: &mut HashMap<i64, AccountState>) -> Decision {
        let pending = new.pending_timeout_s.is_some();
        let effects: Vec<Effect> = new
            .postings
            .iter()
            .map(|p| Effect {
                account_id: p.account_id,
                direction: p.direction,
                amount: p.amount.minor(),
                kind: if pending { EffectKind::Reserve } else { EffectKind::Post },
            })
            .collect();
        if let Err(e) = apply(accounts, &effects, &new.postings) {
            return Decision::Reject(e);
        }
        let rows = new
            .postings
            .iter()
            .enumerate()
            .map(|(i, p)| PostingRow { idx: i as i16, posting: p.clone(), pending })
            .collect();
        Decision::Accept(Draft {
            id: self.entry_ids[i].clone(),
            kind: new.kind.clone(),
            description: new.description.clone(),
            metadata_json: metadata_json(&new.metadata),
            metadata: new.metadata.clone(),
            status: if pending { EntryStatus::Pending } else { EntryStatus::Posted },
            postings: rows,
            pending_entry_id: None,
            reverses_entry_id: None,
            expires_at_us: new.pending_timeout_s.map(|s| self.now_us.saturating_add(i64::from(s) * 1_000_000)),
            created_by: self.cmds[i].caller.clone(),
            sequence: 0,
        })
    }

    fn decide_resolve(
        &self,
        i: usize,
        pending: &Entry,
        action: Resolution,
        accounts: &mut HashMap<i64, AccountState>,
    ) -> Decision {
        if action != Resolution::Expire && pending.expires_at_us.is_some_and(|t| t <= self.now_us) {
            return Decision::Reject(Error::FailedPrecondition {
                reason: Reason::EntryExpired,
                message: format!("pending entry {} has expired", pending.id),
            });
        }
        let mut effects: Vec<Effect> = pending
            .postings
            .iter()
            .map(|p| Effect {
                account_id: p.account_id,
                direction: p.direction,
                amount: p.amount.minor(),
                kind: EffectKind::Release,
            })
            .collect();
        let posted: Vec<Posting> = match action {
            Resolution::Post(None) => pending.postings.clone(),
            Resolution::Post(Some(minor)) => pending
                .postings
                .iter()
                .map(|p| Posting { amount: Money::from_minor(p.amount.currency(), minor), ..p.clone() })
                .collect(),
            Resolution::Void | Resolution::Expire => Vec::new(),
        };
        effects.extend(posted.iter().map(|p| Effect {
            account_id: p.account_id,
            direction: p.direction,
            amount: p.amount.minor(),
            kind: EffectKind::Post,
        }));
        if let Err(e) = apply(accounts, &effects, &pending.postings) {
            return Decision::Reject(e);
        }
        let (status, kind) = match action {
            Resolution::Post(_) => (EntryStatus::Posted, format!("{}.post", pending.kind)),
            Resolution::Void => (EntryStatus::Voided, format!("{}.void", pending.kind)),
            Resolution::Expire => (EntryStatus::Expired, format!("{}.expire", pending.kind)),
        };
        Decision::Accept(Draft {
            id: self.entry_ids[i].clone(),
            kind: truncate_kind(kind),
            description: pending.description.clone(),
            metadata_json: metadata_json(&pending.metadata),
            metadata: pending.metadata.clone(),
            status,
            postings: posted
                .into_iter()
                .enumerate()
                .map(|(i, p)| PostingRow { idx: i as i16, posting: p, pending: false })
                .collect(),
            pending_entry_id: Some(pending.id.clone()),
            reverses_entry_id: None,
            expires_at_us: None,
            created_by: self.cmds[i].caller.clone(),
            sequence: 0,
        })
    }

    fn decide_reverse(
        &self,
        i: usize,
        original: &Entry,
        description: &str,
        accounts: &mut HashMap<i64, AccountState>,
    ) -> Decision {
        let mirrored: Vec<Posting> =
            original.postings.iter().map(|p| Posting { direction: p.direction.opposite(), ..p.clone() }).collect();
        let effects: Vec<Effect> = mirrored
            .iter()
            .map(|p| Effect {
                account_id: p.account_id,
                direction: p.direction,
                amount: p.amount.minor(),
                kind: EffectKind::Post,
            })
            .collect();
        if let Err(e) = apply(accounts, &effects, &mirrored) {
            return Decision::Reject(e);
        }
        Decision::Accept(Draft {
            id: self.entry_ids[i].clone(),
            kind: truncate_kind(format!("{}.reversal", original.kind)),
            description: description.to_owned(),
            metadata_json: metadata_json(&original.metadata),
            metadata: original.metadata.clone(),
            status: EntryStatus::Posted,
            postings: mirrored
                .into_iter()
                .enumerate()
                .map(|(i, p)| PostingRow { idx: i as i16, posting: p, pending: false })
                .collect(),
            pending_entry_id: None,
            reverses_entry_id: Some(original.id.clone()),
            expires_at_us: None,
            created_by: self.cmds[i].caller.clone(),
            sequence: 0,
        })
    }
}

fn truncate_kind(mut kind: String) -> String {
    kind.truncate(crate::ledger::model::KIND_LEN_MAX);
    kind
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EffectKind {
    Post,
    Reserve,
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Effect {
    account_id: i64,
    direction: Direction,
    amount: i64,
    kind: EffectKind,
}

fn field_of(balance: &mut Balance, direction: Direction, kind: EffectKind) -> &mut i64 {
    match (kind, direction) {
        (EffectKind::Post, Direction::Debit) => &mut balance.posted_debits,
        (EffectKind::Post, Direction::Credit) => &mut balance.posted_credits,
        (_, Direction::Debit) => &mut balance.pending_debits,
        (_, Direction::Credit) => &mut balance.pending_credits,
    }
}

/// Applies one command's effects to the batch state, or leaves it untouched and says why
/// not. Every step is checked arithmetic.
fn apply(accounts: &mut HashMap<i64, AccountState>, effects: &[Effect], postings: &[Posting]) -> Result<()> {
    let mut scratch: BTreeMap<i64, AccountState> = BTreeMap::new();
    for e in effects {
        let state = match scratch.get_mut(&e.account_id) {
            Some(s) => s,
            None => {
                let s = *accounts
                    .get(&e.account_id)
                    .ok_or_else(|| Error::internal(anyhow::anyhow!("account {} not locked", e.account_id)))?;
                scratch.entry(e.account_id).or_insert(s)
            }
        };
        let signed = if e.kind == EffectKind::Release { -e.amount } else { e.amount };
        let overflow = || Error::FailedPrecondition {
            reason: Reason::BalanceLimit,
            message: "the balance would exceed what the ledger can hold".into(),
        };
        let total = field_of(&mut state.balance, e.direction, e.kind);
        *total = total.checked_add(signed).ok_or_else(overflow)?;
        if *total < 0 {
            return Err(Error::internal(anyhow::anyhow!("release beyond reservation on account {}", e.account_id)));
        }
        let delta = field_of(&mut state.delta, e.direction, e.kind);
        *delta = delta.checked_add(signed).ok_or_else(overflow)?;
    }
    for (id, state) in &scratch {
        if state.allow_negative {
            continue;
        }
        let available = state.balance.available(state.credit_normal).ok_or_else(|| Error::FailedPrecondition {
            reason: Reason::BalanceLimit,
            message: "the balance would exceed what the ledger can hold".into(),
        })?;
        if available < 0 {
            let code = postings
                .iter()
                .find(|p| p.account_id == *id)
                .map(|p| p.account_code.to_string())
                .unwrap_or_else(|| id.to_string());
            let short = postings
                .iter()
                .find(|p| p.account_id == *id)
                .map(|p| p.amount.currency())
                .map_or_else(|| (-available).to_string(), |c| Money::from_minor(c, -available).amount_string());
            return Err(Error::FailedPrecondition {
                reason: Reason::InsufficientFunds,
                message: format!("insufficient funds in {code}: short by {short}"),
            });
        }
    }
    for (id, state) in scratch {
        accounts.insert(id, state);
    }
    Ok(())
}

fn new_entry_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn metadata_json(metadata: &Metadata) -> String {
    serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
