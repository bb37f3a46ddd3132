-- Payouts: wallet money cashed out to a linked debit card (issue 22). See the PostgreSQL
-- migration of the same number for what each part is for.
CREATE TABLE payouts (
    payout_id            TEXT PRIMARY KEY,
    user_id              TEXT NOT NULL REFERENCES accounts (user_id),
    currency             TEXT NOT NULL,
    amount               INTEGER NOT NULL CHECK (amount > 0),
    fee                  INTEGER NOT NULL CHECK (fee >= 0 AND fee < amount),
    speed                TEXT NOT NULL CHECK (speed IN ('standard', 'instant')),
    payment_method_token TEXT NOT NULL,
    card_last4           TEXT NOT NULL DEFAULT '',
    status               TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'failed', 'returned')),
    failure_reason       TEXT NOT NULL DEFAULT '',
    failure_message      TEXT NOT NULL DEFAULT '',
    processor_ref        TEXT UNIQUE,
    return_ref           TEXT UNIQUE,
    -- The pending entry that holds the wallet money, once it is posted to the ledger.
    hold_entry_id        TEXT,
    idempotency_key      TEXT NOT NULL,
    request_hash         TEXT NOT NULL,
    claim                TEXT,
    claimed_until_us     INTEGER,
    created_at_us        INTEGER NOT NULL,
    updated_at_us        INTEGER NOT NULL,
    paid_at_us           INTEGER,
    returned_at_us       INTEGER,
    UNIQUE (user_id, idempotency_key),
    CHECK (status NOT IN ('paid', 'returned') OR (processor_ref IS NOT NULL AND paid_at_us IS NOT NULL)),
    CHECK ((status = 'returned') = (returned_at_us IS NOT NULL AND return_ref IS NOT NULL)),
    CHECK ((status = 'failed') = (failure_reason <> ''))
) STRICT;
CREATE INDEX payouts_user ON payouts (user_id, created_at_us);
CREATE INDEX payouts_pending ON payouts (updated_at_us) WHERE status = 'pending';

ALTER TABLE payment_events ADD COLUMN payout_id TEXT;

-- SQLite cannot change a CHECK constraint in place: the sandbox's table is rebuilt with
-- the new kinds.
CREATE TABLE sandbox_processor_calls_0015 (
    idempotency_key   TEXT PRIMARY KEY,
    kind              TEXT NOT NULL CHECK (kind IN ('verify', 'authorize', 'capture', 'void', 'refund', 'payout',
                                                    'payout_return', 'dispute', 'dispute_reversal')),
    reference         TEXT NOT NULL UNIQUE,
    related_reference TEXT,
    amount            INTEGER,
    currency          TEXT,
    fee               INTEGER NOT NULL DEFAULT 0,
    status            TEXT NOT NULL CHECK (status IN ('succeeded', 'declined', 'failed')),
    decline_code      TEXT,
    card_last4        TEXT,
    created_at_us     INTEGER NOT NULL
) STRICT;
INSERT INTO sandbox_processor_calls_0015 (idempotency_key, kind, reference, related_reference, amount, currency, fee,
    status, decline_code, card_last4, created_at_us)
SELECT idempotency_key, kind, reference, related_reference, amount, currency, fee, status, decline_code, card_last4,
    created_at_us FROM sandbox_processor_calls;
DROP TABLE sandbox_processor_calls;
ALTER TABLE sandbox_processor_calls_0015 RENAME TO sandbox_processor_calls;
CREATE INDEX sandbox_processor_calls_day ON sandbox_processor_calls (created_at_us);

CREATE TABLE sandbox_processor_notifications (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL CHECK (kind IN ('payout.returned', 'dispute.opened', 'dispute.won', 'dispute.lost')),
    reference       TEXT NOT NULL,
    event_reference TEXT NOT NULL UNIQUE,
    call_key        TEXT NOT NULL DEFAULT '',
    amount          INTEGER NOT NULL,
    fee             INTEGER NOT NULL DEFAULT 0,
    currency        TEXT NOT NULL,
    created_at_us   INTEGER NOT NULL
) STRICT;

CREATE TABLE processor_cursors (
    processor     TEXT PRIMARY KEY,
    last_sequence INTEGER NOT NULL CHECK (last_sequence >= 0)
) STRICT;
