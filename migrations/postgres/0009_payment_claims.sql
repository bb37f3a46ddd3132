-- Who is finishing a pending payment. The request that created it holds the claim and
-- renews it before every processor call and before it fails the payment; the resolver
-- takes over only a claim that has run out (an attempt that crashed or stalled), by a
-- conditional update, so a live attempt and the resolver never both act on one payment:
-- whichever no longer holds the claim stops, and the payment ends in one state.
ALTER TABLE payments ADD COLUMN claim TEXT;
ALTER TABLE payments ADD COLUMN claimed_until_us BIGINT;
