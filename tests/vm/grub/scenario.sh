#!/usr/bin/env bash
# One scenario on the virtual x86-64 device that boots with real GRUB
# (tests/vm/grub/build.sh): OVMF, GRUB with deploy/grub/ota-ab.cfg, the
# ota-agent's grub back-end in the guest writing the grubenv GRUB reads, the
# real ota-server on loopback. The server, releases, rollout and the checks
# of the disk between power cycles are tests/vm/lib.sh's (shared with the
# U-Boot device); what differs here is the machine and where the boot state
# lives (grubenv on the ESP, read on the host with mtools + grub-editenv).
#
#   tests/vm/grub/scenario.sh good        v1 -> v2: GRUB boots B, committed, B == v2
#   tests/vm/grub/scenario.sh badhealth   v2's health check fails: rolled back, GRUB boots A
#   tests/vm/grub/scenario.sh noboot      v2's init exits (kernel panic, panic=5):
#                                         GRUB's bootcount passes bootlimit, A boots
#   tests/vm/grub/scenario.sh noload      B on trial but GRUB cannot load it (no
#                                         kernel): reboots, counts, boots A (no agent)
#   tests/vm/grub/scenario.sh powercut SEED [CUTS]
#                                         the update with CUTS (default 1) power cuts
#                                         (kill -9 of QEMU) at moments drawn from SEED
#                                         (OTA_VM_CUTS_AT replays, as for the U-Boot device)
#   OTA_VM_ACCEL=kvm|tcg                  skip the KVM probe (see accel below)
# Prints one result line "RESULT ..." on stdout.
set -euo pipefail
grub_dir=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/vm/lib.sh
. "$grub_dir/../lib.sh"
vm_build=$grub_dir/build.sh
devtype=ota-vm-x86-64
bootloader=GRUB
scenario=${1:?usage: scenario.sh good|badhealth|noboot|noload|powercut SEED [CUTS]}

# KVM when it works, TCG otherwise. /dev/kvm can exist and still not run a
# firmware: under a nested PVM hypervisor ("kvm-pvm" in dmesg) OVMF stops at
# its first x87 instruction with "KVM internal error. Suberror: 1 /
# emulation failure". So try: OVMF under KVM must reach its boot manager.
accel() {
  if [ -n "${OTA_VM_ACCEL:-}" ]; then echo "$OTA_VM_ACCEL"; return; fi
  [ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo tcg; return; }
  local p=$work/kvm-probe
  cp "$vm/OVMF_VARS.fd" "$p.vars"
  qemu-system-x86_64 -M q35 -accel kvm -cpu host -m 256 -nographic -monitor none -net none \
    -drive "if=pflash,format=raw,readonly=on,file=$vm/OVMF_CODE.fd" -drive "if=pflash,format=raw,file=$p.vars" \
    < /dev/null > "$p.log" 2>&1 &
  local pid=$! res=tcg
  for _ in $(seq 100); do
    grep -aq "BdsDxe\|Shell>" "$p.log" && { res=kvm; break; }
    grep -aq "KVM internal error\|failed to initialize kvm\|Could not access KVM" "$p.log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  [ $res = tcg ] && log "KVM refused ($(grep -a -m1 'KVM\|kvm' "$p.log" || echo 'no boot manager within 10 s')): TCG" 
  echo $res
}

# Power on: OVMF (its variable store kept across power cycles, as NVRAM
# is), one virtio disk, the user-mode network restricted to the one
# forward lib.sh's U-Boot device has: 10.0.2.100:80 is the host's server.
power_on() {
  local fwd="socat STDIO TCP:${addr}"
  [ -f "$work/OVMF_VARS.fd" ] || cp "$vm/OVMF_VARS.fd" "$work/OVMF_VARS.fd"
  [ -n "${vm_accel:-}" ] || { vm_accel=$(accel); log "accelerator: $vm_accel"; }
  local a=(-accel tcg -cpu max)
  [ "$vm_accel" = kvm ] && a=(-accel kvm -cpu host)
  echo "==== power on at $(now)s" >> "$work/console.log"
  qemu-system-x86_64 -M q35 "${a[@]}" -smp 1 -m 512 -nographic -monitor none \
    -drive "if=pflash,format=raw,readonly=on,file=$vm/OVMF_CODE.fd" \
    -drive "if=pflash,format=raw,file=$work/OVMF_VARS.fd" \
    -drive "if=none,file=$work/disk.img,format=raw,id=d,cache=writeback" -device virtio-blk-pci,drive=d,bootindex=0 \
    -netdev "user,id=n,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:${fwd}" \
    -device virtio-net-pci,netdev=n,romfile= < /dev/null >> "$work/console.log" 2>&1 &
  qemu_pid=$!
}

