//! Compression frames through the generator and the apply engine: a delta
//! of many changed chunks is made of frames; each frame applies member by
//! member (also only its pending members, as after a resume); a frame's data
//! is never applied as one operation's, nor in a manifest that does not
//! list the codec; a frame whose bytes were altered (and re-hashed, as a
//! lying server with a forged manifest digest would need) writes nothing
//! wrong.

use ota_delta::apply::{
    ApplyError, FramePlan, apply_group, apply_operation, groups, is_frame_group,
    verify_operation_output,
};
use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
use ota_format::{Digest, Manifest, OpKind};

/// Old: code-like records; new: every 64 KiB chunk changed here and there
/// (relocated pointers), so each chunk is a `BSDIFF` like its neighbours.
fn pair() -> (Vec<u8>, Vec<u8>) {
    let len = 3 << 20;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut old = Vec::with_capacity(len);
    while old.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 4 == 0 {
            old.extend_from_slice(&x.to_le_bytes()[..4]);
        } else {
            old.extend_from_slice(b"\x94\x00\x00\x2a module_init relocation ");
        }
    }
    old.truncate(len);
    let mut new = old.clone();
    for i in (0..len).step_by(997) {
        new[i] = new[i].wrapping_add(3);
    }
    (old, new)
}

/// Every way a frame's members may be applied: decoded first, one or two
/// at a time; and while it decodes, one or two at a time.
const PLANS: [FramePlan; 4] = [
    FramePlan::ONE,
    FramePlan::TWO,
    FramePlan::streamed(1),
    FramePlan::streamed(2),
];

