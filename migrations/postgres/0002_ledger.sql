-- The double-entry ledger. Money is BIGINT minor units; times are microseconds since the
-- Unix epoch. Entries and postings are append-only; balances are materialized on the
-- account row and changed only by the posting engine, in the transaction that writes
-- the postings.

CREATE TABLE ledger_accounts (
    id              BIGSERIAL PRIMARY KEY,
    code            TEXT NOT NULL UNIQUE,
    type            TEXT NOT NULL CHECK (type IN ('asset', 'liability', 'equity', 'income', 'expense')),
    currency        TEXT NOT NULL CHECK (length(currency) = 3),
    allow_negative  BOOLEAN NOT NULL,
    -- Derived from type, stored so the balance check below can see it.
    credit_normal   BOOLEAN NOT NULL,
    posted_debits   BIGINT NOT NULL DEFAULT 0 CHECK (posted_debits >= 0),
    posted_credits  BIGINT NOT NULL DEFAULT 0 CHECK (posted_credits >= 0),
    pending_debits  BIGINT NOT NULL DEFAULT 0 CHECK (pending_debits >= 0),
    pending_credits BIGINT NOT NULL DEFAULT 0 CHECK (pending_credits >= 0),
    version         BIGINT NOT NULL DEFAULT 0,
    created_at_us   BIGINT NOT NULL,
    UNIQUE (id, currency),
    CHECK (credit_normal = (type IN ('liability', 'equity', 'income'))),
    -- The second half of the overdraft rule (the engine checks first): an account that
    -- may not go negative never has a negative available balance.
    CONSTRAINT ledger_accounts_available_not_negative CHECK (
        allow_negative OR (CASE WHEN credit_normal
            THEN posted_credits - posted_debits - pending_debits
            ELSE posted_debits - posted_credits - pending_credits END) >= 0)
);

-- The journal's gap-free sequence: one row, advanced by each batch under its row lock.
CREATE TABLE ledger_sequence (
    id         SMALLINT PRIMARY KEY CHECK (id = 1),
    last_value BIGINT NOT NULL
);
INSERT INTO ledger_sequence (id, last_value) VALUES (1, 0);

CREATE TABLE ledger_entries (
    id                TEXT PRIMARY KEY,
    sequence          BIGINT NOT NULL UNIQUE CHECK (sequence > 0),
    kind              TEXT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    metadata          TEXT NOT NULL DEFAULT '{}',
    -- pending: reserves its postings. posted: moves money. voided / expired: the
    -- resolution of a pending entry, without postings of its own.
    status            TEXT NOT NULL CHECK (status IN ('posted', 'pending', 'voided', 'expired')),
    -- A pending entry is resolved at most once; an entry is reversed at most once.
    pending_entry_id  TEXT UNIQUE REFERENCES ledger_entries (id),
    reverses_entry_id TEXT UNIQUE REFERENCES ledger_entries (id),
    expires_at_us     BIGINT,
    created_by        TEXT NOT NULL,
    created_at_us     BIGINT NOT NULL,
    CHECK ((status = 'pending') = (expires_at_us IS NOT NULL)),
    CHECK (status NOT IN ('voided', 'expired') OR pending_entry_id IS NOT NULL)
);
CREATE INDEX ledger_entries_open_pending ON ledger_entries (expires_at_us) WHERE status = 'pending';
CREATE INDEX ledger_entries_created ON ledger_entries (created_at_us);

CREATE TABLE ledger_postings (
    -- Postings are written before their entry row (see the triggers), so the reference
    -- is checked at commit.
    entry_id      TEXT NOT NULL REFERENCES ledger_entries (id) DEFERRABLE INITIALLY DEFERRED,
    idx           SMALLINT NOT NULL CHECK (idx >= 0),
    account_id    BIGINT NOT NULL,
    direction     TEXT NOT NULL CHECK (direction IN ('D', 'C')),
    amount        BIGINT NOT NULL CHECK (amount > 0),
    currency      TEXT NOT NULL,
    -- Copied from the entry for account listings and point-in-time balances.
    pending       BOOLEAN NOT NULL,
    sequence      BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (entry_id, idx),
    -- A posting's currency is its account's currency.
    FOREIGN KEY (account_id, currency) REFERENCES ledger_accounts (id, currency)
);
CREATE INDEX ledger_postings_account ON ledger_postings (account_id, sequence);
CREATE INDEX ledger_postings_account_time ON ledger_postings (account_id, created_at_us) WHERE NOT pending;

CREATE TABLE idempotency_keys (
    caller        TEXT NOT NULL,
    key           TEXT NOT NULL,
    operation     TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    result_id     TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (caller, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_us);

-- Postings are sealed: once their entry row exists, none can be added.
CREATE FUNCTION ledger_postings_sealed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_postings p JOIN ledger_entries e ON e.id = p.entry_id) THEN
        RAISE EXCEPTION 'postings cannot be added to an existing ledger entry' USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER ledger_postings_sealed AFTER INSERT ON ledger_postings
    REFERENCING NEW TABLE AS new_postings FOR EACH STATEMENT EXECUTE FUNCTION ledger_postings_sealed();

-- The database's own check that every entry balances: per currency, debits equal
-- credits; posted and pending entries have at least two postings, flagged like the
-- entry; resolutions (voided, expired) have none.
CREATE FUNCTION ledger_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad TEXT;
BEGIN
    SELECT n.id INTO bad FROM new_entries n
    WHERE (n.status IN ('posted', 'pending') AND (
              (SELECT count(*) FROM ledger_postings p WHERE p.entry_id = n.id) < 2
              OR EXISTS (SELECT 1 FROM ledger_postings p WHERE p.entry_id = n.id
                         AND p.pending <> (n.status = 'pending'))
              OR EXISTS (SELECT 1 FROM ledger_postings p WHERE p.entry_id = n.id
                         GROUP BY p.currency
                         HAVING sum(CASE WHEN p.direction = 'D' THEN p.amount ELSE -p.amount END) <> 0)))
       OR (n.status IN ('voided', 'expired')
           AND EXISTS (SELECT 1 FROM ledger_postings p WHERE p.entry_id = n.id))
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entry % does not balance', bad USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_balanced();

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION dmpay_reject_change();
CREATE TRIGGER ledger_postings_append_only BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
CREATE TRIGGER ledger_postings_no_truncate BEFORE TRUNCATE ON ledger_postings
    FOR EACH STATEMENT EXECUTE FUNCTION dmpay_reject_change();
