//! Payments, requests and their events on the wire.

use super::money::to_wire;
use super::pb;
use super::timestamp;
use crate::kernel::error::Result;
use crate::kernel::money::Money;
use crate::payments::events;
use crate::payments::model::{PaymentRequest, RequestStatus};
use crate::payments::{Payment, PaymentStatus};

pub(super) fn event_to_wire(e: events::Event) -> Result<pb::PaymentEvent> {
    Ok(pb::PaymentEvent {
        sequence: e.sequence,
        r#type: e.event_type,
        payment: e.payment.map(payment_to_wire).transpose()?,
        request: e.request.map(request_to_wire).transpose()?,
        occurred_at: Some(timestamp(e.occurred_at_us)),
    })
}

pub(crate) fn payment_to_wire(p: Payment) -> Result<pb::Payment> {
    let currency = p.currency()?;
    let money = |minor: i64| Some(to_wire(Money::from_minor(currency, minor)));
    Ok(pb::Payment {
        amount: money(p.amount),
        card_funded_amount: money(p.card_amount),
        refunded_amount: money(p.refunded_amount),
        fee: money(p.fee_amount),
        status: match p.status {
            PaymentStatus::Pending => pb::PaymentStatus::Pending,
            PaymentStatus::Settled => pb::PaymentStatus::Settled,
            PaymentStatus::Failed => pb::PaymentStatus::Failed,
            PaymentStatus::PartiallyRefunded => pb::PaymentStatus::PartiallyRefunded,
            PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
        } as i32,
        created_at: Some(timestamp(p.created_at_us)),
        settled_at: p.settled_at_us.map(timestamp),
        payment_id: p.payment_id,
        sender_id: p.sender_id,
        recipient_id: p.recipient_id,
        note: p.note,
        conversation_id: p.conversation_id,
        message_id: p.message_id,
        request_id: p.request_id.unwrap_or_default(),
        failure_reason: p.failure_reason,
    })
}

pub(crate) fn request_to_wire(r: PaymentRequest) -> Result<pb::PaymentRequest> {
    let currency = r.currency()?;
    Ok(pb::PaymentRequest {
        amount: Some(to_wire(Money::from_minor(currency, r.amount))),
        status: match r.status {
            RequestStatus::Open => pb::RequestStatus::Open,
            RequestStatus::Paid => pb::RequestStatus::Paid,
            RequestStatus::Declined => pb::RequestStatus::Declined,
            RequestStatus::Cancelled => pb::RequestStatus::Cancelled,
            RequestStatus::Expired => pb::RequestStatus::Expired,
        } as i32,
        created_at: Some(timestamp(r.created_at_us)),
        expires_at: Some(timestamp(r.expires_at_us)),
        request_id: r.request_id,
        requester_id: r.requester_id,
        payer_id: r.payer_id,
        note: r.note,
        conversation_id: r.conversation_id,
        message_id: r.message_id,
        payment_id: r.payment_id.unwrap_or_default(),
    })
}
