//! `dmpay.v1.Payments`.

use std::sync::Arc;

use tonic::{Request, Response};

use super::money::{positive, to_wire};
use super::payment_wire::{bill_to_wire, payment_to_wire, payout_speed_from_wire, payout_to_wire};
use super::pb;
use super::status::ApiResult;
use super::watch::{self, WatchStream, Watchers};
use super::{principal, to_status};
use crate::auth::{scope, Principal};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PaymentId, PayoutId, RequestId, UserId};
use crate::kernel::money::Money;
use crate::payments::feed::Feed;
use crate::payments::requests::RequestInput;
use crate::payments::{model, FundingSource, Payments, SendInput};

pub struct PaymentsApi {
    payments: Arc<Payments>,
    feed: Feed,
    watchers: Watchers,
}

impl PaymentsApi {
    pub fn new(payments: Arc<Payments>, feed: Feed, watchers: Watchers) -> Self {
        PaymentsApi { payments, feed, watchers }
    }
}

fn user(caller: &Principal, needed: &str) -> Result<UserId> {
    caller.require(needed)?;
    UserId::parse("sub", &caller.sub)
}

fn funding_from_wire(raw: i32) -> Result<FundingSource> {
    match pb::FundingSource::try_from(raw) {
        // Unspecified is AUTO: the one-tap default of a chat client that sends nothing.
        Ok(pb::FundingSource::Unspecified | pb::FundingSource::Auto) => Ok(FundingSource::Auto),
        Ok(pb::FundingSource::Balance) => Ok(FundingSource::Balance),
        Ok(pb::FundingSource::Card) => Ok(FundingSource::Card),
        Err(_) => Err(Error::invalid("funding_source", format!("unknown funding source {raw}"))),
    }
}

