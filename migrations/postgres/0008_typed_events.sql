-- Outbox events record the state they announce in typed columns instead of a JSON copy
-- of the whole payment or request: the parts that never change (parties, amount, note,
-- ids) are read from the payment or request row, the parts that do (status, refunds,
-- failure, processor references, settlement time) from the event. Two events per
-- payment at hundreds of bytes of JSON each were most of the outbox's size and write
-- cost. `snapshot` stays for events written before this migration and is empty after.
ALTER TABLE payment_events
    ADD COLUMN status TEXT NOT NULL DEFAULT '',
    ADD COLUMN refunded_amount BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN failure_reason TEXT NOT NULL DEFAULT '',
    ADD COLUMN failure_message TEXT NOT NULL DEFAULT '',
    ADD COLUMN authorization_ref TEXT,
    ADD COLUMN capture_ref TEXT,
    ADD COLUMN settled_at_us BIGINT,
    ALTER COLUMN snapshot SET DEFAULT '';
