//! What a run books. A run moves the day's books from the totals of the run it
//! superseded to its own: an entry for the difference in fees (processor fees against
//! clearing) and one for the difference in net settlement (the bank against clearing),
//! per currency; and it reverses the adjustments of the superseded run's resolutions
//! that it did not carry over (their discrepancy is gone from the new report).
//!
//! Every entry's idempotency key names the run, and the amounts come from stored totals
//! and resolutions, so booking a run again books nothing new. Before a run books, the
//! runs before it in the chain are completed the same way: were an earlier import cut
//! off before its bookings, the differences still add up to the current report's
//! totals.

use std::collections::{BTreeMap, HashSet};

use super::{Imported, Reconciler, Run, RECON_ACTOR, RUNS_PER_DAY_MAX};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::RunId;
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, Direction, PostEntryInput, PostingInput, SYSTEM_CLEARING};
use crate::with_db;

crate::stored_enum! {
    /// What a run booked; the text is the ledger entry's kind.
    pub enum BookingKind {
        /// The difference in the processor's fees from the superseded report.
        ProcessorFees = "processor_fees",
        /// The difference in the net settlement from the superseded report.
        ProcessorSettlement = "processor_settlement",
        /// The reversal of an adjustment the new report no longer needs.
        AdjustmentReversal = "adjustment_reversal",
    }
}

/// One entry a run booked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    pub entry_id: String,
    pub kind: BookingKind,
    /// What moved, from the first posting's point of view (always positive).
    pub amount: Money,
    pub description: String,
}

impl Reconciler {
    /// Books `run` (after the runs before it) and describes the import.
    pub(super) async fn complete(&self, run: Run, new: bool, carried: i64) -> Result<Imported> {
        let bookings = self.book(&run, 0).await?;
        let current = self.current_run_id(&run.processor, &run.report_date).await?.as_ref() == Some(&run.run_id);
        Ok(Imported { run, current, new, bookings, carried })
    }

