#!/usr/bin/env bash
# Applies keycast's PostgreSQL migrations to a real, throwaway PostgreSQL server and checks
# the result, so the SQL that the PostgreSQL backend will run is proven now, not later.
# Needs the Debian postgresql package (installed by scripts/install-peers.sh). Run as root:
# initdb refuses root, so the server runs as the `postgres` user.
set -euo pipefail
cd "$(dirname "$0")/.."
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
ROOT=$(mktemp -d /var/tmp/keycast-pg.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
chown postgres:postgres "$ROOT"
cleanup() {
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$ROOT/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$ROOT"
}
trap cleanup EXIT
runuser -u postgres -- "$PGBIN/initdb" -D "$ROOT/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$ROOT/data" -l "$ROOT/log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $ROOT -c fsync=off" start >/dev/null
URL="postgres://postgres@127.0.0.1:$PORT/postgres"
for migration in crates/db/migrations/postgres/*.sql; do
  psql "$URL" -v ON_ERROR_STOP=1 -q -f "$migration" >/dev/null
done
# The sqlite and postgres migrations must define the same tables and columns.
pg_columns=$(psql "$URL" -At -c "SELECT table_name || '.' || column_name FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1")
lite=$(mktemp /var/tmp/keycast-lite.XXXXXX.db)
cat crates/db/migrations/sqlite/*.sql | sqlite3 "$lite"
lite_columns=$(sqlite3 "$lite" "SELECT m.name || '.' || p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table' ORDER BY 1")
rm -f "$lite"
if [ "$pg_columns" != "$lite_columns" ]; then
  echo "check-postgres-schema: the PostgreSQL and SQLite schemas differ:" >&2
  diff <(echo "$lite_columns") <(echo "$pg_columns") >&2 || true
  exit 1
fi
policies=$(psql "$URL" -At -c "SELECT string_agg(slug, ',' ORDER BY slug) FROM policies")
[ "$policies" = "full,readonly,social,wallet" ] || { echo "check-postgres-schema: seeded policies are '$policies'" >&2; exit 1; }
echo "check-postgres-schema: ok (migrations apply on $("$PGBIN/postgres" --version), same columns as SQLite)"
