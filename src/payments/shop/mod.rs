//! Live shopping: sellers' listings in a live stream, one-tap purchases settled in the
//! posting engine's batch with the listing's stock (`batch`), the seller's pending money
//! released to their wallet after a hold, and the seller's refunds. The types are in
//! `payments::listing`, where the payments' store can reach them.
//!
//! - `tabs`    stream tabs: one card authorization, purchases drawn on it, one capture
//! - `batch`   a purchase's rules and stock under the engine's batch locks
//! - `cache`   listings kept a second for a burst's taps, read once per miss
//! - `card`    purchases paid (in part) by card: one authorization, captured or voided
//! - `refunds` sellers' refunds, one attempt at a time
//!
//! Money flow of a purchase of amount A with commission C, one ledger entry: debit the
//! buyer's wallet A (or their tab account: a stream tab's purchase, or the card part and
//! its fee of a card purchase, `card`), credit the seller's `sales_pending` A - C and
//! `platform:commissions` C (and `platform:fees` a card purchase's fee). After the hold (`DMPAY_SHOP_HOLD`) or delivery, the seller's share less what
//! refunds took moves from `sales_pending` to the seller's wallet (`release`). A refund
//! of R moves R back to the buyer's wallet: its commission part from the platform, the
//! rest from the sale's pending money while it is held, else from the seller's wallet.

pub mod batch;
pub mod cache;
pub mod card;
pub mod refunds;
pub mod tabs;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::listing as model;
pub use super::listing::{Listing, ListingStatus, NewListing, Purchase, PurchaseStatus, QUANTITY_MAX};
use cache::ForSale;
pub use cache::ListingCache;
pub use refunds::RefundInput;

use super::repo::shop::{ListingInserted, StockAdded, STOCK_ADDS_PER_LISTING_MAX};
use super::{Payments, ACTOR};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{ListingId, PurchaseId, UserId};
use crate::kernel::money::Money;
use crate::kernel::page::Page;
use crate::kernel::reason::Reason;
use crate::ledger::{
    AccountCode, Direction, NewEntry, Op, Outcome, PostEntryInput, Posting, PostingInput, SYSTEM_COMMISSIONS,
    SYSTEM_FEES,
};
use crate::payments::model::FundingSource;

/// Releases and refunds the resolver finishes per tick, each.
pub(super) const RESOLVE_BATCH_MAX: i64 = 200;
/// The answer to a key used before with another request (a purchase, a stock add, a
/// refund).
pub(crate) fn key_reused(key: &str) -> Error {
    Error::AlreadyExists(format!("idempotency_key {key:?} was already used for a different request"))
}

fn not_a_seller(user: &UserId) -> Error {
    Error::FailedPrecondition { reason: Reason::NotASeller, message: format!("{user} is not a seller") }
}

/// `Purchase` after wire parsing.
pub struct PurchaseInput {
    pub idempotency_key: String,
    pub listing_id: ListingId,
    pub quantity: i64,
    /// The unit price the buyer saw, when the client sends it: a listing priced
    /// otherwise (another currency) is refused.
    pub unit_price: Option<Money>,
    /// Draw on this stream tab instead of the wallet.
    pub tab_id: Option<crate::kernel::ids::TabId>,
    /// As for sends: the wallet, a card, or the wallet first and a card for the rest.
    pub funding: FundingSource,
    /// The card to charge; `None`: the default card.
    pub payment_method_token: Option<String>,
}

impl PurchaseInput {
    fn request_hash(&self) -> String {
        let mut request = serde_json::json!({
            "listing": self.listing_id.as_str(),
            "quantity": self.quantity,
            "tab": self.tab_id.as_ref().map(|t| t.as_str()),
        });
        // Only when not the defaults, so purchases recorded before card funding existed
        // keep their hashes.
        if self.funding != FundingSource::Auto {
            request["funding"] = self.funding.as_str().into();
        }
        if let Some(token) = &self.payment_method_token {
            request["token"] = token.as_str().into();
        }
        crate::ledger::hash_request(&request)
    }
}

