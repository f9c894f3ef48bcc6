#!/usr/bin/env bash
# Runs keycast's replication benchmarks against Litestream 0.5.17 on this machine and writes
# the results into BENCHMARKS.md, between its "results" markers (text outside them is kept).
# Re-runnable: every run uses fresh directories, a fresh moto server and fresh S3 prefixes.
#
#   bench/run.sh                 full run (about 25 minutes on 2 cores)
#   BENCH_QUICK=1 bench/run.sh   smoke run with short durations and a 32 MiB restore; the
#                                tables go to $BENCH_WORK_DIR/BENCHMARKS.quick.md instead
#   BENCH_TREE=head bench/run.sh measure the committed HEAD: it is exported (git archive) to
#                                $BENCH_WORK_DIR/src-<commit> and built there (bench/ is taken
#                                from the working tree if HEAD lacks it); the default,
#                                BENCH_TREE=worktree, builds the working tree as it is
#
# Environment (defaults in brackets): CARGO_TARGET_DIR [cargo's], BENCH_WORK_DIR
# [/var/tmp/keycast-bench], BENCH_LAG_SECONDS [20], BENCH_LAG_RATES ["100 500"],
# BENCH_TP_SECONDS [10], BENCH_TP_ROUNDS [3], BENCH_RESTORE_MB [256], BENCH_RESTORE_RUNS [3],
# BENCH_S3_RESTORE [1], BENCH_TREE [worktree], KEYCAST_PEERS_DIR [/var/tmp/keycast-peers],
# BENCH_SKIP_BUILD [0] (1: run the release binaries already in the target dir; the report
# then says when each was built instead of claiming a commit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
COMMAND_LINE="$(env | grep -E '^(BENCH_[A-Z0-9_]+|CARGO_TARGET_DIR)=' | sort | tr '\n' ' ')bench/run.sh"
COMMIT="$(git rev-parse --short HEAD)"

QUICK="${BENCH_QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  LAG_SECONDS="${BENCH_LAG_SECONDS:-4}"; TP_SECONDS="${BENCH_TP_SECONDS:-2}"; TP_ROUNDS="${BENCH_TP_ROUNDS:-1}"
  RESTORE_MB="${BENCH_RESTORE_MB:-32}"; RESTORE_RUNS="${BENCH_RESTORE_RUNS:-1}"
else
  LAG_SECONDS="${BENCH_LAG_SECONDS:-20}"; TP_SECONDS="${BENCH_TP_SECONDS:-10}"; TP_ROUNDS="${BENCH_TP_ROUNDS:-3}"
  RESTORE_MB="${BENCH_RESTORE_MB:-256}"; RESTORE_RUNS="${BENCH_RESTORE_RUNS:-3}"
fi
LAG_RATES="${BENCH_LAG_RATES:-100 500}"
S3_RESTORE="${BENCH_S3_RESTORE:-1}"
WORK="${BENCH_WORK_DIR:-/var/tmp/keycast-bench}"
PEERS="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
TREE="${BENCH_TREE:-worktree}"

say() { echo "run.sh: $*" >&2; }
mkdir -p "$WORK"

# 1. Release binaries, from the working tree or from a clean export of HEAD.
case "$TREE" in
  worktree)
    BUILD_DIR="$ROOT"
    if git diff --quiet HEAD -- crates Cargo.lock 2>/dev/null; then
      SOURCE="\`$COMMIT\` (working tree; crates/ as committed)"
    else
      SOURCE="\`$COMMIT\` + uncommitted changes in crates/ (working tree as built)"
    fi
    ;;
  head)
    BUILD_DIR="$WORK/src-$COMMIT"
    rm -rf "$BUILD_DIR"
    mkdir -p "$BUILD_DIR"
    git archive HEAD | tar -x -C "$BUILD_DIR"
    [ -d "$BUILD_DIR/bench" ] || cp -r "$ROOT/bench" "$BUILD_DIR/bench"
    grep -q '"bench"' "$BUILD_DIR/Cargo.toml" ||
      sed -i 's|^members = \[\(.*\)\]|members = [\1, "bench"]|' "$BUILD_DIR/Cargo.toml"
    SOURCE="\`$COMMIT\` (HEAD exported with git archive and built clean; uncommitted changes excluded)"
    ;;
  *) say "BENCH_TREE must be worktree or head"; exit 2 ;;
