//! `apply_op`: one operation of any kind through `ota_delta::apply_operation`.
//!
//! The input is a structured [`Input`] (via `arbitrary`): the kind, a
//! destination extent inside a 64 KiB destination buffer, source extents
//! inside a small (≤ 16 KiB) source, and the operation's data, which is one of
//! - raw arbitrary bytes (exercises the zstd frame parser),
//! - a valid zstd frame of arbitrary bytes (for `BSDIFF`: an arbitrary bspatch
//!   stream behind a valid compression layer),
//! - three valid zstd frames of arbitrary bytes (for `BSDIFF` in the
//!   three-stream layout: arbitrary control, diff and extra streams; for
//!   `REPLACE`: a multi-frame zstd stream),
//! - a real bsdiff patch from the source window to arbitrary new bytes, in the
//!   layout the engine reads (for `REPLACE`: just the new bytes, compressed),
//!   so the success path, including `BSDIFF`'s final write, is reached too;
//! - three xz streams of arbitrary bytes with an arbitrary dictionary size
//!   (4 KiB to 8 MiB: the engine must refuse one larger than the output), or
//!   a real bsdiff patch with each stream xz-coded as the generator does
//!   (which the engine must accept);
//! - a zero-run-coded diff stream of arbitrary runs with an arbitrary unit
//!   and declared length (the run parser), or a real bsdiff patch whose
//!   diff stream is zero-run coded as the generator codes it (which the
//!   engine must accept);
//! - arm64-transformed data (`ota_delta::arm64`): for `REPLACE` arbitrary
//!   transformed bytes at an arbitrary base in xz or zstd (whose output is
//!   known, so it must be accepted), or a real chunk transformed as the
//!   generator does; for `BSDIFF` arbitrary control, diff and transformed
//!   extra streams (the segment walk over arbitrary control entries), or a
//!   real bsdiff patch whose extra stream is transformed segment by segment
//!   (which the engine must accept).
//!
//! About half the inputs carry digests computed from the data, the source
//! window and (when known) the expected output, so the hash checks pass and
//! the decoders run; the others carry arbitrary digests (optionally keeping
//! some matching ones).
//!
//! By default the target does what the agent does: each operation is put in a
//! manifest (ZERO padding before/after it) and only those that pass
//! `Manifest::validate` are applied. Set `OTA_FUZZ_UNVALIDATED=1` to apply
//! every operation: since d505433 the engine re-checks an operation's shape
//! itself (`Operation::check_shape`), so it must hold up in that mode too.
//!
//! Checked on every applied operation:
//! - no panic, no abort, memory within libFuzzer's `-rss_limit_mb` /
//!   `-malloc_limit_mb`, no hang past `-timeout`;
//! - no write outside `op.dst` (asserted at the write, and every byte of the
//!   destination buffer outside `op.dst` compared after the call);
//! - `Ok(())` only if the destination extent now hashes to `op.dst_sha256`
//!   (and equals the expected output when the target knows it);
//! - an operation that is fully consistent (matching digests, data that
//!   decodes to exactly the destination) is accepted.

#![no_main]

mod common;

use std::io;
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ota_delta::io::WriteAt;
use ota_format::manifest::FORMAT_VERSION;
use ota_format::{DataRange, Digest, Extent, ImageRef, Manifest, OpKind, Operation, PayloadInfo};

/// Size of the destination buffer ("slot").
const DEST_LEN: u64 = 64 << 10;
/// Largest source image.
const MAX_SOURCE: usize = 16 << 10;
/// Most source extents per operation.
const MAX_EXTENTS: usize = 8;
/// Slack added to the manifest's source size when `past_end` is set, so
/// extents may name bytes the real source does not have (a read error).
const PAST_END: u64 = 64;

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Copy,
    Zero,
    Replace,
    Bsdiff,
}

