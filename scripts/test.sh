#!/usr/bin/env bash
# The README's test command. The scale-out tests need PostgreSQL, Redis and
# nginx (Debian: postgresql redis-server nginx-light): this starts a private
# PostgreSQL and Redis on loopback (scripts/services.sh), runs
# `cargo test --workspace` against them, and stops them again, also on
# failure or Ctrl-C. Extra arguments go to cargo test. Every test binary runs
# even after one fails (--no-fail-fast), and every failure is listed at the
# end (scripts/cargo-test-all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh start
trap 'scripts/services.sh stop' EXIT
eval "$(scripts/services.sh env)"
export OTA_REQUIRE_SERVICES=1
scripts/cargo-test-all.sh --workspace "$@"
