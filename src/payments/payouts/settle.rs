//! The steps of a payout after its row: hold, push, post, pay; the resolver that
//! resumes payouts left pending; and the returns the processor reports afterwards.

use std::collections::BTreeMap;

use super::{Payout, PayoutStatus, SYSTEM_PAYOUTS_IN_TRANSIT};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::PayoutId;
use crate::kernel::money::Money;
use crate::kernel::reason::Reason;
use crate::ledger::{AccountCode, Direction, EntryStatus, PostEntryInput, PostingInput, SYSTEM_CLEARING, SYSTEM_FEES};
use crate::payments::repo::Claim;
use crate::payments::{Payments, ACTOR};
use crate::processor::{Notification, ProcessorError};
use crate::vault::ChargeableCard;

fn key(payout_id: &PayoutId, step: &str) -> String {
    format!("payout:{payout_id}:{step}")
}

fn posting(code: AccountCode, direction: Direction, amount: Money) -> PostingInput {
    PostingInput { account_code: code, direction, amount }
}

/// Why the push to the card did not produce a payout reference.
enum Push {
    /// Refused: the payout fails with this reason.
    Refused(Reason, String),
    /// No answer: leave the payout pending for the resolver.
    Unknown,
    /// The resolver took the payout over from this attempt.
    Lost,
    Other(Error),
}

impl Payments {
    /// Posts one of a payout's ledger entries under its step's key.
    async fn payout_entry(
        &self,
        p: &Payout,
        step: &str,
        kind: &str,
        postings: Vec<PostingInput>,
        pending: bool,
        reference: Option<&str>,
    ) -> Result<crate::ledger::Entry> {
        let mut metadata = BTreeMap::from([("payout_id".to_string(), p.payout_id.to_string())]);
        if let Some(r) = reference {
            // What reconciliation matches the processor's report by.
            metadata.insert("processor_reference".to_string(), r.to_owned());
        }
        self.ledger
            .post_entry(
                ACTOR,
                PostEntryInput {
                    idempotency_key: key(&p.payout_id, step),
                    kind: kind.into(),
                    description: String::new(),
                    postings,
                    metadata,
                    pending,
                    pending_timeout_s: if pending { crate::ledger::PENDING_TIMEOUT_MAX_S } else { 0 },
                },
            )
            .await
    }

    /// The hold's postings, also used should the hold expire before it is posted.
    fn payout_postings(p: &Payout) -> Vec<PostingInput> {
        let currency = p.currency();
        let mut postings = vec![
            posting(AccountCode::wallet(&p.user_id, currency), Direction::Debit, p.amount),
            posting(AccountCode::system(SYSTEM_PAYOUTS_IN_TRANSIT, currency), Direction::Credit, p.net()),
        ];
        if p.fee.minor() > 0 {
            postings.push(posting(AccountCode::system(SYSTEM_FEES, currency), Direction::Credit, p.fee));
        }
        postings
    }

    async fn fail_payout(&self, p: &Payout, claim: &Claim, reason: Reason, message: &str) -> Result<Payout> {
        self.store.finish_payout(&p.payout_id, PayoutStatus::Failed, reason.as_str(), message, Some(claim)).await
    }

