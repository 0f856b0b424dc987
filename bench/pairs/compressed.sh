#!/usr/bin/env bash
# compressed: squashfs images (xz, 128 KiB blocks, mksquashfs defaults otherwise; all files owned by
# root, fixed times) of the two sides of the sec-small package set. A small change in a file changes
# its whole compressed block, and the compressed bytes differ everywhere after it, so byte-level
# deltas are known to be weak here: this pair shows how weak, and whether a tool falls back to
# little more than the new image's size.
#   usage: bench/pairs/compressed.sh OUTDIR   -> OUTDIR/compressed/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin compressed "${1:-}"
need mksquashfs squashfs-tools
small_trees
{
  echo "# compressed: mksquashfs -comp xz -all-root of the small set, $(mksquashfs -version 2>&1 | head -n 1)"
  cat "$CACHE/trees/small/versions.txt"
} >>"$WORK/VERSIONS.txt"
for side in old new; do
  tree=$SMALL_OLD
  [ $side = new ] && tree=$SMALL_NEW
  find "$tree" -exec touch -h -d @$EPOCH {} +
  mksquashfs "$tree" "$WORK/$side" -comp xz -noappend -all-root -no-progress \
    -quiet -mkfs-time $EPOCH -all-time $EPOCH >/dev/null || die "mksquashfs of $tree failed"
done
pair_done
