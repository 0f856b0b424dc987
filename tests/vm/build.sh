#!/usr/bin/env bash
# Builds the virtual ARM64 test device from Debian packages only, and caches
# it: prints the directory holding it (last line of stdout).
#
#   tests/vm/build.sh            (OTA_SERVER_BIN, ARM_AGENT may point at the binaries)
#   tests/vm/build.sh systemd    the same device with systemd as PID 1 in each
#                                slot (ARM_AGENT_HOOKS: the agent built with
#                                --features test-hooks; tests/vm/systemd/)
#
# What it makes, under target/vm-cache/<hash of every input>/:
#   disk.img       the factory disk: GPT with 1 boot (ext4: boot.scr),
#                  2 rootfs A (= v1.img), 3 rootfs B (empty), 4 boot state
#                  (two U-Boot environment copies), 5 data (ext4, agent state)
#   v1.img v2.img v2-badhealth.img v2-noboot.img   slot images (ext4)
#   ota-signing.key ota-signing.pub                 the update signing key
#   u-boot.bin                                       Debian's qemu_arm64 U-Boot
# Packages come from Debian through apt with a private state directory
# (no dpkg --add-architecture, no root needed): the arm64 kernel, busybox,
# libubootenv-tool and the libraries it links (and for `systemd`: systemd,
# dbus and the libraries they link). Nothing else is downloaded.
#
# The systemd flavour lives in target/vm-cache/sd-<hash>/ (the same files
# but the two broken releases); its
# slots are 112 MiB (systemd and its libraries) and run the real
# deploy/ota-agent.service with the test drop-in from tests/vm/systemd/.
# Its agent is a second build with the test-only hang hook: the shipped
# agent-dist binary (busybox flavour) stays free of it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${OTA_VM_CACHE:-$root/target/vm-cache}
flavor=${1:-busybox}
case $flavor in
busybox) agent=${ARM_AGENT:-$root/target/aarch64-unknown-linux-musl/agent-dist/ota-agent}; prefix= ;;
systemd) agent=${ARM_AGENT_HOOKS:-$root/target/aarch64-unknown-linux-musl/agent-dist/ota-agent-test-hooks}; prefix=sd- ;;
*) echo "usage: tests/vm/build.sh [busybox|systemd]" >&2; exit 2 ;;
esac
server=${OTA_SERVER_BIN:-$root/target/debug/ota-server}
uboot=/usr/lib/u-boot/qemu_arm64/u-boot.bin
kver=6.1.0-57-cloud-arm64
need() { command -v "$1" >/dev/null || { echo "tests/vm/build.sh: $1 is missing (apt-get install $2)" >&2; exit 2; }; }
need qemu-system-aarch64 qemu-system-arm; need mkimage u-boot-tools; need mkenvimage u-boot-tools
need sgdisk gdisk; need mkfs.ext4 e2fsprogs; need cpio cpio; need depmod kmod; need zstd zstd
[ -f "$uboot" ] || { echo "tests/vm/build.sh: $uboot is missing (apt-get install u-boot-qemu)" >&2; exit 2; }
if [ "$flavor" = systemd ]; then
  [ -x "$agent" ] || { echo "tests/vm/build.sh: no test-hooks ARM64 agent at $agent (scripts/build-vm-agents.sh builds it)" >&2; exit 2; }
else
  [ -x "$agent" ] || { echo "tests/vm/build.sh: no ARM64 agent at $agent: cargo build --profile agent-dist --target aarch64-unknown-linux-musl -p ota-agent" >&2; exit 2; }
fi
[ -x "$server" ] || { echo "tests/vm/build.sh: no ota-server at $server (cargo build -p ota-server)" >&2; exit 2; }

