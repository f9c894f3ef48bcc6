#!/usr/bin/env bash
# A throwaway PostgreSQL server for keycast's tests and benchmarks (Debian's postgresql
# package, installed by scripts/install-peers.sh).
#
#   scripts/postgres.sh start DIR   # initdb into DIR (a fresh temp dir), start on a free
#                                   # loopback port, print the server's admin URL
#   scripts/postgres.sh stop DIR    # stop that server (idempotent) and delete DIR
#
# `start` is idempotent: a server already running from DIR is reused and its URL printed.
# The server trades durability for speed (fsync off): it holds test data only. initdb
# refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail
cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
  if [ -f "$dir/port" ] && as_owner "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
    exit 0
  fi
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as_owner "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log"
  # Enough connections for tests that run several instances side by side (each keeps a
  # pool plus a listener connection); fsync off because nothing here must survive.
  as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off \
        -c full_page_writes=off -c max_connections=400 -c shared_buffers=64MB" start >/dev/null
  echo "$port" >"$dir/port"
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  if [ -d "$dir/data" ]; then
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|stop DIR" >&2
  exit 2
  ;;
esac
