-- Asking instead of refusing (issue 14): a request an authorization's policy does not cover
-- is held as a pending approval its owner decides on a keycast page. Expand only (new
-- tables). Keep the SQLite and PostgreSQL files identical in meaning.
--
-- `id_hash` is the SHA-256 of the random id in the approval URL (the id itself is never
-- stored). `request_sealed` is the request as `{method, params}` JSON, NIP-44 encrypted by
-- the authorization's bunker key to itself, so a message to encrypt is not at rest in clear.
-- `fingerprint` (SHA-256 of the authorization, method and request) matches an HTTP RPC
-- retry to its approval. NIP-46 approvals carry what the reply needs: the request id, the
-- client and its cipher. A decision is taken once (`decision` from NULL by one conditional
-- UPDATE); an HTTP "once" is spent by the retry (`used_at`).
CREATE TABLE approvals (
    id_hash          TEXT PRIMARY KEY,
    authorization_id TEXT NOT NULL REFERENCES authorizations(id) ON DELETE CASCADE,
    transport        TEXT NOT NULL,
    method           TEXT NOT NULL,
    kind             BIGINT,
    request_sealed   TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    nip46_request_id TEXT,
    nip46_client     TEXT,
    nip46_cipher     TEXT,
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    decision         TEXT,
    decided_at       BIGINT,
    used_at          BIGINT
);
CREATE INDEX approvals_authorization_fingerprint ON approvals(authorization_id, fingerprint);

-- "Allow this kind from now on": kinds the owner added to one authorization's policy. The
-- signer merges them into the policy it evaluates, on both transports.
CREATE TABLE authorization_kinds (
    authorization_id TEXT NOT NULL REFERENCES authorizations(id) ON DELETE CASCADE,
    kind             BIGINT NOT NULL,
    approved_at      BIGINT NOT NULL,
    PRIMARY KEY (authorization_id, kind)
);
