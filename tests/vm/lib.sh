# Shared by the VM scenario scripts: the server, the VM's power switch, and
# checks of the disk as the host sees it between power cycles.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
server=${OTA_SERVER_BIN:-$root/target/debug/ota-server}
devtype=ota-vm-arm64
qemu_pid=
server_pid=
t_start=$(date +%s.%N)
now() { printf '%.1f' "$(echo "$(date +%s.%N) - $t_start" | bc)"; }
log() { echo "[$(now)s] $*" >&2; }
die() {
  log "FAIL: $*"
  [ -f "$work/console.log" ] && { echo "---- last console lines ($work/console.log)" >&2; tail -40 "$work/console.log" >&2; }
  exit 1
}

cleanup() {
  [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null
  wait 2>/dev/null
  if [ -n "${OTA_VM_KEEP:-}" ]; then log "kept $work"; else rm -rf "$work"; fi
}

# vm_setup VARIANT: a fresh factory disk, a server with 1.0 and 2.0 (= the
# slot image VARIANT), started. Release data is built once per VM build and
# copied (sled data dir of a stopped server) for the next scenario.
# $vm_build is the device's build script (tests/vm/grub/ sets its own).
vm_setup() {
  vm=$("${vm_build:-$here/build.sh}" "${flavor:-busybox}") || die "building the VM failed"
  work=$(mktemp -d "${TMPDIR:-/tmp}/ota-vm.XXXXXX")
  trap cleanup EXIT
  cp --sparse=always "$vm/disk.img" "$work/disk.img"
  : > "$work/console.log"
  local rel=$vm/server-$1
  if [ ! -f "$rel/done" ]; then
    rm -rf "$rel"; mkdir -p "$rel"
    server_conf "$rel"
    server_start "$rel"
    "$server" release add --version 1.0 --device-type $devtype --image "$vm/v1.img" --wait >/dev/null || die "release 1.0"
    "$server" release add --version 2.0 --device-type $devtype --image "$vm/$1.img" --wait >/dev/null || die "release 2.0"
    kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
    touch "$rel/done"
  fi
  mkdir -p "$work/server"
  cp -a "$rel/data" "$rel/server.toml" "$work/server/"
  server_start "$work/server"
  log "server $OTA_SERVER; VM $vm; work $work"
}

server_conf() {
  cat > "$1/server.toml" <<EOT
listen = "127.0.0.1:0"
data_dir = "data"
admin_token = "ff1f62036ee69e12be023c077d0ef6209b975649be73425a49e52694724c56c3"
enrollment_key = "119c431b7ea4a2186958b8651a2ef823757e6c65c784fe02d207ff527ae9b378"
signing_key = "$vm/ota-signing.key"
zstd_level = 9
[checkin]
idle_interval_ms = 1000
wait_interval_ms = 1000
lease_ms = 600000
EOT
}

server_start() {
  (cd "$1" && exec "$server" serve --config server.toml > stdout 2> log) &
  server_pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$1/stdout" 2>/dev/null && break; sleep 0.1; done
  addr=$(sed -n 's/^ota-server listening on //p' "$1/stdout")
  [ -n "$addr" ] || { cat "$1/log" >&2; die "ota-server did not start"; }
  export OTA_SERVER="http://$addr" OTA_ADMIN_TOKEN=ff1f62036ee69e12be023c077d0ef6209b975649be73425a49e52694724c56c3
}

# Power on: U-Boot from Debian's u-boot-qemu, one virtio disk, user-mode
# network restricted to one forward: 10.0.2.100:80 in the guest is the
# server on the host's loopback (socat per connection); nothing else.
# With $gate set, a connection reaches the server only while the file
# $gate exists (it is closed at once otherwise: the server "unreachable").
power_on() {
  local fwd="socat STDIO TCP:${addr}"
  [ -n "${gate:-}" ] && fwd="sh -c 'test -e $gate && exec socat STDIO TCP:${addr}'"
  echo "==== power on at $(now)s" >> "$work/console.log"
  qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 1 -m 384 -nographic -monitor none \
    -bios "$vm/u-boot.bin" \
    -drive "if=none,file=$work/disk.img,format=raw,id=d,cache=writeback" -device virtio-blk-device,drive=d \
    -netdev "user,id=n,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:${fwd}" \
    -device virtio-net-device,netdev=n < /dev/null >> "$work/console.log" 2>&1 &
  qemu_pid=$!
}

# Power cut: the emulator killed (guest page cache, unflushed writes: gone).
power_cut() {
  kill -9 "$qemu_pid" 2>/dev/null; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=
  echo "==== power cut at $(now)s" >> "$work/console.log"
}

# The boot state as U-Boot will read it, through libubootenv on the host.
part_start() { sgdisk -i "$1" "$work/disk.img" | sed -n 's/^First sector: \([0-9]*\).*/\1/p'; }
host_env() {
  local off; off=$(( $(part_start 4) * 512 ))
  printf '%s 0x%x 0x20000 0x20000\n%s 0x%x 0x20000 0x20000\n' "$work/disk.img" "$off" "$work/disk.img" $((off + 0x20000)) > "$work/fw_env.config"
  fw_printenv -c "$work/fw_env.config" "$@" 2>/dev/null
}
env_var() { host_env -n "$1"; }
# Slot B holds image $1 byte for byte.
slot_b_is() {
  local size; size=$(stat -c %s "$1")
  [ "$(dd if="$work/disk.img" bs=512 skip="$(part_start 3)" count=$((size / 512)) status=none | sha256sum)" = "$(sha256sum < "$1")" ]
}
# The invariant after any power cut: the bootloader never boots into a slot
# that is not a verified image: if B is next, B is 2.0 byte for byte.
check_bootable() {
  local part; part=$(env_var boot_part) || part=a
  if [ "$part" = b ]; then
    slot_b_is "$1" || die "${bootloader:-U-Boot} would boot slot b, which is not the verified 2.0 image (moment: $2)"
  fi
  log "  after the cut: boot_part=$part upgrade_available=$(env_var upgrade_available || echo -) bootcount=$(env_var bootcount || echo -): ok"
}

rollout_col() { "$server" rollout status "$rid" | awk -v c="$1" '$1=="all"{print $c}'; }
committed() { [ "$(rollout_col 9)" = 1 ]; }
rolled_back() { [ "$(rollout_col 11)" = 1 ]; }
wait_for() { # seconds description command...
  local limit=$1 what=$2; shift 2
  local t0=$SECONDS
  until "$@"; do
    (( SECONDS - t0 < limit )) || { "$server" rollout status "$rid" >&2 || true; die "$what: not within ${limit}s"; }
    sleep 1
  done
}
rollout_start() {
  rid=$("$server" rollout create --release 2.0 --device-type $devtype --max-concurrent 1 --max-starts-per-min 60 2>/dev/null) || die "rollout create"
  t_rollout=$(date +%s.%N)
}
since_rollout() { printf '%.0f' "$(echo "$(date +%s.%N) - $t_rollout" | bc)"; }
console_has() { grep -q "$1" "$work/console.log"; }

# powercut_scenario SEED CUTS: the update v1 -> v2 with CUTS power cuts
# (kill -9 of QEMU) at moments drawn from SEED (or $OTA_VM_CUTS_AT); after
# each, the boot state on the disk must not name an unverified slot; then the
# update must complete. The scenario script defines boot_and_enroll.
powercut_scenario() {
  local seed=$1 cuts=$2 span t i phase secs at moments
  vm_setup v2
  RANDOM=$seed
  # Moments: seconds after the rollout starts, spread over a typical
  # update (download, apply, fsync, env write, reboot, first boot, commit).
  span=${OTA_VM_CUT_SPAN:-70}
  if [ -n "${OTA_VM_CUTS_AT:-}" ]; then read -ra at <<< "$OTA_VM_CUTS_AT"; else
    at=(); for ((i = 0; i < cuts; i++)); do at+=("$((RANDOM % (span * 10) / 10)).$((RANDOM % 10))"); done
  fi
  mapfile -t at < <(printf '%s\n' "${at[@]}" | sort -n)
  boot_and_enroll
  rollout_start
  moments=()
  for t in "${at[@]}"; do
    while (( $(echo "$(date +%s.%N) - $t_rollout < $t" | bc) )); do sleep 0.1; done
    phase=$(sed 's/\x1b\[[0-9;]*m//g' "$work/console.log" | grep -a -E 'ota-vm:|INFO|WARN|ERROR|edge-ota:|Starting kernel' | tail -1 | cut -c1-160)
    power_cut
    moments+=("+${t}s")
    log "cut at +${t}s (seed $seed) during: $phase"
    check_bootable "$vm/v2.img" "seed $seed, cut at +${t}s"
    committed && { log "  (already committed)"; }
    power_on
  done
  wait_for 900 "the update completed after the power cuts (seed $seed, cuts ${moments[*]})" committed
  secs=$(since_rollout)
  sleep 2; power_cut
  slot_b_is "$vm/v2.img" || die "slot B differs from 2.0 (seed $seed, cuts ${moments[*]})"
  [ "$(env_var boot_part)" = b ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state: $(host_env | tr '\n' ' ') (seed $seed)"
  echo "RESULT powercut seed=$seed cuts=${moments[*]}: survived, committed ${secs}s after rollout start, slot B == 2.0"
}
