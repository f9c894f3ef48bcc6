-- Account pre-registration hijacking (issue 12, item 1). Keep the SQLite and PostgreSQL
-- files identical in meaning.

-- When the user's key was last exported (export is recorded from this version on), and
-- whether the key may be known to someone who held the account before its mailbox owner
-- proved control of it (set on a password reset or a first verification; cleared by
-- replacing the key or by the owner saying it is theirs).
ALTER TABLE keys ADD COLUMN last_exported_at BIGINT;
ALTER TABLE keys ADD COLUMN exposed_at BIGINT;
ALTER TABLE keys ADD COLUMN exposure TEXT;

-- What happened to the account itself (key exports, password resets, email verification,
-- authorizations revoked by a take-over, key replaced), shown with the signing activity.
CREATE TABLE account_events (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    event      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX account_events_user_id ON account_events(user_id, created_at);

-- Before this version an account whose email was never verified could export its key
-- without leaving a trace: whoever registered it may hold the key.
UPDATE keys SET exposed_at = created_at, exposure = 'unverified_before_upgrade'
 WHERE user_id IN (SELECT id FROM users WHERE email_verified_at IS NULL);
