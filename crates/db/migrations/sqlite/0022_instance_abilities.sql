-- What each live instance can do, written with every heartbeat. Both nullable, so the
-- previous revision of a rolling deploy keeps inserting its heartbeats unchanged.
--
-- `master_key_ids`: the master keys it can open (their ids, comma-separated; NULL from a
-- version before this one). `keycast master-key rotate` refuses to re-encrypt the stored keys
-- under a key some live instance cannot open: that instance would stop signing once its
-- cache expired.
--
-- `answers_nip46`: 1 while it answers NIP-46 requests (the service runs, its bunkers are read
-- and an operator relay is connected), 0 otherwise; NULL from an older version, taken as 1.
-- Bunkers are shared out among the instances that answer: one started with KEYCAST_NIP46=false,
-- still starting, or cut off from every relay owned a share that nobody answered.
ALTER TABLE keycast_instances ADD COLUMN master_key_ids TEXT;
ALTER TABLE keycast_instances ADD COLUMN answers_nip46 BIGINT;
