#!/usr/bin/env bash
# The edge-ota demo, end to end on loopback: a real ota-server with a
# temporary data directory, two versions of a 128 MiB ext4 root filesystem
# added as releases (the server builds and signs the full image and the
# delta), a handful of real ota-agent daemons with A/B slot files, and a
# waved, throttled rollout that takes them all from 1.0 to 2.0 — download
# through the chunk pool, install into the inactive slot, "reboot" (the
# agent exits; the bootloader step is `ota-agent simulate-boot`; the agent
# starts again), health check, commit.
#
# Exits 0 only if every device booted the new slot and its content is
# byte-identical to the new image. Cleans up after itself (KEEP=1 keeps the
# working directory).
#   usage: scripts/demo.sh            DEVICES=N to change the fleet size (default 4)
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${DEVICES:-4}
work=$(mktemp -d /tmp/edge-ota-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "(kept $work)"; else rm -rf "$work"; fi
}
trap cleanup EXIT

need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v curl >/dev/null || need+=(curl)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null
fi

t_start=$(date +%s)
# The dev profile the tests use (dependencies and ota-delta are optimised
# in it, see Cargo.toml): scripts/test.sh after the demo, or the demo after
# the tests, compiles only what is left instead of everything again. Cargo's
# progress stays visible: a first build takes minutes (README: first run).
echo "== building ota-server and ota-agent (cargo build, dev profile shared with the tests)"
cargo build -p ota-server -p ota-agent
bin=$PWD/target/debug

echo "== two versions of a 128 MiB ext4 root filesystem (real binaries; v2 is a security update)"
scripts/make-images.sh "$work/images" 128 >/dev/null

echo "== starting ota-server on 127.0.0.1 (data in $work/server)"
mkdir -p "$work/server"
"$bin/ota-server" keygen --out "$work/server" >/dev/null
# 32 random bytes each, hex: the server refuses short or placeholder secrets.
admin=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
enroll=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
cat > "$work/server/server.toml" <<EOF
listen = "127.0.0.1:0"
data_dir = "data"
admin_token = "$admin"
enrollment_key = "$enroll"
signing_key = "ota-signing.key"
[checkin]
idle_interval_ms = 1000
wait_interval_ms = 1000
lease_ms = 30000
EOF
"$bin/ota-server" serve --config "$work/server/server.toml" > "$work/server/stdout" 2> "$work/server/log" &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" "$work/server/stdout" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^ota-server listening on //p' "$work/server/stdout")
[ -n "$addr" ] || { echo "!! the server did not start:"; cat "$work/server/log"; exit 1; }
export OTA_SERVER="http://$addr" OTA_ADMIN_TOKEN="$admin"
echo "   listening on $OTA_SERVER"

echo "== adding releases 1.0 and 2.0 (the server builds the full images and the 1.0 -> 2.0 delta, and signs them)"
t0=$(date +%s)
"$bin/ota-server" release add --version 1.0 --device-type demo-board --image "$work/images/v1.img" --wait >/dev/null
"$bin/ota-server" release add --version 2.0 --device-type demo-board --image "$work/images/v2.img" --wait | sed 's/^/   /'
build_s=$(( $(date +%s) - t0 ))

echo "== $devices devices: slot A holds 1.0, slot B is empty; each runs ota-agent"
echo "$enroll" > "$work/enroll.key"
for i in $(seq 1 "$devices"); do
  d="$work/dev$i"; mkdir -p "$d"
  cp --sparse=always "$work/images/v1.img" "$d/slot-a.img"
  truncate -s 0 "$d/slot-b.img"
  cat > "$d/agent.toml" <<EOF
server_url = "$OTA_SERVER"
device_id = "demo-$i"
device_type = "demo-board"
enrollment_key_file = "$work/enroll.key"
data_dir = "$d/data"
trusted_keys = ["$work/server/ota-signing.pub"]
factory_version = "1.0"
checkin_interval = "1s"
max_backoff = "2s"
health_check = "true"
reboot_command = "$bin/ota-agent simulate-boot --env-file $d/boot.env --bootlimit 3"
log_format = "text"
[slots]
a = "$d/slot-a.img"
b = "$d/slot-b.img"
[boot]
backend = "file"
env_file = "$d/boot.env"
bootlimit = 3
EOF
  # Power-on: the (simulated) bootloader records which slot it booted; the
  # agent reads it and refuses to act without it.
  "$bin/ota-agent" simulate-boot --env-file "$d/boot.env" --bootlimit 3 >/dev/null
  # The device: run the agent; when it exits after switching slots (the
  # reboot), "power on" again and start it anew, until told to stop.
  ( while [ ! -e "$work/stop" ]; do
      "$bin/ota-agent" run --config "$d/agent.toml" >> "$d/agent.log" 2>&1 || sleep 1
    done ) &
  pids+=($!)
done

