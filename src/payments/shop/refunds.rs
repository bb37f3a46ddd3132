//! Sellers' refunds of purchases: money back to the buyer (the commission part from the
//! platform, the rest from the sale's pending money while held, else the seller's
//! wallet) and optionally units back on sale. A refund is recorded first, then posted
//! under a key derived from its id, by one attempt at a time.

use super::{key_reused, Actor, RESOLVE_BATCH_MAX};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::PurchaseId;
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, Direction, PostingInput, SYSTEM_COMMISSIONS};
use crate::payments::listing::Purchase;
use crate::payments::repo::shop::refunds::RefundRow;
use crate::payments::Payments;

/// A refund whose attempt has not moved for this long may be taken over by a retry with
/// its key (the attempt crashed or stalled). A takeover posts, but never fails the
/// refund: the attempt it took over may still have its post in flight, and a refused
/// takeover followed by that post succeeding would leave money moved under a failed
/// refund.
const REFUND_RESUME_AFTER_US: i64 = 30_000_000;
/// A refund whose attempt has not moved for this long is abandoned: its post, if any,
/// finished long ago (the posting engine answers within its batch timeout and queue),
/// so the resolver takes it over and may fail it when the money cannot move.
const REFUND_ABANDONED_AFTER_US: i64 = 300_000_000;

/// `RefundPurchase` after wire parsing.
pub struct RefundInput {
    pub purchase_id: PurchaseId,
    /// `None`: what is left.
    pub amount: Option<Money>,
    pub restock: i64,
    pub idempotency_key: String,
}

