//! Ledger accounts: creation, lookup by code (cached: an account never changes apart
//! from its balances), wallets created on first use, and the system accounts.

use std::collections::HashMap;
use std::sync::RwLock;

use super::model::{AccountCode, AccountType, Balance, LedgerAccount};
use crate::kernel::clock::Clock;
use crate::kernel::error::{Error, Result};
use crate::kernel::ids::UserId;
use crate::kernel::money::{Currencies, Currency};
use crate::ledger::engine::backend::{insert_account, NewAccount};
use crate::store::{is_unique_violation, Db};
use crate::with_db;

/// Accounts kept in the lookup cache; past this the cache starts over, so memory stays
/// bounded however many wallets exist.
const CACHE_ACCOUNTS_MAX: usize = 200_000;

/// The processor clearing account's name (per currency: `processor:sandbox:clearing:USD`).
pub const SYSTEM_CLEARING: &str = "processor:sandbox:clearing";
/// The platform's fee income account's name.
pub const SYSTEM_FEES: &str = "platform:fees";
/// Disputed payments the platform bears.
pub const SYSTEM_DISPUTE_LOSSES: &str = "platform:dispute_losses";
/// The processor's fees, an expense (reconciliation books them from the report).
pub const SYSTEM_PROCESSOR_FEES: &str = "platform:processor_fees";
/// The platform's commission on live-shopping sales.
pub const SYSTEM_COMMISSIONS: &str = "platform:commissions";
/// Where payouts wait between the wallet and the processor.
pub const SYSTEM_PAYOUTS_IN_TRANSIT: &str = "platform:payouts_in_transit";

/// System accounts created for every enabled currency at startup.
pub const SYSTEM_ACCOUNTS: &[(&str, AccountType)] = &[
    // Money the card processor owes dmpay for captured charges.
    (SYSTEM_CLEARING, AccountType::Asset),
    // dmpay's bank account where processor settlements land.
    ("platform:settlement_bank", AccountType::Asset),
    // Cash put into the platform from outside (top-ups, test funding).
    ("platform:treasury", AccountType::Asset),
    (SYSTEM_FEES, AccountType::Income),
    (SYSTEM_COMMISSIONS, AccountType::Income),
    (SYSTEM_PROCESSOR_FEES, AccountType::Expense),
    // Payouts on their way to users' cards: owed to the card network until the
    // processor has paid them.
    (SYSTEM_PAYOUTS_IN_TRANSIT, AccountType::Liability),
    // Disputed payments the platform bears (`DMPAY_DISPUTE_RECOVERY=platform`).
    (SYSTEM_DISPUTE_LOSSES, AccountType::Expense),
    // Unexplained differences parked until finance resolves them.
    ("platform:suspense", AccountType::Liability),
];

#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    pub id: i64,
    pub code: String,
    #[sqlx(rename = "type")]
    pub account_type: String,
    pub currency: String,
    pub allow_negative: bool,
    pub created_at_us: i64,
}

impl TryFrom<AccountRow> for LedgerAccount {
    type Error = Error;
    fn try_from(row: AccountRow) -> Result<Self> {
        Ok(LedgerAccount {
            id: row.id,
            currency: Currency::from_code(&row.currency).ok_or_else(|| {
                Error::internal(anyhow::anyhow!("unknown currency {} in ledger_accounts", row.currency))
            })?,
            code: AccountCode::from_db(row.code),
            account_type: AccountType::from_db(&row.account_type)?,
            allow_negative: row.allow_negative,
            created_at_us: row.created_at_us,
        })
    }
}

const SELECT_BY_CODE: &str =
    "SELECT id, code, type, currency, allow_negative, created_at_us FROM ledger_accounts WHERE code = $1";

pub struct AccountStore {
    db: Db,
    /// For account inserts (`EngineHandle::writer`).
    writer: Db,
    currencies: Currencies,
    cache: RwLock<HashMap<String, LedgerAccount>>,
    clock: Clock,
}

impl AccountStore {
    pub fn new(db: Db, writer: Db, currencies: Currencies, clock: Clock) -> Self {
        AccountStore { db, writer, currencies, cache: RwLock::new(HashMap::new()), clock }
    }

    pub fn currencies(&self) -> &Currencies {
        &self.currencies
    }

    /// Creates the system accounts of every enabled currency (idempotent).
    pub async fn ensure_system_accounts(&self) -> Result<()> {
        for currency in self.currencies.enabled() {
            for (name, account_type) in SYSTEM_ACCOUNTS {
                // System accounts may go negative: they stand for the outside world.
                self.insert_if_missing(&AccountCode::system(name, *currency), *account_type, *currency, true).await?;
            }
        }
        Ok(())
    }