#[derive(Arbitrary, Debug)]
enum DataSpec {
    /// Data used verbatim.
    Raw(Vec<u8>),
    /// Data = zstd(content).
    Zstd { level: u8, content: Vec<u8> },
    /// Data = three zstd frames back to back (for `BSDIFF` in the
    /// three-stream layout: arbitrary control, diff and extra streams).
    Zstd3 {
        level: u8,
        ctrl: Vec<u8>,
        diff: Vec<u8>,
        extra: Vec<u8>,
    },
    /// BSDIFF: a real patch from the window to `new`, encoded in the layout
    /// the engine accepts (see [`bsdiff_layout`]); REPLACE: data = zstd(new).
    Diff { level: u8, new: Vec<u8> },
    /// Three xz streams with a dictionary of `4 KiB << (dict_log % 12)`.
    Xz3 {
        dict_log: u8,
        ctrl: Vec<u8>,
        diff: Vec<u8>,
        extra: Vec<u8>,
    },
    /// BSDIFF: a real patch from the window to `new`, each stream xz-coded
    /// with the generator's dictionary (`patch_streams::xz_dict_size`).
    XzDiff { new: Vec<u8> },
    /// BSDIFF data whose diff stream is zero-run coded with an arbitrary
    /// unit and a declared length of the coding's length + `len`, its runs
    /// arbitrary bytes in a zstd frame (the run parser), between zstd
    /// control and extra streams.
    ZeroRuns {
        unit: u8,
        len: u16,
        ctrl: Vec<u8>,
        coded: Vec<u8>,
        extra: Vec<u8>,
    },
    /// BSDIFF: a real patch from the window to `new`, its diff stream
    /// zero-run coded as the generator codes it (4-byte units, runs in xz),
    /// control and extra streams zstd; REPLACE: data = zstd(new).
    ZeroRunsDiff { new: Vec<u8> },
    /// arm64-transformed data ([`ota_delta::arm64::MAGIC`], a base, a
    /// stream): REPLACE: `content` (the transformed bytes) in an xz stream
    /// or a zstd frame, whose output (`content` decoded at `base`) is
    /// known; BSDIFF: arbitrary control, diff and transformed extra
    /// streams (the segment walk over arbitrary control entries).
    Arm64 {
        base: u64,
        xz: bool,
        ctrl: Vec<u8>,
        diff: Vec<u8>,
        content: Vec<u8>,
    },
    /// BSDIFF: a real patch from the window to `new`, its extra stream
    /// arm64-transformed at `base` segment by segment as the generator
    /// does; REPLACE: `new` transformed at `base`, in xz.
    Arm64Diff { base: u64, new: Vec<u8> },
}

/// [`ota_delta::arm64::MAGIC`], `base`, then `inner`.
fn arm64_frame(base: u64, inner: &[u8]) -> Vec<u8> {
    let mut out = ota_delta::arm64::MAGIC.to_vec();
    out.extend(common::varint(base));
    out.extend_from_slice(inner);
    out
}

fn xz(data: &[u8], dict: usize) -> Vec<u8> {
    common::xz(data, 1, dict)
}

/// How `BSDIFF` data is laid out. It has changed quickly: one zstd frame
/// holding the whole bsdiff patch (d7d6ddf), then three frames — control,
/// diff, extra — (01d858d, `ota_delta::patch_streams`), then the same with the
/// control stream stored transposed, byte plane by byte plane (7511f56). The
/// target finds out at start-up which one the engine it was built against
/// accepts, so "a consistent operation is accepted" stays checkable; add a
/// variant here when the layout changes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    SingleFrame,
    ThreeStreams,
    ThreeStreamsTransposedControl,
}

/// Rows of `width` bytes to byte planes (the transposed control stream).
fn transpose(data: &[u8], width: usize) -> Vec<u8> {
    let rows = data.len() / width;
    let mut out = vec![0u8; data.len()];
    for (r, row) in data.chunks_exact(width).enumerate() {
        for (b, &byte) in row.iter().enumerate() {
            out[b * rows + r] = byte;
        }
    }
    out
}

