-- The database's balance check, computed from what each statement wrote rather than by
-- reading every new entry's postings back from the table.
--
-- Both checks run under the journal's sequence row, which admits one batch at a time,
-- so their cost is paid by every batch in series. `ledger_entries_balanced` used to
-- read each new entry's postings (a bitmap scan per entry, then a sort per entry for
-- the currencies); the postings the statement wrote are already in memory, in the
-- postings trigger's transition table. The rules the two triggers now enforce:
--
-- * Postings trigger, per statement: every entry the statement wrote postings for was
--   written by this transaction (sealed, as before), is posted or pending (a voided or
--   expired entry never has postings), has its postings flagged like itself, and the
--   postings this statement wrote for it balance per currency. Amounts are positive, so
--   a balanced non-empty set holds at least one debit and one credit.
-- * Entries trigger, per statement: every new posted or pending entry has a posting
--   when its statement ends (one primary-key probe each).
--
-- Together they say what the old check said of every entry: its postings were all
-- written by its own transaction (sealed), each statement's share balances, so the sum
-- does; there are at least two; and a resolution has none. The one difference: an
-- entry whose postings are split across statements must balance in each of them, not
-- only in sum. The engine writes an entry and all its postings in one statement.

CREATE OR REPLACE FUNCTION ledger_postings_sealed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad TEXT;
    bad_status TEXT;
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
    -- One primary-key probe per entry, which returns the entry's status for the checks
    -- below. The LIMIT keeps the LATERAL subquery from being flattened into a join the
    -- planner could run as a hash join over the whole journal (see 0002).
    SELECT n.entry_id, e.status INTO bad, bad_status
    FROM (
        SELECT entry_id, bool_and(pending) AS all_pending, bool_or(pending) AS any_pending
        FROM new_postings GROUP BY entry_id
    ) n
    LEFT JOIN LATERAL (
        SELECT e.status FROM ledger_entries e
        WHERE e.id = n.entry_id AND e.xmin::text::bigint = txid_current() % 4294967296
        LIMIT 1
    ) e ON TRUE
    WHERE e.status IS NULL
       OR e.status NOT IN ('posted', 'pending')
       OR n.all_pending <> (e.status = 'pending')
       OR n.any_pending <> (e.status = 'pending')
    LIMIT 1;
    IF bad IS NOT NULL AND bad_status IS NULL THEN
        RAISE EXCEPTION 'postings must be written with their entry, in the same statement'
            USING ERRCODE = '23514';
    ELSIF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entry % does not balance', bad USING ERRCODE = '23514';
    END IF;
    -- Per entry and currency, debits equal credits (sum over BIGINT is NUMERIC: no
    -- overflow).
    SELECT entry_id INTO bad FROM new_postings GROUP BY entry_id, currency
    HAVING sum(CASE WHEN direction = 'D' THEN amount ELSE -amount END) <> 0
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entry % does not balance', bad USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION ledger_entries_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad TEXT;
BEGIN
    -- A LATERAL probe of the postings' primary key (entry_id, idx) per entry, kept from
    -- becoming an anti-join over the whole table by its LIMIT.
    SELECT n.id INTO bad
    FROM new_entries n
    CROSS JOIN LATERAL (
        SELECT count(*) AS found FROM (SELECT 1 FROM ledger_postings p WHERE p.entry_id = n.id LIMIT 1) p
    ) c
    WHERE n.status IN ('posted', 'pending') AND c.found = 0
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'ledger entry % does not balance', bad USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END
$$;
