-- A limited grant's admitted signatures per second, for PostgreSQL's shared count: one row
-- per second of the last day however fast the grant signs, where `grant_signatures` held
-- one row per signature and every admission read them all back. SQLite (one instance)
-- counts in memory and leaves this table empty. Expand-only: an older keycast keeps
-- counting in `grant_signatures`, which this version no longer reads, so for the minutes of
-- a rolling deploy the two versions count apart. Every `grant_usage` row is deleted so that
-- each limited grant is counted from `activity` again, into this table, at its next
-- signature. Keep the SQLite and PostgreSQL files identical in meaning.
CREATE TABLE grant_seconds (
    authorization_id TEXT NOT NULL REFERENCES grant_usage(authorization_id) ON DELETE CASCADE,
    signed_at        BIGINT NOT NULL,
    signatures       BIGINT NOT NULL,
    PRIMARY KEY (authorization_id, signed_at)
);
DELETE FROM grant_usage;
