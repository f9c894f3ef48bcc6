-- Custom policies (issue 14): an owner builds a policy from permissions and uses it at
-- consent or on an app's grant. A seeded policy has no owner and is public (`GET
-- /api/policies`, `scope=policy:<slug>`); a custom one belongs to `owner_user_id` and is
-- found only for its owner. Expand-only: an older keycast still reads this schema (it
-- refuses a custom policy's newer permission fields, so an app under one is refused there
-- rather than widened). Keep the SQLite and PostgreSQL files identical in meaning.
ALTER TABLE policies ADD COLUMN owner_user_id TEXT REFERENCES users(id) ON DELETE CASCADE;
CREATE INDEX policies_owner_user_id ON policies(owner_user_id);

-- A lost refresh response (issue 14): a spent refresh token remembers the pair that
-- replaced it, so presenting it once more within the grace window (while that successor is
-- unused) replaces the successor instead of revoking the family. Expand-only: an older
-- keycast ignores the columns (and treats such a retry as reuse, as it always did).
ALTER TABLE refresh_tokens ADD COLUMN successor_hash TEXT;
ALTER TABLE refresh_tokens ADD COLUMN successor_access_hash TEXT;

-- What an app tried (issue 14, the dashboard's per-app view): NULL is done (every older
-- row), else the refusal's code. Only done signatures count against a grant's limits.
ALTER TABLE activity ADD COLUMN result TEXT;
