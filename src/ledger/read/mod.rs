//! Reads: entries with their postings, account listings, point-in-time balances.

pub mod books;

use std::collections::HashMap;

use super::model::{AccountCode, Direction, Entry, EntryStatus, Metadata, Posting};
use crate::kernel::error::{Error, Result};
use crate::kernel::money::{Currency, Money};
use crate::store::Db;
use crate::with_db;

/// Largest page of a listing.
pub const PAGE_SIZE_MAX: u32 = 500;
pub const PAGE_SIZE_DEFAULT: u32 = 50;

#[derive(sqlx::FromRow)]
struct EntryRow {
    id: String,
    sequence: i64,
    kind: String,
    description: String,
    metadata: String,
    status: String,
    pending_entry_id: Option<String>,
    reverses_entry_id: Option<String>,
    expires_at_us: Option<i64>,
    created_by: String,
    created_at_us: i64,
    resolved_status: Option<String>,
}

#[derive(sqlx::FromRow)]
struct PostingRow {
    entry_id: String,
    account_id: i64,
    code: String,
    direction: String,
    amount: i64,
    currency: String,
}

const ENTRY_COLUMNS: &str = "e.id, e.sequence, e.kind, e.description, e.metadata, e.status, e.pending_entry_id, \
     e.reverses_entry_id, e.expires_at_us, e.created_by, e.created_at_us, r.status AS resolved_status";

fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Loads entries by id, in the order given; missing ids are skipped.
pub async fn get_entries(db: &Db, ids: &[String]) -> Result<Vec<Entry>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let list = placeholders(ids.len());
    let entry_sql = format!(
        "SELECT {ENTRY_COLUMNS} FROM ledger_entries e LEFT JOIN ledger_entries r ON r.pending_entry_id = e.id \
         WHERE e.id IN ({list})"
    );
    let posting_sql = format!(
        "SELECT p.entry_id, p.account_id, a.code, p.direction, p.amount, p.currency FROM ledger_postings p \
         JOIN ledger_accounts a ON a.id = p.account_id WHERE p.entry_id IN ({list}) ORDER BY p.entry_id, p.idx"
    );
    let (rows, postings): (Vec<EntryRow>, Vec<PostingRow>) = with_db!(db, pool => {
        let mut q = sqlx::query_as::<_, EntryRow>(&entry_sql);
        for id in ids {
            q = q.bind(id);
        }
        let rows = q.fetch_all(pool).await?;
        let mut q = sqlx::query_as::<_, PostingRow>(&posting_sql);
        for id in ids {
            q = q.bind(id);
        }
        let postings = q.fetch_all(pool).await?;
        Ok::<_, sqlx::Error>((rows, postings))
    })?;
    let mut by_entry: HashMap<String, Vec<Posting>> = HashMap::new();
    for p in postings {
        let currency = parse_currency(&p.currency)?;
        by_entry.entry(p.entry_id).or_default().push(Posting {
            account_id: p.account_id,
            account_code: AccountCode::from_db(p.code),
            direction: Direction::from_db(&p.direction)?,
            amount: Money::from_minor(currency, p.amount),
        });
    }
    let mut by_id: HashMap<String, Entry> = HashMap::with_capacity(rows.len());
    for row in rows {
        let stored = EntryStatus::from_db(&row.status)?;
        let status = match (stored, row.resolved_status.as_deref()) {
            (EntryStatus::Pending, Some(resolved)) => EntryStatus::from_db(resolved)?,
            (s, _) => s,
        };
        let metadata: Metadata = serde_json::from_str(&row.metadata).map_err(Error::internal)?;
        let entry = Entry {
            postings: by_entry.remove(&row.id).unwrap_or_default(),
            id: row.id,
            sequence: row.sequence,
            kind: row.kind,
            description: row.description,
            metadata,
            status,
            pending_entry_id: row.pending_entry_id,
            reverses_entry_id: row.reverses_entry_id,
            expires_at_us: row.expires_at_us,
            created_by: row.created_by,
            created_at_us: row.created_at_us,
        };
        by_id.insert(entry.id.clone(), entry);
    }
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

