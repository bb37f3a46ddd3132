//! Payouts as stored and returned, their limits and the instant fee (the flow is in
//! `payouts`).

use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PayoutId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;
pub use crate::processor::PayoutSpeed;

crate::stored_enum! {
    /// Where a payout stands.
    pub enum PayoutStatus {
        /// The wallet money is held while the processor pushes it to the card.
        Pending = "pending",
        /// Sent to the card; the hold is posted.
        Paid = "paid",
        /// Not sent; the hold was released and nothing moved.
        Failed = "failed",
        /// Sent, then sent back by the card network; the money is back in the wallet.
        Returned = "returned",
    }
}

/// The speed as stored.
pub fn speed_as_str(speed: PayoutSpeed) -> &'static str {
    match speed {
        PayoutSpeed::Standard => "standard",
        PayoutSpeed::Instant => "instant",
    }
}

pub fn speed_from_db(s: &str) -> Result<PayoutSpeed> {
    match s {
        "standard" => Ok(PayoutSpeed::Standard),
        "instant" => Ok(PayoutSpeed::Instant),
        other => Err(Error::internal(anyhow::anyhow!("unknown payout speed {other:?}"))),
    }
}

/// A payout as stored and returned. `amount` leaves the wallet; the card receives
/// `amount - fee`; the fee is the platform's revenue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payout {
    pub payout_id: PayoutId,
    pub user_id: UserId,
    pub amount: Money,
    pub fee: Money,
    pub speed: PayoutSpeed,
    pub payment_method_token: String,
    pub card_last4: String,
    pub status: PayoutStatus,
    pub failure_reason: String,
    pub failure_message: String,
    pub processor_ref: Option<String>,
    pub return_ref: Option<String>,
    pub hold_entry_id: Option<String>,
    pub created_at_us: i64,
    pub paid_at_us: Option<i64>,
    pub returned_at_us: Option<i64>,
}

impl Payout {
    pub fn currency(&self) -> Currency {
        self.amount.currency()
    }

    /// What the card receives.
    pub fn net(&self) -> Money {
        Money::from_minor(self.currency(), self.amount.minor() - self.fee.minor())
    }

    /// The error a FAILED payout answers with, so a retry returns the same error.
    pub fn failure(&self) -> Option<Error> {
        (self.status == PayoutStatus::Failed).then(|| Error::FailedPrecondition {
            reason: Reason::from_db(&self.failure_reason).unwrap_or(Reason::PaymentFailed),
            message: self.failure_message.clone(),
        })
    }
}

pub use crate::payments::model::{PayoutLimits, PayoutsConfig};

/// The per-payout limit, checked before anything is written (the rolling 24-hour
/// limit is checked atomically with the payout's row).
pub fn check_payout_max(limits: PayoutLimits, amount: Money) -> Result<()> {
    let max = crate::kernel::money::major_to_minor(limits.payout_max, amount.currency());
    if amount.minor() > max {
        return Err(Error::ResourceExhausted {
            reason: Reason::PayoutLimit,
            message: format!("at most {} per payout for your account", Money::from_minor(amount.currency(), max)),
        });
    }
    Ok(())
}

/// The refusal of a payout over the rolling 24-hour limit, with what was already paid
/// out in the window.
pub fn daily_payout_error(currency: Currency, daily_max: i64, paid_out: i64) -> Error {
    Error::ResourceExhausted {
        reason: Reason::PayoutDailyLimit,
        message: format!(
            "at most {} paid out in 24 hours for your account; {} already",
            Money::from_minor(currency, daily_max),
            Money::from_minor(currency, paid_out)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instant_fee_rounds_half_up_within_its_bounds() {
        let c = PayoutsConfig::default();
        assert_eq!(c.fee(PayoutSpeed::Standard, 100_000), 0);
        // 1.75% of 100.00 is 1.75.
        assert_eq!(c.fee(PayoutSpeed::Instant, 10_000), 175);
        // 1.75% of 30.00 is 0.525: half up to 0.53; of 29.99, 0.524825: down to 0.52.
        assert_eq!(c.fee(PayoutSpeed::Instant, 3_000), 53);
        assert_eq!(c.fee(PayoutSpeed::Instant, 2_999), 52);
        // The minimum: 1.75% of 5.00 is 0.0875.
        assert_eq!(c.fee(PayoutSpeed::Instant, 500), 25);
        // The maximum: 1.75% of 5,000.00 is 87.50.
        assert_eq!(c.fee(PayoutSpeed::Instant, 500_000), 2_500);
        assert_eq!(c.fee(PayoutSpeed::Instant, i64::MAX), 2_500);
    }

    #[test]
    fn statuses_round_trip() {
        for s in [PayoutStatus::Pending, PayoutStatus::Paid, PayoutStatus::Failed, PayoutStatus::Returned] {
            assert_eq!(PayoutStatus::from_db(s.as_str()).unwrap(), s);
        }
        assert!(PayoutStatus::from_db("lost").is_err());
    }
}
