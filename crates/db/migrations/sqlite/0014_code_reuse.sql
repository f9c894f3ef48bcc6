-- The authorization a code became when it was redeemed, so that a second use of the code
-- can revoke it (RFC 6749 §4.1.2: a code used twice was stolen, by whoever redeemed it
-- first or is presenting it now). Expand-only: an older keycast neither writes nor reads
-- it. Keep the SQLite and PostgreSQL files identical in meaning.
ALTER TABLE oauth_codes ADD COLUMN authorization_id TEXT;
