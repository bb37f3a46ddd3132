-- DM payments and their event outbox. Amounts are BIGINT minor units.

CREATE TABLE payments (
    payment_id           TEXT PRIMARY KEY,
    sender_id            TEXT NOT NULL,
    recipient_id         TEXT NOT NULL,
    currency             TEXT NOT NULL,
    amount               BIGINT NOT NULL CHECK (amount > 0),
    -- The split: wallet part + card part = amount; the fee is charged on top, to the card.
    wallet_amount        BIGINT NOT NULL CHECK (wallet_amount >= 0),
    card_amount          BIGINT NOT NULL CHECK (card_amount >= 0),
    fee_amount           BIGINT NOT NULL DEFAULT 0 CHECK (fee_amount >= 0),
    refunded_amount      BIGINT NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    status               TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'failed', 'partially_refunded', 'refunded')),
    funding_source       TEXT NOT NULL CHECK (funding_source IN ('auto', 'balance', 'card')),
    payment_method_token TEXT,
    note                 TEXT NOT NULL DEFAULT '',
    conversation_id      TEXT NOT NULL DEFAULT '',
    message_id           TEXT NOT NULL DEFAULT '',
    request_id           TEXT,
    failure_reason       TEXT NOT NULL DEFAULT '',
    failure_message      TEXT NOT NULL DEFAULT '',
    idempotency_key      TEXT NOT NULL,
    request_hash         TEXT NOT NULL,
    -- Processor references of the card part, once known.
    authorization_ref    TEXT,
    capture_ref          TEXT,
    created_at_us        BIGINT NOT NULL,
    updated_at_us        BIGINT NOT NULL,
    settled_at_us        BIGINT,
    UNIQUE (sender_id, idempotency_key),
    CHECK (wallet_amount + card_amount = amount),
    CHECK (refunded_amount <= amount),
    CHECK (sender_id <> recipient_id)
);
CREATE INDEX payments_sender ON payments (sender_id, created_at_us);
CREATE INDEX payments_recipient ON payments (recipient_id, created_at_us);
CREATE INDEX payments_conversation ON payments (conversation_id, created_at_us);
-- A request is paid at most once: one live payment per request.
CREATE UNIQUE INDEX payments_one_per_request ON payments (request_id) WHERE request_id IS NOT NULL AND status <> 'failed';
CREATE INDEX payments_pending ON payments (updated_at_us) WHERE status = 'pending';

-- Requests for money: one payer, paid at most once (payment_id set once), expiring.
CREATE TABLE payment_requests (
    request_id      TEXT PRIMARY KEY,
    requester_id    TEXT NOT NULL,
    payer_id        TEXT NOT NULL,
    currency        TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount > 0),
    note            TEXT NOT NULL DEFAULT '',
    conversation_id TEXT NOT NULL DEFAULT '',
    message_id      TEXT NOT NULL DEFAULT '',
    status          TEXT NOT NULL CHECK (status IN ('open', 'paid', 'declined', 'cancelled', 'expired')),
    payment_id      TEXT UNIQUE,
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    created_at_us   BIGINT NOT NULL,
    expires_at_us   BIGINT NOT NULL,
    updated_at_us   BIGINT NOT NULL,
    UNIQUE (requester_id, idempotency_key),
    CHECK (requester_id <> payer_id),
    CHECK ((status = 'paid') = (payment_id IS NOT NULL))
);
CREATE INDEX payment_requests_open ON payment_requests (expires_at_us) WHERE status = 'open';
CREATE INDEX payment_requests_payer ON payment_requests (payer_id, created_at_us);

-- Refunds of a payment, by its recipient, back to the sender's wallet.
CREATE TABLE payment_refunds (
    refund_id       TEXT PRIMARY KEY,
    payment_id      TEXT NOT NULL REFERENCES payments (payment_id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    reason          TEXT NOT NULL DEFAULT '',
    status          TEXT NOT NULL CHECK (status IN ('pending', 'completed', 'failed')),
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at_us   BIGINT NOT NULL,
    UNIQUE (created_by, idempotency_key)
);
CREATE INDEX payment_refunds_payment ON payment_refunds (payment_id);

-- The outbox: one row per state change, written in the transaction of that change,
-- numbered without gaps by the single counter row below.
CREATE TABLE payment_event_sequence (
    id         SMALLINT PRIMARY KEY CHECK (id = 1),
    last_value BIGINT NOT NULL
);
INSERT INTO payment_event_sequence (id, last_value) VALUES (1, 0);

CREATE TABLE payment_events (
    sequence        BIGINT PRIMARY KEY,
    event_type      TEXT NOT NULL,
    payment_id      TEXT,
    request_id      TEXT,
    -- The two participants, for per-user streams.
    party_a         TEXT NOT NULL,
    party_b         TEXT NOT NULL,
    conversation_id TEXT NOT NULL DEFAULT '',
    -- The payment or request as it was after the change, JSON.
    snapshot        TEXT NOT NULL,
    occurred_at_us  BIGINT NOT NULL
);
CREATE INDEX payment_events_party_a ON payment_events (party_a, sequence);
CREATE INDEX payment_events_party_b ON payment_events (party_b, sequence);

CREATE TRIGGER payment_events_append_only BEFORE UPDATE OR DELETE ON payment_events
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
