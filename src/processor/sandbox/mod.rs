//! The sandbox card processor: behaves like a real one, in-process, persisted in dmpay's
//! database (its own `sandbox_processor_calls` table) so its records and settlement
//! reports survive restarts.
//!
//! Test cards with fixed outcomes (any other valid card approves):
//!
//! | card | outcome |
//! |---|---|
//! | 4242424242424242, 5555555555554444, 2223003122003222, 378282246310005 | approve |
//! | 4000000000000002 | generic decline |
//! | 4000000000009995 | insufficient funds |
//! | 4000000000009987 | lost card |
//! | 4000000000009979 | stolen card |
//! | 4000000000000069 | expired card |
//! | 4000000000000127 | incorrect CVC |
//! | 4000000000000119 | processing error |
//! | 4000000000000341 | verifies, then every charge declines |
//! | 4100000000000019 | blocked as fraud |
//!
//! Payouts (push to card) have test cards of their own (`payouts`); every card above
//! that declines a charge declines a payout too.
//!
//! Faults for tests: a fixed latency, a timeout rate (the call may or may not have been
//! processed, the caller hears nothing) and an error rate (a processing error, nothing
//! happens).

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;

mod disputes;
mod payouts;

pub use disputes::{dispute_fee, DISPUTED_CARD};

use super::{
    CallKind, CallRecord, CardDetails, CardProcessor, DeclineCode, Notification, PayoutSpeed, PayoutSupport,
    ProcessorError,
};
use crate::kernel::clock::Clock;
use crate::kernel::dates;
use crate::kernel::money::{Currency, Money};
use crate::store::{is_unique_violation, Db};
use crate::with_db;

/// Fault injection settings (`DMPAY_SANDBOX_*`).
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub latency: Duration,
    /// 0.0 to 1.0.
    pub timeout_rate: f64,
    /// 0.0 to 1.0.
    pub error_rate: f64,
}

/// Processing fee on captures: 2.9% (half up) plus 30 minor units at two decimals.
const FEE_BASIS_POINTS: i64 = 290;

pub fn capture_fee(amount: Money) -> i64 {
    let exp = amount.currency().exponent();
    let fixed = if exp >= 2 { 30 * 10_i64.pow(exp - 2) } else { 30 };
    let pct = (i128::from(amount.minor()) * i128::from(FEE_BASIS_POINTS) + 5_000) / 10_000;
    (pct as i64).saturating_add(fixed).min(amount.minor())
}

pub struct Sandbox {
    db: Db,
    config: SandboxConfig,
    clock: Clock,
}

#[derive(sqlx::FromRow)]
struct CallRow {
    idempotency_key: String,
    kind: String,
    reference: String,
    amount: Option<i64>,
    currency: Option<String>,
    status: String,
    decline_code: Option<String>,
}

fn outcome_of(row: &CallRow) -> Result<(), ProcessorError> {
    match row.status.as_str() {
        "succeeded" => Ok(()),
        "declined" => Err(ProcessorError::Declined(
            row.decline_code.as_deref().and_then(DeclineCode::from_reason).unwrap_or(DeclineCode::CardDeclined),
        )),
        _ => Err(ProcessorError::Failed("processing error".into())),
    }
}

fn money_of(row: &CallRow) -> Option<Money> {
    Some(Money::from_minor(Currency::from_code(row.currency.as_deref()?)?, row.amount?))
}

/// What a card does at verification and at a charge.
fn card_outcome(pan: &str, charging: bool) -> Result<(), Result<DeclineCode, ()>> {
    match pan {
        "4000000000000002" => Err(Ok(DeclineCode::CardDeclined)),
        "4000000000009995" => Err(Ok(DeclineCode::InsufficientFunds)),
        "4000000000009987" => Err(Ok(DeclineCode::LostCard)),
        "4000000000009979" => Err(Ok(DeclineCode::StolenCard)),
        "4000000000000069" => Err(Ok(DeclineCode::CardExpired)),
        "4000000000000127" => Err(Ok(DeclineCode::IncorrectCvc)),
        "4000000000000119" => Err(Err(())),
        "4000000000000341" if charging => Err(Ok(DeclineCode::CardDeclined)),
        "4100000000000019" => Err(Ok(DeclineCode::Fraud)),
        _ => Ok(()),
    }
}

struct NewCall<'a> {
    key: &'a str,
    kind: CallKind,
    related: Option<&'a str>,
    amount: Option<Money>,
    fee: i64,
    outcome: Result<(), ProcessorError>,
    last4: Option<&'a str>,
}

