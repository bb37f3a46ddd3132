//! The sandbox's disputes (chargebacks): a cardholder disputes a capture, the
//! processor takes the amount and a fee back from the platform, and later the dispute is
//! decided. dmpay hears of each step through the notification feed.
//!
//! Every capture of the test card 4000000000000259 (the sandbox knows the card by its
//! last four digits, 0259) is disputed as it is captured, as Stripe's dispute test cards
//! are; `dmpay processor dispute` opens one on any capture and decides it.

use super::{NewCall, Sandbox};
use crate::kernel::money::{Currency, Money};
use crate::processor::{CallKind, ProcessorError};

/// The test card whose captures are disputed.
pub const DISPUTED_CARD: &str = "4000000000000259";
const DISPUTED_LAST4: &str = "0259";

/// The processor's dispute fee: 15.00 at two decimals (15 major units at fewer).
pub fn dispute_fee(currency: Currency) -> i64 {
    let exp = currency.exponent();
    if exp >= 2 {
        1_500 * 10_i64.pow(exp - 2)
    } else {
        15 * 10_i64.pow(exp)
    }
}

fn failed(message: &str) -> ProcessorError {
    ProcessorError::Failed(message.to_owned())
}

impl Sandbox {
    /// Whether the authorization `authorization` was made with the dispute test card.
    pub(super) async fn disputes_captures_of(&self, authorization: &str) -> Result<bool, ProcessorError> {
        let last4: Option<Option<String>> = crate::with_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT card_last4 FROM sandbox_processor_calls WHERE reference = $1",
        )
        .bind(authorization)
        .fetch_optional(pool)
        .await)
        .map_err(|_| failed("sandbox storage unavailable"))?;
        Ok(last4.flatten().as_deref() == Some(DISPUTED_LAST4))
    }

    /// Opens a dispute on a succeeded capture (once per capture: a second call answers
    /// the same dispute). Returns the dispute's reference.
    pub async fn open_dispute(&self, capture_ref: &str) -> Result<String, ProcessorError> {
        let capture = self.find_reference(capture_ref).await?.ok_or_else(|| failed("no such capture"))?;
        if capture.kind != "capture" || capture.status != "succeeded" {
            return Err(failed("only a succeeded capture can be disputed"));
        }
        let amount = super::money_of(&capture).ok_or_else(|| failed("the capture has no amount"))?;
        let fee = dispute_fee(amount.currency());
        let key = format!("dispute:{capture_ref}");
        let row = self
            .record(NewCall {
                key: &key,
                kind: CallKind::Dispute,
                related: Some(capture_ref),
                amount: Some(amount),
                fee,
                outcome: Ok(()),
                last4: None,
            })
            .await?;
        self.notify("dispute.opened", &capture.idempotency_key, capture_ref, &row.reference, amount, fee).await?;
        Ok(row.reference)
    }

    /// Decides an open dispute: won gives the amount back (a `dispute_reversal` in the
    /// settlement report; the fee stays with the processor), lost changes nothing more.
    /// A dispute is decided once; deciding it again the same way is a no-op, the other
    /// way an error.
    pub async fn decide_dispute(&self, dispute_ref: &str, won: bool) -> Result<(), ProcessorError> {
        let dispute = self.find_reference(dispute_ref).await?.ok_or_else(|| failed("no such dispute"))?;
        if dispute.kind != "dispute" {
            return Err(failed("not a dispute reference"));
        }
        let amount = super::money_of(&dispute).ok_or_else(|| failed("the dispute has no amount"))?;
        let (won_key, lost_key) = (format!("dispute_won:{dispute_ref}"), format!("dispute_lost:{dispute_ref}"));
        let decided_other_way = self.find(if won { &lost_key } else { &won_key }).await?.is_some();
        if decided_other_way {
            return Err(failed("the dispute was already decided the other way"));
        }
        if won {
            let row = self
                .record(NewCall {
                    key: &won_key,
                    kind: CallKind::DisputeReversal,
                    related: Some(dispute_ref),
                    amount: Some(amount),
                    fee: 0,
                    outcome: Ok(()),
                    last4: None,
                })
                .await?;
            self.notify("dispute.won", &dispute.idempotency_key, dispute_ref, &row.reference, amount, 0).await
        } else {
            // A lost dispute moves no money: a zero-amount record marks it decided.
            let row = self
                .record(NewCall {
                    key: &lost_key,
                    kind: CallKind::DisputeReversal,
                    related: Some(dispute_ref),
                    amount: Some(Money::zero(amount.currency())),
                    fee: 0,
                    outcome: Err(ProcessorError::Declined(crate::processor::DeclineCode::CardDeclined)),
                    last4: None,
                })
                .await?;
            self.notify(
                "dispute.lost",
                &dispute.idempotency_key,
                dispute_ref,
                &row.reference,
                Money::zero(amount.currency()),
                0,
            )
            .await
        }
    }
}
