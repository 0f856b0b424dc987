//! Property tests: for random old/new pairs built from the edits real updates
//! make (inserts, deletes, blocks moved elsewhere, zero runs, byte noise), a
//! generated delta applies back to exactly the new image, and the source is
//! never modified.

use std::fs::File;
use std::io::Write;

use ota_delta::apply::{ApplyOptions, apply_image, check_payload, check_source};
use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
use ota_format::Manifest;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Edit {
    Insert {
        at: usize,
        len: usize,
        seed: u8,
    },
    Delete {
        at: usize,
        len: usize,
    },
    MoveBlock {
        from: usize,
        to: usize,
        blocks: usize,
    },
    Zero {
        at: usize,
        len: usize,
    },
    Noise {
        at: usize,
        every: usize,
        count: usize,
    },
    /// The same new bytes written at two places (one new file shipped twice).
    Twice {
        a: usize,
        b: usize,
        blocks: usize,
        seed: u8,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    let pos = 0usize..1_000_000;
    prop_oneof![
        (pos.clone(), 1usize..20_000, any::<u8>()).prop_map(|(at, len, seed)| Edit::Insert {
            at,
            len,
            seed
        }),
        (pos.clone(), 1usize..20_000).prop_map(|(at, len)| Edit::Delete { at, len }),
        (pos.clone(), pos.clone(), 1usize..16).prop_map(|(from, to, blocks)| Edit::MoveBlock {
            from,
            to,
            blocks
        }),
        (pos.clone(), 1usize..100_000).prop_map(|(at, len)| Edit::Zero { at, len }),
        (pos.clone(), pos.clone(), 1usize..24, any::<u8>())
            .prop_map(|(a, b, blocks, seed)| Edit::Twice { a, b, blocks, seed }),
        (pos, 1usize..64, 1usize..500).prop_map(|(at, every, count)| Edit::Noise {
            at,
            every,
            count
        }),
    ]
}

/// Compressible but not trivial content, with some zero runs, like a binary.
fn base_image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 16 {
            0 => out.extend(std::iter::repeat_n(0u8, (x >> 8) as usize % 9000)),
            1..=8 => out.extend_from_slice(&x.to_le_bytes()[..(x >> 60) as usize % 8 + 1]),
            _ => out.extend_from_slice(b"edge-ota\x00\x01fn main() { update(); }\n"),
        }
    }
    out.truncate(len);
    out
}

fn apply_edits(old: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut new = old.to_vec();
    for e in edits {
        let n = new.len().max(1);
        match *e {
            Edit::Insert { at, len, seed } => {
                let at = at % n;
                let bytes: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                    .collect();
                new.splice(at..at, bytes);
            }
            Edit::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(new.len());
                new.drain(at..end);
            }
            Edit::MoveBlock { from, to, blocks } => {
                let len = blocks * 4096;
                if new.len() > 2 * len {
                    let from = (from % (new.len() - len)) / 4096 * 4096;
                    let to = (to % (new.len() - len)) / 4096 * 4096;
                    let moved = new[from..from + len].to_vec();
                    new[to..to + len].copy_from_slice(&moved);
                }
            }
            Edit::Zero { at, len } => {
                let at = at % n;
                let end = (at + len).min(new.len());
                new[at..end].fill(0);
            }
            Edit::Twice { a, b, blocks, seed } => {
                let len = blocks * 4096;
                if new.len() > 2 * len {
                    let mut x = seed as u32 | 1;
                    let bytes: Vec<u8> = (0..len)
                        .map(|_| {
                            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                            (x >> 16) as u8
                        })
                        .collect();
                    for at in [a, b] {
                        let at = (at % (new.len() - len)) / 4096 * 4096;
                        new[at..at + len].copy_from_slice(&bytes);
                    }
                }
            }
            Edit::Noise { at, every, count } => {
                let mut p = at % n;
                for i in 0..count {
                    if p >= new.len() {
                        break;
                    }
                    new[p] = new[p].wrapping_add(i as u8 | 1);
                    p += every;
                }
            }
        }
    }
    new
}

fn tmp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

