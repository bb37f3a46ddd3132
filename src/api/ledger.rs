//! `dmpay.v1.Ledger`.

use tonic::{Request, Response};

use super::money::{optional_positive, positive, to_wire};
use super::pb;
use super::status::ApiResult;
use super::{principal, timestamp, timestamp_us, to_status};
use crate::auth::scope;
use crate::kernel::error::{Error, Result};
use crate::kernel::money::Money;
use crate::ledger::{
    self, callers, read, AccountCode, AccountType, Direction, Entry, EntryStatus, Ledger, LedgerAccount,
    PostEntryInput, PostingInput,
};

pub struct LedgerApi {
    ledger: Ledger,
}

impl LedgerApi {
    pub fn new(ledger: Ledger) -> Self {
        LedgerApi { ledger }
    }
}

fn account_type_from_wire(raw: i32) -> Result<AccountType> {
    match pb::AccountType::try_from(raw) {
        Ok(pb::AccountType::Asset) => Ok(AccountType::Asset),
        Ok(pb::AccountType::Liability) => Ok(AccountType::Liability),
        Ok(pb::AccountType::Equity) => Ok(AccountType::Equity),
        Ok(pb::AccountType::Income) => Ok(AccountType::Income),
        Ok(pb::AccountType::Expense) => Ok(AccountType::Expense),
        Ok(pb::AccountType::Unspecified) => Err(Error::invalid("type", "required")),
        Err(_) => Err(Error::invalid("type", format!("unknown account type {raw}"))),
    }
}

pub(crate) fn account_type_to_wire(t: AccountType) -> pb::AccountType {
    match t {
        AccountType::Asset => pb::AccountType::Asset,
        AccountType::Liability => pb::AccountType::Liability,
        AccountType::Equity => pb::AccountType::Equity,
        AccountType::Income => pb::AccountType::Income,
        AccountType::Expense => pb::AccountType::Expense,
    }
}

fn direction_from_wire(field: &str, raw: i32) -> Result<Direction> {
    match pb::Direction::try_from(raw) {
        Ok(pb::Direction::Debit) => Ok(Direction::Debit),
        Ok(pb::Direction::Credit) => Ok(Direction::Credit),
        Ok(pb::Direction::Unspecified) => Err(Error::invalid(field, "required: DIRECTION_DEBIT or DIRECTION_CREDIT")),
        Err(_) => Err(Error::invalid(field, format!("unknown direction {raw}"))),
    }
}

fn account_to_wire(a: LedgerAccount) -> pb::LedgerAccount {
    pb::LedgerAccount {
        code: a.code.to_string(),
        r#type: account_type_to_wire(a.account_type) as i32,
        currency: a.currency.code().to_owned(),
        allow_negative: a.allow_negative,
        created_at: Some(timestamp(a.created_at_us)),
    }
}

pub(crate) fn entry_to_wire(e: Entry) -> pb::Entry {
    pb::Entry {
        entry_id: e.id,
        sequence: e.sequence,
        kind: e.kind,
        status: match e.status {
            EntryStatus::Posted => pb::EntryStatus::Posted,
            EntryStatus::Pending => pb::EntryStatus::Pending,
            EntryStatus::Voided => pb::EntryStatus::Voided,
            EntryStatus::Expired => pb::EntryStatus::Expired,
        } as i32,
        postings: e
            .postings
            .into_iter()
            .map(|p| pb::Posting {
                account_code: p.account_code.to_string(),
                direction: match p.direction {
                    Direction::Debit => pb::Direction::Debit,
                    Direction::Credit => pb::Direction::Credit,
                } as i32,
                amount: Some(to_wire(p.amount)),
            })
            .collect(),
        metadata: e.metadata.into_iter().collect(),
        created_at: Some(timestamp(e.created_at_us)),
        reverses_entry_id: e.reverses_entry_id.unwrap_or_default(),
        description: e.description,
        pending_entry_id: e.pending_entry_id.unwrap_or_default(),
        expires_at: e.expires_at_us.map(timestamp),
    }
}

