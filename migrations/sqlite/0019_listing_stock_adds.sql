-- Each AddStock call under its key (issue 23); see the PostgreSQL migration of the
-- same number.
CREATE TABLE listing_stock_adds (
    listing_id      TEXT NOT NULL REFERENCES listings (listing_id),
    idempotency_key TEXT NOT NULL,
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    created_at_us   INTEGER NOT NULL,
    PRIMARY KEY (listing_id, idempotency_key)
);
ALTER TABLE listings DROP COLUMN stock_key;
