//! The clock dmpay stamps its rows with.
//!
//! One `Clock` is made where the application is assembled and handed to every component
//! that reads the time, so a test can move one server's clock (to book card payments on
//! yesterday's date, or to make a batch read an earlier time than the last) without
//! touching any other server in the same process.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system's clock, optionally shifted. Clones share the shift.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_us: Arc<AtomicI64>,
}

impl Clock {
    /// The system's clock, unshifted: what every server runs on.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Now, in microseconds since the Unix epoch.
    pub fn now_us(&self) -> i64 {
        system_now_us().saturating_add(self.offset_us.load(Ordering::Relaxed))
    }

    /// Runs this clock (and every clone of it) `offset_us` ahead of the system's, or
    /// behind it when negative; zero puts it back. Only tests call it.
    pub fn set_offset_us(&self, offset_us: i64) {
        self.offset_us.store(offset_us, Ordering::Relaxed);
    }
}

/// The system's time in microseconds since the Unix epoch, for what is not a row's
/// stamp (benchmark reports, log lines).
pub fn system_now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shift_moves_the_clock_and_its_clones_only() {
        let shifted = Clock::system();
        let copy = shifted.clone();
        let other = Clock::system();
        shifted.set_offset_us(-86_400_000_000);
        let day = 86_400_000_000;
        assert!((other.now_us() - copy.now_us() - day).abs() < 60_000_000, "a clone follows the shift");
        assert!((other.now_us() - system_now_us()).abs() < 60_000_000, "another clock does not");
        shifted.set_offset_us(0);
        assert!((copy.now_us() - other.now_us()).abs() < 60_000_000);
    }
}