fn optional_time(field: &str, ts: Option<&prost_types::Timestamp>) -> Result<Option<i64>> {
    ts.map(|t| timestamp_us(field, t)).transpose()
}

impl LedgerApi {
    fn post_entry_input(&self, r: &pb::PostEntryRequest) -> Result<PostEntryInput> {
        if r.postings.len() > ledger::POSTINGS_MAX {
            return Err(Error::invalid("postings", format!("at most {} postings", ledger::POSTINGS_MAX)));
        }
        let currencies = self.ledger.accounts().currencies();
        let postings = r
            .postings
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(PostingInput {
                    account_code: AccountCode::parse(&format!("postings[{i}].account_code"), &p.account_code)?,
                    direction: direction_from_wire(&format!("postings[{i}].direction"), p.direction)?,
                    amount: positive(&format!("postings[{i}].amount"), p.amount.as_ref(), currencies)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PostEntryInput {
            idempotency_key: r.idempotency_key.clone(),
            kind: r.kind.clone(),
            description: r.description.clone(),
            postings,
            metadata: r.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            pending: r.pending,
            pending_timeout_s: r.pending_timeout_seconds,
        })
    }
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerApi {
    async fn create_ledger_account(
        &self,
        req: Request<pb::CreateLedgerAccountRequest>,
    ) -> ApiResult<pb::LedgerAccount> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_WRITE).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let code = AccountCode::parse("code", &r.code)?;
            let account_type = account_type_from_wire(r.r#type)?;
            let currency = self.ledger.accounts().currencies().parse("currency", &r.currency)?;
            self.ledger.accounts().create(code, account_type, currency, r.allow_negative).await
        }
        .await;
        result.map(|a| Response::new(account_to_wire(a))).map_err(to_status)
    }

