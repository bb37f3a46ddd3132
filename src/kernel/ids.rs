//! Identifier newtypes, parsed once where they enter and trusted inside.

use std::fmt;

use super::error::{Error, Result};

/// Longest user id; also bounds ledger account codes built from it.
pub const USER_ID_LEN_MAX: usize = 128;

/// A platform user id: 1 to 128 characters of `[A-Za-z0-9_.-]`. The alphabet keeps ids
/// safe inside ledger account codes (`user:<id>:wallet:USD`) and log lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub fn parse(field: &str, raw: &str) -> Result<Self> {
        if raw.is_empty() {
            return Err(Error::invalid(field, "required"));
        }
        if raw.len() > USER_ID_LEN_MAX {
            return Err(Error::invalid(field, format!("at most {USER_ID_LEN_MAX} characters")));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(Error::invalid(field, "only letters, digits, '_', '.' and '-' are allowed"));
        }
        Ok(UserId(raw.to_owned()))
    }

    /// A user id read back from the database, which was parsed when written.
    pub(crate) fn from_db(raw: String) -> Self {
        UserId(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
