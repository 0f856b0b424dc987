#!/usr/bin/env bash
# erofs: EROFS images (uncompressed, the read-only root filesystem Android and many newer embedded
# builds use instead of ext4 or squashfs) of a network gateway's package set, from Debian trixie:
# nftables, dnsmasq, chrony, mosquitto, wpa_supplicant, bluez, openssh, a minimal Python, systemd
# and their dependencies; old with trixie's versions (the current point release), new with the
# highest of trixie, trixie-updates and trixie-security.
#
# Why it is here: added Dec 5 2026, after the engine's later rules (the looser match extension, frame
# splits) were chosen on the other ten pairs, so it is the one pair none of them was tuned on: another
# filesystem layout (EROFS packs small files and file tails inline with their inodes and keeps file data
# in 4 KiB blocks in directory order), another distribution release and another package set.
#   usage: bench/pairs/erofs.sh OUTDIR   -> OUTDIR/erofs/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin erofs "${1:-}"
need mkfs.erofs erofs-utils
PKGS="systemd systemd-sysv nftables dnsmasq-base chrony mosquitto wpasupplicant bluez openssh-server
 python3-minimal ca-certificates iproute2 procps kmod"
apt_state trixie "trixie"
apt_state trixie-sec "trixie trixie-updates trixie-security"
# shellcheck disable=SC2086
apt_closure trixie $PKGS >"$WORK/old.list"
# shellcheck disable=SC2086
apt_closure trixie-sec $PKGS >"$WORK/new.list"
{
  echo "# erofs: trixie (point release) -> trixie + trixie-updates + trixie-security, arm64;"
  echo "# mkfs.erofs (uncompressed) -T $EPOCH --all-root -x -1, $(mkfs.erofs --version 2>&1 | head -n 1)"
} >>"$WORK/VERSIONS.txt"
say "$(versions_diff "$WORK/old.list" "$WORK/new.list")"
unpack "$WORK/root-old" trixie-sec <"$WORK/old.list"
unpack "$WORK/root-new" trixie-sec <"$WORK/new.list"
say "trees: $(du -s --apparent-size -m "$WORK/root-old" | cut -f1) MiB old, $(du -s --apparent-size -m "$WORK/root-new" | cut -f1) MiB new"
for side in old new; do
  find "$WORK/root-$side" -exec touch -h -d @$EPOCH {} +
  # -x -1: no extended attributes (the host's tree has none a device image would keep); a fixed UUID
  # and time, so the same package versions give the same bytes.
  mkfs.erofs --quiet -x -1 --all-root -T "$EPOCH" -U 6f2a1c3e-8a4b-4d5e-9f60-7a8b9c0d1e2f \
    "$WORK/$side" "$WORK/root-$side" >/dev/null || die "mkfs.erofs of root-$side failed"
done
rm -rf "$WORK/root-old" "$WORK/root-new"
pair_done
