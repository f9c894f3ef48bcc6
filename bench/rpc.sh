#!/usr/bin/env bash
# HTTP RPC `sign_event` throughput and latency: a release keycast on loopback, a token from a
# real OAuth + PKCE flow, and wrk with 50 connections for RPC_SECONDS (default 15).
#   bench/rpc.sh            # prints one JSON line
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -p keycast >&2
WORK=$(mktemp -d /var/tmp/keycast-rpc-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
env -u KEYCAST_REPLICA_URL PORT="$PORT" KEYCAST_BIND=127.0.0.1 KEYCAST_DATA_DIR="$WORK/data" \
  KEYCAST_REPLICA_URL="file://$WORK/replica" KEYCAST_LOG=warn KEYCAST_TEST_ROUTES=true \
  KEYCAST_MASTER_KEY="$(head -c 32 /dev/urandom | base64)" \
  "$CARGO_TARGET_DIR/release/keycast" serve >"$WORK/out.log" 2>"$WORK/err.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null && break; sleep 0.1; done
TOKEN=$(python3 bench/rpc/flow.py "http://127.0.0.1:$PORT")
export TOKEN
# Warm-up, then the measured run.
wrk -t2 -c50 -d3s -s bench/rpc/sign.lua "http://127.0.0.1:$PORT/api/nostr" >/dev/null
wrk -t2 -c50 -d"${RPC_SECONDS:-15}s" --latency -s bench/rpc/sign.lua "http://127.0.0.1:$PORT/api/nostr" | grep '^{'
