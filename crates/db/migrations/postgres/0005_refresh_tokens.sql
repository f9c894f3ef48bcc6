-- Rotating refresh tokens (issue 14; RFC 6749 §6, RFC 9700 §4.14). Keep the SQLite and
-- PostgreSQL files identical in meaning.
--
-- A refresh token is stored only as its hash. Using one marks it `used_at` (one
-- conditional UPDATE) and issues a new pair; the spent row stays until it expires, so a
-- second use of it is recognised as reuse and revokes the authorization it belongs to
-- (the token family: every access and refresh token of that authorization, and its bunker).
CREATE TABLE refresh_tokens (
    token_hash       TEXT PRIMARY KEY,
    authorization_id TEXT NOT NULL REFERENCES authorizations(id) ON DELETE CASCADE,
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    used_at          BIGINT
);
CREATE INDEX refresh_tokens_authorization_id ON refresh_tokens(authorization_id);
