// A long-lived NIP-46 client for keycast's tests: NDK's NDKNip46Signer (npm
// @nostr-dev-kit/ndk, the toolkit many Nostr web apps are built on), driven over
// stdin/stdout with the same protocol and ops as bunker-client.mjs, so a Rust test can run
// one scenario against either library.
//
// One JSON command per stdin line, one JSON reply per stdout line, in order; every reply has
// `ok`, `ms` and the op's fields or `error` ("timeout" after `timeout_ms`, default 5000).
// What NDK does on its own is what apps get: `connect` is `bunker(ndk, url, localSigner)` +
// `blockUntilReady()`, which sends `connect` with params ["", secret] (NDK leaves the first
// parameter empty when the URL names no user), then `get_public_key` and `switch_relays`.
// Ops as in bunker-client.mjs (`start_sign_event`, `auth_url` and `finish_sign_event` with
// NDK's `authUrl` event in place of BunkerSigner's `onauth`), plus:
//   {"op":"nip05_start","address":"name@domain","http_base":"http://127.0.0.1:PORT"}
//       → {} once started: NDK fetches https://domain/.well-known/nostr.json (routed to
//       http_base: a loopback test has no TLS) and connects to the `nip46` relays it names;
//   {"op":"nip05_wait"} → {auth_url} when the signer sent one, or {user_pubkey} once ready.
// NDK has no ping/logout method and its switchRelays is private, so those go through its
// own RPC (`signer.rpc.sendRequest`), as an app would call them.
//
// Modules are resolved from $KEYCAST_NDK_DIR (NDK and ws installed by install-peers.sh).
// Node 20 has no global WebSocket; NDK needs one before it is loaded.

import { createRequire } from 'node:module';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

import { approvals } from './approval.mjs';
import { pathToFileURL } from 'node:url';

const dir = process.env.KEYCAST_NDK_DIR ?? '.';
const require = createRequire(join(dir, 'package.json'));
globalThis.WebSocket = require('ws');
// NDK's ESM build (its CommonJS one is what `require` would pick).
const ndkModule = join(dir, 'node_modules/@nostr-dev-kit/ndk/dist/index.mjs');
const { default: NDK, NDKNip46Signer, NDKPrivateKeySigner, NDKEvent, NDKUser } = await import(
  pathToFileURL(ndkModule).href
);
const { verifyEvent, generateSecretKey, getPublicKey } = require('nostr-tools/pure');

console.log = console.error;
const DEFAULT_TIMEOUT_MS = 5000;

let ndk = null;
let signer = null;
let pending = null;
let authUrl = null;
// authUrl events and the sign_event started by `start_sign_event`.
const approval = approvals();
function onauth(url) {
  authUrl = url;
  approval.onauth(url);
}

const randomHex = () => Buffer.from(generateSecretKey()).toString('hex');

function fresh(httpBase) {
  if (signer) signer.stop();
  ndk = new NDK({});
  if (httpBase) {
    // NIP-05 is always https://<domain>/; a loopback keycast serves plain http.
    ndk.httpFetch = (url, opts) => fetch(url.replace(/^https:\/\/[^/]+/, httpBase), opts);
  }
  authUrl = null;
  approval.reset();
}

function needSigner() {
  if (!signer?.bunkerPubkey) throw new Error('not connected: send connect first');
  return signer;
}

// One request through NDK's own RPC, resolving with the result or rejecting with the error.
function request(method, params = []) {
  const s = needSigner();
  return new Promise((resolve, reject) => {
    s.rpc
      .sendRequest(s.bunkerPubkey, method, params, 24133, (r) => (r.error ? reject(r.error) : resolve(r.result)))
      .catch(reject);
  });
}

async function signEvent(event) {
  const s = needSigner();
  const e = new NDKEvent(ndk, { kind: 1, content: '', tags: [], created_at: Math.floor(Date.now() / 1000), ...event });
  await e.sign(s); // NDK fills in the user's pubkey and asks the bunker for the signature
  const raw = e.rawEvent();
  return { event: raw, verified: verifyEvent(raw) };
}

function stats(times) {
  const sorted = [...times].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
  const round = (x) => Math.round(x * 100) / 100;
  const mean = sorted.reduce((a, b) => a + b, 0) / sorted.length;
  return { p50: round(at(0.5)), p99: round(at(0.99)), mean: round(mean), min: round(sorted[0]), max: round(sorted.at(-1)) };
}

