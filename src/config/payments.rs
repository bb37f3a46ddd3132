//! The payments settings: tier limits, card fees, payouts, disputes and live shopping.

use std::time::Duration;

use super::settings::Settings;
use super::ConfigError;
use crate::payments::model::{DisputeFeePayer, DisputeRecovery, TierLimits};
use crate::payments::payouts::{PayoutLimits, PayoutsConfig};
use crate::payments::PaymentsConfig;

/// Reads the payments settings, each defaulting to `PaymentsConfig::default()`'s.
pub(super) fn load(s: &Settings<'_>) -> Result<PaymentsConfig, ConfigError> {
    let payments = PaymentsConfig::default();
    let payouts = payments.payouts.clone();
    let shop = payments.shop.clone();
    let limit = |name: &'static str, default: i64| s.num(name, default, 1..=1_000_000_000);
    let config = PaymentsConfig {
        unverified: TierLimits {
            payment_max: limit("DMPAY_LIMIT_UNVERIFIED_PAYMENT_MAX", payments.unverified.payment_max)?,
            daily_max: limit("DMPAY_LIMIT_UNVERIFIED_DAILY_MAX", payments.unverified.daily_max)?,
        },
        verified: TierLimits {
            payment_max: limit("DMPAY_LIMIT_VERIFIED_PAYMENT_MAX", payments.verified.payment_max)?,
            daily_max: limit("DMPAY_LIMIT_VERIFIED_DAILY_MAX", payments.verified.daily_max)?,
        },
        card_fee_bps: s.num("DMPAY_CARD_FEE_BPS", 0, 0..=2_000)?,
        card_fee_fixed_minor: s.num("DMPAY_CARD_FEE_FIXED_MINOR", 0, 0..=100_000)?,
        resolve_after_s: s
            .duration("DMPAY_PAYMENTS_RESOLVE_AFTER", Duration::from_secs(payments.resolve_after_s as u64))?
            .as_secs() as i64,
        payouts: PayoutsConfig {
            unverified: PayoutLimits {
                payout_max: limit("DMPAY_LIMIT_UNVERIFIED_PAYOUT_MAX", payouts.unverified.payout_max)?,
                daily_max: limit("DMPAY_LIMIT_UNVERIFIED_PAYOUT_DAILY_MAX", payouts.unverified.daily_max)?,
            },
            verified: PayoutLimits {
                payout_max: limit("DMPAY_LIMIT_VERIFIED_PAYOUT_MAX", payouts.verified.payout_max)?,
                daily_max: limit("DMPAY_LIMIT_VERIFIED_PAYOUT_DAILY_MAX", payouts.verified.daily_max)?,
            },
            instant_fee_bps: s.num("DMPAY_PAYOUT_INSTANT_FEE_BPS", payouts.instant_fee_bps, 0..=2_000)?,
            instant_fee_min_minor: s.num(
                "DMPAY_PAYOUT_INSTANT_FEE_MIN_MINOR",
                payouts.instant_fee_min_minor,
                0..=100_000,
            )?,
            instant_fee_max_minor: s.num(
                "DMPAY_PAYOUT_INSTANT_FEE_MAX_MINOR",
                payouts.instant_fee_max_minor,
                0..=10_000_000,
            )?,
            instant_hold_s: s.duration("DMPAY_PAYOUT_INSTANT_HOLD", Duration::ZERO)?.as_secs() as i64,
        },
        disputes: crate::payments::model::DisputesConfig {
            recovery: s.choice(
                "DMPAY_DISPUTE_RECOVERY",
                "recipient",
                &[("recipient", DisputeRecovery::Recipient), ("platform", DisputeRecovery::Platform)],
            )?,
            fee_payer: s.choice(
                "DMPAY_DISPUTE_FEE_PAYER",
                "platform",
                &[("platform", DisputeFeePayer::Platform), ("recipient", DisputeFeePayer::Recipient)],
            )?,
        },
        shop: crate::payments::model::ShopConfig {
            commission_bps: s.num("DMPAY_SHOP_COMMISSION_BPS", shop.commission_bps, 0..=10_000)?,
            hold_s: s.duration("DMPAY_SHOP_HOLD", Duration::from_secs(shop.hold_s as u64))?.as_secs() as i64,
            per_buyer_max_default: s.num(
                "DMPAY_SHOP_PER_BUYER_MAX",
                shop.per_buyer_max_default,
                1..=crate::payments::shop::QUANTITY_MAX,
            )?,
            open_listings_per_seller_max: s.num(
                "DMPAY_SHOP_OPEN_LISTINGS_PER_SELLER_MAX",
                shop.open_listings_per_seller_max,
                1..=100_000,
            )?,
            refunds_per_purchase_max: s.num(
                "DMPAY_SHOP_REFUNDS_PER_PURCHASE_MAX",
                shop.refunds_per_purchase_max,
                1..=1_000,
            )?,
            tab_ttl_s: s.duration("DMPAY_SHOP_TAB_TTL", Duration::from_secs(shop.tab_ttl_s as u64))?.as_secs() as i64,
        },
    };
    Ok(config)
}

/// The bounds a range alone does not say (a fee's maximum above its minimum, a tab no
/// longer than a card authorization lasts); checked once every setting was read and
/// none was unknown (`Settings::finish`), as the other settings' bounds are.
pub(super) fn check(config: &PaymentsConfig) -> Result<(), ConfigError> {
    let payouts = &config.payouts;
    if payouts.instant_fee_max_minor < payouts.instant_fee_min_minor {
        return Err(ConfigError::Invalid {
            name: "DMPAY_PAYOUT_INSTANT_FEE_MAX_MINOR",
            detail: "at least DMPAY_PAYOUT_INSTANT_FEE_MIN_MINOR".into(),
        });
    }
    if !(60..=7 * 86_400).contains(&config.shop.tab_ttl_s) {
        return Err(ConfigError::Invalid {
            name: "DMPAY_SHOP_TAB_TTL",
            detail: "1 minute to 7 days: a card authorization does not last longer".into(),
        });
    }
    if config.shop.hold_s > 90 * 86_400 {
        return Err(ConfigError::Invalid { name: "DMPAY_SHOP_HOLD", detail: "at most 90 days".into() });
    }
    if payouts.instant_hold_s > 30 * 86_400 {
        return Err(ConfigError::Invalid { name: "DMPAY_PAYOUT_INSTANT_HOLD", detail: "at most 30 days".into() });
    }
    Ok(())
}
