//! Listings recently read for purchases, kept for a second: a flash sale's taps read
//! their listing from memory, and the taps that miss it together read it once.

use std::sync::Arc;

use super::super::Payments;
use super::model::Listing;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::ListingId;

/// How long a listing read for a purchase is reused. The batch checks the listing
/// again under its lock (open, stock, per-buyer count); what the cache decides is only
/// the price and the refusals answered before the batch (a sold-out listing, one not
/// open yet or any more), so a stale entry costs at most a refusal in the batch instead
/// of before it, or a commission override changed this long ago not yet applied.
const LISTING_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Listings the cache holds; past this it starts over.
const LISTING_CACHE_MAX: usize = 10_000;

/// Listings recently read for purchases, with their seller's commission override and
/// whether the seller is one: a flash sale's taps read their listing from memory
/// instead of the database.
#[derive(Default)]
pub struct ListingCache {
    entries: std::sync::Mutex<std::collections::HashMap<ListingId, (std::time::Instant, ForSale)>>,
    /// One gate per listing being read: the taps that miss a listing together (a
    /// sale's first wave) wait for one read instead of each making their own. An entry
    /// lives only while its read does.
    loading: std::sync::Mutex<std::collections::HashMap<ListingId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A listing as a purchase sees it.
#[derive(Clone)]
pub(crate) struct ForSale {
    pub listing: Listing,
    pub commission_bps: Option<i32>,
    pub is_seller: bool,
}

impl ListingCache {
    pub(super) fn get(&self, id: &ListingId) -> Option<ForSale> {
        let map = self.entries.lock().ok()?;
        map.get(id).filter(|(at, _)| at.elapsed() < LISTING_CACHE_TTL).map(|(_, f)| f.clone())
    }

    pub(super) fn put(&self, f: ForSale) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() >= LISTING_CACHE_MAX {
                map.clear();
            }
            map.insert(f.listing.listing_id.clone(), (std::time::Instant::now(), f));
        }
    }

    /// Drops a listing changed here (stock added or put back, closed), so this process's
    /// next taps read it again; other processes' entries expire.
    pub(super) fn forget(&self, id: &ListingId) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(id);
        }
    }

    /// What a batch learnt of the listing's count: it only grows the cached one (a
    /// restock shows once the entry expires).
    pub(super) fn saw_sold(&self, id: &ListingId, sold: i64) {
        if let Ok(mut map) = self.entries.lock() {
            if let Some((_, f)) = map.get_mut(id) {
                f.listing.sold = f.listing.sold.max(sold);
            }
        }
    }
}

impl Payments {
    /// A listing as a purchase sees it: from the cache, else read once for every tap
    /// that misses it meanwhile.
    pub(super) async fn for_sale(&self, id: &ListingId) -> Result<ForSale> {
        if let Some(f) = self.listings.get(id) {
            return Ok(f);
        }
        let gate = match self.listings.loading.lock() {
            Ok(mut loading) => loading.entry(id.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let read = {
            let _turn = gate.lock().await;
            match self.listings.get(id) {
                // Read by the tap that held the gate before this one.
                Some(f) => Ok(f),
                None => self.store.listing_for_sale(id).await.and_then(|found| {
                    let (listing, commission_bps, is_seller) =
                        found.ok_or_else(|| Error::NotFound(format!("listing_id: listing {id} not found")))?;
                    let f = ForSale { listing, commission_bps, is_seller };
                    self.listings.put(f.clone());
                    Ok(f)
                }),
            }
        };
        if let Ok(mut loading) = self.listings.loading.lock() {
            // The last tap through the gate takes it down (the map's own reference and
            // this one are all that is left).
            if loading.get(id).is_some_and(|g| Arc::strong_count(g) <= 2) {
                loading.remove(id);
            }
        }
        read
    }
}