    /// Runs (or resumes) a pending payout under `claim`. `card` is the card already
    /// opened by `create_payout`; the resolver opens it again when it must push.
    /// Answers the payout as it stands (PENDING when the push's outcome is unknown).
    pub(crate) async fn settle_payout(
        &self,
        payout: Payout,
        claim: &Claim,
        card: Option<ChargeableCard>,
    ) -> Result<Payout> {
        // 1. Hold the wallet money. A replay of the key answers the same entry.
        let hold_id = match &payout.hold_entry_id {
            Some(id) => id.clone(),
            None => match self
                .payout_entry(&payout, "hold", "payout_hold", Self::payout_postings(&payout), true, None)
                .await
            {
                Ok(e) => {
                    self.store.set_payout_refs(&payout.payout_id, Some(&e.id), None).await?;
                    e.id
                }
                Err(Error::FailedPrecondition { reason, message }) => {
                    return self.fail_payout(&payout, claim, reason, &message).await
                }
                Err(e) => return Err(e),
            },
        };

        // 2. Push to the card, unless an earlier attempt did.
        let reference = match self.push(&payout, claim, card).await {
            Ok(r) => r,
            Err(Push::Refused(reason, message)) => {
                // Only the claim's holder gives up on the payout (see `Payments::settle`).
                if !self.store.renew_payout(&payout.payout_id, claim, self.lease_us()).await? {
                    return self.current_payout(&payout.payout_id).await;
                }
                match self.ledger.void_pending(ACTOR, &hold_id, &key(&payout.payout_id, "void_hold")).await {
                    Ok(_) | Err(Error::FailedPrecondition { reason: Reason::EntryNotPending, .. }) => {}
                    Err(e) => return Err(e),
                }
                return self.fail_payout(&payout, claim, reason, &message).await;
            }
            Err(Push::Unknown | Push::Lost) => return self.current_payout(&payout.payout_id).await,
            Err(Push::Other(e)) => return Err(e),
        };
        // 3. The card is paid: from here on a failure never fails the payout; the
        // caller hears UNAVAILABLE and the resolver retries.
        self.book_paid(&payout, &hold_id, &reference).await.map_err(|e| {
            tracing::error!(payout_id = %payout.payout_id, error = %e, "card paid but the payout's booking failed; will retry");
            Error::Unavailable("the payout is being settled; retry with the same key".into())
        })?;
        // The card is paid and booked: PAID is the truth whoever finishes it.
        self.store.finish_payout(&payout.payout_id, PayoutStatus::Paid, "", "", None).await
    }

    /// Books a paid push: the processor's reference on the row, the hold posted (or,
    /// should it have expired, the same movement as an entry of its own), then the net
    /// passed on to the processor's clearing account.
    async fn book_paid(&self, payout: &Payout, hold_id: &str, reference: &str) -> Result<()> {
        self.store.set_payout_refs(&payout.payout_id, None, Some(reference)).await?;
        match self.ledger.post_pending(ACTOR, hold_id, &key(&payout.payout_id, "post_hold"), None).await {
            Ok(_) => {}
            Err(Error::FailedPrecondition { reason: Reason::EntryNotPending | Reason::EntryExpired, .. }) => {
                if self.ledger.get_entry(hold_id).await?.status != EntryStatus::Posted {
                    tracing::warn!(payout_id = %payout.payout_id, "payout hold no longer pending; posting it directly");
                    self.payout_entry(payout, "direct", "payout_hold", Self::payout_postings(payout), false, None)
                        .await?;
                }
            }
            Err(e) => return Err(e),
        }
        let currency = payout.currency();
        self.payout_entry(
            payout,
            "paid",
            "payout",
            vec![
                posting(AccountCode::system(SYSTEM_PAYOUTS_IN_TRANSIT, currency), Direction::Debit, payout.net()),
                posting(AccountCode::system(SYSTEM_CLEARING, currency), Direction::Credit, payout.net()),
            ],
            false,
            Some(reference),
        )
        .await
        .map(|_| ())
    }

    async fn current_payout(&self, payout_id: &PayoutId) -> Result<Payout> {
        self.store.payout(payout_id).await?.ok_or_else(|| Error::not_found("payout"))
    }

