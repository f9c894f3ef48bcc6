-- Deleting a custom policy: the row stays, marked with the time it was deleted, because
-- revoked authorizations and unexpired OAuth codes still reference it (their history keeps
-- the policy's name). A deleted policy is no longer listed, usable, editable or redeemable;
-- one that a live authorization uses cannot be deleted. Expand-only: an older keycast
-- ignores the column and still lists a deleted policy to its owner until it is replaced.
-- Keep the SQLite and PostgreSQL files identical in meaning.
ALTER TABLE policies ADD COLUMN deleted_at BIGINT;
