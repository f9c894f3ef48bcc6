#!/usr/bin/env bash
# NIP-46 `sign_event` round trip (client -> relay -> keycast -> relay -> client), sequential,
# on loopback: a release keycast, a bunker URL from a real OAuth + PKCE flow, and
#   1. keycast-bench nip46: a native (Rust) client, next to the relay's own echo time;
#   2. nostr-tools BunkerSigner (the real JS client), its own crypto included;
#   3. NDK's NDKNip46Signer (tests/js/ndk-client.mjs), its own crypto included;
#   4. rust-nostr's NostrConnect (keycast-bench nip46-connect).
# Each through keycast's embedded relay and through the external PyPI nostr-relay.
#   bench/nip46.sh        # prints JSON lines; NIP46_N (default 500) requests each
# NIP46_DATABASE_URL=postgres://... runs keycast on that PostgreSQL database instead of SQLite
# (no replica then); every line names its engine. NIP46_CLIENTS (default "native nostr-tools
# ndk rust-nostr") picks the clients. KEYCAST_BIN/KEYCAST_BENCH_BIN: binaries to run instead
# of building them.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
export KEYCAST_PEERS_DIR="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
scripts/install-peers.sh >&2
# shellcheck disable=SC1091
. "$KEYCAST_PEERS_DIR/env.sh"
if [ -z "${KEYCAST_BIN:-}" ]; then cargo build --release -p keycast -p keycast-bench >&2; fi
KEYCAST="${KEYCAST_BIN:-$CARGO_TARGET_DIR/release/keycast}"
BENCH="${KEYCAST_BENCH_BIN:-$CARGO_TARGET_DIR/release/keycast-bench}"
N="${NIP46_N:-500}"
CLIENTS=" ${NIP46_CLIENTS:-native nostr-tools ndk rust-nostr} "

WORK=$(mktemp -d /var/tmp/keycast-nip46-bench.XXXXXX)
if [ -n "${NIP46_DATABASE_URL:-}" ]; then
  ENGINE=postgresql
  STORAGE=(DATABASE_URL="$NIP46_DATABASE_URL")
else
  ENGINE=sqlite
  STORAGE=(KEYCAST_REPLICA_URL="file://$WORK/replica")
fi
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The external relay (PyPI nostr-relay), configured as the harness does.
RELAY_PORT=$(free_port)
CFG=$(ls "$KEYCAST_PEERS_DIR"/venv/lib/python3*/site-packages/nostr_relay/config.yaml | head -1)
sed -e "s|sqlite+aiosqlite:///nostr.sqlite3|sqlite+aiosqlite:///$WORK/relay.sqlite3|" \
    -e "s|  bind: 127.0.0.1:6969|  bind: 127.0.0.1:$RELAY_PORT\n  control_socket_disable: true|" "$CFG" >"$WORK/relay.yaml"
nostr-relay -c "$WORK/relay.yaml" serve >"$WORK/relay.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -fs -H 'Accept: application/nostr+json' "http://127.0.0.1:$RELAY_PORT/" >/dev/null && break; sleep 0.1; done

# One keycast; bunkers listen on both relays; each run gets a bunker URL naming its relay.
PORT=$(free_port)
EMBEDDED_PORT=$(free_port)
env -u DATABASE_URL -u KEYCAST_REPLICA_URL "${STORAGE[@]}" PORT="$PORT" KEYCAST_BIND=127.0.0.1 KEYCAST_DATA_DIR="$WORK/data" \
  KEYCAST_LOG=warn KEYCAST_TEST_ROUTES=true KEYCAST_MASTER_KEY="$(head -c 32 /dev/urandom | base64)" \
  KEYCAST_EMBEDDED_RELAY=true KEYCAST_EMBEDDED_RELAY_ADDR="127.0.0.1:$EMBEDDED_PORT" \
  BUNKER_RELAYS="ws://127.0.0.1:$EMBEDDED_PORT,ws://127.0.0.1:$RELAY_PORT" \
  "$KEYCAST" serve >"$WORK/out.log" 2>"$WORK/err.log" &
