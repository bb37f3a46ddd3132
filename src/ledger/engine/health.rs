//! Whether the database answers, shared by the engine, the health probe and the API's
//! gate.

use std::sync::atomic::Ordering;

/// Whether the database answers, as last seen by the engine (a batch that got no answer
/// in time) and by the server's health probe (a ping). While it does not, commands are
/// refused at once with UNAVAILABLE instead of each waiting out a timeout behind the
/// one before: callers learn of an outage in microseconds and retry with their key.
#[derive(Debug)]
pub struct DatabaseState {
    reachable: std::sync::atomic::AtomicBool,
    /// The health probe's verdict alone (two missed pings in a row), for those who wait
    /// for it (`api::gate`): a single slow batch refuses ledger writes for a moment, but
    /// does not declare an outage.
    outage: tokio::sync::watch::Sender<bool>,
}

impl Default for DatabaseState {
    fn default() -> Self {
        DatabaseState {
            reachable: std::sync::atomic::AtomicBool::new(true),
            outage: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl DatabaseState {
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Set by the health probe after each ping, and by a batch that got no answer.
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
    }

    /// Set by the health probe: whether it has declared the database unreachable.
    pub fn set_outage(&self, outage: bool) {
        self.outage.send_if_modified(|now| std::mem::replace(now, outage) != outage);
    }

    /// Sees every change of the probe's verdict (`true`: an outage).
    pub fn subscribe_outage(&self) -> tokio::sync::watch::Receiver<bool> {
        self.outage.subscribe()
    }
}
