//! Settlement reports: strict parsing. A bad line refuses the whole report, naming the
//! line and column.

use std::collections::{HashMap, HashSet};

use crate::kernel::error::{Error, Result};
use crate::kernel::money::{parse_minor, Currencies, Money};

/// Largest report accepted, in bytes (about 10 MB: over 100,000 rows).
pub const REPORT_BYTES_MAX: usize = 10 * 1024 * 1024;
const COLUMNS: [&str; 7] = ["processor_reference", "type", "amount", "fee", "net", "currency", "created_at"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    pub line: i64,
    /// Empty when the processor gave none: matched by amount, currency and time.
    pub reference: String,
    pub at_us: i64,
    pub kind: String,
    pub amount: Money,
    pub fee: Money,
    pub net: Money,
}

fn bad(line: usize, column: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid("csv", format!("line {line}, column {column}: {why}"))
}

/// Parses a settlement report strictly; any bad line refuses the whole report.
pub fn parse_report(csv: &str, currencies: &Currencies) -> Result<Vec<ReportRow>> {
    if csv.len() > REPORT_BYTES_MAX {
        return Err(Error::invalid("csv", format!("larger than {REPORT_BYTES_MAX} bytes")));
    }
    let mut lines = csv.lines().enumerate();
    let header: Vec<&str> = lines.next().map(|(_, h)| h.split(',').map(str::trim).collect()).unwrap_or_default();
    let mut index = HashMap::new();
    for col in COLUMNS {
        let i = header.iter().position(|h| *h == col).ok_or_else(|| bad(1, col, "missing column"))?;
        index.insert(col, i);
    }
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != header.len() {
            return Err(bad(n, "*", format!("{} fields, the header has {}", cells.len(), header.len())));
        }
        let cell = |c: &str| cells[index[c]].trim();
        let reference = cell("processor_reference");
        if reference.len() > 128 {
            return Err(bad(n, "processor_reference", "at most 128 characters"));
        }
        if !reference.is_empty() && !seen.insert(reference.to_owned()) {
            return Err(bad(n, "processor_reference", format!("duplicate reference {reference}")));
        }
        let kind = cell("type");
        if !matches!(kind, "capture" | "refund" | "payout" | "payout_return" | "dispute" | "dispute_reversal") {
            return Err(bad(n, "type", "capture, refund, payout, payout_return, dispute or dispute_reversal"));
        }
        let currency = currencies
            .parse("currency", cell("currency"))
            .map_err(|_| bad(n, "currency", "unknown or disabled currency"))?;
        let money = |c: &str| -> Result<Money> {
            parse_minor(c, cell(c), currency, true)
                .map(|m| Money::from_minor(currency, m))
                .map_err(|_| bad(n, c, format!("not an exact {currency} amount")))
        };
        let (amount, fee, net) = (money("amount")?, money("fee")?, money("net")?);
        if amount.checked_sub(fee) != Some(net) {
            return Err(bad(n, "net", "net must equal amount minus fee"));
        }
        let at = humantime::parse_rfc3339_weak(cell("created_at"))
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .ok_or_else(|| bad(n, "created_at", "not an RFC 3339 time"))?;
        rows.push(ReportRow {
            line: n as i64,
            reference: reference.to_owned(),
            at_us: i64::try_from(at.as_micros()).unwrap_or(i64::MAX),
            kind: kind.to_owned(),
            amount,
            fee,
            net,
        });
    }
    Ok(rows)
}
