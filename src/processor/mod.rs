//! The card-processor boundary. dmpay talks to a processor only through `CardProcessor`;
//! the built-in `sandbox` behaves like a real one and a real processor plugs in behind
//! the same trait.
//!
//! Every call carries an idempotency key derived from the dmpay operation, so a retry
//! can never charge twice. A call whose outcome is unknown (`ProcessorError::Unknown`:
//! timeout, connection lost) is never retried blindly: the caller records it and
//! resolves it later with `lookup`.

use crate::kernel::reason::Reason;
pub mod sandbox;

use async_trait::async_trait;

use crate::kernel::card_data::{Cvc, Pan};
use crate::kernel::money::Money;

/// The card as the processor needs it for one call.
#[derive(Debug, Clone, Copy)]
pub struct CardDetails<'a> {
    pub pan: &'a Pan,
    pub exp_month: u32,
    pub exp_year: u32,
    /// Present only for the verification at link time.
    pub cvc: Option<&'a Cvc>,
}

/// Why the issuer or the processor said no. `reason()` is the machine-readable
/// `ErrorInfo.reason` callers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeclineCode {
    CardDeclined,
    InsufficientFunds,
    LostCard,
    StolenCard,
    CardExpired,
    IncorrectCvc,
    Fraud,
}

impl DeclineCode {
    pub fn reason(self) -> Reason {
        match self {
            DeclineCode::CardDeclined => Reason::CardDeclined,
            DeclineCode::InsufficientFunds => Reason::InsufficientFunds,
            DeclineCode::LostCard => Reason::LostCard,
            DeclineCode::StolenCard => Reason::StolenCard,
            DeclineCode::CardExpired => Reason::CardExpired,
            DeclineCode::IncorrectCvc => Reason::IncorrectCvc,
            DeclineCode::Fraud => Reason::FraudSuspected,
        }
    }

    /// The decline a stored reason stands for, if it is one.
    pub fn from_reason(text: &str) -> Option<Self> {
        Some(match Reason::from_db(text).ok()? {
            Reason::CardDeclined => DeclineCode::CardDeclined,
            Reason::InsufficientFunds => DeclineCode::InsufficientFunds,
            Reason::LostCard => DeclineCode::LostCard,
            Reason::StolenCard => DeclineCode::StolenCard,
            Reason::CardExpired => DeclineCode::CardExpired,
            Reason::IncorrectCvc => DeclineCode::IncorrectCvc,
            Reason::FraudSuspected => DeclineCode::Fraud,
            _ => return None,
        })
    }

    pub fn message(self) -> &'static str {
        match self {
            DeclineCode::CardDeclined => "the card was declined",
            DeclineCode::InsufficientFunds => "the card has insufficient funds",
            DeclineCode::LostCard => "the card was reported lost",
            DeclineCode::StolenCard => "the card was reported stolen",
            DeclineCode::CardExpired => "the card has expired",
            DeclineCode::IncorrectCvc => "the security code is incorrect",
            DeclineCode::Fraud => "the payment was blocked as suspected fraud",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessorError {
    /// The card was declined; nothing was charged.
    #[error("{}", .0.message())]
    Declined(DeclineCode),
    /// The processor answered with an error; nothing was charged.
    #[error("processor error: {0}")]
    Failed(String),
    /// No answer: the call may or may not have happened. Resolve with `lookup`.
    #[error("processor outcome unknown")]
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Verify,
    Authorize,
    Capture,
    Void,
    Refund,
    Payout,
    /// Recorded by the processor when a paid payout comes back.
    PayoutReturn,
    /// A cardholder's dispute of a capture, recorded by the processor.
    Dispute,
    /// The decision of a dispute (won: the money given back).
    DisputeReversal,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Verify => "verify",
            CallKind::Authorize => "authorize",
            CallKind::Capture => "capture",
            CallKind::Void => "void",
            CallKind::Refund => "refund",
            CallKind::Payout => "payout",
            CallKind::PayoutReturn => "payout_return",
            CallKind::Dispute => "dispute",
            CallKind::DisputeReversal => "dispute_reversal",
        }
    }
}

