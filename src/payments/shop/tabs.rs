//! Stream tabs: a viewer authorizes their card once for a stream, up to a cap they
//! choose within their limits; purchases in the stream draw on the tab in the posting
//! engine's batch without another card call (`shop::batch`); when the tab closes (the
//! viewer closes it, the stream ends, or it expires) its spend is captured once and the
//! rest of the authorization released.
//!
//! Every step is idempotent under a key derived from the tab's id (`tab:<id>:auth`,
//! `:capture`, `:void`, `:settle`), and what the closing captures is fixed in the tab's
//! row before the card is touched, so a crash at any point is finished by the resolver
//! (`resolve_tabs`) without capturing twice or losing a purchase: a purchase either
//! committed before the closing (and is in the fixed amount) or finds the tab closing
//! and is refused.
//!
//! Money: a purchase on a tab debits the viewer's `user:<id>:tab:<CCY>` (an asset: the
//! card owes it) instead of their wallet; the capture books the processor's clearing
//! account against it, back to zero.

use super::super::repo::tabs::TabInserted;
use super::super::Payments;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{TabId, UserId};
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, SYSTEM_CLEARING};
use crate::payments::listing::{check_stream_id, Tab, TabKind, TabStatus};
use crate::processor::ProcessorError;

/// Tabs the resolver finishes per tick.
const RESOLVE_TABS_MAX: i64 = 100;
/// Tabs closed at once when a stream ends; the resolver closes the rest as they expire.
const END_STREAM_TABS_MAX: i64 = 1_000;

fn key(tab: &TabId, step: &str) -> String {
    format!("tab:{tab}:{step}")
}

/// `OpenTab` after wire parsing.
pub struct OpenTabInput {
    pub idempotency_key: String,
    pub stream_id: String,
    pub cap: Money,
    pub payment_method_token: Option<String>,
}

/// A card call's outcome, for a tab.
enum Card {
    Done(String),
    Refused(Reason, String),
    Unknown,
}

fn card(r: std::result::Result<String, ProcessorError>) -> Card {
    match r {
        Ok(reference) => Card::Done(reference),
        Err(ProcessorError::Declined(code)) => Card::Refused(code.reason(), code.message().to_owned()),
        Err(ProcessorError::Failed(_)) => {
            Card::Refused(Reason::ProcessingError, "the card processor could not process the charge".into())
        }
        Err(ProcessorError::Unknown) => Card::Unknown,
    }
}

