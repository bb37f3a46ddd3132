//! Live shopping's domain types: listings, purchases and what a caller may ask of them,
//! validated once where they enter.

use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{ListingId, PurchaseId, TabId, UserId};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;

/// Longest stream id.
pub const STREAM_ID_LEN_MAX: usize = 128;
/// Longest listing title, in characters.
pub const TITLE_LEN_MAX: usize = 200;
/// Most units a listing offers, an `AddStock` adds, or a buyer may be allowed.
pub const QUANTITY_MAX: i64 = 1_000_000;

/// A product offered in a live stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub listing_id: ListingId,
    pub seller_id: UserId,
    pub stream_id: String,
    pub title: String,
    pub unit_price: Money,
    /// `None`: unlimited.
    pub quantity: Option<i64>,
    pub sold: i64,
    pub per_buyer_max: i64,
    pub starts_at_us: Option<i64>,
    pub ends_at_us: Option<i64>,
    pub closed_at_us: Option<i64>,
    pub created_at_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingStatus {
    Scheduled,
    Open,
    SoldOut,
    Closed,
}

impl Listing {
    /// Where the listing stands at `now_us`.
    pub fn status(&self, now_us: i64) -> ListingStatus {
        if self.closed_at_us.is_some() || self.ends_at_us.is_some_and(|e| e <= now_us) {
            ListingStatus::Closed
        } else if self.starts_at_us.is_some_and(|s| s > now_us) {
            ListingStatus::Scheduled
        } else if self.quantity.is_some_and(|q| self.sold >= q) {
            ListingStatus::SoldOut
        } else {
            ListingStatus::Open
        }
    }

    /// Refuses a purchase of a listing that is not open for sale at `now_us` (stock
    /// and per-buyer counts are the batch's to check).
    pub fn check_open(&self, now_us: i64) -> Result<()> {
        match self.status(now_us) {
            ListingStatus::Closed => Err(Error::FailedPrecondition {
                reason: Reason::ListingClosed,
                message: format!("listing {} is closed", self.listing_id),
            }),
            ListingStatus::Scheduled => Err(Error::FailedPrecondition {
                reason: Reason::ListingNotStarted,
                message: format!("listing {} is not on sale yet", self.listing_id),
            }),
            ListingStatus::Open | ListingStatus::SoldOut => Ok(()),
        }
    }
}

pub fn sold_out(listing: &ListingId, left: i64) -> Error {
    Error::FailedPrecondition {
        reason: Reason::SoldOut,
        message: if left == 0 {
            format!("listing {listing} is sold out")
        } else {
            format!("listing {listing} has only {left} left")
        },
    }
}

pub fn per_buyer_limit(max: i64, bought: i64) -> Error {
    Error::ResourceExhausted {
        reason: Reason::PerBuyerLimit,
        message: format!("at most {max} per buyer on this listing; you have bought {bought}"),
    }
}

/// Where a sale's proceeds stand for the seller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// In the seller's pending account until `available_at`.
    Held,
    /// Being moved to the wallet: the amount is fixed.
    Releasing,
    Released,
}

impl Hold {
    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Held => "held",
            Hold::Releasing => "releasing",
            Hold::Released => "released",
        }
    }

    pub fn from_db(s: &str) -> Result<Self> {
        match s {
            "held" => Ok(Hold::Held),
            "releasing" => Ok(Hold::Releasing),
            "released" => Ok(Hold::Released),
            other => Err(Error::internal(anyhow::anyhow!("unknown purchase hold {other:?}"))),
        }
    }
}

