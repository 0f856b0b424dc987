# Shared by the held-out pair builders in bench/pairs/ (sourced, not run). See bench/README.md.
#
# Every pair is made from Debian arm64 packages fetched with apt from deb.debian.org through a
# private apt state (its own sources, lists, cache and an empty dpkg status, APT::Architecture=arm64),
# so the host's apt, its installed packages and its architecture (amd64 here) change nothing, and no
# root mount is needed: packages are unpacked with `dpkg-deb -x` and images made with `mkfs.ext4 -d`
# or `mksquashfs`. Everything is pinned to fixed times, UUIDs and hash seeds, so the same package
# versions give the same bytes.
#
# Builders call: pair_begin NAME OUTDIR; then apt_closure/unpack/mkfs_image/...; then pair_done.
# A pair whose OUTDIR/NAME/{old,new,VERSIONS.txt} exist is not rebuilt (delete the directory to
# rebuild it against the archive's current versions).
set -euo pipefail

PAIRS_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Fixed time for every file and for mkfs (reproducible images).
EPOCH=1700000000

say() { echo "${PAIR_NAME:-pairs}: $*" >&2; }
die() { echo "${PAIR_NAME:-pairs}: $*" >&2; exit 1; }

need() { # need COMMAND PACKAGE: fail with what to install
  command -v "$1" >/dev/null || die "$1 is missing: apt-get install $2"
}

# pair_begin NAME OUTDIR: sets PAIR_NAME, PAIR_DIR (OUTDIR/NAME), CACHE (OUTDIR/.cache: apt state and
# .debs shared by the builders) and WORK (a scratch directory removed on exit). Exits 0 if the pair
# already exists.
pair_begin() {
  PAIR_NAME=$1
  local out=${2:?usage: $1 OUTDIR}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  PAIR_DIR=$out/$PAIR_NAME
  CACHE=$out/.cache
  if [ -f "$PAIR_DIR/old" ] && [ -f "$PAIR_DIR/new" ] && [ -f "$PAIR_DIR/VERSIONS.txt" ]; then
    say "$PAIR_DIR/{old,new} exist (delete the directory to rebuild)"
    exit 0
  fi
  need dpkg-deb dpkg
  need apt-get apt
  mkdir -p "$PAIR_DIR" "$CACHE/debs"
  WORK=$(mktemp -d "$out/.work-$PAIR_NAME.XXXX")
  trap 'rm -rf "$WORK"' EXIT
  : >"$WORK/VERSIONS.txt"
}

# apt_state NAME "SUITE..." : a private arm64 apt state in CACHE/apt-NAME over those suites
# (SUITE-security suites come from the security mirror), updated once (delete it to refresh).
# Prints nothing; use aptx NAME ... to run apt-get / apt-cache in it.
apt_state() {
  local name=$1 suites=$2 d=$CACHE/apt-$1 s
  if [ -f "$d/updated" ] && [ "$(cat "$d/suites")" = "$suites" ]; then return 0; fi
  rm -rf "$d"
  mkdir -p "$d/etc/apt.conf.d" "$d/etc/preferences.d" "$d/lists/partial" "$d/archives/partial"
  : >"$d/status"
  for s in $suites; do
    case $s in
      *-security) echo "deb [arch=arm64] $SECURITY_MIRROR $s main" ;;
      *) echo "deb [arch=arm64] $MIRROR $s main" ;;
    esac
  done >"$d/etc/sources.list"
  echo "$suites" >"$d/suites"
  say "apt update (arm64) for $name: $suites"
  aptx "$name" apt-get update -qq || die "apt-get update failed for $suites (is $MIRROR reachable?)"
  touch "$d/updated"
}
aptx() { # aptx STATE apt-get|apt-cache ARGS...
  local d=$CACHE/apt-$1 cmd=$2
  shift 2
  "$cmd" -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
    -o Dir::Etc::SourceList="$d/etc/sources.list" -o Dir::Etc::SourceParts="$d/etc/sources.list.d" \
    -o Dir::Etc::Parts="$d/etc/apt.conf.d" -o Dir::Etc::PreferencesParts="$d/etc/preferences.d" \
    -o Dir::State="$d" -o Dir::State::Lists="$d/lists" -o Dir::State::status="$d/status" \
    -o Dir::Cache="$d" -o Dir::Cache::Archives="$d/archives" -o Debug::NoLocking=1 \
    -o APT::Sandbox::User="$(id -un)" "$@"
}

# apt_closure STATE PKG... : prints "package version" for PKG... and everything they depend on
# (Depends and Pre-Depends, no Recommends), as apt resolves it into an empty system, with the
# candidate versions of that state (the highest version among its suites).
# Packages matching CLOSURE_EXCLUDE (an extended regex, default: Perl beyond perl-base, which a
# few maintainer-script helpers pull in) are left out.
CLOSURE_EXCLUDE=${CLOSURE_EXCLUDE:-'^(perl|perl-modules-.*|libperl.*|lib.*-perl) '}
apt_closure() {
  local st=$1
  shift
  aptx "$st" apt-get -s -qq --no-install-recommends install "$@" |
    sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1 \2/p' | grep -Ev "$CLOSURE_EXCLUDE" | sort -u
}

