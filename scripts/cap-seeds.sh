#!/usr/bin/env bash
# The fleet-wide cap under the scale-out fault schedule, with many seeds:
#
#   scripts/cap-seeds.sh N [FIRST_SEED]
#
# Runs `tests/tests/scaleout.rs` (three replicas behind nginx, kill -9 of a
# replica, Redis restart losing its data, PostgreSQL restart; cap 20) N
# times with seeds FIRST_SEED, FIRST_SEED+1, ... (default: from the clock),
# and prints per seed the most devices downloading at once (counted by the
# devices), the most leases the servers held, how many downloads devices
# stopped themselves on a lease they could not renew, and the verdict.
# Exit status 1 if any run failed (the failing seed reproduces it with
# OTA_SCALEOUT_SEED=<seed> cargo test -p ota-tests --test scaleout).
#
# The schedule restarts PostgreSQL and Redis, so it runs its own private
# pair (never the shared instance of scripts/services.sh's defaults):
# OTA_SERVICES_DIR (default /tmp/ota-services-capseeds), OTA_PG_PORT
# (55462), OTA_REDIS_PORT (56409). Started if not running, stopped at the
# end if this script started them. Each run takes about 90 s.
set -euo pipefail

N=${1:?usage: scripts/cap-seeds.sh N [FIRST_SEED]}
FIRST=${2:-$(date +%s)}
[[ $N =~ ^[0-9]+$ && $N -ge 1 ]] || { echo "cap-seeds.sh: N must be a positive integer, not '$N'" >&2; exit 2; }
[[ $FIRST =~ ^[0-9]+$ ]] || { echo "cap-seeds.sh: FIRST_SEED must be a non-negative integer, not '$FIRST'" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OTA_SERVICES_DIR=${OTA_SERVICES_DIR:-/tmp/ota-services-capseeds}
export OTA_PG_PORT=${OTA_PG_PORT:-55462}
export OTA_REDIS_PORT=${OTA_REDIS_PORT:-56409}
if [[ $OTA_PG_PORT == 55432 || $OTA_REDIS_PORT == 56379 ]]; then
    echo "cap-seeds.sh: refusing the shared services' ports: the runs restart PostgreSQL and Redis" >&2
    exit 2
fi
started=0
if ! scripts/services.sh status >/dev/null 2>&1; then
    scripts/services.sh start
    started=1
fi
cleanup() { if [[ $started == 1 ]]; then scripts/services.sh stop || true; fi; }
trap cleanup EXIT
eval "$(scripts/services.sh env)"
export OTA_REQUIRE_SERVICES=1

# Build once (the test builds ota-loadtest and the server on first use).
cargo test -p ota-tests --test scaleout --no-run

logs=$(mktemp -d /tmp/cap-seeds.XXXXXX)
printf '%-12s %-4s %-12s %-8s %-18s %-12s %s\n' seed cap max_devices at_s max_server_leases lease_stops result
failed=0 worst=0
for ((i = 0; i < N; i++)); do
    seed=$((FIRST + i))
    log=$logs/seed-$seed.log
    if OTA_SCALEOUT_SEED=$seed cargo test -q -p ota-tests --test scaleout -- --nocapture >"$log" 2>&1; then
        result=pass
    else
        result="FAIL (log: $log)"
        failed=$((failed + 1))
    fi
    line=$(grep -o 'cap-check .*' "$log" | tail -1 || true)
    get() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$line"; }
    dev=$(get max_devices) leases=$(get max_server_leases) stops=$(get lease_stops) cap=$(get cap)
    at=$(sed -n 's/.* at_secs=\([0-9.-]*\).*/\1/p' <<<"$line")
    if [[ -z $line ]]; then
        dev='?' leases='?' stops='?' cap='?' at='?'
        grep -m1 -o 'INVARIANT VIOLATED.*\|panicked at.*' "$log" >&2 || true
    elif ((dev > worst)); then
        worst=$dev
    fi
    printf '%-12s %-4s %-12s %-8s %-18s %-12s %s\n' "$seed" "$cap" "$dev" "$at" "$leases" "$stops" "$result"
done
echo "cap-seeds.sh: $N runs, $failed failed; most devices downloading at once in any run: $worst (logs in $logs)"
[[ $failed == 0 ]]