/// A paid purchase (a refused one leaves no row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub purchase_id: PurchaseId,
    pub listing_id: ListingId,
    pub buyer_id: UserId,
    pub seller_id: UserId,
    pub stream_id: String,
    pub quantity: i64,
    pub unit_price: Money,
    pub amount: Money,
    pub commission: Money,
    pub refunded_amount: Money,
    pub commission_refunded: i64,
    pub restocked: i64,
    pub hold: Hold,
    pub available_at_us: i64,
    pub released_amount: Option<i64>,
    pub created_at_us: i64,
    /// The tab it was drawn on: a stream tab, or the single-purchase tab holding its
    /// card authorization; `None`: paid from the wallet alone.
    pub tab_id: Option<TabId>,
    /// What the wallet paid. With `card_amount` it makes up `amount`; a stream tab's
    /// purchase has both zero (the tab pays the amount).
    pub wallet_amount: Money,
    /// What a card was charged for, the fee aside (a card purchase's single-purchase tab).
    pub card_amount: Money,
    /// The card fee, paid by the buyer on top of `amount`.
    pub fee_amount: Money,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurchaseStatus {
    Paid,
    PartiallyRefunded,
    Refunded,
}

impl Purchase {
    pub fn status(&self) -> PurchaseStatus {
        match self.refunded_amount.minor() {
            0 => PurchaseStatus::Paid,
            r if r >= self.amount.minor() => PurchaseStatus::Refunded,
            _ => PurchaseStatus::PartiallyRefunded,
        }
    }

    /// What the purchase draws on its tab: the card part and its fee for a card
    /// purchase, else the whole amount (a stream tab's purchase); 0 without a tab.
    pub fn tab_draw(&self) -> i64 {
        match (&self.tab_id, self.card_amount.minor()) {
            (None, _) => 0,
            (Some(_), 0) => self.amount.minor(),
            (Some(_), card) => card.saturating_add(self.fee_amount.minor()),
        }
    }

    /// The seller's share: the price less the commission.
    pub fn seller_share(&self) -> i64 {
        self.amount.minor() - self.commission.minor()
    }

    /// The commission refunded once `refunded` of the amount is: in proportion, rounded
    /// down, and all of it with a full refund, so the parts always add up.
    pub fn commission_refunded_at(&self, refunded: i64) -> i64 {
        let (amount, commission) = (i128::from(self.amount.minor()), i128::from(self.commission.minor()));
        if amount == 0 {
            return 0;
        }
        i64::try_from(commission * i128::from(refunded) / amount).unwrap_or(self.commission.minor())
    }
}

/// A viewer's tab for one stream: one card authorization up to `cap`, purchases drawn
/// on it, one capture of `spent` when it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tab {
    pub tab_id: TabId,
    pub buyer_id: UserId,
    pub stream_id: String,
    pub cap: Money,
    pub spent: Money,
    pub status: TabStatus,
    pub payment_method_token: Option<String>,
    pub authorization_ref: Option<String>,
    pub capture_ref: Option<String>,
    /// What the closing captures (fixed when closing begins).
    pub captured: Option<i64>,
    pub failure_reason: String,
    pub failure_message: String,
    pub expires_at_us: i64,
    pub created_at_us: i64,
    pub closed_at_us: Option<i64>,
    pub kind: TabKind,
}

crate::stored_enum! {
    /// What a tab is for.
    pub enum TabKind {
        /// A viewer's tab for a stream, opened with `OpenTab`.
        Stream = "stream",
        /// The card authorization of one purchase paid (in part) by card: it opens
        /// with the purchase and is captured, or voided, as soon as it is decided.
        Purchase = "purchase",
    }
}

crate::stored_enum! {
    /// Where a tab stands.
    pub enum TabStatus {
        /// Recorded; the card is being authorized.
        Opening = "opening",
        /// Authorized: purchases in the stream may draw on it.
        Open = "open",
        /// No more purchases; its spend is being captured (or the authorization voided).
        Closing = "closing",
        Closed = "closed",
        /// The authorization was declined (nothing was spent), or the capture failed.
        Failed = "failed",
    }
}

pub fn tab_not_open(tab: &TabId) -> Error {
    Error::FailedPrecondition { reason: Reason::TabNotOpen, message: format!("tab {tab} is not open") }
}

