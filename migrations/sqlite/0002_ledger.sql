-- The double-entry ledger; the same model as migrations/postgres/0002_ledger.sql.
-- Booleans are INTEGER 0/1. SQLite has no statement triggers, so the balance check is
-- a row trigger on the entry, which is written after its postings.

CREATE TABLE ledger_accounts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    code            TEXT NOT NULL UNIQUE,
    type            TEXT NOT NULL CHECK (type IN ('asset', 'liability', 'equity', 'income', 'expense')),
    currency        TEXT NOT NULL CHECK (length(currency) = 3),
    allow_negative  INTEGER NOT NULL CHECK (allow_negative IN (0, 1)),
    credit_normal   INTEGER NOT NULL CHECK (credit_normal IN (0, 1)),
    posted_debits   INTEGER NOT NULL DEFAULT 0 CHECK (posted_debits >= 0),
    posted_credits  INTEGER NOT NULL DEFAULT 0 CHECK (posted_credits >= 0),
    pending_debits  INTEGER NOT NULL DEFAULT 0 CHECK (pending_debits >= 0),
    pending_credits INTEGER NOT NULL DEFAULT 0 CHECK (pending_credits >= 0),
    version         INTEGER NOT NULL DEFAULT 0,
    created_at_us   INTEGER NOT NULL,
    UNIQUE (id, currency),
    CHECK (credit_normal = (type IN ('liability', 'equity', 'income'))),
    CONSTRAINT ledger_accounts_available_not_negative CHECK (
        allow_negative = 1 OR (CASE WHEN credit_normal = 1
            THEN posted_credits - posted_debits - pending_debits
            ELSE posted_debits - posted_credits - pending_credits END) >= 0)
) STRICT;

CREATE TABLE ledger_sequence (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    last_value INTEGER NOT NULL
) STRICT;
INSERT INTO ledger_sequence (id, last_value) VALUES (1, 0);

CREATE TABLE ledger_entries (
    id                TEXT PRIMARY KEY,
    sequence          INTEGER NOT NULL UNIQUE CHECK (sequence > 0),
    kind              TEXT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    metadata          TEXT NOT NULL DEFAULT '{}',
    status            TEXT NOT NULL CHECK (status IN ('posted', 'pending', 'voided', 'expired')),
    pending_entry_id  TEXT UNIQUE REFERENCES ledger_entries (id),
    reverses_entry_id TEXT UNIQUE REFERENCES ledger_entries (id),
    expires_at_us     INTEGER,
    created_by        TEXT NOT NULL,
    created_at_us     INTEGER NOT NULL,
    CHECK ((status = 'pending') = (expires_at_us IS NOT NULL)),
    CHECK (status NOT IN ('voided', 'expired') OR pending_entry_id IS NOT NULL)
) STRICT;
CREATE INDEX ledger_entries_open_pending ON ledger_entries (expires_at_us) WHERE status = 'pending';
CREATE INDEX ledger_entries_created ON ledger_entries (created_at_us);

CREATE TABLE ledger_postings (
    entry_id      TEXT NOT NULL REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED,
    idx           INTEGER NOT NULL CHECK (idx >= 0),
    account_id    INTEGER NOT NULL,
    direction     TEXT NOT NULL CHECK (direction IN ('D', 'C')),
    amount        INTEGER NOT NULL CHECK (amount > 0),
    currency      TEXT NOT NULL,
    pending       INTEGER NOT NULL CHECK (pending IN (0, 1)),
    sequence      INTEGER NOT NULL,
    created_at_us INTEGER NOT NULL,
    PRIMARY KEY (entry_id, idx),
    FOREIGN KEY (account_id, currency) REFERENCES ledger_accounts (id, currency)
) STRICT;
CREATE INDEX ledger_postings_account ON ledger_postings (account_id, sequence);
CREATE INDEX ledger_postings_account_time ON ledger_postings (account_id, created_at_us) WHERE pending = 0;

CREATE TABLE idempotency_keys (
    caller        TEXT NOT NULL,
    key           TEXT NOT NULL,
    operation     TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    result_id     TEXT NOT NULL,
    created_at_us INTEGER NOT NULL,
    PRIMARY KEY (caller, key)
) STRICT;
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_us);

CREATE TRIGGER ledger_postings_sealed BEFORE INSERT ON ledger_postings
WHEN EXISTS (SELECT 1 FROM ledger_entries WHERE id = NEW.entry_id)
BEGIN
    SELECT RAISE(ABORT, 'postings cannot be added to an existing ledger entry');
END;

CREATE TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
WHEN (NEW.status IN ('posted', 'pending') AND (
          (SELECT count(*) FROM ledger_postings p WHERE p.entry_id = NEW.id) < 2
          OR EXISTS (SELECT 1 FROM ledger_postings p WHERE p.entry_id = NEW.id
                     AND p.pending <> (NEW.status = 'pending'))
          OR EXISTS (SELECT 1 FROM ledger_postings p WHERE p.entry_id = NEW.id
                     GROUP BY p.currency
                     HAVING sum(CASE WHEN p.direction = 'D' THEN p.amount ELSE -p.amount END) <> 0)))
   OR (NEW.status IN ('voided', 'expired')
       AND EXISTS (SELECT 1 FROM ledger_postings p WHERE p.entry_id = NEW.id))
BEGIN
    SELECT RAISE(ABORT, 'ledger entry does not balance');
END;

CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'table ledger_entries is append-only');
END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'table ledger_entries is append-only');
END;
CREATE TRIGGER ledger_postings_no_update BEFORE UPDATE ON ledger_postings
BEGIN
    SELECT RAISE(ABORT, 'table ledger_postings is append-only');
END;
CREATE TRIGGER ledger_postings_no_delete BEFORE DELETE ON ledger_postings
BEGIN
    SELECT RAISE(ABORT, 'table ledger_postings is append-only');
END;
