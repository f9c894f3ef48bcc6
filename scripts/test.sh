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

# Peers started below are stopped here, whatever way the script exits (exactly the ones
# this run started).
moto_pid=""
moto_log=""
pg_dir=""
cleanup() {
  if [ -n "$moto_pid" ]; then kill "$moto_pid" 2>/dev/null || true; wait "$moto_pid" 2>/dev/null || true; fi
  [ -n "$moto_log" ] && rm -f "$moto_log"
  [ -n "$pg_dir" ] && scripts/postgres.sh stop "$pg_dir"
  return 0
}
trap cleanup EXIT

step "starting PostgreSQL"
# One throwaway server (a temp data dir, a free port); every PostgreSQL test makes its own
# database on it. Engine-parameterized suites run each test on SQLite and on this server.
pg_dir="$(mktemp -d /var/tmp/keycast-test-pg.XXXXXX)"
KEYCAST_TEST_POSTGRES_URL="$(scripts/postgres.sh start "$pg_dir")"
export KEYCAST_TEST_POSTGRES_URL
echo "PostgreSQL at $KEYCAST_TEST_POSTGRES_URL"

step "starting the S3 API server (moto)"
# Store conformance tests write to a real S3 API; each test makes its own bucket.
moto_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_log="$(mktemp -t keycast-moto.XXXXXX.log)"
moto_server -H 127.0.0.1 -p "$moto_port" >"$moto_log" 2>&1 &
moto_pid=$!
export KEYCAST_TEST_S3_ENDPOINT="http://127.0.0.1:$moto_port"
for _ in $(seq 100); do
  if curl -fs -o /dev/null "$KEYCAST_TEST_S3_ENDPOINT/"; then break; fi
  if ! kill -0 "$moto_pid" 2>/dev/null; then
    echo "test.sh: moto_server exited:" >&2; cat "$moto_log" >&2; exit 1
  fi
  sleep 0.2
done
curl -fsS -o /dev/null "$KEYCAST_TEST_S3_ENDPOINT/" || { echo "test.sh: moto_server not answering after 20 s:" >&2; cat "$moto_log" >&2; exit 1; }
echo "moto at $KEYCAST_TEST_S3_ENDPOINT (pid $moto_pid)"

# Interop tests run the stock litestream binary against keycast's replicas.
KEYCAST_TEST_LITESTREAM="$(command -v litestream)"
export KEYCAST_TEST_LITESTREAM
# This machine (and CI) exports AWS_CA_BUNDLE, which makes litestream fail every s3://
# replica ("unable to add custom RootCAs"); keycast's own S3 client ignores it.
unset AWS_CA_BUNDLE

step "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
