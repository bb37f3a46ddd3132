//! `Purchase`: a one-tap purchase from the wire's input to the posting engine's batch,
//! where its rules and stock are decided with its money (`batch`). Refusals that need
//! no batch (a closed or sold-out listing, one's own listing) are answered here.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::{batch, key_reused, model, not_a_seller, ForSale, Purchase};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{ListingId, PurchaseId, UserId};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::{Direction, NewEntry, Op, Outcome, Posting, SYSTEM_COMMISSIONS, SYSTEM_FEES};
use crate::payments::model::FundingSource;
use crate::payments::{Payments, ACTOR};

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

impl Payments {
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
            Some(crate::payments::disputes::owing())
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
}
