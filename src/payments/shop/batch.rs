//! The purchase part of the posting engine's batch (`payments::batch`): a purchase is a
//! ledger entry (buyer's wallet to the seller's pending account and the platform's
//! commission) whose rules are checked under the batch's locks, with the listing's stock
//! counted in memory across the batch and written once with it. So N units go to exactly
//! the first N purchases the engine accepts, whatever the burst, without a lock per call:
//! the listing is serialized the way the engine serializes a hot account.
//!
//! A unit is taken in `admit` and given back in `decided` when the ledger refuses the
//! money (the buyer's wallet cannot cover it), so a failed payment never holds stock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::accounts::{Status as AccountStatus, Tier};
use crate::kernel::error::{Error, Result};
use crate::ledger::Outcome;
use crate::payments::listing::{per_buyer_limit, sold_out, tab_cap, tab_not_open, Listing, Purchase, Tab, TabStatus};
use crate::payments::model::PaymentsConfig;
use crate::payments::repo::rows::EventFields;
use crate::payments::repo::shop::{BatchPurchase, BatchShop, PurchasesPrepared};
use crate::payments::repo::ShopKeys;

/// A purchase, attached to its ledger entry.
#[derive(Clone)]
pub(crate) struct PurchaseAttachment {
    /// The purchase as stored once paid (`created_at_us` is set by the caller).
    pub purchase: Purchase,
    pub idempotency_key: String,
    pub request_hash: String,
    /// The listing's units sold after this purchase, set by the batch that decided it
    /// (again by a batch run a second time), read by the caller once it is answered.
    pub units_sold: Arc<AtomicI64>,
}

/// How the first purchase with a given (buyer, key) in this batch ended.
enum First {
    Recorded(String),
    Refused(Error),
}

/// The batch's purchases and what their rules read.
#[derive(Default)]
pub(crate) struct Purchases {
    pub items: HashMap<usize, PurchaseAttachment>,
    prepared: Option<PurchasesPrepared>,
    /// The stream tabs purchases draw on, by id, with their spend so far in the batch.
    tabs: HashMap<String, Tab>,
    firsts: HashMap<(String, String), (String, First)>,
    /// Commands admitted and not yet decided: the units they took.
    taken: HashMap<usize, i64>,
    /// The purchases to write, by command, with the listing's count after each.
    rows: Vec<(usize, i64)>,
}

