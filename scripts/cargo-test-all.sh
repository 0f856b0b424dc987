#!/usr/bin/env bash
# Runs `cargo test --no-fail-fast ARGS...` so that every test binary runs
# (unit tests, each integration suite, doc tests) even after one has failed,
# then lists every failed test and every failed target in one place, so a
# failure in the first suite cannot hide the suites after it. Exits with
# cargo's status. scripts/test.sh calls it; tests/tests/test_script.rs
# checks it on a throw-away workspace with two failing suites.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if ((rc != 0)); then
  echo
  echo "==== test summary: FAILED (cargo exit status $rc) ===="
  failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/  failed test: \1/')
  if [[ -n $failed ]]; then
    echo "$failed"
  fi
  # cargo's own list of failed targets ("error: N targets failed:" and the
  # indented lines after it), or its one-line form for a single target.
  sed -n -E '/^error: [0-9]+ targets? failed:?$/,/^[^ ]/{/^ /s/^ +/  failed target: /p}' "$log"
  # Compile errors stop cargo before any test runs: show them too.
  grep -E '^error(\[E[0-9]+\])?: ' "$log" | grep -v -E "targets? failed" | sed -E 's/^/  /' | head -20
  echo "re-run one with: cargo test -p CRATE --test SUITE NAME"
else
  echo "==== test summary: every test binary passed ===="
fi
exit "$rc"
