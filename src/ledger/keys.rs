//! The ledger's idempotency keys as other modules may touch them: only through here.
//!
//! A module that posts under a key it derives (a refund's entry, say) sometimes has to
//! make sure the key can never be posted under again, because the entry must not happen
//! any more. It does that by taking the key first with a tombstone, an operation no
//! ledger request ever carries: a later post under the key is then refused as a key
//! reused for another request, and the tombstone's writer knows the entry will not appear.

pub(crate) use crate::ledger::engine::backend::fence_idempotency_key;
