#!/usr/bin/env bash
# realloc: the sec-small update (same package versions on both sides as sec-small), but the new image
# is laid out by a different mkfs: 128-byte inodes instead of 256, no flex_bg, 16 MiB block groups
# (-g 4096: 8 groups with their own bitmaps and inode tables between the data instead of one) and an
# inode per 8 KiB, and its files are created in reverse order. File contents change as in sec-small,
# but almost every file and all metadata sit at other offsets. Compare with sec-small to see what the
# allocation alone costs.
#   usage: bench/pairs/realloc.sh OUTDIR   -> OUTDIR/realloc/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin realloc "${1:-}"
small_trees
{
  echo "# realloc: new made with mkfs.ext4 -I 128 -O ^flex_bg -g 4096 -i 8192, files created in reverse order"
  cat "$CACHE/trees/small/versions.txt"
} >>"$WORK/VERSIONS.txt"
copy_reordered "$SMALL_NEW" "$WORK/tree"
mkfs_image "$SMALL_OLD" "$WORK/old" 128M
mkfs_image "$WORK/tree" "$WORK/new" 128M -I 128 -O ^flex_bg -g 4096 -i 8192
rm -rf "$WORK/tree"
pair_done