const peer = (pubkey) => new NDKUser({ pubkey });

const ops = {
  async connect({ bunker, client_sk, handshake = true }) {
    fresh();
    const sk = client_sk ?? randomHex();
    signer = NDKNip46Signer.bunker(ndk, bunker, new NDKPrivateKeySigner(sk));
    signer.on('authUrl', onauth);
    // Without the handshake, only listen (to try requests from a client that is not bound).
    await (handshake ? signer.blockUntilReady() : signer.startListening());
    return { client_pubkey: getPublicKey(Buffer.from(sk, 'hex')), bunker_pubkey: signer.bunkerPubkey, relays: signer.relayUrls };
  },
  get_public_key: async () => ({ pubkey: await request('get_public_key') }),
  sign_event: ({ event }) => signEvent(event ?? {}),
  start_sign_event: ({ event }) => approval.begin(signEvent(event ?? {})),
  auth_url: () => approval.authUrl(),
  finish_sign_event: () => approval.finish(),
  nip44_encrypt: async ({ peer: p, text }) => ({ result: await needSigner().encrypt(peer(p), text, 'nip44') }),
  nip44_decrypt: async ({ peer: p, text }) => ({ result: await needSigner().decrypt(peer(p), text, 'nip44') }),
  nip04_encrypt: async ({ peer: p, text }) => ({ result: await needSigner().encrypt(peer(p), text, 'nip04') }),
  nip04_decrypt: async ({ peer: p, text }) => ({ result: await needSigner().decrypt(peer(p), text, 'nip04') }),
  ping: async () => ({ result: await request('ping') }),
  async switch_relays() {
    const result = await request('switch_relays');
    return { switched: result, relays: JSON.parse(result ?? 'null') };
  },
  logout: async () => ({ result: await request('logout') }),
  raw: async ({ method, params = [] }) => ({ result: await request(method, params) }),
  async nostrconnect({ relays, perms, name = 'keycast-tests', client_sk }) {
    fresh();
    const sk = client_sk ?? randomHex();
    const options = { name, url: 'https://app.example', ...(perms ? { perms: perms.join(',') } : {}) };
    signer = NDKNip46Signer.nostrconnect(ndk, relays[0], new NDKPrivateKeySigner(sk), options);
    // An app shows the URI once it listens (the signer's answer is ephemeral: a relay does
    // not keep it for a subscription that comes later).
    await signer.startListening();
    pending = signer.blockUntilReady();
    pending.catch(() => {});
    return { uri: signer.nostrConnectUri, client_pubkey: getPublicKey(Buffer.from(sk, 'hex')) };
  },
  async nostrconnect_wait() {
    if (!pending) throw new Error('no nostrconnect in progress');
    const user = await pending;
    pending = null;
    return { bunker_pubkey: signer.bunkerPubkey, user_pubkey: user.pubkey, relays: signer.relayUrls };
  },
  nip05_start({ address, http_base, client_sk }) {
    fresh(http_base);
    signer = NDKNip46Signer.bunker(ndk, address, new NDKPrivateKeySigner(client_sk ?? randomHex()));
    signer.on('authUrl', onauth);
    pending = signer.blockUntilReady();
    pending.catch(() => {});
    return {};
  },
  async nip05_wait() {
    if (!pending) throw new Error('no NIP-05 login in progress');
    const done = pending.then((user) => ({ user_pubkey: user.pubkey, bunker_pubkey: signer.bunkerPubkey }));
    for (;;) {
      if (authUrl) return { auth_url: authUrl, relays: signer.relayUrls };
      const ready = await Promise.race([done, new Promise((r) => setTimeout(r, 20))]);
      if (ready) {
        pending = null;
        return ready;
      }
    }
  },
  async bench({ n = 100, warmup = 5 }) {
    for (let i = 0; i < warmup; i++) await signEvent({ content: `warmup ${i}` });
    const total = [];
    for (let i = 0; i < n; i++) {
      const started = performance.now();
      const { verified } = await signEvent({ content: `bench ${i}` });
      if (!verified) throw new Error(`bench event ${i} did not verify`);
      total.push(performance.now() - started);
    }
    return { n, ...stats(total) };
  },
  async close() {
    if (signer) signer.stop();
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

// NDK rejects some promises nobody awaits (a publish that got no OK); the op's own timeout
// reports what matters.
process.on('unhandledRejection', (err) => console.error('unhandled rejection:', errorText(err)));

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
