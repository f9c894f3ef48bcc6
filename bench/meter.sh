#!/usr/bin/env bash
# What one signature's admission under a grant with limits costs as the grant's day fills up
# (keycast-core's UsageMeter, SQLite: the count is kept in memory). Prints one JSON line per
# size: signatures already counted (10 a second), nanoseconds per admission, entries kept.
#   bench/meter.sh                      # sizes 10,000 100,000 864,000 (a day at 10/s)
#   KEYCAST_METER_SIZES="1000 50000" bench/meter.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
cargo test --release -q -p keycast-core --lib terms::tests::meter_admission_cost -- --ignored --nocapture 2>/dev/null \
  | grep '"bench":"meter"'
