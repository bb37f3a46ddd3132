//! The shared kernel: types every layer uses and none of dmpay's own modules above.
//!
//! - `error`     the domain error shared by every module, and how driver errors map to it
//! - `money`     currencies, exact amounts in minor units, strict parsing
//! - `ids`       identifier newtypes (`UserId`)
//! - `text`      free text people read: bounds, no control or spoofing characters
//! - `clock`     the injected clock rows are stamped with
//! - `dates`     UTC calendar arithmetic for expiries, reports and timestamps
//! - `reason`    the catalogue of machine-readable reasons (`Reason`)
//! - `stored`    `stored_enum!`: closed sets of values kept as text in the database
//! - `card_data` card numbers and CVCs in memory, masked and zeroized
//! - `page`      keyset pages of lists newest first, and their tokens

pub mod card_data;
pub mod clock;
pub mod dates;
pub mod error;
pub mod ids;
pub mod money;
pub mod page;
pub mod reason;
pub mod stored;
pub mod text;
