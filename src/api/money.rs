//! `dmpay.v1.Money` <-> domain money.

use super::pb;
use crate::kernel::error::{Error, Result};
use crate::kernel::money::{parse_positive, Currencies, Money};

/// A required positive amount: `field.currency` and `field.amount` are checked.
pub fn positive(field: &str, wire: Option<&pb::Money>, currencies: &Currencies) -> Result<Money> {
    let wire = wire.ok_or_else(|| Error::invalid(field, "required"))?;
    let currency = currencies.parse(&format!("{field}.currency"), &wire.currency)?;
    parse_positive(&format!("{field}.amount"), &wire.amount, currency)
}

/// An optional positive amount: absent, or both parts empty, is `None`.
pub fn optional_positive(field: &str, wire: Option<&pb::Money>, currencies: &Currencies) -> Result<Option<Money>> {
    match wire {
        None => Ok(None),
        Some(m) if m.currency.is_empty() && m.amount.is_empty() => Ok(None),
        Some(m) => positive(field, Some(m), currencies).map(Some),
    }
}

pub fn to_wire(m: Money) -> pb::Money {
    pb::Money { currency: m.currency().code().to_owned(), amount: m.amount_string() }
}
