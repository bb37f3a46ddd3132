//! What the engine is asked to do, and what it answers: the types every part of the
//! engine shares (a leaf module, so that no two parts of the engine import each other).

use tokio::sync::oneshot;

use crate::kernel::error::Result;
use crate::ledger::model::{Entry, Metadata, Posting};

/// What a command carries for the batch hook (`hook`): the number of the part of the
/// command the hook keeps itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// A new entry whose postings are validated, resolved and balanced.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub kind: String,
    pub description: String,
    pub metadata: Metadata,
    pub postings: Vec<Posting>,
    /// `Some(seconds)` reserves the entry as pending with that timeout.
    pub pending_timeout_s: Option<u32>,
    /// Accounts the entry's batch locks without posting to them: a rule another
    /// module checks in the batch reads state those locks guard (a tab purchase's
    /// daily limit is guarded by the buyer's wallet, which the entry does not touch).
    pub locks: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Post the pending entry; `Some(minor)` posts part of a two-posting entry.
    Post(Option<i64>),
    Void,
    Expire,
}

#[derive(Debug, Clone)]
pub enum Op {
    Post(NewEntry),
    /// Resolve a pending entry (read beforehand, with its postings).
    Resolve {
        pending: Entry,
        action: Resolution,
    },
    /// Post the mirror of a posted entry (read beforehand).
    Reverse {
        original: Entry,
        description: String,
    },
}

/// A caller's idempotency key with the hash of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idem {
    pub key: String,
    pub operation: &'static str,
    pub request_hash: String,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// The command was applied now.
    Created {
        entry: Box<Entry>,
        /// The batch's clock reading, which the batch hook's rows were stamped with (a
        /// payment's `settled_at`). The entry's own `created_at_us` is the later of it
        /// and the last batch's time (`batch::Committed`), so the two differ when a
        /// concurrent batch with a later clock took the sequence row first.
        batch_clock_us: i64,
    },
    /// The key was used before with the same request: this is the entry it produced.
    Replayed(String),
}

pub(crate) struct Command {
    pub caller: String,
    pub idem: Option<Idem>,
    pub op: Op,
    /// The ticket of another module's part of this command, for the engine's `BatchHook`.
    pub ticket: Option<Ticket>,
    pub(crate) reply: oneshot::Sender<Result<Outcome>>,
}

impl Command {
    /// A command as `EngineHandle::submit_attached` makes it, for the intake's tests.
    #[cfg(test)]
    pub(crate) fn new(
        caller: String,
        idem: Option<Idem>,
        op: Op,
        ticket: Option<Ticket>,
        reply: oneshot::Sender<Result<Outcome>>,
    ) -> Self {
        Command { caller, idem, op, ticket, reply }
    }

    /// The accounts whose balance rows the command's batch locks.
    pub(crate) fn account_ids(&self) -> impl Iterator<Item = i64> + '_ {
        let (postings, locks): (&[Posting], &[i64]) = match &self.op {
            Op::Post(e) => (&e.postings, &e.locks),
            Op::Resolve { pending, .. } => (&pending.postings, &[]),
            Op::Reverse { original, .. } => (&original.postings, &[]),
        };
        postings.iter().map(|p| p.account_id).chain(locks.iter().copied())
    }
}
