-- A grant's limits counted once for every instance (issue 14). On PostgreSQL each
-- signature of a limited authorization is admitted in one short transaction that locks
-- its `grant_usage` row (serializing that authorization across instances), counts the
-- total and the times of the last day, and adds this one. SQLite (one instance) keeps
-- counting in memory and leaves these tables empty. `total` is seeded from `activity`
-- when the row is made (earlier signatures count); a row is deleted when the grant's
-- terms change, so new limits count from what is stored again. Expand-only: an older
-- keycast ignores both tables. Keep the SQLite and PostgreSQL files identical in meaning.
CREATE TABLE grant_usage (
    authorization_id TEXT PRIMARY KEY REFERENCES authorizations(id) ON DELETE CASCADE,
    total            BIGINT NOT NULL
);

-- Times (unix seconds) of an authorization's admitted signatures of the last day; older
-- ones are pruned by the next admission.
CREATE TABLE grant_signatures (
    authorization_id TEXT NOT NULL REFERENCES grant_usage(authorization_id) ON DELETE CASCADE,
    signed_at        BIGINT NOT NULL
);
CREATE INDEX grant_signatures_authorization_signed ON grant_signatures(authorization_id, signed_at);
