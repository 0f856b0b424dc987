#!/usr/bin/env bash
# Power-cut trials on the virtual ARM64 device: N updates v1 -> v2, each
# with CUTS kill -9 of QEMU (default 1) at moments drawn from SEED+i, then
# power on again; every trial must end on v1 or the verified v2 (checked on
# the disk after every cut) and complete the update.
#   tests/vm/power-cuts.sh N SEED [CUTS]
# A failed trial prints its seed and moments; replay it with
#   tests/vm/scenario.sh powercut SEED CUTS   (or OTA_VM_CUTS_AT="t1 t2 ..." tests/vm/scenario.sh powercut SEED)
set -uo pipefail
n=${1:?usage: power-cuts.sh N SEED [CUTS]}; seed=${2:?usage: power-cuts.sh N SEED [CUTS]}; cuts=${3:-1}
here=$(cd "$(dirname "$0")" && pwd)
"$here/build.sh" > /dev/null || exit 1
ok=0; failed=()
t0=$SECONDS
for ((i = 0; i < n; i++)); do
  s=$((seed + i))
  if out=$("$here/scenario.sh" powercut "$s" "$cuts" 2> "${TMPDIR:-/tmp}/ota-vm-powercut-$s.log"); then
    ok=$((ok + 1)); echo "trial $((i + 1))/$n: ${out#RESULT }"
  else
    failed+=("$s"); echo "trial $((i + 1))/$n: FAILED seed=$s (log: ${TMPDIR:-/tmp}/ota-vm-powercut-$s.log)"
    grep -E "cut at|FAIL" "${TMPDIR:-/tmp}/ota-vm-powercut-$s.log" | sed 's/^/    /'
  fi
done
echo "power cuts: $ok of $n trials survived ($cuts cut(s) each, seeds $seed..$((seed + n - 1)), $((SECONDS - t0)) s)${failed[*]:+; failed seeds: ${failed[*]}}"
((ok == n))
