//! Compression frames (codec `frames`): the data of several `BSDIFF`
//! operations stored together, each of the three bsdiff streams in one
//! compressed stream across the frame.
//!
//! # Why
//!
//! Each operation's streams compressed alone start with an empty model:
//! on a filesystem image whose changed files resemble each other (a
//! kernel's modules, each rebuilt for a new ABI) that costs 5–6 % of the
//! `BSDIFF` data against one model carried from operation to operation
//! (`examples/shared_context.rs --frames`: 16 operations a frame saved
//! 5.7 % on `upgrade-large`). A frame keeps the context within a bounded
//! group, so operations stay verifiable alone and an agent's memory stays
//! bounded: the frame's decoded streams are at most
//! [`MAX_FRAME_DECODED`] bytes.
//!
//! # Layout
//!
//! Every operation of a frame names the frame's whole data range (the
//! manifest's rule that an operation may name exactly an earlier
//! operation's data), and the frame's **members** are those operations in
//! manifest order:
//!
//! ```text
//! "FRM" 2 | flags | varint n | n × (varint ctrl, varint diff, varint diff_stored, varint extra)
//!         | 3 × varint stored length | control stream | diff stream | extra stream
//! ```
//!
//! - `ctrl`: bytes of the member's control entries (24 each, stored
//!   transposed as in a single operation's data); `diff` and `extra`: its
//!   diff and extra bytes; `diff_stored`: the diff bytes as stored in the
//!   frame's diff stream (equal to `diff` unless flag 2, then at most 16
//!   bytes more).
//! - Each stream (zstd, bzip2 or xz, as [`crate::patch_streams`] decodes
//!   them) decodes to exactly the members' bytes of its kind, concatenated
//!   in member order, and is exactly its stored length long (the three
//!   lengths add up to the rest of the frame). The lengths let a decoder
//!   find each stream without decoding the ones before it, so the three
//!   can be decoded at once ([`decode_with`]): decoding was most of a
//!   frame's apply time, one stream after another on one core (layout 1,
//!   which had no lengths). And since each stream holds the members'
//!   bytes in member order, a member can be applied as soon as the three
//!   decoders have passed its share ([`decode_streamed`]): one stream (the
//!   diff) is 70–90 % of a binary's frame, so decoding it is serial work
//!   the members' patching can run beside.
//! - A zstd stream declares its content size, equal to its members' total
//!   (so a streaming decoder's window is at most that).
//! - Flag 1: each member's extra bytes are arm64-transformed
//!   ([`crate::arm64`]) at the member's destination offset, as a single
//!   operation's extra stream with the `A64` header is.
//! - Flag 2: each member's diff bytes are zero-run coded
//!   ([`patch_streams::zero_runs_encode`], 4-byte units) apart, so that one
//!   member's diff is expanded only when that member is applied.
//!
//! The frame's decoded size is the sum of `ctrl`, `diff_stored` and `extra`
//! over its members; [`decode`] refuses a frame above the caller's cap
//! before decoding anything, a member whose lengths are beyond what its
//! operation allows ([`patch_streams::decode_bounded`]'s bounds), and
//! anything that does not add up exactly.

use std::io;
use std::ops::Range;

use ota_format::limits::{MAX_FRAME_DECODED, MAX_FRAME_MEMBERS};

use crate::arm64;
use crate::patch_streams::{
    self, CTRL_LEN, Interleaved, StreamKind, Used, ZRL_UNIT, get_varint, invalid, put_varint,
};

/// Magic of a frame (layout 2: with its streams' stored lengths).
pub const MAGIC: &[u8] = b"FRM\x02";

/// Flag: members' extra bytes are arm64-transformed.
const FLAG_ARM64: u8 = 1;
/// Flag: members' diff bytes are zero-run coded.
const FLAG_ZERO_RUNS: u8 = 2;

/// How much longer than the diff its zero-run coding may be: a diff without
/// zero units is coded as one pair and its literals, a few bytes over.
const ZRL_SLACK: usize = 16;

/// Whether `data` is a frame (rather than one operation's streams).
pub fn is_frame(data: &[u8]) -> bool {
    data.starts_with(MAGIC)
}

/// One member's lengths, as the frame's header gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lens {
    ctrl: usize,
    diff: usize,
    diff_stored: usize,
    extra: usize,
}

/// A decoded frame: its three streams and where each member's bytes lie.
pub struct Frame {
    ctrl: Vec<u8>,
    diff: Vec<u8>,
    extra: Vec<u8>,
    members: Vec<Member>,
    zero_runs: bool,
}

#[derive(Debug, Clone)]
struct Member {
    ctrl: Range<usize>,
    diff: Range<usize>,
    diff_len: usize,
    extra: Range<usize>,
}

/// One member's streams, ready for `bsdiff::patch` ([`Frame::member`]).
pub struct MemberStreams<'a> {
    ctrl: &'a [u8],
    diff: std::borrow::Cow<'a, [u8]>,
    extra: &'a [u8],
}

impl MemberStreams<'_> {
    /// The member's interleaved bsdiff patch.
    pub fn patch(&self) -> Interleaved<'_> {
        Interleaved::from_planes(self.ctrl, &self.diff, self.extra)
    }

    /// The member's diff bytes (expanded).
    pub fn diff(&self) -> &[u8] {
        &self.diff
    }

    /// The member's extra bytes (arm64 transform undone).
    pub fn extra(&self) -> &[u8] {
        self.extra
    }
}

impl Frame {
    /// Members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the frame has no member (never, once decoded).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Bytes held.
    pub fn capacity(&self) -> usize {
        self.ctrl.capacity() + self.diff.capacity() + self.extra.capacity()
    }