impl Sandbox {
    pub fn new(db: Db, config: SandboxConfig, clock: Clock) -> Self {
        Sandbox { db, config, clock }
    }

    async fn find(&self, key: &str) -> Result<Option<CallRow>, ProcessorError> {
        with_db!(&self.db, pool => sqlx::query_as::<_, CallRow>(
            "SELECT idempotency_key, kind, reference, amount, currency, status, decline_code \
             FROM sandbox_processor_calls WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(pool)
        .await)
        .map_err(|_| ProcessorError::Failed("sandbox storage unavailable".into()))
    }

    async fn find_reference(&self, reference: &str) -> Result<Option<CallRow>, ProcessorError> {
        with_db!(&self.db, pool => sqlx::query_as::<_, CallRow>(
            "SELECT idempotency_key, kind, reference, amount, currency, status, decline_code \
             FROM sandbox_processor_calls WHERE reference = $1",
        )
        .bind(reference)
        .fetch_optional(pool)
        .await)
        .map_err(|_| ProcessorError::Failed("sandbox storage unavailable".into()))
    }

    /// Records a call; a concurrent call with the same key wins and is returned instead.
    async fn record(&self, call: NewCall<'_>) -> Result<CallRow, ProcessorError> {
        let reference = format!("sbx_{}", uuid::Uuid::new_v4().simple());
        let (status, code) = match &call.outcome {
            Ok(()) => ("succeeded", None),
            Err(ProcessorError::Declined(c)) => ("declined", Some(c.reason().as_str())),
            Err(_) => ("failed", None),
        };
        let inserted = with_db!(&self.db, pool => sqlx::query(
            "INSERT INTO sandbox_processor_calls (idempotency_key, kind, reference, related_reference, amount, currency, \
             fee, status, decline_code, card_last4, created_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(call.key)
        .bind(call.kind.as_str())
        .bind(&reference)
        .bind(call.related)
        .bind(call.amount.map(|m| m.minor()))
        .bind(call.amount.map(|m| m.currency().code()))
        .bind(call.fee)
        .bind(status)
        .bind(code)
        .bind(call.last4)
        .bind(self.clock.now_us())
        .execute(pool)
        .await
        .map(|_| ()));
        if let Err(e) = &inserted {
            if !is_unique_violation(e) {
                return Err(ProcessorError::Failed("sandbox storage unavailable".into()));
            }
        }
        self.find(call.key).await?.ok_or_else(|| ProcessorError::Failed("sandbox lost a record".into()))
    }

    /// Latency, then maybe an injected fault. `Err(true)` means "time out after
    /// processing", `Err(false)` "time out before", and a processing error is returned
    /// as such.
    async fn faults(&self) -> Result<(), Result<bool, ProcessorError>> {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let roll: f64 = rand::thread_rng().gen();
        if roll < self.config.timeout_rate {
            return Err(Ok(rand::thread_rng().gen_bool(0.5)));
        }
        if roll < self.config.timeout_rate + self.config.error_rate {
            return Err(Err(ProcessorError::Failed("injected processing error".into())));
        }
        Ok(())
    }

    /// Runs one call: replays a recorded key, applies faults, records the outcome.
    async fn call(&self, call: NewCall<'_>) -> Result<String, ProcessorError> {
        if let Some(row) = self.find(call.key).await? {
            return outcome_of(&row).map(|()| row.reference);
        }
        match self.faults().await {
            Ok(()) => {}
            Err(Ok(processed)) => {
                if processed {
                    self.record(call).await?;
                }
                return Err(ProcessorError::Unknown);
            }
            Err(Err(e)) => return Err(e),
        }
        let row = self.record(call).await?;
        outcome_of(&row).map(|()| row.reference)
    }

    fn card_result(card: &CardDetails<'_>, charging: bool) -> Result<(), ProcessorError> {
        match card_outcome(card.pan.expose(), charging) {
            Ok(()) => Ok(()),
            Err(Ok(code)) => Err(ProcessorError::Declined(code)),
            Err(Err(())) => Err(ProcessorError::Failed("processing error".into())),
        }
    }
}

#[async_trait]
impl CardProcessor for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn verify(&self, key: &str, card: CardDetails<'_>) -> Result<String, ProcessorError> {
        let outcome = Self::card_result(&card, false);
        let last4 = card.pan.last4().to_owned();
        self.call(NewCall {
            key,
            kind: CallKind::Verify,
            related: None,
            amount: None,
            fee: 0,
            outcome,
            last4: Some(&last4),
        })
        .await
    }

    async fn authorize(&self, key: &str, card: CardDetails<'_>, amount: Money) -> Result<String, ProcessorError> {
        let outcome = Self::card_result(&card, true);
        let last4 = card.pan.last4().to_owned();
        self.call(NewCall {
            key,
            kind: CallKind::Authorize,
            related: None,
            amount: Some(amount),
            fee: 0,
            outcome,
            last4: Some(&last4),
        })
        .await
    }

    async fn capture(&self, key: &str, authorization: &str, amount: Money) -> Result<String, ProcessorError> {
        let auth = self.find_reference(authorization).await?;
        let outcome = match &auth {
            Some(a) if a.kind == "authorize" && a.status == "succeeded" => match money_of(a) {
                Some(m) if m.currency() == amount.currency() && amount.minor() <= m.minor() => Ok(()),
                _ => Err(ProcessorError::Failed("capture exceeds the authorization".into())),
            },
            _ => Err(ProcessorError::Failed("no such authorization".into())),
        };
        let fee = if outcome.is_ok() { capture_fee(amount) } else { 0 };
        let captured = self
            .call(NewCall {
                key,
                kind: CallKind::Capture,
                related: Some(authorization),
                amount: Some(amount),
                fee,
                outcome,
                last4: None,
            })
            .await;
        // The dispute test card's captures are disputed at once; also when the caller
        // heard nothing, since what the processor recorded decides. A failure here must
        // not change the answer about a card already charged.
        let disputed = async {
            if self.disputes_captures_of(authorization).await? {
                if let Some(row) = self.find(key).await? {
                    if row.status == "succeeded" {
                        self.open_dispute(&row.reference).await?;
                    }
                }
            }
            Ok::<_, ProcessorError>(())
        };
        if let Err(e) = disputed.await {
            tracing::error!(error = %e, "the sandbox could not open a dispute on its test card's capture");
        }
        captured
    }

    async fn void(&self, key: &str, authorization: &str) -> Result<String, ProcessorError> {
        let auth = self.find_reference(authorization).await?;
        let outcome = match auth {
            Some(a) if a.kind == "authorize" => Ok(()),
            _ => Err(ProcessorError::Failed("no such authorization".into())),
        };
        self.call(NewCall {
            key,
            kind: CallKind::Void,
            related: Some(authorization),
            amount: None,
            fee: 0,
            outcome,
            last4: None,
        })
        .await
    }

    async fn refund(&self, key: &str, capture: &str, amount: Money) -> Result<String, ProcessorError> {
        let cap = self.find_reference(capture).await?;
        let outcome = match &cap {
            Some(c) if c.kind == "capture" && c.status == "succeeded" => match money_of(c) {
                Some(m) if m.currency() == amount.currency() && amount.minor() <= m.minor() => Ok(()),
                _ => Err(ProcessorError::Failed("refund exceeds the capture".into())),
            },
            _ => Err(ProcessorError::Failed("no such capture".into())),
        };
        self.call(NewCall {
            key,
            kind: CallKind::Refund,
            related: Some(capture),
            amount: Some(amount),
            fee: 0,
            outcome,
            last4: None,
        })
        .await
    }

    fn payout_support(&self, card: CardDetails<'_>) -> PayoutSupport {
        payouts::support(card.pan.expose())
    }

    async fn payout(
        &self,
        key: &str,
        card: CardDetails<'_>,
        amount: Money,
        speed: PayoutSpeed,
    ) -> Result<String, ProcessorError> {
        self.push_to_card(key, card, amount, speed).await
    }

    async fn notifications(&self, after: i64, limit: i64) -> Result<Vec<Notification>, ProcessorError> {
        self.read_notifications(after, limit).await
    }

    async fn lookup(&self, key: &str) -> Result<Option<CallRecord>, ProcessorError> {
        Ok(self.find(key).await?.map(|row| CallRecord {
            idempotency_key: row.idempotency_key.clone(),
            kind: row.kind.clone(),
            reference: row.reference.clone(),
            amount: money_of(&row),
            outcome: outcome_of(&row),
        }))
    }

    async fn settlement_report(&self, date: &str) -> Result<String, ProcessorError> {
        let (y, m, d) =
            dates::parse_date(date).ok_or_else(|| ProcessorError::Failed("date must be YYYY-MM-DD".into()))?;
        let from = dates::day_start_us(y, m, d);
        let to = from + 86_400 * 1_000_000;
        let rows: Vec<(String, String, i64, String, i64, i64)> = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT reference, kind, amount, currency, fee, created_at_us FROM sandbox_processor_calls \
             WHERE kind IN ('capture', 'refund', 'payout', 'payout_return', 'dispute', 'dispute_reversal') \
             AND status = 'succeeded' AND created_at_us >= $1 AND created_at_us < $2 \
             ORDER BY created_at_us, reference",
        )
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await)
        .map_err(|_| ProcessorError::Failed("sandbox storage unavailable".into()))?;
        let mut csv = String::from("processor_reference,type,amount,fee,net,currency,created_at\n");
        for (reference, kind, amount, currency, fee, at) in rows {
            let Some(c) = Currency::from_code(&currency) else { continue };
            // Signed as money into the platform's balance at the processor: captures,
            // returned payouts and won disputes come in; refunds, payouts and disputes
            // go out (a dispute with its fee).
            let (signed, fee) = match kind.as_str() {
                "refund" | "payout" => (-amount, 0),
                "payout_return" | "dispute_reversal" => (amount, 0),
                "dispute" => (-amount, fee),
                _ => (amount, fee),
            };
            let net = signed - fee;
            csv.push_str(&format!(
                "{reference},{kind},{},{},{},{currency},{}\n",
                Money::from_minor(c, signed).amount_string(),
                Money::from_minor(c, fee).amount_string(),
                Money::from_minor(c, net).amount_string(),
                dates::rfc3339(at)
            ));
        }
        Ok(csv)
    }
}

