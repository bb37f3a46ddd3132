//! Payouts: a user cashes out wallet money to their own linked card.
//!
//! - `super::payout` payouts, statuses, speeds, limits and the instant fee
//! - `settle`  the steps after the row: the ledger hold, the processor's push to the
//!   card, the posting, and the returns the processor reports later
//!
//! A payout is checked (frozen account, per-payout limit, the fee, whether the card
//! takes the speed), then recorded PENDING with its rolling 24-hour limit, the wallet's
//! available balance and the instant hold checked in the same atomic step
//! (`PaymentStore::insert_payout`). Then the wallet money is held by a pending ledger
//! entry, the processor pushes it to the card, and the hold is posted. Every step is
//! idempotent under a key derived from the payout id (`payout:<id>:hold`, `:push`,
//! `:post_hold`, `:paid`, `:void_hold`, `:return`), so a retry of the call or the
//! resolver resumes it from any point, and a push whose outcome is unknown is looked up
//! before it is ever made again.
//!
//! The ledger, per payout of `amount` with `fee` (the card receives `net = amount -
//! fee`): the hold debits the wallet `amount` and credits `platform:payouts_in_transit`
//! `net` and `platform:fees` `fee`; once paid, `:paid` moves `net` from in-transit to
//! the processor's clearing account (the processor paid the card on dmpay's behalf). A
//! return credits the wallet the whole `amount` back, `net` from clearing and the fee
//! from fee income.

mod settle;

use super::payout as model;
pub use super::payout::{Payout, PayoutLimits, PayoutSpeed, PayoutStatus, PayoutsConfig};

use super::repo::payouts::{InsertedPayout, PayoutChecks};
use super::repo::Claim;
use super::Payments;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{PayoutId, UserId};
use crate::kernel::money::Money;
use crate::kernel::page::Page;
use crate::kernel::reason::Reason;
use crate::ledger::AccountCode;

/// The account payouts pass through between the wallet and the processor.
pub const SYSTEM_PAYOUTS_IN_TRANSIT: &str = crate::ledger::SYSTEM_PAYOUTS_IN_TRANSIT;

/// Payouts per page of `ListPayouts`: the default and the most.
const PAGE_DEFAULT: u32 = 50;
const PAGE_MAX: u32 = 200;

/// `CreatePayout` after wire parsing.
pub struct PayoutInput {
    pub idempotency_key: String,
    pub amount: Money,
    pub speed: PayoutSpeed,
    /// The card to pay; `None` is the default card.
    pub payment_method_token: Option<String>,
}

impl PayoutInput {
    /// The digest a retry with the same key must match: everything the caller chose.
    fn request_hash(&self) -> String {
        crate::ledger::hash_request(&serde_json::json!({
            "currency": self.amount.currency().code(),
            "amount": self.amount.minor(),
            "speed": model::speed_as_str(self.speed),
            "token": self.payment_method_token,
        }))
    }
}

fn key_reused(key: &str) -> Error {
    Error::AlreadyExists(format!("idempotency_key {key:?} was already used for a different payout"))
}

fn nothing_available(currency: crate::kernel::money::Currency) -> Error {
    Error::FailedPrecondition {
        reason: Reason::InsufficientFunds,
        message: format!("your wallet has {} available to cash out", Money::zero(currency)),
    }
}

impl Payments {
    /// Replays a payout for a retry: the payout, or the error it failed with.
    fn replay_payout(p: Payout) -> Result<Payout> {
        match p.failure() {
            Some(e) => Err(e),
            None => Ok(p),
        }
    }

