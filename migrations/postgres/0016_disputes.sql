-- Disputes (chargebacks) of card-funded payments (issue 22).
--
-- The processor takes a disputed capture's amount (and a fee) back from the platform;
-- dmpay books it and recovers it by its policy: from the payment's recipient (their
-- wallet, and what it cannot cover as their receivable: a debt that blocks their sends
-- and payouts and that incoming money repays first), or from the platform. A won
-- dispute gives the amount back; a lost one closes it.
CREATE TABLE disputes (
    dispute_id     TEXT PRIMARY KEY,
    payment_id     TEXT NOT NULL REFERENCES payments (payment_id),
    -- The dispute's own reference at the processor.
    processor_ref  TEXT NOT NULL UNIQUE,
    capture_ref    TEXT NOT NULL,
    currency       TEXT NOT NULL,
    amount         BIGINT NOT NULL CHECK (amount > 0),
    -- The processor's dispute fee (booked by reconciliation as a processor fee).
    fee            BIGINT NOT NULL CHECK (fee >= 0),
    -- Who bears it: the user it is recovered from, or '' for the platform.
    recovered_from TEXT NOT NULL,
    -- Of what is recovered from the user (the amount, and the fee if the policy
    -- charges it): taken from their wallet, and booked as their receivable.
    from_wallet    BIGINT NOT NULL CHECK (from_wallet >= 0),
    to_receivable  BIGINT NOT NULL CHECK (to_receivable >= 0),
    fee_charged    BIGINT NOT NULL CHECK (fee_charged >= 0 AND fee_charged <= fee),
    -- What the platform bears (`platform:dispute_losses`): all of it by policy, or the
    -- part the recipient no longer holds (refunded to the sender, the card fee).
    platform_share BIGINT NOT NULL CHECK (platform_share >= 0),
    status         TEXT NOT NULL CHECK (status IN ('open', 'won', 'lost')),
    reversal_ref   TEXT UNIQUE,
    opened_at_us   BIGINT NOT NULL,
    decided_at_us  BIGINT,
    CHECK (recovered_from <> '' OR (from_wallet = 0 AND to_receivable = 0 AND fee_charged = 0)),
    CHECK (from_wallet + to_receivable + platform_share = amount + fee_charged),
    CHECK ((status = 'open') = (decided_at_us IS NULL))
);
CREATE INDEX disputes_open ON disputes (opened_at_us) WHERE status = 'open';
-- Users who may owe: the debtors' list is read from here (every user a dispute was
-- recovered from, whatever split its row records: the ledger's receivable decides).
CREATE INDEX disputes_recovered ON disputes (recovered_from, currency) WHERE recovered_from <> '';

-- A processor notification names a capture; card payments are found by it. Partial:
-- wallet payments, which have none, add no index entry.
CREATE INDEX payments_capture_ref ON payments (capture_ref) WHERE capture_ref IS NOT NULL;
ALTER TABLE payments ADD COLUMN dispute_status TEXT NOT NULL DEFAULT ''
    CHECK (dispute_status IN ('', 'open', 'won', 'lost'));
