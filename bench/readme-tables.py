#!/usr/bin/env python3
"""Prints the README's two delta-benchmark tables (sizes; generation and apply) from one or more
`results.json` files written by `bench/delta-bench.sh`.

    bench/readme-tables.py target/bench/results.json [target/bench-rerun/results.json ...]

Where several runs are given, a later file's row for a (pair, tool) replaces an earlier one's (a
second run of a few pairs after a change, say); the README says which rows came from which run.
Pairs appear in the order of the first file that has them. Columns for tools no run measured are
printed as "—", so a run of "ours hdiff-lzma2" alone still gives both tables.

Why a script: the README's tables were copied by hand (and once by a throw-away script) from
`results.json`; this keeps their layout and rounding the same from run to run.
"""
import json
import sys

SIZE_TOOLS = [("ours", "**ours**"), ("ours-noframes", "without frames"), ("bsdiff", "bsdiff"),
              ("xdelta3", "xdelta3 -9"), ("zstd", "zstd -19 --patch-from"),
              ("hdiff-zstd", "HDiffPatch zstd"), ("hdiff-lzma2", "HDiffPatch lzma2")]
REF = "hdiff-lzma2"


def load(paths):
    rows, pairs = {}, []
    for p in paths:
        with open(p) as fh:
            doc = json.load(fh)
        for r in doc["results"]:
            if r["pair"] not in pairs:
                pairs.append(r["pair"])
            rows[(r["pair"], r["tool"])] = r
    return pairs, rows


def ok(r):
    return r is not None and r["status"] == "ok" and r["patch_bytes"] is not None


def size_cell(r, bold=False):
    if r is None:
        return "—"
    if r["status"] == "timeout":
        return r["note"] or "did not finish"
    if not ok(r):
        return "FAILED"
    s = f"{r['patch_bytes']:,}"
    return f"**{s}**" if bold else s


def num(v, fmt):
    return "—" if v is None else format(v, fmt)


def mib(kib):
    return None if kib is None else kib / 1024


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    pairs, rows = load(argv[1:])
    get = lambda pair, tool: rows.get((pair, tool))

    head = ["pair (new size)"] + [t[1] for t in SIZE_TOOLS] + ["**ours ÷ HDiffPatch lzma2** (payload alone)"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for pair in pairs:
        any_row = next(r for (p, _), r in rows.items() if p == pair)
        cells = [f"{pair} ({any_row['new_bytes'] / 1e6:.1f} MB)"]
        cells += [size_cell(get(pair, t), bold=(t == "ours")) for t, _ in SIZE_TOOLS]
        o, h = get(pair, "ours"), get(pair, REF)
        if ok(o) and ok(h):
            cells.append(f"**{o['patch_bytes'] / h['patch_bytes']:.3f}** ({o['payload_bytes'] / h['patch_bytes']:.4f})")
        else:
            cells.append("—")
        print("| " + " | ".join(cells) + " |")

    print()
    head = ["pair", "gen CPU s ours / without frames / HDiffPatch lzma2", "**CPU ÷ HDiffPatch**",
            "gen wall s ours / HDiffPatch", "gen RSS MiB ours / HDiffPatch",
            "apply s ours / bspatch / HDiffPatch", "apply RSS MiB ours / bspatch / HDiffPatch"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for pair in pairs:
        o, nf, h, b = (get(pair, t) for t in ("ours", "ours-noframes", REF, "bsdiff"))
        o, nf, h = (r if ok(r) else None for r in (o, nf, h))
        b = b if ok(b) else None
        cpu = lambda r: r["gen_cpu_s"] if r else None
        ratio = cpu(o) / cpu(h) if o and h and cpu(h) else None
        cells = [
            pair,
            " / ".join(num(cpu(r), ".2f") for r in (o, nf, h)),
            f"**{ratio:.2f}**" if ratio is not None else "—",
            " / ".join(num(r["gen_s"] if r else None, ".1f") for r in (o, h)),
            " / ".join(num(mib(r["gen_peak_rss_kib"]) if r else None, ".0f") for r in (o, h)),
            " / ".join(num(r["apply_s"] if r else None, ".3f") for r in (o, b, h)),
            " / ".join(num(mib(r["apply_peak_rss_kib"]) if r else None, ".1f") for r in (o, b, h)),
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
