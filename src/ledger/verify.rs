//! Ledger verification: recompute every balance from postings and check every entry,
//! the sequence and the references. Used by `dmpay ledger verify` and the finance
//! service; reports each difference instead of stopping at the first.

use super::model::Balance;
use crate::kernel::error::Result;
use crate::store::Db;
use crate::with_db;

/// Problems reported, at most; a ledger this broken needs a person, not a longer list.
const PROBLEMS_MAX: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `balance_mismatch`, `negative_balance`, `unbalanced_entry`, `too_few_postings`,
    /// `sequence_gap`, `orphan_posting`.
    pub kind: &'static str,
    pub account_code: Option<String>,
    pub entry_id: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub accounts_checked: i64,
    pub entries_checked: i64,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn push(&mut self, p: Problem) {
        if self.problems.len() < PROBLEMS_MAX {
            self.problems.push(p);
        }
    }
}

#[derive(sqlx::FromRow)]
struct AccountCheck {
    code: String,
    credit_normal: bool,
    allow_negative: bool,
    posted_debits: i64,
    posted_credits: i64,
    pending_debits: i64,
    pending_credits: i64,
    sum_pd: Option<i64>,
    sum_pc: Option<i64>,
    sum_qd: Option<i64>,
    sum_qc: Option<i64>,
}

pub async fn verify(db: &Db) -> Result<Report> {
    let mut report = Report::default();

    // Pending postings count only while their entry is unresolved.
    let accounts: Vec<AccountCheck> = with_db!(db, pool => sqlx::query_as(
        "SELECT a.code, a.credit_normal, a.allow_negative, a.posted_debits, a.posted_credits, \
                a.pending_debits, a.pending_credits, s.pd AS sum_pd, s.pc AS sum_pc, s.qd AS sum_qd, s.qc AS sum_qc \
         FROM ledger_accounts a LEFT JOIN ( \
           SELECT p.account_id, \
             CAST(SUM(CASE WHEN NOT p.pending AND p.direction = 'D' THEN p.amount ELSE 0 END) AS BIGINT) AS pd, \
             CAST(SUM(CASE WHEN NOT p.pending AND p.direction = 'C' THEN p.amount ELSE 0 END) AS BIGINT) AS pc, \
             CAST(SUM(CASE WHEN p.pending AND r.id IS NULL AND p.direction = 'D' THEN p.amount ELSE 0 END) AS BIGINT) AS qd, \
             CAST(SUM(CASE WHEN p.pending AND r.id IS NULL AND p.direction = 'C' THEN p.amount ELSE 0 END) AS BIGINT) AS qc \
           FROM ledger_postings p LEFT JOIN ledger_entries r ON r.pending_entry_id = p.entry_id \
           GROUP BY p.account_id) s ON s.account_id = a.id \
         ORDER BY a.id",
    )
    .fetch_all(pool)
    .await)?;
    report.accounts_checked = accounts.len() as i64;
    for a in accounts {
        let stored = Balance {
            posted_debits: a.posted_debits,
            posted_credits: a.posted_credits,
            pending_debits: a.pending_debits,
            pending_credits: a.pending_credits,
        };
        let computed = Balance {
            posted_debits: a.sum_pd.unwrap_or(0),
            posted_credits: a.sum_pc.unwrap_or(0),
            pending_debits: a.sum_qd.unwrap_or(0),
            pending_credits: a.sum_qc.unwrap_or(0),
        };
        if stored != computed {
            report.push(Problem {
                kind: "balance_mismatch",
                account_code: Some(a.code.clone()),
                entry_id: None,
                detail: format!("stored {stored:?}, postings give {computed:?}"),
            });
        }
        if !a.allow_negative && stored.available(a.credit_normal).is_none_or(|v| v < 0) {
            report.push(Problem {
                kind: "negative_balance",
                account_code: Some(a.code),
                entry_id: None,
                detail: format!(
                    "available balance {:?} on an account that may not go negative",
                    stored.available(a.credit_normal)
                ),
            });
        }
    }

    let (entries, min_seq, max_seq, last_value): (i64, Option<i64>, Option<i64>, i64) = with_db!(db, pool => sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM ledger_entries), (SELECT MIN(sequence) FROM ledger_entries), \
                (SELECT MAX(sequence) FROM ledger_entries), (SELECT last_value FROM ledger_sequence WHERE id = 1)",
    )
    .fetch_one(pool)
    .await)?;
    report.entries_checked = entries;
    if entries > 0 && (min_seq != Some(1) || max_seq != Some(entries)) || last_value != max_seq.unwrap_or(0) {
        report.push(Problem {
            kind: "sequence_gap",
            account_code: None,
            entry_id: None,
            detail: format!(
                "{entries} entries span sequences {min_seq:?}..={max_seq:?}; the sequence counter is at {last_value}"
            ),
        });
    }

    let unbalanced: Vec<(String, String, i64)> = with_db!(db, pool => sqlx::query_as(
        "SELECT entry_id, currency, CAST(SUM(CASE WHEN direction = 'D' THEN amount ELSE -amount END) AS BIGINT) \
         FROM ledger_postings GROUP BY entry_id, currency \
         HAVING SUM(CASE WHEN direction = 'D' THEN amount ELSE -amount END) <> 0 LIMIT 1000",
    )
    .fetch_all(pool)
    .await)?;
    for (entry_id, currency, diff) in unbalanced {
        report.push(Problem {
            kind: "unbalanced_entry",
            account_code: None,
            entry_id: Some(entry_id),
            detail: format!("debits minus credits in {currency} is {diff} minor units"),
        });
    }

    let thin: Vec<String> = with_db!(db, pool => sqlx::query_scalar(
        "SELECT e.id FROM ledger_entries e WHERE e.status IN ('posted', 'pending') \
         AND (SELECT COUNT(*) FROM ledger_postings p WHERE p.entry_id = e.id) < 2 LIMIT 1000",
    )
    .fetch_all(pool)
    .await)?;
    for entry_id in thin {
        report.push(Problem {
            kind: "too_few_postings",
            account_code: None,
            entry_id: Some(entry_id),
            detail: "a posted or pending entry has fewer than two postings".into(),
        });
    }

    let orphans: Vec<String> = with_db!(db, pool => sqlx::query_scalar(
        "SELECT DISTINCT p.entry_id FROM ledger_postings p LEFT JOIN ledger_entries e ON e.id = p.entry_id \
         WHERE e.id IS NULL LIMIT 1000",
    )
    .fetch_all(pool)
    .await)?;
    for entry_id in orphans {
        report.push(Problem {
            kind: "orphan_posting",
            account_code: None,
            entry_id: Some(entry_id),
            detail: "postings whose entry does not exist".into(),
        });
    }
    Ok(report)
}
