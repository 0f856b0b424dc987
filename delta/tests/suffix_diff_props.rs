//! Property tests of the generator's own bsdiff match search
//! (`suffix_diff`): whatever the input, its streams, stored as a `BSDIFF`
//! operation's data, are read back by the apply side (`patch_streams` +
//! `bsdiff::patch`, the code agents in the field run) to exactly the new
//! bytes; and its patches are no bigger than the `bsdiff` crate's.

use std::io::Read;

use ota_delta::patch_streams::{self, Interleaved};
use ota_delta::suffix_diff;
use proptest::prelude::*;

/// Applies streams the way `apply.rs` applies a `BSDIFF` operation.
fn apply(old: &[u8], s: suffix_diff::Streams, new_len: usize) -> Vec<u8> {
    // xz and zero runs where smaller: property tests cover every codec.
    let (data, _) =
        patch_streams::compress_with(&patch_streams::from_streams(s), 3, Some(new_len), true)
            .unwrap();
    let streams = patch_streams::decompress(&data, new_len + (1 << 20)).unwrap();
    let mut out = Vec::new();
    bsdiff::patch(old, &mut Interleaved::new(&streams), &mut out).unwrap();
    out
}

/// Every extension rule's streams apply to `new`, and `diff` is the
/// first's (bsdiff's own).
fn round_trips(old: &[u8], new: &[u8]) {
    let rules = [
        suffix_diff::EXTEND_HALF,
        suffix_diff::Extend { num: 1, den: 4 },
        suffix_diff::Extend { num: 0, den: 1 },
        suffix_diff::Extend { num: 1, den: 1 },
    ];
    let each = suffix_diff::diff_each(old, new, &rules);
    assert_eq!(each[0], suffix_diff::diff(old, new));
    for (s, rule) in each.into_iter().zip(rules) {
        assert_eq!(s.ctrl.len() % 24, 0);
        let out = apply(old, s, new.len());
        assert!(out == new, "applied output differs from new ({rule:?})");
    }
}

/// xorshift bytes from a small alphabet (`alphabet` 1 = a constant run).
fn bytes(len: usize, seed: u64, alphabet: u8) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % alphabet.max(1) as u64) as u8
        })
        .collect()
}

/// Content shaped like a binary: repeated records, counters, zero runs.
fn structured(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = seed;
    while out.len() < len {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        match i >> 61 {
            0 => out.extend(std::iter::repeat_n(0u8, (i >> 20) as usize % 3000)),
            1 | 2 => out.extend_from_slice(&(out.len() as u32).to_le_bytes()),
            3 => out.extend_from_slice(b"\x48\x89\xe5\x41\x57\x41\x56\x53"),
            _ => out.extend_from_slice(&i.to_le_bytes()[..(i >> 33) as usize % 8 + 1]),
        }
    }
    out.truncate(len);
    out
}

/// `old` with a few inserts, deletes, overwrites and a moved piece.
fn mutate(old: &[u8], seed: u64, edits: usize) -> Vec<u8> {
    let mut new = old.to_vec();
    let mut x = seed | 1;
    let mut next = |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m.max(1) as u64) as usize
    };
    for _ in 0..edits {
        let n = new.len();
        let at = next(n + 1);
        match next(4) {
            0 => {
                let len = next(300);
                new.splice(at..at, bytes(len, at as u64, 251));
            }
            1 => {
                let end = (at + next(300)).min(n);
                new.drain(at..end);
            }
            2 => {
                for k in (at..n).step_by(next(60) + 1).take(next(40)) {
                    new[k] = new[k].wrapping_add(1);
                }
            }
            _ => {
                let from = next(n + 1);
                let len = next(5000).min(n - from);
                let piece = new[from..from + len].to_vec();
                new.splice(at..at, piece);
            }
        }
    }
    new
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_pairs_round_trip(
        old_len in 0usize..5000,
        new_len in 0usize..5000,
        seed in any::<u64>(),
        alphabet in 1u8..=255,
    ) {
        round_trips(&bytes(old_len, seed, alphabet), &bytes(new_len, !seed, alphabet));
    }

    #[test]
    fn edited_pairs_round_trip(
        len in 0usize..60_000,
        seed in any::<u64>(),
        edits in 0usize..20,
        kind in 0u8..3,
    ) {
        let old = match kind {
            0 => structured(len, seed),
            1 => bytes(len, seed, 4),
            _ => vec![0u8; len],
        };
        round_trips(&old, &mutate(&old, seed ^ 0x5eed, edits));
    }
}

#[test]
fn degenerate_inputs_round_trip() {
    round_trips(&[], &[]);
    round_trips(&[], b"all new");
    round_trips(b"old", &[]);
    round_trips(&[0; 100_000], &[0; 100_001]);
    round_trips(&[0xff; 70_000], &[0; 70_000]);
    let period: Vec<u8> = b"abcabcabd".repeat(20_000);
    round_trips(&period, &period[7..]);
}

/// The new match search must not cost size: on binary-like edits its
/// compressed patch is at most 1 % larger than the `bsdiff` crate's
/// (the algorithm is the same; only ties between equal matches may differ).
#[test]
fn patches_are_no_bigger_than_the_bsdiff_crates() {
    for seed in 1..=6u64 {
        let old = structured(400_000, seed);
        let new = mutate(&old, seed * 77, 60);
        let ours = patch_streams::compress(
            &patch_streams::from_streams(suffix_diff::diff(&old, &new)),
            9,
            None,
        )
        .unwrap()
        .0;
        let mut patch = Vec::new();
        bsdiff::diff(&old, &new, &mut patch).unwrap();
        let theirs = patch_streams::compress(&patch_streams::split(&patch).unwrap(), 9, None)
            .unwrap()
            .0;
        assert!(
            ours.len() * 100 <= theirs.len() * 101,
            "seed {seed}: {} bytes against the bsdiff crate's {}",
            ours.len(),
            theirs.len()
        );
        // And the crate's own apply reads ours.
        let streams = patch_streams::decompress(&ours, 1 << 22).unwrap();
        let mut joined = Vec::new();
        Interleaved::new(&streams).read_to_end(&mut joined).unwrap();
        let mut out = Vec::new();
        bsdiff::patch(&old, &mut joined.as_slice(), &mut out).unwrap();
        assert!(out == new);
    }
}
