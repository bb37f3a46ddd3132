//! Disputes (chargebacks) of card-funded payments: booking what the processor took
//! back, recovering it by policy, deciding it, and the debts it leaves.
//!
//! When the processor reports a dispute on a capture, it has taken the capture's amount
//! (and a fee) from the platform: `processor:sandbox:clearing` is credited the amount
//! (the fee reaches the books through reconciliation, as a processor fee). By default
//! (`DMPAY_DISPUTE_RECOVERY=recipient`) the payment's recipient bears it: their wallet
//! is debited what it holds, up to the amount, and the rest is booked as their
//! receivable (`user:<id>:receivable:<CCY>`, an asset that never goes negative). While
//! a user owes, they cannot send or cash out (`RECEIVABLE_OUTSTANDING`), and the
//! resolver moves money arriving in their wallet to the receivable first. With
//! `DMPAY_DISPUTE_FEE_PAYER=recipient` the fee is recovered the same way (credited to
//! `platform:processor_fees`). With `DMPAY_DISPUTE_RECOVERY=platform` the amount is
//! debited to `platform:dispute_losses`. A won dispute gives the amount back (to the
//! receivable first, then the wallet); a lost one closes it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::model::{DisputeFeePayer, DisputeRecovery, DisputeStatus};
use super::repo::disputes::DisputeRow;
use super::{Payments, ACTOR};
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::{DisputeId, UserId};
use crate::kernel::money::Money;
use crate::kernel::page::Page;
use crate::kernel::reason::Reason;
use crate::ledger::{
    AccountCode, Direction, PostEntryInput, PostingInput, SYSTEM_CLEARING, SYSTEM_DISPUTE_LOSSES, SYSTEM_PROCESSOR_FEES,
};
use crate::processor::Notification;

/// Attempts at booking a dispute whose split the wallet's spending keeps overtaking.
const BOOKING_ATTEMPTS_MAX: usize = 5;
/// Debtors remembered per process; disputes are rare, and past this the set is read
/// again from the database at the next refresh.
const DEBTORS_MAX: usize = 100_000;

/// The users who owe the platform, refreshed by the resolver from the database and
/// updated at once when this process books a debt, so a send checks it in memory.
#[derive(Default)]
pub(crate) struct Debtors(Mutex<HashSet<String>>);

impl Debtors {
    fn contains(&self, user: &UserId) -> bool {
        self.0.lock().map(|s| s.contains(user.as_str())).unwrap_or(false)
    }

    fn insert(&self, user: &UserId) {
        if let Ok(mut s) = self.0.lock() {
            if s.len() < DEBTORS_MAX {
                s.insert(user.as_str().to_owned());
            }
        }
    }

    fn replace(&self, users: HashSet<String>) {
        if let Ok(mut s) = self.0.lock() {
            *s = users;
        }
    }
}

fn posting(code: AccountCode, direction: Direction, amount: Money) -> PostingInput {
    PostingInput { account_code: code, direction, amount }
}

/// The refusal of a debtor's send, bill payment, refund or payout.
pub(crate) fn owing() -> Error {
    Error::FailedPrecondition {
        reason: Reason::ReceivableOutstanding,
        message: "you owe the platform for a disputed payment; money you receive repays it first".into(),
    }
}

/// A dispute as finance reads it.
pub type Dispute = DisputeRow;

impl Payments {
    /// Whether `user` owes the platform, as this process knows it.
    pub(crate) fn owes(&self, user: &UserId) -> bool {
        self.debtors.contains(user)
    }

    /// Refuses a caller who owes the platform (sends, request payments, refunds,
    /// payouts); call it after a retry has had its replay.
    pub(crate) fn check_not_owing(&self, user: &UserId) -> Result<()> {
        if self.debtors.contains(user) {
            return Err(owing());
        }
        Ok(())
    }

    async fn dispute_entry(
        &self,
        d: &DisputeRow,
        step: &str,
        kind: &str,
        postings: Vec<PostingInput>,
        reference: &str,
    ) -> Result<()> {
        self.ledger
            .post_entry(
                ACTOR,
                PostEntryInput {
                    idempotency_key: format!("dispute:{}:{step}", d.dispute_id),
                    kind: kind.into(),
                    description: String::new(),
                    postings,
                    metadata: [
                        ("payment_id".to_string(), d.payment_id.to_string()),
                        ("dispute_id".to_string(), d.dispute_id.to_string()),
                        ("processor_reference".to_string(), reference.to_owned()),
                    ]
                    .into(),
                    pending: false,
                    pending_timeout_s: 0,
                },
            )
            .await
            .map(|_| ())
    }

