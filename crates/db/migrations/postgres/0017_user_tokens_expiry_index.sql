-- no-transaction
-- The hourly sweep (`keycast_core::housekeeping`) deletes what expired by `expires_at`:
-- without an index each DELETE read the whole table. Built CONCURRENTLY, so the old
-- revision of a rolling deploy keeps writing user_tokens while it is built (a plain CREATE INDEX
-- holds a lock that blocks its writes until the build ends); CONCURRENTLY cannot run in a
-- transaction, hence one index per migration. An instance stopped during the build leaves
-- the index invalid, and the next start records the migration as done: docs/POSTGRESQL.md
-- says how to see and rebuild one (REINDEX INDEX CONCURRENTLY).
CREATE INDEX CONCURRENTLY IF NOT EXISTS user_tokens_expires_at ON user_tokens(expires_at);
