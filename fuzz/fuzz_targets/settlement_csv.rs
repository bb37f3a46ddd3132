//! The settlement CSV importer: `dmpay::finance::recon::parse_report` on any bytes.
//!
//! Input: the report (invalid UTF-8 replaced, as a lossy reader would). Oracles: no
//! panic; an accepted report has at most one row per line, rows in line order, only
//! the row types the importer knows (card captures and refunds, payouts and their
//! returns, disputes and their reversals), unique non-empty references, amount - fee = net in the row's
//! currency, amounts within AMOUNT_MINOR_MAX; with only USD enabled every row is USD
//! and, if the report was also accepted with every currency, the same rows.
#![no_main]

use std::collections::HashSet;

use dmpay::finance::recon::parse_report;
use dmpay::kernel::money::{Currencies, Currency, AMOUNT_MINOR_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let csv = String::from_utf8_lossy(data);
    let all = parse_report(&csv, &Currencies::all());
    let usd_only = Currencies::new(vec![Currency::from_code("USD").expect("USD is known")]);
    let usd = parse_report(&csv, &usd_only);

    if let Ok(rows) = &all {
        let lines = csv.lines().count();
        assert!(rows.len() < lines.max(1), "{} rows from {lines} lines", rows.len());
        let mut refs = HashSet::new();
        let mut last_line = 1;
        for row in rows {
            assert!(row.line > last_line && row.line as usize <= lines, "line {} out of order", row.line);
            last_line = row.line;
            assert!(
                matches!(
                    row.kind.as_str(),
                    "capture" | "refund" | "payout" | "payout_return" | "dispute" | "dispute_reversal"
                ),
                "{:?}",
                row.kind
            );
            assert!(row.reference.len() <= 128);
            assert!(row.reference.is_empty() || refs.insert(row.reference.clone()), "duplicate {:?}", row.reference);
            for m in [row.amount, row.fee, row.net] {
                assert_eq!(m.currency(), row.amount.currency());
                assert!(m.minor().unsigned_abs() <= AMOUNT_MINOR_MAX as u64, "{m:?}");
            }
            assert_eq!(row.amount.checked_sub(row.fee), Some(row.net));
            assert!(row.at_us >= 0);
        }
    }
    if let Ok(rows) = &usd {
        assert!(rows.iter().all(|r| r.amount.currency().code() == "USD"));
        assert_eq!(all.as_ref().ok(), Some(rows), "accepted with USD only but not with every currency");
    }
});
