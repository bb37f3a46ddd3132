//! Streaming export of the journal: one row per posting, in sequence order, read a page
//! of entries at a time so any range costs constant memory and each page is one index
//! range from the last entry sent (a cursor on postings, `(sequence, idx)`, cannot be
//! one range, and made the export slower with every page).
//!
//! An entry's `status` is its status as the export runs: a pending hold later posted,
//! voided or expired says so, and names the entry that resolved it
//! (`resolved_by_entry_id`). A hold's postings are `reservation` rows: they never moved
//! money (the entry that posted the hold carries the postings that did), so the money
//! moved is the sum of the other rows. A resolution without postings of its own (a void, an
//! expiry) is a row too, with the account, direction and amount empty, naming the hold
//! it resolved (`resolves_entry_id`); so does the entry that posted a hold.

use std::borrow::Cow;

use serde_json::json;

use crate::kernel::error::{Error, Result};
use crate::kernel::money::{Currency, Money};
use crate::ledger::read::books::ExportRow;
use crate::store::Db;

/// Entries read per page: 500 postings for two-posting transfers, 25,000 (about 3 MB)
/// at most with `ledger::POSTINGS_MAX` each; a page goes out in chunks of at most
/// `CHUNK_BYTES_MAX`.
pub const PAGE_ENTRIES: i64 = 250;

/// Largest chunk of export bytes in one message, well under the gRPC message limit.
pub const CHUNK_BYTES_MAX: usize = 256 * 1024;

/// Splits a page's bytes into chunks of at most `CHUNK_BYTES_MAX` (a single longer line
/// stays whole), each with its count of lines.
pub fn chunks(data: Vec<u8>) -> Vec<(Vec<u8>, usize)> {
    if data.len() <= CHUNK_BYTES_MAX {
        let lines = data.iter().filter(|b| **b == b'\n').count();
        return vec![(data, lines)];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let limit = (start + CHUNK_BYTES_MAX).min(data.len());
        // The last line end within the limit, else the end of the first line.
        let end = data[start..limit]
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| start + i + 1)
            .filter(|e| *e > start)
            .or_else(|| data[start..].iter().position(|b| *b == b'\n').map(|i| start + i + 1))
            .unwrap_or(data.len());
        let chunk = data[start..end].to_vec();
        let lines = chunk.iter().filter(|b| **b == b'\n').count();
        out.push((chunk, lines));
        start = end;
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

pub const CSV_HEADER: &str = "entry_id,sequence,created_at,kind,status,account,direction,amount,currency,\
reservation,metadata,resolves_entry_id,resolved_by_entry_id\n";

/// Where the next page starts: after the entry with this sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub sequence: i64,
}

/// One page of the export (at most `entries_max` entries created in `[from_us, to_us)`
/// after `after`) as bytes, how many rows it holds, and the cursor after it (None at
/// the end).
pub async fn page(
    db: &Db,
    from_us: i64,
    to_us: i64,
    after: Cursor,
    entries_max: i64,
    format: Format,
) -> Result<(Vec<u8>, usize, Option<Cursor>)> {
    let rows = crate::ledger::read::books::export_page(db, from_us, to_us, after.sequence, entries_max).await?;
    let out = match format {
        Format::Csv => csv_lines(&rows)?,
        Format::Jsonl => jsonl_lines(&rows),
    };
    let entries = {
        let mut seqs: Vec<i64> = rows.iter().map(|r| r.sequence).collect();
        seqs.dedup();
        seqs.len() as i64
    };
    let next = (entries == entries_max).then(|| rows.last().map(|r| Cursor { sequence: r.sequence })).flatten();
    Ok((out, rows.len(), next))
}

/// A posting's fields as the export writes them, in `CSV_HEADER`'s order.
/// The row's own text is borrowed, not copied: the export writes every posting.
fn fields(r: &ExportRow) -> [Cow<'_, str>; 13] {
    let currency = r.currency.as_deref().unwrap_or_default();
    let amount = match (Currency::from_code(currency), r.amount) {
        (Some(c), Some(minor)) => Money::from_minor(c, minor).amount_string(),
        (None, Some(minor)) => minor.to_string(),
        (_, None) => String::new(),
    };
    let direction = match r.direction.as_deref() {
        Some("D") => "debit",
        Some(_) => "credit",
        None => "",
    };
    let reservation = match r.reservation {
        Some(true) => "true",
        Some(false) => "false",
        None => "",
    };
    [
        Cow::Borrowed(r.entry_id.as_str()),
        Cow::Owned(r.sequence.to_string()),
        Cow::Owned(crate::kernel::dates::rfc3339(r.created_at_us)),
        Cow::Borrowed(r.kind.as_str()),
        Cow::Borrowed(r.status.as_str()),
        Cow::Borrowed(r.code.as_deref().unwrap_or_default()),
        Cow::Borrowed(direction),
        Cow::Owned(amount),
        Cow::Borrowed(currency),
        Cow::Borrowed(reservation),
        Cow::Borrowed(r.metadata.as_str()),
        Cow::Borrowed(r.resolves_entry_id.as_deref().unwrap_or_default()),
        Cow::Borrowed(r.resolved_by_entry_id.as_deref().unwrap_or_default()),
    ]
}

/// CSV by the `csv` crate: RFC 4180 quoting where a field needs it (metadata is JSON,
/// with commas and quotes), records ending in `\n`.
fn csv_lines(rows: &[ExportRow]) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::with_capacity(rows.len() * 160));
    for r in rows {
        w.write_record(fields(r).iter().map(|f| f.as_bytes())).map_err(Error::internal)?;
    }
    w.into_inner().map_err(|e| Error::internal(anyhow::anyhow!("export CSV: {e}")))
}

/// One JSON object per line; metadata as an object rather than its text.
fn jsonl_lines(rows: &[ExportRow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 200);
    for r in rows {
        let [entry_id, _, at, kind, status, account, direction, amount, currency, _, _, resolves, resolved_by] =
            fields(r);
        let metadata: serde_json::Value = serde_json::from_str(&r.metadata).unwrap_or(json!({}));
        let line = json!({
            "entry_id": entry_id, "sequence": r.sequence, "created_at": at, "kind": kind,
            "status": status, "account": account, "direction": direction, "amount": amount,
            "currency": currency, "reservation": r.reservation, "metadata": metadata, "resolves_entry_id": resolves,
            "resolved_by_entry_id": resolved_by,
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}
