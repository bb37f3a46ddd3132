//! The in-process wake-up after an event commits.

use tokio::sync::watch;

/// Wakes watchers in this process when an event commits; other processes' events are
/// found by the watchers' periodic poll.
#[derive(Clone)]
pub struct EventHub {
    latest: watch::Sender<i64>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub { latest: watch::channel(0).0 }
    }
}

impl EventHub {
    pub fn notify(&self) {
        self.latest.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }
}
