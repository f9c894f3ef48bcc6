#!/usr/bin/env bash
# Runs keycast's whole test suite, installing the test peers it needs first (idempotently).
#
#   scripts/test.sh              # everything
#   scripts/test.sh -E 'test(x)' # extra arguments go to cargo nextest
#
# Peers are installed under $KEYCAST_PEERS_DIR (default /var/tmp/keycast-peers) so repeated
# runs and CI reuse them; the Cargo target directory defaults to /var/tmp/keycast-target
# for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
export KEYCAST_PEERS_DIR="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
# In CI a test whose peer is missing must fail, never skip.
export KEYCAST_REQUIRE_PEERS=1

step() { printf '\n==> %s\n' "$*"; }

# The persistent target directory grows with every build (incremental artefacts alone reached
# 35 GB on a development machine, and filled its disk mid-run). Below 15 GB free, the
# incremental artefacts go, then if need be the whole directory: a slower build, not a
# failed run.
free_gb() { df -P -BG "$(dirname "$CARGO_TARGET_DIR")" | awk 'NR == 2 { sub("G", "", $4); print $4 }'; }
if [ -d "$CARGO_TARGET_DIR" ] && [ "$(free_gb)" -lt 15 ]; then
    step "low on disk ($(free_gb) GB free): removing incremental build artefacts"
    rm -rf "$CARGO_TARGET_DIR"/debug/incremental
    if [ "$(free_gb)" -lt 15 ]; then
        step "still low on disk ($(free_gb) GB free): removing the target directory"
        rm -rf "$CARGO_TARGET_DIR"
    fi
fi

# The tests find their scripts and fixtures through paths compiled in (CARGO_MANIFEST_DIR),
# and Cargo does not rebuild a crate whose sources merely moved: a target directory shared by
# two clones (CI's and a developer's) ran one clone's tests against the other's paths. When
# the clone changes, keycast's own crates are rebuilt (the dependencies are kept).
workspace_stamp="$CARGO_TARGET_DIR/.keycast-workspace"
if [ -f "$workspace_stamp" ] && [ "$(cat "$workspace_stamp")" != "$PWD" ]; then
    step "the target directory was last built from $(cat "$workspace_stamp"): rebuilding keycast's crates"
    cargo clean -q -p keycast -p keycast-http -p keycast-core -p keycast-db -p keycast-replica -p keycast-nip46
fi
mkdir -p "$CARGO_TARGET_DIR" && printf '%s\n' "$PWD" > "$workspace_stamp"

# The test runner, pinned like the peers (its config is .config/nextest.toml).
NEXTEST_VERSION=0.9.143

step "installing test peers into $KEYCAST_PEERS_DIR"
scripts/install-peers.sh
# shellcheck disable=SC1091
. "$KEYCAST_PEERS_DIR/env.sh"

step "checking there is exactly one SQLite"
scripts/check-one-sqlite.sh

step "checking the PostgreSQL schema against a real server"
scripts/check-postgres-schema.sh

step "checking formatting"
cargo fmt --all -- --check

