//! A run's items: listing them, and resolving one that did not match, by an adjusting
//! entry to suspense or as explained. Only an item of the day's current run can be
//! resolved: a superseded run's discrepancies are the new run's to settle.

use super::{Item, ItemFilter, ItemRow, ItemStatus, Reconciler, Resolution, RECON_ACTOR};
use crate::kernel::error::{Error, Result};
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;
use crate::kernel::text::parse_text;
use crate::ledger::{AccountCode, Direction, PostEntryInput, PostingInput, SYSTEM_CLEARING};
use crate::store::Db;
use crate::with_db;

/// Items with their resolution and whether their run is still the day's current one.
pub(super) const ITEM_SELECT: &str = "SELECT i.item_id, i.run_id, i.status, i.processor_reference, i.currency, \
     i.report_amount, i.ledger_amount, i.entry_id, i.line, r.resolution, r.note, r.resolved_by, \
     r.entry_id AS adjustment_entry_id, \
     (d.current_run_id IS NULL OR d.current_run_id <> i.run_id) AS superseded \
     FROM recon_items i JOIN recon_runs u ON u.run_id = i.run_id \
     LEFT JOIN recon_resolutions r ON r.item_id = i.item_id \
     LEFT JOIN recon_days d ON d.processor = u.processor AND d.report_date = u.report_date";

/// Why a resolution could not be recorded.
enum Refused {
    Superseded(Option<crate::kernel::ids::RunId>),
    Resolved,
}

