//! `dmpay.v1.Shopping`: live-stream listings, one-tap purchases, sellers' money.

use std::sync::Arc;

use tonic::{Request, Response};

use super::money::{optional_positive, positive, to_wire};
use super::pb;
use super::status::ApiResult;
use super::{principal, timestamp, timestamp_us, to_status};
use crate::auth::{scope, Principal};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{ListingId, PurchaseId, TabId, UserId};
use crate::payments::shop::{self, Actor, Listing, ListingStatus, NewListing, Purchase, PurchaseStatus};
use crate::payments::Payments;

pub struct ShoppingApi {
    payments: Arc<Payments>,
}

impl ShoppingApi {
    pub fn new(payments: Arc<Payments>) -> Self {
        ShoppingApi { payments }
    }

    fn now_us(&self) -> i64 {
        self.payments.now_us()
    }
}

fn me(caller: &Principal, needed: &str) -> Result<UserId> {
    caller.require(needed)?;
    UserId::parse("sub", &caller.sub)
}

/// The seller a call acts for: `seller_id` (empty: the caller). Another seller needs
/// `shopping:admin`; a seller acting for themselves needs `needed`.
fn seller_of(caller: &Principal, seller_id: &str, needed: &str) -> Result<(UserId, bool)> {
    if caller.has(scope::SHOPPING_ADMIN) {
        let id = if seller_id.is_empty() { &caller.sub } else { seller_id };
        return Ok((UserId::parse("seller_id", id)?, true));
    }
    let me = me(caller, needed)?;
    if !seller_id.is_empty() && seller_id != me.as_str() {
        return Err(Error::PermissionDenied(format!(
            "acting for another seller needs the {} scope",
            scope::SHOPPING_ADMIN
        )));
    }
    Ok((me, false))
}

/// The actor of a call on an existing listing or purchase.
fn actor(caller: &Principal, needed: &str) -> Result<(Option<UserId>, bool)> {
    if caller.has(scope::SHOPPING_ADMIN) {
        return Ok((None, true));
    }
    Ok((Some(me(caller, needed)?), false))
}

fn optional_time(field: &str, ts: Option<&prost_types::Timestamp>) -> Result<Option<i64>> {
    ts.map(|t| timestamp_us(field, t)).transpose()
}

pub(crate) fn listing_to_wire(l: Listing, now_us: i64) -> pb::Listing {
    let status = match l.status(now_us) {
        ListingStatus::Scheduled => pb::ListingStatus::Scheduled,
        ListingStatus::Open => pb::ListingStatus::Open,
        ListingStatus::SoldOut => pb::ListingStatus::SoldOut,
        ListingStatus::Closed => pb::ListingStatus::Closed,
    };
    pb::Listing {
        listing_id: l.listing_id.to_string(),
        seller_id: l.seller_id.to_string(),
        stream_id: l.stream_id,
        title: l.title,
        unit_price: Some(to_wire(l.unit_price)),
        quantity: l.quantity.unwrap_or(0),
        unlimited: l.quantity.is_none(),
        sold: l.sold,
        per_buyer_max: l.per_buyer_max,
        starts_at: l.starts_at_us.map(timestamp),
        ends_at: l.ends_at_us.map(timestamp),
        closed_at: l.closed_at_us.map(timestamp),
        created_at: Some(timestamp(l.created_at_us)),
        status: status as i32,
    }
}

fn purchase_funding(raw: i32) -> Result<crate::payments::model::FundingSource> {
    use crate::payments::model::FundingSource;
    match pb::PurchaseFundingSource::try_from(raw) {
        Ok(pb::PurchaseFundingSource::Unspecified | pb::PurchaseFundingSource::Auto) => Ok(FundingSource::Auto),
        Ok(pb::PurchaseFundingSource::Balance) => Ok(FundingSource::Balance),
        Ok(pb::PurchaseFundingSource::Card) => Ok(FundingSource::Card),
        Err(_) => Err(Error::invalid("funding_source", format!("unknown funding source {raw}"))),
    }
}

