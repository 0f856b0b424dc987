#!/usr/bin/env bash
# The offline edge-ota demo: build two versions of a root filesystem image,
# make a signing key, build a signed delta and a signed full image, apply the
# delta as a device would, verify the result, and show the figures.
#   usage: scripts/demo.sh [WORKDIR]     (default target/demo; removed at the end
#                                         unless KEEP=1)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/demo}
rm -rf "$work"; mkdir -p "$work"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT

need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
[ -x /usr/bin/time ] || need+=(time)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } >/dev/null
fi

echo "== building ota-server and ota-agent (release)"
cargo build --release -q -p ota-server -p ota-agent
bin=target/release

echo "== making two versions of a 128 MiB ext4 root filesystem"
scripts/make-images.sh "$work" 128 >/dev/null

echo "== generating a signing key"
"$bin/ota-server" keygen --out "$work/keys"

echo "== building the signed delta v1 -> v2"
t0=$(date +%s.%N)
"$bin/ota-server" delta --from "$work/v1.img" --from-version 1.0.0 --to "$work/v2.img" --to-version 2.0.0 \
  --device-type demo-board --key "$work/keys/ota-signing.key" --out "$work/delta"
t1=$(date +%s.%N)

echo "== building the signed full image v2 (for devices with no usable base)"
"$bin/ota-server" delta --to "$work/v2.img" --to-version 2.0.0 --device-type demo-board \
  --key "$work/keys/ota-signing.key" --out "$work/full" --no-progress >/dev/null

echo "== applying the delta as a device would (verify signature, source, every operation, result)"
/usr/bin/time -v -o "$work/apply.time" "$bin/ota-agent" apply --manifest "$work/delta/manifest.json" \
  --payload "$work/delta/payload.bin" --pubkey "$work/keys/ota-signing.pub" \
  --source "$work/v1.img" --out "$work/device-v2.img"
cmp "$work/device-v2.img" "$work/v2.img"
echo "   the applied image is byte-identical to v2"

echo "== a tampered payload is refused, and nothing is written"
cp "$work/delta/payload.bin" "$work/tampered.bin"
printf '\x42' | dd of="$work/tampered.bin" bs=1 seek=1000 conv=notrunc status=none
if "$bin/ota-agent" apply --manifest "$work/delta/manifest.json" --payload "$work/tampered.bin" \
  --pubkey "$work/keys/ota-signing.pub" --source "$work/v1.img" --out "$work/bad.img" 2>"$work/bad.err"; then
  echo "!! the tampered payload was accepted"; exit 1
fi
sed 's/^/   /' "$work/bad.err"
[ ! -e "$work/bad.img" ] && echo "   no file was written at --out"

size() { stat -c %s "$1"; }
img=$(size "$work/v2.img")
delta=$(( $(size "$work/delta/payload.bin") + $(size "$work/delta/manifest.json") ))
full=$(( $(size "$work/full/payload.bin") + $(size "$work/full/manifest.json") ))
rss=$(awk -F': ' '/Maximum resident/ {print $2}' "$work/apply.time")
secs=$(awk -F': ' '/Elapsed \(wall/ {print $2}' "$work/apply.time")
echo
echo "== figures"
printf '   %-34s %12s bytes\n' "image size" "$img"
printf '   %-34s %12s bytes (%.2f%% of the image)\n' "full-image update (payload+manifest)" "$full" "$(echo "100*$full/$img" | bc -l)"
printf '   %-34s %12s bytes (%.2f%% of the image, %.1fx smaller than full)\n' "delta update (payload+manifest)" "$delta" \
  "$(echo "100*$delta/$img" | bc -l)" "$(echo "$full/$delta" | bc -l)"
printf '   %-34s %12.1f s\n' "delta generation" "$(echo "$t1-$t0" | bc -l)"
printf '   %-34s %12s (wall)\n' "delta apply" "$secs"
printf '   %-34s %12s KiB peak RSS\n' "delta apply memory" "$rss"
echo
echo "demo: OK"
