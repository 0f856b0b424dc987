#!/usr/bin/env bash
# Agent benchmark (not a test): on one local server, in one run,
#  1. a full-image update of SIZE_MIB (default 1024) incompressible bytes:
#     ota-agent (download + verify + write + fsync + read-back hash + switch)
#     vs `curl` and `aria2c -x4 -s4` fetching the same payload to a file;
#  2. the agent's peak RSS (/usr/bin/time -v) for that and for a delta update
#     of a 128 MiB ext4 root filesystem (scripts/make-images.sh);
#  3. payload bytes re-downloaded after kill -9 at 50 % of the full image.
#
#   bench/agent-bench.sh [SIZE_MIB]
#
# Pair mode (issue 18, agent memory on big deltas): the delta of a given image
# pair (e.g. bench/make-big-pair.sh's 2 GiB pair), applied RUNS times by
# `ota-agent apply` and by `ota-agent run` through the bench server, each with
# /usr/bin/time -v (peak RSS, wall time, target MiB/s) and the result compared
# byte for byte with NEW. With --base-agent, that binary (e.g. built from main
# before a change) runs too, alternating with this tree's agent in the same run.
# The delta is generated once into DELTA_DIR (default target/bench-agent-pair)
# and reused while DELTA_DIR/PARAMS matches (the images, the level and the
# ota-server binary that made it). The images are read in place (slot
# a of the device IS the old image: the agent never opens its booted slot for
# writing); slot b, the only 2 GiB written, lives in a temporary directory.
#
#   bench/agent-bench.sh --pair OLD NEW [--runs N] [--base-agent PATH]
#       [--delta-dir DIR] [--zstd-level L] [--no-build]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
size=1024 pair_old= pair_new= runs=2 base_agent= delta_dir= zstd_level=9 build=1
while [ $# -gt 0 ]; do
  case $1 in
    --pair) pair_old=$(realpath "$2"); pair_new=$(realpath "$3"); shift 3 ;;
    --runs) runs=$2; shift 2 ;;
    --base-agent) base_agent=$(realpath "$2"); shift 2 ;;
    --delta-dir) delta_dir=$2; shift 2 ;;
    --zstd-level) zstd_level=$2; shift 2 ;;
    --no-build) build=; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    [0-9]*) size=$1; shift ;;
    *) echo "agent-bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
command -v aria2c >/dev/null || apt-get install -y aria2 >/dev/null
command -v /usr/bin/time >/dev/null || apt-get install -y time >/dev/null
command -v mkfs.ext4 >/dev/null || apt-get install -y e2fsprogs >/dev/null
if [ -n "$build" ]; then
  cargo build -q --release -p ota-agent -p ota-server
  cargo build -q --release -p ota-agent --example bench_server
