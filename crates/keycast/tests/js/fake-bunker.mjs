// A deliberately minimal NIP-46 remote signer, only to prove the test tooling
// (bunker-client.mjs, the relay and the Rust harness) without keycast. Not a reference:
// keycast's own signer is what the real tests exercise.
//
//   node fake-bunker.mjs ws://127.0.0.1:PORT
//
// Like keycast it signs with a user key that differs from its bunker key. Once subscribed it
// prints one line, `{"bunker":"bunker://…","user_pubkey":…}`. NIP-44 only. Methods: connect
// (checks the secret), ping, get_public_key, sign_event, nip44_encrypt/decrypt and
// switch_relays (answers null); anything else gets `{"error":"unknown method: …"}`. A
// `nostrconnect://` URI written to stdin is answered with its secret.

import { createRequire } from 'node:module';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const require = createRequire(join(process.env.KEYCAST_NOSTR_TOOLS_DIR ?? '.', 'package.json'));
const { SimplePool, useWebSocketImplementation } = require('nostr-tools/pool');
const { generateSecretKey, getPublicKey, finalizeEvent } = require('nostr-tools/pure');
const nip44 = require('nostr-tools/nip44');

useWebSocketImplementation(require('ws'));

const relay = process.argv[2];
const pool = new SimplePool();
const bunkerSk = generateSecretKey();
const userSk = generateSecretKey();
const bunkerPk = getPublicKey(bunkerSk);
const secret = Buffer.from(generateSecretKey()).toString('hex').slice(0, 16);

const userKey = (peer) => nip44.getConversationKey(userSk, peer);

const methods = {
  connect: ([, given]) => (given === secret ? 'ack' : Promise.reject(new Error('invalid secret'))),
  ping: () => 'pong',
  get_public_key: () => getPublicKey(userSk),
  sign_event: ([json]) => JSON.stringify(finalizeEvent(JSON.parse(json), userSk)),
  nip44_encrypt: ([peer, text]) => nip44.encrypt(text, userKey(peer)),
  nip44_decrypt: ([peer, text]) => nip44.decrypt(text, userKey(peer)),
  switch_relays: () => 'null',
};

function reply(client, body) {
  const content = nip44.encrypt(JSON.stringify(body), nip44.getConversationKey(bunkerSk, client));
  const event = finalizeEvent(
    { kind: 24133, tags: [['p', client]], content, created_at: Math.floor(Date.now() / 1000) },
    bunkerSk,
  );
  return Promise.any(pool.publish([relay], event)).catch((err) => console.error('publish failed:', err));
}

async function handle(event) {
  const { id, method, params } = JSON.parse(nip44.decrypt(event.content, nip44.getConversationKey(bunkerSk, event.pubkey)));
  try {
    const handler = methods[method];
    if (!handler) throw new Error(`unknown method: ${method}`);
    await reply(event.pubkey, { id, result: await handler(params) });
  } catch (err) {
    await reply(event.pubkey, { id, error: err.message });
  }
}

pool.subscribe([relay], { kinds: [24133], '#p': [bunkerPk] }, {
  onevent: (event) => handle(event).catch((err) => console.error('bad request:', err)),
  oneose: () => {
    const bunker = `bunker://${bunkerPk}?relay=${encodeURIComponent(relay)}&secret=${secret}`;
    console.log(JSON.stringify({ bunker, user_pubkey: getPublicKey(userSk) }));
  },
});

createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.startsWith('nostrconnect://')) return;
  const uri = new URL(line.trim());
  reply(uri.hostname, { id: Math.random().toString(36).slice(2), result: uri.searchParams.get('secret') });
});
