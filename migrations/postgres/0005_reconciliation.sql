-- Settlement reconciliation: runs, their items, and who resolved what. Kept for
-- auditors: runs and resolutions are never edited.

CREATE TABLE recon_runs (
    run_id            TEXT PRIMARY KEY,
    processor         TEXT NOT NULL,
    report_date       TEXT NOT NULL,
    report_hash       TEXT NOT NULL,
    rows_count        BIGINT NOT NULL,
    matched           BIGINT NOT NULL,
    amount_mismatch   BIGINT NOT NULL,
    missing_in_ledger BIGINT NOT NULL,
    missing_in_report BIGINT NOT NULL,
    duplicates        BIGINT NOT NULL,
    created_by        TEXT NOT NULL,
    created_at_us     BIGINT NOT NULL,
    UNIQUE (processor, report_date, report_hash)
);

CREATE TABLE recon_items (
    item_id             TEXT PRIMARY KEY,
    run_id              TEXT NOT NULL REFERENCES recon_runs (run_id),
    status              TEXT NOT NULL CHECK (status IN ('matched', 'amount_mismatch', 'missing_in_ledger', 'missing_in_report', 'duplicate')),
    processor_reference TEXT NOT NULL DEFAULT '',
    currency            TEXT NOT NULL,
    report_amount       BIGINT,
    ledger_amount       BIGINT,
    entry_id            TEXT,
    line                BIGINT,
    created_at_us       BIGINT NOT NULL
);
CREATE INDEX recon_items_run ON recon_items (run_id, status, item_id);

CREATE TABLE recon_resolutions (
    item_id        TEXT PRIMARY KEY REFERENCES recon_items (item_id),
    resolution     TEXT NOT NULL CHECK (resolution IN ('suspense', 'explained')),
    note           TEXT NOT NULL,
    entry_id       TEXT,
    resolved_by    TEXT NOT NULL,
    resolved_at_us BIGINT NOT NULL
);

CREATE TRIGGER recon_runs_append_only BEFORE UPDATE OR DELETE ON recon_runs
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
CREATE TRIGGER recon_items_append_only BEFORE UPDATE OR DELETE ON recon_items
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
CREATE TRIGGER recon_resolutions_append_only BEFORE UPDATE OR DELETE ON recon_resolutions
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