impl Purchases {
    pub fn new(items: HashMap<usize, PurchaseAttachment>) -> Self {
        Purchases { items, ..Default::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn contains(&self, cmd: usize) -> bool {
        self.items.contains_key(&cmd)
    }

    pub fn prepared(&mut self, p: PurchasesPrepared, tabs: HashMap<String, Tab>) {
        self.prepared = Some(p);
        self.tabs = tabs;
    }

    /// The tabs the batch's purchases draw on, sorted and deduplicated.
    pub fn tab_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> =
            self.items.values().filter_map(|a| a.purchase.tab_id.as_ref().map(|t| t.as_str())).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// (buyer, key) of every purchase, sorted and deduplicated.
    pub fn keys(&self) -> Vec<(&str, &str)> {
        let mut keys: Vec<(&str, &str)> =
            self.items.values().map(|a| (a.purchase.buyer_id.as_str(), a.idempotency_key.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    pub fn listing_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.items.values().map(|a| a.purchase.listing_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// (listing, buyer) of every purchase.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        let mut pairs: Vec<(&str, &str)> =
            self.items.values().map(|a| (a.purchase.listing_id.as_str(), a.purchase.buyer_id.as_str())).collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    }

    pub fn buyers_and_sellers(&self) -> impl Iterator<Item = &str> {
        self.items.values().flat_map(|a| [a.purchase.buyer_id.as_str(), a.purchase.seller_id.as_str()])
    }

    pub fn buyers(&self) -> impl Iterator<Item = &str> {
        self.items.values().map(|a| a.purchase.buyer_id.as_str())
    }

    /// Just before purchase `cmd`'s ledger decision. `None`: proceed to the ledger.
    pub fn admit(
        &mut self,
        cmd: usize,
        config: &PaymentsConfig,
        users: &HashMap<String, (Tier, AccountStatus)>,
        sent: &HashMap<(String, String), i64>,
        now_us: i64,
    ) -> Option<Result<Outcome>> {
        let a = self.items.get(&cmd)?;
        let id = (a.purchase.buyer_id.to_string(), a.idempotency_key.clone());
        if let Some((hash, first)) = self.firsts.get(&id) {
            return Some(match first {
                _ if *hash != a.request_hash => Err(super::key_reused(&a.idempotency_key)),
                First::Recorded(purchase_id) => Ok(Outcome::Replayed(purchase_id.clone())),
                First::Refused(e) => Err(e.duplicate()),
            });
        }
        let Some(prepared) = self.prepared.as_mut() else {
            return Some(Err(Error::internal(anyhow::anyhow!("the batch's purchases were not prepared"))));
        };
        if let Some((purchase_id, hash)) = prepared.existing.get(&id) {
            return Some(if *hash == a.request_hash {
                Ok(Outcome::Replayed(purchase_id.clone()))
            } else {
                Err(super::key_reused(&a.idempotency_key))
            });
        }
        let p = &a.purchase;
        let checked = (|| {
            let (tier, buyer) = users
                .get(p.buyer_id.as_str())
                .copied()
                .ok_or_else(|| Error::NotFound(format!("buyer {} has no account", p.buyer_id)))?;
            let (_, seller) = users
                .get(p.seller_id.as_str())
                .copied()
                .ok_or_else(|| Error::internal(anyhow::anyhow!("seller account {} missing", p.seller_id)))?;
            let spent = sent.get(&(p.buyer_id.to_string(), p.amount.currency().code().to_owned())).copied();
            crate::payments::model::check_send_rules(buyer, seller, config.limits(tier), p.amount, spent.unwrap_or(0))?;
            let listing: &mut Listing = prepared
                .listings
                .get_mut(p.listing_id.as_str())
                .ok_or_else(|| Error::not_found(format!("listing {}", p.listing_id)))?;
            listing.check_open(now_us)?;
            let bought = prepared.bought.get(&(p.listing_id.to_string(), p.buyer_id.to_string())).copied().unwrap_or(0);
            if bought + p.quantity > listing.per_buyer_max {
                return Err(per_buyer_limit(listing.per_buyer_max, bought));
            }
            if let Some(q) = listing.quantity {
                let left = (q - listing.sold).max(0);
                if p.quantity > left {
                    // The count it saw, for the caller's cache of the listing.
                    a.units_sold.store(listing.sold, Ordering::Relaxed);
                    return Err(sold_out(&p.listing_id, left));
                }
            }
            if let Some(tab_id) = &p.tab_id {
                // The tab was checked to be the buyer's and this stream's when the
                // purchase was made; its state and spend are checked here, under its lock.
                let tab = self.tabs.get_mut(tab_id.as_str()).ok_or_else(|| tab_not_open(tab_id))?;
                if tab.status != TabStatus::Open || tab.expires_at_us <= now_us {
                    return Err(tab_not_open(tab_id));
                }
                let left = tab.cap.minor() - tab.spent.minor();
                if p.tab_draw() > left {
                    return Err(tab_cap(tab_id, crate::kernel::money::Money::from_minor(tab.cap.currency(), left)));
                }
                tab.spent =
                    crate::kernel::money::Money::from_minor(tab.cap.currency(), tab.spent.minor() + p.tab_draw());
            }
            // Taken now; given back in `decided` if the ledger refuses the money.
            listing.sold += p.quantity;
            *prepared.bought.entry((p.listing_id.to_string(), p.buyer_id.to_string())).or_insert(0) += p.quantity;
            Ok(())
        })();
        match checked {
            Ok(()) => {
                self.taken.insert(cmd, a.purchase.quantity);
                None
            }
            Err(e) => {
                self.firsts.insert(id, (a.request_hash.clone(), First::Refused(e.duplicate())));
                Some(Err(e))
            }
        }
    }

    /// Right after purchase `cmd`'s ledger decision. `sent` gains what it spent.
    pub fn decided(
        &mut self,
        cmd: usize,
        result: std::result::Result<(), &Error>,
        sent: &mut HashMap<(String, String), i64>,
    ) {
        let Some(a) = self.items.get(&cmd) else { return };
        let Some(units) = self.taken.remove(&cmd) else { return };
        let p = &a.purchase;
        let id = (p.buyer_id.to_string(), a.idempotency_key.clone());
        let Some(prepared) = self.prepared.as_mut() else { return };
        match result {
            Ok(()) => {
                *sent.entry((p.buyer_id.to_string(), p.amount.currency().code().to_owned())).or_insert(0) +=
                    p.amount.minor();
                let sold = prepared.listings.get(p.listing_id.as_str()).map_or(0, |l| l.sold);
                a.units_sold.store(sold, Ordering::Relaxed);
                self.rows.push((cmd, sold));
                self.firsts.insert(id, (a.request_hash.clone(), First::Recorded(p.purchase_id.to_string())));
            }
            Err(e) => {
                if let Some(l) = prepared.listings.get_mut(p.listing_id.as_str()) {
                    l.sold -= units;
                }
                if let Some(t) = p.tab_id.as_ref().and_then(|t| self.tabs.get_mut(t.as_str())) {
                    t.spent = crate::kernel::money::Money::from_minor(t.cap.currency(), t.spent.minor() - p.tab_draw());
                }
                if let Some(b) = prepared.bought.get_mut(&(p.listing_id.to_string(), p.buyer_id.to_string())) {
                    *b -= units;
                }
                self.firsts.insert(id, (a.request_hash.clone(), First::Refused(e.duplicate())));
            }
        }
    }

    /// What the rules read needs for the batch's purchases.
    pub fn shop_keys(&self) -> ShopKeys<'_> {
        ShopKeys { keys: self.keys(), listings: self.listing_ids(), pairs: self.pairs() }
    }

    /// The outbox events of the purchases written, one each.
    pub fn events(&self) -> Vec<EventFields> {
        self.rows
            .iter()
            .filter_map(|(cmd, sold)| {
                self.items.get(cmd).map(|a| EventFields::purchase("purchase.completed", &a.purchase, *sold))
            })
            .collect()
    }

    /// The purchases to write, and each written listing's count increase.
    pub fn rows(&self) -> BatchShop<'_> {
        let rows: Vec<BatchPurchase<'_>> = self
            .rows
            .iter()
            .filter_map(|(cmd, _)| {
                self.items.get(cmd).map(|a| BatchPurchase {
                    purchase: &a.purchase,
                    key: &a.idempotency_key,
                    hash: &a.request_hash,
                })
            })
            .collect();
        let mut delta: HashMap<&str, i64> = HashMap::new();
        for r in &rows {
            *delta.entry(r.purchase.listing_id.as_str()).or_insert(0) += r.purchase.quantity;
        }
        let mut delta: Vec<(&str, i64)> = delta.into_iter().collect();
        delta.sort_unstable();
        BatchShop { purchases: rows, sold: delta }
    }

    /// What each tab's purchases in the batch added to its spend.
    pub fn tab_spend(&self) -> Vec<(&str, i64)> {
        let mut spend: HashMap<&str, i64> = HashMap::new();
        for (cmd, _) in &self.rows {
            if let Some(a) = self.items.get(cmd) {
                if let Some(t) = &a.purchase.tab_id {
                    *spend.entry(t.as_str()).or_insert(0) += a.purchase.tab_draw();
                }
            }
        }
        let mut spend: Vec<(&str, i64)> = spend.into_iter().collect();
        spend.sort_unstable();
        spend
    }

    /// The spend of the purchases written: (buyer, currency, hour) -> amount.
    pub fn spend(&self) -> impl Iterator<Item = (&str, &str, i64, i64)> {
        self.rows.iter().filter_map(|(cmd, _)| {
            self.items.get(cmd).map(|a| {
                let p = &a.purchase;
                (
                    p.buyer_id.as_str(),
                    p.amount.currency().code(),
                    crate::payments::spend::hour_of(p.created_at_us),
                    p.amount.minor(),
                )
            })
        })
    }
}
