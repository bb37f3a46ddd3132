-- Card-funded purchases (issue 23); see the PostgreSQL migration of the same number.
-- SQLite cannot add a table constraint, so the funding rule is a column CHECK on the
-- last column added, which may refer to the row's other columns.
ALTER TABLE stream_tabs ADD COLUMN kind TEXT NOT NULL DEFAULT 'stream' CHECK (kind IN ('stream', 'purchase'));
DROP INDEX stream_tabs_one_open;
CREATE UNIQUE INDEX stream_tabs_one_open ON stream_tabs (buyer_id, stream_id)
    WHERE status IN ('opening', 'open') AND kind = 'stream';

ALTER TABLE purchases ADD COLUMN wallet_amount INTEGER NOT NULL DEFAULT 0 CHECK (wallet_amount >= 0);
ALTER TABLE purchases ADD COLUMN card_amount INTEGER NOT NULL DEFAULT 0 CHECK (card_amount >= 0);
UPDATE purchases SET wallet_amount = amount WHERE tab_id IS NULL;
ALTER TABLE purchases ADD COLUMN fee_amount INTEGER NOT NULL DEFAULT 0 CHECK (
    fee_amount >= 0 AND (
        (wallet_amount = 0 AND card_amount = 0 AND fee_amount = 0)
        OR (wallet_amount + card_amount = amount AND (card_amount > 0) = (tab_id IS NOT NULL)
            AND (card_amount > 0 OR fee_amount = 0))
    )
);
