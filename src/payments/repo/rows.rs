//! The payments module's rows as stored, and how its outbox events are appended: the
//! column lists and row types every reader and writer of its tables shares.

use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, RequestId, UserId};
use crate::kernel::money::{Currency, Money};
use crate::payments::model::{FundingSource, Payment, PaymentRequest, PaymentStatus, RequestStatus};

/// A stored currency code; the database only holds codes dmpay wrote.
fn currency(code: &str) -> Result<Currency> {
    Currency::from_code(code)
        .ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {code:?} in a stored row")))
}

/// A payment's row. It also reads the JSON copies that events held before migration
/// 0008 (`events::read`), whose fields are these columns under the same names.
#[derive(Clone, sqlx::FromRow, serde::Deserialize)]
pub(crate) struct PaymentRow {
    payment_id: String,
    sender_id: String,
    recipient_id: String,
    currency: String,
    amount: i64,
    wallet_amount: i64,
    card_amount: i64,
    fee_amount: i64,
    refunded_amount: i64,
    status: String,
    funding_source: String,
    payment_method_token: Option<String>,
    note: String,
    conversation_id: String,
    message_id: String,
    request_id: Option<String>,
    failure_reason: String,
    failure_message: String,
    authorization_ref: Option<String>,
    capture_ref: Option<String>,
    created_at_us: i64,
    settled_at_us: Option<i64>,
    /// Absent from the JSON copies of legacy events, which predate disputes.
    #[serde(default)]
    dispute_status: String,
}

impl TryFrom<PaymentRow> for Payment {
    type Error = Error;
    fn try_from(r: PaymentRow) -> Result<Self> {
        let c = currency(&r.currency)?;
        Ok(Payment {
            status: PaymentStatus::from_db(&r.status)?,
            funding_source: FundingSource::from_db(&r.funding_source)?,
            payment_id: PaymentId::from_db(r.payment_id),
            sender_id: UserId::from_db(r.sender_id),
            recipient_id: UserId::from_db(r.recipient_id),
            amount: Money::from_minor(c, r.amount),
            wallet_amount: Money::from_minor(c, r.wallet_amount),
            card_amount: Money::from_minor(c, r.card_amount),
            fee_amount: Money::from_minor(c, r.fee_amount),
            refunded_amount: Money::from_minor(c, r.refunded_amount),
            payment_method_token: r.payment_method_token,
            note: r.note,
            conversation_id: r.conversation_id,
            message_id: r.message_id,
            request_id: r.request_id.map(RequestId::from_db),
            failure_reason: r.failure_reason,
            failure_message: r.failure_message,
            authorization_ref: r.authorization_ref,
            capture_ref: r.capture_ref,
            created_at_us: r.created_at_us,
            settled_at_us: r.settled_at_us,
            dispute_status: crate::payments::model::DisputeStatus::from_db(&r.dispute_status)?,
        })
    }
}

pub(crate) const COLUMNS: &str =
    "payment_id, sender_id, recipient_id, currency, amount, wallet_amount, card_amount, fee_amount, \
     refunded_amount, status, funding_source, payment_method_token, note, conversation_id, message_id, request_id, \
     failure_reason, failure_message, authorization_ref, capture_ref, created_at_us, settled_at_us, dispute_status";

/// Appends an event inside the caller's transaction, with the next sequence number.
/// The counter row's lock, held to commit, is what keeps the sequence gap-free.
/// `$e` is an `EventFields`; `$now_us` its time.
macro_rules! append_event {
    ($tx:expr, $now_us:expr, $e:expr) => {{
        let e: &EventFields = $e;
        let seq: i64 = sqlx::query_scalar(
            "UPDATE payment_event_sequence SET last_value = last_value + 1 WHERE id = 1 RETURNING last_value",
        )
        .fetch_one(&mut *$tx)
        .await?;
        sqlx::query(concat!(
            "INSERT INTO payment_events (sequence, ",
            $crate::payments::repo::rows::EVENT_COLUMNS!(),
            ", payout_id, purchase_id, units_sold, snapshot, occurred_at_us) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, '', $18)"
        ))
        .bind(seq)
        .bind(e.event_type)
        .bind(&e.payment_id)
        .bind(&e.request_id)
        .bind(&e.party_a)
        .bind(&e.party_b)
        .bind(&e.conversation_id)
        .bind(e.status)
        .bind(e.refunded_amount)
        .bind(&e.failure_reason)
        .bind(&e.failure_message)
        .bind(&e.authorization_ref)
        .bind(&e.capture_ref)
        .bind(e.settled_at_us)
        .bind(&e.payout_id)
        .bind(&e.purchase_id)
        .bind(e.units_sold)
        .bind($now_us)
        .execute(&mut *$tx)
        .await?;
        seq
    }};
}
pub(crate) use append_event;

/// The outbox columns an `EventFields` fills, in its field order.
macro_rules! EVENT_COLUMNS {
    () => {
        "event_type, payment_id, request_id, party_a, party_b, conversation_id, status, refunded_amount, \
         failure_reason, failure_message, authorization_ref, capture_ref, settled_at_us"
    };
}
pub(crate) use EVENT_COLUMNS;

