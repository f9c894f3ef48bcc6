-- The hourly sweep (`keycast_core::housekeeping`) deletes what expired by `expires_at`:
-- without an index each DELETE read the whole table, on SQLite under the write lock every
-- request waits for. One index per migration, as on PostgreSQL (where each is built
-- CONCURRENTLY, which a transaction cannot hold). Keep both files identical in meaning.
CREATE INDEX IF NOT EXISTS refresh_tokens_expires_at ON refresh_tokens(expires_at);
