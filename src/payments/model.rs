//! Payment types and the validation of what a sender asks for.

use crate::accounts::Tier;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, RequestId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;

pub const NOTE_LEN_MAX: usize = 280;
pub const OPAQUE_ID_LEN_MAX: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FundingSource {
    Auto,
    Balance,
    Card,
}

impl FundingSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FundingSource::Auto => "auto",
            FundingSource::Balance => "balance",
            FundingSource::Card => "card",
        }
    }

    pub fn from_db(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => FundingSource::Auto,
            "balance" => FundingSource::Balance,
            "card" => FundingSource::Card,
            other => return Err(Error::internal(anyhow::anyhow!("unknown funding source {other:?}"))),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Pending,
    Settled,
    Failed,
    PartiallyRefunded,
    Refunded,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Settled => "settled",
            PaymentStatus::Failed => "failed",
            PaymentStatus::PartiallyRefunded => "partially_refunded",
            PaymentStatus::Refunded => "refunded",
        }
    }

    pub fn from_db(s: &str) -> Result<Self> {
        Ok(match s {
            "pending" => PaymentStatus::Pending,
            "settled" => PaymentStatus::Settled,
            "failed" => PaymentStatus::Failed,
            "partially_refunded" => PaymentStatus::PartiallyRefunded,
            "refunded" => PaymentStatus::Refunded,
            other => return Err(Error::internal(anyhow::anyhow!("unknown payment status {other:?}"))),
        })
    }
}

crate::stored_enum! {
    /// Whether a card-funded payment's charge was disputed by the cardholder, and how
    /// the dispute stands.
    pub enum DisputeStatus {
        Undisputed = "",
        /// The processor took the money back; the dispute is being decided.
        Open = "open",
        /// Decided for the platform: the money came back.
        Won = "won",
        /// Decided for the cardholder.
        Lost = "lost",
    }
}

/// A payment as stored and returned. Every amount is in the payment's one currency:
/// `amount` = `wallet_amount` + `card_amount`, and the sender paid `fee_amount` on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub payment_id: PaymentId,
    pub sender_id: UserId,
    pub recipient_id: UserId,
    pub amount: Money,
    pub wallet_amount: Money,
    pub card_amount: Money,
    pub fee_amount: Money,
    pub refunded_amount: Money,
    pub status: PaymentStatus,
    pub funding_source: FundingSource,
    pub payment_method_token: Option<String>,
    pub note: String,
    pub conversation_id: String,
    pub message_id: String,
    pub request_id: Option<RequestId>,
    pub failure_reason: String,
    pub failure_message: String,
    pub authorization_ref: Option<String>,
    pub capture_ref: Option<String>,
    pub created_at_us: i64,
    pub settled_at_us: Option<i64>,
    pub dispute_status: DisputeStatus,
}

impl Payment {
    pub fn currency(&self) -> Currency {
        self.amount.currency()
    }

    pub fn involves(&self, user: &UserId) -> bool {
        self.sender_id == *user || self.recipient_id == *user
    }

    /// The error a FAILED payment answers with, so a retry returns the same error.
    pub fn failure(&self) -> Option<Error> {
        (self.status == PaymentStatus::Failed).then(|| Error::FailedPrecondition {
            // A reason this build does not know (written by a newer one) still fails.
            reason: Reason::from_db(&self.failure_reason).unwrap_or(Reason::PaymentFailed),
            message: self.failure_message.clone(),
        })
    }
}

/// Notes: up to 280 characters, no control characters.
pub fn check_note(field: &str, note: &str) -> Result<()> {
    crate::kernel::text::parse_text(field, note, NOTE_LEN_MAX, false).map(|_| ())
}

/// Conversation and message ids: opaque, up to 128 characters, printable.
pub fn check_opaque(field: &str, id: &str) -> Result<()> {
    if id.chars().count() > OPAQUE_ID_LEN_MAX {
        return Err(Error::invalid(field, format!("at most {OPAQUE_ID_LEN_MAX} characters")));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid(field, "control characters are not allowed"));
    }
    Ok(())
}

/// Per-payment and rolling 24-hour limits of a tier, in major units (applied in every
/// currency at its own exponent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierLimits {
    pub payment_max: i64,
    pub daily_max: i64,
}

#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    pub unverified: TierLimits,
    pub verified: TierLimits,
    /// Card-funding fee: basis points of the card part, plus a fixed amount in minor units.
    pub card_fee_bps: i64,
    pub card_fee_fixed_minor: i64,
    /// A pending payment untouched this long is picked up by the resolver.
    pub resolve_after_s: i64,
    pub payouts: PayoutsConfig,
    pub disputes: DisputesConfig,
    pub shop: ShopConfig,
}

