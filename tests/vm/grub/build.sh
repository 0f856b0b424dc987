#!/usr/bin/env bash
# Builds the virtual x86-64 test device that boots with real GRUB, from
# Debian packages only, and caches it: prints the directory holding it
# (last line of stdout).
#
#   tests/vm/grub/build.sh       (OTA_SERVER_BIN, X86_AGENT may point at the binaries)
#
# What it makes, under target/vm-cache/grub/<hash of every input>/:
#   disk.img   the factory disk: GPT with 1 esp (FAT: GRUB as
#              \EFI\BOOT\BOOTX64.EFI, /boot/grub/grub.cfg, ota-ab.cfg,
#              grubenv), 2 rootfs-a (= v1.img), 3 rootfs-b (empty), 4 data
#              (ext4, agent state)
#   v1.img v2.img v2-badhealth.img v2-noboot.img   slot images (ext4)
#   ota-signing.key ota-signing.pub                 the update signing key
#   OVMF_CODE.fd OVMF_VARS.fd                       the UEFI firmware (Debian ovmf)
#
# Firmware and bootloader come from the host's Debian packages (ovmf,
# grub-efi-amd64-bin: GRUB's EFI image is made here with grub-mkimage, its
# config is deploy/grub/ota-ab.cfg unchanged). The guest's packages come
# through apt with a private state directory (no root needed): Debian's
# cloud amd64 kernel, busybox, grub-common (grub-editenv: the agent's grub
# back-end writes the grubenv GRUB reads) and the libraries they link.
# The agent is the host's own debug build (target/debug/ota-agent, x86-64,
# glibc: Debian's libc6 goes into the slot with it), stripped: the cheapest
# correct agent for an x86-64 guest, one CI builds anyway for the tests.
# The FAT ESP and the GPT are made without root (mtools, sgdisk).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cache=${OTA_VM_CACHE:-$root/target/vm-cache}/grub
agent=${X86_AGENT:-$root/target/debug/ota-agent}
server=${OTA_SERVER_BIN:-$root/target/debug/ota-server}
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.fd
ovmf_vars=/usr/share/OVMF/OVMF_VARS_4M.fd
grub_mods=/usr/lib/grub/x86_64-efi
need() { command -v "$1" >/dev/null || { echo "tests/vm/grub/build.sh: $1 is missing (apt-get install $2)" >&2; exit 2; }; }
need qemu-system-x86_64 qemu-system-x86; need grub-mkimage grub-common; need grub-editenv grub-common
need mformat mtools; need mcopy mtools; need mmd mtools
need sgdisk gdisk; need mkfs.ext4 e2fsprogs; need cpio cpio; need depmod kmod; need strip binutils
[ -f "$ovmf_code" ] && [ -f "$ovmf_vars" ] || { echo "tests/vm/grub/build.sh: $ovmf_code is missing (apt-get install ovmf)" >&2; exit 2; }
[ -f "$grub_mods/linux.mod" ] || { echo "tests/vm/grub/build.sh: $grub_mods is missing (apt-get install grub-efi-amd64-bin)" >&2; exit 2; }
[ -x "$agent" ] || { echo "tests/vm/grub/build.sh: no x86-64 agent at $agent (cargo build -p ota-agent)" >&2; exit 2; }
[ -x "$server" ] || { echo "tests/vm/grub/build.sh: no ota-server at $server (cargo build -p ota-server)" >&2; exit 2; }