impl Reconciler {
    pub async fn items(
        &self,
        run_id: &crate::kernel::ids::RunId,
        filter: ItemFilter,
        page_size: u32,
        after: &str,
    ) -> Result<(Vec<Item>, Option<String>)> {
        let size = match page_size {
            0 => 100,
            n if n > 1000 => return Err(Error::invalid("page_size", "at most 1000")),
            n => n,
        };
        // `open`: unmatched, unresolved, and of the day's current run.
        let sql = format!(
            "{ITEM_SELECT} WHERE i.run_id = $1 AND i.item_id > $2 \
             AND ($3 = '' OR i.status = $3 OR ($3 = 'open' AND i.status <> 'matched' AND r.item_id IS NULL \
                  AND d.current_run_id = i.run_id)) \
             ORDER BY i.item_id LIMIT $4"
        );
        let status = match filter {
            ItemFilter::All => "",
            ItemFilter::Status(s) => s.as_str(),
            ItemFilter::Open => "open",
        };
        let rows: Vec<ItemRow> = with_db!(&self.db, pool => sqlx::query_as(&sql)
            .bind(run_id)
            .bind(after)
            .bind(status)
            .bind(i64::from(size) + 1)
            .fetch_all(pool)
            .await)?;
        let mut rows = rows.into_iter().map(Item::try_from).collect::<Result<Vec<Item>>>()?;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|i| i.item_id.clone())
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Resolves an unmatched item of the day's current run: by an adjusting entry to
    /// suspense (the reconciliation's own), or as explained. Records who and why; an
    /// item is resolved once.
    pub async fn resolve(&self, actor: &str, item_id: &str, resolution: Resolution, note: &str) -> Result<Item> {
        parse_text("note", note, 500, true)?;
        let item = self.item(item_id).await?;
        if item.status == ItemStatus::Matched {
            return Err(Error::FailedPrecondition {
                reason: Reason::ItemMatched,
                message: "a matched item needs no resolution".into(),
            });
        }
        if item.resolution.is_some() {
            return Err(resolved(item_id));
        }
        let run = self.run(&item.run_id).await?;
        if item.superseded {
            return Err(superseded(item_id, self.current_run_id(&run.processor, &run.report_date).await?));
        }
        let currency =
            Currency::from_code(&item.currency).ok_or_else(|| Error::internal(anyhow::anyhow!("bad currency")))?;
        let mut entry_id = None;
        if resolution == Resolution::Suspense {
            // What the clearing account is off by: positive when the processor settled
            // more than the ledger booked.
            let diff = match item.status {
                ItemStatus::MissingInLedger => item.report_amount.unwrap_or(0),
                ItemStatus::MissingInReport => -item.ledger_amount.unwrap_or(0),
                _ => item.report_amount.unwrap_or(0) - item.ledger_amount.unwrap_or(0),
            };
            if diff != 0 {
                entry_id = Some(self.adjust(item_id, currency, diff).await?);
            }
        }
        // Recorded under the day's row, where imports take turns: an import that
        // superseded the run since the check above wins, and this item's adjustment is
        // taken back.
        let begin = self.db.begin_deciding_sql();
        let lock_day = match self.db {
            Db::Postgres(_) => {
                "SELECT current_run_id FROM recon_days WHERE processor = $1 AND report_date = $2 FOR UPDATE"
            }
            Db::Sqlite(_) => "SELECT current_run_id FROM recon_days WHERE processor = $1 AND report_date = $2",
        };
        let recorded: std::result::Result<(), Refused> = with_db!(&self.db, pool => async {
            let mut tx = pool.begin_with(begin).await?;
            let current: Option<crate::kernel::ids::RunId> =
                sqlx::query_scalar(lock_day).bind(&run.processor).bind(&run.report_date).fetch_optional(&mut *tx).await?;
            if current.as_ref() != Some(&item.run_id) {
                return Ok(Err(Refused::Superseded(current)));
            }
            let inserted = sqlx::query(
                "INSERT INTO recon_resolutions (item_id, resolution, note, entry_id, resolved_by, resolved_at_us) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (item_id) DO NOTHING",
            )
            .bind(item_id)
            .bind(resolution.as_str())
            .bind(note)
            .bind(&entry_id)
            .bind(actor)
            .bind(self.ledger.clock().now_us())
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                return Ok(Err(Refused::Resolved));
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(()))
        }
        .await)?;
        match recorded {
            Ok(()) => self.item(item_id).await,
            Err(refused) => {
                // Take back the adjustment this attempt made, unless the resolution
                // that won is this very one (a concurrent retry of the call).
                let winner = self.item(item_id).await?;
                if let Some(entry) = entry_id.filter(|e| winner.adjustment_entry_id.as_deref() != Some(e.as_str())) {
                    let key = format!("recon-resolve:{item_id}:undo");
                    match self
                        .ledger
                        .reverse(
                            RECON_ACTOR,
                            &entry,
                            &key,
                            "the item could not be resolved",
                            crate::ledger::WalletDebits::Allowed,
                        )
                        .await
                    {
                        Ok(_) | Err(Error::FailedPrecondition { reason: Reason::AlreadyReversed, .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(match refused {
                    Refused::Superseded(current) => superseded(item_id, current),
                    Refused::Resolved => resolved(item_id),
                })
            }
        }
    }

    /// The adjusting entry of a suspense resolution: clearing against suspense by
    /// `diff` (positive: the processor settled more than the ledger booked).
    async fn adjust(&self, item_id: &str, currency: Currency, diff: i64) -> Result<String> {
        let clearing = AccountCode::system(SYSTEM_CLEARING, currency);
        let suspense = AccountCode::system("platform:suspense", currency);
        let (debit, credit) = if diff > 0 { (clearing, suspense) } else { (suspense, clearing) };
        let amount = Money::from_minor(
            currency,
            diff.checked_abs().ok_or_else(|| Error::internal(anyhow::anyhow!("adjustment overflow")))?,
        );
        let entry = self
            .ledger
            .post_entry(
                RECON_ACTOR,
                PostEntryInput {
                    idempotency_key: format!("recon-resolve:{item_id}"),
                    kind: "reconciliation_adjustment".into(),
                    // Not the note: the entry must be the same whatever a retry says, so
                    // that a retry after a crash before the resolution was recorded finds
                    // the adjustment already made and records it (the note goes there).
                    description: format!("reconciliation adjustment of item {item_id}"),
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
        Ok(entry.id)
    }

    pub(super) async fn item(&self, item_id: &str) -> Result<Item> {
        let sql = format!("{ITEM_SELECT} WHERE i.item_id = $1");
        let item: Option<ItemRow> =
            with_db!(&self.db, pool => sqlx::query_as(&sql).bind(item_id).fetch_optional(pool).await)?;
        item.ok_or_else(|| Error::NotFound(format!("reconciliation item {item_id} not found")))?.try_into()
    }
}

fn resolved(item_id: &str) -> Error {
    Error::FailedPrecondition { reason: Reason::ItemResolved, message: format!("item {item_id} is already resolved") }
}

fn superseded(item_id: &str, current: Option<crate::kernel::ids::RunId>) -> Error {
    Error::FailedPrecondition {
        reason: Reason::ItemSuperseded,
        message: format!(
            "item {item_id} belongs to a report a later one of the same day superseded; resolve the items of run {}",
            current.map(|r| r.into_string()).unwrap_or_default()
        ),
    }
}