/// A purchase on its way to the batch, with what its answer needs.
pub(super) struct Sale<'a> {
    pub purchase: Purchase,
    pub key: &'a str,
    pub hash: &'a str,
    pub title: &'a str,
    /// The buyer's account was known to exist before the purchase.
    pub known: bool,
}

/// A seller's money in one currency.
pub struct SellerBalance {
    pub pending: Money,
    pub available: Money,
}

/// Who acts on a seller's behalf: the seller, or the platform (`shopping:admin`).
pub enum Actor<'a> {
    Seller(&'a UserId),
    Platform,
}

impl Actor<'_> {
    fn may_act_for(&self, seller: &UserId) -> bool {
        match self {
            Actor::Seller(me) => *me == seller,
            Actor::Platform => true,
        }
    }
}

impl Payments {
    /// Posts one of live shopping's own entries (a refund, a release, a tab's capture)
    /// under `key`, derived from what it books, so a step resumed after a crash books
    /// it once.
    pub(super) async fn post_shop_entry(
        &self,
        key: String,
        kind: &str,
        postings: Vec<PostingInput>,
        metadata: &[(&str, &str)],
    ) -> Result<crate::ledger::Entry> {
        let input = PostEntryInput {
            idempotency_key: key,
            kind: kind.into(),
            description: String::new(),
            postings,
            metadata: metadata.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            pending: false,
            pending_timeout_s: 0,
        };
        self.ledger.post_entry(ACTOR, input).await
    }

    /// Posts a two-leg shopping entry: `amount` from `from` to `to`.
    pub(super) async fn post_shop_transfer(
        &self,
        key: String,
        kind: &str,
        (from, to, amount): (AccountCode, AccountCode, Money),
        metadata: &[(&str, &str)],
    ) -> Result<crate::ledger::Entry> {
        let postings = vec![
            PostingInput { account_code: from, direction: Direction::Debit, amount },
            PostingInput { account_code: to, direction: Direction::Credit, amount },
        ];
        self.post_shop_entry(key, kind, postings, metadata).await
    }