fi
bin=$CARGO_TARGET_DIR/release
# As deploy/ota-agent.service runs it.
export MALLOC_ARENA_MAX=2
work=$(mktemp -d /var/tmp/agent-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT

mib() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f MiB/s (%.2f s)", b / s / 1048576, s }'; }
now() { date +%s.%N; }
port=18090
serve() { # serve DIR UPDATE_ID -> sets url
  port=$((port + 1))
  "$bin/examples/bench_server" "$1" "127.0.0.1:$port" "$2" > "$work/server-$port.log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    grep -q payload "$work/server-$port.log" 2>/dev/null && break
    sleep 0.1
  done
  url="http://127.0.0.1:$port"
  payload_path=$(awk '/^payload/ {print $2}' "$work/server-$port.log")
  payload_size=$(awk '/^payload/ {print $3}' "$work/server-$port.log")
}
stat_bytes() { curl -s "$url/stats" | sed 's/.*"bytes_sent":\([0-9]*\).*/\1/'; }

device() { # device DIR SLOT_A_IMAGE -> DIR/agent.toml
  local d=$1
  mkdir -p "$d"
  cp "$2" "$d/a.img"
  : > "$d/b.img"
  echo key > "$d/enroll.key"
  cat > "$d/agent.toml" <<TOML
server_url = "$url"
device_id = "bench-1"
device_type = "bench"
enrollment_key_file = "$d/enroll.key"
data_dir = "$d/data"
trusted_keys = ["$work/keys/ota-signing.pub"]
factory_version = "1.0.0"
reboot_command = "true"
log_format = "journal"
[slots]
a = "$d/a.img"
b = "$d/b.img"
[boot]
backend = "file"
env_file = "$d/boot.env"
TOML
  "$bin/ota-agent" simulate-boot --env-file "$d/boot.env" >/dev/null
}
rss_of() { awk '/Maximum resident set size/ {printf "%.1f", $6 / 1024}' "$1"; }
wall_of() { awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$1"; }
secs_of() { wall_of "$1" | awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }'; }

if [ -n "$pair_old" ]; then
  delta_dir=${delta_dir:-$CARGO_TARGET_DIR/bench-agent-pair}
  # The generator's binary is part of the key: a delta made by an older
  # engine (another codec set, another frame layout) is made again.
  params="old=$pair_old:$(stat -c %s:%Y "$pair_old") new=$pair_new:$(stat -c %s:%Y "$pair_new") zstd=$zstd_level generator=$(sha256sum "$bin/ota-server" | cut -c1-16)"
  if [ "$(cat "$delta_dir/PARAMS" 2>/dev/null)" != "$params" ]; then
    echo "== generating the delta into $delta_dir (once; minutes for a 2 GiB pair)"
    rm -rf "$delta_dir"; mkdir -p "$delta_dir"
    "$bin/ota-server" keygen --out "$delta_dir/keys" >/dev/null
    /usr/bin/time -v "$bin/ota-server" delta --from "$pair_old" --from-version 1.0.0 --to "$pair_new" \
      --to-version 2.0.0 --key "$delta_dir/keys/ota-signing.key" --out "$delta_dir/update" --device-type bench \
      --zstd-level "$zstd_level" --no-progress > "$delta_dir/generate.log" 2>&1
    echo "$params" > "$delta_dir/PARAMS"
  fi
  mkdir -p "$work/keys"; cp "$delta_dir/keys/ota-signing.pub" "$work/keys/"
  target_size=$(stat -c %s "$pair_new")
  serve "$delta_dir/update" u-pair
  agents=("$bin/ota-agent"); names=(this)
  [ -n "$base_agent" ] && { agents=("$base_agent" "$bin/ota-agent"); names=(base this); }
  rows=()
  for r in $(seq 1 "$runs"); do
    for k in "${!agents[@]}"; do
      a=${agents[$k]} n=${names[$k]}
      /usr/bin/time -v "$a" apply --manifest "$delta_dir/update/manifest.json" --payload "$delta_dir/update/payload.bin" \
        --pubkey "$work/keys/ota-signing.pub" --source "$pair_old" --out "$work/apply.img" --no-progress \
        > /dev/null 2> "$work/apply.time"
      cmp "$pair_new" "$work/apply.img" || { echo "apply by $n: wrong image" >&2; exit 1; }
      rm -f "$work/apply.img"
      rows+=("| $r | $n | apply | $(rss_of "$work/apply.time") | $(secs_of "$work/apply.time") | $(awk -v b="$target_size" -v s="$(secs_of "$work/apply.time")" 'BEGIN { printf "%.0f", b / s / 1048576 }') |")
      d=$work/dev-pair-$r-$n; mkdir -p "$d"
      device "$d" /dev/null
      sed -i "s|^a = .*|a = \"$pair_old\"|" "$d/agent.toml"
      rm -f "$d/a.img"
      curl -s -X POST "$url/reset" >/dev/null
      /usr/bin/time -v "$a" run --config "$d/agent.toml" 2> "$work/run.time" >/dev/null
      cmp -n "$target_size" "$pair_new" "$d/b.img" || { echo "run by $n: wrong slot b" >&2; tail "$work/run.time"; exit 1; }
      rm -rf "$d"
      rows+=("| $r | $n | run | $(rss_of "$work/run.time") | $(secs_of "$work/run.time") | $(awk -v b="$target_size" -v s="$(secs_of "$work/run.time")" 'BEGIN { printf "%.0f", b / s / 1048576 }') |")
    done
  done
  echo
  echo "delta ($delta_dir/generate.log):"; sed -n 1,6p "$delta_dir/generate.log"
  echo "| run | agent | command | peak RSS MiB | wall s | target MiB/s |"
  echo "|---|---|---|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
  exit 0
fi

echo "== preparing images in $work"
"$bin/ota-server" keygen --out "$work/keys" >/dev/null
head -c $((size << 20)) /dev/urandom > "$work/full.img"
head -c $((1 << 20)) /dev/urandom > "$work/old-small.img"
"$bin/ota-server" delta --to "$work/full.img" --to-version 2.0.0 --key "$work/keys/ota-signing.key" \
  --out "$work/full" --device-type bench --zstd-level 1 --no-progress >/dev/null
scripts/make-images.sh "$work/rootfs" 128 >/dev/null 2>&1
"$bin/ota-server" delta --from "$work/rootfs/v1.img" --from-version 1.0.0 --to "$work/rootfs/v2.img" \
  --to-version 2.0.0 --key "$work/keys/ota-signing.key" --out "$work/delta" --device-type bench --no-progress >/dev/null

echo "== full image: curl, aria2c, ota-agent on one server"
serve "$work/full" u-full
sync
t0=$(now); curl -s -H "Authorization: Bearer x" -o "$work/curl.out" "$url$payload_path"; sync; t1=$(now)
curl_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
rm -f "$work/curl.out"
t0=$(now)
aria2c -q -x4 -s4 -k1M --file-allocation=none --allow-overwrite=true --header "Authorization: Bearer x" \
  -d "$work" -o aria.out "$url$payload_path"
sync; t1=$(now)
aria_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
rm -f "$work/aria.out"
device "$work/dev-full" "$work/old-small.img"
t0=$(now)
/usr/bin/time -v "$bin/ota-agent" run --config "$work/dev-full/agent.toml" 2> "$work/agent-full.time" >/dev/null
t1=$(now)
agent_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
cmp -n $((size << 20)) "$work/full.img" "$work/dev-full/b.img" && echo "slot b verified against the image"
rm -f "$work/dev-full/b.img"

echo "== delta: 128 MiB ext4 rootfs"
serve "$work/delta" u-delta
device "$work/dev-delta" "$work/rootfs/v1.img"
/usr/bin/time -v "$bin/ota-agent" run --config "$work/dev-delta/agent.toml" 2> "$work/agent-delta.time" >/dev/null
cmp -n "$(stat -c %s "$work/rootfs/v2.img")" "$work/rootfs/v2.img" "$work/dev-delta/b.img" && echo "delta slot verified"
delta_payload=$payload_size

echo "== kill -9 at 50 % of the full image, restart"
serve "$work/full" u-kill
device "$work/dev-kill" "$work/old-small.img"
"$bin/ota-agent" run --config "$work/dev-kill/agent.toml" 2>/dev/null >/dev/null &
apid=$!
while [ "$(stat_bytes)" -lt $((payload_size / 2)) ]; do sleep 0.02; done
kill -9 $apid; wait $apid 2>/dev/null || true
at_kill=$(stat_bytes)
"$bin/ota-agent" run --config "$work/dev-kill/agent.toml" 2>/dev/null >/dev/null
total=$(stat_bytes)
redl=$((total - payload_size))

full_payload=$(stat -c %s "$work/full/payload.bin")
echo
echo "| what | figure |"
echo "|---|---:|"
echo "| full-image payload | $full_payload bytes |"
echo "| curl (1 connection, to a file) | $(mib "$full_payload" "$curl_s") |"
echo "| aria2c -x4 -s4 (to a file) | $(mib "$full_payload" "$aria_s") |"
echo "| ota-agent full image (download+verify+write+fsync+read-back+switch) | $(mib "$full_payload" "$agent_s") |"
echo "| ota-agent peak RSS, full image | $(rss_of "$work/agent-full.time") MiB |"
echo "| ota-agent peak RSS, delta (128 MiB rootfs, payload $delta_payload bytes) | $(rss_of "$work/agent-delta.time") MiB, $(wall_of "$work/agent-delta.time") |"
echo "| kill -9 at 50 %: sent before kill / re-downloaded | $at_kill / $redl bytes |"
