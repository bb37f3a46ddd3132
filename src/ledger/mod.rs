//! The double-entry ledger: the book of record for every cent dmpay moves.
//!
//! - `model`      accounts, postings, entries, balances and their validation
//! - `accounts`   account lookup (cached), wallets on first use, system accounts
//! - `callers`    who writes (modules, API callers) and which entries belong to whom
//! - `engine`     the batching posting engine, the single write path
//! - `batch`      one batch from commands to answers: duplicates, keys, retries
//! - `intake`     how the engine gathers a batch, setting aside calls on busy accounts
//! - `decide`     the engine's per-command decision against locked balances (pure)
//! - `hook`       how another module (payments) commits its rows in the engine's batch
//! - `batch_pg`, `batch_sqlite`  the engine's transaction on each backend
//! - `read`       entries, listings and point-in-time balances
//! - `verify`     recompute everything from postings and report differences
//! - `maintenance` pending-entry expiry and idempotency-key retention

pub mod accounts;
pub mod callers;
pub mod engine;
pub(crate) mod keys;
pub mod maintenance;
pub mod model;
pub mod read;
pub mod verify;

use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use accounts::{
    AccountStore, SYSTEM_CLEARING, SYSTEM_COMMISSIONS, SYSTEM_DISPUTE_LOSSES, SYSTEM_FEES, SYSTEM_PAYOUTS_IN_TRANSIT,
    SYSTEM_PROCESSOR_FEES,
};
pub use engine::{DatabaseState, Engine, EngineConfig, EngineHandle, Idem, NewEntry, Op, Outcome, Resolution};
pub use model::*;

use crate::kernel::clock::Clock;
use crate::kernel::error::{Error, Result};
use crate::kernel::money::{Currencies, Money};
use crate::kernel::reason::Reason;
use crate::store::Db;

/// A posting as the caller names it, before its account is resolved.
#[derive(Debug, Clone)]
pub struct PostingInput {
    pub account_code: AccountCode,
    pub direction: Direction,
    pub amount: Money,
}

/// `PostEntry` after wire parsing.
#[derive(Debug, Clone)]
pub struct PostEntryInput {
    pub idempotency_key: String,
    pub kind: String,
    pub description: String,
    pub postings: Vec<PostingInput>,
    pub metadata: Metadata,
    pub pending: bool,
    /// 0 means the default.
    pub pending_timeout_s: u32,
}

/// Whether a caller may take money out of a user's wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalletDebits {
    Allowed,
    /// Not without this scope (named in the refusal).
    NeedScope(&'static str),
}

/// The ledger service: validation, then the engine for writes and `read` for reads.
#[derive(Clone)]
pub struct Ledger {
    db: Db,
    accounts: Arc<AccountStore>,
    engine: EngineHandle,
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(digest.len() * 2);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The hash an idempotency key is stored with: a retry must send the same request.
pub fn hash_request(parts: &serde_json::Value) -> String {
    sha256_hex(parts.to_string().as_bytes())
}

impl Ledger {
    pub fn new(db: Db, currencies: Currencies, engine: EngineHandle) -> Self {
        let writer = engine.writer(&db).clone();
        Ledger {
            accounts: Arc::new(AccountStore::new(db.clone(), writer, currencies, engine.clock().clone())),
            db,
            engine,
        }
    }

