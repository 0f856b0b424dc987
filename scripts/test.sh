#!/usr/bin/env bash
# The README's test command. The scale-out tests need PostgreSQL, Redis and
# nginx (Debian: postgresql redis-server nginx-light): this starts a private
# PostgreSQL and Redis on loopback (scripts/services.sh), runs
# `cargo test --workspace` against them, and stops them again, also on
# failure or Ctrl-C. Extra arguments go to cargo test. Every test binary runs
# even after one fails (--no-fail-fast), and every failure is listed at the
# end (scripts/cargo-test-all.sh).
#
# Without arguments, the two VM suites (tests/tests/vm_uboot.rs, about
# 18 min, and vm_grub.rs, about 10 min) run in the background beside the
# other suites instead of after them: each spends its time in one
# single-vCPU qemu, so one after the other they left a core idle for half an
# hour. Their output goes to a log each, printed in full at the end; the
# run fails if any of the three fails. Every VM test's name starts with
# `vm_` (the foreground run skips those), and the foreground run is checked
# to have filtered out tests in the VM suites only, so a test elsewhere that
# happened to match cannot be skipped silently. OTA_TEST_SERIAL=1 runs
# everything in one `cargo test --workspace`, as with arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh start
bg=()
cleanup() {
  for p in "${bg[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  scripts/services.sh stop
}
trap cleanup EXIT
eval "$(scripts/services.sh env)"
export OTA_REQUIRE_SERVICES=1

if (($# > 0)) || [[ ${OTA_TEST_SERIAL:-} == 1 ]]; then
  exec_rc=0
  scripts/cargo-test-all.sh --workspace "$@" || exec_rc=$?
  exit "$exec_rc"
fi

vm_suites=(vm_uboot vm_grub)
# Compile every test binary first: the background runs then find them
# built, and compile errors show before anything runs. The VM suites' test
# binaries run directly, not through cargo: a running `cargo test` holds
# cargo's artifact-directory lock until its last test ends, so a second
# cargo would wait for the first. For the same reason they must not build
# the binaries themselves (OTA_BINS_BUILT, see `ota_tests::bin`).
echo "==== compiling every test binary and the workspace's binaries"
logs=$(mktemp -d)
cargo test --workspace --no-run --message-format=json-render-diagnostics >"$logs/build.json"
cargo build -p ota-server -p ota-agent -p ota-tests --bins
set -m # each background suite in its own process group (cleanup kills it whole)
for s in "${vm_suites[@]}"; do
  exe=$(grep -o "\"executable\":\"[^\"]*/deps/$s-[0-9a-f]*\"" "$logs/build.json" | tail -1 | cut -d'"' -f4)
  [[ -x $exe ]] || { echo "==== no test binary for $s in cargo's build output" >&2; exit 1; }
  echo "==== $s runs in the background: $exe (log printed at the end)"
  (cd tests && CARGO_MANIFEST_DIR=$PWD OTA_BINS_BUILT=1 exec "$exe") >"$logs/$s.log" 2>&1 &
  bg+=($!)
done
set +m
rc=0
scripts/cargo-test-all.sh --workspace -- --skip vm_ | tee "$logs/main.log" || rc=$?
# Only the VM suites may have filtered-out tests in the foreground run.
stray=$(awk '/^ *Running /{bin=$2} /filtered out/ && !/ 0 filtered out/ {print bin}' "$logs/main.log" |
  grep -v -E "^tests/($(
    IFS='|'
    echo "${vm_suites[*]}"
  ))\.rs$" || true)
if [[ -n $stray ]]; then
  echo "==== tests outside the VM suites were skipped by --skip vm_ (rename them): $stray"
  rc=1
fi
for i in "${!vm_suites[@]}"; do
  s=${vm_suites[$i]}
  src=0
  wait "${bg[$i]}" || src=$?
  echo
  echo "==== $s (background run, exit status $src)"
  cat "$logs/$s.log"
  if ((src != 0)); then
    rc=$src
    grep -E '^test .* \.\.\. FAILED$' "$logs/$s.log" | sed -E "s/^test (.*) \.\.\. FAILED$/  failed test: \1 ($s)/" || true
    echo "re-run with: cargo test -p ota-tests --test $s"
  fi
done
bg=()
rm -rf "$logs"
if ((rc == 0)); then
  echo "==== all test binaries passed, VM suites included"
else
  echo "==== FAILED: see the summaries above (foreground and each VM suite)"
fi
exit "$rc"
