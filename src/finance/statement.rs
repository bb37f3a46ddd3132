//! A user's wallet statement: opening balance, every movement with its counterparty and
//! note, closing balance.

use std::collections::BTreeMap;

use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::kernel::money::{Currency, Money};
use crate::kernel::reason::Reason;
use crate::ledger::read::books;
use crate::ledger::AccountCode;
use crate::store::Db;

/// Movements in one statement, at most; a longer period is asked for in parts.
pub const MOVEMENTS_MAX: usize = 5_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub entry_id: String,
    pub sequence: i64,
    pub at_us: i64,
    pub kind: String,
    /// Signed: positive into the wallet.
    pub amount: Money,
    pub counterparty: String,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub opening: Money,
    pub closing: Money,
    pub movements: Vec<Movement>,
}

pub async fn statement(db: &Db, user: &UserId, currency: Currency, from_us: i64, to_us: i64) -> Result<Statement> {
    let wallet = AccountCode::wallet(user, currency);
    let Some(account_id) = books::account_id(db, wallet.as_str()).await? else {
        return Ok(Statement { opening: Money::zero(currency), closing: Money::zero(currency), movements: Vec::new() });
    };
    // Wallets are credit-normal: credits in, debits out.
    let opening = books::net_credits_before(db, account_id, from_us).await?;
    // Every posting of the entries that touched the wallet in the period.
    let rows = books::postings_of_entries_touching(db, account_id, from_us, to_us).await?;
    let mut by_entry: BTreeMap<i64, (Movement, Vec<String>)> = BTreeMap::new();
    for books::PostingLine {
        entry_id,
        sequence,
        created_at_us: at,
        kind,
        description: note,
        account_id: posting_account,
        code,
        direction,
        amount,
    } in rows
    {
        let slot = by_entry.entry(sequence).or_insert_with(|| {
            (
                Movement {
                    entry_id,
                    sequence,
                    at_us: at,
                    kind,
                    amount: Money::zero(currency),
                    counterparty: String::new(),
                    note,
                },
                Vec::new(),
            )
        });
        if posting_account == account_id {
            let signed = if direction == "C" { amount } else { -amount };
            slot.0.amount = slot
                .0
                .amount
                .checked_add(Money::from_minor(currency, signed))
                .ok_or_else(|| Error::internal(anyhow::anyhow!("statement overflow")))?;
        } else {
            slot.1.push(code);
        }
    }
    if by_entry.len() > MOVEMENTS_MAX {
        return Err(Error::ResourceExhausted {
            reason: Reason::StatementTooLong,
            message: format!("more than {MOVEMENTS_MAX} movements; ask for a shorter period"),
        });
    }
    let mut movements = Vec::with_capacity(by_entry.len());
    let mut closing = opening;
    for (_, (mut m, others)) in by_entry {
        if m.amount.minor() == 0 {
            continue;
        }
        // The other user when there is one, else the system account on the other side.
        m.counterparty = others
            .iter()
            .find_map(|c| AccountCode::from_db(c.clone()).as_wallet().map(|(u, _)| u.to_owned()))
            .or_else(|| others.first().cloned())
            .unwrap_or_default();
        closing = closing.checked_add(m.amount.minor()).ok_or_else(|| Error::internal(anyhow::anyhow!("overflow")))?;
        movements.push(m);
    }
    Ok(Statement {
        opening: Money::from_minor(currency, opening),
        closing: Money::from_minor(currency, closing),
        movements,
    })
}
