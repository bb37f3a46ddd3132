-- Live shopping (issue 23): sellers, listings with stock, purchases and their refunds.
-- Ids, keys and codes compare byte by byte (COLLATE "C"), as since 0007: every index on
-- them is extended on each purchase.

-- A seller is an account the platform marked so; its commission override, in basis
-- points, is NULL when the configured default applies.
ALTER TABLE accounts ADD COLUMN seller BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE accounts ADD COLUMN commission_bps INTEGER CHECK (commission_bps BETWEEN 0 AND 10000);

-- A product shown in a live stream. `sold` is advanced in the posting engine's batch
-- transaction together with the purchases' money; the CHECK is the database's half of
-- "never oversell" (the batch's in-memory count is the other).
CREATE TABLE listings (
    listing_id      TEXT COLLATE "C" PRIMARY KEY,
    seller_id       TEXT COLLATE "C" NOT NULL REFERENCES accounts (user_id),
    stream_id       TEXT COLLATE "C" NOT NULL,
    title           TEXT NOT NULL,
    currency        TEXT COLLATE "C" NOT NULL,
    price           BIGINT NOT NULL CHECK (price > 0),
    -- NULL: unlimited stock.
    quantity        BIGINT CHECK (quantity >= 0),
    sold            BIGINT NOT NULL DEFAULT 0 CHECK (sold >= 0),
    per_buyer_max   BIGINT NOT NULL CHECK (per_buyer_max > 0),
    starts_at_us    BIGINT,
    ends_at_us      BIGINT,
    closed_at_us    BIGINT,
    idempotency_key TEXT COLLATE "C" NOT NULL,
    request_hash    TEXT NOT NULL,
    -- The key of the last AddStock, so that its retry adds nothing.
    stock_key       TEXT NOT NULL DEFAULT '',
    created_at_us   BIGINT NOT NULL,
    updated_at_us   BIGINT NOT NULL,
    UNIQUE (seller_id, idempotency_key),
    CHECK (quantity IS NULL OR sold <= quantity),
    CHECK (ends_at_us IS NULL OR starts_at_us IS NULL OR ends_at_us > starts_at_us)
);
CREATE INDEX listings_stream ON listings (stream_id, created_at_us, listing_id);

-- A purchase is only stored once paid: a refused or sold-out tap leaves no row.
-- `hold` is where the seller's share stands: held in the seller's pending account until
-- `available_at_us`, then releasing (the amount is fixed) and released to the wallet.
CREATE TABLE purchases (
    purchase_id         TEXT COLLATE "C" PRIMARY KEY,
    listing_id          TEXT COLLATE "C" NOT NULL REFERENCES listings (listing_id),
    buyer_id            TEXT COLLATE "C" NOT NULL,
    seller_id           TEXT COLLATE "C" NOT NULL,
    stream_id           TEXT COLLATE "C" NOT NULL,
    currency            TEXT COLLATE "C" NOT NULL,
    quantity            BIGINT NOT NULL CHECK (quantity > 0),
    unit_price          BIGINT NOT NULL CHECK (unit_price > 0),
    amount              BIGINT NOT NULL CHECK (amount > 0),
    commission          BIGINT NOT NULL CHECK (commission >= 0 AND commission <= amount),
    refunded_amount     BIGINT NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0 AND refunded_amount <= amount),
    commission_refunded BIGINT NOT NULL DEFAULT 0 CHECK (commission_refunded >= 0 AND commission_refunded <= commission),
    restocked           BIGINT NOT NULL DEFAULT 0 CHECK (restocked >= 0 AND restocked <= quantity),
    hold                TEXT NOT NULL CHECK (hold IN ('held', 'releasing', 'released')),
    available_at_us     BIGINT NOT NULL,
    released_amount     BIGINT CHECK (released_amount >= 0),
    entry_id            TEXT,
    idempotency_key     TEXT COLLATE "C" NOT NULL,
    request_hash        TEXT NOT NULL,
    created_at_us       BIGINT NOT NULL,
    updated_at_us       BIGINT NOT NULL,
    UNIQUE (buyer_id, idempotency_key),
    CHECK (amount = quantity * unit_price),
    CHECK ((hold = 'held') = (released_amount IS NULL))
);
CREATE INDEX purchases_listing_buyer ON purchases (listing_id, buyer_id);
CREATE INDEX purchases_seller ON purchases (seller_id, created_at_us, purchase_id);
CREATE INDEX purchases_holds ON purchases (available_at_us) WHERE hold <> 'released';

-- A seller's refund of a purchase: recorded with its amounts first, then posted to the
-- ledger under a key derived from its id, so a crash between the two is finished by the
-- resolver and never posts twice.
CREATE TABLE purchase_refunds (
    refund_id       TEXT COLLATE "C" PRIMARY KEY,
    purchase_id     TEXT COLLATE "C" NOT NULL REFERENCES purchases (purchase_id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    commission      BIGINT NOT NULL CHECK (commission >= 0 AND commission <= amount),
    restock         BIGINT NOT NULL CHECK (restock >= 0),
    source          TEXT NOT NULL CHECK (source IN ('pending', 'available')),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'posted', 'failed')),
    failure_reason  TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT COLLATE "C" NOT NULL,
    request_hash    TEXT NOT NULL,
    created_at_us   BIGINT NOT NULL,
    updated_at_us   BIGINT NOT NULL,
    UNIQUE (purchase_id, idempotency_key)
);
CREATE INDEX purchase_refunds_pending ON purchase_refunds (created_at_us) WHERE status = 'pending';

ALTER TABLE payment_events ADD COLUMN purchase_id TEXT;
-- On purchase events: the listing's units sold after the change ("sold 37/50").
ALTER TABLE payment_events ADD COLUMN units_sold BIGINT;
