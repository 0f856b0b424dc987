#!/usr/bin/env bash
# One scenario on the virtual ARM64 device (tests/vm/build.sh): real U-Boot,
# the real static ota-agent in the guest, the real ota-server on loopback.
#
#   tests/vm/scenario.sh good          v1 -> v2: committed, B == v2 byte for byte
#   tests/vm/scenario.sh badhealth     v2's health check fails: rolled back, A boots
#   tests/vm/scenario.sh noboot        v2's init exits (kernel panic, panic=1):
#                                      U-Boot's bootcount passes bootlimit, A boots
#   tests/vm/scenario.sh corrupt-env   either copy of the boot state corrupted: still boots
#   tests/vm/scenario.sh powercut SEED [CUTS]
#                                      the update with CUTS (default 1) power cuts
#                                      (kill -9 of QEMU) at moments drawn from SEED
#   OTA_VM_CUTS_AT="12.5 40.1"         replay: cut at these seconds after the rollout starts
#   tests/vm/scenario.sh systemd       systemd as PID 1 (build.sh systemd): the unit's
#                                      Type=notify readiness, WatchdogSec= against a hung
#                                      main loop, then v1 -> v2 rebooting through systemd
# Prints one result line "RESULT ..." on stdout.
set -euo pipefail
# shellcheck source=tests/vm/lib.sh
. "$(dirname "$0")/lib.sh"
scenario=${1:?usage: scenario.sh good|badhealth|noboot|corrupt-env|systemd|powercut SEED [CUTS]}

boot_and_enroll() {
  power_on
  wait_for 120 "the agent enrolled" console_has "enrolled"
}

case $scenario in
good)
  vm_setup v2
  boot_and_enroll
  rollout_start
  wait_for 600 "the update committed" committed
  secs=$(since_rollout)
  console_has "booted slot b version 2.0" || die "the guest never booted slot b with 2.0"
  sleep 2; power_cut
  slot_b_is "$vm/v2.img" || die "slot B differs from 2.0"
  [ "$(env_var boot_part)" = b ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state after commit: $(host_env | tr '\n' ' ')"
  echo "RESULT good: rollout start -> committed in ${secs}s under emulation; slot B == 2.0 byte for byte; boot_part=b committed"
  ;;
badhealth)
  vm_setup v2-badhealth
  boot_and_enroll
  rollout_start
  wait_for 600 "the rollback reported" rolled_back
  secs=$(since_rollout)
  console_has "booted slot b version 2.0" || die "slot b never booted"
  sleep 2; power_cut
  [ "$(env_var boot_part)" = a ] && [ "$(env_var upgrade_available)" = 0 ] || die "boot state after rollback: $(host_env | tr '\n' ' ')"
  tail -n +"$(grep -n 'booted slot b version 2.0' "$work/console.log" | tail -1 | cut -d: -f1)" "$work/console.log" |
    grep -q "booted slot a version 1.0" || die "A did not boot after the rollback"
  echo "RESULT badhealth: health check failed on B, rolled back, A boots; reported rolled-back ${secs}s after rollout start"
  ;;
noboot)
  vm_setup v2-noboot
  boot_and_enroll
  rollout_start
  wait_for 900 "the rollback reported" rolled_back
  secs=$(since_rollout)
  sleep 2; power_cut
  fails=$(grep -c "this release does not boot" "$work/console.log" || true)
  console_has "falling back to slot a" || die "U-Boot's altbootcmd never ran"
  [ "$(env_var boot_part)" = a ] || die "boot state: $(host_env | tr '\n' ' ')"
  ((fails >= 1)) || die "the broken slot never booted"
  echo "RESULT noboot: v2 failed to boot $fails times; U-Boot's bootcount passed bootlimit=3 and altbootcmd booted A; reported rolled-back ${secs}s after rollout start"
  ;;
corrupt-env)
  vm_setup v2
  # A second copy of the boot state written by libubootenv (newer counter),
  # then each copy corrupted in turn: U-Boot must boot from the other.
  host_env >/dev/null || die "no readable boot state on the factory disk"
  # (a value that changes: libubootenv writes nothing when nothing changes)
  fw_setenv -c "$work/fw_env.config" ota_note copy-2-written || die "fw_setenv on the host"
  off=$(( $(part_start 4) * 512 ))
  for copy in 2 1; do
    [ "$(dd if="$work/disk.img" bs=1 skip=$((off + 0x20000 + 4)) count=1 status=none | od -An -tu1 | tr -d ' ')" = 2 ] ||
      die "copy 2 of the boot state was not written by fw_setenv"
    start=$(( off + (copy - 1) * 0x20000 + 8 ))
    printf 'XXXXXXXX' | dd of="$work/disk.img" bs=1 seek="$start" conv=notrunc status=none
    : > "$work/console.log"
    power_on
    wait_for 120 "a boot with copy $copy corrupted" console_has "booted slot a version 1.0"
    power_cut
    other=$((3 - copy))
    grep -q "copy $copy 0 .*using $other" "$work/console.log" || die "U-Boot did not report copy $copy bad and use copy $other"
    # Restore: rewrite both copies through libubootenv for the next round.
    dd if="$vm/disk.img" of="$work/disk.img" bs=512 skip=$((off / 512)) seek=$((off / 512)) count=512 conv=notrunc status=none
    fw_setenv -c "$work/fw_env.config" ota_note copy-2-written || die "fw_setenv on the host"
  done
  echo "RESULT corrupt-env: with either copy of the boot state corrupted, U-Boot used the other and booted"
  ;;
powercut)
  powercut_scenario "${2:?powercut needs a SEED}" "${3:-1}"
  ;;
systemd)
  # shellcheck source=tests/vm/systemd/scenario.sh
  . "$here/systemd/scenario.sh"
  ;;
*) die "unknown scenario $scenario" ;;
esac
