//! Settlement reconciliation: a processor's daily report against the ledger's card
//! entries. Each report row is matched by processor reference; ledger card entries of
//! that day the report lacks are flagged; fees and the net settlement are posted once
//! per processor and day. Runs, items and resolutions are append-only.
//!
//! - `report`  strict parsing of the settlement CSV

use std::collections::{BTreeMap, HashMap, HashSet};

mod report;

pub use report::{parse_report, ReportRow, REPORT_BYTES_MAX};

use crate::dates;
use crate::error::{Error, Result};
use crate::ledger::{AccountCode, Direction, Ledger, PostEntryInput, PostingInput, SYSTEM_CLEARING};
use crate::money::{Currency, Money};
use crate::store::{now_us, Db};
use crate::with_db;

/// The caller on the ledger entries reconciliation books.
const RECON_ACTOR: &str = crate::ledger::callers::RECONCILIATION;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Run {
    pub run_id: String,
    pub processor: String,
    pub report_date: String,
    pub rows_count: i64,
    pub matched: i64,
    pub amount_mismatch: i64,
    pub missing_in_ledger: i64,
    pub missing_in_report: i64,
    pub duplicates: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Item {
    pub item_id: String,
    pub run_id: String,
    pub status: String,
    pub processor_reference: String,
    pub currency: String,
    pub report_amount: Option<i64>,
    pub ledger_amount: Option<i64>,
    pub entry_id: Option<String>,
    pub line: Option<i64>,
    pub resolution: Option<String>,
    pub note: Option<String>,
    pub resolved_by: Option<String>,
}

const RUN_COLUMNS: &str =
    "run_id, processor, report_date, rows_count, matched, amount_mismatch, missing_in_ledger, missing_in_report, duplicates";

/// A ledger card entry: id, processor reference, amount charged (clearing debit).
struct LedgerCharge {
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
    let rows: Vec<(String, String, i64, String, i64)> = with_db!(db, pool => sqlx::query_as(
        "SELECT e.id, e.metadata, p.amount, p.currency, e.created_at_us FROM ledger_entries e \
         JOIN ledger_postings p ON p.entry_id = e.id JOIN ledger_accounts a ON a.id = p.account_id \
         WHERE e.kind = 'dm_payment_card' AND e.created_at_us >= $1 AND e.created_at_us < $2 \
           AND p.direction = 'D' AND a.code LIKE 'processor:sandbox:clearing:%'",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await)?;
    let mut out = Vec::with_capacity(rows.len());
    for (entry_id, metadata, amount, currency, at) in rows {
        let meta: BTreeMap<String, String> = serde_json::from_str(&metadata).unwrap_or_default();
        let Some(currency) = Currency::from_code(&currency) else { continue };
        out.push(LedgerCharge {
            entry_id,
            reference: meta.get("processor_reference").cloned().unwrap_or_default(),
            amount: Money::from_minor(currency, amount),
            at_us: at,
            in_day: at >= day_start && at < day_start + 86_400_000_000,
        });
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
    status: &'static str,
    reference: String,
    currency: Currency,
    report_amount: Option<i64>,
    ledger_amount: Option<i64>,
    entry_id: Option<String>,
    line: Option<i64>,
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

    /// `ImportSettlementReport`. The same report imported again is the same run.
    pub async fn import(&self, actor: &str, processor: &str, report_date: &str, csv: &str) -> Result<Run> {
        if processor != "sandbox" {
            return Err(Error::invalid("processor", "only the sandbox processor is configured"));
        }
        let (y, m, d) = dates::parse_date(report_date).ok_or_else(|| Error::invalid("report_date", "YYYY-MM-DD"))?;
        let rows = parse_report(csv, self.ledger.accounts().currencies())?;
        let hash = crate::ledger::sha256_hex(csv.as_bytes());
        if let Some(run) = self.run_by_hash(processor, report_date, &hash).await? {
            self.post_settlement(&run, &rows).await?;
            return Ok(run);
        }
        let day_start = dates::day_start_us(y, m, d);
        let charges = ledger_charges(&self.db, day_start).await?;
        let mut by_ref: HashMap<&str, Vec<&LedgerCharge>> = HashMap::new();
        for c in &charges {
            by_ref.entry(c.reference.as_str()).or_default().push(c);
        }
        let mut items = Vec::new();
        // Ledger charges a report row has claimed, by index into `charges`.
        let mut claimed: HashSet<usize> = HashSet::new();
        let index_of = |c: &LedgerCharge| charges.iter().position(|x| std::ptr::eq(x, c));
        for row in &rows {
            let currency = row.amount.currency();
            let found: Vec<&LedgerCharge> = if row.reference.is_empty() {
                // No reference: the nearest unclaimed charge of the same amount and
                // currency within the tolerance.
                charges
                    .iter()
                    .enumerate()
                    .filter(|(i, c)| {
                        !claimed.contains(i)
                            && c.amount == row.amount
                            && (c.at_us - row.at_us).abs() <= self.time_tolerance_us
                    })
                    .min_by_key(|(_, c)| (c.at_us - row.at_us).abs())
                    .map(|(_, c)| vec![c])
                    .unwrap_or_default()
            } else {
                by_ref.get(row.reference.as_str()).cloned().unwrap_or_default()
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
                ("capture", [one]) => NewItem {
                    status: if one.amount == row.amount { "matched" } else { "amount_mismatch" },
                    reference,
                    currency,
                    report_amount: Some(row.amount.minor()),
                    ledger_amount: Some(one.amount.minor()),
                    entry_id: Some(one.entry_id.clone()),
                    line: Some(row.line),
                },
                ("capture", [first, ..]) => NewItem {
                    status: "duplicate",
                    reference,
                    currency,
                    report_amount: Some(row.amount.minor()),
                    ledger_amount: Some(first.amount.minor()),
                    entry_id: Some(first.entry_id.clone()),
                    line: Some(row.line),
                },
                _ => NewItem {
                    status: "missing_in_ledger",
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
                status: "missing_in_report",
                reference: c.reference.clone(),
                currency: c.amount.currency(),
                report_amount: None,
                ledger_amount: Some(c.amount.minor()),
                entry_id: Some(c.entry_id.clone()),
                line: None,
            });
        }
        let count = |s: &str| items.iter().filter(|i| i.status == s).count() as i64;
        let run = Run {
            run_id: format!("run_{}", uuid::Uuid::now_v7().simple()),
            processor: processor.to_owned(),
            report_date: report_date.to_owned(),
            rows_count: rows.len() as i64,
            matched: count("matched"),
            amount_mismatch: count("amount_mismatch"),
            missing_in_ledger: count("missing_in_ledger"),
            missing_in_report: count("missing_in_report"),
            duplicates: count("duplicate"),
        };
        let now = now_us();
        let written = with_db!(&self.db, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO recon_runs (run_id, processor, report_date, report_hash, rows_count, matched, amount_mismatch, \
                 missing_in_ledger, missing_in_report, duplicates, created_by, created_at_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&run.run_id)
            .bind(processor)
            .bind(report_date)
            .bind(&hash)
            .bind(run.rows_count)
            .bind(run.matched)
            .bind(run.amount_mismatch)
            .bind(run.missing_in_ledger)
            .bind(run.missing_in_report)
            .bind(run.duplicates)
            .bind(actor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for (k, item) in items.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO recon_items (item_id, run_id, status, processor_reference, currency, report_amount, \
                     ledger_amount, entry_id, line, created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(format!("{}_{k:06}", run.run_id.replacen("run_", "item_", 1)))
                .bind(&run.run_id)
                .bind(item.status)
                .bind(&item.reference)
                .bind(item.currency.code())
                .bind(item.report_amount)
                .bind(item.ledger_amount)
                .bind(&item.entry_id)
                .bind(item.line)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        }
        .await);
        if let Err(e) = written {
            if crate::store::is_unique_violation(&e) {
                // The same report imported concurrently: that run.
                return self.run_by_hash(processor, report_date, &hash).await?.ok_or_else(|| Error::internal(e));
            }
            return Err(e.into());
        }
        self.post_settlement(&run, &rows).await?;
        Ok(run)
    }

    /// Posts the day's fees (expense against clearing) and net settlement (clearing to
    /// the bank), once per processor, day and currency: the keys name the day, so a
    /// second, corrected report of the same day reconciles its items without booking
    /// the money twice. The postings are the reconciliation's own (`RECON_ACTOR`).
    async fn post_settlement(&self, run: &Run, rows: &[ReportRow]) -> Result<()> {
        let mut fees: BTreeMap<Currency, i64> = BTreeMap::new();
        let mut net: BTreeMap<Currency, i64> = BTreeMap::new();
        for r in rows {
            *fees.entry(r.fee.currency()).or_default() += r.fee.minor();
            *net.entry(r.net.currency()).or_default() += r.net.minor();
        }
        let post = |key: String, kind: &str, debit: AccountCode, credit: AccountCode, amount: Money| PostEntryInput {
            idempotency_key: key,
            kind: kind.into(),
            description: format!("{} settlement of {}", run.processor, run.report_date),
            postings: vec![
                PostingInput { account_code: debit, direction: Direction::Debit, amount },
                PostingInput { account_code: credit, direction: Direction::Credit, amount },
            ],
            metadata: [
                ("run_id".to_string(), run.run_id.clone()),
                ("report_date".to_string(), run.report_date.clone()),
            ]
            .into(),
            pending: false,
            pending_timeout_s: 0,
        };
        for (c, minor) in fees {
            if minor > 0 {
                let input = post(
                    format!("recon:{}:{}:fees:{c}", run.processor, run.report_date),
                    "processor_fees",
                    AccountCode::system("platform:processor_fees", c),
                    AccountCode::system(SYSTEM_CLEARING, c),
                    Money::from_minor(c, minor),
                );
                self.book(input).await?;
            }
        }
        for (c, minor) in net {
            if minor == 0 {
                continue;
            }
            let (debit, credit) = if minor > 0 {
                (AccountCode::system("platform:settlement_bank", c), AccountCode::system(SYSTEM_CLEARING, c))
            } else {
                (AccountCode::system(SYSTEM_CLEARING, c), AccountCode::system("platform:settlement_bank", c))
            };
            let input = post(
                format!("recon:{}:{}:settle:{c}", run.processor, run.report_date),
                "processor_settlement",
                debit,
                credit,
                Money::from_minor(c, minor.abs()),
            );
            self.book(input).await?;
        }
        Ok(())
    }

    /// Posts a settlement entry once per day; a later report of the same day with other
    /// totals leaves the first booking in place (its differences are the run's items).
    async fn book(&self, input: PostEntryInput) -> Result<()> {
        match self.ledger.post_entry(RECON_ACTOR, input).await {
            Ok(_) => Ok(()),
            Err(Error::AlreadyExists(_)) => {
                tracing::warn!("the day's settlement was booked by an earlier report; differences stay as items");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub async fn items(
        &self,
        run_id: &str,
        status: Option<&str>,
        page_size: u32,
        after: &str,
    ) -> Result<(Vec<Item>, Option<String>)> {
        let size = match page_size {
            0 => 100,
            n if n > 1000 => return Err(Error::invalid("page_size", "at most 1000")),
            n => n,
        };
        if let Some(s) = status {
            if !["matched", "amount_mismatch", "missing_in_ledger", "missing_in_report", "duplicate", "open"]
                .contains(&s)
            {
                return Err(Error::invalid(
                    "status",
                    "matched, amount_mismatch, missing_in_ledger, missing_in_report, duplicate or open",
                ));
            }
        }
        let rows: Vec<Item> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT i.item_id, i.run_id, i.status, i.processor_reference, i.currency, i.report_amount, i.ledger_amount, \
                    i.entry_id, i.line, r.resolution, r.note, r.resolved_by \
             FROM recon_items i LEFT JOIN recon_resolutions r ON r.item_id = i.item_id \
             WHERE i.run_id = $1 AND i.item_id > $2 \
               AND ($3 = '' OR i.status = $3 OR ($3 = 'open' AND i.status <> 'matched' AND r.item_id IS NULL)) \
             ORDER BY i.item_id LIMIT $4",
        )
        .bind(run_id)
        .bind(after)
        .bind(status.unwrap_or(""))
        .bind(i64::from(size) + 1)
        .fetch_all(pool)
        .await)?;
        let mut rows = rows;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|i| i.item_id.clone())
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Resolves an unmatched item: by an adjusting entry to suspense, or as explained.
    /// Records who and why; an item is resolved once.
    pub async fn resolve(&self, actor: &str, item_id: &str, resolution: &str, note: &str) -> Result<Item> {
        crate::accounts::parse_text("note", note, 500, true)?;
        if !matches!(resolution, "suspense" | "explained") {
            return Err(Error::invalid("resolution", "suspense or explained"));
        }
        let item = self.item(item_id).await?;
        if item.status == "matched" {
            return Err(Error::FailedPrecondition {
                reason: "ITEM_MATCHED",
                message: "a matched item needs no resolution".into(),
            });
        }
        if item.resolution.is_some() {
            return Err(Error::FailedPrecondition {
                reason: "ITEM_RESOLVED",
                message: format!("item {item_id} is already resolved"),
            });
        }
        let currency =
            Currency::from_code(&item.currency).ok_or_else(|| Error::internal(anyhow::anyhow!("bad currency")))?;
        let mut entry_id = None;
        if resolution == "suspense" {
            // What the clearing account is off by: positive when the processor settled
            // more than the ledger booked.
            let diff = match item.status.as_str() {
                "missing_in_ledger" => item.report_amount.unwrap_or(0),
                "missing_in_report" => -item.ledger_amount.unwrap_or(0),
                _ => item.report_amount.unwrap_or(0) - item.ledger_amount.unwrap_or(0),
            };
            if diff != 0 {
                let clearing = AccountCode::system(SYSTEM_CLEARING, currency);
                let suspense = AccountCode::system("platform:suspense", currency);
                let (debit, credit) = if diff > 0 { (clearing, suspense) } else { (suspense, clearing) };
                let amount = Money::from_minor(currency, diff.abs());
                let entry = self
                    .ledger
                    .post_entry(
                        actor,
                        PostEntryInput {
                            idempotency_key: format!("recon-resolve:{item_id}"),
                            kind: "reconciliation_adjustment".into(),
                            description: note.to_owned(),
                            postings: vec![
                                PostingInput { account_code: debit, direction: Direction::Debit, amount },
                                PostingInput { account_code: credit, direction: Direction::Credit, amount },
                            ],
                            metadata: [("item_id".to_string(), item_id.to_string())].into(),
                            pending: false,
                            pending_timeout_s: 0,
                        },
                    )
                    .await?;
                entry_id = Some(entry.id);
            }
        }
        let inserted = with_db!(&self.db, pool => sqlx::query(
            "INSERT INTO recon_resolutions (item_id, resolution, note, entry_id, resolved_by, resolved_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(item_id)
        .bind(resolution)
        .bind(note)
        .bind(&entry_id)
        .bind(actor)
        .bind(now_us())
        .execute(pool)
        .await
        .map(|_| ()));
        match inserted {
            Ok(()) => {}
            Err(e) if crate::store::is_unique_violation(&e) => {
                return Err(Error::FailedPrecondition {
                    reason: "ITEM_RESOLVED",
                    message: format!("item {item_id} is already resolved"),
                })
            }
            Err(e) => return Err(e.into()),
        }
        self.item(item_id).await
    }

    async fn item(&self, item_id: &str) -> Result<Item> {
        let item: Option<Item> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT i.item_id, i.run_id, i.status, i.processor_reference, i.currency, i.report_amount, i.ledger_amount, \
                    i.entry_id, i.line, r.resolution, r.note, r.resolved_by \
             FROM recon_items i LEFT JOIN recon_resolutions r ON r.item_id = i.item_id WHERE i.item_id = $1",
        )
        .bind(item_id)
        .fetch_optional(pool)
        .await)?;
        item.ok_or_else(|| Error::NotFound(format!("reconciliation item {item_id} not found")))
    }
}
