#!/usr/bin/env bash
# Makes two versions of a small root filesystem image, the way a device build
# would: ext4 images (mkfs.ext4 -d) of a tree of real binaries and text files,
# where version 2 changes some binaries, edits configuration, adds and removes
# files. Deterministic for a given machine.
#   usage: scripts/make-images.sh OUTDIR [SIZE_MIB|auto]   -> OUTDIR/v1.img OUTDIR/v2.img
# SIZE_MIB defaults to 128; `auto` sizes both images to their content (about
# 70 MiB here). A size below what the content needs is refused before any
# image is written, with the minimum; a failed image never stays behind.
set -euo pipefail
usage="usage: make-images.sh OUTDIR [SIZE_MIB|auto]"
out=${1:?$usage}
size=${2:-128}
if [[ $size != auto && ! $size =~ ^[0-9]+$ ]]; then
  echo "make-images.sh: SIZE_MIB must be a number of MiB or 'auto', got '$size'; $usage" >&2
  exit 2
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work" "$out"/.v[12].img.tmp' EXIT

tree() { # tree ROOT VERSION
  local r=$1 v=$2
  mkdir -p "$r/usr/bin" "$r/usr/lib" "$r/etc/app" "$r/var/lib/app"
  # Real binaries and libraries: what device images are mostly made of.
  local i=0
  for f in /usr/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    i=$((i + 1)); [ $i -le 120 ] || break
    cp "$f" "$r/usr/bin/"
  done
  for f in /usr/lib/x86_64-linux-gnu/lib{z,zstd,lzma,bz2,ssl,crypto}.so.*; do
    [ -f "$f" ] && [ ! -L "$f" ] && cp "$f" "$r/usr/lib/" || true
  done
  printf 'version = "%s"\nlisten = "0.0.0.0:8080"\nlog = "info"\n' "$v" > "$r/etc/app/app.toml"
  seq 1 20000 | sed "s/^/record-$v-/" > "$r/var/lib/app/data.txt"
  if [ "$v" = 2 ]; then
    # A "security update": patched binaries (bytes changed in place and code
    # inserted), a new tool, a removed one, edited configuration.
    for f in "$r"/usr/bin/[a-b]*; do
      python3 - "$f" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
for i in range(4096, len(b), 65521):
    b[i] ^= 0x5A
mid = len(b) // 2
b[mid:mid] = bytes(range(256)) * 8
open(p, "wb").write(b)
PY
    done
    cp /usr/bin/env "$r/usr/bin/new-tool"
    rm -f "$r"/usr/bin/c*
    printf 'metrics = true\n' >> "$r/etc/app/app.toml"
  fi
  find "$r" -exec touch -h -d @1700000000 {} +
}

tree "$work/root1" 1
tree "$work/root2" 2
# The smallest ext4 that holds the larger tree: its allocated size plus 5 %
# for directories and extent blocks, plus 8 MiB for the journal (4 MiB at
# these sizes), inode tables and group descriptors. (mkfs.ext4 -d fails with
# "Could not allocate block" below it.)
kib=$(du -sk "$work/root1" "$work/root2" | awk '$1 > m { m = $1 } END { print m }')
min=$(( (kib * 105 / 100 + 1023) / 1024 + 8 ))
if [[ $size == auto ]]; then
  size=$min
elif (( size < min )); then
  echo "make-images.sh: ${size} MiB is too small for this content ($((kib / 1024)) MiB of files): use at least ${min} (or 'auto'); nothing written" >&2
  exit 1
fi
for v in 1 2; do
  # Built beside the target and renamed: a failed mkfs leaves no image.
  tmp="$out/.v$v.img.tmp"
  rm -f "$tmp"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -m 0 -L rootfs \
    -U 2f6e6a5c-0000-4000-8000-00000000000$v -E hash_seed=2f6e6a5c-0000-4000-8000-000000000002,nodiscard \
    -d "$work/root$v" "$tmp" "${size}M"
  mv -f "$tmp" "$out/v$v.img"
done
ls -l "$out"/v1.img "$out"/v2.img
