//! Payment requests: a requester asks a payer in a DM; the payer pays with one tap
//! (at most once), declines, or lets it expire; the requester may cancel.

use super::model::{PaymentRequest, RequestStatus};
use super::repo::requests::Closed;
use super::repo::rows::{RequestRow, REQUEST_COLUMNS};
use super::{model, FundingSource, Payment, Payments, SendInput};
use crate::accounts::Status as AccountStatus;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{RequestId, UserId};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::store::is_unique_violation;
use crate::with_db;

pub const EXPIRES_DEFAULT_S: u32 = 7 * 86_400;
pub const EXPIRES_MAX_S: u32 = 30 * 86_400;

/// `RequestPayment` after wire parsing.
pub struct RequestInput {
    pub idempotency_key: String,
    pub payer: UserId,
    pub amount: Money,
    pub note: String,
    pub conversation_id: String,
    pub message_id: String,
    pub expires_in_s: u32,
}

fn not_found(id: &RequestId) -> Error {
    Error::NotFound(format!("payment request {id} not found"))
}

impl Payments {
    async fn request_row(&self, request_id: &RequestId) -> Result<Option<PaymentRequest>> {
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM payment_requests WHERE request_id = $1");
        let row: Option<RequestRow> =
            with_db!(self.store.db(), pool => sqlx::query_as(&sql).bind(request_id).fetch_optional(pool).await)?;
        row.map(PaymentRequest::try_from).transpose()
    }

    /// A request the user takes part in; others get NOT_FOUND.
    pub async fn get_request(&self, user: &UserId, request_id: &RequestId) -> Result<PaymentRequest> {
        if request_id.as_str().is_empty() {
            return Err(Error::invalid("request_id", "required"));
        }
        match self.request_row(request_id).await? {
            Some(r) if r.requester_id == *user || r.payer_id == *user => Ok(r),
            _ => Err(not_found(request_id)),
        }
    }

