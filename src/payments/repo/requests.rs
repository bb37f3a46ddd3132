//! Bills' rows (`payment_requests`) and their events.

use super::rows::{append_event, EventFields, RequestRow, REQUEST_COLUMNS};
use super::PaymentStore;
use crate::kernel::error::Result;
use crate::payments::model::{PaymentRequest, RequestStatus};
use crate::with_db;

/// How closing an open request ended.
pub(crate) enum Closed {
    Done(PaymentRequest),
    NotOpen,
    /// A payment of the request (this id) is still pending.
    PaymentInFlight(String),
}

impl PaymentStore {
    /// Records a new open request under its key, with its `request.created` event, in
    /// one transaction. A unique violation means the key was taken first.
    pub(crate) async fn insert_request(
        &self,
        req: &PaymentRequest,
        idempotency_key: &str,
        request_hash: &str,
    ) -> std::result::Result<(), sqlx::Error> {
        with_db!(&self.writer, pool => async {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO payment_requests (request_id, requester_id, payer_id, currency, amount, note, conversation_id, \
                 message_id, status, idempotency_key, request_hash, created_at_us, expires_at_us, updated_at_us) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'open', $9, $10, $11, $12, $11)",
            )
            .bind(&req.request_id)
            .bind(&req.requester_id)
            .bind(&req.payer_id)
            .bind(req.currency().code())
            .bind(req.amount.minor())
            .bind(&req.note)
            .bind(&req.conversation_id)
            .bind(&req.message_id)
            .bind(idempotency_key)
            .bind(request_hash)
            .bind(req.created_at_us)
            .bind(req.expires_at_us)
            .execute(&mut *tx)
            .await?;
            append_event!(tx, self.clock.now_us(), &EventFields::request("request.created", req));
            tx.commit().await?;
            Ok::<_, sqlx::Error>(())
        }
        .await)
    }

    /// open -> `to` with its event, in one transaction: `Closed::NotOpen` if it was not
    /// open, `Closed::PaymentInFlight` if a payment of it is still pending (see
    /// `Payments::transition` for the rule and its lock order).
    pub(crate) async fn close_open_request(
        &self,
        request_id: &crate::kernel::ids::RequestId,
        to: RequestStatus,
        event: &'static str,
    ) -> Result<Closed> {
        let sql = format!(
            "UPDATE payment_requests SET status = $2, updated_at_us = $3 WHERE request_id = $1 AND status = 'open' \
             RETURNING {REQUEST_COLUMNS}"
        );
        let closed: Closed = with_db!(&self.writer, pool => async {
            let mut tx = pool.begin().await?;
            let row: Option<RequestRow> =
                sqlx::query_as(&sql).bind(request_id).bind(to.as_str()).bind(self.clock.now_us()).fetch_optional(&mut *tx).await?;
            let Some(row) = row else { return Ok(Closed::NotOpen) };
            let in_flight: Option<String> = sqlx::query_scalar(
                "SELECT payment_id FROM payments WHERE request_id = $1 AND status <> 'failed' AND status = 'pending'",
            )
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(payment_id) = in_flight {
                // Dropping the transaction rolls the status change back.
                return Ok(Closed::PaymentInFlight(payment_id));
            }
            let updated = PaymentRequest::try_from(row).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            append_event!(tx, self.clock.now_us(), &EventFields::request(event, &updated));
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Closed::Done(updated))
        }
        .await)?;
        Ok(closed)
    }
}