    fn new_account<'a>(
        &self,
        code: &'a AccountCode,
        account_type: AccountType,
        currency: Currency,
        allow_negative: bool,
    ) -> NewAccount<'a> {
        NewAccount { code, account_type, currency: currency.code(), allow_negative, created_at_us: self.clock.now_us() }
    }

    async fn insert_if_missing(
        &self,
        code: &AccountCode,
        account_type: AccountType,
        currency: Currency,
        allow_negative: bool,
    ) -> Result<()> {
        insert_account(&self.writer, &self.new_account(code, account_type, currency, allow_negative), true).await?;
        Ok(())
    }

    /// `CreateLedgerAccount`: a new account; an existing code is ALREADY_EXISTS unless
    /// it was created with exactly these settings (a retry).
    pub async fn create(
        &self,
        code: AccountCode,
        account_type: AccountType,
        currency: Currency,
        allow_negative: bool,
    ) -> Result<LedgerAccount> {
        if code.as_str().starts_with("user:") {
            return Err(Error::invalid("code", "codes starting with \"user:\" are reserved for wallets"));
        }
        let inserted =
            insert_account(&self.writer, &self.new_account(&code, account_type, currency, allow_negative), false).await;
        match inserted {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let account = self
            .fetch(&code)
            .await?
            .ok_or_else(|| Error::internal(anyhow::anyhow!("account vanished after insert")))?;
        if account.account_type != account_type
            || account.currency != currency
            || account.allow_negative != allow_negative
        {
            return Err(Error::AlreadyExists(format!("ledger account {code} already exists with other settings")));
        }
        Ok(account)
    }

    async fn fetch(&self, code: &AccountCode) -> Result<Option<LedgerAccount>> {
        let row: Option<AccountRow> = with_db!(&self.db, pool => sqlx::query_as(SELECT_BY_CODE)
            .bind(code.as_str())
            .fetch_optional(pool)
            .await)?;
        let account = row.map(LedgerAccount::try_from).transpose()?;
        if let Some(a) = &account {
            if let Ok(mut cache) = self.cache.write() {
                if cache.len() >= CACHE_ACCOUNTS_MAX {
                    cache.clear();
                }
                cache.insert(a.code.as_str().to_owned(), a.clone());
            }
        }
        Ok(account)
    }

    /// Looks an account up by code; a wallet code creates the wallet on first use
    /// (`create_wallets`). Unknown accounts are NOT_FOUND.
    pub async fn resolve(&self, field: &str, code: &AccountCode, create_wallets: bool) -> Result<LedgerAccount> {
        if let Ok(cache) = self.cache.read() {
            if let Some(a) = cache.get(code.as_str()) {
                return Ok(a.clone());
            }
        }
        if let Some(a) = self.fetch(code).await? {
            return Ok(a);
        }
        if create_wallets {
            if let Some((user, ccy)) = code.as_wallet() {
                UserId::parse(field, user)?;
                let currency = self.currencies.parse(field, ccy)?;
                // Wallets are liabilities (the platform owes the user) and never negative.
                self.insert_if_missing(code, AccountType::Liability, currency, false).await?;
                if let Some(a) = self.fetch(code).await? {
                    return Ok(a);
                }
            }
        }
        Err(Error::NotFound(format!("{field}: ledger account {code} not found")))
    }

    /// The wallet of `user` in `currency`, created on first use.
    pub async fn wallet(&self, user: &UserId, currency: Currency) -> Result<LedgerAccount> {
        self.resolve("wallet", &AccountCode::wallet(user, currency), true).await
    }

    /// The receivable of `user` in `currency`, created on first use.
    pub async fn receivable(&self, user: &UserId, currency: Currency) -> Result<LedgerAccount> {
        let code = AccountCode::receivable(user, currency);
        if let Ok(a) = self.resolve("receivable", &code, false).await {
            return Ok(a);
        }
        self.insert_if_missing(&code, AccountType::Asset, currency, false).await?;
        self.resolve("receivable", &code, false).await
    }

    /// The held sale proceeds of seller `user` in `currency`, created on first use.
    pub async fn sales_pending(&self, user: &UserId, currency: Currency) -> Result<LedgerAccount> {
        let code = AccountCode::sales_pending(user, currency);
        if let Ok(a) = self.resolve("sales_pending", &code, false).await {
            return Ok(a);
        }
        self.insert_if_missing(&code, AccountType::Liability, currency, false).await?;
        self.resolve("sales_pending", &code, false).await
    }

    /// The stream-tab account of `user` in `currency`, created on first use.
    pub async fn tab(&self, user: &UserId, currency: Currency) -> Result<LedgerAccount> {
        let code = AccountCode::tab(user, currency);
        if let Ok(a) = self.resolve("tab", &code, false).await {
            return Ok(a);
        }
        self.insert_if_missing(&code, AccountType::Asset, currency, false).await?;
        self.resolve("tab", &code, false).await
    }

    /// A system account of `currency`.
    pub async fn system(&self, name: &str, currency: Currency) -> Result<LedgerAccount> {
        self.resolve("account", &AccountCode::system(name, currency), false).await
    }

    /// The materialized balance of one account.
    pub async fn balance(&self, account_id: i64) -> Result<Balance> {
        let row: (i64, i64, i64, i64) = with_db!(&self.db, pool => sqlx::query_as(
            "SELECT posted_debits, posted_credits, pending_debits, pending_credits FROM ledger_accounts WHERE id = $1",
        )
        .bind(account_id)
        .fetch_one(pool)
        .await)?;
        Ok(Balance { posted_debits: row.0, posted_credits: row.1, pending_debits: row.2, pending_credits: row.3 })
    }
}
