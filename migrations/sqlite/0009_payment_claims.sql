-- Claims on pending payments; the same model as migrations/postgres/0009_payment_claims.sql.
ALTER TABLE payments ADD COLUMN claim TEXT;
ALTER TABLE payments ADD COLUMN claimed_until_us INTEGER;