    /// The opening entry's postings for the dispute's split.
    fn opening_postings(d: &DisputeRow) -> Result<Vec<PostingInput>> {
        let currency = d.money(0)?.currency();
        let mut postings =
            vec![posting(AccountCode::system(SYSTEM_CLEARING, currency), Direction::Credit, d.money(d.amount)?)];
        if d.platform_share > 0 {
            postings.push(posting(
                AccountCode::system(SYSTEM_DISPUTE_LOSSES, currency),
                Direction::Debit,
                d.money(d.platform_share)?,
            ));
        }
        if d.recovered_from.is_empty() {
            return Ok(postings);
        }
        let user = UserId::from_db(d.recovered_from.clone());
        if d.from_wallet > 0 {
            postings.push(posting(AccountCode::wallet(&user, currency), Direction::Debit, d.money(d.from_wallet)?));
        }
        if d.to_receivable > 0 {
            postings.push(posting(
                AccountCode::receivable(&user, currency),
                Direction::Debit,
                d.money(d.to_receivable)?,
            ));
        }
        if d.fee_charged > 0 {
            postings.push(posting(
                AccountCode::system(SYSTEM_PROCESSOR_FEES, currency),
                Direction::Credit,
                d.money(d.fee_charged)?,
            ));
        }
        Ok(postings)
    }

    /// `dispute.opened`: books what the processor took back and recovers it by policy,
    /// then marks the payment disputed. Idempotent: the dispute's row (one per
    /// processor reference) holds the split, and the entry its key.
    pub(crate) async fn apply_dispute_opened(&self, n: &Notification) -> Result<()> {
        // By the capture's reference, or, before the payment has recorded it (a capture
        // whose answer was lost), by the capture's key the notification carries.
        let found = match self.store.payment_by_capture(&n.reference).await? {
            Some(p) => Some(p),
            None => match n.call_key.strip_prefix("pay:").and_then(|k| k.strip_suffix(":capture")) {
                Some(id) => self.store.get(&crate::kernel::ids::PaymentId::parse("call_key", id)?).await?,
                None => None,
            },
        };
        let Some(payment) = found else {
            tracing::error!(capture = %n.reference, "the processor disputed a capture dmpay does not know; skipped");
            return Ok(());
        };
        if payment.status == super::PaymentStatus::Pending {
            // The capture happened; the resolver settles the payment shortly, and until
            // then the cursor waits here.
            return Err(Error::Unavailable(format!("payment {} is still being settled", payment.payment_id)));
        }
        let currency = payment.currency();
        if n.amount.currency() != currency || n.amount.minor() <= 0 {
            tracing::error!(capture = %n.reference, "a dispute that does not fit its payment; skipped");
            return Ok(());
        }
        // What the recipient still holds of the payment: a refunded part went back to
        // the sender (the cardholder who now disputes), and the card-funding fee to the
        // platform, so those are the platform's to bear.
        let held = (payment.amount.minor() - payment.refunded_amount.minor()).max(0);
        if held == 0 {
            // Refunded in full: the cardholder has the money twice. dmpay books nothing;
            // the settlement report's dispute row stays unmatched, an exception in
            // reconciliation for finance to take up with the processor.
            tracing::error!(payment_id = %payment.payment_id, capture = %n.reference,
                "a dispute on a fully refunded payment; left to reconciliation");
            return Ok(());
        }
        let policy = &self.config.disputes;
        let recipient = payment.recipient_id.clone();
        let fee_charged = match (policy.recovery, policy.fee_payer) {
            (DisputeRecovery::Recipient, DisputeFeePayer::Recipient) => n.fee.minor(),
            _ => 0,
        };
        // The recipient bears at most the card-funded part they received (the card
        // charge's fee was the platform's), less what they refunded.
        let recipient_part = match policy.recovery {
            DisputeRecovery::Recipient => n.amount.minor().min(held).min(payment.card_amount.minor()),
            DisputeRecovery::Platform => 0,
        };
        let owed = recipient_part + fee_charged;
        let mut d = DisputeRow {
            dispute_id: DisputeId::generate(),
            payment_id: payment.payment_id.clone(),
            processor_ref: n.event_reference.clone(),
            capture_ref: n.reference.clone(),
            currency: currency.code().to_owned(),
            amount: n.amount.minor(),
            fee: n.fee.minor(),
            recovered_from: String::new(),
            from_wallet: 0,
            to_receivable: 0,
            fee_charged,
            platform_share: n.amount.minor() - recipient_part,
            status: DisputeStatus::Open.as_str().to_owned(),
            reversal_ref: None,
            opened_at_us: self.now_us(),
            decided_at_us: None,
        };
        if policy.recovery == DisputeRecovery::Recipient {
            d.recovered_from = recipient.as_str().to_owned();
            d.from_wallet = self.available(&recipient, currency).await?.min(owed);
            d.to_receivable = owed - d.from_wallet;
        }
        let mut d = self.store.insert_dispute(&d).await?;
        for attempt in 0.. {
            // The receivable must exist before an entry names it.
            if d.to_receivable > 0 {
                self.ledger.accounts().receivable(&recipient, currency).await?;
            }
            match self.dispute_entry(&d, "open", "dispute", Self::opening_postings(&d)?, &d.processor_ref).await {
                Ok(()) => break,
                // The wallet was spent between the read and the entry (and the entry's
                // key is unused, as the ledger keeps none for a refusal): split again.
                Err(Error::FailedPrecondition { reason: Reason::InsufficientFunds, .. })
                    if attempt + 1 < BOOKING_ATTEMPTS_MAX && !d.recovered_from.is_empty() =>
                {
                    let total = d.from_wallet + d.to_receivable;
                    let from_wallet = self.available(&recipient, currency).await?.min(total);
                    self.store.resplit_dispute(&d.dispute_id, from_wallet, total - from_wallet).await?;
                    d = self
                        .store
                        .dispute_by_ref(&d.processor_ref)
                        .await?
                        .ok_or_else(|| Error::internal(anyhow::anyhow!("dispute vanished")))?;
                }
                // A retry after a crash whose split the first attempt booked under
                // the key already: it stands.
                Err(Error::AlreadyExists(_)) => break,
                Err(e) => return Err(e),
            }
        }
        if d.to_receivable > 0 {
            self.debtors.insert(&recipient);
        }
        self.store.mark_disputed(&d.payment_id).await
    }

