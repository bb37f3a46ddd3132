-- API callers write under `api:<sub>` (src/ledger/callers.rs), so that no token's `sub`
-- can name one of dmpay's own modules and reach its idempotency keys. Keys written before
-- by API callers move to their new namespace, so a client's retry still replays its
-- original result; the modules' keys keep their names.
UPDATE idempotency_keys SET caller = 'api:' || caller
WHERE caller NOT IN ('payments', 'finance:reconciliation', 'system:expiry', 'bench')
  AND caller NOT LIKE 'api:%';