/// Splits a bsdiff patch into control, diff and extra streams.
fn split_patch(patch: &[u8]) -> [Vec<u8>; 3] {
    let (mut ctrl, mut diff, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    let mut rest = patch;
    while rest.len() >= 24 {
        let mix = u64::from_le_bytes(rest[0..8].try_into().unwrap()) as usize;
        let copy = u64::from_le_bytes(rest[8..16].try_into().unwrap()) as usize;
        ctrl.extend_from_slice(&rest[..24]);
        rest = &rest[24..];
        diff.extend_from_slice(&rest[..mix]);
        rest = &rest[mix..];
        extra.extend_from_slice(&rest[..copy]);
        rest = &rest[copy..];
    }
    assert!(rest.is_empty(), "bsdiff::diff wrote a malformed patch");
    [ctrl, diff, extra]
}

fn zstd(data: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(data, level).expect("zstd compress")
}

fn encode_patch(layout: Layout, old: &[u8], new: &[u8], level: i32) -> Vec<u8> {
    let mut patch = Vec::new();
    bsdiff::diff(old, new, &mut patch).expect("bsdiff into a Vec");
    match layout {
        Layout::SingleFrame => zstd(&patch, level),
        Layout::ThreeStreams => split_patch(&patch)
            .iter()
            .flat_map(|s| zstd(s, level))
            .collect(),
        Layout::ThreeStreamsTransposedControl => {
            let [ctrl, diff, extra] = split_patch(&patch);
            [transpose(&ctrl, 24), diff, extra]
                .iter()
                .flat_map(|s| zstd(s, level))
                .collect()
        }
    }
}

fn bsdiff_layout() -> Layout {
    static L: OnceLock<Layout> = OnceLock::new();
    *L.get_or_init(|| {
        // Moved blocks and insertions, so the patch has several control
        // entries (with one, the transposed control stream is the plain one).
        let old: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 253) as u8).collect();
        let new = [
            &old[..500],
            b"an insertion",
            &old[500..1500],
            &old[2000..2600],
            b"another insertion",
            &old[1500..2000],
        ]
        .concat();
        let mut patch = Vec::new();
        bsdiff::diff(&old, &new, &mut patch).expect("bsdiff into a Vec");
        assert!(split_patch(&patch)[0].len() >= 48, "probe patch has one control entry");
        let accepted: Vec<Layout> = [
            Layout::SingleFrame,
            Layout::ThreeStreams,
            Layout::ThreeStreamsTransposedControl,
        ]
            .into_iter()
            .filter(|&layout| {
                let data = encode_patch(layout, &old, &new, 3);
                let op = Operation {
                    kind: OpKind::Bsdiff,
                    dst: Extent::new(0, new.len() as u64),
                    src: vec![Extent::new(0, old.len() as u64)],
                    src_sha256: Some(Digest::of(&old)),
                    data: Some(DataRange { offset: 0, length: data.len() as u64, sha256: Digest::of(&data) }),
                    dst_sha256: Digest::of(&new),
                };
                let dest = Dest { buf: Mutex::new(vec![0; new.len()]), allowed: op.dst };
                ota_delta::apply_operation(0, &op, &data, Some(old.as_slice()), &dest).is_ok()
            })
            .collect();
        match accepted[..] {
            [layout] => layout,
            _ => panic!("the engine accepts {accepted:?} of the known BSDIFF data layouts: update the fuzz target"),
        }
    })
}

