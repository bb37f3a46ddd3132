//! Every outbox event on NATS JetStream, for the systems that consume the platform's
//! bus (chat backend, notifications, analytics) rather than hold a gRPC stream open.
//! Off unless `DMPAY_NATS_URL` is set.
//!
//! Subjects, under `DMPAY_NATS_SUBJECT_PREFIX` (`dmpay` by default), in one stream
//! (`DMPAY_NATS_STREAM`, created when missing):
//!
//! - `dmpay.events.<type>`: each event once, e.g. `dmpay.events.payment.settled`
//!   (`dmpay.events.>` is everything, `dmpay.events.payment.>` every payment event);
//!   its JetStream message id (`Nats-Msg-Id`) is the event's sequence.
//! - `dmpay.users.<user>.<type>`: a copy for each user the event concerns (a payment's
//!   sender and recipient, a bill's requester and payer), e.g.
//!   `dmpay.users.alice.payment.settled`; its message id is `<sequence>:<user>`. A `.`
//!   in a user id is written `~` (ids never hold `~`).
//!
//! The payload is the event as `dmpay.v1.PaymentEvent` in the proto3 JSON mapping (the
//! proto's field names), with headers `Dmpay-Sequence` and `Dmpay-Event-Type`.
//!
//! Delivery is at least once and in sequence order: the publisher sends the events
//! after its cursor (`payments::outbox`), a bounded window at a time, waits for
//! JetStream's acknowledgements in order, then advances the cursor. Whatever fails (the
//! broker restarts, the connection drops, an acknowledgement times out) is sent again
//! from the cursor, and JetStream drops the copies it already holds by their message id
//! (within the stream's duplicate window); nothing is skipped. One process of a
//! deployment publishes at a time (the cursor's lease).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use prost::Message as _;

use crate::payments::events::{self, Event};
use crate::payments::feed::Feed;
use crate::payments::outbox::OutboxCursor;
use crate::payments::Payments;
use crate::telemetry::Metrics;

/// The cursor's name in `outbox_cursors`.
const CURSOR_NAME: &str = "nats";
/// How long the publishing lease lasts without a renewal; a crashed publisher's events
/// wait this long for another process.
const LEASE: Duration = Duration::from_secs(15);
/// How often an idle publisher looks at the outbox (besides this process's own commits,
/// which wake it at once): another replica's events wait at most this long.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// Backoff after a failure, doubling up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the broker has to acknowledge a message.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long JetStream remembers message ids to drop duplicates: a resend of an event
/// is dropped within this window (the publisher resends within seconds).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// A failure is logged once per this interval at most (an outage would otherwise log
/// at every retry).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Where and how events are published (`DMPAY_NATS_*`).
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `nats://host:port` (several, comma-separated, for a cluster).
    pub url: String,
    /// The JetStream stream's name.
    pub stream: String,
    /// The subjects' first tokens, e.g. `dmpay`.
    pub subject_prefix: String,
    /// Events sent before waiting for their acknowledgements.
    pub in_flight_max: usize,
}

/// One message of an event: its subject, message id and payload.
struct Outgoing {
    subject: String,
    msg_id: String,
}

/// A subject token for a user id: `.` (a token separator) becomes `~`.
fn user_token(user: &str) -> String {
    user.replace('.', "~")
}

