//! One reader of the outbox per process, fanning new events out to its watchers.
//!
//! Each `WatchPayments` stream used to poll the database for its own events every
//! 250 ms: the cost of a quiet watcher grew with the events in the table (its query
//! rescanned every event since its cursor) and with the number of watchers. Now one task
//! reads what was committed after the last event it saw, a primary-key range, when this
//! process commits an event (`EventHub`) or every `POLL` (for what other processes
//! commit), and broadcasts each event once; a watcher filters what it is sent. An idle
//! watcher costs a slot in a broadcast channel and no query at all.
//!
//! The outbox stays the only buffer: the channel holds `CHANNEL_CAPACITY` events, and a
//! watcher that falls further behind is told it lagged and reads its own events from
//! the table (`events::read`, through the party indexes) until it has caught up, as a
//! new watcher does from its `after_sequence`. Sequence numbers are assigned in commit
//! order under the counter row (`rows::append_event!`), so reading `sequence > head`
//! never skips an event that commits later with a smaller number.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::events::{self, Event, EventHub};
use crate::store::Db;
use crate::telemetry::Metrics;

/// How often the reader looks for events other processes committed.
pub const POLL: Duration = Duration::from_millis(250);
/// Events the broadcast channel holds for its slowest watcher.
pub const CHANNEL_CAPACITY: usize = 4096;

/// The process's event feed. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    events: broadcast::Sender<Arc<Event>>,
}

impl Feed {
    /// Starts the reader, from the newest event in the outbox, until every clone of the
    /// feed is dropped.
    pub async fn start(db: Db, hub: EventHub, metrics: Metrics) -> crate::kernel::error::Result<Feed> {
        let head = events::latest(&db).await?;
        let (events, _) = broadcast::channel(CHANNEL_CAPACITY);
        let feed = Feed { events };
        tokio::spawn(read_loop(db, hub.subscribe(), feed.events.downgrade(), head, metrics));
        Ok(feed)
    }

    /// New events from now on, in sequence order. Subscribe before reading the stored
    /// events a watcher missed: an event broadcast before the subscription was committed
    /// before it, so that read finds it; one broadcast after it arrives here.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }
}

async fn read_loop(
    db: Db,
    mut wake: watch::Receiver<i64>,
    events: broadcast::WeakSender<Arc<Event>>,
    mut head: i64,
    metrics: Metrics,
) {
    loop {
        tokio::select! {
            changed = wake.changed() => {
                if changed.is_err() {
                    // The hub is gone: the server is stopping. Keep polling for what
                    // other processes commit while watchers remain.
                    tokio::time::sleep(POLL).await;
                }
            }
            () = tokio::time::sleep(POLL) => {}
        }
        let Some(sender) = events.upgrade() else { return };
        // Nobody listening: nothing to broadcast, and the next watcher reads what it
        // missed from the table; the head moves on so that no backlog is sent later.
        // The newest sequence is read before the receivers are counted: a watcher that
        // subscribes after the count reads the table after that sequence was read, so
        // it finds every event up to it, and the reader sends it everything after.
        if sender.receiver_count() == 0 {
            let latest = events::latest(&db).await;
            if sender.receiver_count() == 0 {
                match latest {
                    Ok(latest) => head = latest,
                    Err(e) => tracing::debug!(error = %e, "event feed: reading the newest sequence failed"),
                }
                continue;
            }
        }
        // Everything committed since the last read, a page at a time.
        loop {
            metrics.counters().event_feed_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let page = match events::read(&db, None, "", head).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "event feed: reading the outbox failed; will retry");
                    break;
                }
            };
            let full = page.len() as i64 >= events::PAGE_MAX;
            for event in page {
                head = event.sequence;
                // No receiver left is not an error: the next watcher catches up alone.
                let _ = sender.send(Arc::new(event));
            }
            if !full {
                break;
            }
        }
    }
}
