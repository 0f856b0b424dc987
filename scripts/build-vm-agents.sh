#!/usr/bin/env bash
# The two static ARM64 agents the VM tests put into the guest's slots:
#   target/aarch64-unknown-linux-musl/agent-dist/ota-agent
#       the shipped build (the busybox device: tests/vm/build.sh)
#   target/aarch64-unknown-linux-musl/agent-dist/ota-agent-test-hooks
#       the same with --features test-hooks (the systemd device,
#       tests/vm/build.sh systemd: the hang that systemd's watchdog catches)
# The hooks build goes first and is copied aside; the plain build then puts
# the shipped binary back in place, so what cargo-deb and arm64-e2e.sh pick
# up never has the hook. Both share every dependency: only ota-agent and
# its link run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/aarch64-unknown-linux-musl/agent-dist
build=(cargo build --profile agent-dist --target aarch64-unknown-linux-musl -p ota-agent)
"${build[@]}" --features test-hooks
cp "$dir/ota-agent" "$dir/ota-agent-test-hooks.tmp"
mv "$dir/ota-agent-test-hooks.tmp" "$dir/ota-agent-test-hooks"
"${build[@]}"
# The shipped binary must not carry the hook (its environment variable name
# is in the binary only with the feature).
if grep -q OTA_AGENT_TEST_HANG_AFTER_CHECKINS "$dir/ota-agent"; then
  echo "scripts/build-vm-agents.sh: $dir/ota-agent has the test hook" >&2; exit 1
fi
grep -q OTA_AGENT_TEST_HANG_AFTER_CHECKINS "$dir/ota-agent-test-hooks" ||
  { echo "scripts/build-vm-agents.sh: $dir/ota-agent-test-hooks lacks the test hook" >&2; exit 1; }
