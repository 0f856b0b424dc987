//! `frames`: the decoder of compression frames (codec `frames`,
//! `ota_delta::frames`), which holds the data of several `BSDIFF`
//! operations in one header and three compressed streams, and its encoder.
//!
//! Two kinds of input:
//! - `Raw`: arbitrary frame bytes (optionally after the `FRM 2` magic, so
//!   that the header parser runs; optionally followed by the stored lengths
//!   of three valid zstd frames of arbitrary bytes and those frames, so that
//!   the stream checks run), decoded for
//!   1..=8 arbitrary destinations (u32 offset, u16 length) under an
//!   arbitrary cap;
//! - `Built`: 1..=8 arbitrary members (control entries from `(mix, copy,
//!   seek)` triples, stored as the crate stores them: mix u64le, copy u64le,
//!   seek sign-magnitude u64le, transposed into 24 byte planes; diff bytes;
//!   extra bytes, or synthetic AArch64 code (`arm64::synthetic_code`) as
//!   one extra segment at the start of the output, so that the transform
//!   pays and the encoder uses it; destination offset), encoded by
//!   `frames::encode` at level 1 with or without zero-run coding and the
//!   arm64 transform, then
//!   optionally one header length (a member's or a stream's stored length)
//!   moved by a few bytes, one byte XORed or
//!   the frame truncated. Each member's destination holds at least its diff
//!   and extra bytes.
//!
//! Checked:
//! - no panic, no abort, no allocation past libFuzzer's limits;
//! - every input is decoded three times, one stream after another
//!   (`frames::decode`), the three at once (`frames::decode_with`) and
//!   streamed into members handed to two workers as their shares arrive
//!   (`frames::decode_streamed`, every member wanted): the first two both
//!   refuse, or both accept with the same bytes; where they accept, the
//!   streamed decode accepts and hands every member over, each with the
//!   same bytes as `Frame::member` or refused where it refuses; where they
//!   refuse, the streamed decode refuses or refuses at least one member
//!   (it undoes the arm64 transform per member, so a bad transform is that
//!   member's error rather than the frame's);
//! - `is_frame` is exactly "starts with `MAGIC`"; `decode` and
//!   `declared_size` refuse anything else;
//! - whenever `decode` accepts: the frame has one member per destination,
//!   `declared_size` is at most the cap (and at most `MAX_FRAME_DECODED`),
//!   `member(k)` returns (`Ok` or `Err`) for every member and `Err` past the
//!   last, and `bsdiff::patch` of each member against a fixed old buffer
//!   returns without producing more than the member's diff and extra bytes,
//!   nor more than its destination's length;
//! - `Built`, unmutated: `encode` succeeds (with arm64 it may refuse control
//!   entries that take more extra bytes than there are: then nothing else is
//!   checked), `declared_size` is the sum of `member_size`, `decode` under
//!   exactly that cap accepts and every member's `diff()` and `extra()` are
//!   its input's exactly, and under one byte less refuses;
//! - `Built`, truncated: if accepted, every member still decodes to its
//!   input's bytes exactly (a truncated stream can only lose bytes);
//! - `Built`, otherwise mutated: `Err`, or `Ok` with the checks above.
//!
//! `OTA_FUZZ_TRACE=1` prints each input's outcome (its path, whether the
//! arm64 transform was used, and accepted or the error with its numbers
//! blanked) to tally what a corpus reaches.

#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ota_delta::arm64;
use ota_delta::frames::{self, Frame, MAGIC};
use ota_format::limits::MAX_FRAME_DECODED;

/// Longest diff or extra stream of one built member.
const MAX_STREAM: usize = 2048;
/// Most control entries of one built member.
const MAX_ENTRIES: usize = 16;
/// Most members (and destinations).
const MAX_MEMBERS: usize = 8;