fn round_trip(old: Option<&[u8]>, new: &[u8], chunk_size: u64) {
    let src = old.map(tmp_with);
    let dst = tmp_with(new);
    let spec = DeltaSpec {
        device_type: "test".into(),
        from_version: old.map(|_| "1".into()),
        to_version: "2".into(),
        security_counter: 1,
        expires_at: Manifest::expiry_in(1),
    };
    let opts = GenerateOptions {
        chunk_size,
        zstd_level: 3,
        xz: true,
        zero_runs: true,
        arm64: true,
        frames: true,
        threads: 2,
        progress: false,
    };
    let mut payload = Vec::new();
    let src_file = src.as_ref().map(|f| File::open(f.path()).unwrap());
    let manifest = generate(&spec, src_file.as_ref(), dst.as_file(), &mut payload, &opts).unwrap();
    check_payload(&manifest, &payload, payload.len() as u64).unwrap();
    if let Some(old) = old {
        check_source(&manifest, old, old.len() as u64).unwrap();
    }
    let out = tempfile::tempfile().unwrap();
    out.set_len(manifest.to.size).unwrap();
    let old_vec = old.map(|o| o.to_vec());
    apply_image(
        &manifest,
        &payload,
        old_vec.as_ref(),
        &out,
        ApplyOptions {
            threads: 3,
            ..ApplyOptions::default()
        },
        |_| {},
    )
    .unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &out, &mut got).unwrap();
    assert!(got == new, "applied image differs from the new image");
    if let (Some(old), Some(src)) = (old, src) {
        assert_eq!(
            std::fs::read(src.path()).unwrap(),
            old,
            "the source was modified"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn delta_round_trips_exactly(
        len in 1usize..1_200_000,
        seed in any::<u64>(),
        edits in proptest::collection::vec(edit(), 0..8),
        chunk_blocks in 1u64..64,
    ) {
        let old = base_image(len, seed);
        let new = apply_edits(&old, &edits);
        round_trip(Some(&old), &new, chunk_blocks * 4096);
    }

    #[test]
    fn full_image_round_trips_exactly(len in 0usize..600_000, seed in any::<u64>()) {
        round_trip(None, &base_image(len, seed), 64 * 1024);
    }
}

#[test]
fn new_content_written_twice_is_carried_once() {
    let old = base_image(1 << 20, 9);
    let mut new = old.clone();
    let fresh: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    new.extend_from_slice(&fresh);
    new.resize(new.len().div_ceil(4096) * 4096 + 8192, 0);
    new.extend_from_slice(&fresh);
    let src = tmp_with(&old);
    let dst = tmp_with(&new);
    let spec = DeltaSpec {
        device_type: "test".into(),
        from_version: Some("1".into()),
        to_version: "2".into(),
        security_counter: 1,
        expires_at: Manifest::expiry_in(1),
    };
    let opts = GenerateOptions {
        chunk_size: 1 << 20,
        zstd_level: 3,
        xz: true,
        zero_runs: true,
        arm64: true,
        frames: true,
        threads: 2,
        progress: false,
    };
    let mut payload = Vec::new();
    let m = generate(
        &spec,
        Some(src.as_file()),
        dst.as_file(),
        &mut payload,
        &opts,
    )
    .unwrap();
    let offsets: Vec<u64> = m
        .operations
        .iter()
        .filter_map(|o| o.data.map(|d| d.offset))
        .collect();
    let shared = offsets
        .iter()
        .filter(|o| offsets.iter().filter(|p| p == o).count() > 1)
        .count();
    assert!(shared > 0);
    // The fresh bytes are incompressible: carried twice they would cost 400 kB.
    assert!(
        payload.len() < 300_000,
        "payload {} bytes: duplicate content stored twice?",
        payload.len()
    );
    round_trip(Some(&old), &new, 1 << 20);
}

#[test]
fn identical_images_need_no_payload_beyond_zero_runs() {
    let old = base_image(2 << 20, 7);
    round_trip(Some(&old), &old, 1 << 20);
}

#[test]
fn empty_target_round_trips() {
    round_trip(Some(&base_image(10_000, 3)), &[], 1 << 20);
}