#[tonic::async_trait]
impl pb::payments_server::Payments for PaymentsApi {
    async fn send_payment(&self, req: Request<pb::SendPaymentRequest>) -> ApiResult<pb::Payment> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let sender = user(caller, scope::PAYMENTS_WRITE)?;
            super::id("payment_method_token", &r.payment_method_token)?;
            let input = SendInput {
                idempotency_key: r.idempotency_key.clone(),
                recipient: model::parse_recipient(&r.recipient_id)?,
                amount: positive("amount", r.amount.as_ref(), self.payments.ledger().accounts().currencies())?,
                note: r.note.clone(),
                conversation_id: r.conversation_id.clone(),
                message_id: r.message_id.clone(),
                funding: funding_from_wire(r.funding_source)?,
                payment_method_token: (!r.payment_method_token.is_empty()).then(|| r.payment_method_token.clone()),
                request_id: None,
            };
            Ok(payment_to_wire(self.payments.send(&sender, input).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_payment(&self, req: Request<pb::GetPaymentRequest>) -> ApiResult<pb::Payment> {
        let caller = principal(&req)?;
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            Ok(payment_to_wire(
                self.payments.get(&me, &PaymentId::parse("payment_id", &req.get_ref().payment_id)?).await?,
            ))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_payments(&self, req: Request<pb::ListPaymentsRequest>) -> ApiResult<pb::ListPaymentsResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            let (rows, next) = self.payments.list(&me, &r.conversation_id, r.page_size, &r.page_token).await?;
            Ok(pb::ListPaymentsResponse {
                payments: rows.into_iter().map(payment_to_wire).collect(),
                next_page_token: next.unwrap_or_default(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_balance(&self, req: Request<pb::GetBalanceRequest>) -> ApiResult<pb::Balance> {
        let caller = principal(&req)?;
        let code = &req.get_ref().currency;
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            let accounts = self.payments.ledger().accounts();
            let currency = accounts.currencies().parse("currency", code)?;
            // Reading is not a first use: a wallet that does not exist yet reads as zero.
            let code = crate::ledger::AccountCode::wallet(&me, currency);
            let balance = match accounts.resolve("currency", &code, false).await {
                Ok(w) => accounts.balance(w.id).await?,
                Err(Error::NotFound(_)) => crate::ledger::Balance::default(),
                Err(e) => return Err(e),
            };
            let posted = balance.posted(true).unwrap_or(0);
            Ok(pb::Balance {
                currency: currency.code().to_owned(),
                posted: Some(to_wire(Money::from_minor(currency, posted))),
                pending: Some(to_wire(Money::from_minor(currency, balance.pending_debits))),
                available: Some(to_wire(Money::from_minor(currency, balance.available(true).unwrap_or(0)))),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn request_payment(&self, req: Request<pb::RequestPaymentRequest>) -> ApiResult<pb::Bill> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let requester = user(caller, scope::PAYMENTS_WRITE)?;
            let input = RequestInput {
                idempotency_key: r.idempotency_key.clone(),
                payer: UserId::parse("payer_id", &r.payer_id)?,
                amount: positive("amount", r.amount.as_ref(), self.payments.ledger().accounts().currencies())?,
                note: r.note.clone(),
                conversation_id: r.conversation_id.clone(),
                message_id: r.message_id.clone(),
                expires_in_s: r.expires_in_seconds,
            };
            Ok(bill_to_wire(self.payments.request(&requester, input).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn pay_bill(&self, req: Request<pb::PayBillRequest>) -> ApiResult<pb::Payment> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let payer = user(caller, scope::PAYMENTS_WRITE)?;
            crate::ledger::check_idempotency_key("idempotency_key", &r.idempotency_key)?;
            let funding = funding_from_wire(r.funding_source)?;
            let token = (!r.payment_method_token.is_empty()).then(|| r.payment_method_token.clone());
            let request_id = &RequestId::parse("bill_id", &r.bill_id)?;
            super::id("payment_method_token", &r.payment_method_token)?;
            let paid = self.payments.pay_request(&payer, request_id, r.idempotency_key.clone(), funding, token).await?;
            Ok(payment_to_wire(paid))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn decline_bill(&self, req: Request<pb::DeclineBillRequest>) -> ApiResult<pb::Bill> {
        let caller = principal(&req)?;
        let result = async {
            let me = user(caller, scope::PAYMENTS_WRITE)?;
            Ok(bill_to_wire(
                self.payments.decline_request(&me, &RequestId::parse("bill_id", &req.get_ref().bill_id)?).await?,
            ))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn cancel_bill(&self, req: Request<pb::CancelBillRequest>) -> ApiResult<pb::Bill> {
        let caller = principal(&req)?;
        let result = async {
            let me = user(caller, scope::PAYMENTS_WRITE)?;
            Ok(bill_to_wire(
                self.payments.cancel_request(&me, &RequestId::parse("bill_id", &req.get_ref().bill_id)?).await?,
            ))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_bill(&self, req: Request<pb::GetBillRequest>) -> ApiResult<pb::Bill> {
        let caller = principal(&req)?;
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            Ok(bill_to_wire(
                self.payments.get_request(&me, &RequestId::parse("bill_id", &req.get_ref().bill_id)?).await?,
            ))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_bills(&self, req: Request<pb::ListBillsRequest>) -> ApiResult<pb::ListBillsResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            let as_requester = match pb::BillRole::try_from(r.role) {
                Ok(pb::BillRole::Unspecified | pb::BillRole::Payer) => false,
                Ok(pb::BillRole::Requester) => true,
                Err(_) => return Err(Error::invalid("role", "unknown role")),
            };
            let (rows, next) =
                self.payments.list_requests(&me, as_requester, r.open_only, r.page_size, &r.page_token).await?;
            Ok(pb::ListBillsResponse {
                bills: rows.into_iter().map(bill_to_wire).collect(),
                next_page_token: next.unwrap_or_default(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn refund_payment(&self, req: Request<pb::RefundPaymentRequest>) -> ApiResult<pb::Payment> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let me = user(caller, scope::PAYMENTS_WRITE)?;
            let amount = super::money::optional_positive(
                "amount",
                r.amount.as_ref(),
                self.payments.ledger().accounts().currencies(),
            )?;
            let payment_id = &PaymentId::parse("payment_id", &r.payment_id)?;
            Ok(payment_to_wire(self.payments.refund(&me, payment_id, &r.idempotency_key, amount, &r.reason).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    type WatchPaymentsStream = WatchStream;

    async fn watch_payments(&self, req: Request<pb::WatchPaymentsRequest>) -> ApiResult<Self::WatchPaymentsStream> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let user = if caller.has(scope::PAYMENTS_WATCH_ALL) {
            None
        } else {
            Some(user(caller, scope::PAYMENTS_READ).map_err(to_status)?.to_string())
        };
        model::check_opaque("conversation_id", &r.conversation_id).map_err(to_status)?;
        // A stream's events are kept under its channel in the conversation column.
        let conversation = match (r.conversation_id.is_empty(), r.stream_id.is_empty()) {
            (_, true) => r.conversation_id.clone(),
            (true, false) => {
                crate::payments::listing::check_stream_id("stream_id", &r.stream_id).map_err(to_status)?;
                crate::payments::listing::stream_channel(&r.stream_id)
            }
            (false, false) => {
                return Err(to_status(Error::invalid("stream_id", "give conversation_id or stream_id, not both")))
            }
        };
        if r.after_sequence < 0 {
            return Err(to_status(Error::invalid("after_sequence", "must not be negative")));
        }
        let permit = self.watchers.admit(&caller.sub).map_err(to_status)?;
        let stream = watch::start(
            self.payments.clone(),
            self.watchers.metrics().clone(),
            &self.feed,
            user,
            conversation,
            r.after_sequence,
            permit,
        );
        Ok(Response::new(stream))
    }

    async fn create_payout(&self, req: Request<pb::CreatePayoutRequest>) -> ApiResult<pb::Payout> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let me = user(caller, scope::PAYMENTS_WRITE)?;
            super::id("payment_method_token", &r.payment_method_token)?;
            let input = crate::payments::payouts::PayoutInput {
                idempotency_key: r.idempotency_key.clone(),
                amount: positive("amount", r.amount.as_ref(), self.payments.ledger().accounts().currencies())?,
                speed: payout_speed_from_wire(r.speed)?,
                payment_method_token: (!r.payment_method_token.is_empty()).then(|| r.payment_method_token.clone()),
            };
            Ok(payout_to_wire(self.payments.create_payout(&me, input).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_payout(&self, req: Request<pb::GetPayoutRequest>) -> ApiResult<pb::Payout> {
        let caller = principal(&req)?;
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            let id = PayoutId::parse("payout_id", &req.get_ref().payout_id)?;
            Ok(payout_to_wire(self.payments.get_payout(&me, &id).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_payouts(&self, req: Request<pb::ListPayoutsRequest>) -> ApiResult<pb::ListPayoutsResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let me = user(caller, scope::PAYMENTS_READ)?;
            let (rows, next) = self.payments.list_payouts(&me, r.page_size, &r.page_token).await?;
            Ok(pb::ListPayoutsResponse {
                payouts: rows.into_iter().map(payout_to_wire).collect(),
                next_page_token: next.unwrap_or_default(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }
}
