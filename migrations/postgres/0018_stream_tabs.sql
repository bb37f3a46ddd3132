-- Stream tabs (issue 23): one card authorization per viewer per stream, up to a cap;
-- purchases in the stream draw on it in the posting engine's batch without another card
-- call; one capture of what was spent when the tab closes.
CREATE TABLE stream_tabs (
    tab_id               TEXT COLLATE "C" PRIMARY KEY,
    buyer_id             TEXT COLLATE "C" NOT NULL REFERENCES accounts (user_id),
    stream_id            TEXT COLLATE "C" NOT NULL,
    currency             TEXT COLLATE "C" NOT NULL,
    cap                  BIGINT NOT NULL CHECK (cap > 0),
    -- Advanced with each purchase in the batch that commits it; the CHECK is the
    -- database's half of "never past the cap".
    spent                BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0 AND spent <= cap),
    status               TEXT NOT NULL CHECK (status IN ('opening', 'open', 'closing', 'closed', 'failed')),
    payment_method_token TEXT,
    authorization_ref    TEXT,
    capture_ref          TEXT,
    -- Fixed when the tab starts closing: exactly what is captured, once.
    captured             BIGINT,
    failure_reason       TEXT NOT NULL DEFAULT '',
    failure_message      TEXT NOT NULL DEFAULT '',
    idempotency_key      TEXT COLLATE "C" NOT NULL,
    request_hash         TEXT NOT NULL,
    expires_at_us        BIGINT NOT NULL,
    created_at_us        BIGINT NOT NULL,
    updated_at_us        BIGINT NOT NULL,
    closed_at_us         BIGINT,
    UNIQUE (buyer_id, idempotency_key),
    CHECK (status NOT IN ('closing', 'closed') OR captured IS NOT NULL),
    CHECK (captured IS NULL OR captured = spent),
    CHECK (status <> 'open' OR authorization_ref IS NOT NULL),
    CHECK ((status = 'failed') = (failure_reason <> ''))
);
-- One tab per viewer per stream at a time.
CREATE UNIQUE INDEX stream_tabs_one_open ON stream_tabs (buyer_id, stream_id) WHERE status IN ('opening', 'open');
CREATE INDEX stream_tabs_stream ON stream_tabs (stream_id) WHERE status IN ('opening', 'open');
CREATE INDEX stream_tabs_due ON stream_tabs (expires_at_us) WHERE status IN ('opening', 'open', 'closing');

ALTER TABLE purchases ADD COLUMN tab_id TEXT COLLATE "C" REFERENCES stream_tabs (tab_id);
