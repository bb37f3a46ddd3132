//! Payments, bills (the API's name for payment requests) and their events on the wire.

use super::money::to_wire;
use super::pb;
use super::timestamp;
use crate::payments::events;
use crate::payments::model::{DisputeStatus, PaymentRequest, RequestStatus};
use crate::payments::payouts::{Payout, PayoutSpeed, PayoutStatus};
use crate::payments::{Payment, PaymentStatus};

pub(super) fn event_to_wire(e: events::Event) -> pb::PaymentEvent {
    pb::PaymentEvent {
        sequence: e.sequence,
        r#type: event_type_to_wire(&e.event_type) as i32,
        payment: e.payment.map(payment_to_wire),
        bill: e.request.map(bill_to_wire),
        payout: e.payout.map(payout_to_wire),
        purchase: e.purchase.map(|(p, sold)| super::shopping::purchase_to_wire(p, sold)),
        occurred_at: Some(timestamp(e.occurred_at_us)),
    }
}

/// The stored event type (`payment.created`, `request.paid`, ...) as the API's enum.
/// Every type the payments module writes has a value; a type this build does not know
/// (written by a newer one) is unspecified rather than an error, so a watcher keeps up.
fn event_type_to_wire(stored: &str) -> pb::PaymentEventType {
    use pb::PaymentEventType as T;
    match stored {
        "payment.created" => T::PaymentCreated,
        "payment.settled" => T::PaymentSettled,
        "payment.failed" => T::PaymentFailed,
        "payment.refunded" => T::PaymentRefunded,
        "payment.refund_failed" => T::PaymentRefundFailed,
        "request.created" => T::BillCreated,
        "request.paid" => T::BillPaid,
        "request.declined" => T::BillDeclined,
        "request.cancelled" => T::BillCancelled,
        "request.expired" => T::BillExpired,
        "payout.created" => T::PayoutCreated,
        "payout.paid" => T::PayoutPaid,
        "payout.failed" => T::PayoutFailed,
        "payout.returned" => T::PayoutReturned,
        "payment.disputed" => T::PaymentDisputed,
        "payment.dispute_won" => T::PaymentDisputeWon,
        "payment.dispute_lost" => T::PaymentDisputeLost,
        "purchase.completed" => T::PurchaseCompleted,
        "purchase.refunded" => T::PurchaseRefunded,
        _ => T::Unspecified,
    }
}

pub(crate) fn payment_to_wire(p: Payment) -> pb::Payment {
    pb::Payment {
        amount: Some(to_wire(p.amount)),
        card_funded_amount: Some(to_wire(p.card_amount)),
        refunded_amount: Some(to_wire(p.refunded_amount)),
        fee: Some(to_wire(p.fee_amount)),
        status: match p.status {
            PaymentStatus::Pending => pb::PaymentStatus::Pending,
            PaymentStatus::Settled => pb::PaymentStatus::Settled,
            PaymentStatus::Failed => pb::PaymentStatus::Failed,
            PaymentStatus::PartiallyRefunded => pb::PaymentStatus::PartiallyRefunded,
            PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
        } as i32,
        created_at: Some(timestamp(p.created_at_us)),
        settled_at: p.settled_at_us.map(timestamp),
        payment_id: p.payment_id.into_string(),
        sender_id: p.sender_id.into_string(),
        recipient_id: p.recipient_id.into_string(),
        note: p.note,
        conversation_id: p.conversation_id,
        message_id: p.message_id,
        bill_id: p.request_id.map(|r| r.into_string()).unwrap_or_default(),
        failure_reason: p.failure_reason,
        dispute_status: match p.dispute_status {
            DisputeStatus::Undisputed => pb::DisputeStatus::Unspecified,
            DisputeStatus::Open => pb::DisputeStatus::Open,
            DisputeStatus::Won => pb::DisputeStatus::Won,
            DisputeStatus::Lost => pb::DisputeStatus::Lost,
        } as i32,
    }
}

pub(crate) fn payout_to_wire(p: Payout) -> pb::Payout {
    pb::Payout {
        net_amount: Some(to_wire(p.net())),
        amount: Some(to_wire(p.amount)),
        fee: Some(to_wire(p.fee)),
        speed: match p.speed {
            PayoutSpeed::Standard => pb::PayoutSpeed::Standard,
            PayoutSpeed::Instant => pb::PayoutSpeed::Instant,
        } as i32,
        status: match p.status {
            PayoutStatus::Pending => pb::PayoutStatus::Pending,
            PayoutStatus::Paid => pb::PayoutStatus::Paid,
            PayoutStatus::Failed => pb::PayoutStatus::Failed,
            PayoutStatus::Returned => pb::PayoutStatus::Returned,
        } as i32,
        created_at: Some(timestamp(p.created_at_us)),
        paid_at: p.paid_at_us.map(timestamp),
        returned_at: p.returned_at_us.map(timestamp),
        payout_id: p.payout_id.into_string(),
        user_id: p.user_id.into_string(),
        payment_method_token: p.payment_method_token,
        card_last4: p.card_last4,
        failure_reason: p.failure_reason,
        failure_message: p.failure_message,
    }
}

/// The wire's speed; unspecified is STANDARD, the free one.
pub(crate) fn payout_speed_from_wire(raw: i32) -> crate::kernel::error::Result<PayoutSpeed> {
    match pb::PayoutSpeed::try_from(raw) {
        Ok(pb::PayoutSpeed::Unspecified | pb::PayoutSpeed::Standard) => Ok(PayoutSpeed::Standard),
        Ok(pb::PayoutSpeed::Instant) => Ok(PayoutSpeed::Instant),
        Err(_) => Err(crate::kernel::error::Error::invalid("speed", format!("unknown payout speed {raw}"))),
    }
}

pub(crate) fn bill_to_wire(r: PaymentRequest) -> pb::Bill {
    pb::Bill {
        amount: Some(to_wire(r.amount)),
        status: match r.status {
            RequestStatus::Open => pb::BillStatus::Open,
            RequestStatus::Paid => pb::BillStatus::Paid,
            RequestStatus::Declined => pb::BillStatus::Declined,
            RequestStatus::Cancelled => pb::BillStatus::Cancelled,
            RequestStatus::Expired => pb::BillStatus::Expired,
        } as i32,
        created_at: Some(timestamp(r.created_at_us)),
        expires_at: Some(timestamp(r.expires_at_us)),
        bill_id: r.request_id.into_string(),
        requester_id: r.requester_id.into_string(),
        payer_id: r.payer_id.into_string(),
        note: r.note,
        conversation_id: r.conversation_id,
        message_id: r.message_id,
        payment_id: r.payment_id.map(|p| p.into_string()).unwrap_or_default(),
    }
}
