#!/usr/bin/env bash
# Proves the ARM64 agent works: the static aarch64 ota-agent, run under
# qemu-aarch64, applies a delta built by the x86-64 ota-server and the output
# must be byte-identical to the new image. Reports the binary's stripped size.
#   usage: scripts/arm64-roundtrip.sh   (after `cargo build --profile agent-dist --target aarch64-unknown-linux-musl -p ota-agent`)
set -euo pipefail
cd "$(dirname "$0")/.."
arm=${ARM_AGENT:-target/aarch64-unknown-linux-musl/agent-dist/ota-agent}
[ -x "$arm" ] || { echo "build $arm first"; exit 1; }
file "$arm" | grep -q 'ARM aarch64.*statically linked' || { file "$arm"; echo "!! not a static aarch64 binary"; exit 1; }
server=target/release/ota-server
[ -x "$server" ] || cargo build --release -q -p ota-server
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# Old/new: the corpus pair when present (a real aarch64 binary), else generated.
corpus=../shared/corpus
if [ -f "$corpus/ruff-arm64-old.zst" ]; then
  zstd -q -d "$corpus/ruff-arm64-old.zst" -o "$work/old"
  zstd -q -d "$corpus/ruff-arm64-new.zst" -o "$work/new"
else
  head -c 3000000 /dev/urandom > "$work/old"
  { head -c 1000000 "$work/old"; head -c 5000 /dev/urandom; tail -c 1900000 "$work/old"; } > "$work/new"
fi
"$server" keygen --out "$work/keys" >/dev/null
"$server" delta --from "$work/old" --from-version 1 --to "$work/new" --to-version 2 \
  --key "$work/keys/ota-signing.key" --out "$work/u" --no-progress
qemu-aarch64 "$arm" apply --manifest "$work/u/manifest.json" --payload "$work/u/payload.bin" \
  --pubkey "$work/keys/ota-signing.pub" --source "$work/old" --out "$work/applied" --no-progress
cmp "$work/applied" "$work/new"
# A tampered payload must be refused by the ARM64 binary too.
printf '\x42' | dd of="$work/u/payload.bin" bs=1 seek=100 conv=notrunc status=none
if qemu-aarch64 "$arm" apply --manifest "$work/u/manifest.json" --payload "$work/u/payload.bin" \
  --pubkey "$work/keys/ota-signing.pub" --source "$work/old" --out "$work/bad" --no-progress 2>/dev/null; then
  echo "!! ARM64 agent accepted a tampered payload"; exit 1
fi
[ ! -e "$work/bad" ]
echo "arm64 round trip: OK (static aarch64 ota-agent, $(stat -c %s "$arm") bytes stripped)"
