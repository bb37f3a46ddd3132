-- PostgreSQL's 0007 gives identifier columns the "C" collation; SQLite compares text
-- bytewise (BINARY) already, so there is nothing to change here.
SELECT 1;