/// Alters a settlement report for reconciliation practice: leaves out data row
/// `drop_row`, adds one major unit to the amount (and net) of `change_row`, and appends
/// a row unknown to the ledger. Rows are 1-based, after the header.
pub fn inject_discrepancies(
    csv: &str,
    drop_row: Option<usize>,
    change_row: Option<usize>,
    extra_row: bool,
    date: &str,
) -> anyhow::Result<String> {
    let mut lines: Vec<String> = csv.lines().map(str::to_owned).collect();
    let rows = lines.len().saturating_sub(1);
    for (flag, n) in [("--change-row", change_row), ("--drop-row", drop_row)] {
        if let Some(n) = n {
            anyhow::ensure!((1..=rows).contains(&n), "{flag} {n}: the report has {rows} data rows");
        }
    }
    if let Some(n) = change_row {
        let mut cols: Vec<String> = lines[n].split(',').map(str::to_owned).collect();
        let currency = Currency::from_code(&cols[5]).ok_or_else(|| anyhow::anyhow!("unknown currency {}", cols[5]))?;
        let one = 10_i64.pow(currency.exponent());
        let bump = |s: &str| -> anyhow::Result<String> {
            let minor =
                crate::kernel::money::parse_minor("amount", s, currency, true).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Money::from_minor(currency, minor + one).amount_string())
        };
        cols[2] = bump(&cols[2])?;
        cols[4] = bump(&cols[4])?;
        lines[n] = cols.join(",");
    }
    if let Some(n) = drop_row {
        lines.remove(n);
    }
    if extra_row {
        lines.push(format!(
            "sbx_extra_{},capture,9.99,0.59,9.40,USD,{date}T12:00:00.000000Z",
            uuid::Uuid::new_v4().simple()
        ));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discrepancies_are_injected_where_asked() {
        let csv = "processor_reference,type,amount,fee,net,currency,created_at\n\
                   sbx_a,capture,10.00,0.59,9.41,USD,2026-11-24T01:00:00.000000Z\n\
                   sbx_b,capture,5.00,0.45,4.55,USD,2026-11-24T02:00:00.000000Z\n";
        let out = inject_discrepancies(csv, Some(2), Some(1), true, "2026-11-24").unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "sbx_a,capture,11.00,0.59,10.41,USD,2026-11-24T01:00:00.000000Z");
        assert!(lines[2].starts_with("sbx_extra_"));
        assert!(inject_discrepancies(csv, Some(3), None, false, "2026-11-24").is_err());
    }

    #[test]
    fn fees_round_half_up_and_never_exceed_the_amount() {
        let usd = Currency::from_code("USD").unwrap();
        assert_eq!(capture_fee(Money::from_minor(usd, 10_000)), 290 + 30);
        assert_eq!(capture_fee(Money::from_minor(usd, 1_000)), 29 + 30);
        assert_eq!(capture_fee(Money::from_minor(usd, 20)), 20);
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(capture_fee(Money::from_minor(jpy, 1_000)), 29 + 30);
    }
}
