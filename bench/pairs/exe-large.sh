#!/usr/bin/env bash
# exe-large: /usr/bin/etcd from Debian's arm64 etcd-server, 3.4.23 (bookworm) -> 3.5.16 (trixie): a
# Go server one upstream minor version apart (and built by a newer Go), 20.6 and 24.5 MB. Large Go
# binaries are a common device payload (container runtimes, agents, servers).
#   usage: bench/pairs/exe-large.sh OUTDIR   -> OUTDIR/exe-large/{old,new,VERSIONS.txt}
source "$(dirname "$0")/lib.sh"
pair_begin exe-large "${1:-}"
apt_state bookworm "bookworm"
apt_state trixie "trixie trixie-updates trixie-security"
old=$(apt_closure bookworm etcd-server | awk '$1 == "etcd-server" { print $2 }')
new=$(apt_closure trixie etcd-server | awk '$1 == "etcd-server" { print $2 }')
[ -n "$old" ] && [ -n "$new" ] || die "etcd-server not found in bookworm or trixie (arm64)"
echo "etcd-server $old (bookworm) -> $new (trixie), file /usr/bin/etcd" >>"$WORK/VERSIONS.txt"
echo "etcd-server $old" | unpack "$WORK/root-old" bookworm
echo "etcd-server $new" | unpack "$WORK/root-new" trixie
cp "$WORK/root-old/usr/bin/etcd" "$WORK/old"
cp "$WORK/root-new/usr/bin/etcd" "$WORK/new"
file -b "$WORK/old" "$WORK/new" | sed 's/^/# /' >>"$WORK/VERSIONS.txt" 2>/dev/null || true
pair_done