    async fn totals(&self, run_id: &RunId) -> Result<BTreeMap<String, (i64, i64)>> {
        let rows: Vec<(String, i64, i64)> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT currency, fees, net FROM recon_run_totals WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_all(pool)
        .await)?;
        Ok(rows.into_iter().map(|(c, f, n)| (c, (f, n))).collect())
    }

    /// Books `run`'s differences, completing its predecessors first; `depth` bounds the
    /// chain.
    fn book<'a>(
        &'a self,
        run: &'a Run,
        depth: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Booking>>> + Send + 'a>> {
        Box::pin(async move {
            // A run made before the chain booked its whole day once, at import.
            if !run.chained {
                return Ok(Vec::new());
            }
            if depth > RUNS_PER_DAY_MAX {
                return Err(Error::internal(anyhow::anyhow!("reconciliation chain of {} loops", run.run_id)));
            }
            let prev = match &run.prev_run_id {
                Some(id) => {
                    let prev = self.run(id).await?;
                    self.book(&prev, depth + 1).await?;
                    Some(prev)
                }
                None => None,
            };
            let mine = self.totals(&run.run_id).await?;
            let base = match &prev {
                Some(p) => self.totals(&p.run_id).await?,
                None => BTreeMap::new(),
            };
            let mut bookings = Vec::new();
            let currencies: std::collections::BTreeSet<&String> = mine.keys().chain(base.keys()).collect();
            for code in currencies {
                let Some(currency) = Currency::from_code(code) else { continue };
                let (fees, net) = mine.get(code).copied().unwrap_or((0, 0));
                let (fees_before, net_before) = base.get(code).copied().unwrap_or((0, 0));
                let clearing = AccountCode::system(SYSTEM_CLEARING, currency);
                let fee_account = AccountCode::system("platform:processor_fees", currency);
                let bank = AccountCode::system("platform:settlement_bank", currency);
                let fees_delta = fees.checked_sub(fees_before).ok_or_else(|| overflow(run))?;
                if fees_delta != 0 {
                    let (debit, credit) =
                        if fees_delta > 0 { (fee_account, clearing.clone()) } else { (clearing.clone(), fee_account) };
                    let key = format!("recon:{}:{}:{}:fees:{code}", run.processor, run.report_date, run.run_id);
                    bookings.push(
                        self.post(run, key, BookingKind::ProcessorFees, debit, credit, currency, fees_delta).await?,
                    );
                }
                let net_delta = net.checked_sub(net_before).ok_or_else(|| overflow(run))?;
                if net_delta != 0 {
                    let (debit, credit) = if net_delta > 0 { (bank, clearing) } else { (clearing, bank) };
                    let key = format!("recon:{}:{}:{}:settle:{code}", run.processor, run.report_date, run.run_id);
                    bookings.push(
                        self.post(run, key, BookingKind::ProcessorSettlement, debit, credit, currency, net_delta)
                            .await?,
                    );
                }
            }
            if let Some(prev) = &prev {
                bookings.extend(self.unwind(run, prev).await?);
            }
            Ok(bookings)
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn post(
        &self,
        run: &Run,
        key: String,
        kind: BookingKind,
        debit: AccountCode,
        credit: AccountCode,
        currency: Currency,
        delta: i64,
    ) -> Result<Booking> {
        let amount = Money::from_minor(currency, delta.checked_abs().ok_or_else(|| overflow(run))?);
        let description = match &run.prev_run_id {
            Some(prev) => {
                format!("{} settlement of {}: report {} in place of {prev}", run.processor, run.report_date, run.run_id)
            }
            None => format!("{} settlement of {}", run.processor, run.report_date),
        };
        let input = PostEntryInput {
            idempotency_key: key,
            kind: kind.as_str().into(),
            description: description.clone(),
            postings: vec![
                PostingInput { account_code: debit, direction: Direction::Debit, amount },
                PostingInput { account_code: credit, direction: Direction::Credit, amount },
            ],
            metadata: [
                ("run_id".to_string(), run.run_id.to_string()),
                ("report_date".to_string(), run.report_date.clone()),
            ]
            .into(),
            pending: false,
            pending_timeout_s: 0,
        };
        let entry = self.ledger.post_entry(RECON_ACTOR, input).await?;
        Ok(Booking { entry_id: entry.id, kind, amount, description })
    }

    /// Reverses the adjustments of `prev`'s resolutions that `run` did not carry over.
    async fn unwind(&self, run: &Run, prev: &Run) -> Result<Vec<Booking>> {
        let adjustments = |run_id: RunId| async move {
            let ids: Vec<Option<String>> = with_db!(&self.db, pool => sqlx::query_scalar(
                "SELECT r.entry_id FROM recon_resolutions r JOIN recon_items i ON i.item_id = r.item_id \
                 WHERE i.run_id = $1 AND r.entry_id IS NOT NULL",
            )
            .bind(run_id)
            .fetch_all(pool)
            .await)?;
            Ok::<HashSet<String>, Error>(ids.into_iter().flatten().collect())
        };
        let kept = adjustments(run.run_id.clone()).await?;
        let mut gone: Vec<String> = adjustments(prev.run_id.clone()).await?.difference(&kept).cloned().collect();
        gone.sort();
        let mut out = Vec::with_capacity(gone.len());
        for entry_id in gone {
            let key = format!("recon:{}:unwind:{entry_id}", run.run_id);
            let reason = format!("report {} of {} no longer has this discrepancy", run.run_id, run.report_date);
            match self.ledger.reverse(RECON_ACTOR, &entry_id, &key, &reason, crate::ledger::WalletDebits::Allowed).await
            {
                Ok(e) => {
                    let amount = e.postings.first().map(|p| p.amount).ok_or_else(|| overflow(run))?;
                    out.push(Booking {
                        entry_id: e.id,
                        kind: BookingKind::AdjustmentReversal,
                        amount,
                        description: reason,
                    });
                }
                // Reversed already, by the run that first left it behind.
                Err(Error::FailedPrecondition { reason: Reason::AlreadyReversed, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn overflow(run: &Run) -> Error {
    Error::internal(anyhow::anyhow!("reconciliation totals of {} overflow", run.run_id))
}
