#!/usr/bin/env bash
# NIP-46 `sign_event` round trip (client -> relay -> keycast -> relay -> client), sequential,
# on loopback: a release keycast, a bunker URL from a real OAuth + PKCE flow, and
#   1. keycast-bench nip46: a native (Rust) client, next to the relay's own echo time;
#   2. nostr-tools BunkerSigner (the real JS client), its own crypto included;
#   3. NDK's NDKNip46Signer (tests/js/ndk-client.mjs), its own crypto included;
#   4. rust-nostr's NostrConnect (keycast-bench nip46-connect).
# Each through keycast's embedded relay and through the external PyPI nostr-relay.
#   bench/nip46.sh        # prints JSON lines; NIP46_N (default 500) requests each
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
export KEYCAST_PEERS_DIR="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
scripts/install-peers.sh >&2
# shellcheck disable=SC1091
. "$KEYCAST_PEERS_DIR/env.sh"
cargo build --release -p keycast -p keycast-bench >&2
N="${NIP46_N:-500}"
WORK=$(mktemp -d /var/tmp/keycast-nip46-bench.XXXXXX)
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
PORT="$PORT" KEYCAST_BIND=127.0.0.1 KEYCAST_DATA_DIR="$WORK/data" KEYCAST_REPLICA_URL="file://$WORK/replica" \
  KEYCAST_LOG=warn KEYCAST_TEST_ROUTES=true KEYCAST_MASTER_KEY="$(head -c 32 /dev/urandom | base64)" \
  KEYCAST_EMBEDDED_RELAY=true KEYCAST_EMBEDDED_RELAY_ADDR="127.0.0.1:$EMBEDDED_PORT" \
  BUNKER_RELAYS="ws://127.0.0.1:$EMBEDDED_PORT,ws://127.0.0.1:$RELAY_PORT" \
  "$CARGO_TARGET_DIR/release/keycast" serve >"$WORK/out.log" 2>"$WORK/err.log" &
PIDS+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null && break; sleep 0.1; done

for relay in "ws://127.0.0.1:$EMBEDDED_PORT" "ws://127.0.0.1:$RELAY_PORT"; do
  name=$([ "$relay" = "ws://127.0.0.1:$EMBEDDED_PORT" ] && echo embedded || echo nostr-relay)
  # A fresh grant per client: a bunker binds the first client that connects.
  only() { python3 -c 'import sys, urllib.parse as u; url, keep = sys.argv[1], sys.argv[2]
pk, q = url.split("?", 1); p = [(k, v) for k, v in u.parse_qsl(q) if k != "relay" or v == keep]
print(pk + "?" + u.urlencode(p))' "$1" "$relay"; }
  BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
  { "$CARGO_TARGET_DIR/release/keycast-bench" nip46 --bunker "$BUNKER" --n "$N" || echo '{"error":"native client failed"}'; } |
    python3 -c "import json,sys; [print(json.dumps({**json.loads(l), 'relay_kind': '$name', 'client': 'native'})) for l in sys.stdin]"
  BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
  printf '%s\n' "{\"op\":\"connect\",\"bunker\":\"$BUNKER\"}" "{\"op\":\"bench\",\"n\":$N,\"warmup\":20,\"timeout_ms\":600000}" '{"op":"close"}' |
    node crates/keycast/tests/js/bunker-client.mjs |
    python3 -c "import json,sys; r=[json.loads(l) for l in sys.stdin]; b=r[1]; assert b['ok'], b; print(json.dumps({'bench': 'nip46', 'relay_kind': '$name', 'client': 'nostr-tools', 'sign_event_round_trip_ms': {k: b[k] for k in ('p50','p99','mean')}, 'wire_ms': b['wire']}))"
  BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
  printf '%s\n' "{\"op\":\"connect\",\"bunker\":\"$BUNKER\",\"timeout_ms\":20000}" "{\"op\":\"bench\",\"n\":$N,\"warmup\":20,\"timeout_ms\":600000}" '{"op":"close"}' |
    KEYCAST_NDK_DIR="$KEYCAST_PEERS_DIR/ndk" node crates/keycast/tests/js/ndk-client.mjs 2>/dev/null |
    python3 -c "import json,sys; r=[json.loads(l) for l in sys.stdin]; b=r[1]; assert b['ok'], r; print(json.dumps({'bench': 'nip46', 'relay_kind': '$name', 'client': 'ndk', 'sign_event_round_trip_ms': {k: b[k] for k in ('p50','p99','mean')}}))"
  BUNKER=$(only "$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT" bunker_url)")
  { "$CARGO_TARGET_DIR/release/keycast-bench" nip46-connect --bunker "$BUNKER" --n "$N" || echo '{"error":"rust-nostr client failed"}'; } |
    python3 -c "import json,sys; [print(json.dumps({**json.loads(l), 'relay_kind': '$name'})) for l in sys.stdin]"
done