    async fn post_entry(&self, req: Request<pb::PostEntryRequest>) -> ApiResult<pb::Entry> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_WRITE).map_err(to_status)?;
        let result = async {
            let input = self.post_entry_input(req.get_ref())?;
            // Crediting a wallet (a top-up from a platform account) needs `ledger:write`
            // only; taking money out of a user's wallet through the generic API is a
            // power of its own.
            if let Some(i) = input
                .postings
                .iter()
                .position(|p| p.direction == Direction::Debit && p.account_code.as_wallet().is_some())
            {
                if !caller.has(scope::LEDGER_WALLET_DEBIT) {
                    return Err(Error::PermissionDenied(format!(
                        "postings[{i}] debits a user's wallet, which needs scope {}",
                        scope::LEDGER_WALLET_DEBIT
                    )));
                }
            }
            self.ledger.post_entry(&callers::api(&caller.sub), input).await
        }
        .await;
        result.map(|e| Response::new(entry_to_wire(e))).map_err(to_status)
    }

    async fn post_pending(&self, req: Request<pb::PostPendingRequest>) -> ApiResult<pb::Entry> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_WRITE).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let amount = optional_positive("amount", r.amount.as_ref(), self.ledger.accounts().currencies())?;
            self.ledger
                .post_pending(
                    &callers::api(&caller.sub),
                    super::id("entry_id", &r.entry_id)?,
                    &r.idempotency_key,
                    amount,
                )
                .await
        }
        .await;
        result.map(|e| Response::new(entry_to_wire(e))).map_err(to_status)
    }

    async fn void_pending(&self, req: Request<pb::VoidPendingRequest>) -> ApiResult<pb::Entry> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_WRITE).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            self.ledger
                .void_pending(&callers::api(&caller.sub), super::id("entry_id", &r.entry_id)?, &r.idempotency_key)
                .await
        }
        .await;
        result.map(|e| Response::new(entry_to_wire(e))).map_err(to_status)
    }

    async fn reverse_entry(&self, req: Request<pb::ReverseEntryRequest>) -> ApiResult<pb::Entry> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_WRITE).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let entry_id = super::id("entry_id", &r.entry_id)?;
            let wallet_debits = if caller.has(scope::LEDGER_WALLET_DEBIT) {
                ledger::WalletDebits::Allowed
            } else {
                ledger::WalletDebits::NeedScope(scope::LEDGER_WALLET_DEBIT)
            };
            self.ledger
                .reverse(&callers::api(&caller.sub), entry_id, &r.idempotency_key, &r.reason, wallet_debits)
                .await
        }
        .await;
        result.map(|e| Response::new(entry_to_wire(e))).map_err(to_status)
    }

    async fn get_entry(&self, req: Request<pb::GetEntryRequest>) -> ApiResult<pb::Entry> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_READ).map_err(to_status)?;
        let id = super::id("entry_id", &req.get_ref().entry_id).map_err(to_status)?;
        if id.is_empty() {
            return Err(to_status(Error::invalid("entry_id", "required")));
        }
        self.ledger.get_entry(id).await.map(|e| Response::new(entry_to_wire(e))).map_err(to_status)
    }

    async fn list_entries(&self, req: Request<pb::ListEntriesRequest>) -> ApiResult<pb::ListEntriesResponse> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_READ).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let code = AccountCode::parse("account_code", &r.account_code)?;
            let account = self.ledger.accounts().resolve("account_code", &code, false).await?;
            let from = optional_time("from_time", r.from_time.as_ref())?.unwrap_or(0);
            let to = optional_time("to_time", r.to_time.as_ref())?.unwrap_or(i64::MAX);
            if from > to {
                return Err(Error::invalid("to_time", "must not be before from_time"));
            }
            let size = read::page_size(r.page_size)?;
            let cursor = read::parse_page_token(&r.page_token)?;
            read::list_entries(self.ledger.db(), account.id, from, to, size, cursor).await
        }
        .await;
        result
            .map(|(entries, next)| {
                Response::new(pb::ListEntriesResponse {
                    entries: entries.into_iter().map(entry_to_wire).collect(),
                    next_page_token: next.unwrap_or_default(),
                })
            })
            .map_err(to_status)
    }

    async fn get_ledger_balance(&self, req: Request<pb::GetLedgerBalanceRequest>) -> ApiResult<pb::LedgerBalance> {
        let caller = principal(&req)?;
        caller.require(scope::LEDGER_READ).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let code = AccountCode::parse("account_code", &r.account_code)?;
            let account = self.ledger.accounts().resolve("account_code", &code, false).await?;
            let credit_normal = account.account_type.credit_normal();
            let currency = account.currency;
            let overflow = || Error::internal(anyhow::anyhow!("balance overflow on {}", account.code));
            let wire = match optional_time("as_of", r.as_of.as_ref())? {
                Some(as_of) => {
                    let (debits, credits) = read::posted_as_of(self.ledger.db(), account.id, as_of).await?;
                    let posted = if credit_normal { credits.checked_sub(debits) } else { debits.checked_sub(credits) }
                        .ok_or_else(overflow)?;
                    let zero = to_wire(Money::zero(currency));
                    pb::LedgerBalance {
                        account_code: account.code.to_string(),
                        currency: currency.code().to_owned(),
                        posted: Some(to_wire(Money::from_minor(currency, posted))),
                        pending_debits: Some(zero.clone()),
                        pending_credits: Some(zero),
                        available: Some(to_wire(Money::from_minor(currency, posted))),
                    }
                }
                None => {
                    let b = self.ledger.accounts().balance(account.id).await?;
                    pb::LedgerBalance {
                        account_code: account.code.to_string(),
                        currency: currency.code().to_owned(),
                        posted: Some(to_wire(Money::from_minor(
                            currency,
                            b.posted(credit_normal).ok_or_else(overflow)?,
                        ))),
                        pending_debits: Some(to_wire(Money::from_minor(currency, b.pending_debits))),
                        pending_credits: Some(to_wire(Money::from_minor(currency, b.pending_credits))),
                        available: Some(to_wire(Money::from_minor(
                            currency,
                            b.available(credit_normal).ok_or_else(overflow)?,
                        ))),
                    }
                }
            };
            Ok(wire)
        }
        .await;
        result.map(Response::new).map_err(to_status)
    }
}