# Waves are filled by rank among the devices known when the rollout is
# created (a 25 % wave of 4 holds one): wait until every agent enrolled.
for _ in $(seq 300); do
  n=$(curl -s -H "Authorization: Bearer $admin" "$OTA_SERVER/api/v1/admin/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"])' 2>/dev/null || echo 0)
  [ "$n" = "$devices" ] && break
  sleep 0.2
done
[ "$n" = "$devices" ] || { echo "!! only $n of $devices devices enrolled"; exit 1; }

echo "== rollout: waves 25%,100%, soak 5 s, at most 2 downloads at once, 30 starts/min"
rollout=$("$bin/ota-server" rollout create --release 2.0 --device-type demo-board --waves 25,100 --soak 5s \
  --max-concurrent 2 --max-starts-per-min 30 --failure-threshold 50% --min-sample 2 --on-failure pause 2>/dev/null)
echo "   rollout $rollout"
w1=$(curl -s -H "Authorization: Bearer $admin" "$OTA_SERVER/api/v1/admin/rollouts/$rollout" | python3 -c 'import json,sys; print(json.load(sys.stdin)["waves"][0]["eligible"])')
echo "   wave 1 (25 %) holds $w1 of $devices devices"
[ "$w1" -ge 1 ] || { echo "!! the canary wave holds no device"; exit 1; }
t0=$(date +%s)
last=""
while :; do
  st=$("$bin/ota-server" rollout status "$rollout")
  line=$(echo "$st" | awk '$1=="all"{printf "admitted %s, downloading %s, installed %s, committed %s/%s, failed %s, rolled back %s", $5, $7, $8, $9, $4, $10, $11}')
  wave=$(echo "$st" | sed -n 's/^  open wave \([0-9]*\) of \([0-9]*\).*/wave \1 of \2/p')
  if [ "$line" != "$last" ]; then printf '   %4ss  %s  %s\n' $(( $(date +%s) - t0 )) "$wave" "$line"; last=$line; fi
  committed=$(echo "$st" | awk '$1=="all"{print $9}')
  [ "$committed" = "$devices" ] && break
  if echo "$st" | head -1 | grep -qE 'Paused|Aborted'; then echo "$st"; echo "!! the rollout stopped"; exit 1; fi
  if (( $(date +%s) - t0 > 600 )); then echo "$st"; echo "!! timed out"; exit 1; fi
  sleep 1
done
rollout_s=$(( $(date +%s) - t0 ))
touch "$work/stop"
for p in "${pids[@]:1}"; do kill -TERM "$p" 2>/dev/null || true; done
pkill -TERM -f "ota-agent run --config $work/" 2>/dev/null || true
sleep 1

echo "== devices"
want=$(sha256sum "$work/images/v2.img" | cut -d' ' -f1)
size=$(stat -c %s "$work/images/v2.img")
ok=0
for i in $(seq 1 "$devices"); do
  d="$work/dev$i"
  s=$("$bin/ota-agent" status --config "$d/agent.toml")
  version=$(echo "$s" | sed -n 's/^version: *//p')
  slot=$(echo "$s" | sed -n 's/^booted slot: *\([ab]\).*/\1/p')
  have=$(head -c "$size" "$d/slot-$slot.img" | sha256sum | cut -d' ' -f1)
  verdict="DIFFERENT from 2.0"
  if [ "$have" = "$want" ] && [ "$version" = 2.0 ]; then verdict="identical to 2.0 (sha256 ${want:0:16}…)"; ok=$((ok + 1)); fi
  printf '   demo-%s: version %s, booted slot %s, content %s\n' "$i" "$version" "$slot" "$verdict"
done

echo "== figures"
rel=$(curl -s -H "Authorization: Bearer $admin" "$OTA_SERVER/api/v1/admin/releases")
read -r full delta <<<"$(python3 -c '
import json,sys
r=[x for x in json.load(sys.stdin) if x["version"]=="2.0"][0]
b={ (x["from_version"] or "full"): x["artifacts"] for x in r["builds"] }
print(b["full"]["payload_size"]+b["full"]["manifest_size"], b["1.0"]["payload_size"]+b["1.0"]["manifest_size"])' <<<"$rel")"
served=$(curl -s -H "Authorization: Bearer $admin" "$OTA_SERVER/api/v1/admin/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served_since_start"])')
printf '   image %d bytes; full update %d bytes; delta %d bytes (%.2f%% of the image, %.1f× smaller than the full update)\n' \
  "$size" "$full" "$delta" "$(echo "100*$delta/$size" | bc -l)" "$(echo "$full/$delta" | bc -l)"
printf '   served %d bytes to %d devices (%.3f%% of %d full images)\n' "$served" "$devices" "$(echo "100*$served/($size*$devices)" | bc -l)" "$devices"
printf '   builds %d s, rollout %d s, whole demo %d s\n' "$build_s" "$rollout_s" $(( $(date +%s) - t_start ))
if [ "$ok" != "$devices" ]; then echo "!! $((devices - ok)) devices did not verify"; exit 1; fi
echo "== every device runs 2.0, verified byte for byte"