/// What an outbox row records: who it concerns, and the state it announces in typed
/// columns. The parts of a payment or request that never change are read from its own
/// row when the event is delivered (`events::read`).
pub struct EventFields {
    pub event_type: &'static str,
    pub payment_id: Option<String>,
    pub request_id: Option<String>,
    pub party_a: String,
    pub party_b: String,
    pub conversation_id: String,
    /// The payment's or request's status after the change.
    pub status: &'static str,
    pub refunded_amount: i64,
    pub failure_reason: String,
    pub failure_message: String,
    pub authorization_ref: Option<String>,
    pub capture_ref: Option<String>,
    pub settled_at_us: Option<i64>,
    /// Set on `payout.*` events (the payment and request ids are then empty).
    pub payout_id: Option<String>,
    /// Set on `purchase.*` events, with the listing's units sold after the change.
    pub purchase_id: Option<String>,
    pub units_sold: Option<i64>,
}

impl EventFields {
    /// The event of a request's change.
    pub fn request(event_type: &'static str, r: &PaymentRequest) -> Self {
        EventFields {
            event_type,
            payment_id: r.payment_id.as_ref().map(|p| p.as_str().to_owned()),
            request_id: Some(r.request_id.as_str().to_owned()),
            party_a: r.requester_id.as_str().to_owned(),
            party_b: r.payer_id.as_str().to_owned(),
            conversation_id: r.conversation_id.clone(),
            status: r.status.as_str(),
            refunded_amount: 0,
            failure_reason: String::new(),
            failure_message: String::new(),
            authorization_ref: None,
            capture_ref: None,
            settled_at_us: None,
            payout_id: None,
            purchase_id: None,
            units_sold: None,
        }
    }

    /// The event of a payout's change: it concerns its one user (both parties).
    pub fn payout(event_type: &'static str, p: &crate::payments::payout::Payout) -> Self {
        EventFields {
            event_type,
            payment_id: None,
            request_id: None,
            party_a: p.user_id.as_str().to_owned(),
            party_b: p.user_id.as_str().to_owned(),
            conversation_id: String::new(),
            status: p.status.as_str(),
            refunded_amount: 0,
            failure_reason: p.failure_reason.clone(),
            failure_message: p.failure_message.clone(),
            authorization_ref: None,
            capture_ref: p.processor_ref.clone(),
            settled_at_us: p.paid_at_us,
            payout_id: Some(p.payout_id.as_str().to_owned()),
            purchase_id: None,
            units_sold: None,
        }
    }

    /// The event of a purchase's change: to its buyer (party a), its seller (party b)
    /// and its stream (the conversation column holds the stream's channel).
    pub fn purchase(event_type: &'static str, p: &crate::payments::listing::Purchase, units_sold: i64) -> Self {
        use crate::payments::listing::PurchaseStatus;
        EventFields {
            event_type,
            payment_id: None,
            request_id: None,
            party_a: p.buyer_id.as_str().to_owned(),
            party_b: p.seller_id.as_str().to_owned(),
            conversation_id: crate::payments::listing::stream_channel(&p.stream_id),
            status: match p.status() {
                PurchaseStatus::Paid => "paid",
                PurchaseStatus::PartiallyRefunded => "partially_refunded",
                PurchaseStatus::Refunded => "refunded",
            },
            refunded_amount: p.refunded_amount.minor(),
            failure_reason: String::new(),
            failure_message: String::new(),
            authorization_ref: None,
            capture_ref: None,
            settled_at_us: Some(p.created_at_us),
            payout_id: None,
            purchase_id: Some(p.purchase_id.as_str().to_owned()),
            units_sold: Some(units_sold),
        }
    }

    pub fn payment(event_type: &'static str, p: &Payment) -> Self {
        EventFields {
            event_type,
            payment_id: Some(p.payment_id.as_str().to_owned()),
            request_id: p.request_id.as_ref().map(|r| r.as_str().to_owned()),
            party_a: p.sender_id.as_str().to_owned(),
            party_b: p.recipient_id.as_str().to_owned(),
            conversation_id: p.conversation_id.clone(),
            status: p.status.as_str(),
            refunded_amount: p.refunded_amount.minor(),
            failure_reason: p.failure_reason.clone(),
            failure_message: p.failure_message.clone(),
            authorization_ref: p.authorization_ref.clone(),
            capture_ref: p.capture_ref.clone(),
            settled_at_us: p.settled_at_us,
            payout_id: None,
            purchase_id: None,
            units_sold: None,
        }
    }
}

/// A request's row; like `PaymentRow` it also reads pre-0008 JSON copies.
#[derive(Clone, sqlx::FromRow, serde::Deserialize)]
pub(crate) struct RequestRow {
    request_id: String,
    requester_id: String,
    payer_id: String,
    currency: String,
    amount: i64,
    note: String,
    conversation_id: String,
    message_id: String,
    status: String,
    payment_id: Option<String>,
    created_at_us: i64,
    expires_at_us: i64,
}

impl TryFrom<RequestRow> for PaymentRequest {
    type Error = Error;
    fn try_from(r: RequestRow) -> Result<Self> {
        Ok(PaymentRequest {
            status: RequestStatus::from_db(&r.status)?,
            amount: Money::from_minor(currency(&r.currency)?, r.amount),
            request_id: RequestId::from_db(r.request_id),
            requester_id: UserId::from_db(r.requester_id),
            payer_id: UserId::from_db(r.payer_id),
            note: r.note,
            conversation_id: r.conversation_id,
            message_id: r.message_id,
            payment_id: r.payment_id.map(PaymentId::from_db),
            created_at_us: r.created_at_us,
            expires_at_us: r.expires_at_us,
        })
    }
}

pub(crate) const REQUEST_COLUMNS: &str =
    "request_id, requester_id, payer_id, currency, amount, note, conversation_id, \
     message_id, status, payment_id, created_at_us, expires_at_us";
