-- Identifiers compare byte by byte. Ids, codes, keys and user ids are ASCII, and every
-- index on them is probed or extended on each ledger write; under a database collation
-- such as C.UTF-8 or en_US.UTF-8 each comparison of those indexes would go through the
-- locale's strcoll instead of memcmp. SQLite already compares text bytewise.
ALTER TABLE accounts ALTER COLUMN user_id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_accounts ALTER COLUMN code TYPE TEXT COLLATE "C";
ALTER TABLE ledger_entries
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN pending_entry_id TYPE TEXT COLLATE "C",
    ALTER COLUMN reverses_entry_id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_postings ALTER COLUMN entry_id TYPE TEXT COLLATE "C";
ALTER TABLE idempotency_keys
    ALTER COLUMN caller TYPE TEXT COLLATE "C",
    ALTER COLUMN key TYPE TEXT COLLATE "C";
ALTER TABLE payments
    ALTER COLUMN payment_id TYPE TEXT COLLATE "C",
    ALTER COLUMN sender_id TYPE TEXT COLLATE "C",
    ALTER COLUMN recipient_id TYPE TEXT COLLATE "C",
    ALTER COLUMN conversation_id TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C",
    ALTER COLUMN request_id TYPE TEXT COLLATE "C";
ALTER TABLE payment_refunds ALTER COLUMN payment_id TYPE TEXT COLLATE "C";
ALTER TABLE payment_requests
    ALTER COLUMN request_id TYPE TEXT COLLATE "C",
    ALTER COLUMN requester_id TYPE TEXT COLLATE "C",
    ALTER COLUMN payer_id TYPE TEXT COLLATE "C",
    ALTER COLUMN payment_id TYPE TEXT COLLATE "C";
ALTER TABLE payment_events
    ALTER COLUMN party_a TYPE TEXT COLLATE "C",
    ALTER COLUMN party_b TYPE TEXT COLLATE "C";
ALTER TABLE payment_spend
    ALTER COLUMN sender_id TYPE TEXT COLLATE "C",
    ALTER COLUMN currency TYPE TEXT COLLATE "C";