pub(crate) fn purchase_to_wire(p: Purchase, listing_sold: i64) -> pb::PurchaseReceipt {
    let status = match p.status() {
        PurchaseStatus::Paid => pb::PurchaseStatus::Paid,
        PurchaseStatus::PartiallyRefunded => pb::PurchaseStatus::PartiallyRefunded,
        PurchaseStatus::Refunded => pb::PurchaseStatus::Refunded,
    };
    pb::PurchaseReceipt {
        purchase_id: p.purchase_id.to_string(),
        listing_id: p.listing_id.to_string(),
        buyer_id: p.buyer_id.to_string(),
        seller_id: p.seller_id.to_string(),
        stream_id: p.stream_id.clone(),
        quantity: p.quantity,
        unit_price: Some(to_wire(p.unit_price)),
        amount: Some(to_wire(p.amount)),
        commission: Some(to_wire(p.commission)),
        refunded_amount: Some(to_wire(p.refunded_amount)),
        restocked: p.restocked,
        status: status as i32,
        available_at: Some(timestamp(p.available_at_us)),
        released: p.hold == crate::payments::listing::Hold::Released,
        created_at: Some(timestamp(p.created_at_us)),
        listing_sold,
        tab_id: p.tab_id.map(|t| t.into_string()).unwrap_or_default(),
        wallet_amount: Some(to_wire(p.wallet_amount)),
        card_amount: Some(to_wire(p.card_amount)),
        fee_amount: Some(to_wire(p.fee_amount)),
    }
}

pub(crate) fn tab_to_wire(t: crate::payments::listing::Tab) -> pb::Tab {
    use crate::payments::listing::TabStatus as S;
    let status = match t.status {
        S::Opening => pb::TabStatus::Opening,
        S::Open => pb::TabStatus::Open,
        S::Closing => pb::TabStatus::Closing,
        S::Closed => pb::TabStatus::Closed,
        S::Failed => pb::TabStatus::Failed,
    };
    let currency = t.cap.currency();
    pb::Tab {
        tab_id: t.tab_id.into_string(),
        buyer_id: t.buyer_id.into_string(),
        stream_id: t.stream_id,
        cap: Some(to_wire(t.cap)),
        spent: Some(to_wire(t.spent)),
        status: status as i32,
        captured: t.captured.map(|c| to_wire(crate::kernel::money::Money::from_minor(currency, c))),
        failure_reason: t.failure_reason,
        failure_message: t.failure_message,
        expires_at: Some(timestamp(t.expires_at_us)),
        created_at: Some(timestamp(t.created_at_us)),
        closed_at: t.closed_at_us.map(timestamp),
    }
}

