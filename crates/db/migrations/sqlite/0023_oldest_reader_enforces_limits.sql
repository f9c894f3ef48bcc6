-- A contract step for restrictions, not for columns. A keycast older than 0014 runs on this
-- schema but ignores what later migrations made binding: a grant's expiry and limits (0007,
-- `authorizations.terms`: an older one signs for an expired grant without end), the
-- signatures counted before pruning (0013: it lets a grant past `max_signatures`) and a code
-- used twice (0014: it no longer revokes what the first use made). Tolerable for the minutes
-- of a rolling deploy, not for a rollback that lasts: such a binary is now refused at start,
-- naming version 14. Instances already running are not stopped.
UPDATE keycast_schema SET oldest_reader = 14 WHERE oldest_reader < 14;
