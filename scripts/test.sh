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

step "checking formatting"
cargo fmt --all -- --check

step "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
