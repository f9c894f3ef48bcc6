-- The master keys each live instance can open (their ids, comma-separated; NULL from a
-- version before this one), written with every heartbeat. `keycast master-key rotate` reads
-- them and refuses to re-encrypt the stored keys under a key some live instance cannot open:
-- that instance would stop signing once its cache expired. Nullable, so the previous
-- revision of a rolling deploy keeps inserting its heartbeats unchanged.
ALTER TABLE keycast_instances ADD COLUMN master_key_ids TEXT;
