-- Typed event state; the same model as migrations/postgres/0008_typed_events.sql.
ALTER TABLE payment_events ADD COLUMN status TEXT NOT NULL DEFAULT '';
ALTER TABLE payment_events ADD COLUMN refunded_amount INTEGER NOT NULL DEFAULT 0;
ALTER TABLE payment_events ADD COLUMN failure_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE payment_events ADD COLUMN failure_message TEXT NOT NULL DEFAULT '';
ALTER TABLE payment_events ADD COLUMN authorization_ref TEXT;
ALTER TABLE payment_events ADD COLUMN capture_ref TEXT;
ALTER TABLE payment_events ADD COLUMN settled_at_us INTEGER;