fn build(frames: bool) -> (Vec<u8>, Vec<u8>, Manifest, Vec<u8>) {
    let (old, new) = pair();
    let dir = tempfile::tempdir().unwrap();
    let (op, np) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::write(&op, &old).unwrap();
    std::fs::write(&np, &new).unwrap();
    let spec = DeltaSpec {
        device_type: "t".into(),
        from_version: Some("1".into()),
        to_version: "2".into(),
        security_counter: 0,
        expires_at: Manifest::expiry_in(1),
    };
    let mut payload = Vec::new();
    let m = generate(
        &spec,
        Some(&std::fs::File::open(&op).unwrap()),
        &std::fs::File::open(&np).unwrap(),
        &mut payload,
        &GenerateOptions {
            chunk_size: 64 << 10,
            zstd_level: 3,
            frames,
            threads: 2,
            progress: false,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    (old, new, m, payload)
}

/// A destination in memory.
struct Mem(std::sync::Mutex<Vec<u8>>);

impl Mem {
    fn new(v: Vec<u8>) -> Mem {
        Mem(std::sync::Mutex::new(v))
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

impl ota_delta::io::WriteAt for Mem {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

fn data_of<'a>(m: &Manifest, payload: &'a [u8], i: usize) -> &'a [u8] {
    let d = m.operations[i].data.unwrap();
    &payload[d.offset as usize..(d.offset + d.length) as usize]
}

#[test]
fn a_delta_of_many_similar_chunks_is_smaller_in_frames_and_applies_member_by_member() {
    let (old, new, m, payload) = build(true);
    let (_, _, plain, plain_payload) = build(false);
    assert!(m.codecs.iter().any(|c| c == "frames"), "{:?}", m.codecs);
    assert!(!plain.codecs.iter().any(|c| c == "frames"));
    assert!(
        payload.len() < plain_payload.len(),
        "frames {} bytes, alone {}",
        payload.len(),
        plain_payload.len()
    );
    let units = groups(&m);
    let frames: Vec<&Vec<usize>> = units.iter().filter(|u| is_frame_group(&m, u)).collect();
    assert!(frames.len() >= 2, "{} frames", frames.len());
    assert!(
        frames
            .iter()
            .all(|u| u.len() <= ota_delta::generate::FRAME_MEMBERS)
    );
    // Members one after another, two at a time, and while the frame decodes.
    for plan in PLANS {
        let w = Mem::new(vec![0u8; new.len()]);
        for unit in &units {
            let data = m.operations[unit[0]]
                .data
                .map_or(&[][..], |_| data_of(&m, &payload, unit[0]));
            let mut done = Vec::new();
            apply_group(&m, unit, unit, data, Some(&old), &w, plan, |i| done.push(i)).unwrap();
            done.sort_unstable();
            assert_eq!(&done, unit, "{plan:?}");
        }
        assert!(w.bytes() == new, "applied image differs ({plan:?})");
    }
}

#[test]
fn a_resumed_frame_applies_only_its_pending_members() {
    let (old, new, m, payload) = build(true);
    let units = groups(&m);
    let frame = units
        .iter()
        .find(|u| is_frame_group(&m, u) && u.len() >= 3)
        .unwrap();
    let pending = &frame[frame.len() / 2..];
    for plan in PLANS {
        let out = Mem::new(old.clone());
        let mut done = Vec::new();
        apply_group(
            &m,
            frame,
            pending,
            data_of(&m, &payload, frame[0]),
            Some(&old),
            &out,
            plan,
            |i| done.push(i),
        )
        .unwrap();
        done.sort_unstable();
        assert_eq!(done, pending, "{plan:?}");
        let out = out.bytes();
        for &i in frame.iter() {
            let d = m.operations[i].dst;
            let range = d.offset as usize..(d.offset + d.length) as usize;
            if pending.contains(&i) {
                assert!(out[range.clone()] == new[range], "member {i} not applied");
                assert!(verify_operation_output(&m.operations[i], &out).unwrap());
            } else {
                assert!(out[range.clone()] == old[range], "member {i} was written");
            }
        }
    }
}

#[test]
fn a_frame_is_never_applied_as_one_operations_data_nor_without_the_codec() {
    let (old, _, mut m, payload) = build(true);
    let units = groups(&m);
    let frame = units
        .iter()
        .find(|u| is_frame_group(&m, u))
        .unwrap()
        .clone();
    let data = data_of(&m, &payload, frame[0]).to_vec();
    let out = Mem::new(old.clone());
    let e =
        apply_operation(frame[0], &m.operations[frame[0]], &data, Some(&old), &out).unwrap_err();
    assert!(e.to_string().contains("compression frame"), "{e}");
    // The manifest without the codec: its members are single operations.
    m.codecs.retain(|c| c != "frames");
    assert!(!is_frame_group(&m, &frame));
    for plan in PLANS {
        let out = Mem::new(old.clone());
        let e = apply_group(&m, &frame, &frame, &data, Some(&old), &out, plan, |_| {}).unwrap_err();
        assert!(matches!(e, ApplyError::Decode { .. }), "{e}");
        assert!(out.bytes() == old, "nothing is written");
    }
}

#[test]
fn an_altered_frame_writes_nothing_wrong() {
    let (old, _, m, payload) = build(true);
    let units = groups(&m);
    let frame = units
        .iter()
        .find(|u| is_frame_group(&m, u))
        .unwrap()
        .clone();
    let data = data_of(&m, &payload, frame[0]).to_vec();
    // Unaltered bytes under a wrong digest: refused before decoding.
    let mut wrong = m.clone();
    for &i in &frame {
        wrong.operations[i].data.as_mut().unwrap().sha256 = Digest::of(b"other");
    }
    let out = Mem::new(old.clone());
    for plan in PLANS {
        let e = apply_group(
            &wrong,
            &frame,
            &frame,
            &data,
            Some(&old),
            &out,
            plan,
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, ApplyError::DataHash { .. }), "{e}");
    }
    // Altered bytes whose digest the manifest was made to match: each
    // member's output is still verified before it is written.
    let mut x = 7u64;
    for trial in 0..120 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut bad = data.clone();
        let p = 4 + x as usize % (bad.len() - 4);
        bad[p] ^= 1 << ((x >> 32) % 8);
        let mut forged = m.clone();
        for &i in &frame {
            forged.operations[i].data.as_mut().unwrap().sha256 = Digest::of(&bad);
        }
        let out = Mem::new(old.clone());
        let mut done = Vec::new();
        let plan = PLANS[trial % PLANS.len()];
        let r = apply_group(&forged, &frame, &frame, &bad, Some(&old), &out, plan, |i| {
            done.push(i)
        });
        let out = out.bytes();
        for &i in &frame {
            let op = &forged.operations[i];
            if done.contains(&i) {
                assert!(
                    verify_operation_output(op, &out).unwrap(),
                    "member {i} reported done"
                );
            } else if op.kind == OpKind::Bsdiff {
                let d = op.dst;
                let range = d.offset as usize..(d.offset + d.length) as usize;
                assert!(out[range.clone()] == old[range], "member {i} written wrong");
            }
        }
        // Decoded first, an altered stream is refused before any member is
        // applied; streamed, members decoded before the damage may be
        // applied (each verified) and the frame still refused.
        assert!(r.is_ok() || done.len() < frame.len() || plan.streamed);
    }
}

/// Two members at a time (decoded first, or while the frame decodes): a
/// failing member stops new ones from starting,
/// the error named is the lowest failing member, whatever the order the
/// threads finished in, and nothing unverified is written.
#[test]
fn members_applied_two_at_a_time_report_the_lowest_failure_and_write_nothing_wrong() {
    let (old, new, m, payload) = build(true);
    let units = groups(&m);
    let frame = units
        .iter()
        .find(|u| is_frame_group(&m, u) && u.len() >= 4)
        .unwrap()
        .clone();
    let data = data_of(&m, &payload, frame[0]).to_vec();
    let (a, b) = (frame[1], frame[frame.len() - 1]);
    let mut forged = m.clone();
    for i in [a, b] {
        forged.operations[i].dst_sha256 = Digest::of(b"not this output");
    }
    for trial in 0..40 {
        let plan = [FramePlan::TWO, FramePlan::streamed(2)][trial % 2];
        let out = Mem::new(old.clone());
        let mut done = Vec::new();
        let e = apply_group(
            &forged,
            &frame,
            &frame,
            &data,
            Some(&old),
            &out,
            plan,
            |i| done.push(i),
        )
        .unwrap_err();
        assert!(
            matches!(e, ApplyError::OutputHash { op, .. } if op == a),
            "{e}"
        );
        let out = out.bytes();
        for &i in &frame {
            let d = m.operations[i].dst;
            let range = d.offset as usize..(d.offset + d.length) as usize;
            if done.contains(&i) {
                assert!(out[range.clone()] == new[range], "member {i} reported done");
            } else {
                assert!(
                    out[range.clone()] == old[range],
                    "member {i} written unreported"
                );
            }
        }
        assert!(!done.contains(&a) && !done.contains(&b));
    }
}
