#!/usr/bin/env bash
# Two copies of SQLite in one process break POSIX advisory locking and corrupt databases
# (https://www.sqlite.org/howtocorrupt.html#multiple_copies_of_sqlite_linked_into_the_same_application).
# keycast links exactly one: the libsqlite3-sys that sqlx uses. Fail if Cargo.lock holds more.
set -euo pipefail
cd "$(dirname "$0")/.."
n=$(grep -c '^name = "libsqlite3-sys"$' Cargo.lock || true)
if [ "$n" -ne 1 ]; then
  echo "check-one-sqlite: Cargo.lock holds $n versions of libsqlite3-sys; exactly one is allowed:" >&2
  grep -A1 '^name = "libsqlite3-sys"$' Cargo.lock >&2 || true
  exit 1
fi
echo "check-one-sqlite: ok (one libsqlite3-sys: $(grep -A1 '^name = "libsqlite3-sys"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p'))"
