-- What each sender has sent per currency and hour, for the rolling 24-hour limit; the
-- same model as migrations/postgres/0006_payment_spend.sql.
CREATE TABLE payment_spend (
    sender_id TEXT NOT NULL,
    currency  TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    amount    INTEGER NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (sender_id, currency, hour)
) STRICT;

INSERT INTO payment_spend (sender_id, currency, hour, amount)
SELECT sender_id, currency, created_at_us / 3600000000, SUM(amount)
FROM payments
WHERE status <> 'failed' AND created_at_us > (CAST(strftime('%s', 'now') AS INTEGER) - 90000) * 1000000
GROUP BY sender_id, currency, created_at_us / 3600000000;