esac
TARGET="${CARGO_TARGET_DIR:-$BUILD_DIR/target}"
if [ "${BENCH_SKIP_BUILD:-0}" = 1 ]; then
  # Takes the binaries already in $TARGET as they are, and says when each was built.
  built() { date -u -r "$1" +%H:%M:%SZ; }
  SOURCE="\`$COMMIT\` working tree, binaries not rebuilt by this run (BENCH_SKIP_BUILD=1): keycast-bench built $(built "$TARGET/release/keycast-bench"), keycast built $(built "$TARGET/release/keycast")"
else
  say "building release binaries from $BUILD_DIR into $TARGET"
  (cd "$BUILD_DIR" && cargo build --release -p keycast -p keycast-bench)
fi
BENCH="$TARGET/release/keycast-bench"
KEYCAST="$TARGET/release/keycast"

# 2. Peers: litestream 0.5.17 and moto.
if [ ! -f "$PEERS/env.sh" ]; then
  "$ROOT/scripts/install-peers.sh"
fi
# shellcheck disable=SC1091
. "$PEERS/env.sh"
LS_VERSION="$(litestream version)"
case "$LS_VERSION" in 0.5.*) ;; *) say "expected litestream 0.5.x, got $LS_VERSION"; exit 1 ;; esac
MOTO_VERSION="$("$(dirname "$(command -v moto_server)")/python" -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?')"
# Litestream's S3 client fails while AWS_CA_BUNDLE is set (see shared/reference/test-peers.md).
unset AWS_CA_BUNDLE

RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)"
# A full run's raw results are committed beside the report; a quick run's stay in $WORK.
if [ "$QUICK" = 1 ]; then
  RESULTS="$WORK/results-$RUN_ID.jsonl"
else
  RESULTS="$ROOT/bench/results/replication-$RUN_ID.jsonl"
  mkdir -p "$ROOT/bench/results"
fi
: > "$RESULTS"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
T0=$SECONDS

# 3. moto on a free loopback port, stopped by its PID on exit; and a second one whose Python
# cyclic garbage collector is off. Stock moto pauses every request for 40-100 ms every few
# seconds once it holds thousands of objects (its collector walking them; the probe PUT stalls
# at the same instants), which no real S3 does; the second one measures keycast without those
# pauses (section 4b).
BUCKET=kcbench
MOTO_PIDS=()
cleanup() {
  for pid in "${MOTO_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
start_moto() { # name [gc-off]; sets MOTO_STARTED_PORT
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
  if [ "${2:-}" = gc-off ]; then
    "$(dirname "$(command -v moto_server)")/python" -c \
      'import gc, sys; gc.disable(); from moto.server import main; sys.exit(main())' \
      -H 127.0.0.1 -p "$port" > "$WORK/$1-$RUN_ID.log" 2>&1 &
  else
    moto_server -H 127.0.0.1 -p "$port" > "$WORK/$1-$RUN_ID.log" 2>&1 &
  fi
  MOTO_PIDS+=("$!")
  for _ in $(seq 1 150); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.2
  done
  curl -fs -o /dev/null "http://127.0.0.1:$port/" || { say "$1 did not start"; exit 1; }
  curl -fs -o /dev/null -X PUT "http://127.0.0.1:$port/$BUCKET"
  MOTO_STARTED_PORT=$port
}
start_moto moto
MOTO_PORT=$MOTO_STARTED_PORT
start_moto moto-gc-off gc-off
MOTO_GC_OFF_PORT=$MOTO_STARTED_PORT
export AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
say "moto $MOTO_VERSION on port $MOTO_PORT, with its GC off on port $MOTO_GC_OFF_PORT; results in $RESULTS"

bench() { "$BENCH" "$@" | tee -a "$RESULTS"; }

# 4. Replication lag: keycast, Litestream as shipped, Litestream at 100 ms, interleaved.
n=0
for store in file s3; do
  for rate in $LAG_RATES; do
    for variant in keycast ls-default ls-100ms; do
      n=$((n + 1))
      args=(lag --store "$store" --rate "$rate" --seconds "$LAG_SECONDS" --work-dir "$WORK/tmp")
      # keycast's runs also probe the store's own PUT latency in the same seconds (every
      # 20 ms; every 50 ms on moto, which serves one request at a time).
      [ "$store" = s3 ] && args+=(--s3-url "s3://$BUCKET/lag-$RUN_ID-$n" --put-probe-ms 50)
      case "$variant" in
        keycast) args+=(--tool keycast) ;;
        ls-default) args+=(--tool litestream) ;;
        ls-100ms) args+=(--tool litestream --ls-interval 100ms) ;;
      esac
      bench "${args[@]}"
    done
  done
