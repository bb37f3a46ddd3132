//! Ledger domain types: accounts, postings, entries, balances.

use std::collections::BTreeMap;
use std::fmt;

use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::kernel::money::{Currency, Money};

/// Longest ledger account code.
pub const ACCOUNT_CODE_LEN_MAX: usize = 200;
/// Most postings in one entry.
pub const POSTINGS_MAX: usize = 100;
pub const KIND_LEN_MAX: usize = 64;
pub const DESCRIPTION_LEN_MAX: usize = 500;
pub const METADATA_KEYS_MAX: usize = 32;
pub const METADATA_KEY_LEN_MAX: usize = 64;
pub const METADATA_VALUE_LEN_MAX: usize = 512;
/// Bound on the serialized metadata of one entry.
pub const METADATA_BYTES_MAX: usize = 4096;
pub const PENDING_TIMEOUT_DEFAULT_S: u32 = 86_400;
pub const PENDING_TIMEOUT_MAX_S: u32 = 30 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountType {
    Asset,
    Liability,
    Equity,
    Income,
    Expense,
}

impl AccountType {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountType::Asset => "asset",
            AccountType::Liability => "liability",
            AccountType::Equity => "equity",
            AccountType::Income => "income",
            AccountType::Expense => "expense",
        }
    }

    pub fn from_db(s: &str) -> Result<Self> {
        Ok(match s {
            "asset" => AccountType::Asset,
            "liability" => AccountType::Liability,
            "equity" => AccountType::Equity,
            "income" => AccountType::Income,
            "expense" => AccountType::Expense,
            other => return Err(Error::internal(anyhow::anyhow!("unknown account type {other:?}"))),
        })
    }

    /// Liability, equity and income grow with credits; asset and expense with debits.
    pub fn credit_normal(self) -> bool {
        matches!(self, AccountType::Liability | AccountType::Equity | AccountType::Income)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Debit,
    Credit,
}

impl Direction {
    pub fn as_db(self) -> &'static str {
        match self {
            Direction::Debit => "D",
            Direction::Credit => "C",
        }
    }

    pub fn from_db(s: &str) -> Result<Self> {
        match s {
            "D" => Ok(Direction::Debit),
            "C" => Ok(Direction::Credit),
            other => Err(Error::internal(anyhow::anyhow!("unknown direction {other:?}"))),
        }
    }

    pub fn opposite(self) -> Self {
        match self {
            Direction::Debit => Direction::Credit,
            Direction::Credit => Direction::Debit,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryStatus {
    Posted,
    Pending,
    Voided,
    Expired,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Posted => "posted",
            EntryStatus::Pending => "pending",
            EntryStatus::Voided => "voided",
            EntryStatus::Expired => "expired",
        }
    }

    pub fn from_db(s: &str) -> Result<Self> {
        Ok(match s {
            "posted" => EntryStatus::Posted,
            "pending" => EntryStatus::Pending,
            "voided" => EntryStatus::Voided,
            "expired" => EntryStatus::Expired,
            other => return Err(Error::internal(anyhow::anyhow!("unknown entry status {other:?}"))),
        })
    }
}

/// A ledger account code: 1 to 200 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountCode(String);

impl AccountCode {
    pub fn parse(field: &str, raw: &str) -> Result<Self> {
        if raw.is_empty() {
            return Err(Error::invalid(field, "required"));
        }
        if raw.len() > ACCOUNT_CODE_LEN_MAX {
            return Err(Error::invalid(field, format!("at most {ACCOUNT_CODE_LEN_MAX} characters")));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) {
            return Err(Error::invalid(field, "only letters, digits, '_', '.', ':' and '-' are allowed"));
        }
        Ok(AccountCode(raw.to_owned()))
    }

    /// The wallet of a user in a currency: `user:<id>:wallet:<CCY>`.
    pub fn wallet(user: &UserId, currency: Currency) -> Self {
        AccountCode(format!("user:{user}:wallet:{currency}"))
    }

