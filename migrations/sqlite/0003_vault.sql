-- The card vault and the sandbox processor's own records.
-- The PAN exists only as ciphertext (AES-256-GCM under a per-record data key wrapped by
-- a key-encryption key); brand, last four, expiry and a keyed fingerprint stay in clear.
-- The CVC is never stored.

CREATE TABLE payment_methods (
    token          TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL,
    brand          TEXT NOT NULL,
    last4          TEXT NOT NULL CHECK (length(last4) = 4),
    exp_month      INTEGER NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year       INTEGER NOT NULL,
    holder_name    TEXT NOT NULL DEFAULT '',
    postal_code    TEXT NOT NULL DEFAULT '',
    -- HMAC-SHA256 of the PAN under DMPAY_VAULT_FINGERPRINT_KEY, hex.
    fingerprint    TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('unlinked', 'active', 'removed')),
    is_default     INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    kek_id         TEXT NOT NULL,
    wrapped_dek    BLOB NOT NULL,
    pan_ciphertext BLOB NOT NULL,
    created_at_us  INTEGER NOT NULL,
    -- Unlinked tokens expire; linked ones do not.
    expires_at_us  INTEGER,
    linked_at_us   INTEGER,
    removed_at_us  INTEGER,
    CHECK (NOT is_default OR status = 'active')
) STRICT;
-- One default per account; one live method per card per account.
CREATE UNIQUE INDEX payment_methods_one_default ON payment_methods (user_id) WHERE is_default;
CREATE UNIQUE INDEX payment_methods_one_per_card ON payment_methods (user_id, fingerprint) WHERE status <> 'removed';
CREATE INDEX payment_methods_fingerprint ON payment_methods (fingerprint);
CREATE INDEX payment_methods_kek ON payment_methods (kek_id);
CREATE INDEX payment_methods_unlinked_expiry ON payment_methods (expires_at_us) WHERE status = 'unlinked';

-- Tokenization rate limits count an account's recent attempts.
CREATE INDEX audit_log_actor_action ON audit_log (actor, action, at_us);

CREATE TABLE sandbox_processor_calls (
    idempotency_key   TEXT PRIMARY KEY,
    kind              TEXT NOT NULL CHECK (kind IN ('verify', 'authorize', 'capture', 'void', 'refund')),
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
CREATE INDEX sandbox_processor_calls_day ON sandbox_processor_calls (created_at_us);