impl Payments {
    /// `OpenTab`: records the tab, then authorizes the card for the cap.
    pub async fn open_tab(&self, buyer: &UserId, input: OpenTabInput) -> Result<Tab> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        check_stream_id("stream_id", &input.stream_id)?;
        let hash = crate::ledger::hash_request(&serde_json::json!({
            "stream": input.stream_id,
            "currency": input.cap.currency().code(),
            "cap": input.cap.minor(),
            "token": input.payment_method_token,
        }));
        if self.owes(buyer) {
            return Err(super::super::disputes::owing());
        }
        let account = self.accounts.ensure(buyer).await?;
        if account.status == crate::accounts::Status::Frozen {
            return Err(Error::FailedPrecondition {
                reason: Reason::AccountFrozen,
                message: "your account is frozen".into(),
            });
        }
        // The cap is what the card is authorized for: within the rolling daily limit
        // (each purchase on the tab is still checked against the limits as it is made).
        let limits = self.config.limits(account.tier);
        let daily_max = crate::payments::model::major_to_minor(limits.daily_max, input.cap.currency());
        if input.cap.minor() > daily_max {
            return Err(Error::ResourceExhausted {
                reason: Reason::DailyLimit,
                message: format!(
                    "a tab's cap is at most your daily limit, {}",
                    Money::from_minor(input.cap.currency(), daily_max)
                ),
            });
        }
        if let Some(token) = &input.payment_method_token {
            self.check_own_card(buyer, token).await?;
        } else if !self.has_default_card(buyer).await? {
            return Err(Error::FailedPrecondition {
                reason: Reason::NoPaymentMethod,
                message: "no default payment method; link a card first".into(),
            });
        }
        let now = self.now_us();
        let tab = Tab {
            tab_id: TabId::generate(),
            buyer_id: buyer.clone(),
            stream_id: input.stream_id,
            cap: input.cap,
            spent: Money::zero(input.cap.currency()),
            status: TabStatus::Opening,
            payment_method_token: input.payment_method_token,
            authorization_ref: None,
            capture_ref: None,
            captured: None,
            failure_reason: String::new(),
            failure_message: String::new(),
            expires_at_us: now.saturating_add(self.config.shop.tab_ttl_s.saturating_mul(1_000_000)),
            created_at_us: now,
            closed_at_us: None,
            kind: TabKind::Stream,
        };
        let tab = match self.store.insert_tab(&tab, &input.idempotency_key, &hash).await? {
            TabInserted::New(t) => t,
            TabInserted::Existing(t, h) if h == hash => t,
            TabInserted::Existing(..) => {
                return Err(Error::AlreadyExists(format!(
                    "idempotency_key {:?} was already used for a different tab",
                    input.idempotency_key
                )))
            }
        };
        match tab.status {
            TabStatus::Opening => self.finish_opening(tab).await,
            TabStatus::Failed => Err(Error::FailedPrecondition {
                reason: Reason::from_db(&tab.failure_reason).unwrap_or(Reason::PaymentFailed),
                message: tab.failure_message,
            }),
            _ => Ok(tab),
        }
    }

    /// Authorizes an opening tab's card (asking the processor first whether an earlier
    /// attempt did) and opens it, or fails it with the decline.
    pub(super) async fn finish_opening(&self, tab: Tab) -> Result<Tab> {
        let processor = self.vault.processor().clone();
        let auth_key = key(&tab.tab_id, "auth");
        let outcome = match processor.lookup(&auth_key).await {
            Ok(Some(record)) => card(record.outcome.map(|()| record.reference)),
            Ok(None) => {
                let c = self.vault.chargeable(&tab.buyer_id, tab.payment_method_token.as_deref(), "charge").await;
                match c {
                    Ok(c) => card(processor.authorize(&auth_key, c.details(), tab.cap).await),
                    Err(Error::FailedPrecondition { reason, message }) => Card::Refused(reason, message),
                    Err(Error::NotFound(m)) => Card::Refused(Reason::NoPaymentMethod, m),
                    Err(e) => return Err(e),
                }
            }
            Err(_) => Card::Unknown,
        };
        match outcome {
            Card::Done(reference) => {
                let opened = self.store.open_tab(&tab.tab_id, &reference).await?;
                match opened {
                    Some(t) => Ok(t),
                    None => self.store.tab(&tab.tab_id).await?.ok_or_else(|| Error::not_found("tab")),
                }
            }
            Card::Refused(reason, message) => {
                self.store.fail_tab(&tab.tab_id, reason.as_str(), &message).await?;
                Err(Error::FailedPrecondition { reason, message })
            }
            // Left opening: the resolver asks the processor again.
            Card::Unknown => Ok(tab),
        }
    }

    /// `GetTab`: the viewer's own, or any for the platform.
    pub async fn get_tab(&self, caller: Option<&UserId>, id: &TabId) -> Result<Tab> {
        match self.store.tab(id).await? {
            Some(t) if caller.is_none_or(|c| *c == t.buyer_id) => Ok(t),
            _ => Err(Error::NotFound(format!("tab {id} not found"))),
        }
    }

    /// `CloseTab`: no more purchases; the spend is captured once, the rest released.
    pub async fn close_stream_tab(&self, caller: Option<&UserId>, id: &TabId) -> Result<Tab> {
        let tab = self.get_tab(caller, id).await?;
        if tab.status == TabStatus::Opening {
            return Err(crate::payments::listing::tab_not_open(id));
        }
        let tab = self.store.start_closing_tab(id).await?.ok_or_else(|| Error::not_found("tab"))?;
        self.finish_closing(tab).await
    }

    /// Captures a closing tab's fixed amount (or voids its authorization when nothing
    /// was spent), books the capture, and closes it. Each step asks the processor
    /// first whether an earlier attempt made it.
    pub(super) async fn finish_closing(&self, tab: Tab) -> Result<Tab> {
        if tab.status != TabStatus::Closing {
            return Ok(tab);
        }
        let (Some(captured), Some(authorization)) = (tab.captured, tab.authorization_ref.clone()) else {
            return Err(Error::internal(anyhow::anyhow!("closing tab {} without its amount", tab.tab_id)));
        };
        let processor = self.vault.processor().clone();
        let currency = tab.cap.currency();
        let step = if captured == 0 { "void" } else { "capture" };
        let k = key(&tab.tab_id, step);
        let outcome = match processor.lookup(&k).await {
            Ok(Some(record)) => card(record.outcome.map(|()| record.reference)),
            Ok(None) if captured == 0 => card(processor.void(&k, &authorization).await),
            Ok(None) => card(processor.capture(&k, &authorization, Money::from_minor(currency, captured)).await),
            Err(_) => Card::Unknown,
        };
        match outcome {
            Card::Done(reference) => {
                if captured > 0 {
                    let money = Money::from_minor(currency, captured);
                    self.post_shop_transfer(
                        key(&tab.tab_id, "settle"),
                        "tab_capture",
                        (
                            AccountCode::system(SYSTEM_CLEARING, currency),
                            AccountCode::tab(&tab.buyer_id, currency),
                            money,
                        ),
                        &[("tab_id", tab.tab_id.as_str()), ("processor_reference", &reference)],
                    )
                    .await?;
                }
                let r = (captured > 0).then_some(reference.as_str());
                match self.store.close_tab(&tab.tab_id, r).await? {
                    Some(t) => Ok(t),
                    None => self.store.tab(&tab.tab_id).await?.ok_or_else(|| Error::not_found("tab")),
                }
            }
            Card::Refused(reason, message) => {
                // The card would not pay what the viewer bought: the tab account keeps
                // it as owed, for finance to collect; the sellers keep their sales.
                tracing::error!(tab_id = %tab.tab_id, reason = reason.as_str(), "a tab's capture was refused");
                self.store.fail_tab(&tab.tab_id, reason.as_str(), &message).await?;
                self.store.tab(&tab.tab_id).await?.ok_or_else(|| Error::not_found("tab"))
            }
            // Left closing: the resolver asks again.
            Card::Unknown => Ok(tab),
        }
    }

    /// `EndStream`: the platform ends a live stream: its listings close and its open
    /// tabs close (capturing their spend). Answers how many tabs it closed now.
    pub async fn end_stream(&self, stream_id: &str) -> Result<(u64, u64)> {
        check_stream_id("stream_id", stream_id)?;
        let listings = self.store.close_stream_listings(stream_id).await?;
        let mut closed = 0;
        for tab in self.store.open_tabs_of_stream(stream_id, END_STREAM_TABS_MAX).await? {
            if tab.status != TabStatus::Open {
                continue;
            }
            match self.store.start_closing_tab(&tab.tab_id).await? {
                Some(t) => {
                    if self.finish_closing(t).await?.status == TabStatus::Closed {
                        closed += 1;
                    }
                }
                None => continue,
            }
        }
        Ok((listings, closed))
    }

    /// The resolver's part: tabs left opening or closing (a crash, an unknown card
    /// outcome), and open tabs past their expiry.
    pub(crate) async fn resolve_tabs(&self) -> Result<usize> {
        let stale_before = self.now_us().saturating_sub(self.lease_us());
        let mut n = 0;
        for tab in self.store.due_tabs(stale_before, RESOLVE_TABS_MAX).await? {
            let id = tab.tab_id.clone();
            let result = match tab.status {
                TabStatus::Opening => self.finish_opening(tab).await,
                TabStatus::Open => match self.store.start_closing_tab(&id).await? {
                    Some(t) => self.finish_closing(t).await,
                    None => continue,
                },
                TabStatus::Closing => self.finish_closing(tab).await,
                _ => continue,
            };
            match result {
                Ok(_) | Err(Error::FailedPrecondition { .. }) => n += 1,
                Err(e) => tracing::warn!(tab_id = %id, error = %e, "tab not finished yet; will retry"),
            }
        }
        Ok(n)
    }
}