    /// If this is a wallet code, the user and currency code it names.
    pub fn as_wallet(&self) -> Option<(&str, &str)> {
        let rest = self.0.strip_prefix("user:")?;
        let (user, ccy) = rest.rsplit_once(":wallet:")?;
        (!user.is_empty() && !user.contains(':') && ccy.len() == 3).then_some((user, ccy))
    }

    /// What a user owes the platform (a disputed payment their wallet could not cover):
    /// an asset, never negative, repaid from their wallet.
    pub fn receivable(user: &UserId, currency: Currency) -> Self {
        AccountCode(format!("user:{user}:receivable:{currency}"))
    }

    /// If this is a receivable's code, the user and currency code it names.
    pub fn as_receivable(&self) -> Option<(&str, &str)> {
        let rest = self.0.strip_prefix("user:")?;
        let (user, ccy) = rest.rsplit_once(":receivable:")?;
        (!user.is_empty() && !user.contains(':') && ccy.len() == 3).then_some((user, ccy))
    }

    /// A seller's sale proceeds still held (live shopping): a liability, never
    /// negative, released to their wallet after the hold.
    pub fn sales_pending(user: &UserId, currency: Currency) -> Self {
        AccountCode(format!("user:{user}:sales_pending:{currency}"))
    }

    /// What a viewer's stream tabs have spent and not yet captured from their card: an
    /// asset (the card owes it), never negative, back to zero when the tabs close.
    pub fn tab(user: &UserId, currency: Currency) -> Self {
        AccountCode(format!("user:{user}:tab:{currency}"))
    }

    pub fn system(name: &str, currency: Currency) -> Self {
        AccountCode(format!("{name}:{currency}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_db(s: String) -> Self {
        AccountCode(s)
    }
}

impl fmt::Display for AccountCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An account as the engine needs it. Immutable apart from its balances, so it is
/// cached by code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerAccount {
    pub id: i64,
    pub code: AccountCode,
    pub account_type: AccountType,
    pub currency: Currency,
    pub allow_negative: bool,
    pub created_at_us: i64,
}

/// A validated posting whose account is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub account_id: i64,
    pub account_code: AccountCode,
    pub direction: Direction,
    pub amount: Money,
}

pub type Metadata = BTreeMap<String, String>;

/// An entry as stored and returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub sequence: i64,
    pub kind: String,
    pub description: String,
    pub metadata: Metadata,
    /// For a pending entry, its current state (posted, voided or expired once resolved).
    pub status: EntryStatus,
    pub postings: Vec<Posting>,
    pub pending_entry_id: Option<String>,
    pub reverses_entry_id: Option<String>,
    pub expires_at_us: Option<i64>,
    /// The caller that wrote it (`callers`): a module's name or `api:<sub>`.
    pub created_by: String,
    pub created_at_us: i64,
}

/// Materialized balance of one account, in minor units of its currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balance {
    pub posted_debits: i64,
    pub posted_credits: i64,
    pub pending_debits: i64,
    pub pending_credits: i64,
}

impl Balance {
    /// Posted balance signed in the account's normal direction.
    pub fn posted(&self, credit_normal: bool) -> Option<i64> {
        if credit_normal {
            self.posted_credits.checked_sub(self.posted_debits)
        } else {
            self.posted_debits.checked_sub(self.posted_credits)
        }
    }

    /// Posted minus pending outflows, in the normal direction.
    pub fn available(&self, credit_normal: bool) -> Option<i64> {
        let outflow = if credit_normal { self.pending_debits } else { self.pending_credits };
        self.posted(credit_normal)?.checked_sub(outflow)
    }
}