pub fn tab_cap(tab: &TabId, left: Money) -> Error {
    Error::FailedPrecondition {
        reason: Reason::TabCap,
        message: format!("tab {tab} has {left} left of its cap; close it and open another with a higher cap"),
    }
}

/// `CreateListing` after wire parsing.
pub struct NewListing {
    pub idempotency_key: String,
    pub seller_id: UserId,
    pub stream_id: String,
    pub title: String,
    pub unit_price: Money,
    pub quantity: Option<i64>,
    /// 0: the configured default.
    pub per_buyer_max: i64,
    pub starts_at_us: Option<i64>,
    pub ends_at_us: Option<i64>,
}

impl NewListing {
    pub(crate) fn request_hash(&self) -> String {
        crate::ledger::hash_request(&serde_json::json!({
            "seller": self.seller_id.as_str(),
            "stream": self.stream_id,
            "title": self.title,
            "currency": self.unit_price.currency().code(),
            "price": self.unit_price.minor(),
            "quantity": self.quantity,
            "per_buyer_max": self.per_buyer_max,
            "starts": self.starts_at_us,
            "ends": self.ends_at_us,
        }))
    }
}

/// A stream id: 1 to 128 characters of `[A-Za-z0-9_.:-]`.
pub fn check_stream_id(field: &str, raw: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if raw.len() > STREAM_ID_LEN_MAX {
        return Err(Error::invalid(field, format!("at most {STREAM_ID_LEN_MAX} characters")));
    }
    if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) {
        return Err(Error::invalid(field, "only letters, digits, '_', '.', ':' and '-' are allowed"));
    }
    Ok(())
}

/// A count of units: 1 to `QUANTITY_MAX`.
pub fn check_quantity(field: &str, n: i64) -> Result<()> {
    if !(1..=QUANTITY_MAX).contains(&n) {
        return Err(Error::invalid(field, format!("1 to {QUANTITY_MAX} units")));
    }
    Ok(())
}

/// The outbox's conversation column for a stream's events, so a stream's overlay can
/// follow them as a DM thread is followed.
pub fn stream_channel(stream_id: &str) -> String {
    format!("stream:{stream_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::money::Currency;

    fn purchase(amount: i64, commission: i64) -> Purchase {
        let usd = Currency::from_code("USD").unwrap();
        Purchase {
            purchase_id: PurchaseId::generate(),
            listing_id: ListingId::generate(),
            buyer_id: UserId::parse("u", "b").unwrap(),
            seller_id: UserId::parse("u", "s").unwrap(),
            stream_id: "s".into(),
            quantity: 1,
            unit_price: Money::from_minor(usd, amount),
            amount: Money::from_minor(usd, amount),
            commission: Money::from_minor(usd, commission),
            refunded_amount: Money::zero(usd),
            commission_refunded: 0,
            restocked: 0,
            hold: Hold::Held,
            available_at_us: 0,
            released_amount: None,
            created_at_us: 0,
            tab_id: None,
            wallet_amount: Money::from_minor(usd, amount),
            card_amount: Money::zero(usd),
            fee_amount: Money::zero(usd),
        }
    }

    #[test]
    fn commission_refunds_add_up_to_the_commission() {
        let p = purchase(999, 49);
        let mut total = 0;
        let mut refunded = 0;
        for step in [1, 333, 100, 565] {
            refunded += step;
            let now = p.commission_refunded_at(refunded);
            assert!(now >= total, "never negative");
            total = now;
        }
        assert_eq!(refunded, 999);
        assert_eq!(total, 49, "a full refund returns all of the commission");
        assert_eq!(crate::payments::model::ShopConfig::commission(999, 500), 49);
        assert_eq!(crate::payments::model::ShopConfig::commission(1, 10_000), 1);
    }

    #[test]
    fn stream_ids_are_checked() {
        assert!(check_stream_id("stream_id", "live:123-a.b_c").is_ok());
        for bad in ["", "a b", &"x".repeat(129), "ü"] {
            assert!(check_stream_id("stream_id", bad).unwrap_err().to_string().contains("stream_id"));
        }
    }
}
