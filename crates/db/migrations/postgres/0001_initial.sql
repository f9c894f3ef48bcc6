-- keycast schema, PostgreSQL flavour. The SQLite twin lives in ../sqlite/0001_initial.sql;
-- keep the two in step (same tables, columns and constraints; only types differ).
-- Ids are random text generated in Rust, timestamps are unix seconds passed in from Rust,
-- so the queries that use these tables run unchanged on both engines.

-- Facts about this database itself, e.g. its replication lineage.
CREATE TABLE keycast_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    id                TEXT PRIMARY KEY,
    email             TEXT NOT NULL UNIQUE,
    password_hash     TEXT NOT NULL,
    username          TEXT UNIQUE,
    email_verified_at BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);

-- Login sessions. Only a hash of the cookie value is stored.
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user_id ON sessions(user_id);

-- Single-use tokens mailed to the user (email verification, password reset). Stored hashed.
CREATE TABLE user_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    purpose    TEXT NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT
);
CREATE INDEX user_tokens_user_id ON user_tokens(user_id);

-- A user's Nostr secret key, encrypted (AES-256-GCM under the key-encryption key,
-- with the owner's id as associated data). The plaintext key is never stored.
CREATE TABLE keys (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    pubkey           TEXT NOT NULL UNIQUE,
    encrypted_secret BYTEA NOT NULL,
    origin           TEXT NOT NULL CHECK (origin IN ('generated', 'imported')),
    created_at       BIGINT NOT NULL
);

-- What an authorization may do. `permissions` is a JSON document evaluated by core::policy.
CREATE TABLE policies (
    id           TEXT PRIMARY KEY,
    slug         TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    description  TEXT NOT NULL,
    permissions  TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

-- One app's grant to sign for one user: its own bunker keypair (encrypted), its connect
-- secret (hashed), relays (JSON array), and the client bound by the first valid `connect`.
CREATE TABLE authorizations (
    id                      TEXT PRIMARY KEY,
    user_id                 TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    policy_id               TEXT NOT NULL REFERENCES policies(id),
    client_id               TEXT NOT NULL,
    redirect_origin         TEXT NOT NULL,
    bunker_pubkey           TEXT NOT NULL UNIQUE,
    bunker_secret_encrypted BYTEA NOT NULL,
    connect_secret_hash     TEXT NOT NULL,
    relays                  TEXT NOT NULL,
    connected_client_pubkey TEXT,
    connected_at            BIGINT,
    created_at              BIGINT NOT NULL,
    revoked_at              BIGINT
);
CREATE INDEX authorizations_user_id ON authorizations(user_id);

-- OAuth 2.0 authorization codes (hashed). `redeemed_at` makes redemption a single
-- conditional UPDATE, so a code can be exchanged at most once even under a race.
CREATE TABLE oauth_codes (
    code_hash      TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    client_id      TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    policy_id      TEXT NOT NULL REFERENCES policies(id),
    code_challenge TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    redeemed_at    BIGINT
);

-- Opaque bearer tokens for the HTTP RPC endpoint (hashed).
CREATE TABLE access_tokens (
    token_hash       TEXT PRIMARY KEY,
    authorization_id TEXT NOT NULL REFERENCES authorizations(id) ON DELETE CASCADE,
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL
);
CREATE INDEX access_tokens_authorization_id ON access_tokens(authorization_id);

-- What each authorization did. Written in batches, off the signing path.
CREATE TABLE activity (
    id               TEXT PRIMARY KEY,
    authorization_id TEXT NOT NULL REFERENCES authorizations(id) ON DELETE CASCADE,
    method           TEXT NOT NULL,
    kind             BIGINT,
    transport        TEXT NOT NULL CHECK (transport IN ('http', 'nip46')),
    created_at       BIGINT NOT NULL
);
CREATE INDEX activity_authorization_id ON activity(authorization_id, created_at);

INSERT INTO policies (id, slug, display_name, description, permissions, created_at) VALUES
  ('pol_social', 'social', 'Social', 'Post, react, follow and message: the kinds a social client needs.',
   '{"allowed_kinds":[0,1,3,4,7,44,1059,9735,22242]}', 0),
  ('pol_readonly', 'readonly', 'Read only', 'Decrypt messages and authenticate to relays; no posting.',
   '{"decrypt_only":true}', 0),
  ('pol_wallet', 'wallet', 'Wallet', 'Sign zap requests only.',
   '{"allowed_kinds":[9734]}', 0),
  ('pol_full', 'full', 'Full access', 'Sign any event and encrypt or decrypt anything.',
   '{"full_access":true}', 0);
