-- A purchase paid by card for the part its wallet cannot cover (issue 23): the card is
-- authorized through a single-purchase tab (kind 'purchase'), the purchase draws on it
-- in the posting engine's batch with its stock, and the tab is captured (or voided when
-- the purchase was refused) at once. A crash at any point is finished by the resolver
-- as for stream tabs.
ALTER TABLE stream_tabs ADD COLUMN kind TEXT NOT NULL DEFAULT 'stream' CHECK (kind IN ('stream', 'purchase'));
-- The one-open-tab-per-stream rule is the viewer's stream tabs' only: a card purchase
-- in a stream where the viewer has a tab open is still possible.
DROP INDEX stream_tabs_one_open;
CREATE UNIQUE INDEX stream_tabs_one_open ON stream_tabs (buyer_id, stream_id)
    WHERE status IN ('opening', 'open') AND kind = 'stream';

-- What the purchase took from the wallet, and what it charged a card for (with the card
-- fee, paid by the buyer on top): amount = wallet_amount + card_amount for wallet and
-- card purchases; a stream tab's purchase has both 0 (the tab pays the amount).
ALTER TABLE purchases ADD COLUMN wallet_amount BIGINT NOT NULL DEFAULT 0 CHECK (wallet_amount >= 0);
ALTER TABLE purchases ADD COLUMN card_amount BIGINT NOT NULL DEFAULT 0 CHECK (card_amount >= 0);
ALTER TABLE purchases ADD COLUMN fee_amount BIGINT NOT NULL DEFAULT 0 CHECK (fee_amount >= 0);
UPDATE purchases SET wallet_amount = amount WHERE tab_id IS NULL;
-- All three zero: a stream tab's purchase, or a wallet purchase written by a binary
-- from before this migration while replicas are upgraded one at a time.
ALTER TABLE purchases ADD CONSTRAINT purchases_funding CHECK (
    (wallet_amount = 0 AND card_amount = 0 AND fee_amount = 0)
    OR (wallet_amount + card_amount = amount AND (card_amount > 0) = (tab_id IS NOT NULL)
        AND (card_amount > 0 OR fee_amount = 0))
);
