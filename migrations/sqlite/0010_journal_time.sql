-- Entries' times never go backwards in sequence order: the posting engine assigns a
-- batch's time under the journal's sequence row, as the later of its clock reading and
-- the last batch's time (`last_at_us`). A time range of the journal is then a sequence
-- range, found through `ledger_entries_created`, and an account's postings in a time
-- range are read through `ledger_postings_account` (account, sequence): the index by
-- account and time, two more index pages written per payment, goes.
ALTER TABLE ledger_sequence ADD COLUMN last_at_us INTEGER NOT NULL DEFAULT 0;
UPDATE ledger_sequence SET last_at_us = COALESCE((SELECT MAX(created_at_us) FROM ledger_entries), 0) WHERE id = 1;
DROP INDEX ledger_postings_account_time;
-- The latest entry at or before a time: its sequence bounds the range.
DROP INDEX ledger_entries_created;
CREATE INDEX ledger_entries_created ON ledger_entries (created_at_us, sequence);
