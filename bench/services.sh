#!/usr/bin/env bash
# Durable commit, HTTP RPC and NIP-46 benchmarks in one run, on the release binaries: writes
# the raw JSON lines to bench/results/services-<time>.jsonl and the tables generated from them
# (bench/services_report.py) into BENCHMARKS.md between the "services" markers.
#
#   bench/services.sh                 the full run (about 6 minutes on 2 cores)
#   SERVICES_QUICK=1 bench/services.sh   a smoke run; the tables go to $WORK/SERVICES.quick.md
#
# Every figure is paired with a reference measured in the same run, since the machine is
# shared: the durable commit with the store's own create-only PUT (same client, same loop);
# RPC `sign_event` with the same server's /healthz/live; the NIP-46 round trip with the
# relay's own echo (one hop); PostgreSQL with SQLite. Environment: CARGO_TARGET_DIR,
# KEYCAST_PEERS_DIR [/var/tmp/keycast-peers], DURABLE_COMMITS [1000], RPC_SECONDS [15],
# NIP46_N [300], SERVICES_POSTGRES [1], SERVICES_SKIP_BUILD [0] (1: run the release binaries
# already in the target dir, and say when each was built).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
COMMAND_LINE="$(env | grep -E '^(SERVICES_[A-Z0-9_]+|DURABLE_COMMITS|RPC_SECONDS|NIP46_N|CARGO_TARGET_DIR)=' | sort | tr '\n' ' ')bench/services.sh"
QUICK="${SERVICES_QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  DURABLE_COMMITS="${DURABLE_COMMITS:-100}"; export RPC_SECONDS="${RPC_SECONDS:-3}" NIP46_N="${NIP46_N:-30}"
else
  DURABLE_COMMITS="${DURABLE_COMMITS:-1000}"; export RPC_SECONDS="${RPC_SECONDS:-15}" NIP46_N="${NIP46_N:-300}"
fi
PEERS="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
export KEYCAST_PEERS_DIR="$PEERS"
say() { echo "services.sh: $*" >&2; }

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BUILT=""
if [ "${SERVICES_SKIP_BUILD:-0}" = 1 ]; then
  # Takes the binaries already in $TARGET as they are, and says when each was built.
  BUILT=", binaries not rebuilt (SERVICES_SKIP_BUILD=1): keycast-bench built $(date -u -r "$TARGET/release/keycast-bench" +%H:%M:%SZ), keycast built $(date -u -r "$TARGET/release/keycast" +%H:%M:%SZ)"
else
  say "building release binaries"
  cargo build --release -p keycast -p keycast-bench >&2
fi
export KEYCAST_BIN="$TARGET/release/keycast" KEYCAST_BENCH_BIN="$TARGET/release/keycast-bench"
# shellcheck disable=SC1091
. "$PEERS/env.sh"
unset AWS_CA_BUNDLE

RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
WORK="$(mktemp -d /var/tmp/keycast-services.XXXXXX)"
if [ "$QUICK" = 1 ]; then RESULTS="$WORK/services-$RUN_ID.jsonl"; else RESULTS="$ROOT/bench/results/services-$RUN_ID.jsonl"; fi
mkdir -p "$(dirname "$RESULTS")"
if git diff --quiet HEAD -- crates Cargo.lock bench 2>/dev/null; then DIRTY=""; else DIRTY=" + uncommitted changes"; fi
python3 - "$RESULTS" "$(git rev-parse --short HEAD)$DIRTY$BUILT" "$COMMAND_LINE" <<'PY'
import json, os, platform, sys, time
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"bench": "meta", "phase": "start", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "commit": sys.argv[2], "command": sys.argv[3],
                        "machine": f"{os.cpu_count()} cores, {cpu}, {mem / 1048576:.1f} GiB RAM, {platform.system()} {platform.release()}",
                        "loadavg": open("/proc/loadavg").read().split()[:3]}) + "\n")
PY

MOTO_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
PG_DIR="$WORK/pg"
cleanup() {
  kill "$MOTO_PID" 2>/dev/null || true
  wait "$MOTO_PID" 2>/dev/null || true
  "$ROOT/scripts/postgres.sh" stop "$PG_DIR" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 1 150); do curl -fs -o /dev/null "http://127.0.0.1:$MOTO_PORT/" && break; sleep 0.2; done
curl -fs -o /dev/null -X PUT "http://127.0.0.1:$MOTO_PORT/kcservices"
export AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1

say "durable commit (file, then S3/moto), $DURABLE_COMMITS commits per mode"
"$KEYCAST_BENCH_BIN" durable --store file --commits "$DURABLE_COMMITS" >>"$RESULTS"
"$KEYCAST_BENCH_BIN" durable --store s3 --s3-url "s3://kcservices/durable-$RUN_ID" --commits "$DURABLE_COMMITS" >>"$RESULTS"
# S3 with a cloud's round trip: 10 ms added to every request by a TCP proxy (moto then serves
# the uploads in flight side by side as far as its one process allows).
"$KEYCAST_BENCH_BIN" durable --store s3 --s3-url "s3://kcservices/durable-latency-$RUN_ID" --commits "$DURABLE_COMMITS" \
  --latency-ms 10 >>"$RESULTS"
# The same with the shipping pipeline on (four uploads in flight), in the same minute.
"$KEYCAST_BENCH_BIN" durable --store s3 --s3-url "s3://kcservices/durable-pipelined-$RUN_ID" --commits "$DURABLE_COMMITS" \
  --uploads-in-flight 4 >>"$RESULTS"

say "HTTP RPC sign_event (${RPC_SECONDS} s) and /healthz/live"
bench/rpc.sh >>"$RESULTS"

say "NIP-46 round trip on SQLite ($NIP46_N per client)"
bench/nip46.sh >>"$RESULTS"
if [ "${SERVICES_POSTGRES:-1}" = 1 ]; then
  chmod 755 "$WORK"  # as root, PostgreSQL runs as postgres and must reach its directory
  ADMIN="$("$ROOT/scripts/postgres.sh" start "$PG_DIR")"
  psql -AtqX "$ADMIN" -c "CREATE DATABASE nip46" >/dev/null
  say "NIP-46 round trip on PostgreSQL (same run)"
  NIP46_DATABASE_URL="${ADMIN%/*}/nip46" bench/nip46.sh >>"$RESULTS"
fi

python3 - "$RESULTS" <<'PY'
import json, sys, time
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"bench": "meta", "phase": "end", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "loadavg": open("/proc/loadavg").read().split()[:3]}) + "\n")
PY
if [ "$QUICK" = 1 ]; then OUT="$WORK/SERVICES.quick.md"; cp BENCHMARKS.md "$OUT"; else OUT="$ROOT/BENCHMARKS.md"; fi
python3 bench/services_report.py "$RESULTS" --into "$OUT" --raw-name "${RESULTS#"$ROOT"/}"
say "wrote $OUT from $RESULTS"
