#!/usr/bin/env bash
# Installs the real programs keycast's tests talk to, idempotently, and writes
# $KEYCAST_PEERS_DIR/env.sh which puts them on PATH for the tests.
set -euo pipefail
PEERS="${KEYCAST_PEERS_DIR:-/var/tmp/keycast-peers}"
mkdir -p "$PEERS"

apt_install() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "install-peers: installing $2 (apt)"
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}

# The sqlite3 shell: tests use it to look inside databases the way an operator would.
apt_install sqlite3 sqlite3

cat > "$PEERS/env.sh" <<ENV
export PATH="$PEERS/bin:\$PATH"
ENV
mkdir -p "$PEERS/bin"
echo "install-peers: ok"