#[derive(Arbitrary, Debug)]
struct Member {
    /// Control entries: mix (diff) bytes, copy (extra) bytes, seek.
    entries: Vec<(u16, u16, i32)>,
    /// Clamp each entry's mix and copy to the diff and extra bytes left, so
    /// that the entries describe the streams (and the arm64 walk succeeds).
    fit: bool,
    diff: Vec<u8>,
    extra: Vec<u8>,
    /// Instead of `extra`: synthetic code of `128 + 2 × words` words (seed),
    /// taken by a first control entry (mix 0) at the output's start.
    code: Option<(u8, u64)>,
    dst_offset: u64,
    /// The destination's length beyond the diff and extra bytes.
    slack: u8,
}

#[derive(Arbitrary, Debug)]
enum Mutation {
    /// Adds `delta` to field `field % 4` (ctrl, diff, diff_stored, extra) of
    /// member `member % n` in the header.
    Len { member: u8, field: u8, delta: i8 },
    /// Keeps only the first `at % len` bytes.
    Truncate { at: u16 },
    /// XORs the byte at `at % len` with `x` (nonzero).
    Flip { at: u16, x: u8 },
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw {
        dsts: Vec<(u32, u16)>,
        magic: bool,
        bytes: Vec<u8>,
        /// Three zstd frames of these bytes after `bytes`.
        streams: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
        cap: u32,
    },
    Built {
        members: Vec<Member>,
        zero_runs: bool,
        arm64: bool,
        mutation: Option<Mutation>,
    },
}

/// The old buffer every member is patched against.
fn old() -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// With `OTA_FUZZ_TRACE` set, prints `what` and the outcome `r` on stderr.
fn trace<T>(what: &str, r: &std::io::Result<T>) {
    if std::env::var_os("OTA_FUZZ_TRACE").is_some() {
        let outcome = match r {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string().replace(|c: char| c.is_ascii_digit(), "#"),
        };
        eprintln!("frames: {what}: {outcome}");
    }
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).expect("zstd compresses")
}

/// Control entries as stored: 24-byte rows (mix u64le, copy u64le, seek
/// sign-magnitude u64le) transposed into byte planes.
fn planes(entries: &[(u64, u64, i64)]) -> Vec<u8> {
    let rows = entries.len();
    let mut out = vec![0u8; rows * 24];
    for (r, &(m, c, s)) in entries.iter().enumerate() {
        let seek = if s < 0 {
            s.unsigned_abs() | 1 << 63
        } else {
            s as u64
        };
        let bytes = [m.to_le_bytes(), c.to_le_bytes(), seek.to_le_bytes()].concat();
        for (k, b) in bytes.into_iter().enumerate() {
            out[k * rows + r] = b;
        }
    }
    out
}

/// Reads a LEB128 varint (at most 10 bytes, below 2^64).
fn varint(p: &mut &[u8]) -> Option<u64> {
    let mut v: u128 = 0;
    for k in 0..10 {
        let b = *p.get(k)?;
        v |= u128::from(b & 0x7f) << (7 * k);
        if b & 0x80 == 0 {
            *p = &p[k + 1..];
            return u64::try_from(v).ok();
        }
    }
    None
}

/// A frame's header as the module doc lays it out: flags, each member's
/// four lengths, the three streams' stored lengths, and the offset of the
/// streams.
fn parse_header(data: &[u8]) -> Option<(u8, Vec<[u64; 4]>, [u64; 3], usize)> {
    let mut p = data.strip_prefix(MAGIC)?;
    let flags = *p.first()?;
    p = &p[1..];
    let n = varint(&mut p)?;
    let mut lens = Vec::new();
    for _ in 0..n {
        let mut l = [0u64; 4];
        for x in &mut l {
            *x = varint(&mut p)?;
        }
        lens.push(l);
    }
    let mut stored = [0u64; 3];
    for x in &mut stored {
        *x = varint(&mut p)?;
    }
    Some((flags, lens, stored, data.len() - p.len()))
}

fn build_header(flags: u8, lens: &[[u64; 4]], stored: &[u64; 3]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(flags);
    out.extend(common::varint(lens.len() as u64));
    for l in lens {
        for &x in l {
            out.extend(common::varint(x));
        }
    }
    for &x in stored {
        out.extend(common::varint(x));
    }
    out
}