    /// Member `k`'s streams, its diff expanded (at most its operation's
    /// output size, allocated only for a zero-run-coded frame).
    pub fn member(&self, k: usize) -> io::Result<MemberStreams<'_>> {
        let m = self
            .members
            .get(k)
            .ok_or_else(|| invalid(&format!("frame has no member {k}")))?;
        Ok(MemberStreams {
            ctrl: &self.ctrl[m.ctrl.clone()],
            diff: expand_diff(
                &self.diff[m.diff.clone()],
                self.zero_runs.then_some(m.diff_len),
            )?,
            extra: &self.extra[m.extra.clone()],
        })
    }
}

/// A member's diff bytes as stored, expanded where the frame is zero-run
/// coded (`Some` of the member's declared diff length).
fn expand_diff(stored: &[u8], zero_runs: Option<usize>) -> io::Result<std::borrow::Cow<'_, [u8]>> {
    Ok(match zero_runs {
        Some(len) => {
            std::borrow::Cow::Owned(patch_streams::zero_runs_decode(stored, len, ZRL_UNIT, 1)?)
        }
        None => std::borrow::Cow::Borrowed(stored),
    })
}

/// Undoes the arm64 transform of a member's extra bytes, in place: each
/// extra segment its control entries (`ctrl`, transposed) place, at its
/// output position from `base` (the member's destination offset).
fn undo_arm64(ctrl: &[u8], extra: &mut [u8], base: u64) -> io::Result<()> {
    arm64::extra_segments(ctrl, extra.len(), |at, n, o| {
        arm64::decode(&mut extra[at..at + n], base.wrapping_add(o))
    })
    .map_err(|e| invalid(&format!("frame extra stream (arm64): {e}")))
}

/// The decoded size a frame's header declares (see the module doc), read
/// without decoding: for accounting and inspection.
pub fn declared_size(data: &[u8]) -> io::Result<u64> {
    Ok(header(data)?
        .lens
        .iter()
        .map(|l| (l.ctrl + l.diff_stored + l.extra) as u64)
        .sum())
}

/// The decoded size a frame's header declares and its largest stream's
/// (the most an xz dictionary of it may take), read without decoding.
pub fn declared_sizes(data: &[u8]) -> io::Result<(u64, u64)> {
    let mut kinds = [0u64; 3];
    for l in &header(data)?.lens {
        kinds[0] += l.ctrl as u64;
        kinds[1] += l.diff_stored as u64;
        kinds[2] += l.extra as u64;
    }
    Ok((kinds.iter().sum(), kinds.into_iter().max().unwrap_or(0)))
}

/// A frame's header: flags, member lengths, the three streams' stored
/// lengths, and the rest (the streams).
struct Header<'a> {
    flags: u8,
    lens: Vec<Lens>,
    stored: [usize; 3],
    rest: &'a [u8],
}

/// Parses the header (see the module doc).
fn header(data: &[u8]) -> io::Result<Header<'_>> {
    let mut p = data
        .strip_prefix(MAGIC)
        .ok_or_else(|| invalid("not a frame (no FRM 2 magic)"))?;
    let flags = *p
        .first()
        .ok_or_else(|| invalid("frame: truncated header"))?;
    if flags & !(FLAG_ARM64 | FLAG_ZERO_RUNS) != 0 {
        return Err(invalid(&format!("frame: unknown flags {flags:#04x}")));
    }
    p = &p[1..];
    let n = get_varint(&mut p).ok_or_else(|| invalid("frame: bad member count"))?;
    if n == 0 || n > MAX_FRAME_MEMBERS as u64 {
        return Err(invalid(&format!(
            "frame: {n} members, not 1..={MAX_FRAME_MEMBERS}"
        )));
    }
    let mut lens = Vec::with_capacity(n as usize);
    for k in 0..n {
        let mut v = [0usize; 4];
        for x in &mut v {
            let raw = get_varint(&mut p)
                .ok_or_else(|| invalid(&format!("frame: member {k}: bad length")))?;
            *x = usize::try_from(raw)
                .ok()
                .filter(|&x| x as u64 <= MAX_FRAME_DECODED)
                .ok_or_else(|| invalid(&format!("frame: member {k}: length {raw} too large")))?;
        }
        lens.push(Lens {
            ctrl: v[0],
            diff: v[1],
            diff_stored: v[2],
            extra: v[3],
        });
    }
    let mut stored = [0usize; 3];
    for (i, x) in stored.iter_mut().enumerate() {
        let raw = get_varint(&mut p)
            .ok_or_else(|| invalid(&format!("frame: bad stored length of stream {i}")))?;
        *x = usize::try_from(raw)
            .ok()
            .filter(|&x| x <= p.len())
            .ok_or_else(|| {
                invalid(&format!(
                    "frame: stream {i} stored in {raw} bytes, more than the frame holds"
                ))
            })?;
    }
    if stored.iter().sum::<usize>() != p.len() {
        return Err(invalid(&format!(
            "frame: its streams' stored lengths add up to {}, {} bytes follow the header",
            stored.iter().sum::<usize>(),
            p.len()
        )));
    }
    Ok(Header {
        flags,
        lens,
        stored,
        rest: p,
    })
}

/// A frame's header checked against its members' destinations: where each
/// member's bytes lie in each decoded stream, each stream's decoded total,
/// and each stream's stored bytes.
struct Layout<'a> {
    flags: u8,
    members: Vec<Member>,
    totals: [usize; 3],
    streams: [&'a [u8]; 3],
}

