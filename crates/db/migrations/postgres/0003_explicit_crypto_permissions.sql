-- Encryption and decryption are explicit permissions (issue 12, item 4): a policy that
-- only lists kinds no longer encrypts or decrypts with any peer, and `decrypt_only` is gone.
-- What the consent page says is generated from these documents; the descriptions below
-- only keep the table readable.
UPDATE policies SET permissions = '{"allowed_kinds":[0,1,3,4,7,44,1059,9735,22242],"encrypt":true,"decrypt":true}',
       description = 'Post, react, follow and message: the kinds a social client needs, and direct messages.'
 WHERE id = 'pol_social';
UPDATE policies SET permissions = '{"allowed_kinds":[22242],"decrypt":true}',
       description = 'Decrypt messages and authenticate to relays; no posting.'
 WHERE id = 'pol_readonly';
UPDATE policies SET permissions = '{"allowed_kinds":[9734]}',
       description = 'Sign zap requests only; no messages.'
 WHERE id = 'pol_wallet';
