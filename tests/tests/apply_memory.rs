//! The apply engine's memory bound, counted: on a synthetic delta of many
//! `BSDIFF` operations (1 MiB outputs, 4 MiB source windows, zstd and bzip2
//! streams), applied on several threads, the heap the apply holds at its
//! peak stays within the budget it was given plus the documented constants
//! — `op_work` is an upper bound of what each operation allocates, not an
//! estimate.
//!
//! The same with compression frames (codec `frames`): a frame's operations
//! are applied together, the frame decoded once, within `group_work`.
//!
//! This test binary has its own global allocator
//! (`ota_tests::counting_alloc`) and a single test, so nothing else
//! allocates while it counts.
//! Each `BSDIFF` operation with a window of several MiB holds less than its
//! window (read through `bspatch::WINDOW_CACHE`).
//!
//! Regression test for the 2 GiB delta apply that held 61–63 MiB: the
//! decoded streams were allocated at their cap (output + 1 MiB each, three
//! of them), the control stream was copied to be untransposed, bzip2
//! decoders (3.6 MiB each) were not counted, so the budget undercounted
//! each operation by 4–8 MiB.

use ota_delta::apply::{
    ApplyOptions, FRAME_THREADS, FramePlan, apply_group, apply_image, frame_plans, group_work,
    group_work_of, groups, is_frame_group,
};
use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
use ota_delta::io::ReadAt;
use ota_delta::patch_streams::{BZIP2_DECODER_BYTES, BZIP2_DECODERS, bzip2_decodes};
use ota_format::{Manifest, OpKind};
use ota_tests::counting_alloc::{self, Counting};

#[global_allocator]
static A: Counting = Counting;

/// Old: varied, partly compressible bytes; new: the same with a byte changed
/// every ~4 KiB (relocated pointers), so every 1 MiB chunk is a `BSDIFF`
/// against a window of several MiB.
fn pair(len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut old = Vec::with_capacity(len);
    while old.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 3 == 0 {
            old.extend_from_slice(&x.to_le_bytes());
        } else {
            old.extend_from_slice(b"\x7fELF relocation table entry ");
        }
    }
    old.truncate(len);
    let mut new = old.clone();
    for i in (0..len).step_by(4093) {
        new[i] = new[i].wrapping_add((i >> 12) as u8 | 1);
    }
    (old, new)
}

#[test]
fn apply_holds_at_most_op_work_per_operation_and_its_budget_in_all() {
    // One test: nothing else may allocate while it counts.
    for frames in [false, true] {
        eprintln!("frames: {frames}");
        holds_at_most_its_bound(frames);
    }
}