/// [`decode_with`]'s checks before decoding (see [`decode`]).
fn layout<'a>(data: &'a [u8], dsts: &[(u64, u64)], cap: usize) -> io::Result<Layout<'a>> {
    let cap = cap.min(MAX_FRAME_DECODED as usize);
    let Header {
        flags,
        lens,
        stored,
        rest,
    } = header(data)?;
    if lens.len() != dsts.len() {
        return Err(invalid(&format!(
            "frame has {} members, but {} operations name its data",
            lens.len(),
            dsts.len()
        )));
    }
    let zero_runs = flags & FLAG_ZERO_RUNS != 0;
    let mut totals = [0usize; 3];
    let mut members = Vec::with_capacity(lens.len());
    for (k, (l, &(_, dst_len))) in lens.iter().zip(dsts).enumerate() {
        let dst_len = usize::try_from(dst_len).unwrap_or(usize::MAX);
        let bad = |what: String| invalid(&format!("frame member {k}: {what}"));
        if l.ctrl % CTRL_LEN != 0 {
            return Err(bad("control bytes are not whole entries".into()));
        }
        if l.ctrl > patch_streams::max_ctrl_len(dst_len) {
            return Err(bad(format!(
                "{} control bytes for a {dst_len}-byte output",
                l.ctrl
            )));
        }
        if l.diff + l.extra > dst_len {
            return Err(bad(format!(
                "{} diff and {} extra bytes for a {dst_len}-byte output",
                l.diff, l.extra
            )));
        }
        if l.diff_stored > l.diff + ZRL_SLACK || (!zero_runs && l.diff_stored != l.diff) {
            return Err(bad(format!(
                "{} stored diff bytes for {} diff bytes",
                l.diff_stored, l.diff
            )));
        }
        let start = totals;
        totals[0] += l.ctrl;
        totals[1] += l.diff_stored;
        totals[2] += l.extra;
        if totals.iter().sum::<usize>() > cap {
            return Err(invalid(&format!(
                "frame decodes to more than {cap} bytes: refused before decoding"
            )));
        }
        members.push(Member {
            ctrl: start[0]..totals[0],
            diff: start[1]..totals[1],
            diff_len: l.diff,
            extra: start[2]..totals[2],
        });
    }
    let (a, bc) = rest.split_at(stored[0]);
    let (b, c) = bc.split_at(stored[1]);
    Ok(Layout {
        flags,
        members,
        totals,
        streams: [a, b, c],
    })
}

/// Decodes a frame whose members are operations with destinations `dsts`
/// (offset, length), in manifest order, into at most `cap` bytes of
/// streams (at most [`MAX_FRAME_DECODED`]).
///
/// Refused before any stream is decoded: a member count other than
/// `dsts.len()`; a member with a partial control entry, more control bytes
/// than [`patch_streams::max_ctrl_len`] of its output, more diff and extra
/// bytes than its output, or a stored diff longer than the diff; a decoded
/// size over `cap`. Then each stream must decode to exactly its declared
/// total (an xz stream with a liblzma memlimit of that total plus
/// [`patch_streams::XZ_DCTX_BYTES`]) and be exactly its stored length.
///
/// One stream after another: at most one decoder's dictionary at a time
/// (the largest stream, [`declared_sizes`]). See [`decode_with`].
pub fn decode(data: &[u8], dsts: &[(u64, u64)], cap: usize) -> io::Result<Frame> {
    decode_with(data, dsts, cap, false)
}

/// [`decode`], with `parallel` the three streams decoded at once, each on
/// its own thread: faster, but the three decoders' dictionaries are held
/// together (at most the frame's decoded size, plus three decoder states)
/// instead of the largest one's.
pub fn decode_with(
    data: &[u8],
    dsts: &[(u64, u64)],
    cap: usize,
    parallel: bool,
) -> io::Result<Frame> {
    let Layout {
        flags,
        members,
        totals,
        streams: [a, b, c],
    } = layout(data, dsts, cap)?;
    let zero_runs = flags & FLAG_ZERO_RUNS != 0;
    let one = |i: usize, mut bytes: &[u8]| -> io::Result<Vec<u8>> {
        patch_streams::frame_stream_kind(bytes, i, totals[i])?;
        let s = patch_streams::decode_stream(&mut bytes, totals[i], totals[i].max(1), i)?;
        if s.len() != totals[i] {
            return Err(invalid(&format!(
                "frame stream {i} decodes to {} bytes, its members declare {}",
                s.len(),
                totals[i]
            )));
        }
        if !bytes.is_empty() {
            return Err(invalid(&format!(
                "frame stream {i}: {} bytes after its end, within its stored length",
                bytes.len()
            )));
        }
        Ok(s)
    };
    let (ctrl, diff, mut extra) = if parallel {
        std::thread::scope(|sc| {
            let ctrl = sc.spawn(|| one(0, a));
            let diff = sc.spawn(|| one(1, b));
            let extra = one(2, c);
            let join = |h: std::thread::ScopedJoinHandle<'_, io::Result<Vec<u8>>>| {
                h.join()
                    .unwrap_or_else(|_| Err(invalid("frame: a stream's decoder panicked")))
            };
            // Every thread is joined before an error is returned.
            let (ctrl, diff) = (join(ctrl), join(diff));
            Ok::<_, io::Error>((ctrl?, diff?, extra?))
        })?
    } else {
        (one(0, a)?, one(1, b)?, one(2, c)?)
    };
    if flags & FLAG_ARM64 != 0 {
        for (m, &(base, _)) in members.iter().zip(dsts) {
            undo_arm64(&ctrl[m.ctrl.clone()], &mut extra[m.extra.clone()], base)?;
        }
    }
    Ok(Frame {
        ctrl,
        diff,
        extra,
        members,
        zero_runs,
    })
}