#[derive(Arbitrary, Debug)]
struct RandomDigests {
    data: [u8; 32],
    src: [u8; 32],
    dst: [u8; 32],
    /// Keep the matching digest for these, so each check is passed alone too.
    keep_data: bool,
    keep_src: bool,
    keep_dst: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: Kind,
    dst_offset: u16,
    /// Destination length; by default the expected output's length (COPY:
    /// the source extents' total). An override may make the op inconsistent.
    dst_len: Option<u16>,
    src: Vec<(u16, u16)>,
    past_end: bool,
    /// `None`: digests computed to match. `Some`: arbitrary digests.
    digests: Option<RandomDigests>,
    /// Make the manifest's data length one more than the bytes given.
    data_len_skew: bool,
    data: DataSpec,
    source: Vec<u8>,
}

/// The destination slot: a buffer that refuses (loudly) any write outside the
/// extent the operation owns.
struct Dest {
    buf: Mutex<Vec<u8>>,
    allowed: Extent,
}

impl WriteAt for Dest {
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64);
        assert!(
            offset >= self.allowed.offset && end.is_some_and(|e| e <= self.allowed.end()),
            "write of {} bytes at offset {offset} is outside dst [{}, {})",
            data.len(),
            self.allowed.offset,
            self.allowed.end()
        );
        let mut buf = self.buf.lock().unwrap();
        let slice = usize::try_from(offset)
            .ok()
            .and_then(|s| buf.get_mut(s..s + data.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        slice.copy_from_slice(data);
        Ok(())
    }
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ 0xA5)
        .collect()
}

fn level(l: u8) -> i32 {
    i32::from(l % 5) - 1 // -1..=3: fast levels, including a negative one
}

fn env_flag(name: &str, cell: &'static OnceLock<bool>) -> bool {
    *cell.get_or_init(|| std::env::var_os(name).is_some_and(|v| v == "1"))
}

fn unvalidated() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    env_flag("OTA_FUZZ_UNVALIDATED", &V)
}

/// `OTA_FUZZ_TRACE=1`: one line per input on stderr (kind, validity,
/// outcome), to see which paths a corpus reaches:
/// `OTA_FUZZ_TRACE=1 target/.../apply_op -runs=0 corpus/apply_op 2>&1 | grep '^apply_op'`.
fn trace() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    env_flag("OTA_FUZZ_TRACE", &V)
}

/// A manifest holding `op`, padded with ZERO operations so it tiles a
/// `DEST_LEN` target: validating it checks `op` against the format's rules.
fn wrap(op: &Operation, from_size: u64) -> Manifest {
    let zero = |offset, length| Operation {
        kind: OpKind::Zero,
        dst: Extent::new(offset, length),
        src: vec![],
        src_sha256: None,
        data: None,
        dst_sha256: Digest::default(),
    };
    let mut operations = Vec::new();
    if op.dst.offset > 0 {
        operations.push(zero(0, op.dst.offset));
    }
    operations.push(op.clone());
    if let Some(end) = op.dst.checked_end().filter(|&e| e < DEST_LEN) {
        operations.push(zero(end, DEST_LEN - end));
    }
    Manifest {
        format_version: FORMAT_VERSION,
        device_type: "fuzz".into(),
        from: Some(ImageRef {
            version: "1".into(),
            size: from_size,
            sha256: Digest::default(),
        }),
        to: ImageRef {
            version: "2".into(),
            size: DEST_LEN,
            sha256: Digest::default(),
        },
        security_counter: 0,
        expires_at: "2099-01-01T00:00:00Z".into(),
        payload: PayloadInfo {
            size: op.data.map_or(0, |d| d.length),
            sha256: Digest::default(),
        },
        codecs: vec![],
        operations,
    }
}

