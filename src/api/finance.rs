//! `dmpay.v1.Finance`.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ledger::account_type_to_wire;
use super::money::to_wire;
use super::pb;
use super::status::ApiResult;
use super::{principal, timestamp, timestamp_us, to_status};
use crate::auth::scope;
use crate::finance;
use crate::finance::export::{self, Cursor, Format};
use crate::finance::recon::{BookingKind, Imported, Item, ItemFilter, ItemStatus, Reconciler, Resolution};
use crate::kernel::error::Error;
use crate::kernel::ids::RunId;
use crate::store::Db;

pub struct FinanceApi {
    db: Db,
    /// Disputes and receivables are the payments module's.
    payments: std::sync::Arc<crate::payments::Payments>,
    currencies: crate::kernel::money::Currencies,
    recon: Reconciler,
    clock: crate::kernel::clock::Clock,
}

impl FinanceApi {
    pub fn new(
        db: Db,
        ledger: crate::ledger::Ledger,
        payments: std::sync::Arc<crate::payments::Payments>,
        recon_time_tolerance: std::time::Duration,
    ) -> Self {
        FinanceApi {
            payments,
            currencies: ledger.accounts().currencies().clone(),
            clock: ledger.clock().clone(),
            recon: Reconciler::new(db.clone(), ledger, recon_time_tolerance),
            db,
        }
    }
}

fn dispute_to_wire(d: crate::payments::disputes::Dispute) -> crate::kernel::error::Result<pb::Dispute> {
    use crate::payments::model::DisputeStatus;
    Ok(pb::Dispute {
        amount: Some(to_wire(d.money(d.amount)?)),
        fee: Some(to_wire(d.money(d.fee)?)),
        from_wallet: Some(to_wire(d.money(d.from_wallet)?)),
        to_receivable: Some(to_wire(d.money(d.to_receivable)?)),
        fee_charged: Some(to_wire(d.money(d.fee_charged)?)),
        platform_share: Some(to_wire(d.money(d.platform_share)?)),
        status: match d.status()? {
            DisputeStatus::Undisputed => pb::DisputeStatus::Unspecified,
            DisputeStatus::Open => pb::DisputeStatus::Open,
            DisputeStatus::Won => pb::DisputeStatus::Won,
            DisputeStatus::Lost => pb::DisputeStatus::Lost,
        } as i32,
        opened_at: Some(timestamp(d.opened_at_us)),
        decided_at: d.decided_at_us.map(timestamp),
        dispute_id: d.dispute_id.into_string(),
        payment_id: d.payment_id.into_string(),
        processor_reference: d.processor_ref,
        capture_reference: d.capture_ref,
        recovered_from: d.recovered_from,
    })
}

fn run_to_wire(i: Imported) -> pb::ReconciliationRun {
    let r = i.run;
    pb::ReconciliationRun {
        run_id: r.run_id.into_string(),
        processor: r.processor,
        report_date: r.report_date,
        rows: r.rows_count,
        matched: r.matched,
        amount_mismatch: r.amount_mismatch,
        missing_in_ledger: r.missing_in_ledger,
        missing_in_report: r.missing_in_report,
        duplicates: r.duplicates,
        superseded_run_id: r.prev_run_id.map(RunId::into_string).unwrap_or_default(),
        current: i.current,
        created: i.new,
        bookings: i
            .bookings
            .into_iter()
            .map(|b| pb::ReconciliationBooking {
                entry_id: b.entry_id,
                kind: booking_kind_to_wire(b.kind) as i32,
                amount: Some(to_wire(b.amount)),
                description: b.description,
            })
            .collect(),
        carried_resolutions: i.carried,
    }
}

fn booking_kind_to_wire(k: BookingKind) -> pb::ReconciliationBookingKind {
    match k {
        BookingKind::ProcessorFees => pb::ReconciliationBookingKind::ProcessorFees,
        BookingKind::ProcessorSettlement => pb::ReconciliationBookingKind::ProcessorSettlement,
        BookingKind::AdjustmentReversal => pb::ReconciliationBookingKind::AdjustmentReversal,
    }
}

