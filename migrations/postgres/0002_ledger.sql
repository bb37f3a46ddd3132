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
    pending_entry_id  TEXT REFERENCES ledger_entries (id),
    reverses_entry_id TEXT REFERENCES ledger_entries (id),
    expires_at_us     BIGINT,
    created_by        TEXT NOT NULL,
    created_at_us     BIGINT NOT NULL,
    CHECK ((status = 'pending') = (expires_at_us IS NOT NULL)),
    CHECK (status NOT IN ('voided', 'expired') OR pending_entry_id IS NOT NULL)
);
-- Partial, so the many entries that are neither cost no index insert.
CREATE UNIQUE INDEX ledger_entries_resolves_once ON ledger_entries (pending_entry_id) WHERE pending_entry_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_entries_reversed_once ON ledger_entries (reverses_entry_id) WHERE reverses_entry_id IS NOT NULL;
CREATE INDEX ledger_entries_open_pending ON ledger_entries (expires_at_us) WHERE status = 'pending';
CREATE INDEX ledger_entries_created ON ledger_entries (created_at_us);

CREATE TABLE ledger_postings (
    -- The entry is checked by the trigger ledger_postings_sealed: it must be written in
    -- the same transaction, which makes a per-row foreign key redundant.
    entry_id      TEXT NOT NULL,
    idx           SMALLINT NOT NULL CHECK (idx >= 0),
    account_id    BIGINT NOT NULL,
    direction     TEXT NOT NULL CHECK (direction IN ('D', 'C')),
    amount        BIGINT NOT NULL CHECK (amount > 0),
    currency      TEXT NOT NULL,
    -- Copied from the entry for account listings and point-in-time balances.
    pending       BOOLEAN NOT NULL,
    sequence      BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (entry_id, idx)
    -- The account and its currency are checked once per statement by the trigger
    -- ledger_postings_sealed, not by a per-row foreign key: the engine writes hundreds
    -- of postings per statement.
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

-- The triggers below run once per statement over the transition table and reach the
-- big tables only through LATERAL subqueries keyed by primary key: each new row costs
-- one index probe, whatever the planner estimates for the transition table or thinks of
-- stale statistics (a hash join over a seq scan of the whole journal would otherwise
-- look cheaper on a young table).

-- Postings are sealed: a posting's entry must exist and must have been written by this
-- same transaction (the engine writes both in one statement), so no posting is ever
-- orphaned or added to an entry committed before. And a posting's account exists and
-- has the posting's currency.
CREATE FUNCTION ledger_postings_sealed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT account_id, currency FROM new_postings) n
        CROSS JOIN LATERAL (
            SELECT count(*) AS found FROM ledger_accounts a WHERE a.id = n.account_id AND a.currency = n.currency
        ) c
        WHERE c.found = 0
    ) THEN
        RAISE EXCEPTION 'posting to an unknown account or in a currency other than the account''s'
            USING ERRCODE = '23503';
    END IF;
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT entry_id FROM new_postings) n
        CROSS JOIN LATERAL (
            SELECT count(*) AS here FROM ledger_entries e
            WHERE e.id = n.entry_id AND e.xmin::text::bigint = txid_current() % 4294967296
        ) c
        WHERE c.here = 0
    ) THEN
        RAISE EXCEPTION 'postings must be written with their entry, in the same statement'
            USING ERRCODE = '23514';
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
    SELECT n.id INTO bad
    FROM new_entries n
    CROSS JOIN LATERAL (
        SELECT count(*) AS postings,
               count(*) FILTER (WHERE p.pending <> (n.status = 'pending')) AS misflagged,
               count(DISTINCT p.currency) AS currencies,
               coalesce(sum(CASE WHEN p.direction = 'D' THEN p.amount ELSE -p.amount END), 0) AS net
        FROM ledger_postings p WHERE p.entry_id = n.id
    ) c
    WHERE (n.status IN ('posted', 'pending') AND (c.postings < 2 OR c.misflagged > 0 OR c.net <> 0))
       OR (n.status IN ('voided', 'expired') AND c.postings > 0)
       -- Several currencies: each must balance on its own.
       OR (c.currencies > 1 AND EXISTS (
              SELECT 1 FROM ledger_postings p WHERE p.entry_id = n.id GROUP BY p.currency
              HAVING sum(CASE WHEN p.direction = 'D' THEN p.amount ELSE -p.amount END) <> 0))
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