# Every peer server started here is stopped here, by its pid, however the script exits.
peer_pids=()
peer_logs=()
peer_dirs=()
pg_dir=""
cleanup() {
  for pid in "${peer_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${peer_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "${peer_logs[@]}"
  rm -rf "${peer_dirs[@]}"
  if [ -n "$pg_dir" ]; then scripts/postgres.sh stop "$pg_dir"; fi
  return 0
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# start_peer NAME READY_URL COMMAND...: starts COMMAND in the background and waits (20 s at
# most) until READY_URL answers at all; fails with the peer's log otherwise.
start_peer() {
  local name=$1 ready=$2; shift 2
  local log; log="$(mktemp -t "keycast-$name.XXXXXX.log")"
  "$@" >"$log" 2>&1 &
  local pid=$!
  peer_pids+=("$pid"); peer_logs+=("$log")
  for _ in $(seq 100); do
    if curl -s -o /dev/null "$ready"; then echo "$name at $ready (pid $pid)"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "test.sh: $name exited:" >&2; cat "$log" >&2; exit 1; fi
    sleep 0.2
  done
  echo "test.sh: $name not answering at $ready after 20 s:" >&2; cat "$log" >&2; exit 1
}

step "starting PostgreSQL"
# One throwaway server (a temp data dir, a free port); every PostgreSQL test makes its own
# database on it. Engine-parameterized suites run each test on SQLite and on this server.
pg_dir="$(mktemp -d /var/tmp/keycast-test-pg.XXXXXX)"
KEYCAST_TEST_POSTGRES_URL="$(scripts/postgres.sh start "$pg_dir")"
export KEYCAST_TEST_POSTGRES_URL
echo "PostgreSQL at $KEYCAST_TEST_POSTGRES_URL"

step "starting the object-store peers: S3 (moto), GCS (fake-gcs-server), Azure (Azurite)"
# Store conformance, drill and fencing tests write to each; each test makes its own bucket
# (S3) or prefix (GCS, Azure: one bucket/container per run, made here).
moto_port=$(free_port)
start_peer moto "http://127.0.0.1:$moto_port/" moto_server -H 127.0.0.1 -p "$moto_port"
export KEYCAST_TEST_S3_ENDPOINT="http://127.0.0.1:$moto_port"

# fake-gcs-server has no XML-API upload (`PUT /bucket/object`, what keycast's GCS client
# sends); the shim in front of it rewrites that one request into the JSON API's multipart
# upload with the same generation precondition and forwards everything else unchanged.
gcs_port=$(free_port); gcs_shim_port=$(free_port)
start_peer fake-gcs-server "http://127.0.0.1:$gcs_port/storage/v1/b" "$KEYCAST_TEST_FAKE_GCS_SERVER" \
  -scheme http -host 127.0.0.1 -port "$gcs_port" -public-host "127.0.0.1:$gcs_port" -backend memory -log-level warn
start_peer gcs-xml-upload-shim "http://127.0.0.1:$gcs_shim_port/storage/v1/b" \
  python3 scripts/peers/gcs_xml_upload_shim.py "$gcs_shim_port" "$gcs_port"
export KEYCAST_TEST_GCS_EMULATOR_HOST="127.0.0.1:$gcs_shim_port" KEYCAST_TEST_GCS_BUCKET=keycast-test
curl -fsS -o /dev/null -X POST "http://$KEYCAST_TEST_GCS_EMULATOR_HOST/storage/v1/b?project=test" \
  -H 'Content-Type: application/json' -d "{\"name\": \"$KEYCAST_TEST_GCS_BUCKET\"}"

# Azurite in memory, telemetry off (it would phone home otherwise); run from a scratch
# directory because it may write its workspace files into the current one.
azurite_port=$(free_port)
azurite_dir="$(mktemp -d -t keycast-azurite.XXXXXX)"; peer_dirs+=("$azurite_dir")
# The development account's published key (Azurite's README): no secret.
AZURITE_ACCOUNT_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
start_peer azurite "http://127.0.0.1:$azurite_port/" sh -c 'cd "$1" && shift && exec "$@"' sh "$azurite_dir" \
  "$KEYCAST_TEST_AZURITE" --blobHost 127.0.0.1 --blobPort "$azurite_port" --inMemoryPersistence \
  --skipApiVersionCheck --disableTelemetry --silent
export KEYCAST_TEST_AZURE_CONTAINER=keycast-test
export KEYCAST_TEST_AZURE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$AZURITE_ACCOUNT_KEY;BlobEndpoint=http://127.0.0.1:$azurite_port/devstoreaccount1;"
scripts/peers/azure-create-container.sh "http://127.0.0.1:$azurite_port/devstoreaccount1" devstoreaccount1 \
  "$AZURITE_ACCOUNT_KEY" "$KEYCAST_TEST_AZURE_CONTAINER"

# Interop tests run the stock litestream binary against keycast's replicas.
KEYCAST_TEST_LITESTREAM="$(command -v litestream)"
export KEYCAST_TEST_LITESTREAM
# This machine (and CI) exports AWS_CA_BUNDLE, which makes litestream fail every s3://
# replica ("unable to add custom RootCAs"); keycast's own S3 client ignores it.
unset AWS_CA_BUNDLE

step "running the tests"
# nextest, with the `ci` profile of .config/nextest.toml: a test hung for five minutes is
# killed and reported by name (TIMEOUT), and the slow ones are named as they go (SLOW).
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest (the suite's runner; it bounds every test's time)"
  cargo install --locked --quiet cargo-nextest --version "$NEXTEST_VERSION"
fi
# `failpoints`: the tests that make a vital task panic arm its `fail_point!` through
# `/api/test/failpoint` (vital_tasks.rs); a release build has none.
cargo nextest run --workspace --profile ci --features keycast/failpoints "$@"