    /// Pushes the net amount to the card. A push whose outcome is unknown is looked up,
    /// never made again blindly.
    async fn push(&self, p: &Payout, claim: &Claim, card: Option<ChargeableCard>) -> std::result::Result<String, Push> {
        let processor = self.vault.processor().clone();
        let push_key = key(&p.payout_id, "push");
        let outcome = |r: std::result::Result<String, ProcessorError>| match r {
            Ok(reference) => Ok(reference),
            Err(ProcessorError::Declined(code)) => Err(Push::Refused(code.reason(), code.message().to_owned())),
            Err(ProcessorError::Failed(_)) => {
                Err(Push::Refused(Reason::ProcessingError, "the card processor could not process the payout".into()))
            }
            Err(ProcessorError::Unknown) => Err(Push::Unknown),
        };
        if let Some(record) = processor.lookup(&push_key).await.map_err(|_| Push::Unknown)? {
            return outcome(record.outcome.map(|()| record.reference));
        }
        match self.store.renew_payout(&p.payout_id, claim, self.lease_us()).await {
            Ok(true) => {}
            Ok(false) => return Err(Push::Lost),
            Err(e) => return Err(Push::Other(e)),
        }
        let card = match card {
            Some(c) => c,
            None => {
                self.vault.chargeable(&p.user_id, Some(&p.payment_method_token), "payout").await.map_err(
                    |e| match e {
                        Error::FailedPrecondition { reason, message } => Push::Refused(reason, message),
                        Error::NotFound(m) => Push::Refused(Reason::NoPaymentMethod, m),
                        other => Push::Other(other),
                    },
                )?
            }
        };
        outcome(processor.payout(&push_key, card.details(), p.net(), p.speed).await)
    }

    /// Finishes payouts left pending (a crash, or a push whose outcome was unknown).
    pub async fn resolve_payouts(&self) -> Result<usize> {
        let stale = self.store.claim_stale_payouts(self.lease_us(), 100).await?;
        let mut done = 0;
        for (p, claim) in stale {
            let id = p.payout_id.clone();
            match self.settle_payout(p, &claim, None).await {
                Ok(p) if p.status != PayoutStatus::Pending => done += 1,
                Ok(_) => {}
                Err(e) => tracing::warn!(payout_id = %id, error = %e, "pending payout not resolved yet"),
            }
        }
        Ok(done)
    }

    /// A paid payout came back: the wallet gets the whole amount back (the net from the
    /// processor's clearing account, the fee from fee income), and the payout is
    /// RETURNED.
    pub(crate) async fn apply_payout_return(&self, n: &Notification) -> Result<()> {
        // By its reference, or, before the payout has learnt it (a push whose answer
        // was lost), by the push's key the notification carries.
        let found = match self.store.payout_by_ref(&n.reference).await? {
            Some(p) => Some(p),
            None => match n.call_key.strip_prefix("payout:").and_then(|k| k.strip_suffix(":push")) {
                Some(id) => self.store.payout(&PayoutId::parse("call_key", id)?).await?,
                None => None,
            },
        };
        let Some(p) = found else {
            tracing::error!(reference = %n.reference, "the processor returned a payout dmpay does not know; skipped");
            return Ok(());
        };
        if n.amount != p.net() {
            tracing::error!(payout_id = %p.payout_id, "the processor returned another amount than the payout's; skipped");
            return Ok(());
        }
        match p.status {
            PayoutStatus::Returned => return Ok(()),
            PayoutStatus::Paid => {}
            // The push happened (a return follows it), so the resolver finishes the
            // payout as PAID shortly; until then the cursor waits here.
            PayoutStatus::Pending => {
                return Err(Error::Unavailable(format!("payout {} is still being settled", p.payout_id)))
            }
            PayoutStatus::Failed => {
                tracing::error!(payout_id = %p.payout_id, "the processor returned a failed payout; skipped");
                return Ok(());
            }
        }
        let currency = p.currency();
        let mut postings = vec![
            posting(AccountCode::system(SYSTEM_CLEARING, currency), Direction::Debit, p.net()),
            posting(AccountCode::wallet(&p.user_id, currency), Direction::Credit, p.amount),
        ];
        if p.fee.minor() > 0 {
            postings.insert(1, posting(AccountCode::system(SYSTEM_FEES, currency), Direction::Debit, p.fee));
        }
        self.payout_entry(&p, "return", "payout_return", postings, false, Some(&n.event_reference)).await?;
        self.store.return_payout(&p.payout_id, &n.event_reference).await?;
        Ok(())
    }
}