fn holds_at_most_its_bound(frames: bool) {
    let len = 24 << 20;
    let (old, new) = pair(len);
    let dir = tempfile::tempdir().unwrap();
    let (op, np) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::write(&op, &old).unwrap();
    std::fs::write(&np, &new).unwrap();
    drop(new);
    let spec = DeltaSpec {
        device_type: "t".into(),
        from_version: Some("1".into()),
        to_version: "2".into(),
        security_counter: 0,
        expires_at: Manifest::expiry_in(1),
    };
    let mut payload = Vec::new();
    let manifest = generate(
        &spec,
        Some(&std::fs::File::open(&op).unwrap()),
        &std::fs::File::open(&np).unwrap(),
        &mut payload,
        &GenerateOptions {
            chunk_size: 1 << 20,
            zstd_level: 3,
            xz: true,
            zero_runs: true,
            arm64: true,
            frames,
            threads: 2,
            progress: false,
        },
    )
    .unwrap();
    let bsdiff = manifest
        .operations
        .iter()
        .filter(|o| o.kind == OpKind::Bsdiff)
        .count();
    assert!(bsdiff >= 16, "the fixture must exercise BSDIFF: {bsdiff}");
    let units = groups(&manifest);
    let framed = units
        .iter()
        .filter(|u| is_frame_group(&manifest, u))
        .count();
    assert_eq!(
        framed > 0,
        frames,
        "the fixture must exercise frames exactly when asked"
    );
    let memory = |u: &[usize]| {
        manifest.operations[u[0]].data.map_or(0, |d| d.length) + group_work(&manifest, u)
    };
    let largest = units.iter().map(|u| memory(u)).max().unwrap();
    let budget = ota_delta::apply::APPLY_MEMORY_BUDGET;
    assert!(
        frames || largest * 2 <= budget,
        "the budget must admit two operations at a time ({largest})"
    );
    assert!(largest <= budget, "a frame fits the budget ({largest})");
    let payload_path = dir.path().join("payload");
    std::fs::write(&payload_path, &payload).unwrap();
    drop(payload);
    let payload = std::fs::File::open(&payload_path).unwrap();
    let source = std::fs::File::open(&op).unwrap();
    let out = tempfile::tempfile_in(dir.path()).unwrap();
    out.set_len(len as u64).unwrap();

    // Each operation, or frame, alone: what it allocates is within
    // `group_work` (`op_work` for one operation; plus a bzip2 decoder if it
    // decoded a bzip2 stream, and a few KiB of hasher and bookkeeping).
    let mut bzip2_ops = 0;
    let mut framed_pairs = 0;
    let mut windows = 0;
    for unit in &units {
        let (i, op) = (unit[0], &manifest.operations[unit[0]]);
        let mut data = vec![0u8; op.data.map_or(0, |d| d.length as usize)];
        if let Some(d) = op.data {
            payload.read_exact_at(&mut data, d.offset).unwrap();
        }
        // The bytes applying `unit` with `plan` held at most, and the bzip2
        // decoders it made.
        let held_by = |plan: FramePlan| {
            let bz = bzip2_decodes();
            let before = counting_alloc::start();
            apply_group(
                &manifest,
                unit,
                unit,
                &data,
                Some(&source),
                &out,
                plan,
                |_| {},
            )
            .unwrap();
            (counting_alloc::held_since(before), bzip2_decodes() - bz)
        };
        let (held, bz) = held_by(FramePlan::ONE);
        let decoder = if bz > 0 {
            bzip2_ops += 1;
            BZIP2_DECODER_BYTES
        } else {
            0
        };
        // What the frame's header declares, not only the format's bound:
        // callers give back the difference before applying.
        let bound = group_work_of(&manifest, unit, &data) + decoder + (64 << 10);
        assert!(group_work_of(&manifest, unit, &data) <= group_work(&manifest, unit));
        assert!(
            held as u64 <= bound,
            "operation {i} ({}, window {}, dst {}, {} in its group) held {held} bytes, over its bound of {bound}",
            op.kind.name(),
            op.src_len(),
            op.dst.length,
            unit.len()
        );
        // The source window is read through `bspatch::WINDOW_CACHE`, not
        // held: an operation holds less than its window (4 MiB here, its
        // output 1 MiB). Before, each held its window whole, which limited
        // the operations (and frame members) a budget admits at once.
        if op.kind == OpKind::Bsdiff && op.src_len() >= 2 << 20 {
            windows += 1;
            assert!(
                (held as u64) < op.src_len() + decoder,
                "BSDIFF operation {i} held {held} bytes (a bzip2 decoder: {decoder}), its window is {}",
                op.src_len()
            );
        }
        // A frame under every other plan (streamed, two at a time): within
        // what `frame_plans` says that plan holds (what the pool and
        // `apply_image` reserve before choosing it).
        if is_frame_group(&manifest, unit) {
            let plans = frame_plans(&manifest, unit, &data, FRAME_THREADS);
            assert!(plans.len() > 1, "a frame has plans beside one at a time");
            for (plan, work) in plans {
                let (held, bz) = held_by(plan);
                let decoders = bz * BZIP2_DECODER_BYTES;
                let bound = work + decoders + (64 << 10);
                assert!(
                    held as u64 <= bound,
                    "frame at operation {i} ({} members) with {plan:?} held {held} bytes, over its bound of {bound}",
                    unit.len()
                );
            }
            framed_pairs += 1;
        }
    }
    eprintln!("{bzip2_ops} operations decoded bzip2 streams");
    assert!(
        frames || windows >= 8,
        "the fixture must exercise large windows: {windows}"
    );
    assert_eq!(framed_pairs > 0, frames, "frames applied under every plan");

    // The whole apply, several operations at once: within the budget plus
    // the constants.
    let before = counting_alloc::start();
    apply_image(
        &manifest,
        &payload,
        Some(&source),
        &out,
        ApplyOptions {
            dest_is_zeroed: true,
            threads: 4,
            memory_budget: budget,
        },
        |_| {},
    )
    .unwrap();
    let held = counting_alloc::held_since(before);
    eprintln!(
        "held {held} largest {largest} bsdiff {bsdiff} ops {}",
        manifest.operations.len()
    );
    // What is not an operation's: at most one bzip2 decoder, the final
    // read-back hash's 1 MiB buffer, and per thread a few KiB (hashers,
    // error strings, thread bookkeeping).
    let bound = budget as usize + BZIP2_DECODERS * BZIP2_DECODER_BYTES as usize + (2 << 20);
    assert!(
        held <= bound,
        "apply held {held} bytes at its peak, over its bound of {bound} (budget {budget})"
    );
}
