#!/usr/bin/env bash
# upgrade-large: a minor-version upgrade of a larger root filesystem, 768 MiB ext4 images of the small
# set plus a kernel with its modules, git, Node.js, Python 3, nginx, rsync and GnuPG (176 arm64
# packages with their dependencies, 620 MiB of files), old with bookworm's versions (the current
# point release), new with the highest of bookworm, bookworm-updates and bookworm-security, as a device
# that skipped a few months of updates gets them: the kernel moves to a new ABI (6.1.176 -> 6.1.192:
# every module is a changed file at a new path), rsync moves 3.2.7 -> 3.5.0, Node.js, Python and nginx
# get security updates, and the small set's updates (31 packages differ). (PostgreSQL, which pulls in LLVM, and OpenJDK would double the image.)
#   usage: bench/pairs/upgrade-large.sh OUTDIR   -> OUTDIR/upgrade-large/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin upgrade-large "${1:-}"
PKGS="$SMALL_PKGS linux-image-arm64 git nodejs python3 nginx-light rsync gnupg"
apt_state bookworm "bookworm"
apt_state bookworm-sec "bookworm bookworm-updates bookworm-security"
# shellcheck disable=SC2086
apt_closure bookworm $PKGS >"$WORK/old.list"
# shellcheck disable=SC2086
apt_closure bookworm-sec $PKGS >"$WORK/new.list"
echo "# upgrade-large: bookworm (point release) -> bookworm + bookworm-updates + bookworm-security, arm64" \
  >>"$WORK/VERSIONS.txt"
say "$(versions_diff "$WORK/old.list" "$WORK/new.list")"
unpack "$WORK/root-old" bookworm-sec <"$WORK/old.list"
unpack "$WORK/root-new" bookworm-sec <"$WORK/new.list"
say "trees: $(du -s --apparent-size -m "$WORK/root-old" | cut -f1) MiB old, $(du -s --apparent-size -m "$WORK/root-new" | cut -f1) MiB new"
mkfs_image "$WORK/root-old" "$WORK/old" 768M
mkfs_image "$WORK/root-new" "$WORK/new" 768M
rm -rf "$WORK/root-old" "$WORK/root-new"
pair_done
