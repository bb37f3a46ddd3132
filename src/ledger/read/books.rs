//! What finance reads of the books: the trial balance's sums, the export's pages, a
//! wallet's statement lines, a day's card charges. The ledger's tables are read here,
//! where their shape is known; finance turns the rows into its reports.

use super::sequence_before;
use crate::kernel::error::Result;
use crate::store::Db;
use crate::with_db;

/// Posted debits and credits of one account, in minor units.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AccountTotals {
    pub code: String,
    pub account_type: String,
    pub currency: String,
    pub debits: i64,
    pub credits: i64,
}

/// Every account with posted activity up to and including `as_of_us`, optionally in one
/// currency, by currency and code.
pub async fn account_totals(db: &Db, as_of_us: i64, currency: Option<&str>) -> Result<Vec<AccountTotals>> {
    Ok(with_db!(db, pool => sqlx::query_as(
        "SELECT a.code, a.type AS account_type, a.currency, \
           CAST(COALESCE(SUM(CASE WHEN p.direction = 'D' THEN p.amount ELSE 0 END), 0) AS BIGINT) AS debits, \
           CAST(COALESCE(SUM(CASE WHEN p.direction = 'C' THEN p.amount ELSE 0 END), 0) AS BIGINT) AS credits \
         FROM ledger_postings p JOIN ledger_accounts a ON a.id = p.account_id \
         WHERE NOT p.pending AND p.created_at_us <= $1 AND ($2 = '' OR a.currency = $2) \
         GROUP BY a.code, a.type, a.currency ORDER BY a.currency, a.code",
    )
    .bind(as_of_us)
    .bind(currency.unwrap_or(""))
    .fetch_all(pool)
    .await)?)
}

/// One posting of an exported entry (an entry without postings has one row of NULLs).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    pub entry_id: String,
    pub sequence: i64,
    pub created_at_us: i64,
    pub kind: String,
    /// A pending entry's status as of now: the status of the entry that resolved it.
    pub status: String,
    pub code: Option<String>,
    pub direction: Option<String>,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// A pending entry's posting: it reserves, it never moved money itself (the entry
    /// that posted it did).
    pub reservation: Option<bool>,
    pub metadata: String,
    pub resolves_entry_id: Option<String>,
    pub resolved_by_entry_id: Option<String>,
}

/// The postings of at most `entries_max` entries created in `[from_us, to_us)` after
/// sequence `after`, in journal order.
pub async fn export_page(db: &Db, from_us: i64, to_us: i64, after: i64, entries_max: i64) -> Result<Vec<ExportRow>> {
    // Entries' times never go backwards in sequence order (`sequence_before`), so the
    // range's ends are found through the index by time and every page is a range of the
    // sequence index between them (the last page stops at the range's end instead of
    // reading on to the journal's). The time filter stays as well.
    let sql = format!(
        "WITH page AS (SELECT id, sequence, created_at_us, kind, status, metadata, pending_entry_id \
           FROM ledger_entries WHERE sequence > $3 AND sequence > {first} AND sequence <= {last} \
           AND created_at_us >= $1 AND created_at_us < $2 ORDER BY sequence LIMIT $4) \
         SELECT e.id AS entry_id, e.sequence, e.created_at_us, e.kind, \
                CASE WHEN e.status = 'pending' AND r.id IS NOT NULL THEN r.status ELSE e.status END AS status, \
                a.code, p.direction, p.amount, p.currency, p.pending AS reservation, e.metadata, \
                e.pending_entry_id AS resolves_entry_id, r.id AS resolved_by_entry_id \
         FROM page e LEFT JOIN ledger_postings p ON p.entry_id = e.id \
         LEFT JOIN ledger_accounts a ON a.id = p.account_id \
         LEFT JOIN ledger_entries r ON r.pending_entry_id = e.id \
         ORDER BY e.sequence, p.idx",
        first = sequence_before("<", "$1"),
        last = sequence_before("<", "$2"),
    );
    Ok(with_db!(db, pool => sqlx::query_as(&sql)
        .bind(from_us)
        .bind(to_us)
        .bind(after)
        .bind(entries_max)
        .fetch_all(pool)
        .await)?)
}

