-- Outbox publishers' cursors (issue 24); see the PostgreSQL migration of the same number.
CREATE TABLE outbox_cursors (
    name           TEXT PRIMARY KEY,
    sequence       INTEGER NOT NULL CHECK (sequence >= 0),
    owner          TEXT NOT NULL,
    lease_until_us INTEGER NOT NULL,
    updated_at_us  INTEGER NOT NULL
);