/// `frames::decode` (one stream after another) and `frames::decode_with`
/// the three streams at once must agree: both refuse, or both accept with
/// the same members' bytes; `frames::decode_streamed` agrees with them
/// ([`streamed_agrees`]). Returns the first.
fn decode(data: &[u8], dsts: &[(u64, u64)], cap: usize) -> std::io::Result<Frame> {
    let one = frames::decode(data, dsts, cap);
    let par = frames::decode_with(data, dsts, cap, true);
    match (&one, &par) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.len(), b.len());
            for k in 0..a.len() {
                match (a.member(k), b.member(k)) {
                    (Ok(x), Ok(y)) => {
                        assert!(x.diff() == y.diff() && x.extra() == y.extra(), "member {k}")
                    }
                    (x, y) => assert_eq!(x.is_ok(), y.is_ok(), "member {k}"),
                }
            }
        }
        (a, b) => assert_eq!(
            a.is_ok(),
            b.is_ok(),
            "decode {:?} vs decode_with parallel {:?}",
            a.as_ref().err(),
            b.as_ref().err()
        ),
    }
    streamed_agrees(data, dsts, cap, &par);
    one
}

/// A member's bytes as `decode_streamed` handed them over, or its error.
type Handed = std::io::Result<(Vec<u8>, Vec<u8>)>;

/// `frames::decode_streamed` with every member wanted and two workers
/// agrees with `frames::decode_with` (`par`), as the module doc says.
fn streamed_agrees(data: &[u8], dsts: &[(u64, u64)], cap: usize, par: &std::io::Result<Frame>) {
    let todo: Vec<usize> = (0..dsts.len()).collect();
    let handed: std::sync::Mutex<Vec<Option<Handed>>> =
        std::sync::Mutex::new((0..dsts.len()).map(|_| None).collect());
    let mut reported = 0;
    let r = frames::decode_streamed(
        data,
        dsts,
        cap,
        &todo,
        2,
        |k, m| {
            // Always `Ok`, so that a refused member does not stop the rest:
            // the check wants every member's outcome.
            let got = m.map(|m| (m.diff().to_vec(), m.extra().to_vec()));
            let mut h = handed.lock().unwrap();
            assert!(h[k].is_none(), "member {k} handed over twice");
            h[k] = Some(got);
            Ok::<(), ()>(())
        },
        |_, r| {
            assert!(r.is_ok());
            reported += 1;
        },
    );
    let handed = handed.into_inner().unwrap();
    match par {
        Ok(frame) => {
            assert!(
                r.is_ok(),
                "decode_with accepted, decode_streamed refused: {:?}",
                r.err()
            );
            assert_eq!(reported, dsts.len(), "members reported");
            for (k, h) in handed.into_iter().enumerate() {
                let h = h.unwrap_or_else(|| panic!("member {k} never handed over"));
                match (frame.member(k), h) {
                    (Ok(x), Ok((diff, extra))) => assert!(
                        x.diff() == &diff[..] && x.extra() == &extra[..],
                        "member {k}: streamed bytes differ"
                    ),
                    (x, y) => assert_eq!(x.is_ok(), y.is_ok(), "member {k} streamed"),
                }
            }
        }
        Err(e) => {
            let member_refused = handed.iter().any(|h| matches!(h, Some(Err(_))));
            assert!(
                r.is_err() || member_refused,
                "decode_with refused ({e}), decode_streamed accepted every member"
            );
        }
    }
}

