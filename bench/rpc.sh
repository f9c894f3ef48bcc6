#!/usr/bin/env bash
# HTTP RPC `sign_event` throughput and latency: a release keycast on loopback, a token from a
# real OAuth + PKCE flow, and wrk with 50 connections for RPC_SECONDS (default 15).
# KEYCAST_BIN: a keycast binary to run instead of building one.
#   bench/rpc.sh            # prints JSON lines: the server's footprint idle, the wrk result,
#                           # its footprint after the load (peak RSS included), and the same
#                           # wrk against /healthz/live (the HTTP stack alone) as a reference
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
if [ -z "${KEYCAST_BIN:-}" ]; then cargo build --release -p keycast >&2; fi
KEYCAST="${KEYCAST_BIN:-$CARGO_TARGET_DIR/release/keycast}"
WORK=$(mktemp -d /var/tmp/keycast-rpc-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
env -u KEYCAST_REPLICA_URL PORT="$PORT" KEYCAST_BIND=127.0.0.1 KEYCAST_DATA_DIR="$WORK/data" \
  KEYCAST_REPLICA_URL="file://$WORK/replica" KEYCAST_LOG=warn KEYCAST_TEST_ROUTES=true KEYCAST_EMBEDDED_RELAY_ADDR=127.0.0.1:0 \
  KEYCAST_MASTER_KEY="$(head -c 32 /dev/urandom | base64)" \
  "$KEYCAST" serve >"$WORK/out.log" 2>"$WORK/err.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null || { echo "rpc.sh: keycast not ready after 30 s:" >&2; cat "$WORK/err.log" >&2; exit 1; }
TOKEN=$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT")
export TOKEN
# Resident memory (VmRSS now, VmHWM the peak) and database + WAL bytes of the server.
footprint() {
  python3 - "$PID" "$WORK/data/keycast.db" "$1" <<'PY'
import json, os, sys
pid, db, phase = sys.argv[1], sys.argv[2], sys.argv[3]
status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status"))
kib = lambda k: int(status[k].split()[0])
size = lambda p: os.path.getsize(p) if os.path.exists(p) else 0
print(json.dumps({"bench": "rpc-footprint", "phase": phase, "rss_kib": kib("VmRSS"),
                  "peak_rss_kib": kib("VmHWM"), "db_bytes": size(db), "wal_bytes": size(db + "-wal")}))
PY
}
footprint idle
# Warm-up, then the measured run.
wrk -t2 -c50 -d3s -s bench/rpc/sign.lua "http://127.0.0.1:$PORT/api/nostr" >/dev/null
wrk -t2 -c50 -d"${RPC_SECONDS:-15}s" --latency -s bench/rpc/sign.lua "http://127.0.0.1:$PORT/api/nostr" | grep '^{'
footprint after-load
# The reference in the same run: the same server's liveness probe, same connections and time.
wrk -t2 -c50 -d"${RPC_SECONDS:-15}s" --latency -s bench/rpc/plain.lua "http://127.0.0.1:$PORT/healthz/live" | grep '^{'