    /// `dispute.won` / `dispute.lost`: a won dispute gives the amount back (to the
    /// user's receivable first, then their wallet; or to the platform's losses).
    pub(crate) async fn apply_dispute_decided(&self, n: &Notification, won: bool) -> Result<()> {
        let Some(d) = self.store.dispute_by_ref(&n.reference).await? else {
            // Its opening may not be applied yet: notifications come in order, so
            // this is a dispute dmpay never heard of.
            tracing::error!(dispute = %n.reference, "the processor decided a dispute dmpay does not know; skipped");
            return Ok(());
        };
        if d.status()? != DisputeStatus::Open {
            return Ok(());
        }
        if !won {
            return self.store.decide_dispute(&d, DisputeStatus::Lost, None).await;
        }
        let amount = d.money(d.amount)?;
        let currency = amount.currency();
        let mut postings = vec![posting(AccountCode::system(SYSTEM_CLEARING, currency), Direction::Debit, amount)];
        if d.platform_share > 0 {
            postings.push(posting(
                AccountCode::system(SYSTEM_DISPUTE_LOSSES, currency),
                Direction::Credit,
                d.money(d.platform_share)?,
            ));
        }
        // The user's part of the amount (the fee stays with the processor).
        let user_part = d.amount - d.platform_share;
        if user_part > 0 && !d.recovered_from.is_empty() {
            let user = UserId::from_db(d.recovered_from.clone());
            // What is still owed is cleared first; the rest goes to the wallet.
            let owed = self.owed(&user, currency).await?;
            let to_receivable = owed.min(user_part);
            if to_receivable > 0 {
                postings.push(posting(
                    AccountCode::receivable(&user, currency),
                    Direction::Credit,
                    d.money(to_receivable)?,
                ));
            }
            if user_part > to_receivable {
                postings.push(posting(
                    AccountCode::wallet(&user, currency),
                    Direction::Credit,
                    d.money(user_part - to_receivable)?,
                ));
            }
        }
        match self.dispute_entry(&d, "won", "dispute_reversal", postings, &n.event_reference).await {
            // AlreadyExists: an earlier attempt booked it (with the split of its time).
            Ok(()) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        self.store.decide_dispute(&d, DisputeStatus::Won, Some(&n.event_reference)).await
    }

    /// A wallet's available balance, zero when it does not exist.
    async fn available(&self, user: &UserId, currency: crate::kernel::money::Currency) -> Result<i64> {
        let accounts = self.ledger.accounts();
        match accounts.resolve("wallet", &AccountCode::wallet(user, currency), false).await {
            Ok(w) => Ok(accounts.balance(w.id).await?.available(true).unwrap_or(0).max(0)),
            Err(Error::NotFound(_)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// What a user owes in `currency`: their receivable's balance.
    async fn owed(&self, user: &UserId, currency: crate::kernel::money::Currency) -> Result<i64> {
        let accounts = self.ledger.accounts();
        match accounts.resolve("receivable", &AccountCode::receivable(user, currency), false).await {
            Ok(a) => Ok(accounts.balance(a.id).await?.posted(false).unwrap_or(0).max(0)),
            Err(Error::NotFound(_)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Users who owe, with what they owe per currency (minor units), a page at a time
    /// in user order.
    pub async fn debts(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<(UserId, String, i64)>, Option<String>)> {
        let size = match page_size {
            0 => 100,
            n if n > 500 => return Err(Error::invalid("page_size", "at most 500")),
            n => n,
        };
        let after = if page_token.is_empty() {
            (String::new(), String::new())
        } else {
            page_token
                .split_once('/')
                .filter(|(u, c)| {
                    UserId::parse("page_token", u).is_ok() && crate::kernel::money::Currency::from_code(c).is_some()
                })
                .map(|(u, c)| (u.to_owned(), c.to_owned()))
                .ok_or_else(|| Error::invalid("page_token", "not a token from a previous page"))?
        };
        let mut rows = self.store.debts((&after.0, &after.1), i64::from(size) + 1).await?;
        let next = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|(u, c, _)| format!("{u}/{c}"))
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Every debt, read in pages (at most `DEBTORS_MAX`).
    async fn all_debts(&self) -> Result<Vec<(UserId, String, i64)>> {
        let mut out: Vec<(UserId, String, i64)> = Vec::new();
        while out.len() < DEBTORS_MAX {
            let after = out.last().map(|(u, c, _)| (u.as_str().to_owned(), c.clone())).unwrap_or_default();
            let page = self.store.debts((&after.0, &after.1), 1_000).await?;
            let done = page.len() < 1_000;
            out.extend(page);
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Reads who owes again, and repays each debt from the money in the debtor's
    /// wallet: incoming money repays a debt before it can be spent (the debtor cannot
    /// send meanwhile). Returns the repayments made.
    pub async fn collect_receivables(&self) -> Result<usize> {
        let debts = self.all_debts().await?;
        self.debtors.replace(debts.iter().map(|(u, _, _)| u.as_str().to_owned()).collect());
        let mut repaid = 0;
        let mut by_user: HashMap<&UserId, Vec<(&str, i64)>> = HashMap::new();
        for (u, c, owed) in &debts {
            by_user.entry(u).or_default().push((c.as_str(), *owed));
        }
        for (user, owed) in by_user {
            for (code, owed) in owed {
                let Some(currency) = crate::kernel::money::Currency::from_code(code) else { continue };
                let x = self.available(user, currency).await?.min(owed);
                if x <= 0 {
                    continue;
                }
                let amount = Money::from_minor(currency, x);
                let receivable = self.ledger.accounts().receivable(user, currency).await?;
                let credits = self.ledger.accounts().balance(receivable.id).await?.posted_credits;
                // The key names the debt's state (its credits so far), so two resolvers
                // repaying the same debt at once make one repayment.
                let posted = self
                    .ledger
                    .post_entry(
                        ACTOR,
                        PostEntryInput {
                            idempotency_key: format!("repay:{user}:{code}:{credits}"),
                            kind: "receivable_repayment".into(),
                            description: String::new(),
                            postings: vec![
                                posting(AccountCode::wallet(user, currency), Direction::Debit, amount),
                                posting(AccountCode::receivable(user, currency), Direction::Credit, amount),
                            ],
                            metadata: Default::default(),
                            pending: false,
                            pending_timeout_s: 0,
                        },
                    )
                    .await;
                match posted {
                    Ok(_) => repaid += 1,
                    Err(Error::FailedPrecondition { .. } | Error::AlreadyExists(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if repaid > 0 {
            // Debts repaid in full free their debtors at once.
            let debts = self.all_debts().await?;
            self.debtors.replace(debts.iter().map(|(u, _, _)| u.as_str().to_owned()).collect());
        }
        Ok(repaid)
    }

    /// Disputes, newest first (`open_only`: those still open), a page at a time.
    pub async fn list_disputes(
        &self,
        open_only: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Dispute>, Option<String>)> {
        let page = Page::parse(page_size, 50, 200, page_token, "dp_")?;
        let mut rows = self.store.list_disputes(open_only, page.before.clone(), page.limit()).await?;
        let next = page.finish(&mut rows, |d| (d.opened_at_us, d.dispute_id.to_string()));
        Ok((rows, next))
    }

    /// Open disputes per currency: (currency, count, amount at risk in minor units).
    pub async fn disputes_at_risk(&self) -> Result<Vec<(String, i64, i64)>> {
        self.store.disputes_at_risk().await
    }
}
