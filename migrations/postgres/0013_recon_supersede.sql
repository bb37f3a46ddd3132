-- A later settlement report for a day supersedes the earlier one (src/finance/recon):
-- the day's books move to the new report's totals, by entries of the difference.
--
-- recon_days points at each day's current run; runs chain to the run they superseded
-- and keep their per-currency totals, so what a run books (its totals less its
-- predecessor's) can be recomputed, and completed, by importing its report again.
CREATE TABLE recon_days (
    processor      TEXT COLLATE "C" NOT NULL,
    report_date    TEXT COLLATE "C" NOT NULL,
    current_run_id TEXT NOT NULL REFERENCES recon_runs (run_id),
    updated_at_us  BIGINT NOT NULL,
    PRIMARY KEY (processor, report_date)
);

-- prev_run_id: the run this one superseded. chained: books by the chain (below); the
-- runs made before this migration booked once per day under keys that name the day.
ALTER TABLE recon_runs ADD COLUMN prev_run_id TEXT REFERENCES recon_runs (run_id);
ALTER TABLE recon_runs ADD COLUMN chained BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE recon_run_totals (
    run_id   TEXT NOT NULL REFERENCES recon_runs (run_id),
    currency TEXT NOT NULL,
    -- Minor units: the report's fees, and its net (what the processor pays out; may be
    -- negative on a day of refunds).
    fees     BIGINT NOT NULL,
    net      BIGINT NOT NULL,
    PRIMARY KEY (run_id, currency)
);
CREATE TRIGGER recon_run_totals_append_only BEFORE UPDATE OR DELETE ON recon_run_totals
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();

-- Days reconciled before: the first run is current, and its totals are what the day's
-- bookings hold. Those were made under keys naming the day, by whichever run of the day
-- got to each currency first (a later report could book a currency the first had
-- none of), so they are summed per day and currency, whatever run booked them.
INSERT INTO recon_days (processor, report_date, current_run_id, updated_at_us)
SELECT DISTINCT ON (processor, report_date) processor, report_date, run_id, created_at_us
FROM recon_runs ORDER BY processor, report_date, created_at_us, run_id;

INSERT INTO recon_run_totals (run_id, currency, fees, net)
SELECT d.current_run_id, b.currency, SUM(b.fees), SUM(b.net)
FROM (
    SELECT r.processor, r.report_date, p.currency,
           CASE WHEN e.kind = 'processor_fees' THEN p.amount ELSE 0 END AS fees,
           CASE WHEN e.kind = 'processor_settlement' THEN CASE WHEN p.direction = 'D' THEN p.amount ELSE -p.amount END ELSE 0 END AS net
    FROM ledger_entries e
    JOIN ledger_postings p ON p.entry_id = e.id
    JOIN ledger_accounts a ON a.id = p.account_id
    JOIN recon_runs r ON r.run_id = e.metadata::json->>'run_id'
    WHERE e.created_by = 'finance:reconciliation'
      AND ((e.kind = 'processor_fees' AND a.code LIKE 'platform:processor_fees:%')
        OR (e.kind = 'processor_settlement' AND a.code LIKE 'platform:settlement_bank:%'))
) b
JOIN recon_days d ON d.processor = b.processor AND d.report_date = b.report_date
GROUP BY d.current_run_id, b.currency;