/// [`decode`], streamed: each of the three streams decodes on its own
/// thread into the frame's buffers, in member order, and each member in
/// `todo` (indices into the frame's members, ascending) is handed to
/// `apply` on one of `workers` threads as soon as its share of every stream
/// is decoded, so members are applied while later members' bytes still
/// decode. `apply` gets the member's streams, or why they could not be
/// made (arm64 transform undone, diff expanded, as [`Frame::member`]);
/// `report` gets each member's result on the calling thread, in the order
/// they finish. After a failure (a member's, or a stream's) no member
/// starts; those running finish and are reported.
///
/// Refused before any stream is decoded: what [`decode`] refuses. Then a
/// stream that does not decode to exactly its members' bytes or is not
/// exactly its stored length is the `Err` returned, possibly after some
/// members were applied from the part decoded before it (each member is
/// verified on its own by `apply`'s caller, so nothing unverified is
/// written either way).
///
/// Memory: the decoded frame, as [`decode`], plus the three decoders at
/// once (dictionaries of at most each stream's decoded size, and their
/// states), plus what `workers` members hold.
#[allow(clippy::too_many_arguments)]
pub fn decode_streamed<E: Send>(
    data: &[u8],
    dsts: &[(u64, u64)],
    cap: usize,
    todo: &[usize],
    workers: usize,
    apply: impl Fn(usize, io::Result<MemberStreams<'_>>) -> Result<(), E> + Sync,
    mut report: impl FnMut(usize, Result<(), E>),
) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    let Layout {
        flags,
        members,
        totals,
        streams,
    } = layout(data, dsts, cap)?;
    for (i, s) in streams.iter().enumerate() {
        patch_streams::frame_stream_kind(s, i, totals[i])?;
    }
    let zero_runs = flags & FLAG_ZERO_RUNS != 0;
    let arm64 = flags & FLAG_ARM64 != 0;
    let mut want = vec![false; members.len()];
    for &k in todo {
        *want
            .get_mut(k)
            .ok_or_else(|| invalid(&format!("frame has no member {k}")))? = true;
    }
    let mut bufs: [Vec<u8>; 3] = totals.map(|n| vec![0u8; n]);
    // Each stream's buffer cut into its members' shares, in member order.
    let mut shares: [Vec<&mut [u8]>; 3] = Default::default();
    for (s, (buf, out)) in bufs.iter_mut().zip(&mut shares).enumerate() {
        let mut rest = &mut buf[..];
        for m in &members {
            let n = [&m.ctrl, &m.diff, &m.extra][s].len();
            let (share, after) = rest.split_at_mut(n);
            out.push(share);
            rest = after;
        }
    }

    enum Event<'b, E> {
        Share(usize, usize, &'b mut [u8]),
        StreamEnd(io::Result<()>),
        Applied(usize, Result<(), E>),
    }
    struct Job<'b> {
        k: usize,
        ctrl: &'b [u8],
        diff: &'b [u8],
        extra: &'b mut [u8],
    }
    let stop = AtomicBool::new(false);
    let (events, inbox) = mpsc::channel::<Event<'_, E>>();
    let (jobs, job_box) = mpsc::channel::<Job<'_>>();
    let job_box = std::sync::Mutex::new(job_box);
    /// A member's streams from its shares: arm64 transform undone, diff
    /// expanded (as [`Frame::member`]).
    fn prepare(
        job: Job<'_>,
        arm64_base: Option<u64>,
        zero_runs: Option<usize>,
    ) -> io::Result<MemberStreams<'_>> {
        let Job {
            ctrl, diff, extra, ..
        } = job;
        if let Some(base) = arm64_base {
            undo_arm64(ctrl, extra, base)?;
        }
        Ok(MemberStreams {
            ctrl,
            diff: expand_diff(diff, zero_runs)?,
            extra: &*extra,
        })
    }
    std::thread::scope(|sc| {
        for (i, (bytes, out)) in streams.into_iter().zip(shares).enumerate() {
            let (events, stop) = (events.clone(), &stop);
            sc.spawn(move || {
                let r = patch_streams::stream_into(bytes, i, out, |k, share| {
                    // The receiver lives until every stream has ended.
                    let _ = events.send(Event::Share(i, k, share));
                    !stop.load(Ordering::Relaxed)
                });
                let _ = events.send(Event::StreamEnd(r));
            });
        }
        for _ in 0..workers.max(1) {
            let (events, job_box, apply, members) = (events.clone(), &job_box, &apply, &members);
            sc.spawn(move || {
                loop {
                    let job = job_box.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { break };
                    let k = job.k;
                    let base = arm64.then_some(dsts[k].0);
                    let diff_len = zero_runs.then_some(members[k].diff_len);
                    let r = apply(k, prepare(job, base, diff_len));
                    let _ = events.send(Event::Applied(k, r));
                }
            });
        }
        drop(events);
        let mut got: Vec<[Option<&mut [u8]>; 3]> =
            members.iter().map(|_| [None, None, None]).collect();
        let (mut streams_left, mut running) = (3, 0usize);
        let mut failed: Option<io::Error> = None;
        while streams_left > 0 || running > 0 {
            // Decoders and workers hold senders until then: never ends early.
            let Ok(event) = inbox.recv() else { break };
            match event {
                Event::Share(i, k, share) => {
                    got[k][i] = Some(share);
                    if want[k]
                        && !stop.load(Ordering::Relaxed)
                        && got[k].iter().all(Option::is_some)
                    {
                        let [c, d, e] = std::mem::take(&mut got[k]).map(Option::unwrap);
                        let job = Job {
                            k,
                            ctrl: c,
                            diff: d,
                            extra: e,
                        };
                        // Workers live until `jobs` is dropped below.
                        let _ = jobs.send(job);
                        running += 1;
                    }
                }
                Event::StreamEnd(r) => {
                    streams_left -= 1;
                    if let Err(e) = r {
                        stop.store(true, Ordering::Relaxed);
                        failed.get_or_insert(e);
                    }
                }
                Event::Applied(k, r) => {
                    running -= 1;
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    report(k, r);
                }
            }
        }
        drop(jobs);
        failed.map_or(Ok(()), Err)
    })
}

