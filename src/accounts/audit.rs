//! The audit trail (`audit_log`), written here and nowhere else: who did what to which
//! account or card, with the outcome. The table is append-only (the migrations' triggers
//! refuse an update or a delete).

/// Writes one audit record with `$executor`: a pool, or `&mut *tx` where the record must
/// commit with the change it records (either backend, inside `with_db!`). `$target` names
/// what was acted on (`account:<id>`, `pm:<token>`); `$reason` says why or what; `$result`
/// is `ok` or why not. Evaluates to the statement's future.
macro_rules! insert_audit {
    ($executor:expr, $actor:expr, $action:expr, $target:expr, $reason:expr, $result:expr, $at_us:expr) => {
        sqlx::query(
            "INSERT INTO audit_log (actor, action, target, reason, result, at_us) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind($actor)
        .bind($action)
        .bind($target)
        .bind($reason)
        .bind($result)
        .bind($at_us)
        .execute($executor)
    };
}
pub(crate) use insert_audit;