#[tonic::async_trait]
impl pb::shopping_server::Shopping for ShoppingApi {
    async fn create_listing(&self, req: Request<pb::CreateListingRequest>) -> ApiResult<pb::Listing> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let (seller_id, _) = seller_of(caller, &r.seller_id, scope::PAYMENTS_WRITE)?;
            let title =
                crate::kernel::text::parse_text("title", &r.title, crate::payments::listing::TITLE_LEN_MAX, true)?;
            let unit_price =
                positive("unit_price", r.unit_price.as_ref(), self.payments.ledger().accounts().currencies())?;
            let quantity = match (r.unlimited, r.quantity) {
                (true, 0) => None,
                (true, _) => return Err(Error::invalid("quantity", "must be 0 when unlimited is set")),
                (false, q) => Some(q),
            };
            if r.per_buyer_max < 0 {
                return Err(Error::invalid("per_buyer_max", "must not be negative"));
            }
            let input = NewListing {
                idempotency_key: r.idempotency_key.clone(),
                seller_id,
                stream_id: r.stream_id.clone(),
                title,
                unit_price,
                quantity,
                per_buyer_max: r.per_buyer_max,
                starts_at_us: optional_time("starts_at", r.starts_at.as_ref())?,
                ends_at_us: optional_time("ends_at", r.ends_at.as_ref())?,
            };
            Ok(listing_to_wire(self.payments.create_listing(input).await?, self.now_us()))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn add_stock(&self, req: Request<pb::AddStockRequest>) -> ApiResult<pb::Listing> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let (me, _) = actor(caller, scope::PAYMENTS_WRITE)?;
            let id = ListingId::parse("listing_id", &r.listing_id)?;
            let actor = me.as_ref().map_or(Actor::Platform, Actor::Seller);
            let l = self.payments.add_stock(&actor, &id, r.quantity, &r.idempotency_key).await?;
            Ok(listing_to_wire(l, self.now_us()))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn close_listing(&self, req: Request<pb::CloseListingRequest>) -> ApiResult<pb::Listing> {
        let caller = principal(&req)?;
        let result = async {
            let (me, _) = actor(caller, scope::PAYMENTS_WRITE)?;
            let id = ListingId::parse("listing_id", &req.get_ref().listing_id)?;
            let actor = me.as_ref().map_or(Actor::Platform, Actor::Seller);
            Ok(listing_to_wire(self.payments.close_listing(&actor, &id).await?, self.now_us()))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_listing(&self, req: Request<pb::GetListingRequest>) -> ApiResult<pb::Listing> {
        let caller = principal(&req)?;
        let result = async {
            actor(caller, scope::PAYMENTS_READ)?;
            let id = ListingId::parse("listing_id", &req.get_ref().listing_id)?;
            Ok(listing_to_wire(self.payments.listing(&id).await?, self.now_us()))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_listings(&self, req: Request<pb::ListListingsRequest>) -> ApiResult<pb::ListListingsResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            actor(caller, scope::PAYMENTS_READ)?;
            let (rows, next) = self.payments.listings(&r.stream_id, r.page_size, &r.page_token).await?;
            let now = self.now_us();
            Ok(pb::ListListingsResponse {
                listings: rows.into_iter().map(|l| listing_to_wire(l, now)).collect(),
                next_page_token: next.unwrap_or_default(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn purchase(&self, req: Request<pb::PurchaseRequest>) -> ApiResult<pb::PurchaseReceipt> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let buyer = me(caller, scope::PAYMENTS_WRITE)?;
            let input = shop::PurchaseInput {
                idempotency_key: r.idempotency_key.clone(),
                listing_id: ListingId::parse("listing_id", &r.listing_id)?,
                quantity: r.quantity,
                unit_price: optional_positive(
                    "unit_price",
                    r.unit_price.as_ref(),
                    self.payments.ledger().accounts().currencies(),
                )?,
                tab_id: (!r.tab_id.is_empty()).then(|| TabId::parse("tab_id", &r.tab_id)).transpose()?,
                funding: purchase_funding(r.funding_source)?,
                payment_method_token: {
                    super::id("payment_method_token", &r.payment_method_token)?;
                    (!r.payment_method_token.is_empty()).then(|| r.payment_method_token.clone())
                },
            };
            let (p, sold) = self.payments.purchase(&buyer, input).await?;
            Ok(purchase_to_wire(p, sold))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_purchase(&self, req: Request<pb::GetPurchaseRequest>) -> ApiResult<pb::PurchaseReceipt> {
        let caller = principal(&req)?;
        let result = async {
            let (me, platform) = actor(caller, scope::PAYMENTS_READ)?;
            let id = PurchaseId::parse("purchase_id", &req.get_ref().purchase_id)?;
            let me = me.unwrap_or_else(|| UserId::from_db(caller.sub.clone()));
            Ok(purchase_to_wire(self.payments.get_purchase(&me, platform, &id).await?, 0))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn list_sales(&self, req: Request<pb::ListSalesRequest>) -> ApiResult<pb::ListSalesResponse> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let (seller, _) = seller_of(caller, &r.seller_id, scope::PAYMENTS_READ)?;
            let (rows, next) = self.payments.sales(&seller, r.page_size, &r.page_token).await?;
            Ok(pb::ListSalesResponse {
                sales: rows.into_iter().map(|p| purchase_to_wire(p, 0)).collect(),
                next_page_token: next.unwrap_or_default(),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn refund_purchase(&self, req: Request<pb::RefundPurchaseRequest>) -> ApiResult<pb::PurchaseReceipt> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let (me, _) = actor(caller, scope::PAYMENTS_WRITE)?;
            let input = shop::RefundInput {
                purchase_id: PurchaseId::parse("purchase_id", &r.purchase_id)?,
                amount: optional_positive("amount", r.amount.as_ref(), self.payments.ledger().accounts().currencies())?,
                restock: r.restock_quantity,
                idempotency_key: r.idempotency_key.clone(),
            };
            let actor = me.as_ref().map_or(Actor::Platform, Actor::Seller);
            Ok(purchase_to_wire(self.payments.refund_purchase(&actor, input).await?, 0))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn mark_delivered(&self, req: Request<pb::MarkDeliveredRequest>) -> ApiResult<pb::PurchaseReceipt> {
        let caller = principal(&req)?;
        let result = async {
            caller.require(scope::SHOPPING_ADMIN)?;
            let id = PurchaseId::parse("purchase_id", &req.get_ref().purchase_id)?;
            Ok(purchase_to_wire(self.payments.mark_delivered(&id).await?, 0))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_seller_balance(&self, req: Request<pb::GetSellerBalanceRequest>) -> ApiResult<pb::SellerBalance> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let (seller, _) = seller_of(caller, &r.seller_id, scope::PAYMENTS_READ)?;
            let currency = self.payments.ledger().accounts().currencies().parse("currency", &r.currency)?;
            let b = self.payments.seller_balance(&seller, currency).await?;
            Ok(pb::SellerBalance {
                seller_id: seller.to_string(),
                pending: Some(to_wire(b.pending)),
                available: Some(to_wire(b.available)),
            })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn open_tab(&self, req: Request<pb::OpenTabRequest>) -> ApiResult<pb::Tab> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let buyer = me(caller, scope::PAYMENTS_WRITE)?;
            super::id("payment_method_token", &r.payment_method_token)?;
            let input = shop::tabs::OpenTabInput {
                idempotency_key: r.idempotency_key.clone(),
                stream_id: r.stream_id.clone(),
                cap: positive("cap", r.cap.as_ref(), self.payments.ledger().accounts().currencies())?,
                payment_method_token: (!r.payment_method_token.is_empty()).then(|| r.payment_method_token.clone()),
            };
            Ok(tab_to_wire(self.payments.open_tab(&buyer, input).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn get_tab(&self, req: Request<pb::GetTabRequest>) -> ApiResult<pb::Tab> {
        let caller = principal(&req)?;
        let result = async {
            let (me, _) = actor(caller, scope::PAYMENTS_READ)?;
            let id = TabId::parse("tab_id", &req.get_ref().tab_id)?;
            Ok(tab_to_wire(self.payments.get_tab(me.as_ref(), &id).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn close_tab(&self, req: Request<pb::CloseTabRequest>) -> ApiResult<pb::Tab> {
        let caller = principal(&req)?;
        let result = async {
            let (me, _) = actor(caller, scope::PAYMENTS_WRITE)?;
            let id = TabId::parse("tab_id", &req.get_ref().tab_id)?;
            Ok(tab_to_wire(self.payments.close_stream_tab(me.as_ref(), &id).await?))
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }

    async fn end_stream(&self, req: Request<pb::EndStreamRequest>) -> ApiResult<pb::EndStreamResponse> {
        let caller = principal(&req)?;
        let result = async {
            caller.require(scope::SHOPPING_ADMIN)?;
            let (listings, tabs) = self.payments.end_stream(&req.get_ref().stream_id).await?;
            Ok(pb::EndStreamResponse { listings_closed: listings as i64, tabs_closed: tabs as i64 })
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }
}
