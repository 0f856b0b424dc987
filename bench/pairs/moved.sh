#!/usr/bin/env bash
# moved: the same files, moved and reordered. Old is the new side of sec-small (128 MiB ext4);
# new holds byte-identical files, but usr/lib/aarch64-linux-gnu is now usr/lib64, usr/share is
# opt/share and usr/libexec is usr/lib/libexec, so mkfs.ext4 places those subtrees (76 of the 92 MiB
# of file data) in other blocks and numbers their inodes differently. (Every directory's entries are
# also created in reverse order, but that changes nothing: mkfs.ext4 -d of e2fsprogs 1.47 reads each
# directory with scandir + alphasort, so files keep their name order within a directory.) A delta
# engine that matches content wherever it lies in the source should need next to nothing beyond the
# changed metadata (directories, inodes, bitmaps); one that looks for matches near the same offset
# will not.
#   usage: bench/pairs/moved.sh OUTDIR   -> OUTDIR/moved/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin moved "${1:-}"
small_trees
{
  echo "# moved: both sides hold the files of the small set's new side; new has them moved and reordered"
  echo "# renamed: usr/lib/aarch64-linux-gnu -> usr/lib64, usr/share -> opt/share, usr/libexec -> usr/lib/libexec"
  grep -v '^#' "$CACHE/trees/small/new.list" | sed 's/^/= /'
} >>"$WORK/VERSIONS.txt"
copy_reordered "$SMALL_NEW" "$WORK/tree" usr/lib/aarch64-linux-gnu=usr/lib64 usr/share=opt/share \
  usr/libexec=usr/lib/libexec
mkfs_image "$SMALL_NEW" "$WORK/old" 128M
mkfs_image "$WORK/tree" "$WORK/new" 128M
rm -rf "$WORK/tree"
pair_done
