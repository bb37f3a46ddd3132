//! `dmpay.v1.PaymentMethods`.

use std::fmt;
use std::sync::Arc;

use tonic::{Request, Response};

use super::pb;
use super::status::ApiResult;
use super::{principal, timestamp, to_status};
use crate::auth::{scope, Principal};
use crate::kernel::error::Result;
use crate::kernel::ids::UserId;
use crate::vault::card::Brand;
use crate::vault::{MethodStatus, PaymentMethod, TokenizeInput, Vault};

/// The generated type has no derived Debug (build.rs): this one never shows card data.
impl fmt::Debug for pb::TokenizeCardRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizeCardRequest")
            .field("card_number", &"***")
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cvc", &"***")
            .field("holder_name", &self.holder_name)
            .field("postal_code", &"***")
            .finish()
    }
}

pub struct PaymentMethodsApi {
    vault: Arc<Vault>,
}

impl PaymentMethodsApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        PaymentMethodsApi { vault }
    }
}

pub(crate) fn brand_to_wire(b: Brand) -> pb::CardBrand {
    match b {
        Brand::Visa => pb::CardBrand::Visa,
        Brand::Mastercard => pb::CardBrand::Mastercard,
        Brand::Amex => pb::CardBrand::Amex,
        Brand::Discover => pb::CardBrand::Discover,
        Brand::Jcb => pb::CardBrand::Jcb,
        Brand::UnionPay => pb::CardBrand::Unionpay,
        Brand::Diners => pb::CardBrand::Diners,
    }
}

fn method_to_wire(m: PaymentMethod) -> pb::PaymentMethod {
    pb::PaymentMethod {
        token: m.token,
        brand: brand_to_wire(m.brand) as i32,
        last4: m.last4,
        exp_month: m.exp_month,
        exp_year: m.exp_year,
        holder_name: m.holder_name,
        status: match m.status {
            MethodStatus::Unlinked => pb::PaymentMethodStatus::Unlinked,
            MethodStatus::Active => pb::PaymentMethodStatus::Active,
            MethodStatus::Removed => pb::PaymentMethodStatus::Removed,
        } as i32,
        is_default: m.is_default,
        created_at: Some(timestamp(m.created_at_us)),
    }
}

/// The caller, who owns every method they touch, with `methods:write`.
fn owner(caller: &Principal) -> Result<UserId> {
    caller.require(scope::METHODS_WRITE)?;
    UserId::parse("sub", &caller.sub)
}

#[tonic::async_trait]
impl pb::payment_methods_server::PaymentMethods for PaymentMethodsApi {
    async fn tokenize_card(&self, req: Request<pb::TokenizeCardRequest>) -> ApiResult<pb::PaymentMethod> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result = async {
            let user = owner(caller)?;
            let input = TokenizeInput {
                card_number: &r.card_number,
                exp_month: r.exp_month,
                exp_year: r.exp_year,
                cvc: &r.cvc,
                holder_name: &r.holder_name,
                postal_code: &r.postal_code,
            };
            self.vault.tokenize(&user, input).await
        }
        .await;
        result.map(|m| Response::new(method_to_wire(m))).map_err(to_status)
    }

    async fn link_payment_method(&self, req: Request<pb::LinkPaymentMethodRequest>) -> ApiResult<pb::PaymentMethod> {
        let caller = principal(&req)?;
        let r = req.get_ref();
        let result =
            async { self.vault.link(&owner(caller)?, super::id("token", &r.token)?, r.make_default).await }.await;
        result.map(|m| Response::new(method_to_wire(m))).map_err(to_status)
    }

    async fn list_payment_methods(
        &self,
        req: Request<pb::ListPaymentMethodsRequest>,
    ) -> ApiResult<pb::ListPaymentMethodsResponse> {
        let caller = principal(&req)?;
        let include_removed = req.get_ref().include_removed;
        let result = async { self.vault.list(&owner(caller)?, include_removed).await }.await;
        result
            .map(|ms| {
                Response::new(pb::ListPaymentMethodsResponse {
                    payment_methods: ms.into_iter().map(method_to_wire).collect(),
                })
            })
            .map_err(to_status)
    }

    async fn set_default_payment_method(
        &self,
        req: Request<pb::SetDefaultPaymentMethodRequest>,
    ) -> ApiResult<pb::PaymentMethod> {
        let caller = principal(&req)?;
        let token = &req.get_ref().token;
        let result = async { self.vault.set_default(&owner(caller)?, super::id("token", token)?).await }.await;
        result.map(|m| Response::new(method_to_wire(m))).map_err(to_status)
    }

    async fn remove_payment_method(
        &self,
        req: Request<pb::RemovePaymentMethodRequest>,
    ) -> ApiResult<pb::PaymentMethod> {
        let caller = principal(&req)?;
        let token = &req.get_ref().token;
        let result = async { self.vault.remove(&owner(caller)?, super::id("token", token)?).await }.await;
        result.map(|m| Response::new(method_to_wire(m))).map_err(to_status)
    }
}
