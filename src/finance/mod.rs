//! Finance: what staff need to close the books. So far the trial balance at any point
//! in time and the ledger verification; reconciliation, export and statements follow.

pub mod export;
pub mod recon;
pub mod statement;

use std::collections::BTreeMap;

use crate::kernel::error::{Error, Result};
use crate::kernel::money::{Currency, Money};
use crate::ledger::AccountType;
use crate::store::Db;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialBalanceRow {
    pub account_code: String,
    pub account_type: AccountType,
    pub debits: Money,
    pub credits: Money,
    /// Signed in the account's normal direction.
    pub balance: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialBalance {
    pub as_of_us: i64,
    pub rows: Vec<TrialBalanceRow>,
    /// Per currency: (debits, credits).
    pub totals: BTreeMap<Currency, (Money, Money)>,
}

impl TrialBalance {
    pub fn balanced(&self) -> bool {
        self.totals.values().all(|(d, c)| d.minor() == c.minor())
    }
}

/// Posted debits and credits of every account with activity, up to and including
/// `as_of_us` (from the postings, so a past moment shows that moment's balances), or
/// `now_us` when not given.
pub async fn trial_balance(
    db: &Db,
    as_of_us: Option<i64>,
    now_us: i64,
    currency: Option<Currency>,
) -> Result<TrialBalance> {
    let as_of = as_of_us.unwrap_or(now_us);
    let rows = crate::ledger::read::books::account_totals(db, as_of, currency.map(|c| c.code())).await?;
    let mut out = TrialBalance { as_of_us: as_of, rows: Vec::with_capacity(rows.len()), totals: BTreeMap::new() };
    for crate::ledger::read::books::AccountTotals { code, account_type, currency: ccy, debits, credits } in rows {
        let c = Currency::from_code(&ccy).ok_or_else(|| Error::internal(anyhow::anyhow!("unknown currency {ccy}")))?;
        let account_type = AccountType::from_db(&account_type)?;
        let overflow = || Error::internal(anyhow::anyhow!("trial balance overflow on {code}"));
        let balance =
            if account_type.credit_normal() { credits.checked_sub(debits) } else { debits.checked_sub(credits) }
                .ok_or_else(overflow)?;
        let total = out.totals.entry(c).or_insert((Money::zero(c), Money::zero(c)));
        total.0 = total.0.checked_add(Money::from_minor(c, debits)).ok_or_else(overflow)?;
        total.1 = total.1.checked_add(Money::from_minor(c, credits)).ok_or_else(overflow)?;
        out.rows.push(TrialBalanceRow {
            account_code: code,
            account_type,
            debits: Money::from_minor(c, debits),
            credits: Money::from_minor(c, credits),
            balance: Money::from_minor(c, balance),
        });
    }
    Ok(out)
}
