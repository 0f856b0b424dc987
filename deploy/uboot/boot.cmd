# edge-ota reference U-Boot boot script: A/B slots with a trial boot.
#
# Build:   mkimage -A arm64 -T script -C none -n edge-ota -d boot.cmd boot.scr
# Install: boot.scr at the root of the first (or "legacy BIOS bootable")
#          partition, where U-Boot's distro_bootcmd looks for it.
#
# The contract with ota-agent's `uboot` back-end (agent/src/bootctl.rs):
#   boot_part          slot to boot: a or b
#   upgrade_available  1 while the slot is on trial (not yet committed)
#   bootcount          trial boots so far; incremented and saved at every
#                      boot while upgrade_available=1
#   bootlimit          past this many trial boots the other slot boots
#                      (altbootcmd), the trial is cleared, no agent needed;
#                      bootcount stays above zero after a fallback
# The agent sets boot_part=<new>, upgrade_available=1, bootcount=0 to try a
# slot, and upgrade_available=0, bootcount=0 to commit it.
#
# Where the variables live: two copies of a U-Boot environment block in the
# raw GPT partition ${ota_env_part} (libubootenv's redundant layout: CRC32,
# a flags counter byte, then the variables; the copy with the newer counter
# and a good CRC wins, writes go to the other copy, so a power cut during a
# write leaves the previous state intact). The guest's /etc/fw_env.config
# names the same two copies, so fw_printenv/fw_setenv and this script share
# one store. Not U-Boot's built-in `saveenv`: Debian's qemu_arm64 build keeps
# its environment in CFI flash, which Debian's arm64 kernels cannot reach
# (CONFIG_MTD_CFI and CONFIG_MTD_PHYSMAP are off), and a board whose
# environment Linux cannot write cannot be updated. Nor U-Boot's
# CONFIG_BOOTCOUNT_LIMIT (off in that build): the count is kept here, with
# setexpr, in the same store, with the same semantics.

# Board layout (a device maker edits these four lines).
setenv ota_a_part 2
setenv ota_b_part 3
setenv ota_env_part 4
setenv ota_console ttyAMA0

# One copy: 0x20000 bytes = 0x100 blocks of 512 bytes.
setenv ota_envsz 0x20000
setenv ota_envblk 0x100
setenv ota_vars "boot_part upgrade_available bootcount bootlimit"
setenv ota_m1 0x4f000000
setenv ota_m2 0x4f100000
setenv ota_tmp 0x4f200000
setexpr ota_csz ${ota_envsz} - 1
if test -z "${devtype}"; then setenv devtype virtio; setenv devnum 0; fi
if test "${devtype}" = "virtio"; then virtio scan; fi

part start ${devtype} ${devnum} ${ota_env_part} ota_s1
setexpr ota_s2 ${ota_s1} + ${ota_envblk}
${devtype} dev ${devnum}
${devtype} read ${ota_m1} ${ota_s1} ${ota_envblk}
${devtype} read ${ota_m2} ${ota_s2} ${ota_envblk}
setexpr ota_t ${ota_m1} + 4
setexpr.b ota_f1 *${ota_t}
setexpr ota_t ${ota_m2} + 4
setexpr.b ota_f2 *${ota_t}

# `env import -c` checks the CRC of [crc32][data]: move each CRC next to
# its data (over the flags byte, already read) and let U-Boot check it.
setenv ota_ok1 0
setenv ota_ok2 0
setenv boot_part
setenv upgrade_available
setenv bootcount
setenv bootlimit
setexpr ota_c1 ${ota_m1} + 1
cp.b ${ota_m1} ${ota_tmp} 4
cp.b ${ota_tmp} ${ota_c1} 4
setexpr ota_c2 ${ota_m2} + 1
cp.b ${ota_m2} ${ota_tmp} 4
cp.b ${ota_tmp} ${ota_c2} 4
# Which copy is newer (the counter wraps at 255 -> 0, as libubootenv does).
setenv ota_new 1
if itest.b ${ota_f2} > ${ota_f1}; then setenv ota_new 2; fi
if itest.b ${ota_f1} == 0xff && itest.b ${ota_f2} == 0; then setenv ota_new 2; fi
if itest.b ${ota_f2} == 0xff && itest.b ${ota_f1} == 0; then setenv ota_new 1; fi
# Import the older copy first, the newer last: the newer good copy wins.
if test ${ota_new} = 2; then
  if env import -c ${ota_c1} ${ota_csz} ${ota_vars}; then setenv ota_ok1 1; fi
  if env import -c ${ota_c2} ${ota_csz} ${ota_vars}; then setenv ota_ok2 1; fi
