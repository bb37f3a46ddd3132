//! Streaming export of ledger postings: one row per posting, in sequence order, read in
//! bounded pages so any range costs constant memory.

use serde_json::json;

use crate::error::Result;
use crate::money::{Currency, Money};
use crate::store::Db;
use crate::with_db;

/// Postings read per page.
pub const PAGE_ROWS: i64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

pub const CSV_HEADER: &str = "entry_id,sequence,created_at,kind,status,account,direction,amount,currency,metadata\n";

#[derive(sqlx::FromRow)]
struct Row {
    entry_id: String,
    sequence: i64,
    idx: i16,
    created_at_us: i64,
    kind: String,
    status: String,
    code: String,
    direction: String,
    amount: i64,
    currency: String,
    metadata: String,
}

/// Where the next page starts: after (sequence, posting index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub sequence: i64,
    pub idx: i16,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// One page of the export as bytes, and the cursor after it (None at the end).
pub async fn page(
    db: &Db,
    from_us: i64,
    to_us: i64,
    after: Cursor,
    rows_max: i64,
    format: Format,
) -> Result<(Vec<u8>, usize, Option<Cursor>)> {
    let rows: Vec<Row> = with_db!(db, pool => sqlx::query_as(
        "SELECT e.id AS entry_id, e.sequence, p.idx, e.created_at_us, e.kind, e.status, a.code, p.direction, p.amount, \
                p.currency, e.metadata \
         FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id JOIN ledger_accounts a ON a.id = p.account_id \
         WHERE e.created_at_us >= $1 AND e.created_at_us < $2 AND (e.sequence > $3 OR (e.sequence = $3 AND p.idx > $4)) \
         ORDER BY e.sequence, p.idx LIMIT $5",
    )
    .bind(from_us)
    .bind(to_us)
    .bind(after.sequence)
    .bind(after.idx)
    .bind(rows_max)
    .fetch_all(pool)
    .await)?;
    let mut out = Vec::with_capacity(rows.len() * 160);
    for r in &rows {
        let amount = Currency::from_code(&r.currency)
            .map(|c| Money::from_minor(c, r.amount).amount_string())
            .unwrap_or_else(|| r.amount.to_string());
        let direction = if r.direction == "D" { "debit" } else { "credit" };
        let at = crate::dates::rfc3339(r.created_at_us);
        match format {
            Format::Csv => {
                let line = [
                    r.entry_id.as_str(),
                    &r.sequence.to_string(),
                    &at,
                    &r.kind,
                    &r.status,
                    &r.code,
                    direction,
                    &amount,
                    &r.currency,
                    &r.metadata,
                ]
                .iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(",");
                out.extend_from_slice(line.as_bytes());
            }
            Format::Jsonl => {
                let metadata: serde_json::Value = serde_json::from_str(&r.metadata).unwrap_or(json!({}));
                let line = json!({
                    "entry_id": r.entry_id, "sequence": r.sequence, "created_at": at, "kind": r.kind,
                    "status": r.status, "account": r.code, "direction": direction, "amount": amount,
                    "currency": r.currency, "metadata": metadata,
                });
                out.extend_from_slice(line.to_string().as_bytes());
            }
        }
        out.push(b'\n');
    }
    let next = (rows.len() as i64 == rows_max)
        .then(|| rows.last().map(|r| Cursor { sequence: r.sequence, idx: r.idx }))
        .flatten();
    Ok((out, rows.len(), next))
}
