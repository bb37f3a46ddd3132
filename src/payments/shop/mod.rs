//! Live shopping: sellers' listings in a live stream, one-tap purchases settled in the
//! posting engine's batch with the listing's stock (`batch`), the seller's pending money
//! released to their wallet after a hold, and the seller's refunds. The types are in
//! `payments::listing`, where the payments' store can reach them.
//!
//! - `purchase` `Purchase`: the early refusals, then the purchase submitted to the batch
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
mod purchase;
pub mod refunds;
pub mod tabs;

use super::listing as model;
pub use super::listing::{Listing, ListingStatus, NewListing, Purchase, PurchaseStatus, QUANTITY_MAX};
use cache::ForSale;
pub use cache::ListingCache;
pub use purchase::PurchaseInput;
use purchase::Sale;
pub use refunds::RefundInput;

use super::repo::shop::{ListingInserted, StockAdded, STOCK_ADDS_PER_LISTING_MAX};
use super::{Payments, ACTOR};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{ListingId, PurchaseId, UserId};
use crate::kernel::money::Money;
use crate::kernel::page::Page;
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, Direction, PostEntryInput, PostingInput, SYSTEM_COMMISSIONS};

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
