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
