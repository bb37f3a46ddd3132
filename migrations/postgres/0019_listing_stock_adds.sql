-- Each AddStock call under its key (issue 23): a retry of any earlier add, not only the
-- last one, adds nothing. Bounded per listing by the service (STOCK_ADDS_PER_LISTING_MAX).
CREATE TABLE listing_stock_adds (
    listing_id      TEXT COLLATE "C" NOT NULL REFERENCES listings (listing_id),
    idempotency_key TEXT COLLATE "C" NOT NULL,
    quantity        BIGINT NOT NULL CHECK (quantity > 0),
    created_at_us   BIGINT NOT NULL,
    PRIMARY KEY (listing_id, idempotency_key)
);
-- Replaced by the table above: it only remembered the last add's key.
ALTER TABLE listings DROP COLUMN stock_key;
