//! Settlement reconciliation: a processor's daily report against the ledger's card
//! entries. Each report row is matched by processor reference; ledger card entries of
//! that day the report lacks are flagged. Runs, items and resolutions are append-only.
//!
//! A day may get more than one report (a processor corrects or completes a day), and a
//! later report **supersedes** the earlier one:
//! - the books follow the current report: each run books the difference between its
//!   fees and net settlement and those of the run it superseded (so the day's bookings
//!   sum to the current report's totals, and a capture is settled once, whatever the
//!   number of reports);
//! - the new run's items are the day's open questions; the superseded run's open items
//!   can no longer be resolved (`ITEM_SUPERSEDED`);
//! - a superseded item's resolution carries over to the new run's identical item
//!   (same kind, reference and amounts), its adjustment entry kept; an adjustment whose
//!   discrepancy the new report no longer has is reversed.
//!
//! So once every item of the current run is matched or resolved, the clearing account
//! nets to zero for the day. Imports and resolutions of one day take turns on the day's
//! row (`recon_days`). What a run books is recomputed from stored data, so importing
//! the same report again completes an import that was cut off and books nothing twice.
//!
//! - `report`  strict parsing of the settlement CSV
//! - `books`   what a run books: the differences along the chain of runs, the reversals
//! - `items`   listing and resolving a run's items

use std::collections::{BTreeMap, HashMap, HashSet};

mod books;
mod items;
mod report;

pub use books::{Booking, BookingKind};
pub use report::{parse_report, ReportRow, REPORT_BYTES_MAX};

use crate::kernel::dates;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::RunId;
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;
use crate::ledger::Ledger;
use crate::store::Db;
use crate::with_db;

/// The caller on the ledger entries reconciliation books.
const RECON_ACTOR: &str = crate::ledger::callers::RECONCILIATION;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Run {
    pub run_id: RunId,
    pub processor: String,
    pub report_date: String,
    pub rows_count: i64,
    pub matched: i64,
    pub amount_mismatch: i64,
    pub missing_in_ledger: i64,
    pub missing_in_report: i64,
    pub duplicates: i64,
    /// The run of the same day this one superseded.
    pub prev_run_id: Option<RunId>,
    /// Books along the chain of runs (every run since migration 0013); earlier runs
    /// booked the whole day once, under keys that name the day.
    pub chained: bool,
}

/// What an import did: the run, whether it is the day's current report, and what it
/// booked (on a repeated import of the same report, the same entries, replayed).
#[derive(Debug, Clone)]
pub struct Imported {
    pub run: Run,
    /// False for a report that a later one of the same day has superseded: the books
    /// follow the later one.
    pub current: bool,
    /// True when this call made the run; false when the report was imported before.
    pub new: bool,
    pub bookings: Vec<Booking>,
    /// Resolutions of the superseded run carried to this run's identical items.
    pub carried: i64,
}

crate::stored_enum! {
    /// How a report row, or a ledger charge the report lacks, came out of matching.
    pub enum ItemStatus {
        Matched = "matched",
        /// The report and the ledger have the reference with different amounts.
        AmountMismatch = "amount_mismatch",
        /// In the report, not in the ledger.
        MissingInLedger = "missing_in_ledger",
        /// In the ledger, not in the report.
        MissingInReport = "missing_in_report",
        /// The report has the reference more than once.
        Duplicate = "duplicate",
    }
}

crate::stored_enum! {
    /// How finance closed an item that did not match.
    pub enum Resolution {
        /// An adjusting entry books the difference to the suspense account.
        Suspense = "suspense",
        /// Recorded with its note; nothing is booked.
        Explained = "explained",
    }
}

/// Which of a run's items to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemFilter {
    All,
    Status(ItemStatus),
    /// Unmatched, unresolved and of the day's current run: what still needs a decision.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub item_id: String,
    pub run_id: RunId,
    pub status: ItemStatus,
    pub processor_reference: String,
    pub currency: String,
    pub report_amount: Option<i64>,
    pub ledger_amount: Option<i64>,
    pub entry_id: Option<String>,
    pub line: Option<i64>,
    pub resolution: Option<Resolution>,
    pub note: Option<String>,
    pub resolved_by: Option<String>,
    /// The adjustment entry of a `suspense` resolution.
    pub adjustment_entry_id: Option<String>,
    /// Its run is no longer the day's current report: it cannot be resolved.
    pub superseded: bool,
}