/// One operation's streams for [`encode`]: its destination offset (the
/// arm64 base) and its control (transposed, as
/// [`patch_streams::from_streams`] lays it out), diff and extra streams.
pub struct Input<'a> {
    pub dst_offset: u64,
    pub streams: &'a [Vec<u8>; 3],
}

/// Encodes the streams of `members` (at least one) as a frame: each kind in
/// one stream, xz (its dictionary at most the stream) or zstd where smaller
/// ([`compress`]: the decoder also takes bzip2, which no encoder writes), with `zero_runs` the diffs zero-run
/// coded, with `arm64` the extra bytes transformed where a preset-1 probe
/// says it pays (both forms compressed where the probes are within
/// [`patch_streams::ARM64_PROBE_MARGIN`] %). The caller keeps the decoded
/// size within [`MAX_FRAME_DECODED`] ([`member_size`]).
pub fn encode(
    members: &[Input<'_>],
    level: i32,
    zero_runs: bool,
    arm64: bool,
) -> io::Result<(Vec<u8>, Used)> {
    let mut used = Used {
        xz: false,
        zero_runs,
        arm64: false,
    };
    let mut lens = Vec::with_capacity(members.len());
    let (mut ctrl, mut diff, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    for m in members {
        let [c, d, e] = m.streams;
        let stored = if zero_runs {
            patch_streams::zero_runs_encode(d, ZRL_UNIT)
        } else {
            d.clone()
        };
        debug_assert!(stored.len() <= d.len() + ZRL_SLACK);
        lens.push([c.len(), d.len(), stored.len(), e.len()]);
        ctrl.extend_from_slice(c);
        diff.extend_from_slice(&stored);
        extra.extend_from_slice(e);
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    let flags_at = out.len();
    out.push(if zero_runs { FLAG_ZERO_RUNS } else { 0 });
    put_varint(&mut out, members.len() as u64);
    for l in &lens {
        for &x in l {
            put_varint(&mut out, x as u64);
        }
    }
    // The streams go after their stored lengths, known once compressed.
    let mut streams = Vec::new();
    let plain = |s: &[u8], kind| compress(s, kind, level);
    let is_xz = |d: &[u8]| d.starts_with(patch_streams::XZ_MAGIC);
    let c = plain(&ctrl, StreamKind::Ctrl)?;
    // Zero-run coded diffs are compressed as the runs of a single
    // operation's are (`patch_streams::compress_with`): xz's default search.
    let d = plain(
        &diff,
        if zero_runs {
            StreamKind::Extra
        } else {
            StreamKind::Diff
        },
    )?;
    used.xz |= is_xz(&c) || is_xz(&d);
    streams.push(c);
    streams.push(d);
    let mut e = None;
    if arm64 && extra.len() >= 4 {
        let mut t = extra.clone();
        let mut at = 0;
        for m in members {
            let n = m.streams[2].len();
            let seg = &mut t[at..at + n];
            arm64::extra_segments(&m.streams[0], n, |x, k, o| {
                arm64::encode(&mut seg[x..x + k], m.dst_offset.wrapping_add(o))
            })
            .map_err(|e| invalid(&e))?;
            at += n;
        }
        let dict = patch_streams::xz_dict_size(extra.len(), extra.len());
        let p = patch_streams::xz_probe(&extra, dict)?.len() as u64;
        let pa = patch_streams::xz_probe(&t, dict)?.len() as u64;
        let margin = patch_streams::ARM64_PROBE_MARGIN;
        let plain_e = (p * 100 <= pa * (100 + margin))
            .then(|| plain(&extra, StreamKind::Extra))
            .transpose()?;
        let coded_e = (pa * 1000 < p * 995)
            .then(|| plain(&t, StreamKind::Extra))
            .transpose()?;
        e = Some(match (plain_e, coded_e) {
            (Some(p), Some(c)) if c.len() < p.len() => (c, true),
            (Some(p), _) => (p, false),
            (None, Some(c)) => (c, true),
            (None, None) => unreachable!("one of the two probes is the smaller"),
        });
    }
    let (e, a64) = match e {
        Some(x) => x,
        None => (plain(&extra, StreamKind::Extra)?, false),
    };
    used.xz |= is_xz(&e);
    if a64 {
        used.arm64 = true;
        out[flags_at] |= FLAG_ARM64;
    }
    streams.push(e);
    for s in &streams {
        put_varint(&mut out, s.len() as u64);
    }
    for s in &streams {
        out.extend_from_slice(s);
    }
    Ok((out, used))
}

/// One of a frame's streams: xz at preset 9 (with the settings of `kind`,
/// a dictionary of at most the stream), or zstd where smaller (at `level`
/// for a short stream, else at level 1: where xz loses on a long stream its
/// content does not compress, and zstd's raw blocks cost least).
///
/// Why not every codec a single operation's streams try (bzip2, zstd at
/// the full level, xz's fast mode, the probes): those pay on short,
/// sparse streams of one operation (bzip2 on Go's pointer tables); a frame's
/// streams are a few MiB of up to 32 operations' zero-run coded diffs and
/// new bytes, where LZMA2 with its whole context won. Tried on `rootfs`
/// and `ruff-arm64` (xz's fast mode on diff and extra streams, bzip2 on
/// control and diff streams up to 1 MiB): not one frame byte smaller, 5–20 %
/// more generation CPU.
///
/// Nor xz where zstd at level 1 saves under 5 %: compressed content (the
/// `compressed` pair's squashfs blocks), where xz over a few MiB costs
/// seconds and saves nothing.
fn compress(s: &[u8], kind: StreamKind, level: i32) -> io::Result<Vec<u8>> {
    let short = s.len() < patch_streams::ZSTD_BESIDE_XZ_MAX;
    let z = zstd::bulk::compress(s, if short { level } else { 1 })?;
    if s.is_empty() || (!short && 20 * z.len() >= 19 * s.len()) {
        return Ok(z);
    }
    let x = patch_streams::xz_compress(s, patch_streams::xz_dict_size(s.len(), s.len()), kind)?;
    Ok(if x.len() < z.len() { x } else { z })
}

/// What one member adds to a frame's decoded size (see the module doc):
/// the generator keeps a frame's total within [`MAX_FRAME_DECODED`].
pub fn member_size(streams: &[Vec<u8>; 3], zero_runs: bool) -> usize {
    let diff = if zero_runs {
        patch_streams::zero_runs_encode(&streams[1], ZRL_UNIT).len()
    } else {
        streams[1].len()
    };
    streams[0].len() + diff + streams[2].len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// One member's old window, new output, destination offset and streams:
    /// related content (each member's new bytes share words with the
    /// others', as a kernel's modules do), some AArch64 code.
    struct Case {
        old: Vec<u8>,
        new: Vec<u8>,
        dst: (u64, u64),
        streams: [Vec<u8>; 3],
    }

    fn cases(seed: u64, n: usize) -> Vec<Case> {
        let mut x = seed | 1;
        let mut at = (next(&mut x) % 64) * 4096 + next(&mut x) % 7;
        (0..n)
            .map(|_| {
                let len = 1 + (next(&mut x) % 40_000) as usize;
                let mut old = arm64::synthetic_code(len.div_ceil(4), at, next(&mut x));
                old.truncate(len);
                let mut new = old.clone();
                for _ in 0..(next(&mut x) % 50) {
                    let p = (next(&mut x) as usize) % new.len();
                    new[p] = new[p].wrapping_add(1 + (next(&mut x) % 5) as u8);
                }
                if next(&mut x) % 2 == 0 {
                    let p = (next(&mut x) as usize) % new.len();
                    let fresh = arm64::synthetic_code(500, at + p as u64, next(&mut x));
                    new.splice(p..p, fresh);
                }
                if next(&mut x) % 4 == 0 {
                    new.truncate((next(&mut x) as usize % new.len()).max(1));
                }
                let streams = patch_streams::from_streams(crate::suffix_diff::diff(&old, &new));
                let dst = (at, new.len() as u64);
                at += new.len() as u64 + next(&mut x) % 9000;
                Case {
                    old,
                    new,
                    dst,
                    streams,
                }
            })
            .collect()
    }

    fn encode_cases(cs: &[Case], zero_runs: bool, arm64: bool) -> Vec<u8> {
        let inputs: Vec<Input<'_>> = cs
            .iter()
            .map(|c| Input {
                dst_offset: c.dst.0,
                streams: &c.streams,
            })
            .collect();
        encode(&inputs, 3, zero_runs, arm64).unwrap().0
    }

    fn dsts(cs: &[Case]) -> Vec<(u64, u64)> {
        cs.iter().map(|c| c.dst).collect()
    }

    #[test]
    fn every_member_of_a_frame_patches_to_its_output_exactly() {
        for seed in 0..12u64 {
            let cs = cases(seed, 1 + (seed as usize % 7));
            for (zero_runs, arm64) in [(false, false), (true, false), (false, true), (true, true)] {
                let data = encode_cases(&cs, zero_runs, arm64);
                assert!(is_frame(&data));
                let frame = decode(&data, &dsts(&cs), MAX_FRAME_DECODED as usize).unwrap();
                assert_eq!(frame.len(), cs.len());
                assert_eq!(
                    declared_size(&data).unwrap(),
                    cs.iter()
                        .map(|c| member_size(&c.streams, zero_runs) as u64)
                        .sum::<u64>()
                );
                for (k, c) in cs.iter().enumerate() {
                    let m = frame.member(k).unwrap();
                    assert_eq!(m.diff(), &c.streams[1][..], "seed {seed} member {k}");
                    assert_eq!(m.extra(), &c.streams[2][..], "seed {seed} member {k}");
                    let mut out = Vec::new();
                    bsdiff::patch(&c.old, &mut m.patch(), &mut out).unwrap();
                    assert!(out == c.new, "seed {seed} member {k}");
                }
            }
        }
    }

    #[test]
    fn shared_context_makes_a_frame_smaller_than_its_members_alone() {
        let cs = cases(42, 8);
        let frame = encode_cases(&cs, true, true).len();
        let alone: usize = cs
            .iter()
            .map(|c| {
                patch_streams::compress_streams(
                    &c.streams,
                    3,
                    Some(c.new.len()),
                    true,
                    Some(c.dst.0),
                )
                .unwrap()
                .0
                .len()
            })
            .sum();
        assert!(frame < alone, "frame {frame} bytes, members alone {alone}");
    }

    /// Rewrites the header of `data` with `f` applied to its member
    /// lengths (and flags), keeping the streams.
    fn with_header(data: &[u8], f: impl FnOnce(&mut u8, &mut Vec<[usize; 4]>)) -> Vec<u8> {
        let Header {
            mut flags,
            lens,
            stored,
            rest,
        } = header(data).unwrap();
        let mut lens: Vec<[usize; 4]> = lens
            .iter()
            .map(|l| [l.ctrl, l.diff, l.diff_stored, l.extra])
            .collect();
        f(&mut flags, &mut lens);
        let mut out = MAGIC.to_vec();
        out.push(flags);
        put_varint(&mut out, lens.len() as u64);
        for l in &lens {
            for &x in l {
                put_varint(&mut out, x as u64);
            }
        }
        for x in stored {
            put_varint(&mut out, x as u64);
        }
        out.extend_from_slice(rest);
        out
    }

    #[test]
    fn frame_headers_that_lie_are_refused_before_decoding() {
        let cs = cases(7, 4);
        let d = dsts(&cs);
        let data = encode_cases(&cs, true, false);
        let refused = |bytes: &[u8], dsts: &[(u64, u64)], cap: usize, what: &str| {
            let e = decode(bytes, dsts, cap).err();
            assert!(e.is_some(), "{what}: accepted");
            e.unwrap().to_string()
        };
        // Fewer or more operations than members.
        refused(&data, &d[..3], usize::MAX, "a member without operation");
        let mut more = d.clone();
        more.push((1 << 30, 4096));
        refused(&data, &more, usize::MAX, "an operation without member");
        // Over the caller's cap: refused before decoding.
        let total = declared_size(&data).unwrap() as usize;
        let e = refused(&data, &d, total - 1, "over the cap");
        assert!(e.contains("refused before decoding"), "{e}");
        // A member's lengths beyond what its operation allows.
        for (what, f) in [
            (
                "partial control entry",
                Box::new(|_: &mut u8, l: &mut Vec<[usize; 4]>| l[1][0] += 1)
                    as Box<dyn FnOnce(&mut u8, &mut Vec<[usize; 4]>)>,
            ),
            (
                "more diff and extra than the output",
                Box::new(|_: &mut u8, l: &mut Vec<[usize; 4]>| l[2][3] += cs[2].new.len()),
            ),
            (
                "stored diff far longer than the diff",
                Box::new(|_: &mut u8, l: &mut Vec<[usize; 4]>| l[0][2] = l[0][1] + 17),
            ),
            (
                "unknown flag",
                Box::new(|f: &mut u8, _: &mut Vec<[usize; 4]>| *f |= 0x80),
            ),
            (
                "raw diff whose stored length differs",
                Box::new(|f: &mut u8, _: &mut Vec<[usize; 4]>| *f &= !FLAG_ZERO_RUNS),
            ),
            (
                "a stream shorter than its members declare",
                Box::new(|_: &mut u8, l: &mut Vec<[usize; 4]>| l[3][0] += 24),
            ),
            (
                "control bytes beyond the output's bound",
                Box::new(|_: &mut u8, l: &mut Vec<[usize; 4]>| l[0][0] = 1 << 20),
            ),
        ] {
            refused(&with_header(&data, f), &d, usize::MAX, what);
        }
        // Zero members, too many members.
        let mut none = MAGIC.to_vec();
        none.extend_from_slice(&[0, 0]);
        refused(&none, &[], usize::MAX, "no member");
        let mut many = MAGIC.to_vec();
        many.push(0);
        put_varint(&mut many, MAX_FRAME_MEMBERS as u64 + 1);
        refused(&many, &d, usize::MAX, "too many members");
        // A byte after the streams.
        let mut trailing = data.clone();
        trailing.push(0);
        refused(&trailing, &d, usize::MAX, "trailing byte");
        // Stored lengths that lie: a boundary moved either way (the total
        // still adds up), a total that does not.
        for (what, delta) in [
            ("control stream one byte longer", [1isize, -1, 0]),
            ("diff stream one byte shorter", [0, -1, 1]),
            ("control stream one byte shorter", [-1, 1, 0]),
            ("lengths adding up to one byte more", [0, 0, 1]),
            ("lengths adding up to one byte less", [0, 0, -1]),
        ] {
            let bad = with_stored(&data, |s| {
                for (x, d) in s.iter_mut().zip(delta) {
                    *x = x.checked_add_signed(d).unwrap();
                }
            });
            for parallel in [false, true] {
                assert!(
                    decode_with(&bad, &d, usize::MAX, parallel).is_err(),
                    "{what}: accepted (parallel {parallel})"
                );
            }
        }
    }

    /// Rewrites the stored lengths of the streams of `data` with `f`.
    fn with_stored(data: &[u8], f: impl FnOnce(&mut [usize; 3])) -> Vec<u8> {
        let mut h = header(data).unwrap();
        f(&mut h.stored);
        let rest = h.rest;
        let mut out = with_header(data, |_, _| {});
        out.truncate(out.len() - rest.len());
        // The header ends with the three stored lengths: replace them.
        let mut old = Vec::new();
        for x in header(data).unwrap().stored {
            put_varint(&mut old, x as u64);
        }
        out.truncate(out.len() - old.len());
        for x in h.stored {
            put_varint(&mut out, x as u64);
        }
        out.extend_from_slice(rest);
        out
    }

    /// Every member's streams as [`decode_streamed`] hands them out (two
    /// workers), or its error (a stream's, or a member's).
    fn streamed(data: &[u8], dsts: &[(u64, u64)]) -> io::Result<Vec<[Vec<u8>; 3]>> {
        let all: Vec<usize> = (0..dsts.len()).collect();
        let got = std::sync::Mutex::new(vec![None; dsts.len()]);
        let mut failed = None;
        decode_streamed(
            data,
            dsts,
            usize::MAX,
            &all,
            2,
            |k, m| {
                let m = m?;
                got.lock().unwrap()[k] =
                    Some([m.ctrl.to_vec(), m.diff().to_vec(), m.extra().to_vec()]);
                Ok::<(), io::Error>(())
            },
            |_, r| {
                if let Err(e) = r {
                    failed.get_or_insert(e);
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(got
            .into_inner()
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect())
    }

    #[test]
    fn streamed_members_are_the_decoded_frames_and_lies_are_refused_alike() {
        for (seed, zero_runs, arm64) in [(1, true, true), (2, false, true), (9, true, false)] {
            let cs = cases(seed, 7);
            let d = dsts(&cs);
            let data = encode_cases(&cs, zero_runs, arm64);
            let frame = decode(&data, &d, MAX_FRAME_DECODED as usize).unwrap();
            let got = streamed(&data, &d).unwrap();
            for (k, m) in got.iter().enumerate() {
                let f = frame.member(k).unwrap();
                assert_eq!(m[0], f.ctrl);
                assert_eq!(m[1], f.diff());
                assert_eq!(m[2], f.extra());
            }
            // A stream that decodes short, long, or has bytes after its
            // end; a header's lies: refused, as `decode` refuses them.
            let mut fewer = d.clone();
            fewer.pop();
            assert!(streamed(&data, &fewer).is_err());
            let cap_err =
                decode_streamed(&data, &d, 16, &[0], 1, |_, _| Ok::<_, ()>(()), |_, _| {});
            assert!(cap_err.is_err());
            let padded = with_stored(&data, |s| s[2] += 1);
            let mut padded = padded;
            padded.push(0);
            assert!(decode(&padded, &d, usize::MAX).is_err());
            assert!(streamed(&padded, &d).is_err());
        }
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_exact_never_a_panic() {
        let cs = cases(3, 3);
        let d = dsts(&cs);
        let data = encode_cases(&cs, true, true);
        for n in 0..data.len() {
            for parallel in [false, true] {
                assert!(
                    decode_with(&data[..n], &d, usize::MAX, parallel).is_err(),
                    "truncated at {n}"
                );
            }
            assert!(
                streamed(&data[..n], &d).is_err(),
                "streamed, truncated at {n}"
            );
        }
        let mut x = 5u64;
        for i in 0..400 {
            let mut bad = data.clone();
            let p = next(&mut x) as usize % bad.len();
            bad[p] ^= 1 << (next(&mut x) % 8);
            // Streamed, what decodes is what the whole decode gives.
            if let (Ok(got), Ok(frame)) = (streamed(&bad, &d), decode(&bad, &d, usize::MAX)) {
                for (k, m) in got.iter().enumerate() {
                    if let Ok(f) = frame.member(k) {
                        assert!(
                            m[0] == f.ctrl && m[1] == f.diff() && m[2] == f.extra(),
                            "flip at {p}"
                        );
                    }
                }
            }
            if let Ok(frame) = decode_with(&bad, &d, usize::MAX, i % 2 == 1) {
                for (k, c) in cs.iter().enumerate() {
                    if let Ok(m) = frame.member(k) {
                        let mut out = Vec::new();
                        let _ = bsdiff::patch(&c.old, &mut m.patch(), &mut out);
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Any members' streams (control bytes in whole entries, any diff
        /// and extra bytes; sparse diffs, as bsdiff makes them, or not),
        /// with or without zero-run coding: the frame decodes to exactly
        /// each member's streams, and its declared size is what
        /// `member_size` counted.
        #[test]
        fn any_members_streams_come_back_exactly(
            members in proptest::collection::vec(
                (0usize..40, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
                 0usize..3000, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
                 proptest::prelude::any::<u64>()),
                1..10),
            zero_runs in proptest::prelude::any::<bool>(),
        ) {
            let streams: Vec<[Vec<u8>; 3]> = members
                .iter()
                .map(|(entries, ctrl_bytes, zeros, extra, seed)| {
                    let mut ctrl = ctrl_bytes.clone();
                    ctrl.resize(entries * CTRL_LEN, 0);
                    // A sparse diff: zeros with a few bytes changed.
                    let mut diff = vec![0u8; *zeros];
                    let mut x = *seed | 1;
                    for _ in 0..(zeros / 64) {
                        let p = next(&mut x) as usize % diff.len();
                        diff[p] = next(&mut x) as u8;
                    }
                    diff.extend_from_slice(&ctrl_bytes[..ctrl_bytes.len().min(100)]);
                    [ctrl, diff, extra.clone()]
                })
                .collect();
            let mut at = 0u64;
            let inputs: Vec<Input<'_>> = streams
                .iter()
                .map(|st| {
                    let i = Input { dst_offset: at, streams: st };
                    at += (st[1].len() + st[2].len()) as u64 + 4096;
                    i
                })
                .collect();
            let dsts: Vec<(u64, u64)> = inputs
                .iter()
                .zip(&streams)
                .map(|(i, st)| (i.dst_offset, (st[1].len() + st[2].len() + st[0].len()) as u64))
                .collect();
            let (data, used) = encode(&inputs, 1, zero_runs, false).unwrap();
            proptest::prop_assert!(!used.arm64);
            proptest::prop_assert_eq!(
                declared_size(&data).unwrap(),
                streams.iter().map(|st| member_size(st, zero_runs) as u64).sum::<u64>()
            );
            // One stream after another, and the three at once.
            for parallel in [false, true] {
                let frame = decode_with(&data, &dsts, usize::MAX, parallel).unwrap();
                for (k, st) in streams.iter().enumerate() {
                    let m = frame.member(k).unwrap();
                    proptest::prop_assert_eq!(m.ctrl, &st[0][..]);
                    proptest::prop_assert_eq!(m.diff(), &st[1][..]);
                    proptest::prop_assert_eq!(m.extra(), &st[2][..]);
                }
            }
            // And streamed, member by member.
            let got = streamed(&data, &dsts).unwrap();
            for (m, st) in got.iter().zip(&streams) {
                proptest::prop_assert_eq!(m, st);
            }
        }
    }
}
