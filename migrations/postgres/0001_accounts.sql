-- Platform accounts and the append-only audit trail.
-- Times are microseconds since the Unix epoch (BIGINT) in both backends.

CREATE TABLE accounts (
    user_id       TEXT PRIMARY KEY,
    display_name  TEXT NOT NULL DEFAULT '',
    tier          TEXT NOT NULL CHECK (tier IN ('unverified', 'verified')),
    status        TEXT NOT NULL CHECK (status IN ('active', 'frozen')),
    created_at_us BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL
);

CREATE TABLE audit_log (
    id     BIGSERIAL PRIMARY KEY,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT 'ok',
    at_us  BIGINT NOT NULL
);
CREATE INDEX audit_log_target ON audit_log (target, id);

-- Shared by every append-only table: history is corrected by new rows, never edited.
CREATE FUNCTION dmpay_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only', TG_TABLE_NAME USING ERRCODE = 'P0001';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION dmpay_reject_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION dmpay_reject_change();