# The boot state as GRUB will read it: grubenv on the ESP (partition 1),
# copied out with mtools and listed by grub-editenv.
host_env() {
  rm -f "$work/grubenv.host"
  mcopy -n -i "$work/disk.img@@$(( $(part_start 1) * 512 ))" ::/boot/grub/grubenv "$work/grubenv.host" 2>/dev/null &&
    grub-editenv "$work/grubenv.host" list
}
env_var() { host_env | sed -n "s/^$1=//p" | grep .; }

boot_and_enroll() {
  power_on
  wait_for 300 "the agent enrolled" console_has "enrolled"
}
# Console lines after the last line matching $1.
console_after() { tail -n +"$(grep -an "$1" "$work/console.log" | tail -1 | cut -d: -f1)" "$work/console.log"; }


case $scenario in
good)
  vm_setup v2
  boot_and_enroll
  rollout_start
  wait_for 900 "the update committed" committed
  secs=$(since_rollout)
  console_has "trial boot 1 of 3 of slot b" || die "GRUB never started a trial boot of slot b"
  console_has "booted slot b version 2.0" || die "the guest never booted slot b with 2.0"
  sleep 2; power_cut
  slot_b_is "$vm/v2.img" || die "slot B differs from 2.0"
  [ "$(env_var boot_part)" = b ] && [ "$(env_var upgrade_available)" = 0 ] && [ "$(env_var bootcount)" = 0 ] ||
    die "boot state after commit: $(host_env | tr '\n' ' ')"
  echo "RESULT good ($vm_accel): rollout start -> committed in ${secs}s; GRUB booted B on trial; slot B == 2.0 byte for byte; grubenv boot_part=b upgrade_available=0"
  ;;
badhealth)
  vm_setup v2-badhealth
  boot_and_enroll
  rollout_start
  wait_for 900 "the rollback reported" rolled_back
  secs=$(since_rollout)
  console_has "booted slot b version 2.0" || die "slot b never booted"
  # The agent's reboot after the rollback: GRUB boots A, no trial.
  wait_for 300 "A booted after the rollback" eval 'console_after "booted slot b version 2.0" | grep -aq "booted slot a version 1.0"'
  sleep 2; power_cut
  [ "$(env_var boot_part)" = a ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state after rollback: $(host_env | tr '\n' ' ')"
  echo "RESULT badhealth ($vm_accel): health check failed on B, the agent rolled back, GRUB booted A; reported rolled-back ${secs}s after rollout start"
  ;;
noboot)
  vm_setup v2-noboot
  boot_and_enroll
  rollout_start
  wait_for 1200 "the rollback reported" rolled_back
  secs=$(since_rollout)
  sleep 2; power_cut
  fails=$(grep -ac "this release does not boot" "$work/console.log" || true)
  console_has "falling back to slot a" || die "GRUB's fallback (bootcount > bootlimit) never ran"
  console_after "falling back to slot a" | grep -aq "booted slot a version 1.0" || die "A did not boot after GRUB's fallback"
  [ "$(env_var boot_part)" = a ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state: $(host_env | tr '\n' ' ')"
  ((fails >= 3)) || die "the broken slot booted $fails times, not bootlimit=3"
  echo "RESULT noboot ($vm_accel): v2 failed to boot $fails times; GRUB's bootcount passed bootlimit=3 and it booted A; reported rolled-back ${secs}s after rollout start"
  ;;
noload)
  # A trial slot GRUB cannot even load (slot B empty: no kernel): the
  # fragment's fallback entry reboots rather than wait for a key, every
  # boot is counted, and past bootlimit GRUB boots A.
  vm_setup v2
  host_env > /dev/null || die "no readable grubenv on the factory disk"
  grub-editenv "$work/grubenv.host" set boot_part=b upgrade_available=1 bootcount=0
  mcopy -o -i "$work/disk.img@@$(( $(part_start 1) * 512 ))" "$work/grubenv.host" ::/boot/grub/grubenv || die "writing grubenv"
  power_on
  wait_for 300 "A booted after GRUB's fallback" console_has "booted slot a version 1.0"
  power_cut
  loads=$(grep -ao "Falling back to .edge-ota: slot b did not load, rebooting" "$work/console.log" | wc -l)
  console_has "falling back to slot a" || die "GRUB's fallback (bootcount > bootlimit) never ran"
  ((loads >= 3)) || die "GRUB rebooted $loads times from the slot that does not load, not bootlimit=3"
  [ "$(env_var boot_part)" = a ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state: $(host_env | tr '\n' ' ')"
  echo "RESULT noload ($vm_accel): slot B without a kernel: GRUB rebooted $loads times, then its bootcount passed bootlimit=3 and it booted A"
  ;;
powercut)
  # tests/vm/lib.sh's trial (the U-Boot device's): CUTS power cuts during
  # the update at moments drawn from SEED; GRUB must never be left to boot
  # an unverified slot, and the update must complete.
  powercut_scenario "${2:?powercut needs a SEED}" "${3:-1}"
  ;;
*) die "unknown scenario $scenario" ;;
esac
