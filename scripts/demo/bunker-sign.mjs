// The walk-through's NIP-46 app: nostr-tools' BunkerSigner connects to a keycast bunker://
// URL, asks for the user's key and signs a note, and checks the signature itself.
//
//   node scripts/demo/bunker-sign.mjs 'bunker://…' ['the note']
//
// nostr-tools and ws are loaded from $NOSTR_TOOLS_DIR (scripts/walkthrough.sh installs them
// there). Node 20 has no global WebSocket, and nostr-tools' nip46 module bundles its own
// relay pool, so the signer gets a pool built with `ws`.
import { createRequire } from 'node:module';
import { join } from 'node:path';

const require = createRequire(join(process.env.NOSTR_TOOLS_DIR ?? '.', 'package.json'));
const WebSocket = require('ws');
const { SimplePool, useWebSocketImplementation } = require('nostr-tools/pool');
const { BunkerSigner, parseBunkerInput } = require('nostr-tools/nip46');
const { generateSecretKey, verifyEvent } = require('nostr-tools/pure');

useWebSocketImplementation(WebSocket);
const [url, content = 'hello from a NIP-46 app'] = process.argv.slice(2);
const bunker = await parseBunkerInput(url ?? '');
if (!bunker) {
  console.error('usage: bunker-sign.mjs bunker://… [note]');
  process.exit(2);
}
const pool = new SimplePool();
// A fresh app key: the bunker URL's secret binds it on `connect`.
const signer = BunkerSigner.fromBunker(generateSecretKey(), bunker, { pool });
const timeout = setTimeout(() => {
  console.error('no answer from the bunker within 15 s (is keycast running, and its relay reachable?)');
  process.exit(1);
}, 15000);
await signer.connect();
const pubkey = await signer.getPublicKey();
const event = await signer.signEvent({ kind: 1, content, tags: [], created_at: Math.floor(Date.now() / 1000) });
clearTimeout(timeout);
console.log(JSON.stringify({ pubkey, event, verified: verifyEvent(event) && event.pubkey === pubkey }));
await signer.close();
pool.destroy();
process.exit(0);
