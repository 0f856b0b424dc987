#!/usr/bin/env bash
# sec-small: a point-release security update of a small root filesystem. 128 MiB ext4 images of the
# small package set (lib.sh: systemd, openssh-server, openssl, curl, python3-minimal, ... and their
# dependencies, ~80 arm64 packages), old with bookworm's versions, new with the highest of bookworm,
# bookworm-updates and bookworm-security. Same mkfs options on both sides.
#   usage: bench/pairs/sec-small.sh OUTDIR   -> OUTDIR/sec-small/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin sec-small "${1:-}"
small_trees
cat "$CACHE/trees/small/versions.txt" >>"$WORK/VERSIONS.txt"
mkfs_image "$SMALL_OLD" "$WORK/old" 128M
mkfs_image "$SMALL_NEW" "$WORK/new" 128M
pair_done