/// Live shopping's settings (`DMPAY_SHOP_*`).
#[derive(Debug, Clone)]
pub struct ShopConfig {
    /// The platform's commission on a sale, in basis points, unless the seller has an
    /// override (`Accounts.SetSeller`).
    pub commission_bps: u32,
    /// How long a sale's proceeds stay pending before they become available.
    pub hold_s: i64,
    /// A listing's per-buyer maximum when its creator gives none.
    pub per_buyer_max_default: i64,
    /// Listings a seller may have open (not closed, not past their end) at once.
    pub open_listings_per_seller_max: i64,
    /// Refunds one purchase may have.
    pub refunds_per_purchase_max: i64,
    /// How long a stream tab stays open before it closes by itself.
    pub tab_ttl_s: i64,
}

impl Default for ShopConfig {
    fn default() -> Self {
        ShopConfig {
            commission_bps: 500,
            hold_s: 3 * 86_400,
            per_buyer_max_default: 10,
            open_listings_per_seller_max: 1_000,
            refunds_per_purchase_max: 20,
            tab_ttl_s: 6 * 3_600,
        }
    }
}

impl ShopConfig {
    /// The commission on `amount` at `bps`, rounded down (the seller keeps the odd minor
    /// unit), never more than the amount.
    pub fn commission(amount_minor: i64, bps: u32) -> i64 {
        let c = i128::from(amount_minor) * i128::from(bps.min(10_000)) / 10_000;
        i64::try_from(c).unwrap_or(amount_minor).clamp(0, amount_minor.max(0))
    }
}

/// Who bears a disputed payment's amount (`DMPAY_DISPUTE_RECOVERY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisputeRecovery {
    /// The payment's recipient: their wallet, and what it cannot cover as their
    /// receivable.
    Recipient,
    /// The platform (`platform:dispute_losses`).
    Platform,
}

/// Who bears the processor's dispute fee (`DMPAY_DISPUTE_FEE_PAYER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisputeFeePayer {
    Platform,
    Recipient,
}

#[derive(Debug, Clone)]
pub struct DisputesConfig {
    pub recovery: DisputeRecovery,
    pub fee_payer: DisputeFeePayer,
}

impl Default for DisputesConfig {
    fn default() -> Self {
        DisputesConfig { recovery: DisputeRecovery::Recipient, fee_payer: DisputeFeePayer::Platform }
    }
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            unverified: TierLimits { payment_max: 250, daily_max: 500 },
            verified: TierLimits { payment_max: 5_000, daily_max: 10_000 },
            card_fee_bps: 0,
            card_fee_fixed_minor: 0,
            resolve_after_s: 10,
            payouts: Default::default(),
            disputes: Default::default(),
            shop: Default::default(),
        }
    }
}

impl PaymentsConfig {
    pub fn limits(&self, tier: Tier) -> TierLimits {
        match tier {
            Tier::Unverified => self.unverified,
            Tier::Verified => self.verified,
        }
    }

    /// The fee on a card part: rounded half up, so wallet part + card part + fee is
    /// exactly what the sender pays.
    pub fn card_fee(&self, card_minor: i64) -> i64 {
        if card_minor == 0 {
            return 0;
        }
        let pct = (i128::from(card_minor) * i128::from(self.card_fee_bps) + 5_000) / 10_000;
        i64::try_from(pct).unwrap_or(i64::MAX).saturating_add(self.card_fee_fixed_minor)
    }
}

/// A tier's payout limits in major units (applied in every currency at its exponent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayoutLimits {
    pub payout_max: i64,
    pub daily_max: i64,
}

#[derive(Debug, Clone)]
pub struct PayoutsConfig {
    pub unverified: PayoutLimits,
    pub verified: PayoutLimits,
    /// The instant fee: basis points of the amount, rounded half up, then held between
    /// a minimum and a maximum (minor units of the payout's currency).
    pub instant_fee_bps: i64,
    pub instant_fee_min_minor: i64,
    pub instant_fee_max_minor: i64,
    /// Money a user received from card-funded payments this recently cannot be cashed
    /// out instantly (a fraud control against stolen cards; 0 is off).
    pub instant_hold_s: i64,
}

