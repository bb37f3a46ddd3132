//! Identifier newtypes, parsed once where they enter and trusted inside.
//!
//! Every id is declared by `id_type!`, so each has the same shape: `parse` for what a
//! caller sends (the field named in the error), `from_db` for what was parsed when it
//! was written, `as_str`, `Display`, and `generate` for the ids dmpay mints (a fresh
//! id after the kind's prefix). A function that takes a `&PaymentId` cannot be handed a
//! request id or a user id by mistake.

use std::fmt;

use super::error::{Error, Result};

/// Longest id of any kind; also bounds ledger account codes built from a user id.
pub const ID_LEN_MAX: usize = 128;

/// Declares an identifier newtype over `String`. `check = f` validates a caller's text
/// beyond the shared rules (`check_shape`); `minted = "pay_"` declares an id dmpay
/// issues itself, which any text of the right shape may name (one that names nothing
/// is simply not found) and which `generate` mints after that prefix.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, minted = $prefix:literal) => {
        id_type!($(#[$doc])* $name, check = |_, _| Ok(()));

        impl $name {
            /// A fresh id, time-ordered (UUIDv7) after its prefix.
            pub fn generate() -> Self {
                $name(format!(concat!($prefix, "{}"), uuid::Uuid::now_v7().simple()))
            }
        }
    };
    ($(#[$doc:meta])* $name:ident, check = $check:expr) => {
        $(#[$doc])*
        // Bound and decoded as text by both backends; a decoded id was parsed when it
        // was written.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::Type)]
        #[sqlx(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses a caller's text; `field` names it in the error.
            pub fn parse(field: &str, raw: &str) -> Result<Self> {
                check_shape(field, raw)?;
                let check: fn(&str, &str) -> Result<()> = $check;
                check(field, raw)?;
                Ok($name(raw.to_owned()))
            }

            /// An id read back from the database, which was parsed when written. (Ids
            /// in row types are decoded by sqlx instead, so not every kind calls it.)
            #[allow(dead_code)]
            pub(crate) fn from_db(raw: String) -> Self {
                $name(raw)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        // The derived `Hash` hashes the inner string, so maps keyed by ids can be
        // looked up with a `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

/// The rules every id from the wire meets, of any kind (the ledger's entry ids and the
/// vault's tokens too, through `api::id`): at most `ID_LEN_MAX` bytes, and no control
/// characters (NUL among them, which PostgreSQL refuses in text while SQLite would look
/// it up), so the same bad id is INVALID_ARGUMENT on both backends.
pub fn check_shape(field: &str, raw: &str) -> Result<()> {
    if raw.len() > ID_LEN_MAX {
        return Err(Error::invalid(field, format!("at most {ID_LEN_MAX} bytes")));
    }
    if raw.chars().any(char::is_control) {
        return Err(Error::invalid(field, "may not contain control characters"));
    }
    Ok(())
}

/// User ids: required, and `[A-Za-z0-9_.-]` only, which keeps them safe inside ledger
/// account codes (`user:<id>:wallet:USD`) and log lines.
fn user_chars(field: &str, raw: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(Error::invalid(field, "only letters, digits, '_', '.' and '-' are allowed"));
    }
    Ok(())
}

id_type!(
    /// A platform user id: 1 to 128 characters of `[A-Za-z0-9_.-]`.
    UserId, check = user_chars
);
id_type!(
    /// A payment, `pay_` and a UUIDv7.
    PaymentId, minted = "pay_"
);
id_type!(
    /// A money request (a bill on the wire), `req_` and a UUIDv7.
    RequestId, minted = "req_"
);
id_type!(
    /// A refund of a payment, `rf_` and a UUIDv7.
    RefundId, minted = "rf_"
);
id_type!(
    /// A payout to a card, `po_` and a UUIDv7.
    PayoutId, minted = "po_"
);
id_type!(
    /// A card dispute (chargeback), `dp_` and a UUIDv7.
    DisputeId, minted = "dp_"
);
id_type!(
    /// A live-stream listing, `lst_` and a UUIDv7.
    ListingId, minted = "lst_"
);
id_type!(
    /// A purchase from a listing, `pur_` and a UUIDv7.
    PurchaseId, minted = "pur_"
);
id_type!(
    /// A seller's refund of a purchase, `prf_` and a UUIDv7.
    PurchaseRefundId, minted = "prf_"
);
id_type!(
    /// A viewer's tab for a live stream, `tab_` and a UUIDv7.
    TabId, minted = "tab_"
);
id_type!(
    /// A reconciliation run, `run_` and a UUIDv7.
    RunId, minted = "run_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_the_field_and_bounds_every_id() {
        let long = "a".repeat(ID_LEN_MAX + 1);
        for err in [
            UserId::parse("recipient_id", &long).unwrap_err(),
            PaymentId::parse("payment_id", &long).unwrap_err(),
            RequestId::parse("bill_id", "a\u{0}b").unwrap_err(),
            UserId::parse("recipient_id", "").unwrap_err(),
            UserId::parse("recipient_id", "a b").unwrap_err(),
        ] {
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        }
        assert_eq!(PaymentId::parse("payment_id", "anything-printable").unwrap(), "anything-printable");
        assert_eq!(UserId::parse("recipient_id", &"a".repeat(ID_LEN_MAX)).unwrap().as_str().len(), ID_LEN_MAX);
    }

    #[test]
    fn generated_ids_carry_their_prefix_and_are_distinct() {
        let (a, b) = (PaymentId::generate(), PaymentId::generate());
        assert!(a.as_str().starts_with("pay_") && a.as_str().len() == 36, "{a}");
        assert_ne!(a, b);
        assert!(RunId::generate().as_str().starts_with("run_"));
    }
}
