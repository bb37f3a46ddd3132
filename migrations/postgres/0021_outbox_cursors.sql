-- How far a publisher of the outbox (payment_events) has got (issue 24: events on
-- NATS JetStream): the last sequence the broker acknowledged, and which process holds
-- the publishing lease (one at a time per deployment, so events go out in order).
CREATE TABLE outbox_cursors (
    name           TEXT COLLATE "C" PRIMARY KEY,
    sequence       BIGINT NOT NULL CHECK (sequence >= 0),
    owner          TEXT NOT NULL,
    lease_until_us BIGINT NOT NULL,
    updated_at_us  BIGINT NOT NULL
);