fuzz_target!(|input: Input| {
    bsdiff_layout();
    let mut source = input.source;
    source.truncate(MAX_SOURCE);
    let from_size = source.len() as u64 + if input.past_end { PAST_END } else { 0 };

    let dst_offset = u64::from(input.dst_offset) % DEST_LEN;
    let room = DEST_LEN - dst_offset;

    // Source extents, inside the manifest's source size, never empty.
    let mut src = Vec::new();
    if matches!(input.kind, Kind::Copy | Kind::Bsdiff) && from_size > 0 {
        let mut total = 0u64;
        for &(off, len) in input.src.iter().take(MAX_EXTENTS) {
            let off = u64::from(off) % from_size;
            let mut len = 1 + u64::from(len) % (from_size - off);
            if input.kind == Kind::Copy {
                // COPY writes what it reads: keep it within the buffer.
                if total >= room {
                    break;
                }
                len = len.min(room - total);
            }
            total += len;
            src.push(Extent::new(off, len));
        }
    }
    // The source window, when the real source holds all of it.
    let window: Option<Vec<u8>> = src
        .iter()
        .map(|e| source.get(e.offset as usize..e.end() as usize))
        .collect::<Option<Vec<_>>>()
        .map(|pieces| pieces.concat());

    // Data, the output it should produce when that is known, and whether it
    // is the canonical encoding of that output (one zstd frame for REPLACE,
    // the engine's layout for BSDIFF): only then must the engine accept it.
    let (data, expected, canonical): (Vec<u8>, Option<Vec<u8>>, bool) =
        match (input.kind, input.data) {
            (Kind::Copy | Kind::Zero, _) => (Vec::new(), None, true),
            (_, DataSpec::Raw(raw)) => (raw, None, false),
            (Kind::Replace, DataSpec::Zstd { level: l, content })
            | (
                Kind::Replace,
                DataSpec::Diff {
                    level: l,
                    new: content,
                },
            ) => (zstd(&content, level(l)), Some(content), true),
            (
                Kind::Replace,
                DataSpec::Zstd3 {
                    level: l,
                    ctrl,
                    diff,
                    extra,
                },
            ) => {
                // Concatenated frames decompress to the concatenation.
                let data = [&ctrl, &diff, &extra]
                    .iter()
                    .flat_map(|s| zstd(s, level(l)))
                    .collect();
                (data, Some([ctrl, diff, extra].concat()), false)
            }
            (Kind::Bsdiff, DataSpec::Zstd { level: l, content }) => {
                (zstd(&content, level(l)), None, false)
            }
            (
                Kind::Bsdiff,
                DataSpec::Zstd3 {
                    level: l,
                    ctrl,
                    diff,
                    extra,
                },
            ) => {
                let data = [&ctrl, &diff, &extra]
                    .iter()
                    .flat_map(|s| zstd(s, level(l)))
                    .collect();
                (data, None, false)
            }
            (
                _,
                DataSpec::Xz3 {
                    dict_log,
                    ctrl,
                    diff,
                    extra,
                },
            ) => {
                let dict = 4096usize << (dict_log % 12);
                let data = [&ctrl, &diff, &extra]
                    .iter()
                    .flat_map(|s| xz(s, dict))
                    .collect();
                (data, None, false)
            }
            (Kind::Replace, DataSpec::XzDiff { new }) => (xz(&new, 4096), None, false),
            (Kind::Bsdiff, DataSpec::XzDiff { new }) => {
                let old = window.clone().unwrap_or_default();
                let mut patch = Vec::new();
                bsdiff::diff(&old, &new, &mut patch).expect("bsdiff into a Vec");
                let streams = ota_delta::patch_streams::split(&patch).expect("a bsdiff patch");
                let data = streams
                    .iter()
                    .flat_map(|s| {
                        xz(
                            s,
                            ota_delta::patch_streams::xz_dict_size(s.len(), new.len()),
                        )
                    })
                    .collect();
                let canonical = bsdiff_layout() == Layout::ThreeStreamsTransposedControl;
                (data, window.is_some().then_some(new), canonical)
            }
            (
                _,
                DataSpec::ZeroRuns {
                    unit,
                    len,
                    ctrl,
                    coded,
                    extra,
                },
            ) => {
                // Declared as at least the coding's length, so that the
                // runs are parsed rather than refused as too long (the
                // first 10-minute run found mostly those).
                let mut data = zstd(&ctrl, 1);
                data.extend(ota_delta::patch_streams::zero_runs_frame(
                    unit,
                    coded.len() as u64 + u64::from(len),
                    &zstd(&coded, 1),
                ));
                data.extend(zstd(&extra, 1));
                (data, None, false)
            }
            (Kind::Replace, DataSpec::ZeroRunsDiff { new }) => (zstd(&new, 1), Some(new), true),
            (Kind::Bsdiff, DataSpec::ZeroRunsDiff { new }) => {
                use ota_delta::patch_streams::{
                    split, xz_dict_size, zero_runs_encode, zero_runs_frame,
                };
                let old = window.clone().unwrap_or_default();
                let mut patch = Vec::new();
                bsdiff::diff(&old, &new, &mut patch).expect("bsdiff into a Vec");
                let [ctrl, diff, extra] = split(&patch).expect("a bsdiff patch");
                let coding = zero_runs_encode(&diff, 4);
                let mut data = zstd(&ctrl, 1);
                data.extend(zero_runs_frame(
                    4,
                    diff.len() as u64,
                    &xz(&coding, xz_dict_size(coding.len(), new.len())),
                ));
                data.extend(zstd(&extra, 1));
                // The format refuses a coding longer than the stream it
                // expands to (the generator never makes one).
                let canonical = coding.len() <= diff.len()
                    && bsdiff_layout() == Layout::ThreeStreamsTransposedControl;
                (data, window.is_some().then_some(new), canonical)
            }
            (
                Kind::Replace,
                DataSpec::Arm64 {
                    base,
                    xz: x,
                    content,
                    ..
                },
            ) => {
                let inner = if x {
                    xz(&content, 4096)
                } else {
                    zstd(&content, 1)
                };
                let mut out = content;
                ota_delta::arm64::decode(&mut out, base);
                (arm64_frame(base, &inner), Some(out), true)
            }
            (
                _,
                DataSpec::Arm64 {
                    base,
                    xz: x,
                    ctrl,
                    diff,
                    content,
                },
            ) => {
                let mut data = zstd(&ctrl, 1);
                data.extend(zstd(&diff, 1));
                let inner = if x {
                    xz(&content, 4096)
                } else {
                    zstd(&content, 1)
                };
                data.extend(arm64_frame(base, &inner));
                (data, None, false)
            }
            (Kind::Replace, DataSpec::Arm64Diff { base, new }) => {
                let mut t = new.clone();
                ota_delta::arm64::encode(&mut t, base);
                (arm64_frame(base, &xz(&t, 4096)), Some(new), true)
            }
            (Kind::Bsdiff, DataSpec::Arm64Diff { base, new }) => {
                let old = window.clone().unwrap_or_default();
                let mut patch = Vec::new();
                bsdiff::diff(&old, &new, &mut patch).expect("bsdiff into a Vec");
                let [ctrl, diff, mut extra] =
                    ota_delta::patch_streams::split(&patch).expect("a bsdiff patch");
                let n = extra.len();
                ota_delta::arm64::extra_segments(&ctrl, n, |e, len, o| {
                    ota_delta::arm64::encode(&mut extra[e..e + len], base.wrapping_add(o))
                })
                .expect("the patch's own control entries");
                let mut data = zstd(&ctrl, 1);
                data.extend(zstd(&diff, 1));
                data.extend(arm64_frame(base, &zstd(&extra, 1)));
                let canonical = bsdiff_layout() == Layout::ThreeStreamsTransposedControl;
                (data, window.is_some().then_some(new), canonical)
            }
            (Kind::Bsdiff, DataSpec::Diff { level: l, new }) => {
                let old = window.clone().unwrap_or_default();
                let data = encode_patch(bsdiff_layout(), &old, &new, level(l));
                (data, window.is_some().then_some(new), true)
            }
        };
    let expected = match input.kind {
        Kind::Copy => window.clone(),
        Kind::Zero => None, // set below, once the length is known
        _ => expected,
    };

    let natural_len = match input.kind {
        Kind::Copy => src.iter().map(|e| e.length).sum(),
        Kind::Zero => room.min(4096),
        _ => expected
            .as_ref()
            .map_or(data.len() as u64, |e| e.len() as u64),
    };
    let dst_len = input.dst_len.map_or(natural_len, u64::from).min(room);
    let dst = Extent::new(dst_offset, dst_len);
    let expected = match input.kind {
        Kind::Zero => Some(vec![0u8; dst_len as usize]),
        _ => expected,
    };

    let kind = match input.kind {
        Kind::Copy => OpKind::Copy,
        Kind::Zero => OpKind::Zero,
        Kind::Replace => OpKind::Replace,
        Kind::Bsdiff => OpKind::Bsdiff,
    };
    let m_data = Digest::of(&data);
    let m_src = Digest::of(window.as_deref().unwrap_or_default());
    let m_dst = expected.as_deref().map(Digest::of);
    let (d_data, d_src, d_dst) = match &input.digests {
        None => (m_data, m_src, m_dst.unwrap_or_default()),
        Some(r) => (
            if r.keep_data { m_data } else { Digest(r.data) },
            if r.keep_src { m_src } else { Digest(r.src) },
            match m_dst {
                Some(d) if r.keep_dst => d,
                _ => Digest(r.dst),
            },
        ),
    };
    let op = Operation {
        kind,
        dst,
        src,
        src_sha256: (kind == OpKind::Bsdiff).then_some(d_src),
        data: kind.has_data().then(|| DataRange {
            offset: 0,
            length: data.len() as u64 + u64::from(input.data_len_skew),
            sha256: d_data,
        }),
        dst_sha256: d_dst,
    };

    let valid = wrap(&op, from_size).validate();
    if trace() {
        if let Err(e) = &valid {
            eprintln!("apply_op {:?} invalid: {e}", kind);
        }
    }
    let valid = valid.is_ok();
    if !valid && !unvalidated() {
        return;
    }

    let before = pattern(DEST_LEN);
    let dest = Dest {
        buf: Mutex::new(before.clone()),
        allowed: dst,
    };
    let result = ota_delta::apply_operation(0, &op, &data, Some(source.as_slice()), &dest);
    let after = dest.buf.into_inner().unwrap();
    if trace() {
        let outcome = match &result {
            Ok(()) => "Ok".to_string(),
            Err(e) => e.to_string().chars().take(160).collect(),
        };
        let digests = if input.digests.is_none() {
            "matching"
        } else {
            "random"
        };
        eprintln!(
            "apply_op {:?} valid={valid} digests={digests} dst={}+{} data={}: {outcome}",
            kind,
            dst.offset,
            dst.length,
            data.len()
        );
    }

    // Nothing outside dst changed.
    let (lo, hi) = (dst.offset as usize, (dst.end() as usize).min(after.len()));
    assert!(after[..lo] == before[..lo], "bytes before dst changed");
    assert!(after[hi..] == before[hi..], "bytes after dst changed");

    match &result {
        Ok(()) => {
            assert_eq!(
                Digest::of(&after[lo..hi]),
                op.dst_sha256,
                "Ok(()) but dst does not hold the promised output"
            );
            if let Some(e) = &expected {
                assert!(
                    &after[lo..hi] == e.as_slice(),
                    "Ok(()) but dst is not the expected output"
                );
            }
        }
        Err(e) => {
            // A fully consistent, valid operation must be accepted.
            let consistent = valid
                && input.digests.is_none()
                && !input.data_len_skew
                && canonical
                && window.is_some()
                && expected.as_ref().is_some_and(|x| x.len() as u64 == dst_len);
            assert!(!consistent, "consistent operation refused: {e}");
        }
    }
});