/// The checks on any frame `decode` accepted: one member per destination,
/// each member's streams (or its error) without panic, and its patch
/// bounded by its diff and extra bytes and its destination.
fn check_frame(frame: &Frame, dsts: &[(u64, u64)], old: &[u8]) {
    assert_eq!(frame.len(), dsts.len(), "members vs destinations");
    assert!(!frame.is_empty());
    assert!(frame.member(frame.len()).is_err(), "a member past the last");
    for (k, &(_, dst_len)) in dsts.iter().enumerate() {
        let Ok(m) = frame.member(k) else { continue };
        let bound = m.diff().len() + m.extra().len();
        assert!(
            bound as u64 <= dst_len,
            "member {k}: {} diff + {} extra bytes for a {dst_len}-byte output",
            m.diff().len(),
            m.extra().len()
        );
        let mut out = Vec::new();
        let _ = bsdiff::patch(old, &mut m.patch(), &mut out);
        assert!(
            out.len() <= bound,
            "member {k}: patch wrote {} bytes from {bound} diff and extra bytes",
            out.len()
        );
    }
}

fn raw(
    dsts: &[(u32, u16)],
    magic: bool,
    bytes: &[u8],
    streams: Option<&(Vec<u8>, Vec<u8>, Vec<u8>)>,
    cap: u32,
) {
    let mut dsts: Vec<(u64, u64)> = dsts
        .iter()
        .take(MAX_MEMBERS)
        .map(|&(o, l)| (u64::from(o), u64::from(l)))
        .collect();
    if dsts.is_empty() {
        dsts.push((0, 4096));
    }
    let mut data = Vec::new();
    if magic {
        data.extend_from_slice(MAGIC);
    }
    data.extend_from_slice(bytes);
    if let Some((c, d, e)) = streams {
        let z: Vec<Vec<u8>> = [c, d, e].into_iter().map(|s| zstd(s)).collect();
        for s in &z {
            data.extend(common::varint(s.len() as u64));
        }
        for s in z {
            data.extend(s);
        }
    }
    let cap = cap as usize;
    let is = data.starts_with(MAGIC);
    assert_eq!(frames::is_frame(&data), is);
    let declared = frames::declared_size(&data);
    if !is {
        assert!(declared.is_err(), "declared_size of a non-frame");
    }
    let r = decode(&data, &dsts, cap);
    trace("raw", &r);
    match r {
        Ok(frame) => {
            assert!(is, "decoded a non-frame");
            let size = declared.expect("declared_size of a decoded frame");
            assert!(
                size <= cap as u64 && size <= MAX_FRAME_DECODED,
                "decoded {size} bytes under a cap of {cap}"
            );
            check_frame(&frame, &dsts, &old());
        }
        Err(_) => {}
    }
}

