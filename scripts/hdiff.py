#!/usr/bin/env python3
"""Command-line wrapper around the `hdiffpatch` PyPI package (HDiffPatch), for the delta benchmark.

    hdiff.py diff OLD NEW PATCH [--compression zstd|lzma2] [--level N] [--window LOG2]
                                [--threads N] [--big-cache-match] [--validate]
    hdiff.py apply OLD PATCH OUT

Defaults are the strongest standard single-threaded settings of each codec:
  zstd : level 22, window 2^ceil(log2(len(NEW))) clamped to 2^10..2^27 (27 is the library's maximum)
  lzma2: level 9,  dict   2^ceil(log2(len(NEW))) clamped to 2^12..2^30
A window larger than the data it compresses gains nothing and only costs memory, so it is sized to
NEW (the diff streams HDiffPatch compresses are never larger than NEW plus a small header).
One thread: multi-threaded lzma2 splits its input into independently compressed blocks (a worse
ratio), and the benchmark compares single-process tools on a 2-core machine.

The library works on whole in-memory buffers (`diff(old, new)` and `apply(old, patch)` take and
return `bytes`), so peak RSS includes OLD, NEW/PATCH and the output; the streaming `hpatchz` tool
of HDiffPatch applies in far less memory. No round-trip validation by default: the benchmark
compares the applied output with NEW itself, and the other tools don't validate either.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

try:
    import hdiffpatch
except ImportError:  # pragma: no cover - reported to the caller
    sys.exit("hdiff.py: the hdiffpatch module is missing: pip install hdiffpatch")

LIMITS = {"zstd": (10, 27), "lzma2": (12, 30)}
DEFAULT_LEVEL = {"zstd": 22, "lzma2": 9}


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".hdiff-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def window_for(size: int, codec: str) -> int:
    lo, hi = LIMITS[codec]
    return min(hi, max(lo, max(size - 1, 1).bit_length()))


def config(codec: str, level: int | None, window: int | None, threads: int, new_size: int):
    level = DEFAULT_LEVEL[codec] if level is None else level
    window = window_for(new_size, codec) if window is None else window
    if codec == "zstd":
        return hdiffpatch.ZStdConfig(level=level, window=window, threads=threads)
    return hdiffpatch.Lzma2Config(level=level, window=window, threads=threads)


def cmd_diff(a: argparse.Namespace) -> None:
    old, new = read(a.old), read(a.new)
    cfg = config(a.compression, a.level, a.window, a.threads, len(new))
    patch = hdiffpatch.diff(old, new, cfg, validate=a.validate, big_cache_match=a.big_cache_match)
    write_atomic(a.patch, patch)
    print(f"{a.patch}: {len(patch)} bytes ({cfg!r}, big_cache_match={a.big_cache_match})")


def cmd_apply(a: argparse.Namespace) -> None:
    out = hdiffpatch.apply(read(a.old), read(a.patch))
    write_atomic(a.out, out)
    print(f"{a.out}: {len(out)} bytes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hdiff.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("diff", help="OLD NEW PATCH: write an HDiffPatch diff")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("patch")
    d.add_argument("--compression", choices=sorted(LIMITS), default="zstd")
    d.add_argument("--level", type=int, help="codec level (default: zstd 22, lzma2 9)")
    d.add_argument("--window", type=int, help="log2 window/dict size (default: sized to NEW)")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument(
        "--big-cache-match",
        action="store_true",
        help="extra match cache over OLD: faster diff, byte-identical output, more memory",
    )
    d.add_argument("--validate", action="store_true", help="round-trip check inside the library")
    d.set_defaults(func=cmd_diff)
    ap = sub.add_parser("apply", help="OLD PATCH OUT: apply an HDiffPatch diff")
    ap.add_argument("old")
    ap.add_argument("patch")
    ap.add_argument("out")
    ap.set_defaults(func=cmd_apply)
    a = p.parse_args(argv)
    try:
        a.func(a)
    except (hdiffpatch.HDiffPatchError, OSError, ValueError, MemoryError) as e:
        print(f"hdiff.py: {a.cmd} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