/// Checks the metadata bounds.
pub fn check_metadata(field: &str, metadata: &Metadata) -> Result<()> {
    if metadata.len() > METADATA_KEYS_MAX {
        return Err(Error::invalid(field, format!("at most {METADATA_KEYS_MAX} keys")));
    }
    let mut bytes = 0usize;
    for (k, v) in metadata {
        if k.is_empty() || k.len() > METADATA_KEY_LEN_MAX {
            return Err(Error::invalid(field, format!("keys are 1 to {METADATA_KEY_LEN_MAX} bytes")));
        }
        if v.len() > METADATA_VALUE_LEN_MAX {
            return Err(Error::invalid(
                format!("{field}.{k}"),
                format!("values are at most {METADATA_VALUE_LEN_MAX} bytes"),
            ));
        }
        if k.chars().chain(v.chars()).any(char::is_control) {
            return Err(Error::invalid(field, "control characters are not allowed"));
        }
        bytes += k.len() + v.len();
    }
    if bytes > METADATA_BYTES_MAX {
        return Err(Error::invalid(field, format!("at most {METADATA_BYTES_MAX} bytes in all")));
    }
    Ok(())
}

/// An idempotency key: 1 to 128 printable ASCII characters.
pub fn check_idempotency_key(field: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if key.len() > 128 {
        return Err(Error::invalid(field, "at most 128 characters"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(field, "printable ASCII without spaces only"));
    }
    Ok(())
}

/// An entry kind: 1 to 64 of `[a-z0-9_.]`.
pub fn check_kind(field: &str, kind: &str) -> Result<()> {
    if kind.is_empty() || kind.len() > KIND_LEN_MAX {
        return Err(Error::invalid(field, format!("1 to {KIND_LEN_MAX} characters")));
    }
    if !kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.')) {
        return Err(Error::invalid(field, "only lower-case letters, digits, '_' and '.' are allowed"));
    }
    Ok(())
}

/// Checks that debits equal credits in each currency.
pub fn check_balanced(field: &str, postings: &[Posting]) -> Result<()> {
    let mut sums: BTreeMap<Currency, (i64, i64)> = BTreeMap::new();
    for p in postings {
        let slot = sums.entry(p.amount.currency()).or_default();
        let side = match p.direction {
            Direction::Debit => &mut slot.0,
            Direction::Credit => &mut slot.1,
        };
        *side = side.checked_add(p.amount.minor()).ok_or_else(|| Error::invalid(field, "amounts overflow"))?;
    }
    for (currency, (debits, credits)) in sums {
        if debits != credits {
            return Err(Error::invalid(
                field,
                format!(
                    "debits ({}) and credits ({}) differ in {currency}",
                    Money::from_minor(currency, debits).amount_string(),
                    Money::from_minor(currency, credits).amount_string()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wallet_codes_round_trip() {
        let usd = Currency::from_code("USD").unwrap();
        let user = UserId::parse("u", "alice").unwrap();
        let code = AccountCode::wallet(&user, usd);
        assert_eq!(code.as_str(), "user:alice:wallet:USD");
        assert_eq!(code.as_wallet(), Some(("alice", "USD")));
        assert_eq!(AccountCode::parse("c", "platform:fees:USD").unwrap().as_wallet(), None);
        assert!(AccountCode::parse("c", "bad code").is_err());
    }

    #[test]
    fn available_counts_pending_outflows() {
        let b = Balance { posted_debits: 100, posted_credits: 500, pending_debits: 50, pending_credits: 70 };
        assert_eq!(b.posted(true), Some(400));
        assert_eq!(b.available(true), Some(350));
        assert_eq!(b.posted(false), Some(-400));
        assert_eq!(b.available(false), Some(-470));
    }

    #[test]
    fn metadata_bounds() {
        let mut m = Metadata::new();
        m.insert("k".into(), "v".repeat(513));
        assert!(check_metadata("metadata", &m).is_err());
        let m: Metadata = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check_metadata("metadata", &m).is_err());
        let m: Metadata = (0..20).map(|i| (format!("k{i}"), "v".repeat(300))).collect();
        assert!(check_metadata("metadata", &m).unwrap_err().to_string().contains("in all"));
    }
}
