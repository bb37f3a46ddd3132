//! Money: currencies with their minor units, and exact amounts as i64 minor units.
//!
//! Amounts enter as decimal strings and are parsed strictly (reject, never round) with
//! `rust_decimal`; inside dmpay they are i64 minor units with their currency, and every
//! arithmetic step is checked.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

use crate::kernel::error::{Error, Result};

/// Largest single amount, in minor units (10^15: ten trillion dollars). Far below
/// i64::MAX, so sums of many amounts cannot overflow before a check catches them.
pub const AMOUNT_MINOR_MAX: i64 = 1_000_000_000_000_000;

/// ISO 4217 currencies dmpay knows, with their minor-unit exponent.
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("SAR", 2),
    ("USD", 2),
];

/// A known currency. Copy, compared by code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: &'static str,
    exponent: u32,
}

impl Currency {
    /// Looks up an ISO 4217 code (upper case).
    pub fn from_code(code: &str) -> Option<Currency> {
        CURRENCIES.iter().find(|(c, _)| *c == code).map(|(code, exponent)| Currency { code, exponent: *exponent })
    }

    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES.iter().map(|(code, exponent)| Currency { code, exponent: *exponent })
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point (USD 2, JPY 0, BHD 3).
    pub fn exponent(self) -> u32 {
        self.exponent
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// The currencies this deployment accepts (`DMPAY_CURRENCIES`).
#[derive(Debug, Clone)]
pub struct Currencies {
    enabled: Vec<Currency>,
}

impl Currencies {
    pub fn new(enabled: Vec<Currency>) -> Self {
        Currencies { enabled }
    }

    pub fn all() -> Self {
        Currencies { enabled: Currency::all().collect() }
    }

    pub fn enabled(&self) -> &[Currency] {
        &self.enabled
    }

    /// Parses a currency field: known to ISO 4217 here, and enabled.
    pub fn parse(&self, field: &str, code: &str) -> Result<Currency> {
        if code.is_empty() {
            return Err(Error::invalid(field, "required"));
        }
        let currency = Currency::from_code(code)
            .ok_or_else(|| Error::invalid(field, format!("unknown currency {:?}", truncate(code, 8))))?;
        if !self.enabled.contains(&currency) {
            return Err(Error::invalid(field, format!("currency {currency} is not enabled")));
        }
        Ok(currency)
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// An exact amount with its currency, in minor units. May be negative (balances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    currency: Currency,
    minor: i64,
}

impl Money {
    pub fn from_minor(currency: Currency, minor: i64) -> Money {
        Money { currency, minor }
    }

    pub fn zero(currency: Currency) -> Money {
        Money { currency, minor: 0 }
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    pub fn minor(self) -> i64 {
        self.minor
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        self.minor.checked_add(other.minor).map(|minor| Money { currency: self.currency, minor })
    }

    pub fn checked_sub(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        self.minor.checked_sub(other.minor).map(|minor| Money { currency: self.currency, minor })
    }

    /// The amount as a decimal string with exactly the currency's fraction digits
    /// ("12.50", "-0.05", "1000" for JPY).
    pub fn amount_string(self) -> String {
        let mut d = Decimal::from(self.minor);
        // set_scale only fails for scales above 28; exponents here are at most 3.
        let _ = d.set_scale(self.currency.exponent);
        d.to_string()
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_string(), self.currency)
    }
}

/// Parses an exact decimal amount string into minor units of `currency`. Accepts only
/// `DIGITS` or `DIGITS.DIGITS` (an optional leading '-' when `allow_negative`), with at
/// most the currency's fraction digits. Anything else is refused: exponents, spaces,
/// separators, "NaN", a bare "." and excess precision are never rounded away.
pub fn parse_minor(field: &str, raw: &str, currency: Currency, allow_negative: bool) -> Result<i64> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if raw.len() > 40 {
        return Err(Error::invalid(field, "not a decimal amount"));
    }
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(rest) if allow_negative => (true, rest),
        Some(_) => return Err(Error::invalid(field, "must be positive")),
        None => (false, raw),
    };
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_digits(int_part) || frac_part.is_some_and(|f| !is_digits(f)) {
        return Err(Error::invalid(
            field,
            format!("{:?} is not a plain decimal amount like \"12.50\"", truncate(raw, 24)),
        ));
    }
    let frac_len = frac_part.map_or(0, str::len) as u32;
    if frac_len > currency.exponent() {
        return Err(Error::invalid(
            field,
            format!("{currency} has {} decimal places; {:?} has {frac_len}", currency.exponent(), truncate(raw, 24)),
        ));
    }
    let too_large = || Error::invalid(field, format!("exceeds the maximum amount {}", max_amount_string(currency)));
    let decimal = Decimal::from_str_exact(raw).map_err(|_| too_large())?;
    let scale = Decimal::from(10_i64.pow(currency.exponent()));
    let minor = decimal
        .checked_mul(scale)
        .filter(|m| m.fract().is_zero())
        .and_then(|m| i64::from_str(&m.trunc().to_string()).ok())
        .ok_or_else(too_large)?;
    // Not `minor.abs()`: i64::MIN ("-92233720368547758.08" USD) has no absolute value.
    if !(-AMOUNT_MINOR_MAX..=AMOUNT_MINOR_MAX).contains(&minor) {
        return Err(too_large());
    }
    debug_assert_eq!(minor < 0, negative && minor != 0);
    Ok(minor)
}

/// Parses a positive amount (> 0), the rule for every amount that moves money.
pub fn parse_positive(field: &str, raw: &str, currency: Currency) -> Result<Money> {
    let minor = parse_minor(field, raw, currency, false)?;
    if minor == 0 {
        return Err(Error::invalid(field, "must be greater than zero"));
    }
    Ok(Money::from_minor(currency, minor))
}

fn max_amount_string(currency: Currency) -> String {
    Money::from_minor(currency, AMOUNT_MINOR_MAX).amount_string()
}

/// A limit in major units as minor units of `currency` (saturating).
pub fn major_to_minor(major: i64, currency: Currency) -> i64 {
    major.saturating_mul(10_i64.pow(currency.exponent()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::from_code("USD").unwrap()
    }

    #[test]
    fn parses_exact_amounts() {
        assert_eq!(parse_minor("a", "12.50", usd(), false).unwrap(), 1250);
        assert_eq!(parse_minor("a", "12.5", usd(), false).unwrap(), 1250);
        assert_eq!(parse_minor("a", "12", usd(), false).unwrap(), 1200);
        assert_eq!(parse_minor("a", "0.01", usd(), false).unwrap(), 1);
        assert_eq!(parse_minor("a", "-3.10", usd(), true).unwrap(), -310);
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(parse_minor("a", "1000", jpy, false).unwrap(), 1000);
        let bhd = Currency::from_code("BHD").unwrap();
        assert_eq!(parse_minor("a", "1.234", bhd, false).unwrap(), 1234);
    }

    #[test]
    fn rejects_never_rounds() {
        let jpy = Currency::from_code("JPY").unwrap();
        for bad in ["1e3", " 1", "1 ", "1,00", "NaN", "inf", "", ".5", "1.", "+1", "--1", "1.2.3", "0x10", "１"] {
            assert!(parse_minor("amount", bad, usd(), false).is_err(), "{bad:?}");
        }
        assert!(parse_minor("amount", "1.001", usd(), false).is_err());
        assert!(parse_minor("amount", "1.500", usd(), false).is_err());
        assert!(parse_minor("amount", "1.0", jpy, false).is_err());
        assert!(parse_minor("amount", "-1", usd(), false).is_err());
        assert!(parse_positive("amount", "0.00", usd()).is_err());
        assert!(parse_minor("amount", "10000000000000.01", usd(), false).is_err());
        assert!(parse_minor("amount", "99999999999999999999999999999", usd(), false).is_err());
        let err = parse_minor("postings[0].amount", "1.001", usd(), false).unwrap_err();
        assert!(err.to_string().contains("postings[0].amount"), "{err}");
        assert!(err.to_string().contains("2 decimal places"), "{err}");
    }

    /// Found with the money_parse fuzz target (its seed corpus keeps the input): exactly
    /// i64::MIN minor units overflowed `abs()`, a panic in debug builds and an accepted
    /// i64::MIN amount in release (settlement reports allow negative amounts).
    #[test]
    fn i64_extremes_are_refused_not_overflowed() {
        let jpy = Currency::from_code("JPY").unwrap();
        let kwd = Currency::from_code("KWD").unwrap();
        for (raw, currency) in [
            ("-92233720368547758.08", usd()),
            ("92233720368547758.07", usd()),
            ("-9223372036854775808", jpy),
            ("-9223372036854775.808", kwd),
        ] {
            let err = parse_minor("amount", raw, currency, true).unwrap_err();
            assert!(err.to_string().contains("exceeds the maximum amount"), "{raw}: {err}");
        }
        assert_eq!(parse_minor("a", "-10000000000000.00", usd(), true).unwrap(), -AMOUNT_MINOR_MAX);
        assert!(parse_minor("a", "-10000000000000.01", usd(), true).is_err());
    }

    #[test]
    fn formats_with_the_currency_exponent() {
        assert_eq!(Money::from_minor(usd(), 1250).amount_string(), "12.50");
        assert_eq!(Money::from_minor(usd(), -5).amount_string(), "-0.05");
        assert_eq!(Money::from_minor(usd(), 0).amount_string(), "0.00");
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(Money::from_minor(jpy, 1000).amount_string(), "1000");
        let kwd = Currency::from_code("KWD").unwrap();
        assert_eq!(Money::from_minor(kwd, 1).amount_string(), "0.001");
    }

    #[test]
    fn currencies_are_known_and_enabled() {
        let only_usd = Currencies::new(vec![usd()]);
        assert!(only_usd.parse("currency", "USD").is_ok());
        assert!(only_usd.parse("currency", "EUR").unwrap_err().to_string().contains("not enabled"));
        assert!(only_usd.parse("currency", "usd").is_err());
        assert!(only_usd.parse("currency", "XXX").unwrap_err().to_string().contains("unknown"));
        assert_eq!(Currency::all().count(), 15);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn format_then_parse_round_trips(minor in -AMOUNT_MINOR_MAX..=AMOUNT_MINOR_MAX, idx in 0usize..15) {
                let currency = Currency::all().nth(idx).unwrap();
                let s = Money::from_minor(currency, minor).amount_string();
                prop_assert_eq!(parse_minor("a", &s, currency, true).unwrap(), minor);
            }

            #[test]
            fn arbitrary_strings_never_panic(s in ".{0,48}") {
                let _ = parse_minor("a", &s, Currency::from_code("USD").unwrap(), true);
            }
        }
    }
}
