-- Settlement reconciliation: runs, their items, and who resolved what. Kept for
-- auditors: runs and resolutions are never edited.

CREATE TABLE recon_runs (
    run_id            TEXT PRIMARY KEY,
    processor         TEXT NOT NULL,
    report_date       TEXT NOT NULL,
    report_hash       TEXT NOT NULL,
    rows_count        INTEGER NOT NULL,
    matched           INTEGER NOT NULL,
    amount_mismatch   INTEGER NOT NULL,
    missing_in_ledger INTEGER NOT NULL,
    missing_in_report INTEGER NOT NULL,
    duplicates        INTEGER NOT NULL,
    created_by        TEXT NOT NULL,
    created_at_us     INTEGER NOT NULL,
    UNIQUE (processor, report_date, report_hash)
) STRICT;

CREATE TABLE recon_items (
    item_id             TEXT PRIMARY KEY,
    run_id              TEXT NOT NULL REFERENCES recon_runs (run_id),
    status              TEXT NOT NULL CHECK (status IN ('matched', 'amount_mismatch', 'missing_in_ledger', 'missing_in_report', 'duplicate')),
    processor_reference TEXT NOT NULL DEFAULT '',
    currency            TEXT NOT NULL,
    report_amount       INTEGER,
    ledger_amount       INTEGER,
    entry_id            TEXT,
    line                INTEGER,
    created_at_us       INTEGER NOT NULL
) STRICT;
CREATE INDEX recon_items_run ON recon_items (run_id, status, item_id);

CREATE TABLE recon_resolutions (
    item_id        TEXT PRIMARY KEY REFERENCES recon_items (item_id),
    resolution     TEXT NOT NULL CHECK (resolution IN ('suspense', 'explained')),
    note           TEXT NOT NULL,
    entry_id       TEXT,
    resolved_by    TEXT NOT NULL,
    resolved_at_us INTEGER NOT NULL
) STRICT;

CREATE TRIGGER recon_runs_no_update BEFORE UPDATE ON recon_runs
BEGIN
    SELECT RAISE(ABORT, 'table recon_runs is append-only');
END;
CREATE TRIGGER recon_runs_no_delete BEFORE DELETE ON recon_runs
BEGIN
    SELECT RAISE(ABORT, 'table recon_runs is append-only');
END;

CREATE TRIGGER recon_items_no_update BEFORE UPDATE ON recon_items
BEGIN
    SELECT RAISE(ABORT, 'table recon_items is append-only');
END;
CREATE TRIGGER recon_items_no_delete BEFORE DELETE ON recon_items
BEGIN
    SELECT RAISE(ABORT, 'table recon_items is append-only');
END;

CREATE TRIGGER recon_resolutions_no_update BEFORE UPDATE ON recon_resolutions
BEGIN
    SELECT RAISE(ABORT, 'table recon_resolutions is append-only');
END;
CREATE TRIGGER recon_resolutions_no_delete BEFORE DELETE ON recon_resolutions
BEGIN
    SELECT RAISE(ABORT, 'table recon_resolutions is append-only');
END;
