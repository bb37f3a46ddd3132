//! `WatchPayments`: a caller's stored events after its cursor, then live ones from the
//! process's shared feed (`payments::feed`), with no gap or duplicate at the switch.
//!
//! Bounds: at most `DMPAY_WATCHERS_MAX` streams per process and
//! `DMPAY_WATCHERS_PER_USER_MAX` per caller (so one user cannot take every slot); a
//! stream queues at most `WATCH_BUFFER` events toward its connection; a consumer that
//! does not take an event for `WATCH_SEND_TIMEOUT`, or (watching every user's events)
//! falls more than `WATCH_LAG_MAX` events behind, is disconnected with
//! RESOURCE_EXHAUSTED and resumes from its last sequence.
//!
//! Shutdown ends every stream at once (`WatchStop`) with UNAVAILABLE and the sequence to
//! resume from, so that draining calls never waits on a stream that would not end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;

use super::pb;
use super::to_status;
use crate::kernel::error::{Error, Result};
use crate::kernel::reason::Reason;
use crate::payments::events::{self, Event};
use crate::payments::feed::Feed;
use crate::payments::Payments;
use crate::telemetry::Metrics;

/// Events queued toward one watcher's connection.
const WATCH_BUFFER: usize = 64;
/// A watcher this far behind the newest event is disconnected (it resumes from its
/// last sequence with a new call).
const WATCH_LAG_MAX: i64 = 50_000;
/// A consumer that takes longer than this to accept the next event is disconnected.
const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How many watchers may be open.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// In this process.
    pub total_max: usize,
    /// Per caller (`sub`).
    pub per_user_max: usize,
}

/// The open watchers: a slot in the process, and a count per caller.
pub struct Watchers {
    limits: WatchLimits,
    slots: Arc<Semaphore>,
    /// Caller -> open streams. A std mutex: held for a map update, never across an
    /// await. An entry goes when its count reaches zero, so the map holds at most
    /// `total_max` callers.
    per_user: Arc<Mutex<HashMap<String, usize>>>,
    metrics: Metrics,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Ends every open stream, and refuses new ones: the server is stopping.
#[derive(Clone)]
pub struct WatchStop(Arc<tokio::sync::watch::Sender<bool>>);

impl WatchStop {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// One open watcher's place; gives it back when dropped.
pub struct WatcherPermit {
    _slot: OwnedSemaphorePermit,
    caller: String,
    per_user: Arc<Mutex<HashMap<String, usize>>>,
    metrics: Metrics,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Drop for WatcherPermit {
    fn drop(&mut self) {
        if let Ok(mut map) = self.per_user.lock() {
            if let Some(n) = map.get_mut(&self.caller) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.caller);
                }
            }
        }
        self.metrics.counters().watchers_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Watchers {
    pub fn new(limits: WatchLimits, metrics: Metrics) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        Watchers {
            limits,
            slots: Arc::new(Semaphore::new(limits.total_max)),
            per_user: Arc::default(),
            metrics,
            stop: Arc::new(stop),
        }
    }

    /// The handle shutdown ends the streams with.
    pub fn stopper(&self) -> WatchStop {
        WatchStop(self.stop.clone())
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A place for one more stream of `caller`, or RESOURCE_EXHAUSTED.
    pub fn admit(&self, caller: &str) -> Result<WatcherPermit> {
        if *self.stop.borrow() {
            return Err(Error::Unavailable("the server is stopping; watch again on another server".into()));
        }
        let mut map = self.per_user.lock().map_err(|_| Error::internal(anyhow::anyhow!("watchers lock poisoned")))?;
        let open = map.get(caller).copied().unwrap_or(0);
        if open >= self.limits.per_user_max {
            return Err(Error::ResourceExhausted {
                reason: Reason::WatchersPerUser,
                message: format!(
                    "at most {} open WatchPayments streams per caller; close one first",
                    self.limits.per_user_max
                ),
            });
        }
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| Error::ResourceExhausted {
            reason: Reason::Watchers,
            message: "too many watchers on this server; retry later".into(),
        })?;
        map.insert(caller.to_owned(), open + 1);
        self.metrics.counters().watchers_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(WatcherPermit {
            _slot: slot,
            caller: caller.to_owned(),
            per_user: self.per_user.clone(),
            metrics: self.metrics.clone(),
            stop: self.stop.subscribe(),
        })
    }
}

/// A watch's answer: the events, then the status that ended it, if the server did.
/// That status travels beside the event channel, not in it: a consumer too slow to
/// take events is cut off exactly when the channel is full, and a status queued behind
/// the events would be lost (the client would see a clean end of stream).
pub struct WatchStream {
    events: ReceiverStream<std::result::Result<pb::PaymentEvent, Status>>,
    end: Option<oneshot::Receiver<Status>>,
}

impl Stream for WatchStream {
    type Item = std::result::Result<pb::PaymentEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        // The event channel closes only once the loop has returned, after it set `end`.
        match std::task::ready!(std::pin::Pin::new(&mut self.events).poll_next(cx)) {
            Some(item) => std::task::Poll::Ready(Some(item)),
            None => std::task::Poll::Ready(self.end.take().and_then(|mut end| end.try_recv().ok()).map(Err)),
        }
    }
}