    /// `CreateListing`. The seller must be one (`Accounts.SetSeller`).
    pub async fn create_listing(&self, input: NewListing) -> Result<Listing> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        model::check_stream_id("stream_id", &input.stream_id)?;
        if let Some(q) = input.quantity {
            model::check_quantity("quantity", q)?;
        }
        if input.per_buyer_max != 0 {
            model::check_quantity("per_buyer_max", input.per_buyer_max)?;
        }
        if let (Some(s), Some(e)) = (input.starts_at_us, input.ends_at_us) {
            if e <= s {
                return Err(Error::invalid("ends_at", "must be after starts_at"));
            }
        }
        if input.ends_at_us.is_some_and(|e| e <= self.now_us()) {
            return Err(Error::invalid("ends_at", "must be in the future"));
        }
        let seller = self
            .accounts
            .get(&input.seller_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("seller_id: no user {}", input.seller_id)))?;
        if !seller.seller {
            return Err(not_a_seller(&input.seller_id));
        }
        let per_buyer_max =
            if input.per_buyer_max == 0 { self.config.shop.per_buyer_max_default } else { input.per_buyer_max };
        let hash = input.request_hash();
        match self.store.insert_listing(&input, per_buyer_max, self.config.shop.open_listings_per_seller_max).await? {
            ListingInserted::New(l) => {
                // The accounts every purchase credits, made now rather than by the sale's
                // first wave of taps all at once.
                let accounts = self.ledger.accounts();
                accounts.sales_pending(&l.seller_id, l.unit_price.currency()).await?;
                accounts.system(SYSTEM_COMMISSIONS, l.unit_price.currency()).await?;
                Ok(l)
            }
            ListingInserted::Existing(l, h) if h == hash => Ok(l),
            ListingInserted::Existing(..) => Err(Error::AlreadyExists(format!(
                "idempotency_key {:?} was already used for a different listing",
                input.idempotency_key
            ))),
        }
    }

    async fn listing_for(&self, actor: &Actor<'_>, id: &ListingId) -> Result<Listing> {
        match self.store.listing(id).await? {
            Some(l) if actor.may_act_for(&l.seller_id) => Ok(l),
            _ => Err(Error::NotFound(format!("listing {id} not found"))),
        }
    }

    /// `AddStock`.
    pub async fn add_stock(&self, actor: &Actor<'_>, id: &ListingId, quantity: i64, key: &str) -> Result<Listing> {
        model::check_quantity("quantity", quantity)?;
        crate::ledger::check_idempotency_key("idempotency_key", key)?;
        let listing = self.listing_for(actor, id).await?;
        if listing.quantity.is_none() {
            return Err(Error::invalid("listing_id", "the listing has unlimited stock"));
        }
        self.listings.forget(id);
        match self.store.add_stock(id, quantity, key).await? {
            StockAdded::Added(listing) => Ok(*listing),
            StockAdded::Closed => Err(Error::FailedPrecondition {
                reason: Reason::ListingClosed,
                message: format!("listing {id} is closed"),
            }),
            StockAdded::NoListing => Err(Error::NotFound(format!("listing {id} not found"))),
            StockAdded::KeyReused => Err(key_reused(key)),
            StockAdded::TooMuch => {
                Err(Error::invalid("quantity", format!("a listing holds at most {QUANTITY_MAX} units")))
            }
            StockAdded::TooManyAdds => Err(Error::ResourceExhausted {
                reason: Reason::StockAdds,
                message: format!(
                    "listing {id} has had {STOCK_ADDS_PER_LISTING_MAX} stock additions; create a new listing"
                ),
            }),
        }
    }

    /// `CloseListing` (idempotent).
    pub async fn close_listing(&self, actor: &Actor<'_>, id: &ListingId) -> Result<Listing> {
        self.listing_for(actor, id).await?;
        self.listings.forget(id);
        self.store.close_listing(id).await?.ok_or_else(|| Error::NotFound(format!("listing {id} not found")))
    }

    /// `GetListing`: listings are public to everyone watching the stream.
    pub async fn listing(&self, id: &ListingId) -> Result<Listing> {
        self.store.listing(id).await?.ok_or_else(|| Error::NotFound(format!("listing {id} not found")))
    }

    /// `ListListings`: a stream's listings, newest first.
    pub async fn listings(
        &self,
        stream_id: &str,
        page_size: u32,
        token: &str,
    ) -> Result<(Vec<Listing>, Option<String>)> {
        model::check_stream_id("stream_id", stream_id)?;
        let page = Page::parse(page_size, 50, 200, token, "lst_")?;
        let mut rows = self.store.listings(stream_id, page.before.clone(), page.limit()).await?;
        let next = page.finish(&mut rows, |l| (l.created_at_us, l.listing_id.to_string()));
        Ok((rows, next))
    }

    /// `Purchase`: one tap, paid from the buyer's wallet, decided with the listing's
    /// stock in the posting engine's batch. Answers the purchase and the listing's
    /// units sold after it.
    pub async fn purchase(&self, buyer: &UserId, input: PurchaseInput) -> Result<(Purchase, i64)> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        model::check_quantity("quantity", input.quantity)?;
        if input.tab_id.is_some() && input.funding != FundingSource::Auto {
            return Err(Error::invalid(
                "funding_source",
                "a purchase on a tab is paid by the tab; leave funding_source unset",
            ));
        }
        if input.payment_method_token.is_some() && (input.tab_id.is_some() || input.funding == FundingSource::Balance) {
            return Err(Error::invalid("payment_method_token", "only a purchase that may charge a card takes one"));
        }
        let hash = input.request_hash();
        let for_sale = self.for_sale(&input.listing_id).await?;
        let ForSale { listing, commission_bps: bps, is_seller } = for_sale;
        if let Some(seen) = input.unit_price {
            if seen != listing.unit_price {
                return Err(Error::invalid("unit_price", format!("the listing's price is {}", listing.unit_price)));
            }
        }
        let now = self.now_us();
        // Refusals that need no batch: answered at once, so a sold-out burst never
        // queues in the posting engine. A retry of a purchase made before the listing
        // closed or sold out still gets its purchase.
        let early = if listing.seller_id == *buyer {
            Some(Error::FailedPrecondition {
                reason: Reason::OwnListing,
                message: "you cannot buy from your own listing".into(),
            })
        } else if !is_seller {
            Some(not_a_seller(&listing.seller_id))
        } else if input.quantity > listing.per_buyer_max {
            Some(model::per_buyer_limit(listing.per_buyer_max, 0))
        } else if let Err(e) = listing.check_open(now) {
            Some(e)
        } else if listing.quantity.is_some_and(|q| listing.sold + input.quantity > q) {
            Some(model::sold_out(&listing.listing_id, listing.quantity.map_or(0, |q| (q - listing.sold).max(0))))
        } else if self.owes(buyer) {
            Some(super::disputes::owing())
        } else {
            None
        };
        if let Some(refusal) = early {
            return match self.store.purchase_by_key(buyer, &input.idempotency_key).await? {
                Some((p, h)) if h == hash => Ok((p, listing.sold)),
                Some(_) => Err(key_reused(&input.idempotency_key)),
                None => Err(refusal),
            };
        }
        // A buyer seen before has an account; one making their first call may not, and
        // gets it made here. The others, first-time buyers of a flash sale among them,
        // spend no read on it: the batch's rules read has every buyer's account, and a
        // missing one is made then and the purchase submitted again (`submit_purchase`).
        let known = self.accounts.known(buyer);
        let currency = listing.unit_price.currency();
        if let Some(tab_id) = &input.tab_id {
            // The tab's state and spend are checked in the batch, under its lock; whose,
            // which stream's and what kind it is never changes.
            match self.store.tab(tab_id).await? {
                Some(t) if t.buyer_id == *buyer && t.kind == model::TabKind::Stream => {
                    if t.stream_id != listing.stream_id || t.cap.currency() != currency {
                        return Err(Error::invalid("tab_id", "the tab is for another stream or currency"));
                    }
                }
                _ => return Err(Error::NotFound(format!("tab_id: tab {tab_id} not found"))),
            }
        }
        let amount = listing
            .unit_price
            .minor()
            .checked_mul(input.quantity)
            .filter(|a| *a <= crate::kernel::money::AMOUNT_MINOR_MAX)
            .ok_or_else(|| Error::invalid("quantity", "the total is too large"))?;
        let commission = crate::payments::model::ShopConfig::commission(
            amount,
            bps.and_then(|b| u32::try_from(b).ok()).unwrap_or(self.config.shop.commission_bps),
        );
        let zero = Money::zero(currency);
        let purchase = Purchase {
            purchase_id: PurchaseId::generate(),
            listing_id: listing.listing_id.clone(),
            buyer_id: buyer.clone(),
            seller_id: listing.seller_id.clone(),
            stream_id: listing.stream_id.clone(),
            quantity: input.quantity,
            unit_price: listing.unit_price,
            amount: Money::from_minor(currency, amount),
            commission: Money::from_minor(currency, commission),
            refunded_amount: zero,
            commission_refunded: 0,
            restocked: 0,
            hold: model::Hold::Held,
            available_at_us: now.saturating_add(self.config.shop.hold_s.saturating_mul(1_000_000)),
            released_amount: None,
            created_at_us: now,
            tab_id: input.tab_id.clone(),
            // A stream tab pays the whole amount; otherwise the wallet does, unless the
            // card path below splits it.
            wallet_amount: if input.tab_id.is_some() { zero } else { Money::from_minor(currency, amount) },
            card_amount: zero,
            fee_amount: zero,
        };
        let sale = Sale { purchase, key: &input.idempotency_key, hash: &hash, title: &listing.title, known };
        match (&input.tab_id, input.funding) {
            (None, FundingSource::Card) => self.purchase_by_card(sale, &input).await,
            (None, FundingSource::Auto) => match self.submit_purchase(&sale).await {
                // Wallet first; the card only for what a wallet payment could not be.
                Err(Error::FailedPrecondition { reason: Reason::InsufficientFunds, .. }) => {
                    self.purchase_by_card(sale, &input).await
                }
                other => other,
            },
            _ => self.submit_purchase(&sale).await,
        }
    }

    /// Submits a purchase to the posting engine's batch, where its rules and stock are
    /// decided with the money: the wallet's part, the tab's draw (a stream tab's whole
    /// amount, or a card purchase's card part and fee) to the seller's pending account,
    /// the platform's commission and the card fee.
    pub(super) async fn submit_purchase(&self, sale: &Sale<'_>) -> Result<(Purchase, i64)> {
        match self.submit_purchase_once(sale).await {
            // The batch found no account for a buyer not known before (their first
            // call), or a twin of this call did: made now (if it is not already), and
            // submitted again; a refusal wrote nothing. Another NOT_FOUND (the listing
            // is gone) comes back from the second submission as it is.
            Err(Error::NotFound(_)) if !sale.known => {
                self.ensure_user(&sale.purchase.buyer_id).await?;
                self.submit_purchase_once(sale).await
            }
            other => other,
        }
    }

    async fn submit_purchase_once(&self, sale: &Sale<'_>) -> Result<(Purchase, i64)> {
        let p = &sale.purchase;
        let (buyer, currency) = (&p.buyer_id, p.amount.currency());
        let accounts = self.ledger.accounts();
        let wallet = accounts.wallet(buyer, currency).await?;
        let mut postings = Vec::with_capacity(5);
        let mut leg = |account: &crate::ledger::LedgerAccount, direction, minor: i64| {
            if minor > 0 {
                postings.push(Posting {
                    account_id: account.id,
                    account_code: account.code.clone(),
                    direction,
                    amount: Money::from_minor(currency, minor),
                });
            }
        };
        leg(&wallet, Direction::Debit, p.wallet_amount.minor());
        if p.tab_id.is_some() {
            // The viewer's tab account: what the card owes.
            leg(&accounts.tab(buyer, currency).await?, Direction::Debit, p.tab_draw());
        }
        leg(&accounts.sales_pending(&p.seller_id, currency).await?, Direction::Credit, p.seller_share());
        if p.commission.minor() > 0 {
            leg(&accounts.system(SYSTEM_COMMISSIONS, currency).await?, Direction::Credit, p.commission.minor());
        }
        if p.fee_amount.minor() > 0 {
            leg(&accounts.system(SYSTEM_FEES, currency).await?, Direction::Credit, p.fee_amount.minor());
        }
        crate::ledger::check_balanced("postings", &postings)?;
        // The batch checks the buyer's daily limit against their spend, which sends and
        // card payments change under the wallet's lock; an entry that does not touch the
        // wallet takes that lock too.
        let locks = if p.wallet_amount.minor() == 0 { vec![wallet.id] } else { Vec::new() };
        let entry = NewEntry {
            kind: "shop_purchase".into(),
            description: sale.title.chars().take(crate::ledger::DESCRIPTION_LEN_MAX).collect(),
            metadata: [
                ("purchase_id".to_string(), p.purchase_id.to_string()),
                ("listing_id".to_string(), p.listing_id.to_string()),
                ("stream_id".to_string(), p.stream_id.clone()),
            ]
            .into_iter()
            .collect(),
            postings,
            pending_timeout_s: None,
            locks,
        };
        let units_sold = Arc::new(AtomicI64::new(0));
        let ticket = self.hook.register_purchase(batch::PurchaseAttachment {
            purchase: p.clone(),
            idempotency_key: sale.key.to_owned(),
            request_hash: sale.hash.to_owned(),
            units_sold: units_sold.clone(),
        });
        let outcome = self.ledger.engine().submit_attached(ACTOR, None, Op::Post(entry), Some(ticket)).await;
        match outcome {
            Err(e @ Error::FailedPrecondition { reason: Reason::SoldOut, .. }) => {
                // Sold out in the batch, which said what it counted: the next taps
                // are answered before it.
                self.listings.saw_sold(&p.listing_id, units_sold.load(Ordering::Relaxed));
                Err(e)
            }
            Err(e) => Err(e),
            Ok(Outcome::Created { .. }) => {
                self.store.notify();
                let sold = units_sold.load(Ordering::Relaxed);
                self.listings.saw_sold(&p.listing_id, sold);
                Ok((p.clone(), sold))
            }
            Ok(Outcome::Replayed(id)) => self.purchase_as_recorded(&PurchaseId::from_db(id)).await,
        }
    }

    /// A purchase made before, with its listing's count now: a retry's answer.
    pub(super) async fn purchase_as_recorded(&self, id: &PurchaseId) -> Result<(Purchase, i64)> {
        let p = self.store.purchase(id).await?.ok_or_else(|| Error::not_found("purchase"))?;
        let sold = self.store.listing(&p.listing_id).await?.map_or(0, |l| l.sold);
        Ok((p, sold))
    }

    /// `GetPurchase`: for its buyer, its seller, or the platform.
    pub async fn get_purchase(&self, caller: &UserId, platform: bool, id: &PurchaseId) -> Result<Purchase> {
        match self.store.purchase(id).await? {
            Some(p) if platform || p.buyer_id == *caller || p.seller_id == *caller => Ok(p),
            _ => Err(Error::NotFound(format!("purchase {id} not found"))),
        }
    }

    /// `ListSales`: the seller's sales, newest first.
    pub async fn sales(&self, seller: &UserId, page_size: u32, token: &str) -> Result<(Vec<Purchase>, Option<String>)> {
        let page = Page::parse(page_size, 50, 200, token, "pur_")?;
        let mut rows = self.store.sales(seller, page.before.clone(), page.limit()).await?;
        let next = page.finish(&mut rows, |p| (p.created_at_us, p.purchase_id.to_string()));
        Ok((rows, next))
    }

    /// `GetSellerBalance`: held proceeds and the wallet.
    pub async fn seller_balance(
        &self,
        seller: &UserId,
        currency: crate::kernel::money::Currency,
    ) -> Result<SellerBalance> {
        let accounts = self.ledger.accounts();
        let read = |code: AccountCode| async move {
            match accounts.resolve("currency", &code, false).await {
                Ok(a) => Ok(accounts.balance(a.id).await?.available(true).unwrap_or(0)),
                Err(Error::NotFound(_)) => Ok(0),
                Err(e) => Err(e),
            }
        };
        Ok(SellerBalance {
            pending: Money::from_minor(currency, read(AccountCode::sales_pending(seller, currency)).await?),
            available: Money::from_minor(currency, read(AccountCode::wallet(seller, currency)).await?),
        })
    }

    /// `MarkDelivered`: the order arrived; its money is released now.
    pub async fn mark_delivered(&self, id: &PurchaseId) -> Result<Purchase> {
        let p = self.store.purchase(id).await?.ok_or_else(|| Error::NotFound(format!("purchase {id} not found")))?;
        self.store.release_now(id).await?;
        self.release_sale(&p).await?;
        self.store.purchase(id).await?.ok_or_else(|| Error::not_found("purchase"))
    }

    /// Moves a purchase's released share from the seller's pending account to their
    /// wallet: the amount is fixed first (`releasing`), then posted under a key derived
    /// from the purchase, then marked released; a crash between is resumed from the
    /// start and posts nothing twice.
    async fn release_sale(&self, p: &Purchase) -> Result<bool> {
        let Some(amount) = self.store.start_release(&p.purchase_id).await? else { return Ok(false) };
        let currency = p.amount.currency();
        if amount > 0 {
            let money = Money::from_minor(currency, amount);
            self.post_shop_transfer(
                format!("shop:{}:release", p.purchase_id),
                "shop_release",
                (
                    AccountCode::sales_pending(&p.seller_id, currency),
                    AccountCode::wallet(&p.seller_id, currency),
                    money,
                ),
                &[("purchase_id", p.purchase_id.as_str())],
            )
            .await?;
        }
        self.store.finish_release(&p.purchase_id).await?;
        Ok(true)
    }

    /// The resolver's part: releases whose hold ended, and refunds a crash left
    /// pending. Answers how many it finished.
    pub(crate) async fn resolve_shop(&self) -> Result<usize> {
        let mut n = self.resolve_tabs().await?;
        for p in self.store.due_releases(RESOLVE_BATCH_MAX).await? {
            if self.release_sale(&p).await? {
                n += 1;
            }
        }
        n += self.resolve_purchase_refunds().await?;
        Ok(n)
    }
}