/// An item as its tables store it; `Item` is the same with its texts parsed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct ItemRow {
    item_id: String,
    run_id: RunId,
    status: String,
    processor_reference: String,
    currency: String,
    report_amount: Option<i64>,
    ledger_amount: Option<i64>,
    entry_id: Option<String>,
    line: Option<i64>,
    resolution: Option<String>,
    note: Option<String>,
    resolved_by: Option<String>,
    adjustment_entry_id: Option<String>,
    superseded: bool,
}

impl TryFrom<ItemRow> for Item {
    type Error = Error;

    fn try_from(r: ItemRow) -> Result<Item> {
        Ok(Item {
            status: ItemStatus::from_db(&r.status)?,
            resolution: r.resolution.as_deref().map(Resolution::from_db).transpose()?,
            item_id: r.item_id,
            run_id: r.run_id,
            processor_reference: r.processor_reference,
            currency: r.currency,
            report_amount: r.report_amount,
            ledger_amount: r.ledger_amount,
            entry_id: r.entry_id,
            line: r.line,
            note: r.note,
            resolved_by: r.resolved_by,
            adjustment_entry_id: r.adjustment_entry_id,
            superseded: r.superseded,
        })
    }
}

const RUN_COLUMNS: &str = "run_id, processor, report_date, rows_count, matched, amount_mismatch, missing_in_ledger, \
     missing_in_report, duplicates, prev_run_id, chained";

/// Most runs (reports) one processor day may have: each run's bookings are completed
/// along the chain of the runs before it.
pub const RUNS_PER_DAY_MAX: i64 = 100;

/// A ledger entry the processor's report should show: a card capture (the clearing
/// account debited), a payout (credited), a payout's return (debited), a dispute
/// (credited the disputed amount; its fee is the report's) or a won dispute (debited). `amount` is
/// signed as the report signs it: what came into the platform's balance at the
/// processor.
struct LedgerCharge {
    /// The report's type for it: `capture`, `payout`, `payout_return`, `dispute` or
    /// `dispute_reversal`.
    kind: &'static str,
    entry_id: String,
    reference: String,
    amount: Money,
    at_us: i64,
    in_day: bool,
}

async fn ledger_charges(db: &Db, day_start: i64) -> Result<Vec<LedgerCharge>> {
    // A day either side, so a capture booked just across midnight still matches by
    // reference; only the day itself counts for "missing in report".
    let from = day_start - 86_400_000_000;
    let to = day_start + 2 * 86_400_000_000;
    use crate::ledger::Direction;
    const CLEARING: &str = "processor:sandbox:clearing:";
    let mut out = Vec::new();
    for (ledger_kind, direction, report_kind, sign) in [
        ("dm_payment_card", Direction::Debit, "capture", 1),
        ("tab_capture", Direction::Debit, "capture", 1),
        ("payout", Direction::Credit, "payout", -1),
        ("payout_return", Direction::Debit, "payout_return", 1),
        ("dispute", Direction::Credit, "dispute", -1),
        ("dispute_reversal", Direction::Debit, "dispute_reversal", 1),
    ] {
        let rows = crate::ledger::read::books::postings_of_kind(db, ledger_kind, CLEARING, direction, from, to).await?;
        for crate::ledger::read::books::KindDebit { entry_id, metadata, amount, currency, created_at_us: at } in rows {
            let meta: BTreeMap<String, String> = serde_json::from_str(&metadata).unwrap_or_default();
            let Some(currency) = Currency::from_code(&currency) else { continue };
            out.push(LedgerCharge {
                kind: report_kind,
                entry_id,
                reference: meta.get("processor_reference").cloned().unwrap_or_default(),
                amount: Money::from_minor(currency, sign * amount),
                at_us: at,
                in_day: at >= day_start && at < day_start + 86_400_000_000,
            });
        }
    }
    Ok(out)
}

pub struct Reconciler {
    db: Db,
    ledger: Ledger,
    /// How far apart a report row without a reference and a ledger charge of the same
    /// amount and currency may be in time and still match.
    time_tolerance_us: i64,
}

struct NewItem {
    status: ItemStatus,
    reference: String,
    currency: Currency,
    report_amount: Option<i64>,
    ledger_amount: Option<i64>,
    entry_id: Option<String>,
    line: Option<i64>,
}

impl NewItem {
    /// Whether a resolved item of an earlier run stands for the same discrepancy.
    fn same_as(&self, earlier: &ItemRow) -> bool {
        self.status.as_str() == earlier.status
            && self.reference == earlier.processor_reference
            && self.currency.code() == earlier.currency
            && self.report_amount == earlier.report_amount
            && self.ledger_amount == earlier.ledger_amount
    }
}