impl Payments {
    /// `RefundPurchase`, by the seller (or the platform): money back to the buyer and,
    /// optionally, units back on sale. Retry-safe under the key.
    pub async fn refund_purchase(&self, actor: &Actor<'_>, input: RefundInput) -> Result<Purchase> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        if input.restock < 0 {
            return Err(Error::invalid("restock_quantity", "must not be negative"));
        }
        let p = match self.store.purchase(&input.purchase_id).await? {
            Some(p) if actor.may_act_for(&p.seller_id) => p,
            _ => return Err(Error::NotFound(format!("purchase {} not found", input.purchase_id))),
        };
        if let Some(a) = input.amount {
            if a.currency() != p.amount.currency() {
                return Err(Error::invalid("amount", format!("the purchase was paid in {}", p.amount.currency())));
            }
        }
        let hash = crate::ledger::hash_request(&serde_json::json!({
            "amount": input.amount.map(|a| a.minor()),
            "restock": input.restock,
        }));
        let (refund, ours) = match self.store.refund_by_key(&input.purchase_id, &input.idempotency_key).await? {
            Some(r) => (r, false),
            None => {
                self.store
                    .insert_refund(
                        &input.purchase_id,
                        input.amount.map(|a| a.minor()),
                        input.restock,
                        &input.idempotency_key,
                        &hash,
                        self.config.shop.refunds_per_purchase_max,
                    )
                    .await?
            }
        };
        if refund.request_hash != hash {
            return Err(key_reused(&input.idempotency_key));
        }
        match refund.status.as_str() {
            "pending" if ours => self.finish_purchase_refund(&refund, &p, true).await,
            "pending" => {
                // Another attempt is working on it; take it over only when that one
                // has outlived its lease (it crashed or stalled), so that one attempt
                // at a time moves the money and only it may fail the refund.
                let stale_before = self.now_us().saturating_sub(REFUND_RESUME_AFTER_US);
                match self.store.claim_refund(&refund, stale_before).await? {
                    Some(claimed) => self.finish_purchase_refund(&claimed, &p, false).await,
                    None => self.refund_outcome(&refund.refund_id, &p).await,
                }
            }
            _ => self.refund_outcome(&refund.refund_id, &p).await,
        }
    }

    /// What a refund came to, for a caller that did not (or no longer) drive it: the
    /// purchase once posted, the refusal once failed, ABORTED while another attempt
    /// still works on it (a retry with the same key then answers).
    async fn refund_outcome(&self, refund_id: &str, p: &Purchase) -> Result<Purchase> {
        let status = self.store.refund(refund_id).await?.map(|r| r.status);
        match status.as_deref() {
            Some("posted") => self.store.purchase(&p.purchase_id).await?.ok_or_else(|| Error::not_found("purchase")),
            Some("failed") => Err(Error::FailedPrecondition {
                reason: Reason::InsufficientFunds,
                message: "this refund failed: the seller's wallet could not cover it".into(),
            }),
            _ => Err(Error::Aborted),
        }
    }

    /// Moves a recorded refund's money (idempotent under the refund's id) and finishes it.
    /// When the ledger refuses the money, the refund fails only if `may_fail` (the
    /// attempt that recorded it, or the takeover of an abandoned one); a takeover of a
    /// recent attempt leaves it pending and answers UNAVAILABLE.
    async fn finish_purchase_refund(&self, r: &RefundRow, p: &Purchase, may_fail: bool) -> Result<Purchase> {
        let currency = p.amount.currency();
        let money = |m| Money::from_minor(currency, m);
        let seller_part = r.amount - r.commission;
        let from = if r.source == "pending" {
            AccountCode::sales_pending(&p.seller_id, currency)
        } else {
            AccountCode::wallet(&p.seller_id, currency)
        };
        let mut postings = vec![PostingInput {
            account_code: AccountCode::wallet(&p.buyer_id, currency),
            direction: Direction::Credit,
            amount: money(r.amount),
        }];
        if seller_part > 0 {
            postings.push(PostingInput { account_code: from, direction: Direction::Debit, amount: money(seller_part) });
        }
        if r.commission > 0 {
            postings.push(PostingInput {
                account_code: AccountCode::system(SYSTEM_COMMISSIONS, currency),
                direction: Direction::Debit,
                amount: money(r.commission),
            });
        }
        let posted = self
            .post_shop_entry(
                format!("shop:{}:refund", r.refund_id),
                "shop_refund",
                postings,
                &[("purchase_id", p.purchase_id.as_str()), ("refund_id", &r.refund_id)],
            )
            .await;
        match posted {
            Ok(_) => {
                let done = self.store.finish_refund(r).await?;
                self.listings.forget(&p.listing_id);
                self.store.notify();
                match done {
                    Some(p) => Ok(p),
                    None => self.store.purchase(&p.purchase_id).await?.ok_or_else(|| Error::not_found("purchase")),
                }
            }
            // Refused for good (the wallet cannot cover it, an account is frozen): the
            // refund fails and its counts go back, if this attempt may decide that.
            Err(e @ Error::FailedPrecondition { .. }) => {
                let reason = match &e {
                    Error::FailedPrecondition { reason, .. } => *reason,
                    _ => Reason::InsufficientFunds,
                };
                if !may_fail {
                    return Err(Error::Unavailable(format!(
                        "the refund stays pending: {e}; retry with the same key later"
                    )));
                }
                if self.store.fail_refund(r, reason.as_str()).await? {
                    Err(match reason {
                        Reason::InsufficientFunds => Error::FailedPrecondition {
                            reason,
                            message: format!("the seller's wallet cannot cover the refund ({e})"),
                        },
                        _ => e,
                    })
                } else {
                    // A later attempt took the refund over (this one outlived its
                    // lease) and may have moved the money: it decides, not this one.
                    self.refund_outcome(&r.refund_id, p).await
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The resolver's part for purchase refunds: the abandoned ones, finished or failed.
    pub(super) async fn resolve_purchase_refunds(&self) -> Result<usize> {
        let mut n = 0;
        // Only abandoned refunds: a recent attempt may still have its post in flight
        // (see REFUND_ABANDONED_AFTER_US), and a caller's retry resumes those sooner.
        let before = self.now_us().saturating_sub(REFUND_ABANDONED_AFTER_US);
        for r in self.store.pending_refunds(before, RESOLVE_BATCH_MAX).await? {
            let Some(r) = self.store.claim_refund(&r, before).await? else { continue };
            let Some(p) = self.store.purchase(&PurchaseId::from_db(r.purchase_id.clone())).await? else { continue };
            match self.finish_purchase_refund(&r, &p, true).await {
                Ok(_) => n += 1,
                Err(e @ Error::FailedPrecondition { .. }) => {
                    tracing::info!(refund = %r.refund_id, error = %e, "purchase refund failed");
                }
                // Another attempt took the refund over meanwhile; it finishes it.
                Err(Error::Aborted) => {}
                // One refund's trouble (the database, say) must not hold up the others.
                Err(e) => tracing::warn!(refund = %r.refund_id, error = %e, "purchase refund not finished; will retry"),
            }
        }
        Ok(n)
    }
}
