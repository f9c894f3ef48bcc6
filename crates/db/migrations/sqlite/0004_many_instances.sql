-- Many instances on one database (issue 13). The tables exist on both engines so the two
-- schemas stay the same; SQLite (one instance) leaves the first two empty. Expand-only:
-- new tables, nothing an older keycast reads changes (see docs/ARCHITECTURE.md, "Schema
-- changes and rolling deploys").

-- The oldest keycast, by the newest migration it carries, that may still run on this
-- schema. An expand step (new tables, new nullable or defaulted columns) leaves it alone;
-- a contract step (dropping or changing what an older keycast reads or writes) raises it
-- to its own version. A keycast older than this refuses to start; one that is older than
-- the schema but not than this runs without migrating (a rolling deploy's old half).
CREATE TABLE keycast_schema (
    id            BIGINT PRIMARY KEY,
    oldest_reader BIGINT NOT NULL
);
INSERT INTO keycast_schema (id, oldest_reader) VALUES (1, 3);

-- The instances serving this database, each heartbeating (unix milliseconds of the
-- database server's clock). NIP-46 bunkers are shared out among the live ones.
CREATE TABLE keycast_instances (
    id           TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

-- NIP-46 requests (event ids) claimed by the instance that answers them: with several
-- instances hearing every relay, a request is answered by whoever claims it first, once.
CREATE TABLE nip46_claims (
    event_id    TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    claimed_at  BIGINT NOT NULL
);
CREATE INDEX nip46_claims_claimed_at ON nip46_claims(claimed_at);

-- Rate-limit buckets shared by every instance (GCRA: the theoretical arrival time of the
-- next request, in unix milliseconds; `allowed` is 1 when the last attempt passed).
CREATE TABLE rate_buckets (
    key        TEXT PRIMARY KEY,
    tat_ms     BIGINT NOT NULL,
    allowed    BIGINT NOT NULL,
    touched_ms BIGINT NOT NULL
);
CREATE INDEX rate_buckets_touched_ms ON rate_buckets(touched_ms);

-- Wrong passwords per account and client, shared by every instance.
CREATE TABLE password_failures (
    key              TEXT PRIMARY KEY,
    failures         BIGINT NOT NULL,
    blocked_until_ms BIGINT NOT NULL,
    touched_ms       BIGINT NOT NULL
);
CREATE INDEX password_failures_touched_ms ON password_failures(touched_ms);