/// The event type as subject tokens: `payment.settled` stays two tokens; anything a
/// subject cannot hold becomes `_`.
fn type_tokens(event_type: &str) -> String {
    event_type
        .split('.')
        .map(|t| {
            let t: String =
                t.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
            if t.is_empty() {
                "_".to_owned()
            } else {
                t
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The messages of one event: the type subject, then one per user it concerns.
fn messages_of(prefix: &str, e: &Event) -> Vec<Outgoing> {
    let kind = type_tokens(&e.event_type);
    let mut out = vec![Outgoing { subject: format!("{prefix}.events.{kind}"), msg_id: e.sequence.to_string() }];
    let mut parties = vec![e.party_a.as_str()];
    if e.party_b != e.party_a {
        parties.push(e.party_b.as_str());
    }
    for user in parties.into_iter().filter(|p| !p.is_empty()) {
        out.push(Outgoing {
            subject: format!("{prefix}.users.{}.{kind}", user_token(user)),
            msg_id: format!("{}:{user}", e.sequence),
        });
    }
    out
}

/// The event as JSON (`dmpay.v1.PaymentEvent`, proto field names).
fn payload_of(e: Event) -> anyhow::Result<Bytes> {
    let wire = super::payment_wire::event_to_wire(e);
    let desc = super::descriptors::pool()
        .get_message_by_name("dmpay.v1.PaymentEvent")
        .ok_or_else(|| anyhow::anyhow!("no descriptor for dmpay.v1.PaymentEvent"))?;
    let dynamic = prost_reflect::DynamicMessage::decode(desc, wire.encode_to_vec().as_slice())?;
    Ok(Bytes::from(super::connect::to_json(&dynamic).map_err(|s| anyhow::anyhow!("{}", s.message()))?))
}

/// What one round of publishing did.
enum Round {
    /// Published up to this sequence.
    Published,
    /// Nothing new after the cursor.
    Idle,
    /// Another process holds the lease.
    NotOwner,
}

/// The publisher: runs until the task is aborted (at shutdown, after `release`).
pub struct Publisher {
    settings: NatsSettings,
    payments: Arc<Payments>,
    cursor: OutboxCursor,
    metrics: Metrics,
    /// The lease while this process holds it: the cursor (only the holder moves it, so
    /// the copy here is exact) and when to renew, so that an idle publisher writes the
    /// lease every `LEASE / 3` rather than at every look at the outbox.
    held: Option<Held>,
}

struct Held {
    sequence: i64,
    renew_at: std::time::Instant,
}

impl Held {
    fn new(sequence: i64) -> Held {
        Held { sequence, renew_at: std::time::Instant::now() + LEASE / 3 }
    }
}

impl Publisher {
    pub fn new(settings: NatsSettings, payments: Arc<Payments>, metrics: Metrics) -> Self {
        let cursor = payments.outbox_cursor(CURSOR_NAME);
        Publisher { settings, payments, cursor, metrics, held: None }
    }

    /// The cursor, to give the lease up at a clean stop.
    pub fn cursor(&self) -> OutboxCursor {
        self.cursor.clone()
    }

    /// Publishes until aborted. Connection failures are retried for ever (the broker
    /// may be down for a while); every other failure too, after a backoff.
    pub async fn run(mut self, feed: Feed) {
        let client = match async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.settings.url.as_str())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                // With retry_on_initial_connect only a malformed address gets here.
                tracing::error!(error = %e, "DMPAY_NATS_URL: cannot connect; events are not published");
                return;
            }
        };
        let mut js = jetstream::new(client);
        js.set_timeout(ACK_TIMEOUT);
        let mut live = feed.subscribe();
        let mut backoff = BACKOFF_MIN;
        let mut stream_ready = false;
        let mut last_logged: Option<std::time::Instant> = None;
        tracing::info!(
            url = %self.settings.url,
            stream = %self.settings.stream,
            prefix = %self.settings.subject_prefix,
            "publishing payment events to NATS JetStream"
        );
        loop {
            let round = async {
                if !stream_ready {
                    self.ensure_stream(&js).await?;
                    stream_ready = true;
                }
                self.round(&js).await
            }
            .await;
            match round {
                Ok(Round::Published) => backoff = BACKOFF_MIN,
                Ok(Round::Idle) => {
                    backoff = BACKOFF_MIN;
                    // Wake-ups that queued while publishing are stale (the round just read
                    // past them): drop them, so one burst does not cost one round each.
                    while !matches!(
                        live.try_recv(),
                        Err(tokio::sync::broadcast::error::TryRecvError::Empty
                            | tokio::sync::broadcast::error::TryRecvError::Closed)
                    ) {}
                    tokio::select! {
                        _ = live.recv() => {}
                        () = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                Ok(Round::NotOwner) => {
                    self.held = None;
                    tokio::time::sleep(LEASE / 3).await;
                }
                Err(e) => {
                    self.held = None;
                    self.metrics.counters().nats_publish_failures.fetch_add(1, Relaxed);
                    if last_logged.is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL) {
                        last_logged = Some(std::time::Instant::now());
                        tracing::warn!(error = %e, retry_in = ?backoff, "publishing events to NATS failed; retrying from the last acknowledged event");
                    }
                    stream_ready = false;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The stream, created when missing: both subject trees, file storage, and the
    /// duplicate window the resends rely on.
    async fn ensure_stream(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        let prefix = &self.settings.subject_prefix;
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.settings.stream.clone(),
            subjects: vec![format!("{prefix}.events.>"), format!("{prefix}.users.>")],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.settings.stream))?;
        Ok(())
    }

    /// One page of events after the cursor: sent a window at a time, each window's
    /// acknowledgements awaited in order before the cursor moves past it.
    async fn round(&mut self, js: &jetstream::Context) -> anyhow::Result<Round> {
        let lease_us = LEASE.as_micros() as i64;
        let cursor = match &self.held {
            Some(h) if h.renew_at > std::time::Instant::now() => h.sequence,
            _ => match self.cursor.claim(lease_us).await? {
                Some(sequence) => {
                    self.held = Some(Held::new(sequence));
                    sequence
                }
                None => return Ok(Round::NotOwner),
            },
        };
        let db = self.payments.db();
        let page = events::read(db, None, "", cursor).await?;
        if page.is_empty() {
            // Nothing committed after the cursor: nothing waits for the broker.
            self.metrics.counters().nats_lag_events.store(0, Relaxed);
            return Ok(Round::Idle);
        }
        let window = self.settings.in_flight_max.max(1);
        let mut events = page.into_iter().peekable();
        while events.peek().is_some() {
            let chunk: Vec<Event> = events.by_ref().take(window).collect();
            let last = chunk.last().map_or(cursor, |e| e.sequence);
            let n = chunk.len();
            let mut acks = Vec::with_capacity(n * 3);
            for e in chunk {
                let sequence = e.sequence;
                let kind = e.event_type.clone();
                let messages = messages_of(&self.settings.subject_prefix, &e);
                let payload = payload_of(e)?;
                for m in messages {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", m.msg_id.as_str());
                    headers.insert("Dmpay-Sequence", sequence.to_string().as_str());
                    headers.insert("Dmpay-Event-Type", kind.as_str());
                    headers.insert("Content-Type", "application/json");
                    acks.push(js.publish_with_headers(m.subject, headers, payload.clone()).await?);
                }
            }
            for ack in acks {
                ack.await?;
            }
            // Each advance renews the lease too.
            if !self.cursor.advance(last, lease_us).await? {
                return Ok(Round::NotOwner);
            }
            self.held = Some(Held::new(last));
            self.metrics.counters().nats_published.fetch_add(n as u64, Relaxed);
            let latest = events::latest(db).await?;
            self.metrics.counters().nats_lag_events.store(latest.saturating_sub(last).max(0) as u64, Relaxed);
        }
        Ok(Round::Published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64, kind: &str, a: &str, b: &str) -> Event {
        Event {
            sequence,
            event_type: kind.into(),
            party_a: a.into(),
            party_b: b.into(),
            conversation_id: String::new(),
            payment: None,
            request: None,
            payout: None,
            purchase: None,
            occurred_at_us: 0,
        }
    }

    #[test]
    fn subjects_per_type_and_per_user() {
        let m = messages_of("dmpay", &event(7, "payment.settled", "alice", "bob.smith"));
        let got: Vec<(&str, &str)> = m.iter().map(|m| (m.subject.as_str(), m.msg_id.as_str())).collect();
        assert_eq!(
            got,
            [
                ("dmpay.events.payment.settled", "7"),
                ("dmpay.users.alice.payment.settled", "7:alice"),
                ("dmpay.users.bob~smith.payment.settled", "7:bob.smith"),
            ]
        );
        // A payout concerns one user; a type with odd characters stays one subject.
        let m = messages_of("p", &event(8, "payout.paid", "carol", ""));
        assert_eq!(m.len(), 2);
        assert_eq!(type_tokens("a b.*.>"), "a_b._._");
    }
}
