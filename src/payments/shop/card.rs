//! Purchases paid by card, in full (`FUNDING_SOURCE_CARD`) or for what the wallet cannot
//! cover (`AUTO`). The card is authorized first, through a single-purchase tab (kind
//! `purchase`): the purchase then draws on it in the posting engine's batch, where its
//! stock is decided with its money as for any purchase, and the tab is closed at once:
//! captured when the purchase was made, voided when it was refused (sold out, a limit),
//! so a refused buyer is charged nothing and their unit was never taken.
//!
//! Crash safety is the tabs' (`shop::tabs`): the tab is recorded before the card is
//! touched, every card call is idempotent under a key derived from the tab, and what the
//! closing captures is the tab's spend, fixed in its row, which only a committed purchase
//! adds to. A tab left open by a crash expires after `CARD_TAB_TTL` and the resolver
//! closes it: it captures the purchase if it was committed, else voids the authorization.

use super::{Purchase, Sale};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::TabId;
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::payments::listing::{Tab, TabKind, TabStatus};
use crate::payments::model::FundingSource;
use crate::payments::Payments;

/// How long a card purchase's authorization waits for its purchase before the resolver
/// may close it. The purchase reaches the batch within milliseconds of its
/// authorization; this only bounds how long a crash between the two holds the buyer's
/// card, with room for a slow processor.
const CARD_TAB_TTL_US: i64 = 60 * 1_000_000;

impl Payments {
    /// Authorizes the card for the purchase's card part and its fee, submits the
    /// purchase drawing on that authorization, then captures it or voids it.
    pub(super) async fn purchase_by_card(
        &self,
        mut sale: Sale<'_>,
        input: &super::PurchaseInput,
    ) -> Result<(Purchase, i64)> {
        let buyer = sale.purchase.buyer_id.clone();
        // The slow path: make sure of the account before a card is touched.
        self.ensure_user(&buyer).await?;
        sale.known = true;
        // A retry of a purchase already made answers it, without another card call.
        if let Some((p, h)) = self.store.purchase_by_key(&buyer, sale.key).await? {
            return if h == sale.hash {
                self.purchase_as_recorded(&p.purchase_id).await
            } else {
                Err(super::key_reused(sale.key))
            };
        }
        let amount = sale.purchase.amount;
        let currency = amount.currency();
        let wallet_part = match input.funding {
            FundingSource::Auto => {
                let wallet = self.ledger.accounts().wallet(&buyer, currency).await?;
                let available = self.ledger.accounts().balance(wallet.id).await?.available(true).unwrap_or(0);
                available.clamp(0, amount.minor())
            }
            _ => 0,
        };
        let card_part = amount.minor() - wallet_part;
        if card_part == 0 {
            // The wallet was topped up since its attempt: a wallet purchase after all.
            return self.submit_purchase(&sale).await;
        }
        // The rules a card cannot change, checked before it is touched, so a purchase
        // the batch would refuse for them costs no authorization: the account's status
        // and the tier's limits (the batch checks them again under its locks).
        let account = self.accounts.get(&buyer).await?.ok_or_else(|| Error::not_found("buyer account"))?;
        let sent = crate::payments::repo::spend::sent(self.store.db(), &buyer, currency, self.now_us()).await?;
        crate::payments::model::check_send_rules(
            account.status,
            crate::accounts::Status::Active,
            self.config.limits(account.tier),
            amount,
            sent,
        )?;
        let fee = self.config.card_fee(card_part);
        let cap = card_part
            .checked_add(fee)
            .filter(|c| *c <= crate::kernel::money::AMOUNT_MINOR_MAX)
            .ok_or_else(|| Error::invalid("quantity", "the total with the card fee is too large"))?;
        match &input.payment_method_token {
            Some(token) => self.check_own_card(&buyer, token).await?,
            None if !self.has_default_card(&buyer).await? => {
                return Err(Error::FailedPrecondition {
                    reason: Reason::NoPaymentMethod,
                    message: if input.funding == FundingSource::Auto {
                        "insufficient wallet balance and no default card to charge the rest".into()
                    } else {
                        "no default payment method; link a card first".into()
                    },
                });
            }
            None => {}
        }

        let now = self.now_us();
        let tab = Tab {
            tab_id: TabId::generate(),
            buyer_id: buyer.clone(),
            stream_id: sale.purchase.stream_id.clone(),
            cap: Money::from_minor(currency, cap),
            spent: Money::zero(currency),
            status: TabStatus::Opening,
            payment_method_token: input.payment_method_token.clone(),
            authorization_ref: None,
            capture_ref: None,
            captured: None,
            failure_reason: String::new(),
            failure_message: String::new(),
            expires_at_us: now.saturating_add(CARD_TAB_TTL_US),
            created_at_us: now,
            closed_at_us: None,
            kind: TabKind::Purchase,
        };
        // Each attempt authorizes under a tab of its own, keyed by its purchase id: a
        // retry that finds no purchase made (the first attempt was refused, or crashed)
        // starts afresh, and the earlier authorization is voided by its own attempt or
        // by the resolver.
        let tab_key = format!("purchase:{}", sale.purchase.purchase_id);
        let tab = match self.store.insert_tab(&tab, &tab_key, sale.hash).await? {
            crate::payments::repo::tabs::TabInserted::New(t) => t,
            crate::payments::repo::tabs::TabInserted::Existing(t, _) => t,
        };
        let tab = self.finish_opening(tab).await?;
        if tab.status != TabStatus::Open {
            // The processor did not answer: the resolver asks it again and voids what it
            // authorized once the tab expires.
            return Err(Error::Unavailable("the card processor did not answer; retry with the same key".into()));
        }

        sale.purchase.tab_id = Some(tab.tab_id.clone());
        sale.purchase.wallet_amount = Money::from_minor(currency, wallet_part);
        sale.purchase.card_amount = Money::from_minor(currency, card_part);
        sale.purchase.fee_amount = Money::from_minor(currency, fee);
        let result = self.submit_purchase(&sale).await;
        // Capture what the purchase drew (its spend, fixed now), or void the
        // authorization when it drew nothing. A failure here leaves the tab to the
        // resolver; the purchase's answer does not change.
        if let Err(e) = self.close_purchase_tab(&tab.tab_id).await {
            tracing::warn!(tab_id = %tab.tab_id, error = %e, "card purchase's tab not closed yet; the resolver will");
        }
        match result {
            Err(Error::FailedPrecondition { reason: Reason::TabNotOpen | Reason::TabCap, .. }) => {
                // The authorization expired (or the stream ended) before the purchase
                // reached the batch: nothing was bought or charged.
                Err(Error::Unavailable("the card authorization lapsed before the purchase; retry".into()))
            }
            other => other,
        }
    }

    async fn close_purchase_tab(&self, id: &TabId) -> Result<()> {
        if let Some(t) = self.store.start_closing_tab(id).await? {
            self.finish_closing(t).await?;
        }
        Ok(())
    }
}