# Debian arm64 packages, through apt with its own lists and cache.
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache/debs"
: > "$apt_dir/status"
apt_o=(-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
  -o "Dir::Cache=$apt_dir" -o APT::Architecture=arm64 -o APT::Architectures::=arm64
  -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
pkgs=(linux-image-$kver busybox-static libubootenv-tool libubootenv0.1 zlib1g libc6 ca-certificates)
# systemd 252 and what it, libsystemd-shared and dbus-daemon link
# (aarch64-linux-gnu-readelf -d: NEEDED), nothing more: no udev (devtmpfs
# has the nodes; nothing here waits for a .device unit).
sd_pkgs=(systemd libsystemd-shared libacl1 libapparmor1 libaudit1 libcap-ng0 libblkid1 libcap2 libcrypt1
  libgcrypt20 libgpg-error0 libip4tc2 libkmod2 liblz4-1 liblzma5 libmount1 libpam0g libpcre2-8-0
  libseccomp2 libselinux1 libzstd1 libssl3 libgcc-s1 dbus dbus-daemon dbus-system-bus-common libdbus-1-3
  libexpat1 libsystemd0)
[ "$flavor" = systemd ] && pkgs+=("${sd_pkgs[@]}")
if [ -z "$(find "$apt_dir/lists" -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  apt-get "${apt_o[@]}" -qq update >&2
fi
vers=()
for p in "${pkgs[@]}"; do
  v=$(apt-cache "${apt_o[@]}" policy "$p" | sed -n 's/^ *Candidate: //p')
  [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "tests/vm/build.sh: no arm64 candidate for $p" >&2; exit 2; }
  vers+=("$p=$v")
done
(cd "$cache/debs" && for pv in "${vers[@]}"; do
  p=${pv%%=*}; v=${pv#*=}
  ls "${p}_"*"${v#*:}"_*.deb >/dev/null 2>&1 || apt-get "${apt_o[@]}" -qq download "$pv" >&2
done)

key=$prefix$( { printf '%s\n' "$flavor" "${vers[@]}"; { find "$here" -type f | LC_ALL=C sort; printf '%s\n' "$uboot" "$agent" "$root/deploy/uboot/boot.cmd" "$root/deploy/ota-agent.service"; } | xargs sha256sum | cut -c1-64; } | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/done" ]; then echo "$out"; exit 0; fi
echo "building the VM into $out" >&2
# Only the result's path goes to stdout (mkfs and friends talk).
exec 3>&1 1>&2
rm -rf "$out.tmp"; mkdir -p "$out.tmp"; w=$out.tmp/work; mkdir -p "$w"
deb() { ls "$cache/debs/${1}_"*.deb | tail -1; }

# Kernel and its modules; the initramfs loads the virtio drivers.
mkdir -p "$w/k" "$w/u"
dpkg-deb -x "$(deb "linux-image-$kver")" "$w/k"
for p in busybox-static libubootenv-tool libubootenv0.1 zlib1g libc6 ca-certificates; do dpkg-deb -x "$(deb "$p")" "$w/u"; done
if [ "$flavor" = systemd ]; then
  mkdir -p "$w/sd"
  for p in libc6 zlib1g "${sd_pkgs[@]}"; do dpkg-deb -x "$(deb "$p")" "$w/sd"; done
fi
depmod -b "$w/k" "$kver"
mkdir -p "$w/initrd/bin" "$w/initrd/modules" "$w/initrd/proc" "$w/initrd/sys" "$w/initrd/dev"
cp "$w/u/bin/busybox" "$w/initrd/bin/busybox"
: > "$w/initrd/modules/order"
for m in virtio_mmio virtio_blk virtio_net; do
  modprobe -d "$w/k" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  cp "$ko" "$w/initrd/modules/"; basename "$ko" >> "$w/initrd/modules/order"
done
install -m 755 "$here/initrd-init" "$w/initrd/init"
(cd "$w/initrd" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible | gzip -9n) > "$w/initrd.img"

# Signing key (the test server signs with it; the slots trust it).
"$server" keygen --out "$out.tmp" >/dev/null

# The slot userland: busybox, the agent, fw_printenv/fw_setenv and libs.
r=$w/rootfs
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,lib,etc/ota-agent,boot,proc,sys,dev,run,tmp,data}
cp "$w/u/bin/busybox" "$r/bin/busybox"
for a in $("$w/u/bin/busybox" --list 2>/dev/null || qemu-aarch64 "$w/u/bin/busybox" --list); do
  [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"
done
cp -a "$w/u/usr/bin/fw_printenv" "$w/u/usr/bin/fw_setenv" "$r/usr/bin/" 2>/dev/null ||
  cp -a "$w/u/usr/bin/fw_printenv" "$r/usr/bin/"
[ -e "$r/usr/bin/fw_setenv" ] || ln -s fw_printenv "$r/usr/bin/fw_setenv"
mkdir -p "$r/lib/aarch64-linux-gnu"
for l in ld-linux-aarch64.so.1 libc.so.6; do cp -L "$w/u/lib/aarch64-linux-gnu/$l" "$r/lib/aarch64-linux-gnu/"; done
cp -a "$w/u"/usr/lib/aarch64-linux-gnu/libubootenv.so.* "$r/lib/aarch64-linux-gnu/"
cp -a "$w/u"/lib/aarch64-linux-gnu/libz.so.* "$r/lib/aarch64-linux-gnu/" 2>/dev/null ||
  cp -a "$w/u"/usr/lib/aarch64-linux-gnu/libz.so.* "$r/lib/aarch64-linux-gnu/"
ln -s lib "$r/lib64" 2>/dev/null || true
cp -L "$w/u/lib/ld-linux-aarch64.so.1" "$r/lib/ld-linux-aarch64.so.1" 2>/dev/null ||
  ln -s aarch64-linux-gnu/ld-linux-aarch64.so.1 "$r/lib/ld-linux-aarch64.so.1"
install -m 755 "$agent" "$r/usr/bin/ota-agent"
# The agent's HTTP client loads the system roots (https:// servers); what
# update-ca-certificates would make from Debian's ca-certificates.
mkdir -p "$r/etc/ssl/certs"
cat "$w"/u/usr/share/ca-certificates/mozilla/*.crt > "$r/etc/ssl/certs/ca-certificates.crt"
install -m 755 "$here/rootfs-init" "$r/sbin/init"
cp "$here/fw_env.config" "$r/etc/fw_env.config"
cp "$here/agent.toml" "$r/etc/ota-agent/agent.toml"
cp "$out.tmp/ota-signing.pub" "$r/etc/ota-agent/ota-signing.pub"
echo 119c431b7ea4a2186958b8651a2ef823757e6c65c784fe02d207ff527ae9b378 > "$r/etc/ota-agent/enrollment.key"
zstd -q -d -c "$(ls "$w/k/boot/vmlinuz-$kver")" > "$r/boot/Image" 2>/dev/null ||
  cp "$w/k/boot/vmlinuz-$kver" "$r/boot/Image"
cp "$w/initrd.img" "$r/boot/initrd.img"
slot_mb=48
if [ "$flavor" = systemd ]; then
  slot_mb=112
  . "$here/systemd/rootfs.sh"
fi
mkslot() { # name version health-check-body [init-override]
  local d=$w/slot-$1
  rm -rf "$d"; cp -a "$r" "$d"
  echo "$2" > "$d/etc/ota-version"
  printf '#!/bin/sh\n%s\n' "$3" > "$d/etc/ota-agent/health-check"; chmod 755 "$d/etc/ota-agent/health-check"
  if [ -n "${4:-}" ]; then rm -f "$d/sbin/init"; printf '#!/bin/sh\n%s\n' "$4" > "$d/sbin/init"; chmod 755 "$d/sbin/init"; fi
  # A release changes files, not only the version: a real delta to apply.
  head -c 2000000 /dev/zero | tr '\0' "${2:0:1}" > "$d/etc/payload-$2"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L "slot-$2" -U clear -E root_owner=0:0,hash_seed=00000000-0000-0000-0000-000000000000 \
    -O ^has_journal -b 4096 -d "$d" "$out.tmp/$1.img" "${slot_mb}M"
}
healthy='grep -q "ota.slot=" /proc/cmdline && fw_printenv boot_part >/dev/null'
mkslot v1 1.0 "$healthy"
mkslot v2 2.0 "$healthy"
# (the systemd device runs only the good update: no broken releases)
if [ "$flavor" = busybox ]; then
  mkslot v2-badhealth 2.0 'echo "health check: this release is deliberately unhealthy" >&2; exit 1'
  mkslot v2-noboot 2.0 "$healthy" 'echo "ota-vm: this release does not boot: init exits"; exit 1'
fi

# Boot partition (boot.scr), boot state, data; then the GPT disk.
mkdir -p "$w/bootp"
mkimage -A arm64 -T script -C none -n edge-ota -d "$root/deploy/uboot/boot.cmd" "$w/bootp/boot.scr" >/dev/null
mkfs.ext4 -q -F -L boot -d "$w/bootp" "$w/boot.img" 4M
printf 'boot_part=a\nbootlimit=3\nbootcount=0\nupgrade_available=0\n' > "$w/env.txt"
mkenvimage -r -s 0x20000 -o "$w/env1.img" "$w/env.txt"
cp "$w/env1.img" "$out.tmp/env-copy.img"
mkfs.ext4 -q -F -L data "$w/data.img" 16M
d=$out.tmp/disk.img
truncate -s $((slot_mb * 2 + 44))M "$d"
sgdisk -o \
  -n 1:2048:+4M -c 1:boot -A 1:set:2 \
  -n 2:0:+${slot_mb}M -c 2:rootfs-a \
  -n 3:0:+${slot_mb}M -c 3:rootfs-b \
  -n 4:0:+1M -c 4:boot-state \
  -n 5:0:+16M -c 5:data "$d" >/dev/null
put() { # partition image
  local start; start=$(sgdisk -i "$1" "$d" | sed -n 's/^First sector: \([0-9]*\).*/\1/p')
  dd if="$2" of="$d" bs=512 seek="$start" conv=notrunc,sparse status=none
}
put 1 "$w/boot.img"; put 2 "$out.tmp/v1.img"; put 4 "$w/env1.img"; put 5 "$w/data.img"
cp "$uboot" "$out.tmp/u-boot.bin"
rm -rf "$w"
touch "$out.tmp/done"
mv "$out.tmp" "$out"
# Older builds of this flavour go (only the current one is ever used).
if [ -n "$prefix" ]; then sel=(-name "${prefix}*"); else sel=(-not -name "sd-*"); fi
# (grub/: the x86-64 GRUB device's own cache, tests/vm/grub/build.sh.)
find "$cache" -mindepth 1 -maxdepth 1 -type d -not -name apt -not -name debs -not -name grub -not -name "$key" "${sel[@]}" -exec rm -rf {} +
echo "$out" >&3