fn item_status_to_wire(s: ItemStatus) -> pb::ReconciliationItemStatus {
    use pb::ReconciliationItemStatus as W;
    match s {
        ItemStatus::Matched => W::Matched,
        ItemStatus::AmountMismatch => W::AmountMismatch,
        ItemStatus::MissingInLedger => W::MissingInLedger,
        ItemStatus::MissingInReport => W::MissingInReport,
        ItemStatus::Duplicate => W::Duplicate,
    }
}

fn item_filter_from_wire(r: &pb::ListReconciliationItemsRequest) -> Result<ItemFilter, Error> {
    use pb::ReconciliationItemStatus as W;
    let status = match W::try_from(r.status) {
        Ok(W::Unspecified) => None,
        Ok(W::Matched) => Some(ItemStatus::Matched),
        Ok(W::AmountMismatch) => Some(ItemStatus::AmountMismatch),
        Ok(W::MissingInLedger) => Some(ItemStatus::MissingInLedger),
        Ok(W::MissingInReport) => Some(ItemStatus::MissingInReport),
        Ok(W::Duplicate) => Some(ItemStatus::Duplicate),
        Err(_) => return Err(Error::invalid("status", format!("unknown reconciliation item status {}", r.status))),
    };
    match (status, r.open) {
        (Some(_), true) => Err(Error::invalid("open", "cannot be combined with status")),
        (Some(s), false) => Ok(ItemFilter::Status(s)),
        (None, true) => Ok(ItemFilter::Open),
        (None, false) => Ok(ItemFilter::All),
    }
}

fn resolution_to_wire(r: Resolution) -> pb::ReconciliationResolution {
    match r {
        Resolution::Suspense => pb::ReconciliationResolution::Suspense,
        Resolution::Explained => pb::ReconciliationResolution::Explained,
    }
}

fn resolution_from_wire(raw: i32) -> Result<Resolution, Error> {
    match pb::ReconciliationResolution::try_from(raw) {
        Ok(pb::ReconciliationResolution::Suspense) => Ok(Resolution::Suspense),
        Ok(pb::ReconciliationResolution::Explained) => Ok(Resolution::Explained),
        Ok(pb::ReconciliationResolution::Unspecified) => {
            Err(Error::invalid("resolution", "required: RECONCILIATION_RESOLUTION_SUSPENSE or _EXPLAINED"))
        }
        Err(_) => Err(Error::invalid("resolution", format!("unknown resolution {raw}"))),
    }
}