/// What one watcher is sent: its own events (every user's when `user` is `None`),
/// optionally in one conversation.
struct Filter {
    user: Option<String>,
    conversation: String,
}

impl Filter {
    /// The same rule as `events::read`'s query.
    fn wants(&self, e: &Event) -> bool {
        self.user.as_deref().is_none_or(|u| u == e.party_a || u == e.party_b)
            && (self.conversation.is_empty() || self.conversation == e.conversation_id)
    }
}

/// Starts a watcher's stream.
pub fn start(
    payments: Arc<Payments>,
    metrics: Metrics,
    feed: &Feed,
    user: Option<String>,
    conversation: String,
    after: i64,
    permit: WatcherPermit,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let (end_tx, end_rx) = oneshot::channel();
    // Subscribed before the stored events are read: see `Feed::subscribe`.
    let live = feed.subscribe();
    let filter = Filter { user, conversation };
    tokio::spawn(async move {
        let mut stop = permit.stop.clone();
        let _permit = permit;
        if let Err(status) = watch_loop(&payments, &metrics, &filter, after, live, &tx, &mut stop).await {
            let _ = end_tx.send(status);
        }
    });
    WatchStream { events: ReceiverStream::new(rx), end: Some(end_rx) }
}

/// How a stream ends when the server stops: with the sequence to resume from.
fn stopping(cursor: i64) -> Status {
    Status::unavailable(format!("the server is stopping; resume with after_sequence={cursor}"))
}

type Sender = mpsc::Sender<std::result::Result<pb::PaymentEvent, Status>>;

/// Sends one event; `Ok(false)` when the consumer went away. Waiting for a slow
/// consumer gives way to shutdown.
async fn send(
    tx: &Sender,
    event: Event,
    cursor: &mut i64,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> std::result::Result<bool, Status> {
    let sequence = event.sequence;
    let wire = super::payment_wire::event_to_wire(event);
    let sent = tokio::select! {
        sent = tokio::time::timeout(WATCH_SEND_TIMEOUT, tx.send(Ok(wire))) => sent,
        _ = stop.wait_for(|stopped| *stopped) => {
            return Err(stopping(*cursor))
        }
    };
    match sent {
        Ok(Ok(())) => {
            *cursor = sequence;
            Ok(true)
        }
        Ok(Err(_)) => Ok(false),
        Err(_) => {
            Err(Status::resource_exhausted(format!("the stream fell behind; resume with after_sequence={cursor}")))
        }
    }
}

/// Streams until the consumer goes away (`Ok`) or the server ends the stream (`Err`).
async fn watch_loop(
    payments: &Payments,
    metrics: &Metrics,
    filter: &Filter,
    mut cursor: i64,
    mut live: tokio::sync::broadcast::Receiver<Arc<Event>>,
    tx: &Sender,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> std::result::Result<(), Status> {
    loop {
        if *stop.borrow() {
            return Err(stopping(cursor));
        }
        // Catch up from the table: the stored events after the cursor, a page at a time,
        // until a short page says there are no more.
        loop {
            metrics.counters().watch_table_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let page = events::read(payments.db(), filter.user.as_deref(), &filter.conversation, cursor)
                .await
                .map_err(to_status)?;
            let full = page.len() as i64 >= events::PAGE_MAX;
            for event in page {
                if !send(tx, event, &mut cursor, stop).await? {
                    return Ok(());
                }
            }
            // A long catch-up gives way to shutdown between pages too.
            if *stop.borrow() {
                return Err(stopping(cursor));
            }
            if !full {
                break;
            }
            // Only a watcher of every event can be measured against the newest: a user's
            // own events are sparse among everyone's, so their cursor trails the newest
            // sequence by a long way even when nothing of theirs is left unread.
            if filter.user.is_some() {
                continue;
            }
            let latest = events::latest(payments.db()).await.map_err(to_status)?;
            if latest - cursor > WATCH_LAG_MAX {
                return Err(Status::resource_exhausted(format!(
                    "more than {WATCH_LAG_MAX} events behind; resume with after_sequence={cursor}"
                )));
            }
        }
        // Then live events from the feed, until this watcher lags behind it.
        loop {
            let event = tokio::select! {
                received = live.recv() => received,
                () = tx.closed() => return Ok(()),
                _ = stop.wait_for(|stopped| *stopped) => return Err(stopping(cursor)),
            };
            match event {
                Ok(event) => {
                    if event.sequence <= cursor || !filter.wants(&event) {
                        continue;
                    }
                    if !send(tx, Event::clone(&event), &mut cursor, stop).await? {
                        return Ok(());
                    }
                }
                // Missed events: read them from the table, as at the start.
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return Err(stopping(cursor)),
            }
        }
    }
}