impl Default for PayoutsConfig {
    fn default() -> Self {
        PayoutsConfig {
            unverified: PayoutLimits { payout_max: 250, daily_max: 500 },
            verified: PayoutLimits { payout_max: 5_000, daily_max: 10_000 },
            instant_fee_bps: 175,
            instant_fee_min_minor: 25,
            instant_fee_max_minor: 2_500,
            instant_hold_s: 0,
        }
    }
}

impl PayoutsConfig {
    pub fn limits(&self, tier: Tier) -> PayoutLimits {
        match tier {
            Tier::Unverified => self.unverified,
            Tier::Verified => self.verified,
        }
    }

    /// The fee of a payout of `amount` minor units: none for standard; for instant the
    /// percentage rounded half up, then at least the minimum and at most the maximum.
    pub fn fee(&self, speed: crate::processor::PayoutSpeed, amount: i64) -> i64 {
        match speed {
            crate::processor::PayoutSpeed::Standard => 0,
            crate::processor::PayoutSpeed::Instant => {
                let pct = (i128::from(amount) * i128::from(self.instant_fee_bps) + 5_000) / 10_000;
                let pct = i64::try_from(pct).unwrap_or(i64::MAX);
                pct.max(self.instant_fee_min_minor).min(self.instant_fee_max_minor.max(self.instant_fee_min_minor))
            }
        }
    }
}

/// The rules a send must pass before any money moves, in one place for both write
/// paths (the wallet path checks them in the engine's batch, the card path before it
/// records the payment): neither party frozen, the tier's per-payment limit, and the
/// rolling 24-hour limit given what the sender already `sent` in the window.
pub fn check_send_rules(
    sender: crate::accounts::Status,
    recipient: crate::accounts::Status,
    limits: TierLimits,
    amount: crate::kernel::money::Money,
    sent: i64,
) -> Result<()> {
    use crate::accounts::Status;
    use crate::kernel::money::Money;
    if sender == Status::Frozen {
        return Err(Error::FailedPrecondition {
            reason: Reason::AccountFrozen,
            message: "your account is frozen".into(),
        });
    }
    if recipient == Status::Frozen {
        // The same answer as any refusal the sender cannot act on: whether another user's
        // account is frozen is between that user, finance and the platform.
        return Err(recipient_unavailable());
    }
    let currency = amount.currency();
    let payment_max = major_to_minor(limits.payment_max, currency);
    if amount.minor() > payment_max {
        return Err(Error::ResourceExhausted {
            reason: Reason::PaymentLimit,
            message: format!("at most {} per payment for your account", Money::from_minor(currency, payment_max)),
        });
    }
    let daily_max = major_to_minor(limits.daily_max, currency);
    if sent.saturating_add(amount.minor()) > daily_max {
        return Err(daily_limit_error(currency, daily_max, sent));
    }
    Ok(())
}

/// The refusal of a send over the rolling 24-hour limit `daily_max` (minor units), with
/// what the sender already `sent` in the window.
pub fn daily_limit_error(currency: Currency, daily_max: i64, sent: i64) -> Error {
    use crate::kernel::money::Money;
    Error::ResourceExhausted {
        reason: Reason::DailyLimit,
        message: format!(
            "at most {} in 24 hours for your account; {} already sent",
            Money::from_minor(currency, daily_max),
            Money::from_minor(currency, sent)
        ),
    }
}

/// The refusal of a payment to a recipient who cannot receive it now, for whatever
/// reason; it names none.
pub fn recipient_unavailable() -> Error {
    Error::FailedPrecondition {
        reason: Reason::RecipientUnavailable,
        message: "this user cannot receive payments right now".into(),
    }
}

pub use crate::kernel::money::major_to_minor;

pub fn parse_recipient(raw: &str) -> Result<UserId> {
    UserId::parse("recipient_id", raw)
}

