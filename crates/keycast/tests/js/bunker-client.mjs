// A long-lived NIP-46 client for keycast's tests: nostr-tools' BunkerSigner, driven over
// stdin/stdout so a Rust test can play the part of an app that pasted a bunker:// URL.
//
// Protocol: one JSON command per stdin line, one JSON reply per stdout line, in order.
// Every reply has `ok`, `ms` (round-trip milliseconds) and either the op's result fields
// or `error` (the remote signer's error string, or "timeout" after `timeout_ms`, default
// 5000). Ops:
//
//   {"op":"connect","bunker":"bunker://…","client_sk":"<hex, optional>","handshake":true}
//       → {client_pubkey, bunker_pubkey, relays}; sends NIP-46 `connect` with the secret
//       unless handshake is false (to try requests from a client that never connected)
//   {"op":"get_public_key"}                        → {pubkey}
//   {"op":"sign_event","event":{kind,content,tags,created_at}} → {event, verified}
//   {"op":"nip44_encrypt"|"nip44_decrypt"|"nip04_encrypt"|"nip04_decrypt","peer":hex,"text":…}
//       → {result}
//   {"op":"ping"}                                  → {result:"pong"}
//   {"op":"switch_relays"}                         → {switched, relays}
//   {"op":"logout"}                                → {}
//   {"op":"raw","method":…,"params":[…]}           → {result}  (any method, e.g. unknown ones)
//   {"op":"nostrconnect","relays":[…],"secret":…,"client_sk":…} → {uri, client_pubkey}; then
//   {"op":"nostrconnect_wait"}                     → {bunker_pubkey, relays} once the signer answered
//   {"op":"start_sign_event","event":{…}}          → {} at once; the request stays pending
//   {"op":"start","method":…,"params":[…]}          → {} at once, any method (finish: {result})
//   {"op":"auth_url"}                              → {url} once the signer answered a pending
//       request with NIP-46 `auth_url` (BunkerSigner's `onauth` callback); urls queue up
//   {"op":"finish_sign_event"}                     → {event, verified}: the pending request's
//       real response (BunkerSigner matches it by the request's id), or its error
//   {"op":"bench","n":N,"warmup":W}                → {n, p50, p99, mean, min, max, wire:{…}}
//       sequential sign_events in ms: as the app sees them, and `wire` from publishing the
//       signed request to the answer's arrival (without the client's own signing/verifying)
//   {"op":"close"}                                 → {} and the process exits
//
// Modules are resolved from $KEYCAST_NOSTR_TOOLS_DIR (nostr-tools and ws installed by
// scripts/install-peers.sh). Node 20 has no global WebSocket, and nostr-tools/nip46 bundles
// its own SimplePool, so the signer is given a pool built from nostr-tools/pool with `ws`.

import { createRequire } from 'node:module';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

import { approvals } from './approval.mjs';

const require = createRequire(join(process.env.KEYCAST_NOSTR_TOOLS_DIR ?? '.', 'package.json'));
const WebSocket = require('ws');
const { SimplePool, useWebSocketImplementation } = require('nostr-tools/pool');
const { BunkerSigner, parseBunkerInput, createNostrConnectURI } = require('nostr-tools/nip46');
const { generateSecretKey, getPublicKey, verifyEvent } = require('nostr-tools/pure');

useWebSocketImplementation(WebSocket);

// Replies own stdout; anything nostr-tools logs goes to stderr.
console.log = console.error;

const DEFAULT_TIMEOUT_MS = 5000;

// Wire timing for bench: when the signed request went to the pool, and when the first event
// after it arrived (before the pool verifies it). nostr-tools signs and verifies in pure JS
// (several ms each on this machine), so this separates relay + signer time from the client's
// own crypto.
const wire = { sent: 0, received: 0 };
const pool = new SimplePool({
  verifyEvent(event) {
    if (!wire.received) wire.received = performance.now();
    return verifyEvent(event);
  },
});
const publish = pool.publish.bind(pool);
pool.publish = (...args) => {
  wire.sent = performance.now();
  wire.received = 0;
  return publish(...args);
};
let signer = null;
let pendingConnect = null;
// auth_url callbacks (`onauth`) and the request started by `start_sign_event` or `start`.
const approval = approvals();
const onauth = approval.onauth;

const hexToBytes = (hex) => Uint8Array.from(Buffer.from(hex, 'hex'));
const clientKey = (hex) => (hex ? hexToBytes(hex) : generateSecretKey());

function needSigner() {
  if (!signer) throw new Error('not connected: send connect first');
  return signer;
}

async function replaceSigner(next) {
  if (signer) await signer.close();
  signer = next;
}

async function signEvent(event) {
  const unsigned = { kind: 1, content: '', tags: [], created_at: Math.floor(Date.now() / 1000), ...event };
  // sendRequest rather than signer.signEvent(), which throws on a bad signature: the test
  // should see what came back and judge it.
  const signed = JSON.parse(await needSigner().sendRequest('sign_event', [JSON.stringify(unsigned)]));
  return { event: signed, verified: verifyEvent(signed) };
}

function stats(times) {
  const sorted = [...times].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
  const round = (x) => Math.round(x * 100) / 100;
  const mean = sorted.reduce((a, b) => a + b, 0) / sorted.length;
  return { p50: round(at(0.5)), p99: round(at(0.99)), mean: round(mean), min: round(sorted[0]), max: round(sorted.at(-1)) };
}