    pub fn accounts(&self) -> &AccountStore {
        &self.accounts
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// The clock the ledger's rows are stamped with.
    pub fn clock(&self) -> &Clock {
        self.engine.clock()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    async fn finish(&self, outcome: Outcome) -> Result<Entry> {
        match outcome {
            Outcome::Created { entry, .. } => Ok(*entry),
            Outcome::Replayed(id) => self.get_entry(&id).await,
        }
    }

    /// Validates, resolves accounts (creating wallets on first use) and checks the
    /// postings balance, then submits the entry to the engine.
    pub async fn post_entry(&self, caller: &str, input: PostEntryInput) -> Result<Entry> {
        check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        check_kind("kind", &input.kind)?;
        crate::kernel::text::parse_text("description", &input.description, DESCRIPTION_LEN_MAX, false)?;
        check_metadata("metadata", &input.metadata)?;
        if input.postings.len() < 2 {
            return Err(Error::invalid("postings", "an entry needs at least two postings"));
        }
        if input.postings.len() > POSTINGS_MAX {
            return Err(Error::invalid("postings", format!("at most {POSTINGS_MAX} postings")));
        }
        if input.pending_timeout_s > PENDING_TIMEOUT_MAX_S {
            return Err(Error::invalid(
                "pending_timeout_seconds",
                format!("at most {PENDING_TIMEOUT_MAX_S} (30 days)"),
            ));
        }
        if !input.pending && input.pending_timeout_s != 0 {
            return Err(Error::invalid("pending_timeout_seconds", "only for pending entries"));
        }
        let mut postings = Vec::with_capacity(input.postings.len());
        for (i, p) in input.postings.iter().enumerate() {
            let account = self.accounts.resolve(&format!("postings[{i}].account_code"), &p.account_code, true).await?;
            if account.currency != p.amount.currency() {
                return Err(Error::invalid(
                    format!("postings[{i}].amount.currency"),
                    format!("account {} is in {}, not {}", account.code, account.currency, p.amount.currency()),
                ));
            }
            postings.push(Posting {
                account_id: account.id,
                account_code: account.code,
                direction: p.direction,
                amount: p.amount,
            });
        }
        check_balanced("postings", &postings)?;

        let timeout = input.pending.then_some(if input.pending_timeout_s == 0 {
            PENDING_TIMEOUT_DEFAULT_S
        } else {
            input.pending_timeout_s
        });
        let request_hash = hash_request(&serde_json::json!({
            "kind": input.kind,
            "description": input.description,
            "postings": postings.iter().map(|p| (p.account_code.as_str(), p.direction.as_db(), p.amount.currency().code(), p.amount.minor())).collect::<Vec<_>>(),
            "metadata": input.metadata,
            "pending": timeout,
        }));
        let idem = Idem { key: input.idempotency_key, operation: "post_entry", request_hash };
        let op = Op::Post(NewEntry {
            kind: input.kind,
            description: input.description,
            metadata: input.metadata,
            postings,
            pending_timeout_s: timeout,
            locks: Vec::new(),
        });
        let outcome = self.engine.submit(caller, Some(idem), op).await?;
        self.finish(outcome).await
    }

    /// Posts a pending entry, fully or (for a two-posting entry) partially.
    pub async fn post_pending(&self, caller: &str, entry_id: &str, key: &str, amount: Option<Money>) -> Result<Entry> {
        check_idempotency_key("idempotency_key", key)?;
        let pending = self.pending_entry(entry_id).await?;
        callers::check_may_change(caller, &pending)?;
        let partial = match amount {
            None => None,
            Some(m) => {
                if pending.postings.len() != 2 {
                    return Err(Error::invalid("amount", "a partial post needs an entry with exactly two postings"));
                }
                let reserved = pending.postings[0].amount;
                if m.currency() != reserved.currency() {
                    return Err(Error::invalid(
                        "amount.currency",
                        format!("the entry is in {}, not {}", reserved.currency(), m.currency()),
                    ));
                }
                if m.minor() > reserved.minor() {
                    return Err(Error::invalid("amount", format!("at most the reserved {}", reserved.amount_string())));
                }
                Some(m.minor())
            }
        };
        let request_hash = hash_request(&serde_json::json!({"entry": entry_id, "amount": partial}));
        let idem = Idem { key: key.to_owned(), operation: "post_pending", request_hash };
        let outcome =
            self.engine.submit(caller, Some(idem), Op::Resolve { pending, action: Resolution::Post(partial) }).await?;
        self.finish(outcome).await
    }

    /// Releases a pending entry's reservation without moving money.
    pub async fn void_pending(&self, caller: &str, entry_id: &str, key: &str) -> Result<Entry> {
        check_idempotency_key("idempotency_key", key)?;
        let pending = self.pending_entry(entry_id).await?;
        callers::check_may_change(caller, &pending)?;
        let request_hash = hash_request(&serde_json::json!({"entry": entry_id}));
        let idem = Idem { key: key.to_owned(), operation: "void_pending", request_hash };
        let outcome = self.engine.submit(caller, Some(idem), Op::Resolve { pending, action: Resolution::Void }).await?;
        self.finish(outcome).await
    }

    /// Posts the mirror of a posted entry. A reversal debits what the entry credited: an
    /// entry that credited a user's wallet (a top-up) is refused unless the caller may
    /// debit wallets, as a debit of a wallet would be.
    pub async fn reverse(
        &self,
        caller: &str,
        entry_id: &str,
        key: &str,
        reason: &str,
        wallet_debits: WalletDebits,
    ) -> Result<Entry> {
        check_idempotency_key("idempotency_key", key)?;
        crate::kernel::text::parse_text("reason", reason, DESCRIPTION_LEN_MAX, true)?;
        let original = self.get_entry_field("entry_id", entry_id).await?;
        callers::check_may_change(caller, &original)?;
        if let WalletDebits::NeedScope(scope) = wallet_debits {
            if original
                .postings
                .iter()
                .any(|p| p.direction == Direction::Credit && p.account_code.as_wallet().is_some())
            {
                return Err(Error::PermissionDenied(format!(
                    "reversing entry {entry_id} debits a user's wallet, which needs scope {scope}"
                )));
            }
        }
        if original.status != EntryStatus::Posted || original.postings.is_empty() {
            return Err(Error::FailedPrecondition {
                reason: Reason::EntryNotPosted,
                message: format!("entry {entry_id} is not a posted entry; void a pending entry instead"),
            });
        }
        if original.pending_entry_id.is_none() && original.expires_at_us.is_some() {
            return Err(Error::FailedPrecondition {
                reason: Reason::EntryNotPosted,
                message: format!("entry {entry_id} is a reservation; reverse the entry that posted it"),
            });
        }
        let request_hash = hash_request(&serde_json::json!({"entry": entry_id, "reason": reason}));
        let idem = Idem { key: key.to_owned(), operation: "reverse_entry", request_hash };
        let op = Op::Reverse { original, description: reason.to_owned() };
        let outcome = self.engine.submit(caller, Some(idem), op).await?;
        self.finish(outcome).await
    }

    async fn pending_entry(&self, entry_id: &str) -> Result<Entry> {
        let entry = self.get_entry_field("entry_id", entry_id).await?;
        if entry.expires_at_us.is_none() {
            return Err(Error::FailedPrecondition {
                reason: Reason::EntryNotPending,
                message: format!("entry {entry_id} is not a pending entry"),
            });
        }
        // Whether it is still pending is decided by the engine under its locks, after
        // an idempotent replay of this very request has had its chance.
        Ok(entry)
    }

    async fn get_entry_field(&self, field: &str, entry_id: &str) -> Result<Entry> {
        if entry_id.is_empty() {
            return Err(Error::invalid(field, "required"));
        }
        if entry_id.len() > 64 {
            return Err(Error::invalid(field, "not an entry id"));
        }
        self.get_entry(entry_id).await
    }

    pub async fn get_entry(&self, entry_id: &str) -> Result<Entry> {
        read::get_entry(&self.db, entry_id).await?.ok_or_else(|| Error::NotFound(format!("entry {entry_id} not found")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_hex_matches_the_standard_vector() {
        assert_eq!(super::sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
