#!/usr/bin/env bash
# Before/after replication lag: two or more `keycast-bench` binaries (e.g. one built from the
# commit before a change, one from after it) run `lag --tool keycast` in turn against the same
# fresh moto, so every build sees the same minutes of a shared machine. Each result line is
# the bench's JSON with "ab_bin" (the binary's file name) and "ab_round" added.
#
#   bench/ab-lag.sh OUT.jsonl ROUNDS SECONDS "STORES" "RATES" BIN...
#   bench/ab-lag.sh /tmp/ab.jsonl 1 20 "s3" "100 500" /tmp/bench-before /tmp/bench-after
#
# STORES: file and/or s3; RATES: commits/s. Environment: KEYCAST_PEERS_DIR
# [/var/tmp/keycast-peers] (moto), AB_WORK_DIR [/var/tmp/keycast-ab], AB_LAG_ARGS (more `lag`
# arguments for every run, e.g. "--no-observer"), AB_MOTO_GC [on] (off: moto runs with Python's
# cyclic garbage collector off, as bench/run.sh's second moto does).
set -euo pipefail
[ $# -ge 6 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
OUT=$1 ROUNDS=$2 SECS=$3 STORES=$4 RATES=$5
shift 5
PEERS="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
WORK="${AB_WORK_DIR:-/var/tmp/keycast-ab}"
# shellcheck disable=SC1091
. "$PEERS/env.sh"
# The same environment bench/run.sh gives the bench (see shared/reference/test-peers.md).
unset AWS_CA_BUNDLE
mkdir -p "$WORK/tmp"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
if [ "${AB_MOTO_GC:-on}" = off ]; then
  "$(dirname "$(command -v moto_server)")/python" -c \
    'import gc, sys; gc.disable(); from moto.server import main; sys.exit(main())' \
    -H 127.0.0.1 -p "$PORT" > "$WORK/moto.log" 2>&1 &
else
  moto_server -H 127.0.0.1 -p "$PORT" > "$WORK/moto.log" 2>&1 &
fi
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.2; done
curl -fs -o /dev/null -X PUT "http://127.0.0.1:$PORT/kcab"
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1

# Adds the binary and round to each JSON line, and prints a one-line summary on stderr.
TAG='
import json, os, sys
for line in sys.stdin:
    d = json.loads(line)
    d["ab_bin"], d["ab_round"] = os.environ["AB_BIN"], int(os.environ["AB_ROUND"])
    print(json.dumps(d), flush=True)
    lag, put, ack = d["lag_ms"] or {}, d.get("store_put_ms") or {}, d.get("lag_ack_ms") or {}
    print("%s %s %s/s: lag p50 %s p99 %s ms (to the PUT answer: p50 %s p99 %s); store PUT p50 %s p99 %s ms" % (
        d["ab_bin"], d["store"], d["rate"], lag.get("p50"), lag.get("p99"), ack.get("p50"), ack.get("p99"),
        put.get("p50"), put.get("p99")), file=sys.stderr)
'
n=0
for round in $(seq "$ROUNDS"); do
  for store in $STORES; do
    for rate in $RATES; do
      for bin in "$@"; do
        n=$((n + 1))
        args=(lag --tool keycast --store "$store" --rate "$rate" --seconds "$SECS" --work-dir "$WORK/tmp")
        [ "$store" = s3 ] && args+=(--s3-url "s3://kcab/ab-$n" --put-probe-ms 50)
        [ -n "${AB_LAG_ARGS:-}" ] && read -ra extra <<< "$AB_LAG_ARGS" && args+=("${extra[@]}")
        "$bin" "${args[@]}" | AB_BIN="$(basename "$bin")" AB_ROUND="$round" python3 -c "$TAG" >> "$OUT"
      done
    done
  done
done