fn built(members: &[Member], zero_runs: bool, arm64: bool, mutation: Option<&Mutation>) {
    let members = &members[..members.len().min(MAX_MEMBERS)];
    if members.is_empty() {
        return;
    }
    let mut streams = Vec::with_capacity(members.len());
    let mut dsts = Vec::with_capacity(members.len());
    for m in members {
        let diff = &m.diff[..m.diff.len().min(MAX_STREAM)];
        let mut dst_offset = m.dst_offset;
        let mut entries = Vec::new();
        let extra = match m.code {
            Some((words, seed)) => {
                dst_offset %= 1 << 40;
                let code = arm64::synthetic_code(128 + 2 * usize::from(words), dst_offset, seed);
                entries.push((0, code.len() as u64, 0));
                code
            }
            None => m.extra[..m.extra.len().min(MAX_STREAM)].to_vec(),
        };
        let fit = m.fit || m.code.is_some();
        // Diff and extra bytes no entry takes yet (the code's entry takes
        // all the extra bytes).
        let mut d_left = diff.len() as u64;
        let mut e_left = if m.code.is_some() {
            0
        } else {
            extra.len() as u64
        };
        entries.extend(
            m.entries
                .iter()
                .take(MAX_ENTRIES)
                .map(|&(mix, copy, seek)| {
                    let (mut mix, mut copy) = (u64::from(mix), u64::from(copy));
                    if fit {
                        mix %= d_left + 1;
                        copy %= e_left + 1;
                        d_left -= mix;
                        e_left -= copy;
                    }
                    (mix, copy, i64::from(seek))
                }),
        );
        dsts.push((
            dst_offset,
            (diff.len() + extra.len() + usize::from(m.slack)) as u64,
        ));
        streams.push([planes(&entries), diff.to_vec(), extra]);
    }
    let inputs: Vec<frames::Input<'_>> = streams
        .iter()
        .zip(&dsts)
        .map(|(s, &(dst_offset, _))| frames::Input {
            dst_offset,
            streams: s,
        })
        .collect();
    let (data, used) = match frames::encode(&inputs, 1, zero_runs, arm64) {
        Ok(x) => x,
        Err(e) => {
            trace("built: encode", &Err::<(), _>(e.kind().into()));
            assert!(arm64, "encode refused without arm64: {e}");
            return;
        }
    };
    assert!(frames::is_frame(&data));
    let declared = frames::declared_size(&data).expect("declared_size of an encoded frame");
    let sum: u64 = streams
        .iter()
        .map(|s| frames::member_size(s, zero_runs) as u64)
        .sum();
    assert_eq!(declared, sum, "declared_size vs member_size");
    let old = old();
    let exact = |frame: &Frame, what: &str| {
        for (k, s) in streams.iter().enumerate() {
            let m = frame
                .member(k)
                .unwrap_or_else(|e| panic!("{what}: member {k} refused: {e}"));
            assert!(m.diff() == &s[1][..], "{what}: member {k}: diff differs");
            assert!(m.extra() == &s[2][..], "{what}: member {k}: extra differs");
        }
    };

    let what = |m: &str| format!("built zero_runs={zero_runs} arm64={} {m}", used.arm64);
    let Some(mutation) = mutation else {
        let r = decode(&data, &dsts, declared as usize);
        trace(&what("unmutated"), &r);
        let frame = r.unwrap_or_else(|e| panic!("refused an encoded frame: {e}"));
        check_frame(&frame, &dsts, &old);
        exact(&frame, "encoded");
        if declared > 0 {
            assert!(
                decode(&data, &dsts, declared as usize - 1).is_err(),
                "accepted under a cap one byte short"
            );
        }
        return;
    };

    let cap = MAX_FRAME_DECODED as usize;
    match *mutation {
        Mutation::Truncate { at } => {
            let bad = &data[..usize::from(at) % data.len()];
            let r = decode(bad, &dsts, cap);
            trace(&what("truncated"), &r);
            if let Ok(frame) = r {
                check_frame(&frame, &dsts, &old);
                exact(&frame, "truncated");
            }
        }
        Mutation::Flip { at, x } => {
            let mut bad = data.clone();
            let i = usize::from(at) % bad.len();
            bad[i] ^= x.max(1);
            let r = decode(&bad, &dsts, cap);
            trace(&what("flipped"), &r);
            if let Ok(frame) = r {
                check_frame(&frame, &dsts, &old);
            }
        }
        Mutation::Len {
            member,
            field,
            delta,
        } => {
            let (flags, mut lens, mut stored, at) =
                parse_header(&data).expect("an encoded frame's header");
            assert_eq!(lens.len(), members.len());
            let k = usize::from(member) % lens.len();
            // Fields 0..4: a member's lengths; 4: a stream's stored length.
            let f = usize::from(field) % 5;
            if f < 4 {
                lens[k][f] = lens[k][f].saturating_add_signed(i64::from(delta));
            } else {
                stored[k % 3] = stored[k % 3].saturating_add_signed(i64::from(delta));
            }
            let mut bad = build_header(flags, &lens, &stored);
            bad.extend_from_slice(&data[at..]);
            let r = decode(&bad, &dsts, cap);
            trace(&what(&format!("length {f} moved")), &r);
            if let Ok(frame) = r {
                check_frame(&frame, &dsts, &old);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw {
            dsts,
            magic,
            bytes,
            streams,
            cap,
        } => raw(&dsts, magic, &bytes, streams.as_ref(), cap),
        Input::Built {
            members,
            zero_runs,
            arm64,
            mutation,
        } => built(&members, zero_runs, arm64, mutation.as_ref()),
    }
});