/// The id of the account with `code`, if it exists.
pub async fn account_id(db: &Db, code: &str) -> Result<Option<i64>> {
    Ok(with_db!(db, pool => sqlx::query_scalar("SELECT id FROM ledger_accounts WHERE code = $1")
        .bind(code)
        .fetch_optional(pool)
        .await)?)
}

/// Posted credits less debits of an account before `before_us` (its balance then, for
/// a credit-normal account).
pub async fn net_credits_before(db: &Db, account_id: i64, before_us: i64) -> Result<i64> {
    // Time ranges of an account's postings are read as sequence ranges (`sequence_before`).
    let sql = format!(
        "SELECT CAST(SUM(CASE WHEN direction = 'C' THEN amount ELSE -amount END) AS BIGINT) FROM ledger_postings \
         WHERE account_id = $1 AND sequence <= {} AND NOT pending AND created_at_us < $2",
        sequence_before("<", "$2"),
    );
    let sum: Option<i64> =
        with_db!(db, pool => sqlx::query_scalar(&sql).bind(account_id).bind(before_us).fetch_one(pool).await)?;
    Ok(sum.unwrap_or(0))
}

/// One posting of an entry that touched an account.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PostingLine {
    pub entry_id: String,
    pub sequence: i64,
    pub created_at_us: i64,
    pub kind: String,
    pub description: String,
    pub account_id: i64,
    pub code: String,
    pub direction: String,
    pub amount: i64,
}

/// Every posting of the entries whose posted postings touched `account_id` in
/// `[from_us, to_us)`, in journal order.
pub async fn postings_of_entries_touching(
    db: &Db,
    account_id: i64,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<PostingLine>> {
    let sql = format!(
        "SELECT e.id AS entry_id, e.sequence, e.created_at_us, e.kind, e.description, p.account_id, a.code, \
                p.direction, p.amount \
         FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id JOIN ledger_accounts a ON a.id = p.account_id \
         WHERE e.id IN (SELECT entry_id FROM ledger_postings WHERE account_id = $1 AND sequence > {} \
                        AND sequence <= {} AND NOT pending AND created_at_us >= $2 AND created_at_us < $3) \
         ORDER BY e.sequence, p.idx",
        sequence_before("<", "$2"),
        sequence_before("<", "$3"),
    );
    Ok(with_db!(db, pool => sqlx::query_as(&sql)
        .bind(account_id)
        .bind(from_us)
        .bind(to_us)
        .fetch_all(pool)
        .await)?)
}

/// A debit of an entry of one kind to an account whose code starts with a prefix.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KindDebit {
    pub entry_id: String,
    pub metadata: String,
    pub amount: i64,
    pub currency: String,
    pub created_at_us: i64,
}

/// The debits of entries of `kind` created in `[from_us, to_us)` to accounts whose code
/// starts with `code_prefix` (a processor's clearing accounts, say).
pub async fn debits_of_kind(
    db: &Db,
    kind: &str,
    code_prefix: &str,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<KindDebit>> {
    postings_of_kind(db, kind, code_prefix, crate::ledger::Direction::Debit, from_us, to_us).await
}

/// `debits_of_kind` for either direction.
pub async fn postings_of_kind(
    db: &Db,
    kind: &str,
    code_prefix: &str,
    direction: crate::ledger::Direction,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<KindDebit>> {
    Ok(with_db!(db, pool => sqlx::query_as(
        "SELECT e.id AS entry_id, e.metadata, p.amount, p.currency, e.created_at_us FROM ledger_entries e \
         JOIN ledger_postings p ON p.entry_id = e.id JOIN ledger_accounts a ON a.id = p.account_id \
         WHERE e.kind = $3 AND e.created_at_us >= $1 AND e.created_at_us < $2 \
           AND p.direction = $5 AND a.code LIKE $4",
    )
    .bind(from_us)
    .bind(to_us)
    .bind(kind)
    .bind(format!("{code_prefix}%"))
    .bind(direction.as_db())
    .fetch_all(pool)
    .await)?)
}
