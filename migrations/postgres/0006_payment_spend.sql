-- What each sender has sent per currency and hour, for the rolling 24-hour limit. The
-- limit check reads at most 25 rows per sender however many payments the sender made
-- (summing the payments themselves would read every payment of the last day, which a
-- busy sender makes expensive), and a batch of payments adds to one row per sender.
-- Failed payments are not counted; a payment that fails later is taken off again.
CREATE TABLE payment_spend (
    sender_id TEXT NOT NULL,
    currency  TEXT NOT NULL,
    -- Hours since the Unix epoch.
    hour      BIGINT NOT NULL,
    amount    BIGINT NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (sender_id, currency, hour)
);

-- What payments made before this table existed still count.
INSERT INTO payment_spend (sender_id, currency, hour, amount)
SELECT sender_id, currency, created_at_us / 3600000000, SUM(amount)
FROM payments
WHERE status <> 'failed' AND created_at_us > (CAST(extract(epoch FROM now()) AS BIGINT) - 90000) * 1000000
GROUP BY sender_id, currency, created_at_us / 3600000000;
