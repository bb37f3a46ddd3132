//! A user's wallet statement: opening balance, every movement with its counterparty and
//! note, closing balance.

use std::collections::BTreeMap;

use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::kernel::money::{Currency, Money};
use crate::ledger::read::sequence_before;
use crate::ledger::AccountCode;
use crate::store::Db;
use crate::with_db;

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

/// entry id, sequence, time, kind, note, posting's account id, its code, direction, amount.
type PostingLine = (String, i64, i64, String, String, i64, String, String, i64);

pub async fn statement(db: &Db, user: &UserId, currency: Currency, from_us: i64, to_us: i64) -> Result<Statement> {
    let wallet = AccountCode::wallet(user, currency);
    let id: Option<i64> = with_db!(db, pool => sqlx::query_scalar("SELECT id FROM ledger_accounts WHERE code = $1")
        .bind(wallet.as_str())
        .fetch_optional(pool)
        .await)?;
    let Some(account_id) = id else {
        return Ok(Statement { opening: Money::zero(currency), closing: Money::zero(currency), movements: Vec::new() });
    };
    // Wallets are credit-normal: credits in, debits out.
    // Time ranges of an account's postings are read as sequence ranges
    // (`ledger::read::sequence_before`).
    let sql = format!(
        "SELECT CAST(SUM(CASE WHEN direction = 'C' THEN amount ELSE -amount END) AS BIGINT) FROM ledger_postings \
         WHERE account_id = $1 AND sequence <= {} AND NOT pending AND created_at_us < $2",
        sequence_before("<", "$2"),
    );
    let opening: Option<i64> = with_db!(db, pool => sqlx::query_scalar(&sql)
    .bind(account_id)
    .bind(from_us)
    .fetch_one(pool)
    .await)?;
    // Every posting of the entries that touched the wallet in the period.
    let sql = format!(
        "SELECT e.id, e.sequence, e.created_at_us, e.kind, e.description, p.account_id, a.code, p.direction, p.amount \
         FROM ledger_entries e JOIN ledger_postings p ON p.entry_id = e.id JOIN ledger_accounts a ON a.id = p.account_id \
         WHERE e.id IN (SELECT entry_id FROM ledger_postings WHERE account_id = $1 AND sequence > {} \
                        AND sequence <= {} AND NOT pending AND created_at_us >= $2 AND created_at_us < $3) \
         ORDER BY e.sequence, p.idx",
        sequence_before("<", "$2"),
        sequence_before("<", "$3"),
    );
    let rows: Vec<PostingLine> = with_db!(db, pool => sqlx::query_as(&sql)
    .bind(account_id)
    .bind(from_us)
    .bind(to_us)
    .fetch_all(pool)
    .await)?;
    let mut by_entry: BTreeMap<i64, (Movement, Vec<String>)> = BTreeMap::new();
    for (entry_id, sequence, at, kind, note, posting_account, code, direction, amount) in rows {
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
            reason: "STATEMENT_TOO_LONG",
            message: format!("more than {MOVEMENTS_MAX} movements; ask for a shorter period"),
        });
    }
    let mut movements = Vec::with_capacity(by_entry.len());
    let mut closing = opening.unwrap_or(0);
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
        opening: Money::from_minor(currency, opening.unwrap_or(0)),
        closing: Money::from_minor(currency, closing),
        movements,
    })
}
