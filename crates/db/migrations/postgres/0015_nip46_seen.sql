-- NIP-46 requests (client public key, request id) the instance that wrote the replica had seen
-- when it handed over (SQLite): some relays keep ephemeral events for a while and replay the
-- last minute's requests to a new subscription, and the newcomer must not answer them again
-- (a second signature, counted twice against a grant's limits). Replaced whole at each
-- hand-over; on PostgreSQL instances share `nip46_claims` instead and leave it empty.
-- Keep the SQLite and PostgreSQL files identical in meaning.
CREATE TABLE nip46_seen (
    client     TEXT NOT NULL,
    request_id TEXT NOT NULL,
    seen_at    BIGINT NOT NULL,
    PRIMARY KEY (client, request_id)
);
