#!/usr/bin/env bash
# Soak: a release `keycast serve` replicating to S3 (moto, started here) or a file replica,
# under SOAK_RATE async writes/s plus SOAK_DURABLE_RATE durable writes/s for SOAK_SECONDS,
# its resident memory (VmRSS) and database + WAL size sampled every SOAK_SAMPLE_SECS
# (bench/soak.py). Prints JSON lines (samples, then a summary saying whether RSS levelled
# off) and appends them to SOAK_OUT if set. Afterwards the replica is restored with
# `keycast restore` and every acknowledged durable write is looked for in it.
#
#   bench/soak.sh                          an hour against moto
#   SOAK_SECONDS=600 bench/soak.sh         ten minutes
#   SOAK_REPLICA=file bench/soak.sh        a file:// replica instead
#
# Environment (defaults in brackets): SOAK_SECONDS [3600], SOAK_RATE [100],
# SOAK_DURABLE_RATE [1], SOAK_SAMPLE_SECS [10], SOAK_REPLICA [s3], SOAK_OUT [none],
# KEYCAST_BIN [built here: cargo build --release -p keycast],
# CARGO_TARGET_DIR [/var/tmp/keycast-target], KEYCAST_PEERS_DIR [/var/tmp/keycast-peers].
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
PEERS="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
SECONDS_TOTAL="${SOAK_SECONDS:-3600}"
RATE="${SOAK_RATE:-100}"
DURABLE_RATE="${SOAK_DURABLE_RATE:-1}"
SAMPLE="${SOAK_SAMPLE_SECS:-10}"
REPLICA_KIND="${SOAK_REPLICA:-s3}"
say() { echo "soak.sh: $*" >&2; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ -n "${KEYCAST_BIN:-}" ]; then
  KEYCAST="$KEYCAST_BIN"
else
  cargo build --release -p keycast >&2
  KEYCAST="$CARGO_TARGET_DIR/release/keycast"
fi
WORK=$(mktemp -d /var/tmp/keycast-soak.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

ENV=(KEYCAST_BIND=127.0.0.1 KEYCAST_DATA_DIR="$WORK/data" KEYCAST_TEST_ROUTES=true KEYCAST_LOG=warn KEYCAST_EMBEDDED_RELAY_ADDR=127.0.0.1:0
  KEYCAST_MASTER_KEY="$(head -c 32 /dev/urandom | base64)")
case "$REPLICA_KIND" in
  s3)
    # shellcheck disable=SC1091
    . "$PEERS/env.sh"
    MOTO_PORT=$(free_port)
    moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$MOTO_PORT/" && break; sleep 0.2; done
    curl -fs -X PUT "http://127.0.0.1:$MOTO_PORT/soak" >/dev/null
    ENV+=(KEYCAST_REPLICA_URL=s3://soak/keycast AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT"
      AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1)
    ;;
  file) ENV+=(KEYCAST_REPLICA_URL="file://$WORK/replica") ;;
  *) say "SOAK_REPLICA must be s3 or file, not $REPLICA_KIND"; exit 2 ;;
esac
PORT=$(free_port)
env -u AWS_CA_BUNDLE "${ENV[@]}" PORT="$PORT" "$KEYCAST" serve >"$WORK/out.log" 2>"$WORK/err.log" &
SERVER=$!
PIDS+=("$SERVER")
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$PORT/healthz/ready" >/dev/null || { say "keycast never became ready:"; cat "$WORK/err.log" >&2; exit 1; }
say "keycast serve (pid $SERVER) on port $PORT, $REPLICA_KIND replica; ${SECONDS_TOTAL}s at ${RATE} async + ${DURABLE_RATE} durable writes/s"
idle_rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SERVER/status")
python3 bench/soak.py "http://127.0.0.1:$PORT" "$SERVER" "$WORK/data/keycast.db" "$SECONDS_TOTAL" \
  "$RATE" "$DURABLE_RATE" "$SAMPLE" | tee "$WORK/soak.jsonl"
kill -TERM "$SERVER"
for _ in $(seq 300); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SERVER" 2>/dev/null; then say "keycast did not stop within 30 s"; exit 1; fi

# Every acknowledged durable write must be in the replica.
env -u AWS_CA_BUNDLE "${ENV[@]}" "$KEYCAST" restore --output "$WORK/restored.db" >&2
acked=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["durable_ok"])' "$WORK/soak.jsonl")
found=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM keycast_meta WHERE key LIKE '"'"'test:d-%'"'"'").fetchone()[0])' "$WORK/restored.db")
check="{\"bench\":\"soak-check\",\"idle_rss_kib\":$idle_rss,\"durable_acknowledged\":$acked,\"durable_in_replica\":$found}"
echo "$check"
if [ -n "${SOAK_OUT:-}" ]; then cat "$WORK/soak.jsonl" >>"$SOAK_OUT"; echo "$check" >>"$SOAK_OUT"; fi
[ "$found" -ge "$acked" ] || { say "durable writes missing from the replica: $found of $acked"; exit 1; }
