-- Payouts: wallet money cashed out to a linked debit card (issue 22).
--
-- A payout is PENDING while its wallet money is held by a pending ledger entry and the
-- processor pushes it to the card, then PAID (the hold posted, the money on its way
-- through the in-transit account to the processor) or FAILED (the hold voided). A PAID
-- payout the card network sends back becomes RETURNED, and a new entry credits the
-- wallet. The checks below restate the money rules the code applies before it writes.
CREATE TABLE payouts (
    payout_id            TEXT PRIMARY KEY,
    user_id              TEXT NOT NULL REFERENCES accounts (user_id),
    currency             TEXT NOT NULL,
    -- What leaves the wallet; the card receives amount - fee.
    amount               BIGINT NOT NULL CHECK (amount > 0),
    fee                  BIGINT NOT NULL CHECK (fee >= 0 AND fee < amount),
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
    claimed_until_us     BIGINT,
    created_at_us        BIGINT NOT NULL,
    updated_at_us        BIGINT NOT NULL,
    paid_at_us           BIGINT,
    returned_at_us       BIGINT,
    UNIQUE (user_id, idempotency_key),
    CHECK (status NOT IN ('paid', 'returned') OR (processor_ref IS NOT NULL AND paid_at_us IS NOT NULL)),
    CHECK ((status = 'returned') = (returned_at_us IS NOT NULL AND return_ref IS NOT NULL)),
    CHECK ((status = 'failed') = (failure_reason <> ''))
);
-- A user's payouts newest first, and the rolling 24-hour sum of the payout limit.
CREATE INDEX payouts_user ON payouts (user_id, created_at_us);
CREATE INDEX payouts_pending ON payouts (updated_at_us) WHERE status = 'pending';

-- Payout events share the payments' outbox (one gap-free sequence per deployment).
ALTER TABLE payment_events ADD COLUMN payout_id TEXT;

-- The sandbox processor pushes money to cards and reports what happens afterwards.
ALTER TABLE sandbox_processor_calls DROP CONSTRAINT sandbox_processor_calls_kind_check;
ALTER TABLE sandbox_processor_calls ADD CONSTRAINT sandbox_processor_calls_kind_check
    CHECK (kind IN ('verify', 'authorize', 'capture', 'void', 'refund', 'payout', 'payout_return',
                    'dispute', 'dispute_reversal'));

-- What the processor tells dmpay after a call (a payout returned), in the order it
-- happened; dmpay reads it from where it left off (`processor_cursors`).
CREATE TABLE sandbox_processor_notifications (
    sequence        BIGSERIAL PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('payout.returned', 'dispute.opened', 'dispute.won', 'dispute.lost')),
    -- The call it concerns (the payout's reference).
    reference       TEXT NOT NULL,
    -- Its own reference (the return's), as the settlement report shows it.
    event_reference TEXT NOT NULL UNIQUE,
    -- The idempotency key of the call it concerns (as a real processor's metadata
    -- carries the caller's own ids), so a caller finds it even before it learnt the
    -- call's reference.
    call_key        TEXT NOT NULL DEFAULT '',
    amount          BIGINT NOT NULL,
    -- What the processor charged for it (a dispute's fee).
    fee             BIGINT NOT NULL DEFAULT 0,
    currency        TEXT NOT NULL,
    created_at_us   BIGINT NOT NULL
);

CREATE TABLE processor_cursors (
    processor     TEXT PRIMARY KEY,
    last_sequence BIGINT NOT NULL CHECK (last_sequence >= 0)
);
