//! Card data in memory: secret types that never print what they hold and wipe their
//! memory on drop. The vault makes them (validation, decryption); the processor
//! boundary takes them to charge a card. Nothing here ever echoes a number.

use std::fmt;

use zeroize::Zeroizing;

/// A primary account number: digits only, 12 to 19 of them, Luhn-valid. Debug and
/// Display show at most the last four digits; the memory is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Pan(Zeroizing<String>);

impl Pan {
    /// The digits, for the encryption and the processor call only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// A PAN from digits the vault has validated (`vault::card::validate`), or decrypted
    /// from storage, which was validated when written.
    pub(crate) fn from_validated(digits: Zeroizing<String>) -> Self {
        Pan(digits)
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan(****{})", self.last4())
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "****{}", self.last4())
    }
}

/// A card verification code. Never stored; wiped on drop; prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Cvc(Zeroizing<String>);

impl Cvc {
    /// A CVC the vault has validated for the card's brand.
    pub(crate) fn from_validated(digits: Zeroizing<String>) -> Self {
        Cvc(digits)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc(***)")
    }
}

impl fmt::Display for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
