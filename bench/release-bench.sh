#!/usr/bin/env bash
# Release-pipeline benchmark (not a test): a real `ota-server serve` on
# loopback, the 2 GiB image pair of bench/make-big-pair.sh, and a small
# fleet checking in at a steady rate (tests/src/bin/checkin-probe.rs).
#
#  1. `release add` of the old image (upload MB/s, its full payload's build);
#  2. check-in latency with the server idle;
#  3. `release add --wait` of the new image while the fleet checks in: the
#     time from the start of the upload to "full payload and delta from the
#     old release ready" (issue 18's must: <= 5 minutes), each build's time
#     and size, `release list` sampled every 10 s (the progress it shows),
#     and check-in latency during the build.
#
#   bench/release-bench.sh [--pair DIR] [--profile dev|release] [--devices N] [--rate R]
#                          [--fleet-codecs all|none]
#
# The fleet runs the old release (1.0.0, device type bench) and lists the
# delta codecs of --fleet-codecs: `all` (default) is a fleet of current
# agents, so the server's default "auto" codec settings build the delta with
# xz, zero-runs and arm64 — what a real release build costs; `none` is a
# fleet of agents older than every codec (a codec-free delta, as the figures
# before "auto" were taken). The idle probe runs before the new release is
# added, so its check-ins are what decides.
#
# --pair DIR: DIR/{old,new} (default target/bench-pairs/big; made by
# bench/make-big-pair.sh, which this script waits for if DIR/PARAMS is not
# there yet). The images are read in place, never copied.
# --profile: which build of ota-server (default release; `dev` optimises the
# delta engine and every dependency, only the server's own code is not).
# Extra server.toml lines: SERVER_TOML_EXTRA='full_zstd_level = 9'.
# BIN_DIR=DIR: use DIR/ota-server and DIR/checkin-probe, build nothing.
# Writes a markdown summary to stdout and WORK/summary.md (WORK is printed;
# KEEP=1 keeps it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pair=$root/target/bench-pairs/big
profile=release
devices=200
rate=200
fleet_codecs=all
while [ $# -gt 0 ]; do
  case $1 in
    --pair) pair=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --devices) devices=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --fleet-codecs) fleet_codecs=$2; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for t in openssl python3 curl; do
  command -v $t >/dev/null || { echo "needs $t (apt-get install $t)" >&2; exit 1; }
done
if [ ! -f "$pair/PARAMS" ]; then
  [ -d "$pair" ] || { echo "no image pair in $pair: run bench/make-big-pair.sh (or give --pair DIR)" >&2; exit 1; }
  echo "waiting for $pair/PARAMS (bench/make-big-pair.sh still running?)" >&2
  while [ ! -f "$pair/PARAMS" ]; do sleep 10; done
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
if [ -n "${BIN_DIR:-}" ]; then
  bin=$BIN_DIR   # ota-server and checkin-probe built elsewhere (kept aside from rebuilds)
elif [ "$profile" = release ]; then
  cargo build -q --release -p ota-server --bin ota-server -p ota-tests --bin checkin-probe
  bin=$CARGO_TARGET_DIR/release
else
  cargo build -q -p ota-server --bin ota-server -p ota-tests --bin checkin-probe
  bin=$CARGO_TARGET_DIR/debug
fi

work=$(mktemp -d /var/tmp/release-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
echo "work directory $work" >&2

admin=$(openssl rand -hex 32)
enroll=$(openssl rand -hex 32)
"$bin/ota-server" keygen --out "$work/keys" >/dev/null
cat > "$work/server.toml" <<TOML
listen = "127.0.0.1:0"
data_dir = "$work/data"
admin_token = "$admin"
enrollment_key = "$enroll"
signing_key = "$work/keys/ota-signing.key"
${SERVER_TOML_EXTRA:-}
TOML
RUST_LOG=info "$bin/ota-server" serve --config "$work/server.toml" > "$work/server.log" 2>&1 &
server_pid=$!
pids+=($server_pid)
addr=
for _ in $(seq 1 300); do
  addr=$(sed -n 's/.*ota-server listening.*addr=\([0-9.:]*\).*/\1/p' "$work/server.log" | head -1)
  [ -n "$addr" ] && break
  kill -0 $server_pid 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "the server did not start; see $work/server.log" >&2; exit 1; }
export OTA_SERVER=http://$addr OTA_ADMIN_TOKEN=$admin

now() { date +%s.%N; }
# add VERSION IMAGE LOG: release add --wait, each output line timestamped.
add() {
  "$bin/ota-server" release add --version "$1" --device-type bench --image "$2" --wait 2>&1 |
    while IFS= read -r l; do echo "$(now) $l"; done > "$3"
}
cpu_of() { awk '{print $14 + $15}' /proc/$server_pid/stat; }
hz=$(getconf CLK_TCK)
size=$(stat -c %s "$pair/new")