/// How a run's insert ended.
enum Inserted {
    New(Run, i64),
    /// Another import of the day committed between the read and the write: try again.
    Raced,
    /// The same report, imported concurrently.
    Duplicate,
}

impl Reconciler {
    pub fn new(db: Db, ledger: Ledger, time_tolerance: std::time::Duration) -> Self {
        Reconciler { db, ledger, time_tolerance_us: i64::try_from(time_tolerance.as_micros()).unwrap_or(i64::MAX) }
    }

    async fn run_by_hash(&self, processor: &str, date: &str, hash: &str) -> Result<Option<Run>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM recon_runs WHERE processor = $1 AND report_date = $2 AND report_hash = $3"
        );
        let run: Option<Run> = with_db!(&self.db, pool => sqlx::query_as(&sql).bind(processor).bind(date).bind(hash).fetch_optional(pool).await)?;
        Ok(run)
    }

    pub(crate) async fn run(&self, run_id: &RunId) -> Result<Run> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM recon_runs WHERE run_id = $1");
        let run: Option<Run> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(run_id).fetch_optional(pool).await)?;
        run.ok_or_else(|| Error::NotFound(format!("reconciliation run {run_id} not found")))
    }

    /// The day's current run, if the day has one.
    pub(crate) async fn current_run_id(&self, processor: &str, date: &str) -> Result<Option<RunId>> {
        let id: Option<RunId> = with_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT current_run_id FROM recon_days WHERE processor = $1 AND report_date = $2",
        )
        .bind(processor)
        .bind(date)
        .fetch_optional(pool)
        .await)?;
        Ok(id)
    }

    /// `ImportSettlementReport`. The same report imported again is the same run (and
    /// completes what it books, if an earlier import was cut off); another report of a
    /// day already reconciled supersedes the day's current run.
    pub async fn import(&self, actor: &str, processor: &str, report_date: &str, csv: &str) -> Result<Imported> {
        if processor != "sandbox" {
            return Err(Error::invalid("processor", "only the sandbox processor is configured"));
        }
        let (y, m, d) = dates::parse_date(report_date).ok_or_else(|| Error::invalid("report_date", "YYYY-MM-DD"))?;
        let rows = parse_report(csv, self.ledger.accounts().currencies())?;
        let hash = crate::ledger::sha256_hex(csv.as_bytes());
        let day_start = dates::day_start_us(y, m, d);
        // A few attempts: another report of the same day may be imported meanwhile.
        for _ in 0..3 {
            if let Some(run) = self.run_by_hash(processor, report_date, &hash).await? {
                return self.complete(run, false, 0).await;
            }
            let prev = self.current_run_id(processor, report_date).await?;
            let items = self.match_rows(&rows, day_start).await?;
            match self.insert_run(actor, processor, report_date, &hash, &rows, items, prev.as_ref()).await? {
                Inserted::New(run, carried) => return self.complete(run, true, carried).await,
                Inserted::Raced | Inserted::Duplicate => continue,
            }
        }
        Err(Error::Unavailable(format!(
            "other reports of {report_date} were imported at the same time; retry the import"
        )))
    }

    /// Matches a report's rows against the ledger's card charges of the day.
    async fn match_rows(&self, rows: &[ReportRow], day_start: i64) -> Result<Vec<NewItem>> {
        let charges = ledger_charges(&self.db, day_start).await?;
        let mut by_ref: HashMap<&str, Vec<&LedgerCharge>> = HashMap::new();
        for c in &charges {
            by_ref.entry(c.reference.as_str()).or_default().push(c);
        }
        let mut items = Vec::new();
        // Ledger charges a report row has claimed, by index into `charges`.
        let mut claimed: HashSet<usize> = HashSet::new();
        let index_of = |c: &LedgerCharge| charges.iter().position(|x| std::ptr::eq(x, c));
        for row in rows {
            let currency = row.amount.currency();
            let found: Vec<&LedgerCharge> = if row.reference.is_empty() {
                // No reference: the nearest unclaimed charge of the same amount and
                // currency within the tolerance.
                charges
                    .iter()
                    .enumerate()
                    .filter(|(i, c)| {
                        !claimed.contains(i)
                            && c.kind == row.kind
                            && c.amount == row.amount
                            && (c.at_us - row.at_us).abs() <= self.time_tolerance_us
                    })
                    .min_by_key(|(_, c)| (c.at_us - row.at_us).abs())
                    .map(|(_, c)| vec![c])
                    .unwrap_or_default()
            } else {
                // A ledger entry of another type under the same reference is no match.
                by_ref
                    .get(row.reference.as_str())
                    .map(|v| v.iter().copied().filter(|c| c.kind == row.kind).collect())
                    .unwrap_or_default()
            };
            for c in &found {
                if let Some(i) = index_of(c) {
                    claimed.insert(i);
                }
            }
            let reference = if row.reference.is_empty() {
                found.first().map(|c| c.reference.clone()).unwrap_or_default()
            } else {
                row.reference.clone()
            };
            let item = match (row.kind.as_str(), found.as_slice()) {
                (_, [one]) => NewItem {
                    status: if one.amount == row.amount { ItemStatus::Matched } else { ItemStatus::AmountMismatch },
                    reference,
                    currency,
                    report_amount: Some(row.amount.minor()),
                    ledger_amount: Some(one.amount.minor()),
                    entry_id: Some(one.entry_id.clone()),
                    line: Some(row.line),
                },
                (_, [first, ..]) => NewItem {
                    status: ItemStatus::Duplicate,
                    reference,
                    currency,
                    report_amount: Some(row.amount.minor()),
                    ledger_amount: Some(first.amount.minor()),
                    entry_id: Some(first.entry_id.clone()),
                    line: Some(row.line),
                },
                _ => NewItem {
                    status: ItemStatus::MissingInLedger,
                    reference,
                    currency,
                    report_amount: Some(row.amount.minor()),
                    ledger_amount: None,
                    entry_id: None,
                    line: Some(row.line),
                },
            };
            items.push(item);
        }
        for (_, c) in charges.iter().enumerate().filter(|(i, c)| c.in_day && !claimed.contains(i)) {
            items.push(NewItem {
                status: ItemStatus::MissingInReport,
                reference: c.reference.clone(),
                currency: c.amount.currency(),
                report_amount: None,
                ledger_amount: Some(c.amount.minor()),
                entry_id: Some(c.entry_id.clone()),
                line: None,
            });
        }
        Ok(items)
    }

    /// Writes the run, its items and totals, and the resolutions it carries over from
    /// the run it supersedes (`prev`), and makes it the day's current run: one
    /// transaction that holds the day's row, so it takes turns with resolutions and
    /// other imports of the day (PostgreSQL: the row's lock; SQLite: the write lock).
    #[allow(clippy::too_many_arguments)]
    async fn insert_run(
        &self,
        actor: &str,
        processor: &str,
        report_date: &str,
        hash: &str,
        rows: &[ReportRow],
        items: Vec<NewItem>,
        prev: Option<&RunId>,
    ) -> Result<Inserted> {
        let count = |s: ItemStatus| items.iter().filter(|i| i.status == s).count() as i64;
        let run = Run {
            run_id: RunId::generate(),
            processor: processor.to_owned(),
            report_date: report_date.to_owned(),
            rows_count: rows.len() as i64,
            matched: count(ItemStatus::Matched),
            amount_mismatch: count(ItemStatus::AmountMismatch),
            missing_in_ledger: count(ItemStatus::MissingInLedger),
            missing_in_report: count(ItemStatus::MissingInReport),
            duplicates: count(ItemStatus::Duplicate),
            prev_run_id: prev.cloned(),
            chained: true,
        };
        let mut totals: BTreeMap<Currency, (i64, i64)> = BTreeMap::new();
        for r in rows {
            let t = totals.entry(r.amount.currency()).or_default();
            t.0 += r.fee.minor();
            t.1 += r.net.minor();
        }
        // The superseded run's resolved items, read under the day's lock below.
        let resolved_sql = format!("{} WHERE i.run_id = $1 AND r.item_id IS NOT NULL", items::ITEM_SELECT);
        let begin = self.db.begin_deciding_sql();
        let lock_day = match self.db {
            Db::Postgres(_) => {
                "SELECT current_run_id FROM recon_days WHERE processor = $1 AND report_date = $2 FOR UPDATE"
            }
            Db::Sqlite(_) => "SELECT current_run_id FROM recon_days WHERE processor = $1 AND report_date = $2",
        };
        let now = self.ledger.clock().now_us();
        let result = with_db!(&self.db, pool => async {
            let mut tx = pool.begin_with(begin).await?;
            let current: Option<RunId> =
                sqlx::query_scalar(lock_day).bind(processor).bind(report_date).fetch_optional(&mut *tx).await?;
            if current.as_ref() != prev {
                return Ok(Inserted::Raced);
            }
            let runs_of_day: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM recon_runs WHERE processor = $1 AND report_date = $2")
                .bind(processor)
                .bind(report_date)
                .fetch_one(&mut *tx)
                .await?;
            if runs_of_day >= RUNS_PER_DAY_MAX {
                return Err(sqlx::Error::Protocol(RUNS_PER_DAY_EXCEEDED.into()));
            }
            let earlier: Vec<ItemRow> = match prev {
                Some(p) => sqlx::query_as(&resolved_sql).bind(p).fetch_all(&mut *tx).await?,
                None => Vec::new(),
            };
            sqlx::query(
                "INSERT INTO recon_runs (run_id, processor, report_date, report_hash, rows_count, matched, amount_mismatch, \
                 missing_in_ledger, missing_in_report, duplicates, created_by, created_at_us, prev_run_id, chained) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, TRUE)",
            )
            .bind(&run.run_id)
            .bind(processor)
            .bind(report_date)
            .bind(hash)
            .bind(run.rows_count)
            .bind(run.matched)
            .bind(run.amount_mismatch)
            .bind(run.missing_in_ledger)
            .bind(run.missing_in_report)
            .bind(run.duplicates)
            .bind(actor)
            .bind(now)
            .bind(prev)
            .execute(&mut *tx)
            .await?;
            for (currency, (fees, net)) in &totals {
                sqlx::query("INSERT INTO recon_run_totals (run_id, currency, fees, net) VALUES ($1, $2, $3, $4)")
                    .bind(&run.run_id)
                    .bind(currency.code())
                    .bind(fees)
                    .bind(net)
                    .execute(&mut *tx)
                    .await?;
            }
            let mut carried = 0i64;
            let mut used: HashSet<&str> = HashSet::new();
            for (k, item) in items.iter().enumerate() {
                let item_id = format!("{}_{k:06}", run.run_id.as_str().replacen("run_", "item_", 1));
                sqlx::query(
                    "INSERT INTO recon_items (item_id, run_id, status, processor_reference, currency, report_amount, \
                     ledger_amount, entry_id, line, created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&item_id)
                .bind(&run.run_id)
                .bind(item.status.as_str())
                .bind(&item.reference)
                .bind(item.currency.code())
                .bind(item.report_amount)
                .bind(item.ledger_amount)
                .bind(&item.entry_id)
                .bind(item.line)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                // The same discrepancy, already resolved in the run this supersedes: the
                // resolution (and its adjustment, if any) stands.
                if item.status == ItemStatus::Matched {
                    continue;
                }
                if let Some(e) = earlier.iter().find(|e| !used.contains(e.item_id.as_str()) && item.same_as(e)) {
                    used.insert(e.item_id.as_str());
                    sqlx::query(
                        "INSERT INTO recon_resolutions (item_id, resolution, note, entry_id, resolved_by, resolved_at_us) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&item_id)
                    .bind(e.resolution.as_deref().unwrap_or(Resolution::Explained.as_str()))
                    .bind(format!("carried over from {}: {}", e.item_id, e.note.as_deref().unwrap_or_default()))
                    .bind(&e.adjustment_entry_id)
                    .bind(e.resolved_by.as_deref().unwrap_or(actor))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    carried += 1;
                }
            }
            sqlx::query(
                "INSERT INTO recon_days (processor, report_date, current_run_id, updated_at_us) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (processor, report_date) DO UPDATE SET current_run_id = excluded.current_run_id, \
                 updated_at_us = excluded.updated_at_us",
            )
            .bind(processor)
            .bind(report_date)
            .bind(&run.run_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Inserted::New(run.clone(), carried))
        }
        .await);
        match result {
            Ok(inserted) => Ok(inserted),
            Err(sqlx::Error::Protocol(m)) if m == RUNS_PER_DAY_EXCEEDED => Err(Error::ResourceExhausted {
                reason: Reason::ReconRunsPerDay,
                message: format!("at most {RUNS_PER_DAY_MAX} reports per processor and day"),
            }),
            // The same report, imported concurrently: that run.
            Err(e) if crate::store::is_unique_violation(&e) => Ok(Inserted::Duplicate),
            Err(e) => Err(e.into()),
        }
    }
}

const RUNS_PER_DAY_EXCEEDED: &str = "runs per day exceeded";
