#!/usr/bin/env bash
# The ARM64 agent, end to end: the static aarch64 ota-agent daemon, run under
# qemu-aarch64, enrolls with the x86-64 ota-server on 127.0.0.1, is admitted
# by a rollout, downloads the delta through its chunk pool, applies it into
# slot B (a file), switches boot (`file` back-end), "reboots" (the agent
# exits, `ota-agent simulate-boot` plays the bootloader, the agent starts
# again), passes its health check and commits. The new slot must hold the new
# image byte for byte.
#   usage: scripts/arm64-e2e.sh   (after building the aarch64 agent and the x86-64 server in release)
set -euo pipefail
cd "$(dirname "$0")/.."
arm=${ARM_AGENT:-$PWD/target/aarch64-unknown-linux-musl/agent-dist/ota-agent}
server=$PWD/target/release/ota-server
[ -x "$arm" ] && [ -x "$server" ] || { echo "build $arm and $server first"; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  pkill -TERM -f "ota-agent run --config $work/" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
t_start=$(date +%s)

# Images: the real aarch64 ruff pair when the corpus is there, else generated;
# padded to whole 4 KiB blocks, as partition images are.
corpus=../shared/corpus
if [ -f "$corpus/ruff-arm64-old.zst" ]; then
  zstd -q -d "$corpus/ruff-arm64-old.zst" -o "$work/v1.img"
  zstd -q -d "$corpus/ruff-arm64-new.zst" -o "$work/v2.img"
else
  head -c 3000000 /dev/urandom > "$work/v1.img"
  { head -c 1000000 "$work/v1.img"; head -c 5000 /dev/urandom; tail -c 1900000 "$work/v1.img"; } > "$work/v2.img"
fi
for f in v1 v2; do
  s=$(stat -c %s "$work/$f.img"); truncate -s $(( (s + 4095) / 4096 * 4096 )) "$work/$f.img"
done

mkdir -p "$work/server"
"$server" keygen --out "$work/server" >/dev/null
admin=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
enroll=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
cat > "$work/server/server.toml" <<EOT
listen = "127.0.0.1:0"
data_dir = "data"
admin_token = "$admin"
enrollment_key = "$enroll"
signing_key = "ota-signing.key"
zstd_level = 9
[checkin]
idle_interval_ms = 500
wait_interval_ms = 500
lease_ms = 60000
EOT
"$server" serve --config "$work/server/server.toml" > "$work/server/stdout" 2> "$work/server/log" &
pids+=($!)
for _ in $(seq 100); do grep -q "listening on" "$work/server/stdout" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^ota-server listening on //p' "$work/server/stdout")
[ -n "$addr" ] || { cat "$work/server/log"; exit 1; }
export OTA_SERVER="http://$addr" OTA_ADMIN_TOKEN="$admin"
"$server" release add --version 1.0 --device-type arm64-board --image "$work/v1.img" --wait >/dev/null
"$server" release add --version 2.0 --device-type arm64-board --image "$work/v2.img" --wait | sed 's/^/  /'

d=$work/dev; mkdir -p "$d"
cp "$work/v1.img" "$d/slot-a.img"; : > "$d/slot-b.img"
echo "$enroll" > "$d/enroll.key"
cat > "$d/agent.toml" <<EOT
server_url = "$OTA_SERVER"
device_id = "arm64-1"
device_type = "arm64-board"
enrollment_key_file = "$d/enroll.key"
data_dir = "$d/data"
trusted_keys = ["$work/server/ota-signing.pub"]
factory_version = "1.0"
checkin_interval = "500ms"
max_backoff = "2s"
health_check = "true"
reboot_command = "qemu-aarch64 $arm simulate-boot --env-file $d/boot.env --bootlimit 3"
log_format = "text"
[slots]
a = "$d/slot-a.img"
b = "$d/slot-b.img"
[boot]
backend = "file"
env_file = "$d/boot.env"
bootlimit = 3
EOT
# Power-on: the (simulated) bootloader records which slot it booted.
qemu-aarch64 "$arm" simulate-boot --env-file "$d/boot.env" --bootlimit 3 >/dev/null
( while [ ! -e "$work/stop" ]; do
    qemu-aarch64 "$arm" run --config "$d/agent.toml" >> "$d/agent.log" 2>&1 || sleep 1
  done ) &
pids+=($!)
id=$("$server" rollout create --release 2.0 --device-type arm64-board --max-concurrent 1 --max-starts-per-min 60 2>/dev/null)
t0=$(date +%s)
until "$server" rollout status "$id" | awk '$1=="all"{exit !($9==1)}'; do
  if (( $(date +%s) - t0 > 170 )); then
    "$server" rollout status "$id"; tail -30 "$d/agent.log"; echo "!! the ARM64 agent did not commit in time"; exit 1
  fi
  sleep 1
done
touch "$work/stop"
pkill -TERM -f "ota-agent run --config $work/" 2>/dev/null || true
sleep 1
st=$(qemu-aarch64 "$arm" status --config "$d/agent.toml")
echo "$st" | sed 's/^/  /'
echo "$st" | grep -q '^version: *2.0' || { echo "!! not on 2.0"; exit 1; }
echo "$st" | grep -q '^booted slot: *b' || { echo "!! not booted from slot b"; exit 1; }
size=$(stat -c %s "$work/v2.img")
[ "$(head -c "$size" "$d/slot-b.img" | sha256sum)" = "$(sha256sum < "$work/v2.img")" ] || { echo "!! slot b differs from 2.0"; exit 1; }
echo "ARM64 agent under qemu: enrolled, admitted, downloaded, applied, switched, rebooted, committed; slot B is 2.0 byte for byte ($(( $(date +%s) - t_start )) s)"