done

# 4b. keycast on S3 with no observer: lag to the store's answer alone, on the same moto and on
# the one with its garbage collector off.
for rate in $LAG_RATES; do
  for server in moto moto-gc-off; do
    n=$((n + 1))
    port=$MOTO_PORT
    [ "$server" = moto-gc-off ] && port=$MOTO_GC_OFF_PORT
    AWS_ENDPOINT_URL="http://127.0.0.1:$port" "$BENCH" lag --tool keycast --store s3 --no-observer \
      --label "$server" --rate "$rate" --seconds "$LAG_SECONDS" --work-dir "$WORK/tmp" \
      --s3-url "s3://$BUCKET/lag-$RUN_ID-$n" --put-probe-ms 50 | tee -a "$RESULTS"
  done
done

# 5. Write throughput with and without replication.
bench throughput --seconds "$TP_SECONDS" --rounds "$TP_ROUNDS" --work-dir "$WORK/tmp"

# 6. Restore: keycast builds and replicates the database; both tools restore that replica.
restore_case() { # store mode
  local store=$1 mode=$2 dir="$WORK/restore-$1-$2" url
  rm -rf "$dir"
  mkdir -p "$dir"
  if [ "$store" = file ]; then url="file://$dir/replica"; else url="s3://$BUCKET/restore-$RUN_ID-$mode"; fi
  bench restore-db --size-mb "$RESTORE_MB" --mode "$mode" --db "$dir/src/app.db" --replica "$url" --info "$dir/info.json"
  bench restore-time --keycast-bin "$KEYCAST" --info "$dir/info.json" --runs "$RESTORE_RUNS" --work-dir "$dir/out"
  rm -rf "$dir"
}
restore_case file incremental
restore_case file snapshot
if [ "$S3_RESTORE" = 1 ]; then
  restore_case s3 incremental
  restore_case s3 snapshot
fi

# 7. The report.
ELAPSED=$(( SECONDS - T0 ))
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"
TABLES="$WORK/tables-$RUN_ID.md"
{
  echo "_Generated by \`bench/run.sh\` — do not edit between the results markers; re-run instead._"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| date (UTC) | $STARTED, $((ELAPSED / 60)) min $((ELAPSED % 60)) s |"
  echo "| commit | $SOURCE |"
  echo "| command | \`$COMMAND_LINE\` |"
  echo "| machine | $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo), $(uname -sr) |"
  echo "| load average (1/5/15 min) | start $LOAD_START, end $LOAD_END |"
  echo "| peers | litestream $LS_VERSION, moto $MOTO_VERSION (in-memory S3 on loopback; a second one with Python's cyclic GC off for the lag runs labelled moto-gc-off) |"
  echo "| toolchain | $(rustc --version) |"
  echo "| parameters | lag ${LAG_SECONDS} s per run at ${LAG_RATES// /, } commits/s (2 s warm-up); throughput ${TP_SECONDS} s × ${TP_ROUNDS} rounds; restore ${RESTORE_MB} MiB × ${RESTORE_RUNS} runs |"
  echo
  "$BENCH" report "$RESULTS"
  echo "Raw results: \`${RESULTS#"$ROOT"/}\` (one JSON object per line)."
} > "$TABLES"

if [ "$QUICK" = 1 ]; then
  OUT="$WORK/BENCHMARKS.quick.md"
else
  OUT="$ROOT/BENCHMARKS.md"
fi
python3 - "$OUT" "$TABLES" <<'PY'
import os, sys
out, tables = sys.argv[1], open(sys.argv[2]).read()
begin, end = "<!-- results:begin -->", "<!-- results:end -->"
block = f"{begin}\n{tables.rstrip()}\n{end}"
if os.path.exists(out):
    text = open(out).read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
else:
    text = "# Replication benchmarks\n\n" + block + "\n"
open(out, "w").write(text)
PY
say "wrote $OUT ($((ELAPSED / 60)) min)"
