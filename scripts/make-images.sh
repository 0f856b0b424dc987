#!/usr/bin/env bash
# Makes two versions of a small root filesystem image, the way a device build
# would: ext4 images (mkfs.ext4 -d) of a tree of real binaries and text files,
# where version 2 changes some binaries, edits configuration, adds and removes
# files. Deterministic for a given machine.
#   usage: scripts/make-images.sh OUTDIR [SIZE_MIB]   -> OUTDIR/v1.img OUTDIR/v2.img
set -euo pipefail
out=${1:?usage: make-images.sh OUTDIR [SIZE_MIB]}
size=${2:-128}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

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

for v in 1 2; do
  tree "$work/root$v" "$v"
  rm -f "$out/v$v.img"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -m 0 -L rootfs \
    -U 2f6e6a5c-0000-4000-8000-00000000000$v -E hash_seed=2f6e6a5c-0000-4000-8000-000000000002,nodiscard \
    -d "$work/root$v" "$out/v$v.img" "${size}M"
done
ls -l "$out"/v1.img "$out"/v2.img