    /// `ListBills`: the user's bills as payer (or as requester), newest first.
    pub async fn list_requests(
        &self,
        user: &UserId,
        as_requester: bool,
        open_only: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<PaymentRequest>, Option<String>)> {
        let page = crate::kernel::page::Page::parse(page_size, 50, 200, page_token, "req_")?;
        // Two spellings rather than a column chosen by a parameter, so that each reads
        // its own index ((payer_id | requester_id, created_at_us)).
        let who = if as_requester { "requester_id" } else { "payer_id" };
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM payment_requests WHERE {who} = $1 AND ($2 = 0 OR status = 'open') \
             AND (created_at_us < $3 OR (created_at_us = $3 AND request_id < $4)) \
             ORDER BY created_at_us DESC, request_id DESC LIMIT $5"
        );
        let rows: Vec<RequestRow> = with_db!(self.store.db(), pool => sqlx::query_as(&sql)
            .bind(user.as_str())
            .bind(i32::from(open_only))
            .bind(page.before.0)
            .bind(&page.before.1)
            .bind(page.limit())
            .fetch_all(pool)
            .await)?;
        let mut rows: Vec<PaymentRequest> = rows.into_iter().map(PaymentRequest::try_from).collect::<Result<_>>()?;
        let next = page.finish(&mut rows, |r| (r.created_at_us, r.request_id.to_string()));
        Ok((rows, next))
    }

    pub async fn request(&self, requester: &UserId, input: RequestInput) -> Result<PaymentRequest> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        model::check_note("note", &input.note)?;
        model::check_opaque("conversation_id", &input.conversation_id)?;
        model::check_opaque("message_id", &input.message_id)?;
        if input.expires_in_s > EXPIRES_MAX_S {
            return Err(Error::invalid("expires_in_seconds", format!("at most {EXPIRES_MAX_S} (30 days)")));
        }
        if &input.payer == requester {
            return Err(Error::invalid("payer_id", "you cannot request money from yourself"));
        }
        let expires_in = if input.expires_in_s == 0 { EXPIRES_DEFAULT_S } else { input.expires_in_s };
        let currency = input.amount.currency();
        let request_hash = crate::ledger::hash_request(&serde_json::json!({
            "payer": input.payer.as_str(), "currency": currency.code(), "amount": input.amount.minor(),
            "note": input.note, "conversation": input.conversation_id, "message": input.message_id,
            "expires": expires_in,
        }));
        let by_key = format!(
            "SELECT {REQUEST_COLUMNS}, request_hash FROM payment_requests WHERE requester_id = $1 AND idempotency_key = $2"
        );
        let lookup = || async {
            let found: Option<RequestRowWithHash> = with_db!(self.store.db(), pool => sqlx::query_as(&by_key)
                .bind(requester.as_str())
                .bind(&input.idempotency_key)
                .fetch_optional(pool)
                .await)?;
            found.map(|f| Ok::<_, Error>((PaymentRequest::try_from(f.row)?, f.request_hash))).transpose()
        };
        let replay = |(r, hash): (PaymentRequest, String)| {
            if hash == request_hash {
                Ok(r)
            } else {
                Err(Error::AlreadyExists(format!(
                    "idempotency_key {:?} was already used for a different request",
                    input.idempotency_key
                )))
            }
        };
        if let Some(found) = lookup().await? {
            return replay(found);
        }
        self.require_user("payer_id", &input.payer).await?;
        let me = self.accounts.ensure(requester).await?;
        if me.status == AccountStatus::Frozen {
            return Err(Error::FailedPrecondition {
                reason: Reason::AccountFrozen,
                message: "your account is frozen".into(),
            });
        }
        let now = self.now_us();
        let req = PaymentRequest {
            request_id: RequestId::generate(),
            requester_id: requester.clone(),
            payer_id: input.payer.clone(),
            amount: input.amount,
            note: input.note.clone(),
            conversation_id: input.conversation_id.clone(),
            message_id: input.message_id.clone(),
            status: RequestStatus::Open,
            payment_id: None,
            created_at_us: now,
            expires_at_us: now + i64::from(expires_in) * 1_000_000,
        };
        let inserted = self.store.insert_request(&req, &input.idempotency_key, &request_hash).await;
        match inserted {
            Ok(()) => {
                self.store.notify();
                Ok(req)
            }
            Err(e) if is_unique_violation(&e) => replay(
                lookup()
                    .await?
                    .ok_or_else(|| Error::internal(anyhow::anyhow!("request key conflict without a row")))?,
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves an open request to `to`, by `actor`, who must be `party` of it.
    async fn close_request(&self, actor: &UserId, request_id: &RequestId, to: RequestStatus) -> Result<PaymentRequest> {
        let req = self.get_request(actor, request_id).await?;
        let allowed = match to {
            RequestStatus::Declined => req.payer_id == *actor,
            RequestStatus::Cancelled => req.requester_id == *actor,
            _ => false,
        };
        if !allowed {
            return Err(Error::PermissionDenied(match to {
                RequestStatus::Declined => "only the payer can decline a request".into(),
                _ => "only the requester can cancel a request".into(),
            }));
        }
        if req.status == to {
            return Ok(req);
        }
        let event = if to == RequestStatus::Declined { "request.declined" } else { "request.cancelled" };
        match self.transition(&req, to, event).await? {
            Closed::Done(updated) => Ok(updated),
            Closed::NotOpen => {
                // Closed or paid since it was read: answer with what it is now.
                let now = self.request_row(request_id).await?.ok_or_else(|| not_found(request_id))?;
                if now.status == to {
                    return Ok(now);
                }
                Err(Error::FailedPrecondition {
                    reason: Reason::RequestNotOpen,
                    message: format!("the request is {}", now.status.as_str()),
                })
            }
            Closed::PaymentInFlight(payment_id) => Err(Error::FailedPrecondition {
                reason: Reason::RequestPaymentInProgress,
                message: format!(
                    "payment {payment_id} of this request is being processed; it settles (and the request is paid) \
                     or fails (and the request can be closed) shortly"
                ),
            }),
        }
    }

    /// open -> `to` with its event, in one transaction. `Closed::NotOpen` if it was not
    /// open; `Closed::PaymentInFlight` if a payment of it is still pending.
    ///
    /// The rule for a request being paid: it cannot close under a payment in flight.
    /// The update locks the request row first, and only then looks for a pending
    /// payment (a statement of its own, so on PostgreSQL it sees every payment committed
    /// before the lock was granted); a payment's insert takes the same row lock
    /// (`PaymentStore::insert`), so either the payment is recorded first and the close
    /// is refused, or the close commits first and the payment is refused.
    async fn transition(&self, req: &PaymentRequest, to: RequestStatus, event: &'static str) -> Result<Closed> {
        let closed = self.store.close_open_request(&req.request_id, to, event).await?;
        if matches!(closed, Closed::Done(_)) {
            self.store.notify();
        }
        Ok(closed)
    }

    pub async fn decline_request(&self, payer: &UserId, request_id: &RequestId) -> Result<PaymentRequest> {
        self.close_request(payer, request_id, RequestStatus::Declined).await
    }

    pub async fn cancel_request(&self, requester: &UserId, request_id: &RequestId) -> Result<PaymentRequest> {
        self.close_request(requester, request_id, RequestStatus::Cancelled).await
    }

    /// The one-tap pay of a request by its payer: a send to the requester, linked to the
    /// request, which the database lets succeed at most once.
    pub async fn pay_request(
        &self,
        payer: &UserId,
        request_id: &RequestId,
        idempotency_key: String,
        funding: FundingSource,
        token: Option<String>,
    ) -> Result<Payment> {
        let req = self.get_request(payer, request_id).await?;
        if req.payer_id != *payer {
            return Err(Error::PermissionDenied("only the payer can pay a request".into()));
        }
        let input = SendInput {
            idempotency_key,
            recipient: req.requester_id.clone(),
            amount: req.amount,
            note: req.note.clone(),
            conversation_id: req.conversation_id.clone(),
            message_id: req.message_id.clone(),
            funding,
            payment_method_token: token,
            request_id: Some(req.request_id.clone()),
        };
        let request_hash = input.request_hash();
        // A retry of the pay that went through returns that payment; the same key with
        // another request, funding source or card is refused, as for every write.
        let replay = |(existing, hash): (Payment, String)| {
            if hash == request_hash {
                Self::replay(existing)
            } else {
                Err(super::key_reused(&input.idempotency_key))
            }
        };
        if let Some(found) = self.store.by_key(payer, &input.idempotency_key).await? {
            return replay(found);
        }
        self.check_not_owing(payer)?;
        let refusal = match req.status {
            RequestStatus::Open if req.expires_at_us > self.now_us() => None,
            RequestStatus::Open => Some(Error::FailedPrecondition {
                reason: Reason::RequestExpired,
                message: "the request has expired".into(),
            }),
            other => Some(Error::FailedPrecondition {
                reason: Reason::RequestNotOpen,
                message: format!("the request is {}", other.as_str()),
            }),
        };
        if let Some(refusal) = refusal {
            // A concurrent pay with this key may have paid it since the lookup above:
            // answer as it did.
            if let Some(found) = self.store.by_key(payer, &input.idempotency_key).await? {
                return replay(found);
            }
            return Err(refusal);
        }
        self.send(payer, input).await
    }

    /// Expires open requests past their time, each with its event.
    pub async fn expire_requests(&self) -> Result<usize> {
        // A request with a payment in flight expires only once that payment has failed
        // (`transition`); leaving those out keeps them from filling every pass.
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM payment_requests r WHERE status = 'open' AND expires_at_us <= $1 \
             AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.request_id = r.request_id AND p.status <> 'failed' \
                             AND p.status = 'pending') \
             ORDER BY expires_at_us, request_id LIMIT 200"
        );
        let rows: Vec<RequestRow> =
            with_db!(self.store.db(), pool => sqlx::query_as(&sql).bind(self.now_us()).fetch_all(pool).await)?;
        let mut n = 0;
        for row in rows {
            let req = PaymentRequest::try_from(row)?;
            // A request with a payment in flight expires once that payment fails (a
            // later pass), or is paid when it settles.
            if matches!(self.transition(&req, RequestStatus::Expired, "request.expired").await?, Closed::Done(_)) {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// How a close of an open request ended.

#[derive(sqlx::FromRow)]
struct RequestRowWithHash {
    #[sqlx(flatten)]
    row: RequestRow,
    request_hash: String,
}