# deb PKG VERSION STATE: the path of that .deb in CACHE/debs, downloaded once.
deb() {
  local pkg=$1 ver=$2 st=$3 f
  f=$CACHE/debs/${pkg}_${ver//:/%3a}_arm64.deb
  [ -f "$CACHE/debs/${pkg}_${ver//:/%3a}_all.deb" ] && f=$CACHE/debs/${pkg}_${ver//:/%3a}_all.deb
  if [ ! -f "$f" ]; then
    (cd "$CACHE/debs" && aptx "$st" apt-get download -qq "$pkg=$ver" >/dev/null) ||
      die "apt-get download $pkg=$ver failed"
    f=$(ls "$CACHE/debs/${pkg}_${ver//:/%3a}_"*.deb | head -n 1)
  fi
  echo "$f"
}

# unpack ROOT STATE < "pkg version" lines: downloads the missing .debs (one apt-get call) and
# dpkg-deb -x each package into ROOT. Then drops what embedded images leave out (dpkg path-exclude
# style): usr/share/{doc,man,info,locale,lintian}.
unpack() {
  local root=$1 st=$2 pkg ver list
  list=$(cat)
  mkdir -p "$root"
  local -a missing=()
  while read -r pkg ver; do
    ls "$CACHE/debs/${pkg}_${ver//:/%3a}_"*.deb >/dev/null 2>&1 || missing+=("$pkg=$ver")
  done <<<"$list"
  if [ ${#missing[@]} -gt 0 ]; then
    say "downloading ${#missing[@]} packages"
    (cd "$CACHE/debs" && aptx "$st" apt-get download -qq "${missing[@]}" >/dev/null) ||
      die "apt-get download failed for some of: ${missing[*]}"
  fi
  while read -r pkg ver; do
    dpkg-deb -x "$(deb "$pkg" "$ver" "$st")" "$root"
  done <<<"$list"
  rm -rf "$root"/usr/share/{doc,man,info,locale,lintian}
}

# versions_diff OLD_LIST NEW_LIST: appends to VERSIONS.txt every package with its old and new
# version ("pkg old -> new", "pkg = ver" when unchanged, "- pkg" / "+ pkg" when only on one side),
# and prints how many moved.
versions_diff() {
  python3 - "$1" "$2" "$WORK/VERSIONS.txt" <<'PY'
import sys
old = dict(l.split() for l in open(sys.argv[1]) if l.strip())
new = dict(l.split() for l in open(sys.argv[2]) if l.strip())
moved = 0
with open(sys.argv[3], "a") as out:
    for p in sorted(set(old) | set(new)):
        o, n = old.get(p), new.get(p)
        if o and n and o != n:
            out.write(f"{p} {o} -> {n}\n"); moved += 1
        elif o and n:
            out.write(f"{p} = {o}\n")
        elif o:
            out.write(f"- {p} {o}\n"); moved += 1
        else:
            out.write(f"+ {p} {n}\n"); moved += 1
print(f"{len(old)} packages old, {len(new)} new, {moved} differ")
PY
}

# mkfs_image DIR IMAGE SIZE [mkfs.ext4 options...]: a reproducible ext4 image of DIR (4 KiB blocks,
# fixed UUID, hash seed and times; -d populates it without mounting).
mkfs_image() {
  local dir=$1 img=$2 size=$3
  shift 3
  need mkfs.ext4 e2fsprogs
  find "$dir" -exec touch -h -d @$EPOCH {} +
  rm -f "$img"
  E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -b 4096 -L rootfs -m 0 -U 2f6e6a5c-0000-4000-8000-000000000018 \
    -E hash_seed=2f6e6a5c-0000-4000-8000-000000000019,lazy_itable_init=0,lazy_journal_init=0,nodiscard \
    "$@" -d "$dir" "$img" "$size" >/dev/null || die "mkfs.ext4 of $dir into $size failed (too small an image?)"
  pin_ctimes "$img"
}

# pin_ctimes IMAGE: sets the ctime of every used inode of the ext4 IMAGE (the root and the inodes from
# 11 on) to EPOCH. Why: mkfs.ext4 -d copies each file's ctime from the host tree, and no tool can set
# a ctime (the kernel stamps the time of the `touch` above; E2FSPROGS_FAKE_TIME covers only the
# filesystem's own times), so without this every inode of the image held the second its tree was
# touched: the same files in two builds differed in every inode (4 bytes, and the inode checksum),
# a pair was not the same bytes twice, and on `moved` HDiffPatch's size went from 21 KB to 67 KB
# between two builds of the same packages.
pin_ctimes() {
  local img=$1 cmds
  need debugfs e2fsprogs
  cmds=$(mktemp)
  dumpe2fs "$img" 2>/dev/null | python3 -c '
import re, sys
text = sys.stdin.read()
count = int(re.search(r"^Inode count:\s+(\d+)", text, re.M).group(1))
used = set(range(1, count + 1))
for line in re.findall(r"^\s+Free inodes: (.*)$", text, re.M):
    for part in filter(None, (p.strip() for p in line.split(","))):
        a, _, b = part.partition("-")
        used -= set(range(int(a), int(b or a) + 1))
for ino in sorted(i for i in used if i == 2 or i >= 11):
    print(f"sif <{ino}> ctime @'"$EPOCH"'")
' >"$cmds" || die "cannot list the inodes of $img"
  E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$cmds" "$img" >/dev/null 2>&1 || die "debugfs could not pin the ctimes of $img"
  rm -f "$cmds"
}

# pair_done: moves WORK/{old,new} and VERSIONS.txt into PAIR_DIR and appends the pair to
# OUTDIR/READY (one line per finished pair: name, sizes, time).
pair_done() {
  mv "$WORK/VERSIONS.txt" "$PAIR_DIR/VERSIONS.txt.tmp"
  mv "$WORK/old" "$PAIR_DIR/old"
  mv "$WORK/new" "$PAIR_DIR/new"
  mv "$PAIR_DIR/VERSIONS.txt.tmp" "$PAIR_DIR/VERSIONS.txt"
  echo "$PAIR_NAME old=$(stat -c %s "$PAIR_DIR/old") new=$(stat -c %s "$PAIR_DIR/new") $(date -u +%FT%TZ)" \
    >>"$(dirname "$PAIR_DIR")/READY"
  say "done: $(ls -l "$PAIR_DIR" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ' ')"
}

# The package set of the small root filesystem (sec-small, moved, realloc, compressed): a headless
# device with systemd, ssh, TLS, curl and a minimal Python, and their dependencies.
SMALL_PKGS="systemd systemd-sysv openssh-server openssl curl sudo python3-minimal tzdata iproute2
 ca-certificates iputils-ping procps less"

# small_trees: unpacks the small set twice into CACHE/trees/small/{old,new} (once; later calls reuse
# them): old with the versions of the bookworm point release, new with the highest of bookworm,
# bookworm-updates and bookworm-security (a point-release security update). Appends the versions to
# VERSIONS.txt. Sets SMALL_OLD and SMALL_NEW.
small_trees() {
  local t=$CACHE/trees/small
  SMALL_OLD=$t/old SMALL_NEW=$t/new
  if [ ! -f "$t/done" ]; then
    rm -rf "$t"
    mkdir -p "$t"
    apt_state bookworm "bookworm"
    apt_state bookworm-sec "bookworm bookworm-updates bookworm-security"
    # shellcheck disable=SC2086
    apt_closure bookworm $SMALL_PKGS >"$t/old.list"
    # shellcheck disable=SC2086
    apt_closure bookworm-sec $SMALL_PKGS >"$t/new.list"
    unpack "$t/old" bookworm-sec <"$t/old.list"
    unpack "$t/new" bookworm-sec <"$t/new.list"
    (cd "$t" && python3 - <<'PY'
old = dict(l.split() for l in open("old.list"))
new = dict(l.split() for l in open("new.list"))
with open("versions.txt", "w") as out:
    out.write("# small set: bookworm (point release) -> bookworm + bookworm-updates + bookworm-security, arm64\n")
    for p in sorted(set(old) | set(new)):
        o, n = old.get(p, "-"), new.get(p, "-")
        out.write(f"{p} {o} -> {n}\n" if o != n else f"{p} = {o}\n")
PY
    )
    touch "$t/done"
  fi
}

# copy_reordered SRC DST [FROM=TO ...]: copies the tree SRC to DST creating every directory's entries
# in reverse name order and with the path prefixes FROM renamed to TO (relative paths; symlinks are
# copied as they are, even where they now dangle). The reverse order does not reach the image:
# mkfs.ext4 -d (e2fsprogs 1.47) reads directories with scandir + alphasort, whatever the host
# filesystem lists first (checked with debugfs: /usr/bin/busctl and c_rehash get consecutive inodes
# in name order in both images of `moved`). The renames are what move files.
copy_reordered() {
  local src=$1 dst=$2
  shift 2
  python3 - "$src" "$dst" "$@" <<'PY'
import os, shutil, sys
src, dst, renames = sys.argv[1], sys.argv[2], [a.split("=", 1) for a in sys.argv[3:]]
def target(rel):
    for a, b in renames:
        if rel == a or rel.startswith(a + "/"):
            return b + rel[len(a):]
    return rel
def walk(rel):
    here = os.path.join(src, rel)
    for name in sorted(os.listdir(here), reverse=True):
        r = os.path.join(rel, name) if rel else name
        s, d = os.path.join(src, r), os.path.join(dst, target(r))
        os.makedirs(os.path.dirname(d), exist_ok=True)
        if os.path.islink(s):
            os.symlink(os.readlink(s), d)
        elif os.path.isdir(s):
            os.makedirs(d, exist_ok=True)
            shutil.copystat(s, d)
            walk(r)
        else:
            shutil.copy2(s, d)
os.makedirs(dst, exist_ok=True)
walk("")
PY
}
