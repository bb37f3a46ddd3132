-- Platform accounts and the append-only audit trail.
-- Times are microseconds since the Unix epoch (INTEGER) in both backends.

CREATE TABLE accounts (
    user_id       TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL DEFAULT '',
    tier          TEXT NOT NULL CHECK (tier IN ('unverified', 'verified')),
    status        TEXT NOT NULL CHECK (status IN ('active', 'frozen')),
    created_at_us INTEGER NOT NULL,
    updated_at_us INTEGER NOT NULL
) STRICT;

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT 'ok',
    at_us  INTEGER NOT NULL
) STRICT;
CREATE INDEX audit_log_target ON audit_log (target, id);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'table audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'table audit_log is append-only');
END;