/// A request for money in a DM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Open,
    Paid,
    Declined,
    Cancelled,
    Expired,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Open => "open",
            RequestStatus::Paid => "paid",
            RequestStatus::Declined => "declined",
            RequestStatus::Cancelled => "cancelled",
            RequestStatus::Expired => "expired",
        }
    }

    pub(crate) fn from_db(s: &str) -> Result<Self> {
        Ok(match s {
            "open" => RequestStatus::Open,
            "paid" => RequestStatus::Paid,
            "declined" => RequestStatus::Declined,
            "cancelled" => RequestStatus::Cancelled,
            "expired" => RequestStatus::Expired,
            other => return Err(Error::internal(anyhow::anyhow!("unknown request status {other:?}"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    pub request_id: RequestId,
    pub requester_id: UserId,
    pub payer_id: UserId,
    pub amount: Money,
    pub note: String,
    pub conversation_id: String,
    pub message_id: String,
    pub status: RequestStatus,
    pub payment_id: Option<PaymentId>,
    pub created_at_us: i64,
    pub expires_at_us: i64,
}

impl PaymentRequest {
    pub fn currency(&self) -> Currency {
        self.amount.currency()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fee_rounds_half_up_and_is_zero_without_a_card_part() {
        let c = PaymentsConfig { card_fee_bps: 290, card_fee_fixed_minor: 30, ..Default::default() };
        assert_eq!(c.card_fee(0), 0);
        assert_eq!(c.card_fee(1000), 29 + 30);
        assert_eq!(c.card_fee(50), 1 + 30);
        assert_eq!(PaymentsConfig::default().card_fee(1000), 0);
    }

    /// A failed payment answers with the reason it was recorded with, the same text its
    /// `failure_reason` field carries, so the first answer, a retry and GetPayment agree;
    /// a reason this build does not know is PAYMENT_FAILED.
    #[test]
    fn a_failed_payment_answers_with_its_recorded_reason() {
        let usd = Currency::from_code("USD").unwrap();
        let m = Money::from_minor(usd, 100);
        let failed = |reason: &str| Payment {
            payment_id: PaymentId::parse("payment_id", "pay_1").unwrap(),
            sender_id: UserId::parse("sender_id", "alice").unwrap(),
            recipient_id: UserId::parse("recipient_id", "bob").unwrap(),
            amount: m,
            wallet_amount: Money::zero(usd),
            card_amount: m,
            fee_amount: Money::zero(usd),
            refunded_amount: Money::zero(usd),
            status: PaymentStatus::Failed,
            funding_source: FundingSource::Card,
            payment_method_token: None,
            note: String::new(),
            conversation_id: String::new(),
            message_id: String::new(),
            request_id: None,
            failure_reason: reason.to_owned(),
            failure_message: "m".into(),
            authorization_ref: None,
            capture_ref: None,
            created_at_us: 0,
            settled_at_us: None,
            dispute_status: crate::payments::model::DisputeStatus::Undisputed,
        };
        let reason = |p: Payment| match p.failure() {
            Some(Error::FailedPrecondition { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(failed("CARD_DECLINED")), Reason::CardDeclined);
        assert_eq!(reason(failed("PAYMENT_METHOD_REMOVED")), Reason::PaymentMethodRemoved);
        assert_eq!(reason(failed("A_REASON_FROM_A_NEWER_BUILD")), Reason::PaymentFailed);
        let settled = Payment { status: PaymentStatus::Settled, ..failed("") };
        assert!(settled.failure().is_none());
    }

    #[test]
    fn send_rules_in_order() {
        use crate::accounts::Status::{Active, Frozen};
        use crate::kernel::money::Money;
        let usd = Currency::from_code("USD").unwrap();
        let limits = TierLimits { payment_max: 250, daily_max: 500 };
        let reason = |r: Result<()>| match r {
            Err(Error::FailedPrecondition { reason, .. } | Error::ResourceExhausted { reason, .. }) => reason.as_str(),
            Err(e) => panic!("{e}"),
            Ok(()) => "ok",
        };
        let m = |minor| Money::from_minor(usd, minor);
        assert_eq!(reason(check_send_rules(Frozen, Frozen, limits, m(1), 0)), "ACCOUNT_FROZEN");
        assert_eq!(reason(check_send_rules(Active, Frozen, limits, m(1), 0)), "RECIPIENT_UNAVAILABLE");
        assert_eq!(reason(check_send_rules(Active, Active, limits, m(25_001), 0)), "PAYMENT_LIMIT");
        assert_eq!(reason(check_send_rules(Active, Active, limits, m(25_000), 25_000)), "ok");
        assert_eq!(reason(check_send_rules(Active, Active, limits, m(1), 50_000)), "DAILY_LIMIT");
    }

    #[test]
    fn limits_scale_with_the_currency() {
        let usd = Currency::from_code("USD").unwrap();
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(major_to_minor(250, usd), 25_000);
        assert_eq!(major_to_minor(250, jpy), 250);
    }

    #[test]
    fn notes_and_ids() {
        assert!(check_note("note", &"n".repeat(280)).is_ok());
        assert!(check_note("note", &"n".repeat(281)).is_err());
        assert!(check_note("note", "a\u{1b}b").is_err());
        assert!(check_opaque("conversation_id", &"c".repeat(129)).is_err());
    }
}
