-- Registered apps (issue 14): an operator registers a client (`keycast clients add` or the
-- admin API) with its name, the exact redirect URIs it may use and an optional logo, and
-- the consent page shows it as verified. Keep the SQLite and PostgreSQL files identical in
-- meaning.
CREATE TABLE oauth_clients (
    client_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    -- A JSON array of absolute URIs, compared exactly.
    redirect_uris TEXT NOT NULL,
    logo_url      TEXT,
    created_at    BIGINT NOT NULL
);

-- Grants with time and limits (issue 14): what the owner chose at consent, as JSON
-- (`{"expires_at", "max_signatures", "per_minute", "per_hour", "per_day"}`, each optional);
-- NULL is a grant until revoked, without limits. A code carries the choice until its
-- exchange (`duration_secs` instead of `expires_at`, which starts at the exchange).
ALTER TABLE authorizations ADD COLUMN terms TEXT;
ALTER TABLE oauth_codes ADD COLUMN terms TEXT;