/// What the processor recorded for an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub idempotency_key: String,
    pub kind: String,
    pub reference: String,
    pub amount: Option<Money>,
    /// `Ok(())` for a success, else why it failed.
    pub outcome: Result<(), ProcessorError>,
}

/// How fast a payout reaches the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayoutSpeed {
    /// The card networks' ordinary credit: free, one to three business days.
    Standard,
    /// A real-time push (Visa Direct, Mastercard Send): minutes, for a fee.
    Instant,
}

/// Which payout speeds a card can receive, as the processor knows from its BIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayoutSupport {
    pub standard: bool,
    pub instant: bool,
}

/// What the processor reports after a call, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationKind {
    /// A paid payout came back (the card was closed): the processor returned the money.
    PayoutReturned,
    /// The cardholder disputed a capture (`reference`): the processor took the amount
    /// and a fee (`fee`) back from the platform. `event_reference` names the dispute.
    DisputeOpened,
    /// The platform won the dispute (`reference`): the processor gives the amount back.
    /// `event_reference` names the reversal, as the settlement report shows it.
    DisputeWon,
    /// The platform lost the dispute (`reference`); nothing moves.
    DisputeLost,
}

/// One notification: what happened to which call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Increasing, without reuse: where a reader resumes.
    pub sequence: i64,
    pub kind: NotificationKind,
    /// The call it concerns (a payout's reference).
    pub reference: String,
    /// Its own reference (the return's), as the settlement report shows it.
    pub event_reference: String,
    pub amount: Money,
    /// What the processor charged for it (a dispute's fee), in `amount`'s currency.
    pub fee: Money,
    pub at_us: i64,
    /// The idempotency key of the call it concerns (the payout's push, the capture, the
    /// dispute), as a real processor's metadata carries the caller's own ids: the
    /// caller finds its object by it even before it learnt the call's reference.
    pub call_key: String,
}

/// Notifications read per call, at most.
pub const NOTIFICATIONS_PAGE_MAX: i64 = 100;

#[async_trait]
pub trait CardProcessor: Send + Sync {
    /// The processor's name in account codes and reports (`sandbox`).
    fn name(&self) -> &'static str;
    /// Zero-amount verification, with the CVC. Returns the processor reference.
    async fn verify(&self, key: &str, card: CardDetails<'_>) -> Result<String, ProcessorError>;
    /// Reserves `amount` on the card. Returns the authorization reference.
    async fn authorize(&self, key: &str, card: CardDetails<'_>, amount: Money) -> Result<String, ProcessorError>;
    /// Captures (part of) an authorization. Returns the capture reference.
    async fn capture(&self, key: &str, authorization: &str, amount: Money) -> Result<String, ProcessorError>;
    /// Releases an authorization.
    async fn void(&self, key: &str, authorization: &str) -> Result<String, ProcessorError>;
    /// Refunds (part of) a capture. Returns the refund reference.
    async fn refund(&self, key: &str, capture: &str, amount: Money) -> Result<String, ProcessorError>;
    /// Which payout speeds `card` can receive. No call is recorded.
    fn payout_support(&self, card: CardDetails<'_>) -> PayoutSupport;
    /// Pushes `amount` to the card. Returns the payout reference.
    async fn payout(
        &self,
        key: &str,
        card: CardDetails<'_>,
        amount: Money,
        speed: PayoutSpeed,
    ) -> Result<String, ProcessorError>;
    /// Notifications after `after`, oldest first, at most `limit`
    /// (`NOTIFICATIONS_PAGE_MAX`).
    async fn notifications(&self, after: i64, limit: i64) -> Result<Vec<Notification>, ProcessorError>;
    /// What happened to the call made with `key`, if it reached the processor.
    async fn lookup(&self, key: &str) -> Result<Option<CallRecord>, ProcessorError>;
    /// The settlement report of one UTC day (`YYYY-MM-DD`), as CSV with the columns
    /// processor_reference, type, amount, fee, net, currency, created_at.
    async fn settlement_report(&self, date: &str) -> Result<String, ProcessorError>;
}
