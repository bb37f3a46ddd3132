//! Who writes to the ledger, and which entries belong to whom.
//!
//! Every write carries its caller's name: the namespace of its idempotency keys and the
//! `created_by` of the entries it makes. dmpay's own modules write under the fixed names
//! below; every API caller writes under `api:<sub>`. No module name starts with `api:`,
//! so whatever `sub` a token carries, an API caller can neither replay nor collide with a
//! module's keys (`pay:<id>:hold` under `payments`, say).
//!
//! An entry a module wrote belongs to that module: only it may post or void its pending
//! holds and reverse it. A payment's hold voided through the generic API would leave a
//! SETTLED payment whose money never moved; a refund or a correction goes through the
//! domain that owns the entry, which keeps its own rows in step.

use super::model::Entry;
use crate::kernel::error::{Error, Result};
use crate::kernel::reason::Reason;

/// One-click payments: sends, holds, card settlement, refunds.
pub const PAYMENTS: &str = "payments";
/// Finance's reconciliation: fees, net settlement, suspense adjustments.
pub const RECONCILIATION: &str = "finance:reconciliation";
/// The expiry of pending entries past their timeout.
pub const EXPIRY: &str = "system:expiry";

/// The modules that own the entries they write, with where a caller goes instead.
const MODULES: &[(&str, &str)] = &[
    (PAYMENTS, "refund the payment with Payments.RefundPayment"),
    (RECONCILIATION, "correct it through Finance (ResolveReconciliationItem) or with an entry of your own"),
    (EXPIRY, "it is a resolution and cannot be changed"),
];

/// The caller name of an API caller with this `sub`.
pub fn api(sub: &str) -> String {
    format!("api:{sub}")
}

/// Refuses `caller` posting, voiding or reversing `entry` when a module other than
/// `caller` owns it.
pub fn check_may_change(caller: &str, entry: &Entry) -> Result<()> {
    match MODULES.iter().find(|(module, _)| *module == entry.created_by) {
        Some((module, instead)) if *module != caller => Err(Error::FailedPrecondition {
            reason: Reason::EntryOwnedByModule,
            message: format!(
                "entry {} was written by dmpay's {module} module and only it may change it; {instead}",
                entry.id
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_callers_never_name_a_module() {
        for sub in ["payments", "finance:reconciliation", "system:expiry", "", "api:x"] {
            let name = api(sub);
            assert!(name.starts_with("api:"));
            assert!(MODULES.iter().all(|(m, _)| *m != name), "{name}");
        }
        assert!(MODULES.iter().all(|(m, _)| !m.starts_with("api:")));
    }
}