PIDS+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null || { echo "nip46.sh: keycast not ready after 10 s:" >&2; cat "$WORK/err.log" >&2; exit 1; }
# Tags every JSON line with the relay, the engine and (if not already named) the client.
tag() { python3 -c "import json,sys; [print(json.dumps({'client': '$2', **json.loads(l), 'relay_kind': '$1', 'engine': '$ENGINE'})) for l in sys.stdin]"; }

# A JS client's answers (connect, bench, close) as one result line; a client that failed
# (no bench answer, or one not ok) gives an error line naming what it said, and the run goes on.
# Usage: js_result CLIENT [wire]; JS_STDERR names a file holding the client's stderr, if kept.
js_result() { python3 -c '
import json, os, sys
r = [json.loads(l) for l in sys.stdin if l.strip()]
exit_code = [x for x in r if "node_exit" in x]
r = [x for x in r if "node_exit" not in x] + [x for x in exit_code if x["node_exit"] != 0]
b = r[1] if len(r) > 1 else None
if not b or not b.get("ok"):
    print(json.dumps({"bench": "nip46", "error": "client failed: %s" % json.dumps(r)[:300]}))
    print("nip46.sh: the %s client failed: %s" % (sys.argv[1], r), file=sys.stderr)
    err = os.environ.get("JS_STDERR")
    if err and os.path.exists(err):
        print("nip46.sh: its stderr ends:\n" + open(err).read()[-2000:], file=sys.stderr)
else:
    out = {"bench": "nip46", "sign_event_round_trip_ms": {k: b[k] for k in ("p50", "p99", "mean")}}
    if sys.argv[2:] == ["wire"]:
        out["wire_ms"] = b["wire"]
    print(json.dumps(out))
' "$@"; }

for relay in "ws://127.0.0.1:$EMBEDDED_PORT" "ws://127.0.0.1:$RELAY_PORT"; do
  name=$([ "$relay" = "ws://127.0.0.1:$EMBEDDED_PORT" ] && echo embedded || echo nostr-relay)
  # A fresh grant per client: a bunker binds the first client that connects.
  only() { python3 -c 'import sys, urllib.parse as u; url, keep = sys.argv[1], sys.argv[2]
pk, q = url.split("?", 1); p = [(k, v) for k, v in u.parse_qsl(q) if k != "relay" or v == keep]
print(pk + "?" + u.urlencode(p))' "$1" "$relay"; }
  if [[ $CLIENTS == *" native "* ]]; then
    BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
    { "$BENCH" nip46 --bunker "$BUNKER" --n "$N" || echo '{"error":"native client failed"}'; } | tag "$name" native
  fi
  if [[ $CLIENTS == *" nostr-tools "* ]]; then
    BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
    printf '%s\n' "{\"op\":\"connect\",\"bunker\":\"$BUNKER\"}" "{\"op\":\"bench\",\"n\":$N,\"warmup\":20,\"timeout_ms\":600000}" '{"op":"close"}' |
      { rc=0; node crates/keycast/tests/js/bunker-client.mjs || rc=$?; echo "{\"node_exit\": $rc}"; } |
      js_result nostr-tools wire |
      tag "$name" nostr-tools
  fi
  if [[ $CLIENTS == *" ndk "* ]]; then
    BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
    printf '%s\n' "{\"op\":\"connect\",\"bunker\":\"$BUNKER\",\"timeout_ms\":20000}" "{\"op\":\"bench\",\"n\":$N,\"warmup\":20,\"timeout_ms\":600000}" '{"op":"close"}' |
      { rc=0; node crates/keycast/tests/js/ndk-client.mjs 2>"$WORK/ndk.err" || rc=$?; echo "{\"node_exit\": $rc}"; } |
      JS_STDERR="$WORK/ndk.err" js_result ndk |
      tag "$name" ndk
  fi
  if [[ $CLIENTS == *" rust-nostr "* ]]; then
    BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
    { "$BENCH" nip46-connect --bunker "$BUNKER" --n "$N" || echo '{"error":"rust-nostr client failed"}'; } | tag "$name" rust-nostr
  fi
done