pub async fn get_entry(db: &Db, id: &str) -> Result<Option<Entry>> {
    Ok(get_entries(db, &[id.to_owned()]).await?.pop())
}

fn parse_currency(code: &str) -> Result<Currency> {
    Currency::from_code(code).ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {code} in ledger")))
}

/// A page cursor: the sequence of the last entry returned.
pub fn parse_page_token(token: &str) -> Result<i64> {
    if token.is_empty() {
        return Ok(i64::MAX);
    }
    token
        .strip_prefix("s")
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| Error::invalid("page_token", "not a token from a previous page"))
}

pub fn page_size(requested: u32) -> Result<u32> {
    match requested {
        0 => Ok(PAGE_SIZE_DEFAULT),
        n if n > PAGE_SIZE_MAX => Err(Error::invalid("page_size", format!("at most {PAGE_SIZE_MAX}"))),
        n => Ok(n),
    }
}

/// SQL for the sequence of the last entry created before a time (`op` is `<` or `<=`,
/// `param` the time's placeholder), 0 when there is none. Entries' times never go
/// backwards in sequence order (`batch::Committed`), so the entries created before a
/// time are exactly those up to this sequence, and an account's postings in a time range
/// are read through the index by account and sequence. The callers keep their filter on
/// the time as well: it costs nothing on the rows the range reads, and keeps an answer
/// exact for entries written before times were assigned in order.
pub(crate) fn sequence_before(op: &str, param: &str) -> String {
    format!(
        "COALESCE((SELECT sequence FROM ledger_entries WHERE created_at_us {op} {param} \
         ORDER BY created_at_us DESC, sequence DESC LIMIT 1), 0)"
    )
}

/// Entries that touch an account, newest first, in `[from_us, to_us)`.
pub async fn list_entries(
    db: &Db,
    account_id: i64,
    from_us: i64,
    to_us: i64,
    page_size: u32,
    before_sequence: i64,
) -> Result<(Vec<Entry>, Option<String>)> {
    let limit = i64::from(page_size) + 1;
    let sql = format!(
        "SELECT DISTINCT sequence, entry_id FROM ledger_postings \
         WHERE account_id = $1 AND sequence < $2 AND sequence > {} AND sequence <= {} \
         AND created_at_us >= $3 AND created_at_us < $4 \
         ORDER BY sequence DESC LIMIT $5",
        sequence_before("<", "$3"),
        sequence_before("<", "$4"),
    );
    let rows: Vec<(i64, String)> = with_db!(db, pool => sqlx::query_as(&sql)
    .bind(account_id)
    .bind(before_sequence)
    .bind(from_us)
    .bind(to_us)
    .bind(limit)
    .fetch_all(pool)
    .await)?;
    let more = rows.len() > page_size as usize;
    let rows = &rows[..rows.len().min(page_size as usize)];
    let next = if more { rows.last().map(|(s, _)| format!("s{s}")) } else { None };
    let ids: Vec<String> = rows.iter().map(|(_, id)| id.clone()).collect();
    Ok((get_entries(db, &ids).await?, next))
}

/// Posted debits and credits of an account up to and including `as_of_us`.
pub async fn posted_as_of(db: &Db, account_id: i64, as_of_us: i64) -> Result<(i64, i64)> {
    let sql = format!(
        "SELECT CAST(SUM(CASE WHEN direction = 'D' THEN amount ELSE 0 END) AS BIGINT), \
                CAST(SUM(CASE WHEN direction = 'C' THEN amount ELSE 0 END) AS BIGINT) \
         FROM ledger_postings WHERE account_id = $1 AND sequence <= {} AND NOT pending AND created_at_us <= $2",
        sequence_before("<=", "$2"),
    );
    let row: (Option<i64>, Option<i64>) = with_db!(db, pool => sqlx::query_as(&sql)
    .bind(account_id)
    .bind(as_of_us)
    .fetch_one(pool)
    .await)?;
    Ok((row.0.unwrap_or(0), row.1.unwrap_or(0)))
}
