//! The vault's types: settings, payment methods as their owners see them, stored rows,
//! and the card handed to the processor.

use std::time::Duration;

use super::card::{Brand, Pan};
use crate::kernel::error::{Error, Result};
use crate::processor::CardDetails;

#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// How long an unlinked token lives.
    pub unlinked_ttl: Duration,
    /// Tokenization attempts per account per hour.
    pub tokenize_per_hour_max: i64,
    /// How long a removed card's number is kept (encrypted) before it is destroyed.
    pub removed_retention: Duration,
    /// How often expired unlinked cards are deleted and removed ones destroyed.
    pub purge_interval: Duration,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            unlinked_ttl: Duration::from_secs(15 * 60),
            tokenize_per_hour_max: 20,
            removed_retention: Duration::from_secs(30 * 86_400),
            purge_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodStatus {
    Unlinked,
    Active,
    Removed,
}

impl MethodStatus {
    pub(super) fn from_db(s: &str) -> Result<Self> {
        Ok(match s {
            "unlinked" => MethodStatus::Unlinked,
            "active" => MethodStatus::Active,
            "removed" => MethodStatus::Removed,
            other => return Err(Error::internal(anyhow::anyhow!("unknown method status {other:?}"))),
        })
    }
}

/// A payment method as its owner may see it: never more than brand and last four.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentMethod {
    pub token: String,
    pub user_id: String,
    pub brand: Brand,
    pub last4: String,
    pub exp_month: u32,
    pub exp_year: u32,
    pub holder_name: String,
    pub status: MethodStatus,
    pub is_default: bool,
    pub created_at_us: i64,
}

#[derive(sqlx::FromRow)]
pub(super) struct MethodRow {
    pub(super) token: String,
    pub(super) user_id: String,
    pub(super) brand: String,
    pub(super) last4: String,
    pub(super) exp_month: i32,
    pub(super) exp_year: i32,
    pub(super) holder_name: String,
    pub(super) status: String,
    pub(super) is_default: bool,
    pub(super) created_at_us: i64,
    pub(super) expires_at_us: Option<i64>,
}

impl MethodRow {
    pub(super) fn into_method(self) -> Result<PaymentMethod> {
        Ok(PaymentMethod {
            brand: Brand::from_db(&self.brand)?,
            status: MethodStatus::from_db(&self.status)?,
            token: self.token,
            user_id: self.user_id,
            last4: self.last4,
            exp_month: self.exp_month as u32,
            exp_year: self.exp_year as u32,
            holder_name: self.holder_name,
            is_default: self.is_default,
            created_at_us: self.created_at_us,
        })
    }

    pub(super) fn expired(&self, now: i64) -> bool {
        self.status == "unlinked" && self.expires_at_us.is_some_and(|t| t <= now)
    }
}

/// token, user, KEK id, wrapped DEK, PAN ciphertext.
pub(super) type SealedRow = (String, String, String, Vec<u8>, Vec<u8>);

pub(super) const METHOD_COLUMNS: &str =
    "token, user_id, brand, last4, exp_month, exp_year, holder_name, status, is_default, created_at_us, expires_at_us";

/// `TokenizeCard` input, straight from the wire; validated here.
pub struct TokenizeInput<'a> {
    pub card_number: &'a str,
    pub exp_month: u32,
    pub exp_year: u32,
    pub cvc: &'a str,
    pub holder_name: &'a str,
    pub postal_code: &'a str,
}

/// The card of an active method, decrypted for one processor call.
pub struct ChargeableCard {
    pub token: String,
    pub pan: Pan,
    pub exp_month: u32,
    pub exp_year: u32,
}

impl ChargeableCard {
    pub fn details(&self) -> CardDetails<'_> {
        CardDetails { pan: &self.pan, exp_month: self.exp_month, exp_year: self.exp_year, cvc: None }
    }
}
