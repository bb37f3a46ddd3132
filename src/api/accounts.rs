//! `dmpay.v1.Accounts`.

use tonic::{Request, Response, Status};

use super::pb;
use super::status::ApiResult;
use super::{principal, timestamp, to_status};
use crate::accounts::{self, Account, Accounts, Status as AccountStatus, Tier};
use crate::auth::scope;
use crate::kernel::error::Error;
use crate::kernel::ids::UserId;
use crate::kernel::text::parse_text;

pub struct AccountsApi {
    accounts: Accounts,
    /// The platform's commission on sales when a seller has no override.
    commission_bps_default: u32,
}

impl AccountsApi {
    pub fn new(accounts: Accounts, commission_bps_default: u32) -> Self {
        AccountsApi { accounts, commission_bps_default }
    }

    fn to_wire(&self, a: Account) -> pb::Account {
        account_to_wire(a, self.commission_bps_default)
    }
}

fn tier_from_wire(raw: i32) -> Result<Option<Tier>, Error> {
    match pb::Tier::try_from(raw) {
        Ok(pb::Tier::Unspecified) => Ok(None),
        Ok(pb::Tier::Unverified) => Ok(Some(Tier::Unverified)),
        Ok(pb::Tier::Verified) => Ok(Some(Tier::Verified)),
        Err(_) => Err(Error::invalid("tier", format!("unknown tier {raw}"))),
    }
}

pub(crate) fn account_to_wire(a: Account, commission_bps_default: u32) -> pb::Account {
    pb::Account {
        seller: a.seller,
        commission_bps: a.commission_bps.unwrap_or(commission_bps_default) as i32,
        commission_override: a.commission_bps.is_some(),
        user_id: a.user_id.to_string(),
        display_name: a.display_name,
        tier: match a.tier {
            Tier::Unverified => pb::Tier::Unverified,
            Tier::Verified => pb::Tier::Verified,
        } as i32,
        status: match a.status {
            AccountStatus::Active => pb::AccountStatus::Active,
            AccountStatus::Frozen => pb::AccountStatus::Frozen,
        } as i32,
        created_at: Some(timestamp(a.created_at_us)),
    }
}

impl AccountsApi {
    async fn set_status(
        &self,
        actor: &str,
        user_id: &str,
        reason: &str,
        status: AccountStatus,
    ) -> Result<pb::Account, Error> {
        let user_id = UserId::parse("user_id", user_id)?;
        let reason = parse_text("reason", reason, accounts::REASON_LEN_MAX, true)?;
        let account = self.accounts.set_status(actor, &user_id, status, &reason).await?;
        Ok(self.to_wire(account))
    }
}

#[tonic::async_trait]
impl pb::accounts_server::Accounts for AccountsApi {
    async fn upsert_account(&self, req: Request<pb::UpsertAccountRequest>) -> ApiResult<pb::Account> {
        let caller = principal(&req)?;
        caller.require(scope::ACCOUNTS_ADMIN).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let user_id = UserId::parse("user_id", &r.user_id)?;
            let name = parse_text("display_name", &r.display_name, accounts::DISPLAY_NAME_LEN_MAX, false)?;
            let tier = tier_from_wire(r.tier)?;
            self.accounts.upsert(&caller.sub, &user_id, &name, tier).await
        }
        .await;
        result.map(|a| Response::new(self.to_wire(a))).map_err(to_status)
    }

    async fn get_account(&self, req: Request<pb::GetAccountRequest>) -> ApiResult<pb::Account> {
        let caller = principal(&req)?;
        let user_id = UserId::parse("user_id", &req.get_ref().user_id).map_err(to_status)?;
        let is_self = caller.sub == user_id.as_str();
        if !is_self && !caller.has(scope::ACCOUNTS_ADMIN) {
            return Err(Status::permission_denied("you may read only your own account"));
        }
        // A user reading their own account is its first use; an admin looking up a
        // user the platform never upserted learns that it does not exist.
        let account = if is_self {
            self.accounts.ensure(&user_id).await
        } else {
            self.accounts
                .get(&user_id)
                .await
                .and_then(|a| a.ok_or_else(|| Error::not_found(format!("account {user_id}"))))
        };
        account.map(|a| Response::new(self.to_wire(a))).map_err(to_status)
    }

    async fn set_seller(&self, req: Request<pb::SetSellerRequest>) -> ApiResult<pb::Account> {
        let caller = principal(&req)?;
        caller.require(scope::ACCOUNTS_ADMIN).map_err(to_status)?;
        let r = req.get_ref();
        let result = async {
            let user_id = UserId::parse("user_id", &r.user_id)?;
            let reason = parse_text("reason", &r.reason, accounts::REASON_LEN_MAX, true)?;
            let bps = match r.commission_bps {
                None => None,
                Some(b) if (0..=accounts::COMMISSION_BPS_MAX as i32).contains(&b) => Some(b as u32),
                Some(_) => {
                    return Err(Error::invalid(
                        "commission_bps",
                        format!("0 to {} basis points", accounts::COMMISSION_BPS_MAX),
                    ))
                }
            };
            self.accounts.set_seller(&caller.sub, &user_id, r.seller, bps, &reason).await
        }
        .await;
        result.map(|a| Response::new(self.to_wire(a))).map_err(to_status)
    }

    async fn freeze_account(&self, req: Request<pb::FreezeAccountRequest>) -> ApiResult<pb::Account> {
        let caller = principal(&req)?;
        caller.require(scope::ACCOUNTS_ADMIN).map_err(to_status)?;
        let r = req.get_ref();
        self.set_status(&caller.sub, &r.user_id, &r.reason, AccountStatus::Frozen)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn unfreeze_account(&self, req: Request<pb::UnfreezeAccountRequest>) -> ApiResult<pb::Account> {
        let caller = principal(&req)?;
        caller.require(scope::ACCOUNTS_ADMIN).map_err(to_status)?;
        let r = req.get_ref();
        self.set_status(&caller.sub, &r.user_id, &r.reason, AccountStatus::Active)
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}
