#!/usr/bin/env bash
# Builds a large old/new ext4 image pair for the release-pipeline and agent-memory benchmarks:
# OUT/big/{old,new}, each SIZE MiB (default 2048), filled ~72 % with real executables and libraries
# from this machine (the Rust toolchains under ~/.rustup, /usr/lib, /usr/bin), and a new side where
# ~5 % of the files changed the way a release changes them: patched in places and grown (2 %), moved to
# another directory (1 %), dropped (1 %), added from files the old side did not have (1 %). The new image
# is made by a fresh mkfs, so ext4 places files differently, as a rebuilt image does.
#
# usage: bench/make-big-pair.sh [--out DIR] [--size-mib N] [--seed N]
#
# The file selection and the changes are fixed by the seed; the files themselves are this machine's, so
# figures are comparable within one machine (and one toolchain set), not across machines. It takes a
# few minutes (copying ~3.5 GB and two mkfs runs) and needs ~4 x SIZE of free disk while it works.
# Nothing is rebuilt when OUT/big/{old,new} exist with the same parameters (OUT/big/PARAMS).
set -euo pipefail
out=target/bench-pairs size=2048 seed=20261202
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --size-mib) size=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "make-big-pair: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v mkfs.ext4 >/dev/null || { echo "make-big-pair: mkfs.ext4 missing (apt-get install e2fsprogs)" >&2; exit 1; }
dir=$out/big; mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
params="size=$size seed=$seed host=$(hostname) sources=$(ls -d "$HOME"/.rustup/toolchains/* 2>/dev/null | tr '\n' ' ')"
if [ -f "$dir/old" ] && [ -f "$dir/new" ] && [ "$(cat "$dir/PARAMS" 2>/dev/null)" = "$params" ]; then
  echo "make-big-pair: $dir/{old,new} are up to date"; exit 0
fi
rm -f "$dir/old" "$dir/new" "$dir/PARAMS"
work=$(mktemp -d "$dir/work.XXXX"); trap 'rm -rf "$work"' EXIT

python3 - "$work" "$size" "$seed" "$HOME" <<'EOF'
import os, random, shutil, stat, sys
work, size_mib, seed, home = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
roots = sorted(os.path.join(home, ".rustup/toolchains", d)
               for d in os.listdir(os.path.join(home, ".rustup/toolchains"))) \
    if os.path.isdir(os.path.join(home, ".rustup/toolchains")) else []
roots += ["/usr/lib", "/usr/bin", "/usr/libexec", "/usr/share"]
files = []
for r in roots:
    for dp, dns, fns in os.walk(r):
        dns.sort()
        for f in sorted(fns):
            p = os.path.join(dp, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and 0 < st.st_size <= 256 << 20 and os.access(p, os.R_OK):
                files.append((p, st.st_size))
rng.shuffle(files)
budget = size_mib * (1 << 20) * 72 // 100  # inodes, journal and 4 KiB blocks of small files take the rest
old, pool, total = [], [], 0
for p, n in files:
    if total + n <= budget:
        old.append((p, n)); total += n
    elif len(pool) < 2000:
        pool.append((p, n))
if total < budget * 0.9:
    sys.exit(f"make-big-pair: only {total >> 20} MiB of files found for {budget >> 20} MiB; use a smaller --size-mib")
old.sort()
def dest(p):  # keep the source path under the image root, minus the home prefix
    return p.replace(home + "/", "home/", 1).lstrip("/")
for side in ("old", "new"):
    os.makedirs(os.path.join(work, side))
for p, _ in old:
    d = os.path.join(work, "old", dest(p)); os.makedirs(os.path.dirname(d), exist_ok=True)
    shutil.copyfile(p, d)
n = len(old); k = max(1, n // 100)
idx = list(range(n)); rng.shuffle(idx)
changed, moved, dropped = set(idx[:2 * k]), set(idx[2 * k:3 * k]), set(idx[3 * k:4 * k])
log = {"changed": 0, "moved": 0, "dropped": 0, "added": 0}
for i, (p, sz) in enumerate(old):
    rel = dest(p)
    if i in dropped:
        log["dropped"] += 1; continue
    if i in moved:
        rel = os.path.join("opt/moved", rel.replace("/", "_")); log["moved"] += 1
    d = os.path.join(work, "new", rel); os.makedirs(os.path.dirname(d), exist_ok=True)
    if i in changed:
        data = bytearray(open(p, "rb").read())
        for _ in range(1 + len(data) // (256 << 10)):  # a patched spot per 256 KiB
            at = rng.randrange(len(data)); ln = min(rng.randrange(16, 4096), len(data) - at)
            data[at:at + ln] = rng.randbytes(ln)
        data += rng.randbytes(rng.randrange(0, 64 << 10))
        open(d, "wb").write(data); log["changed"] += 1
    else:
        shutil.copyfile(p, d)
for p, sz in pool[:k]:
    d = os.path.join(work, "new", "opt/added", dest(p)); os.makedirs(os.path.dirname(d), exist_ok=True)
    shutil.copyfile(p, d); log["added"] += 1
print(f"make-big-pair: {n} files, {total >> 20} MiB in old; " +
      ", ".join(f"{v} {k}" for k, v in log.items()))
EOF
for side in old new; do
  find "$work/$side" -exec touch -h -d @1700000000 {} +
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -L rootfs -m 0 -U 2f6e6a5c-0000-4000-8000-00000000000b \
    -E hash_seed=2f6e6a5c-0000-4000-8000-00000000000c,lazy_itable_init=0,lazy_journal_init=0,nodiscard \
    -d "$work/$side" "$dir/$side.tmp" "${size}M"
  mv "$dir/$side.tmp" "$dir/$side"
  rm -rf "${work:?}/$side"
done
echo "$params" > "$dir/PARAMS"
ls -l "$dir/old" "$dir/new"
