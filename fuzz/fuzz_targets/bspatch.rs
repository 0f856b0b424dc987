//! `bspatch`: bspatch against a source window read through a cache
//! (`ota_delta::bspatch`), the way the apply engine applies every `BSDIFF`
//! operation, checked against the bsdiff crate's `bsdiff::patch` over the
//! whole window in memory.
//!
//! Input: the old window's bytes, cut into extents laid out in reverse
//! order with gaps in a larger source (so that reads cross extents); a
//! cache of 1..=4096 bytes in blocks of 1..=512 (so that blocks are evicted
//! and re-read, which the engine's 256 KiB cache over `apply_op`'s 16 KiB
//! sources never does); an output limit; and the patch: arbitrary bytes, or
//! control entries (mix, copy, seek) with arbitrary diff and extra bytes,
//! optionally truncated.
//!
//! Checked:
//! - no panic, no abort, no allocation past libFuzzer's limits;
//! - where the output limit does not bite: accepted exactly when
//!   `bsdiff::patch` accepts, with the same output byte for byte;
//! - with a limit: never more output than the limit, and where accepted the
//!   same output as `bsdiff::patch`;
//! - the window's digest is the SHA-256 of the old bytes.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ota_delta::bspatch::{Window, patch};
use ota_format::Digest;
use ota_format::manifest::Extent;

#[derive(Arbitrary, Debug)]
enum Patch {
    Raw(Vec<u8>),
    Entries {
        entries: Vec<(u16, u8, i16)>,
        bytes: Vec<u8>,
        truncate: Option<u16>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    old: Vec<u8>,
    cuts: Vec<u16>,
    cache: u16,
    block: u16,
    limit: Option<u16>,
    patch: Patch,
}

fn entries(entries: &[(u16, u8, i16)], bytes: &[u8], truncate: Option<u16>) -> Vec<u8> {
    let mut p = Vec::new();
    let mut b = bytes.iter().copied().cycle();
    for &(mix, copy, seek) in entries.iter().take(64) {
        let mix = u64::from(mix % 2048);
        let s = if seek < 0 {
            u64::from(seek.unsigned_abs()) | 1 << 63
        } else {
            seek as u64
        };
        p.extend(mix.to_le_bytes());
        p.extend(u64::from(copy).to_le_bytes());
        p.extend(s.to_le_bytes());
        let n = mix as usize + usize::from(copy);
        if bytes.is_empty() {
            p.extend(std::iter::repeat_n(0, n));
        } else {
            p.extend(b.by_ref().take(n));
        }
    }
    if let Some(t) = truncate {
        p.truncate(usize::from(t) % (p.len() + 1));
    }
    p
}

fuzz_target!(|input: Input| {
    let old = &input.old[..input.old.len().min(16 << 10)];
    // Extents: `old` cut at `cuts`, placed in reverse order with gaps.
    let mut bounds: Vec<usize> = input
        .cuts
        .iter()
        .take(16)
        .map(|&c| usize::from(c) % (old.len() + 1))
        .collect();
    bounds.extend([0, old.len()]);
    bounds.sort_unstable();
    let mut src = vec![0xA5u8; 5];
    let mut placed = Vec::new();
    for w in bounds.windows(2).rev() {
        placed.push((src.len() as u64, w[0], w[1]));
        src.extend_from_slice(&old[w[0]..w[1]]);
        src.extend([0x5A; 3]);
    }
    placed.sort_by_key(|p| p.1);
    let extents: Vec<Extent> = placed
        .into_iter()
        .map(|(at, a, b)| Extent::new(at, (b - a) as u64))
        .collect();

    let p = match &input.patch {
        Patch::Raw(b) => b.clone(),
        Patch::Entries {
            entries: e,
            bytes,
            truncate,
        } => entries(e, bytes, *truncate),
    };
    let cache = usize::from(input.cache % 4096) + 1;
    let block = usize::from(input.block % 512) + 1;
    let limit = input.limit.map_or(usize::MAX, usize::from);

    let mut w = Window::with_cache(&src[..], &extents, cache, block);
    assert_eq!(w.len(), old.len() as u64);
    let mut ours = Vec::new();
    let r = patch(&mut w, &mut &p[..], &mut ours, limit);
    assert!(ours.len() <= limit, "output past the limit");
    let mut theirs = Vec::new();
    let t = bsdiff::patch(old, &mut &p[..], &mut theirs);
    if limit == usize::MAX {
        assert_eq!(
            r.is_ok(),
            t.is_ok(),
            "ours {:?} theirs {:?}",
            r.err(),
            t.err()
        );
    }
    if r.is_ok() {
        assert!(t.is_ok(), "accepted what bsdiff::patch refuses");
        assert!(ours == theirs, "output differs from bsdiff::patch");
    }
    assert_eq!(w.digest().expect("in-memory source"), Digest::of(old));
});