    /// `CreatePayout`: cashes `input.amount` out of the user's wallet to their card.
    pub async fn create_payout(&self, user: &UserId, input: PayoutInput) -> Result<Payout> {
        crate::ledger::check_idempotency_key("idempotency_key", &input.idempotency_key)?;
        let request_hash = input.request_hash();
        if let Some((existing, hash)) = self.store.payout_by_key(user, &input.idempotency_key).await? {
            if hash != request_hash {
                return Err(key_reused(&input.idempotency_key));
            }
            return Self::replay_payout(existing);
        }
        let currency = input.amount.currency();
        self.check_not_owing(user)?;
        let account = self.accounts.get(user).await?.ok_or_else(|| nothing_available(currency))?;
        if account.status == crate::accounts::Status::Frozen {
            return Err(Error::FailedPrecondition {
                reason: Reason::AccountFrozen,
                message: "your account is frozen".into(),
            });
        }
        let limits = self.config.payouts.limits(account.tier);
        model::check_payout_max(limits, input.amount)?;
        let fee = self.config.payouts.fee(input.speed, input.amount.minor());
        if fee >= input.amount.minor() {
            return Err(Error::invalid(
                "amount",
                format!("must be more than the instant payout fee of {}", Money::from_minor(currency, fee)),
            ));
        }
        // The user's own active card; the processor says which speeds it takes.
        let card = self.vault.chargeable(user, input.payment_method_token.as_deref(), "payout").await?;
        let support = self.vault.processor().payout_support(card.details());
        if (input.speed == PayoutSpeed::Instant && !support.instant) || !support.standard {
            return Err(Error::FailedPrecondition {
                reason: Reason::InstantPayoutUnavailable,
                message: "this card cannot receive instant payouts; choose a standard payout or a debit card".into(),
            });
        }
        // Reading is not a first use: no wallet means nothing to cash out.
        let wallet = match self.ledger.accounts().resolve("amount", &AccountCode::wallet(user, currency), false).await {
            Ok(w) => w,
            Err(Error::NotFound(_)) => return Err(nothing_available(currency)),
            Err(e) => return Err(e),
        };
        let now = self.now_us();
        let hold_s = self.config.payouts.instant_hold_s;
        let checks = PayoutChecks {
            wallet_account_id: wallet.id,
            daily_max_minor: crate::kernel::money::major_to_minor(limits.daily_max, currency),
            card_money_since_us: (input.speed == PayoutSpeed::Instant && hold_s > 0)
                .then(|| now.saturating_sub(hold_s.saturating_mul(1_000_000))),
        };
        let payout = Payout {
            payout_id: PayoutId::generate(),
            user_id: user.clone(),
            amount: input.amount,
            fee: Money::from_minor(currency, fee),
            speed: input.speed,
            payment_method_token: card.token.clone(),
            card_last4: card.pan.last4().to_owned(),
            status: PayoutStatus::Pending,
            failure_reason: String::new(),
            failure_message: String::new(),
            processor_ref: None,
            return_ref: None,
            hold_entry_id: None,
            created_at_us: now,
            paid_at_us: None,
            returned_at_us: None,
        };
        let claim = Claim::new();
        let until = now.saturating_add(self.lease_us());
        let inserted =
            self.store.insert_payout(&payout, &input.idempotency_key, &request_hash, &claim, until, &checks).await;
        let payout = match inserted {
            Ok(InsertedPayout::New(p)) => p,
            Ok(InsertedPayout::Existing(p, hash)) => {
                if hash != request_hash {
                    return Err(key_reused(&input.idempotency_key));
                }
                return Self::replay_payout(p);
            }
            // A concurrent call with this key may have gone through between the lookup
            // above and this refusal (using up the balance, say): answer as it did.
            Err(refusal @ (Error::FailedPrecondition { .. } | Error::ResourceExhausted { .. })) => {
                return match self.store.payout_by_key(user, &input.idempotency_key).await? {
                    Some((existing, hash)) if hash == request_hash => Self::replay_payout(existing),
                    _ => Err(refusal),
                }
            }
            Err(e) => return Err(e),
        };
        Self::replay_payout(self.settle_payout(payout, &claim, Some(card)).await?)
    }

    /// A payout of the user's; others' are NOT_FOUND, as a missing one is.
    pub async fn get_payout(&self, user: &UserId, payout_id: &PayoutId) -> Result<Payout> {
        if payout_id.as_str().is_empty() {
            return Err(Error::invalid("payout_id", "required"));
        }
        match self.store.payout(payout_id).await? {
            Some(p) if p.user_id == *user => Ok(p),
            _ => Err(Error::NotFound(format!("payout {payout_id} not found"))),
        }
    }

    /// The user's payouts, newest first, a page at a time.
    pub async fn list_payouts(
        &self,
        user: &UserId,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Payout>, Option<String>)> {
        let page = Page::parse(page_size, PAGE_DEFAULT, PAGE_MAX, page_token, "po_")?;
        let mut rows = self.store.list_payouts(user, page.before.clone(), page.limit()).await?;
        let next = page.finish(&mut rows, |p| (p.created_at_us, p.payout_id.to_string()));
        Ok((rows, next))
    }
}
