-- The hourly sweep (`keycast_core::housekeeping`) deletes what expired from these tables by
-- `expires_at`. Without an index each DELETE read the whole table, on SQLite under the
-- write lock every request waits for: a month of hourly token refreshes is a table of
-- hundreds of thousands of rows, read whole every hour to find the few that expired.
CREATE INDEX sessions_expires_at ON sessions(expires_at);
CREATE INDEX user_tokens_expires_at ON user_tokens(expires_at);
CREATE INDEX oauth_codes_expires_at ON oauth_codes(expires_at);
CREATE INDEX access_tokens_expires_at ON access_tokens(expires_at);
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens(expires_at);
CREATE INDEX approvals_expires_at ON approvals(expires_at);