else
  if env import -c ${ota_c2} ${ota_csz} ${ota_vars}; then setenv ota_ok2 1; fi
  if env import -c ${ota_c1} ${ota_csz} ${ota_vars}; then setenv ota_ok1 1; fi
fi
# The active copy (good and newest) and its counter; writes go to the other.
setenv ota_act 0
if test ${ota_ok1} = 1; then setenv ota_act 1; setenv ota_fa ${ota_f1}; fi
if test ${ota_ok2} = 1; then
  if test ${ota_ok1} = 0 || test ${ota_new} = 2; then setenv ota_act 2; setenv ota_fa ${ota_f2}; fi
fi
echo "edge-ota: boot state copy 1 ${ota_ok1} (flags ${ota_f1}), copy 2 ${ota_ok2} (flags ${ota_f2}), using ${ota_act}"
if test ${ota_act} = 0; then
  echo "edge-ota: no valid boot state: booting slot a, factory state"
  setenv ota_fa 0
fi
if test -z "${boot_part}"; then setenv boot_part a; fi
if test -z "${bootlimit}"; then setenv bootlimit 3; fi
if test -z "${bootcount}"; then setenv bootcount 0; fi
if test -z "${upgrade_available}"; then setenv upgrade_available 0; fi

# Saves the variables into the inactive copy with the next counter value.
setenv ota_save ' setexpr.b ota_fn ${ota_fa} + 1; if test ${ota_act} = 2; then setenv ota_wm ${ota_m1}; setenv ota_ws ${ota_s1}; setenv ota_act 1; else setenv ota_wm ${ota_m2}; setenv ota_ws ${ota_s2}; setenv ota_act 2; fi; mw.b ${ota_wm} 0 ${ota_envsz}; setexpr ota_c ${ota_wm} + 1; env export -c -s ${ota_csz} ${ota_c} ${ota_vars}; cp.b ${ota_c} ${ota_tmp} 4; cp.b ${ota_tmp} ${ota_wm} 4; setexpr ota_t ${ota_wm} + 4; mw.b ${ota_t} ${ota_fn} 1; ${devtype} write ${ota_wm} ${ota_ws} ${ota_envblk}; setenv ota_fa ${ota_fn}'

# The fallback when a trial slot has booted bootlimit times uncommitted.
# bootcount is LEFT above zero: it is how the agent tells a fallback from a
# switch that never reached the environment (a power cut during the write),
# which it would verify and try again. The agent resets it when it reports
# the rollback's outcome or switches next.
setenv altbootcmd ' if test "${boot_part}" = "b"; then setenv boot_part a; else setenv boot_part b; fi; echo "edge-ota: bootcount ${bootcount} > bootlimit ${bootlimit}: falling back to slot ${boot_part}"; setenv upgrade_available 0; run ota_save'

if test "${upgrade_available}" = "1"; then
  # setexpr answers in hex: the same digits as decimal while bootlimit < 10.
  setexpr bootcount ${bootcount} + 1
  if itest ${bootcount} > ${bootlimit}; then
    run altbootcmd
  else
    echo "edge-ota: trial boot ${bootcount} of ${bootlimit} of slot ${boot_part}"
    run ota_save
  fi
fi

if test "${boot_part}" = "b"; then setenv ota_part ${ota_b_part}; else setenv ota_part ${ota_a_part}; fi
echo "edge-ota: booting slot ${boot_part} (partition ${ota_part})"
if load ${devtype} ${devnum}:${ota_part} ${kernel_addr_r} /boot/Image && setenv ota_ksz ${filesize} && load ${devtype} ${devnum}:${ota_part} ${ramdisk_addr_r} /boot/initrd.img; then
  setenv bootargs "console=${ota_console} root=/dev/vda${ota_part} ro panic=1 ota.slot=${boot_part}"
  booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
fi
# Not bootable: a trial slot is counted at the next boot and abandoned at
# bootlimit; a committed slot that cannot load is a broken device.
echo "edge-ota: slot ${boot_part} did not load; resetting"
reset