echo "== release 1.0.0 (old image): upload and full payload" >&2
t0=$(now)
add 1.0.0 "$pair/old" "$work/add-old.log"
t1=$(now)
up_old=$(awk '/ added \(/ {print $1; exit}' "$work/add-old.log")

echo "== check-in latency, idle (30 s)" >&2
fleet=(--device-type bench --current-version 1.0.0 --codecs "$fleet_codecs")
idle=$("$bin/checkin-probe" --server "$OTA_SERVER" --enrollment-key "$enroll" "${fleet[@]}" \
  --id-prefix idle --devices "$devices" --rate "$rate" --seconds 30)
echo "idle: $idle" >&2

echo "== release 2.0.0 (new image) while the fleet checks in" >&2
rm -f "$work/stop"
"$bin/checkin-probe" --server "$OTA_SERVER" --enrollment-key "$enroll" "${fleet[@]}" \
  --id-prefix busy --devices "$devices" --rate "$rate" --stop-file "$work/stop" > "$work/probe-build.txt" &
probe_pid=$!
pids+=($probe_pid)
sleep 2
(
  while :; do
    { echo "--- $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; "$bin/ota-server" release list 2>&1 | sed -n '/2.0.0/,$p'; } >> "$work/progress.log"
    sleep 10
  done
) &
sampler=$!
pids+=($sampler)
cpu0=$(cpu_of)
load0=$(cut -d' ' -f1 /proc/loadavg)
t2=$(now)
add 2.0.0 "$pair/new" "$work/add-new.log"
t3=$(now)
cpu1=$(cpu_of)
load1=$(cut -d' ' -f1 /proc/loadavg)
kill $sampler 2>/dev/null || true
touch "$work/stop"
wait $probe_pid
during=$(cat "$work/probe-build.txt")
echo "during: $during" >&2
up_new=$(awk '/ added \(/ {print $1; exit}' "$work/add-new.log")

curl -sf -H "authorization: Bearer $admin" "$OTA_SERVER/api/v1/admin/releases" > "$work/releases.json"
python3 - "$work/releases.json" "$size" > "$work/builds.md" <<'PY'
import json, sys
rs = json.load(open(sys.argv[1]))
size = int(sys.argv[2])
print("| release | build | zstd payload | % of image | build s |")
print("|---|---|---:|---:|---:|")
for r in rs:
    for b in r["builds"]:
        a = b.get("artifacts") or {}
        p = a.get("payload_size", 0)
        kind = "full image" if b["from_version"] is None else "delta from " + b["from_version"]
        print(f"| {r['version']} | {kind} | {p:,} | {100 * p / size:.2f} | {b.get('seconds') or 0:.1f} |")
PY
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
{
  echo "release-bench: $(cat "$pair/PARAMS" | head -1)"
  echo "profile $profile, $(nproc) cores, fleet of $devices devices at $rate check-ins/s on 1.0.0, listing codecs: $fleet_codecs"
  grep -m1 'codecs the delta may use' "$work/server.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/server: /' || true
  echo
  awk -v s="$size" -v a="$t0" -v b="$up_old" -v c="$t2" -v d="$up_new" -v e="$t3" -v f="$t1" 'BEGIN {
    printf "- upload of the old image: %.1f s (%.0f MB/s); its full payload ready %.1f s later\n", b - a, s / (b - a) / 1e6, f - b
    printf "- **release add of the new image -> full payload + delta ready: %.1f s** (upload %.1f s, %.0f MB/s; builds %.1f s)\n", e - c, d - c, s / (d - c) / 1e6, e - d
  }'
  awk -v c0="$cpu0" -v c1="$cpu1" -v hz="$hz" -v l0="$load0" -v l1="$load1" 'BEGIN {
    printf "- server CPU time during it: %.1f s; load average %s at the start, %s at the end\n", (c1 - c0) / hz, l0, l1 }'
  echo
  cat "$work/builds.md"
  echo
  echo "| check-ins | count | errors | late | p50 ms | p99 ms | max ms |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for x in "idle:$idle" "during the build:$during"; do
    n=${x%%:*}; v=${x#*:}
    echo "| $n | $(field "$v" checkins) | $(field "$v" errors) | $(field "$v" late) | $(field "$v" p50_ms) | $(field "$v" p99_ms) | $(field "$v" max_ms) |"
  done
  echo
  echo "release list while building (sampled every 10 s):"
  echo '```'
  grep -E -- '^---|Building' "$work/progress.log" | head -40
  echo '```'
} | tee "$work/summary.md"
