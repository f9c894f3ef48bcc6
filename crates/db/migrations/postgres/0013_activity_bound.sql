-- A grant's activity record is bounded: beyond its newest rows (KEYCAST_ACTIVITY_PER_GRANT)
-- older ones are removed as the app signs, and the signatures among them are added here
-- first, so a grant's total (its owner's page, its `max_signatures`) still counts every
-- one. A grant with a rate limit keeps its last day of signatures, which that limit
-- counts after a restart. Expand-only: an older keycast ignores the column and counts only
-- the rows left, so during a rolling deploy a pruned grant's total may read low there.
-- Keep the SQLite and PostgreSQL files identical in meaning.
ALTER TABLE authorizations ADD COLUMN signatures_pruned BIGINT NOT NULL DEFAULT 0;