async function bench({ n = 100, warmup = 5 }) {
  for (let i = 0; i < warmup; i++) await signEvent({ content: `warmup ${i}` });
  const total = [];
  const onWire = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    const { verified } = await signEvent({ content: `bench ${i}` });
    if (!verified) throw new Error(`bench event ${i} did not verify`);
    total.push(performance.now() - started);
    onWire.push(wire.received - wire.sent);
  }
  return { n, ...stats(total), wire: stats(onWire) };
}

const ops = {
  async connect({ bunker, client_sk, handshake = true }) {
    const bp = await parseBunkerInput(bunker);
    if (!bp) throw new Error(`not a bunker URL: ${bunker}`);
    const sk = clientKey(client_sk);
    await replaceSigner(BunkerSigner.fromBunker(sk, bp, { pool, onauth }));
    if (handshake) await signer.connect();
    return { client_pubkey: getPublicKey(sk), bunker_pubkey: bp.pubkey, relays: bp.relays };
  },
  async get_public_key() {
    // BunkerSigner caches the key; clear it so every call is a round trip to the signer.
    needSigner().cachedPubKey = undefined;
    return { pubkey: await signer.getPublicKey() };
  },
  sign_event: ({ event }) => signEvent(event ?? {}),
  start_sign_event: ({ event }) => approval.begin(signEvent(event ?? {})),
  start: ({ method, params = [] }) =>
    approval.begin(needSigner().sendRequest(method, params).then((result) => ({ result }))),
  auth_url: () => approval.authUrl(),
  finish_sign_event: () => approval.finish(),
  nip44_encrypt: async ({ peer, text }) => ({ result: await needSigner().nip44Encrypt(peer, text) }),
  nip44_decrypt: async ({ peer, text }) => ({ result: await needSigner().nip44Decrypt(peer, text) }),
  nip04_encrypt: async ({ peer, text }) => ({ result: await needSigner().nip04Encrypt(peer, text) }),
  nip04_decrypt: async ({ peer, text }) => ({ result: await needSigner().nip04Decrypt(peer, text) }),
  async ping() {
    await needSigner().ping();
    return { result: 'pong' };
  },
  async switch_relays() {
    const switched = await needSigner().switchRelays();
    return { switched, relays: signer.bp.relays };
  },
  async logout() {
    await needSigner().logout();
    return {};
  },
  raw: async ({ method, params = [] }) => ({ result: await needSigner().sendRequest(method, params) }),
  async nostrconnect({ relays, secret, perms, name = 'keycast-tests', client_sk }) {
    const sk = clientKey(client_sk);
    secret ??= Buffer.from(generateSecretKey()).toString('hex').slice(0, 16);
    const uri = createNostrConnectURI({ clientPubkey: getPublicKey(sk), relays, secret, perms, name });
    // fromURI resolves once the signer answers with the secret (and, unless told otherwise,
    // after asking it to `switch_relays`); nostrconnect_wait collects it.
    pendingConnect = BunkerSigner.fromURI(sk, uri, { pool });
    pendingConnect.catch(() => {});
    // An app shows the URI once it listens: the signer's answer is ephemeral, and a relay
    // does not keep it for a subscription that arrives later. fromURI gives no sign of that,
    // so a second subscription on the same connection, sent after fromURI's, is waited for:
    // its EOSE means the relay has taken fromURI's REQ too.
    await new Promise((resolve, reject) => {
      const probe = pool.subscribe(relays, { ids: ['0'.repeat(64)], limit: 1 }, {
        oneose: () => { probe.close(); resolve(); },
        onclose: (reasons) => reject(new Error(`relay closed the probe: ${reasons}`)),
      });
    });
    return { uri, client_pubkey: getPublicKey(sk), secret };
  },
  async nostrconnect_wait() {
    if (!pendingConnect) throw new Error('no nostrconnect in progress');
    await replaceSigner(await pendingConnect);
    pendingConnect = null;
    return { bunker_pubkey: signer.bp.pubkey, relays: signer.bp.relays };
  },
  bench,
  async close() {
    if (signer) await signer.close();
    pool.destroy();
    return {};
  },
};

function errorText(err) {
  if (typeof err === 'string') return err;
  if (err instanceof AggregateError) return err.errors.map(errorText).join('; ');
  return err?.message ?? String(err);
}

async function run(cmd) {
  const started = performance.now();
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('timeout')), cmd.timeout_ms ?? DEFAULT_TIMEOUT_MS);
  });
  let reply;
  try {
    const op = ops[cmd.op];
    if (!op) throw new Error(`unknown op: ${cmd.op}`);
    reply = { ok: true, ...(await Promise.race([op(cmd), timeout])) };
  } catch (err) {
    reply = { ok: false, error: errorText(err) };
  } finally {
    clearTimeout(timer);
  }
  reply.ms = Math.round((performance.now() - started) * 100) / 100;
  process.stdout.write(JSON.stringify(reply) + '\n');
}

// Commands run one at a time, in order, so replies line up with commands.
let queue = Promise.resolve();
const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  if (!line.trim()) return;
  queue = queue.then(async () => {
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (err) {
      process.stdout.write(JSON.stringify({ ok: false, error: `bad JSON: ${err.message}`, ms: 0 }) + '\n');
      return;
    }
    await run(cmd);
    if (cmd.op === 'close') process.exit(0);
  });
});
lines.on('close', () => queue.then(() => process.exit(0)));
