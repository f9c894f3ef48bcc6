-- Grants with time and limits (issue 14): what the owner chose at consent, as JSON
-- (`{"expires_at", "max_signatures", "per_minute", "per_hour", "per_day"}`, each optional);
-- NULL is a grant until revoked, without limits. A code carries the choice until its
-- exchange (`duration_secs` instead of `expires_at`, which starts at the exchange). Keep the
-- SQLite and PostgreSQL files identical in meaning.
ALTER TABLE authorizations ADD COLUMN terms TEXT;
ALTER TABLE oauth_codes ADD COLUMN terms TEXT;