fn item_to_wire(i: Item) -> pb::ReconciliationItem {
    let money = |minor: Option<i64>| {
        minor.and_then(|m| {
            crate::kernel::money::Currency::from_code(&i.currency)
                .map(|c| to_wire(crate::kernel::money::Money::from_minor(c, m)))
        })
    };
    pb::ReconciliationItem {
        report_amount: money(i.report_amount),
        ledger_amount: money(i.ledger_amount),
        item_id: i.item_id,
        run_id: i.run_id.into_string(),
        status: item_status_to_wire(i.status) as i32,
        processor_reference: i.processor_reference,
        entry_id: i.entry_id.unwrap_or_default(),
        line: i.line.unwrap_or(0),
        resolution: i.resolution.map_or(0, |r| resolution_to_wire(r) as i32),
        note: i.note.unwrap_or_default(),
        resolved_by: i.resolved_by.unwrap_or_default(),
        superseded: i.superseded,
        adjustment_entry_id: i.adjustment_entry_id.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl pb::finance_server::Finance for FinanceApi {
    async fn get_trial_balance(&self, req: Request<pb::GetTrialBalanceRequest>) -> ApiResult<pb::TrialBalance> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let as_of = r.as_of.as_ref().map(|t| timestamp_us("as_of", t)).transpose()?;
            let currency =
                if r.currency.is_empty() { None } else { Some(self.currencies.parse("currency", &r.currency)?) };
            let tb = finance::trial_balance(&self.db, as_of, self.clock.now_us(), currency).await?;
            Ok(pb::TrialBalance {
                balanced: tb.balanced(),
                as_of: Some(timestamp(tb.as_of_us)),
                totals: tb
                    .totals
                    .iter()
                    .map(|(c, (d, cr))| pb::TrialBalanceTotal {
                        currency: c.code().to_owned(),
                        debits: Some(to_wire(*d)),
                        credits: Some(to_wire(*cr)),
                    })
                    .collect(),
                rows: tb
                    .rows
                    .into_iter()
                    .map(|row| pb::TrialBalanceRow {
                        account_code: row.account_code,
                        account_type: account_type_to_wire(row.account_type) as i32,
                        currency: row.balance.currency().code().to_owned(),
                        debits: Some(to_wire(row.debits)),
                        credits: Some(to_wire(row.credits)),
                        balance: Some(to_wire(row.balance)),
                    })
                    .collect(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn verify_ledger(&self, req: Request<pb::VerifyLedgerRequest>) -> ApiResult<pb::VerifyLedgerResponse> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let report = crate::ledger::verify::verify(&self.db).await.map_err(to_status)?;
        Ok(Response::new(pb::VerifyLedgerResponse {
            ok: report.ok(),
            accounts_checked: report.accounts_checked,
            entries_checked: report.entries_checked,
            problems: report
                .problems
                .into_iter()
                .map(|p| pb::LedgerProblem {
                    kind: p.kind.to_owned(),
                    account_code: p.account_code.unwrap_or_default(),
                    entry_id: p.entry_id.unwrap_or_default(),
                    detail: p.detail,
                })
                .collect(),
        }))
    }

    type ExportEntriesStream = ReceiverStream<Result<pb::ExportChunk, Status>>;

    async fn export_entries(&self, req: Request<pb::ExportEntriesRequest>) -> ApiResult<Self::ExportEntriesStream> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let r = req.get_ref();
        let format = match pb::ExportFormat::try_from(r.format) {
            Ok(pb::ExportFormat::Csv) => Format::Csv,
            Ok(pb::ExportFormat::Jsonl) => Format::Jsonl,
            _ => return Err(to_status(Error::invalid("format", "EXPORT_FORMAT_CSV or EXPORT_FORMAT_JSONL"))),
        };
        let from =
            r.from_time.as_ref().map(|t| timestamp_us("from_time", t)).transpose().map_err(to_status)?.unwrap_or(0);
        let to =
            r.to_time.as_ref().map(|t| timestamp_us("to_time", t)).transpose().map_err(to_status)?.unwrap_or(i64::MAX);
        if from > to {
            return Err(to_status(Error::invalid("to_time", "must not be before from_time")));
        }
        // A small channel: the reader waits for the client, so memory stays at a few
        // pages whatever the range.
        let (tx, rx) = mpsc::channel(2);
        let db = self.db.clone();
        tokio::spawn(async move {
            if format == Format::Csv
                && tx.send(Ok(pb::ExportChunk { data: export::CSV_HEADER.as_bytes().to_vec(), rows: 0 })).await.is_err()
            {
                return;
            }
            let mut cursor = Cursor::default();
            loop {
                match export::page(&db, from, to, cursor, export::PAGE_ENTRIES, format).await {
                    Ok((data, rows, next)) => {
                        if rows > 0 {
                            for (data, lines) in export::chunks(data) {
                                if tx.send(Ok(pb::ExportChunk { data, rows: lines as i64 })).await.is_err() {
                                    return;
                                }
                            }
                        }
                        match next {
                            Some(c) => cursor = c,
                            None => return,
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn import_settlement_report(
        &self,
        req: Request<pb::ImportSettlementReportRequest>,
    ) -> ApiResult<pb::ReconciliationRun> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let r = req.get_ref();
        self.recon
            .import(&caller.sub, &r.processor, &r.report_date, &r.csv)
            .await
            .map(|run| Response::new(run_to_wire(run)))
            .map_err(to_status)
    }

    async fn list_reconciliation_items(
        &self,
        req: Request<pb::ListReconciliationItemsRequest>,
    ) -> ApiResult<pb::ListReconciliationItemsResponse> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let r = req.get_ref();
        let filter = item_filter_from_wire(r).map_err(to_status)?;
        let run_id = &RunId::parse("run_id", &r.run_id).map_err(to_status)?;
        self.recon
            .items(run_id, filter, r.page_size, &r.page_token)
            .await
            .map(|(items, next)| {
                Response::new(pb::ListReconciliationItemsResponse {
                    items: items.into_iter().map(item_to_wire).collect(),
                    next_page_token: next.unwrap_or_default(),
                })
            })
            .map_err(to_status)
    }

    async fn resolve_reconciliation_item(
        &self,
        req: Request<pb::ResolveReconciliationItemRequest>,
    ) -> ApiResult<pb::ReconciliationItem> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let r = req.get_ref();
        let item_id = super::id("item_id", &r.item_id).map_err(to_status)?;
        let resolution = resolution_from_wire(r.resolution).map_err(to_status)?;
        self.recon
            .resolve(&caller.sub, item_id, resolution, &r.note)
            .await
            .map(|i| Response::new(item_to_wire(i)))
            .map_err(to_status)
    }

    async fn get_statement(&self, req: Request<pb::GetStatementRequest>) -> ApiResult<pb::Statement> {
        let caller = principal(&req)?;
        caller.require(scope::FINANCE).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let user = crate::kernel::ids::UserId::parse("user_id", &r.user_id)?;
            let currency = self.currencies.parse("currency", &r.currency)?;
            let from = r.from_time.as_ref().map(|t| timestamp_us("from_time", t)).transpose()?.unwrap_or(0);
            let to = r.to_time.as_ref().map(|t| timestamp_us("to_time", t)).transpose()?.unwrap_or(i64::MAX);
            if from > to {
                return Err(Error::invalid("to_time", "must not be before from_time"));
            }
            let st = finance::statement::statement(&self.db, &user, currency, from, to).await?;
            Ok(pb::Statement {
                user_id: user.to_string(),
                currency: currency.code().to_owned(),
                opening_balance: Some(to_wire(st.opening)),
                closing_balance: Some(to_wire(st.closing)),
                movements: st
                    .movements
                    .into_iter()
                    .map(|m| pb::StatementLine {
                        entry_id: m.entry_id,
                        sequence: m.sequence,
                        time: Some(timestamp(m.at_us)),
                        kind: m.kind,
                        amount: Some(to_wire(m.amount)),
                        counterparty: m.counterparty,
                        note: m.note,
                    })
                    .collect(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_disputes(&self, req: Request<pb::ListDisputesRequest>) -> ApiResult<pb::ListDisputesResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            caller.require(scope::FINANCE)?;
            let (rows, next) = self.payments.list_disputes(r.open_only, r.page_size, &r.page_token).await?;
            let mut disputes = Vec::with_capacity(rows.len());
            for d in rows {
                disputes.push(dispute_to_wire(d)?);
            }
            let mut at_risk = Vec::new();
            for (currency, count, amount) in self.payments.disputes_at_risk().await? {
                let Some(c) = crate::kernel::money::Currency::from_code(&currency) else { continue };
                at_risk.push(pb::DisputeExposure {
                    currency,
                    open_disputes: count,
                    amount_at_risk: Some(to_wire(crate::kernel::money::Money::from_minor(c, amount))),
                });
            }
            Ok(pb::ListDisputesResponse { disputes, next_page_token: next.unwrap_or_default(), at_risk })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_receivables(
        &self,
        req: Request<pb::ListReceivablesRequest>,
    ) -> ApiResult<pb::ListReceivablesResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            caller.require(scope::FINANCE)?;
            let (rows, next) = self.payments.debts(r.page_size, &r.page_token).await?;
            let receivables = rows
                .into_iter()
                .filter_map(|(user, currency, owed)| {
                    let c = crate::kernel::money::Currency::from_code(&currency)?;
                    Some(pb::Receivable {
                        user_id: user.into_string(),
                        owed: Some(to_wire(crate::kernel::money::Money::from_minor(c, owed))),
                    })
                })
                .collect();
            Ok(pb::ListReceivablesResponse { receivables, next_page_token: next.unwrap_or_default() })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }
}
