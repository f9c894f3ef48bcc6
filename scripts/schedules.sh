#!/usr/bin/env bash
# A long campaign of randomized replica schedules (see crates/replica/tests/schedules.rs):
# many cases from a random base seed; a failure prints the seed that replays it.
#
#   scripts/schedules.sh            # 300 cases
#   scripts/schedules.sh 2000       # more
#   KEYCAST_SCHEDULE_SEED=123 KEYCAST_SCHEDULE_CASES=1 scripts/schedules.sh   # replay one
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/keycast-target}"
export KEYCAST_SCHEDULE_CASES="${KEYCAST_SCHEDULE_CASES:-${1:-300}}"
if [ -z "${KEYCAST_SCHEDULE_SEED:-}" ]; then
  KEYCAST_SCHEDULE_SEED="$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')"
  export KEYCAST_SCHEDULE_SEED
fi
echo "schedules: $KEYCAST_SCHEDULE_CASES cases from seed $KEYCAST_SCHEDULE_SEED"
exec cargo test -p keycast-replica --test schedules -- --nocapture random_schedules