# Debian amd64 packages for the guest, through apt with its own lists and cache.
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache/debs"
: > "$apt_dir/status"
apt_o=(-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
  -o "Dir::Cache=$apt_dir" -o APT::Architecture=amd64 -o APT::Architectures::=amd64
  -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
if [ -z "$(find "$apt_dir/lists" -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  apt-get "${apt_o[@]}" -qq update >&2
fi
# The cloud kernel (virtio drivers, small) the metapackage points at today.
kpkg=$(apt-cache "${apt_o[@]}" depends linux-image-cloud-amd64 | awk '$1=="Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "tests/vm/grub/build.sh: no linux-image-cloud-amd64 in Debian's lists" >&2; exit 2; }
kver=${kpkg#linux-image-}
# grub-editenv links liblzma, libdevmapper, libselinux, libudev, libpcre2;
# the agent libc, libm, libgcc_s.
libs=(libc6 libgcc-s1 liblzma5 libdevmapper1.02.1 libselinux1 libudev1 libpcre2-8-0)
pkgs=("$kpkg" busybox-static grub-common ca-certificates "${libs[@]}")
vers=()
for p in "${pkgs[@]}"; do
  v=$(apt-cache "${apt_o[@]}" policy "$p" | sed -n 's/^ *Candidate: //p')
  [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "tests/vm/grub/build.sh: no amd64 candidate for $p" >&2; exit 2; }
  vers+=("$p=$v")
done
(cd "$cache/debs" && for pv in "${vers[@]}"; do
  p=${pv%%=*}; v=${pv#*=}
  ls "${p}_"*"${v#*:}"_*.deb >/dev/null 2>&1 || apt-get "${apt_o[@]}" -qq download "$pv" >&2
done)

key=$( { printf '%s\n' "${vers[@]}"; { find "$here" -type f | LC_ALL=C sort
  printf '%s\n' "$agent" "$ovmf_code" "$ovmf_vars" "$grub_mods/linux.mod" "$root/deploy/grub/ota-ab.cfg"; } | xargs sha256sum | cut -c1-64; } | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/done" ]; then echo "$out"; exit 0; fi
echo "building the GRUB VM into $out" >&2
exec 3>&1 1>&2
rm -rf "$out.tmp"; mkdir -p "$out.tmp"; w=$out.tmp/work; mkdir -p "$w"
deb() { ls "$cache/debs/${1}_"*.deb | tail -1; }

# Kernel and the modules the initramfs loads (the rest is built in).
mkdir -p "$w/k" "$w/u"
dpkg-deb -x "$(deb "$kpkg")" "$w/k"
for p in busybox-static grub-common ca-certificates "${libs[@]}"; do dpkg-deb -x "$(deb "$p")" "$w/u"; done
depmod -b "$w/k" "$kver"
mkdir -p "$w/initrd/bin" "$w/initrd/modules" "$w/initrd/proc" "$w/initrd/sys" "$w/initrd/dev"
cp "$w/u/bin/busybox" "$w/initrd/bin/busybox"
: > "$w/initrd/modules/order"
for m in virtio_pci virtio_blk virtio_net vfat nls_cp437 nls_ascii nls_utf8; do
  modprobe -d "$w/k" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  cp "$ko" "$w/initrd/modules/"; basename "$ko" >> "$w/initrd/modules/order"
done
install -m 755 "$here/initrd-init" "$w/initrd/init"
(cd "$w/initrd" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible | gzip -9n) > "$w/initrd.img"

"$server" keygen --out "$out.tmp" >/dev/null

# The slot userland: busybox, the agent, grub-editenv and their libraries.
r=$w/rootfs
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,lib,etc/ota-agent,boot/efi,proc,sys,dev,run,tmp,data}
cp "$w/u/bin/busybox" "$r/bin/busybox"
for a in $("$w/u/bin/busybox" --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
cp "$w/u/usr/bin/grub-editenv" "$r/usr/bin/"
mkdir -p "$r/lib/x86_64-linux-gnu" "$r/lib64"
for d in "$w/u/lib/x86_64-linux-gnu" "$w/u/usr/lib/x86_64-linux-gnu"; do
  [ -d "$d" ] && find "$d" -maxdepth 1 -name '*.so*' -exec cp -a {} "$r/lib/x86_64-linux-gnu/" \;
done
cp -L "$w/u/lib64/ld-linux-x86-64.so.2" "$r/lib64/" 2>/dev/null ||
  ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$r/lib64/ld-linux-x86-64.so.2"
strip -o "$r/usr/bin/ota-agent" "$agent"
mkdir -p "$r/etc/ssl/certs"
cat "$w"/u/usr/share/ca-certificates/mozilla/*.crt > "$r/etc/ssl/certs/ca-certificates.crt"
install -m 755 "$here/rootfs-init" "$r/sbin/init"
cp "$here/agent.toml" "$r/etc/ota-agent/agent.toml"
cp "$out.tmp/ota-signing.pub" "$r/etc/ota-agent/ota-signing.pub"
echo 119c431b7ea4a2186958b8651a2ef823757e6c65c784fe02d207ff527ae9b378 > "$r/etc/ota-agent/enrollment.key"
cp "$w/k/boot/vmlinuz-$kver" "$r/boot/vmlinuz"
cp "$w/initrd.img" "$r/boot/initrd.img"
slot_mb=$(( ( $(du -sm "$r" | cut -f1) + 2 ) * 5 / 4 + 8 ))
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
healthy='grep -q "root=PARTLABEL=rootfs-" /proc/cmdline && grub-editenv /boot/efi/boot/grub/grubenv list | grep -q "^boot_part="'
mkslot v1 1.0 "$healthy"
mkslot v2 2.0 "$healthy"
mkslot v2-badhealth 2.0 'echo "health check: this release is deliberately unhealthy" >&2; exit 1'
mkslot v2-noboot 2.0 "$healthy" 'echo "ota-vm: this release does not boot: init exits" > /dev/ttyS0; exit 1'

# The ESP: GRUB (EFI image with the modules ota-ab.cfg needs built in, its
# prefix the ESP's /boot/grub), grub.cfg, ota-ab.cfg, the factory grubenv.
grub-mkimage -O x86_64-efi -d "$grub_mods" -p /boot/grub -o "$w/BOOTX64.EFI" \
  part_gpt fat ext2 normal configfile echo test regexp loadenv linux gzio reboot all_video efi_gop
grub-editenv "$w/grubenv" create
grub-editenv "$w/grubenv" set boot_part=a upgrade_available=0 bootcount=0 bootlimit=3
esp_mb=16
truncate -s ${esp_mb}M "$w/esp.img"
mformat -i "$w/esp.img" -T $((esp_mb * 2048)) -h 64 -s 32 -v ESP ::
mmd -i "$w/esp.img" ::/EFI ::/EFI/BOOT ::/boot ::/boot/grub
mcopy -i "$w/esp.img" "$w/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$w/esp.img" "$here/grub.cfg" ::/boot/grub/grub.cfg
mcopy -i "$w/esp.img" "$root/deploy/grub/ota-ab.cfg" ::/boot/grub/ota-ab.cfg
mcopy -i "$w/esp.img" "$w/grubenv" ::/boot/grub/grubenv
mkfs.ext4 -q -F -L data "$w/data.img" 16M
d=$out.tmp/disk.img
truncate -s $((esp_mb + slot_mb * 2 + 16 + 2))M "$d"
sgdisk -o \
  -n 1:2048:+${esp_mb}M -c 1:esp -t 1:ef00 \
  -n 2:0:+${slot_mb}M -c 2:rootfs-a -t 2:8304 \
  -n 3:0:+${slot_mb}M -c 3:rootfs-b -t 3:8304 \
  -n 4:0:+16M -c 4:data "$d" >/dev/null
put() { # partition image
  local start; start=$(sgdisk -i "$1" "$d" | sed -n 's/^First sector: \([0-9]*\).*/\1/p')
  dd if="$2" of="$d" bs=512 seek="$start" conv=notrunc,sparse status=none
}
put 1 "$w/esp.img"; put 2 "$out.tmp/v1.img"; put 4 "$w/data.img"
cp "$ovmf_code" "$out.tmp/OVMF_CODE.fd"; cp "$ovmf_vars" "$out.tmp/OVMF_VARS.fd"
rm -rf "$w"
touch "$out.tmp/done"
mv "$out.tmp" "$out"
find "$cache" -mindepth 1 -maxdepth 1 -type d -not -name apt -not -name debs -not -name "$key" -not -name "$key.tmp" -exec rm -rf {} +
echo "$out" >&3
