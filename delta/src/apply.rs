//! The apply engine.
//!
//! Memory is bounded by the format's limits, not by image size: `COPY`,
//! `ZERO` and `REPLACE` stream through a fixed buffer (`REPLACE` also holds
//! its zstd window, at most its destination); `BSDIFF` holds a cache of its
//! source window (≤ [`crate::bspatch::WINDOW_CACHE`]: bspatch reads the old
//! data mostly forward, [`crate::bspatch`]), its decoded streams (≤ 2 × its
//! output) and its output (≤ [`MAX_BUFFERED_DST`]), because the output is
//! verified before it is written.
//! [`op_work`] is that bound per operation; [`apply_image`] and the agent's
//! download pool admit operations within a budget of it, so the memory of a
//! whole apply is the budget plus constants, whatever the image size.
//!
//! Every operation checks, in order: its data hash (before the data is
//! used), the exact output length, and its output hash (where that is wrong
//! for a `BSDIFF` operation, its source window's hash says whether the
//! source or the patch was). Only then is the output written (`REPLACE`/`COPY`/`ZERO`
//! stream their output and check the hash at the end; a mismatch is reported
//! and the caller must treat the extent as not done). The source is only
//! ever read.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use ota_format::limits::{MAX_BSDIFF_WINDOW, MAX_BUFFERED_DST, MAX_FRAME_DECODED};
use ota_format::{Digest, Manifest, OpKind, Operation};
use sha2::{Digest as _, Sha256};

use crate::io::{ReadAt, WriteAt, for_each_piece};
use crate::patch_streams;

/// Size of the streaming buffer. Small enough for a 128 MiB device, large
/// enough that syscalls do not dominate.
const STREAM_BUF: usize = 256 << 10;

/// Why an apply failed. Each variant names the operation and what an operator
/// should conclude.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "operation {op} ({kind}): data sha256 is {actual}, the manifest says {expected}: the payload is corrupt or was altered; download it again"
    )]
    DataHash {
        op: usize,
        kind: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error("operation {op} ({kind}): got {actual} bytes of data, the manifest says {expected}")]
    DataLength {
        op: usize,
        kind: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error(
        "operation {op} ({kind}): source window sha256 is {actual}, the manifest says {expected}: the source image is not the one this delta was built from"
    )]
    SourceHash {
        op: usize,
        kind: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "operation {op} ({kind}): output sha256 is {actual}, the manifest says {expected}{hint}"
    )]
    OutputHash {
        op: usize,
        kind: &'static str,
        expected: Digest,
        actual: Digest,
        hint: &'static str,
    },
    #[error("operation {op} ({kind}): data does not decode: {reason}")]
    Decode {
        op: usize,
        kind: &'static str,
        reason: String,
    },
    #[error("operation {op} ({kind}) reads the source image, but no source was given")]
    NoSource { op: usize, kind: &'static str },
    #[error("operation {op} ({kind}) is malformed or over the engine's limits: {reason}")]
    Limits {
        op: usize,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "source image is {actual} bytes, but this delta applies to version {version} of {expected} bytes: wrong source image"
    )]
    SourceSize {
        version: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "source image sha256 is {actual}, but this delta applies to version {version} with sha256 {expected}: wrong or modified source image"
    )]
    SourceImageHash {
        version: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("payload is {actual} bytes, the manifest says {expected}: truncated or wrong payload")]
    PayloadSize { expected: u64, actual: u64 },
    #[error(
        "payload sha256 is {actual}, the manifest says {expected}: the payload is corrupt or was altered; download it again"
    )]
    PayloadHash { expected: Digest, actual: Digest },
    #[error("target image sha256 after apply is {actual}, the manifest says {expected}")]
    TargetHash { expected: Digest, actual: Digest },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let context = context.into();
    move |source| ApplyError::Io { context, source }
}

/// Applies one operation whose `data` has been fetched (empty for kinds
/// without data). Verifies the data before use and the output after.
///
/// `source` is required for `COPY` and `BSDIFF`. The destination extent is
/// written in place; on error it may hold partial output, which is harmless
/// because nothing records it as done and re-applying overwrites it.
pub fn apply_operation<S: ReadAt + ?Sized, D: WriteAt + ?Sized>(
    index: usize,
    op: &Operation,
    data: &[u8],
    source: Option<&S>,
    dest: &D,
) -> Result<(), ApplyError> {
    apply_operation_inner(index, op, data, source, dest, ApplyOptions::default())
}

fn apply_operation_inner<S: ReadAt + ?Sized, D: WriteAt + ?Sized>(
    index: usize,
    op: &Operation,
    data: &[u8],
    source: Option<&S>,
    dest: &D,
    opts: ApplyOptions,
) -> Result<(), ApplyError> {
    let kind = op.kind.name();
    // Validation has checked this for manifest operations; checking again
    // keeps the engine safe for operations that bypassed it.
    op.check_shape(Some(u64::MAX))
        .map_err(|reason| ApplyError::Limits {
            op: index,
            kind,
            reason,
        })?;
    let _span = tracing::debug_span!(
        "op",
        index,
        kind,
        offset = op.dst.offset,
        len = op.dst.length
    )
    .entered();
    check_data(index, op, data)?;
    let dst = op.dst;
    let write_err = || {
        io_err(format!(
            "writing operation {index} at offset {}",
            dst.offset
        ))
    };
    let source = || source.ok_or(ApplyError::NoSource { op: index, kind });
    let mut hasher = Sha256::new();
    match op.kind {
        OpKind::Zero => {
            if !opts.dest_is_zeroed {
                let zeros = vec![0u8; STREAM_BUF.min(dst.length as usize)];
                let mut done = 0u64;
                while done < dst.length {
                    let n = (dst.length - done).min(zeros.len() as u64) as usize;
                    dest.write_all_at(&zeros[..n], dst.offset + done)
                        .map_err(write_err())?;
                    done += n as u64;
                }
            }
            // The digest of zeros is known; checking it still catches a
            // manifest whose ZERO op claims another output.
            let actual = Digest::of_zeros(dst.length);
            check_output(index, op, actual, "")
        }
        OpKind::Copy => {
            let src = source()?;
            let mut buf = vec![0u8; STREAM_BUF.min(dst.length as usize)];
            let mut out = dst.offset;
            for e in &op.src {
                for_each_piece(src, e.offset, e.length, &mut buf, |piece, _| {
                    hasher.update(piece);
                    dest.write_all_at(piece, out)?;
                    out += piece.len() as u64;
                    Ok(())
                })
                .map_err(io_err(format!(
                    "copying source extent [{}, +{}) of operation {index}",
                    e.offset, e.length
                )))?;
            }
            check_output(
                index,
                op,
                hasher.into(),
                ": the source extents do not hold the expected bytes (wrong source image?)",
            )
        }
        OpKind::Replace => {
            if dst.length > MAX_BUFFERED_DST {
                return Err(ApplyError::Limits {
                    op: index,
                    kind,
                    reason: format!("dst {} > {MAX_BUFFERED_DST}", dst.length),
                });
            }
            let (mut dec, arm64_base) = replace_decoder(index, kind, data, dst.length)?;
            // At least 8 bytes: up to 3 bytes of a word cut by a read wait
            // for the rest of it (arm64), and a read always has room.
            let mut buf = vec![0u8; STREAM_BUF.min(dst.length as usize + 1).max(8)];
            let mut done = 0u64;
            let mut carry = 0usize;
            loop {
                let n = dec
                    .read(&mut buf[carry..])
                    .map_err(|e| ApplyError::Decode {
                        op: index,
                        kind,
                        reason: e.to_string(),
                    })?;
                let have = carry + n;
                // The bytes ready to write: with the arm64 transform, those
                // up to the last whole word (by position in the image), all
                // of them at the end.
                let ready = match arm64_base {
                    Some(base) if n > 0 => {
                        let end = base.wrapping_add(done).wrapping_add(have as u64);
                        // 0 when no word ends in it yet (an unaligned start).
                        have.saturating_sub((end & 3) as usize)
                    }
                    _ => have,
                };
                if ready == 0 && n == 0 {
                    break;
                }
                if done + ready as u64 > dst.length {
                    return Err(ApplyError::Decode {
                        op: index,
                        kind,
                        reason: format!("decompresses past the {}-byte destination", dst.length),
                    });
                }
                if let Some(base) = arm64_base {
                    crate::arm64::decode(&mut buf[..ready], base.wrapping_add(done));
                }
                hasher.update(&buf[..ready]);
                dest.write_all_at(&buf[..ready], dst.offset + done)
                    .map_err(write_err())?;
                done += ready as u64;
                buf.copy_within(ready..have, 0);
                carry = have - ready;
                if n == 0 {
                    break;
                }
            }
            if done != dst.length {
                return Err(ApplyError::Decode {
                    op: index,
                    kind,
                    reason: format!(
                        "decompresses to {done} bytes, destination is {}",
                        dst.length
                    ),
                });
            }
            check_output(index, op, hasher.into(), "")
        }
        OpKind::Bsdiff => {
            let src = source()?;
            let window_len = op.src_len();
            if window_len > MAX_BSDIFF_WINDOW || dst.length > MAX_BUFFERED_DST {
                return Err(ApplyError::Limits {
                    op: index,
                    kind,
                    reason: format!("window {window_len}, dst {}", dst.length),
                });
            }
            if crate::frames::is_frame(data) {
                return Err(ApplyError::Decode {
                    op: index,
                    kind,
                    reason: "its data is a compression frame, which is applied with the other operations that name it (a manifest that lists the frames codec)".into(),
                });
            }
            // At most 2 × the output, whatever the data says (see
            // `decode_bounded`); accounted in `op_work`.
            let streams =
                patch_streams::decode_bounded(data, dst.length as usize).map_err(|e| {
                    ApplyError::Decode {
                        op: index,
                        kind,
                        reason: e.to_string(),
                    }
                })?;
            patch_and_write(index, op, src, &mut streams.patch(), dest)
        }
    }
}

/// Checks an operation's data (if it has any) against the length and
/// digest the manifest gives, before anything uses it.
fn check_data(index: usize, op: &Operation, data: &[u8]) -> Result<(), ApplyError> {
    let Some(d) = &op.data else { return Ok(()) };
    let kind = op.kind.name();
    if data.len() as u64 != d.length {
        return Err(ApplyError::DataLength {
            op: index,
            kind,
            expected: d.length,
            actual: data.len() as u64,
        });
    }
    let actual = Digest::of(data);
    if actual != d.sha256 {
        return Err(ApplyError::DataHash {
            op: index,
            kind,
            expected: d.sha256,
            actual,
        });
    }
    Ok(())
}

/// Runs bspatch with `patch` over a `BSDIFF` operation's source window,
/// read in pieces ([`crate::bspatch`]), checks the output's length and
/// digest, then writes it. Holds the output and at most
/// [`crate::bspatch::WINDOW_CACHE`] bytes of the window.
///
/// The window's digest (`src_sha256`) is checked only when the output's is
/// wrong, to say which was: bspatch adds the window's bytes to the diff
/// without branching on them, so a window that differs can only produce a
/// wrong output (or the right one, where bspatch never read the bytes that
/// differ), and the output's digest is checked before anything is written
/// either way. Why not first, as before: the windows are about 4 × the
/// output, so hashing each window cost a second read of it (through the
/// cache: bspatch reads it again) and most of a delta apply's hashing, to
/// learn what the output's digest says anyway.
fn patch_and_write<S: ReadAt + ?Sized, D: WriteAt + ?Sized>(
    index: usize,
    op: &Operation,
    src: &S,
    patch: &mut dyn Read,
    dest: &D,
) -> Result<(), ApplyError> {
    use crate::bspatch::{PatchError, Window};
    let kind = op.kind.name();
    let dst = op.dst;
    let read_err = || {
        io_err(format!(
            "reading the source window of operation {index} ({} bytes in {} extents)",
            op.src_len(),
            op.src.len()
        ))
    };
    let mut window = Window::new(src, &op.src);
    let mut out = Vec::with_capacity(dst.length as usize);
    crate::bspatch::patch(&mut window, patch, &mut out, dst.length as usize).map_err(
        |e| match e {
            PatchError::Source(e) => read_err()(e),
            PatchError::Patch(reason) => ApplyError::Decode {
                op: index,
                kind,
                reason,
            },
        },
    )?;
    if out.len() as u64 != dst.length {
        return Err(ApplyError::Decode {
            op: index,
            kind,
            reason: format!(
                "patches to {} bytes, destination is {}",
                out.len(),
                dst.length
            ),
        });
    }
    let actual = Digest::of(&out);
    if actual != op.dst_sha256 {
        let expected = op.src_sha256.unwrap_or_default();
        let window_digest = window.digest().map_err(read_err())?;
        if window_digest != expected {
            return Err(ApplyError::SourceHash {
                op: index,
                kind,
                expected,
                actual: window_digest,
            });
        }
    }
    drop(window);
    check_output(index, op, actual, "")?;
    dest.write_all_at(&out, dst.offset).map_err(io_err(format!(
        "writing operation {index} at offset {}",
        dst.offset
    )))
}

/// Whether the operations `sharing` (every operation of `manifest` that
/// names one data range, in manifest order) are accounted and applied as a
/// compression frame: the manifest lists the `frames` codec, and they are
/// two or more `BSDIFF` operations. ([`crate::frames`])
pub fn is_frame_group(manifest: &Manifest, sharing: &[usize]) -> bool {
    sharing.len() >= 2
        && manifest
            .codecs
            .iter()
            .any(|c| c == ota_format::manifest::CODEC_FRAMES)
        && sharing
            .iter()
            .all(|&i| manifest.operations[i].kind == OpKind::Bsdiff)
}

/// Members of one compression frame applied at the same time, at most,
/// when the memory held for the frame allows it ([`group_work_with`]).
/// One after another, a frame of `BSDIFF` members applied 1.2–1.5 × slower
/// than the same operations unframed, which a pool applies side by side.
pub const FRAME_THREADS: usize = 2;

/// What a `BSDIFF` operation holds of its source window: the window, up to
/// [`crate::bspatch::WINDOW_CACHE`] bytes of it.
fn window_work(op: &Operation) -> u64 {
    op.src_len().min(crate::bspatch::WINDOW_CACHE as u64)
}

/// What `n` members of a frame hold at once, besides the decoded frame:
/// each its source window's cache, expanded diff and output (≤ 2 × its
/// output); the `n` largest.
fn members_work(manifest: &Manifest, sharing: &[usize], n: usize) -> u64 {
    let ops = &manifest.operations;
    let mut each: Vec<u64> = sharing
        .iter()
        .map(|&i| window_work(&ops[i]) + 2 * ops[i].dst.length)
        .collect();
    each.sort_unstable_by(|a, b| b.cmp(a));
    each.iter().take(n.max(1)).sum()
}

/// Memory the operations `sharing` (every operation naming one data range,
/// see [`is_frame_group`]) hold while [`apply_group`] applies them one after
/// another, besides their data: the largest [`op_work`], or for a frame its
/// decoded streams (at most [`MAX_FRAME_DECODED`]) and then the larger of
/// an xz dictionary while they decode (at most the frame) and one member's
/// source window's cache, expanded diff and output (≤ 2 × its output).
pub fn group_work(manifest: &Manifest, sharing: &[usize]) -> u64 {
    let ops = &manifest.operations;
    let each = sharing.iter().map(|&i| op_work(&ops[i])).max().unwrap_or(0);
    if !is_frame_group(manifest, sharing) {
        return each;
    }
    let member = members_work(manifest, sharing, 1);
    let frame = MAX_FRAME_DECODED + MAX_FRAME_DECODED.max(member) + patch_streams::ZSTD_DCTX_BYTES;
    each.max(frame)
}

/// [`group_work`] once the group's `data` is in hand: for a frame, what its
/// header declares (its decoded streams, its largest stream as the xz
/// dictionary while they decode) rather than the format's bound, so that a
/// caller that reserved [`group_work`] before fetching can give the rest
/// back before applying (frames of small operations decode to far less
/// than [`MAX_FRAME_DECODED`]). Never more than [`group_work`]; a header that
/// does not parse keeps [`group_work`] (the apply refuses it).
pub fn group_work_of(manifest: &Manifest, sharing: &[usize], data: &[u8]) -> u64 {
    group_work_with(manifest, sharing, data, 1).min(group_work(manifest, sharing))
}

/// [`group_work_of`] with up to `threads` members of a frame applied at
/// once ([`apply_group`]'s `threads`): the decoded frame, then the larger
/// of the xz dictionary and the `threads` largest members' work. This one
/// may exceed [`group_work`], which counts members one at a time: a caller
/// holding [`group_work`] passes `threads` > 1 only where this fits what it
/// holds (or can add without waiting). Not a frame, or a header that does
/// not parse: [`group_work`], whatever `threads`. The frame's three streams
/// are decoded at once only where that fits within this figure
/// (`parallel_decode`).
pub fn group_work_with(manifest: &Manifest, sharing: &[usize], data: &[u8], threads: usize) -> u64 {
    let bound = group_work(manifest, sharing);
    if !(is_frame_group(manifest, sharing) && crate::frames::is_frame(data)) {
        return bound;
    }
    let Ok((decoded, largest)) = crate::frames::declared_sizes(data) else {
        return bound;
    };
    if decoded > MAX_FRAME_DECODED {
        return bound;
    }
    let members = members_work(manifest, sharing, threads.clamp(1, sharing.len()));
    // + 1 per stream: a decoder's buffer is its cap plus one byte.
    decoded + 3 + largest.max(members) + patch_streams::ZSTD_DCTX_BYTES
}

/// Whether a frame's three streams may be decoded at once
/// ([`crate::frames::decode_with`]) within [`group_work_with`] for
/// `threads` members: the three decoders' dictionaries (at most the decoded
/// frame) and states fit in what the members will hold next anyway. So it
/// costs no memory; it is refused where the decoded frame outweighs its
/// members (small members of a large frame).
fn parallel_decode(manifest: &Manifest, sharing: &[usize], data: &[u8], threads: usize) -> bool {
    let Ok((decoded, largest)) = crate::frames::declared_sizes(data) else {
        return false;
    };
    let members = members_work(manifest, sharing, threads.clamp(1, sharing.len().max(1)));
    decoded + 2 * patch_streams::ZSTD_DCTX_BYTES <= largest.max(members)
}

/// How a compression frame's members are applied ([`apply_group`]): how
/// many at once, and whether they start while the frame's streams still
/// decode. Each plan holds its own memory ([`frame_plans`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePlan {
    /// Members applied at once (1..=[`FRAME_THREADS`]).
    pub threads: usize,
    /// Members start as soon as the decoders have produced their bytes
    /// ([`crate::frames::decode_streamed`]), rather than once the whole
    /// frame is decoded: about max(decode, members) per frame instead of
    /// their sum, for the three decoders' memory held beside the members'.
    pub streamed: bool,
}

impl FramePlan {
    /// Decode, then one member after another: the least memory
    /// ([`group_work_of`]), and what any group that is not a frame gets.
    pub const ONE: FramePlan = FramePlan {
        threads: 1,
        streamed: false,
    };
    /// Decode, then two members at a time.
    pub const TWO: FramePlan = FramePlan {
        threads: 2,
        streamed: false,
    };
    /// Members, `threads` at a time, while the frame decodes.
    pub const fn streamed(threads: usize) -> FramePlan {
        FramePlan {
            threads,
            streamed: true,
        }
    }
}

/// The plans for the group `sharing` once its `data` is in hand, the
/// fastest first, each with the memory it holds besides the data: a frame
/// streamed with [`FRAME_THREADS`] and then one member at a time, decoded
/// first with [`FRAME_THREADS`] and then one ([`group_work_with`]). The
/// last is always [`FramePlan::ONE`] with [`group_work_of`], which never
/// exceeds [`group_work`] (what a caller reserves before fetching); a
/// group that is not a frame, or a frame whose header does not parse, has
/// only that one. `max_threads` caps the members at once (the threads the
/// caller may use).
///
/// Streamed, a frame holds its decoded streams, the three decoders at once
/// (dictionaries of at most each stream's decoded size, and states), and
/// the members' work; decoded first, the decoders are gone before the
/// members start (see [`group_work_with`]).
pub fn frame_plans(
    manifest: &Manifest,
    sharing: &[usize],
    data: &[u8],
    max_threads: usize,
) -> Vec<(FramePlan, u64)> {
    let one = (FramePlan::ONE, group_work_of(manifest, sharing, data));
    let frame = is_frame_group(manifest, sharing) && crate::frames::is_frame(data);
    let Some(decoded) = frame
        .then(|| crate::frames::declared_sizes(data).ok())
        .flatten()
        .map(|(decoded, _)| decoded)
        .filter(|&d| d <= MAX_FRAME_DECODED)
    else {
        return vec![one];
    };
    let most = max_threads.clamp(1, FRAME_THREADS).min(sharing.len());
    let streamed = |n: usize| {
        let decoders = decoded + 3 * patch_streams::ZSTD_DCTX_BYTES;
        (
            FramePlan::streamed(n),
            decoded + 3 + decoders + members_work(manifest, sharing, n),
        )
    };
    let mut plans = vec![streamed(most)];
    if most > 1 {
        plans.push(streamed(1));
        plans.push((
            FramePlan {
                threads: most,
                streamed: false,
            },
            group_work_with(manifest, sharing, data, most),
        ));
    }
    plans.push(one);
    plans
}

/// The first of `plans` ([`frame_plans`], possibly in the caller's units)
/// whose memory is `held` already, or is under `limit` and can be added
/// without waiting (`try_more(extra)`: true once taken; never waits, since
/// the caller holds part of the budget and waiting would be
/// hold-and-wait); else the last. The pool of `ota-agent run` and
/// [`apply_image`] both choose with this.
pub fn choose_frame_plan(
    plans: &[(FramePlan, u64)],
    held: u64,
    limit: u64,
    mut try_more: impl FnMut(u64) -> bool,
) -> (FramePlan, u64) {
    let (last, rest) = plans
        .split_last()
        .map_or(((FramePlan::ONE, held), &[][..]), |(l, r)| (*l, r));
    for &(plan, work) in rest {
        if work <= held || (work < limit && try_more(work - held)) {
            return (plan, work);
        }
    }
    last
}

/// Applies the operations `todo` (in manifest order) of the group `sharing`:
/// every operation of `manifest` that names one data range, in manifest
/// order (one operation, or several sharing identical data, or the members
/// of a compression frame). `data` is that range's bytes, checked once
/// against its digest; a frame ([`is_frame_group`]) is decoded once and its
/// members applied in turn, each verified as [`apply_operation`] verifies
/// one. `done` is called (on the calling thread) after each operation's
/// output is written.
///
/// `plan` says how a frame's members are applied ([`FramePlan`]: up to
/// `threads` at once, each on its own thread, and with `streamed` while the
/// frame decodes); it then holds [`frame_plans`]'s memory for that plan.
/// Members write disjoint ranges, so the order they finish in does not
/// matter; `done` may then come out of manifest order.
///
/// On an error, the operations reported done stay done; the rest are not.
/// The error reported is the failing member with the lowest index.
#[allow(clippy::too_many_arguments)]
pub fn apply_group<S: ReadAt + ?Sized, D: WriteAt + ?Sized>(
    manifest: &Manifest,
    sharing: &[usize],
    todo: &[usize],
    data: &[u8],
    source: Option<&S>,
    dest: &D,
    plan: FramePlan,
    done: impl FnMut(usize),
) -> Result<(), ApplyError> {
    let opts = ApplyOptions::default();
    apply_group_inner(
        manifest, sharing, todo, data, source, dest, opts, plan, done,
    )
}

/// [`apply_group`] with `opts`.
#[allow(clippy::too_many_arguments)]
fn apply_group_inner<S: ReadAt + ?Sized, D: WriteAt + ?Sized>(
    manifest: &Manifest,
    sharing: &[usize],
    todo: &[usize],
    data: &[u8],
    source: Option<&S>,
    dest: &D,
    opts: ApplyOptions,
    plan: FramePlan,
    mut done: impl FnMut(usize),
) -> Result<(), ApplyError> {
    let ops = &manifest.operations;
    if !(is_frame_group(manifest, sharing) && crate::frames::is_frame(data)) {
        for &i in todo {
            apply_operation_inner(i, &ops[i], data, source, dest, opts)?;
            done(i);
        }
        return Ok(());
    }
    let Some(&first) = todo.first() else {
        return Ok(());
    };
    let kind = OpKind::Bsdiff.name();
    let _span = tracing::debug_span!("frame", first, members = sharing.len()).entered();
    // Validation made every member name the same range: one check of the
    // data covers them all.
    check_data(first, &ops[first], data)?;
    for &i in sharing {
        ops[i]
            .check_shape(Some(u64::MAX))
            .map_err(|reason| ApplyError::Limits {
                op: i,
                kind,
                reason,
            })?;
        if ops[i].data != ops[first].data {
            return Err(ApplyError::Limits {
                op: i,
                kind,
                reason: "a frame's members must name the same data".into(),
            });
        }
    }
    let dsts: Vec<(u64, u64)> = sharing
        .iter()
        .map(|&i| (ops[i].dst.offset, ops[i].dst.length))
        .collect();
    let threads = plan.threads.clamp(1, FRAME_THREADS).min(todo.len());
    // One member: patched from its streams over its window, verified and
    // written.
    let apply_member = |i: usize, streams: crate::frames::MemberStreams<'_>| {
        let op = &ops[i];
        let _span = tracing::debug_span!(
            "op",
            index = i,
            kind,
            offset = op.dst.offset,
            len = op.dst.length
        )
        .entered();
        let src = source.ok_or(ApplyError::NoSource { op: i, kind })?;
        patch_and_write(i, op, src, &mut streams.patch(), dest)
    };
    let position = |i: usize| {
        sharing
            .iter()
            .position(|&j| j == i)
            .ok_or(ApplyError::Limits {
                op: i,
                kind,
                reason: "not a member of the frame it is applied with".into(),
            })
    };
    let decode_error = |op: usize, e: io::Error| ApplyError::Decode {
        op,
        kind,
        reason: e.to_string(),
    };
    if plan.streamed {
        let ks = todo
            .iter()
            .map(|&i| position(i))
            .collect::<Result<Vec<_>, _>>()?;
        let frame_span = tracing::Span::current();
        let mut first_error: Option<(usize, ApplyError)> = None;
        let decoded = crate::frames::decode_streamed(
            data,
            &dsts,
            MAX_FRAME_DECODED as usize,
            &ks,
            threads,
            |k, streams| {
                let _span = frame_span.enter();
                let i = sharing[k];
                apply_member(i, streams.map_err(|e| decode_error(i, e))?)
            },
            |k, r| match r {
                Ok(()) => done(sharing[k]),
                Err(e) if first_error.as_ref().is_none_or(|(j, _)| sharing[k] < *j) => {
                    first_error = Some((sharing[k], e));
                }
                Err(_) => {}
            },
        );
        // A stream that failed is reported as the frame's first pending
        // member's: it is the lowest index.
        decoded.map_err(|e| decode_error(first, e))?;
        return first_error.map_or(Ok(()), |(_, e)| Err(e));
    }
    let parallel = parallel_decode(manifest, sharing, data, threads);
    let frame = crate::frames::decode_with(data, &dsts, MAX_FRAME_DECODED as usize, parallel)
        .map_err(|e| decode_error(first, e))?;
    let member = |i: usize| -> Result<(), ApplyError> {
        let streams = frame.member(position(i)?).map_err(|e| decode_error(i, e))?;
        apply_member(i, streams)
    };
    if threads == 1 {
        for &i in todo {
            member(i)?;
            done(i);
        }
        return Ok(());
    }
    // Workers take the next pending member; this thread reports each one
    // as it is written. After a failure no new member starts.
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let frame_span = tracing::Span::current();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Result<(), ApplyError>)>(todo.len());
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (tx, member, next, stop, span) = (tx.clone(), &member, &next, &stop, &frame_span);
            s.spawn(move || {
                let _span = span.enter();
                while !stop.load(Ordering::Relaxed) {
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let r = member(i);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    // The channel holds every member's result: never blocks.
                    let _ = tx.send((i, r));
                }
            });
        }
        drop(tx);
        let mut first_error: Option<(usize, ApplyError)> = None;
        for (i, r) in rx {
            match r {
                Ok(()) => done(i),
                Err(e) if first_error.as_ref().is_none_or(|(j, _)| i < *j) => {
                    first_error = Some((i, e));
                }
                Err(_) => {}
            }
        }
        first_error.map_or(Ok(()), |(_, e)| Err(e))
    })
}

/// The streaming decoder of a `REPLACE` operation's data for a
/// `dst_len`-byte destination, and the arm64 base if the data is
/// arm64-transformed (`crate::arm64`: [`crate::arm64::MAGIC`], the base as a
/// varint, then one zstd frame or xz stream of the transformed bytes, which
/// the caller restores in place as they stream out).
///
/// The memory stays what [`op_work`] counts for `REPLACE`: a zstd frame's
/// window is at most the destination ([`decoder`]); an xz stream is decoded
/// with a liblzma memlimit of the destination + [`patch_streams::XZ_DCTX_BYTES`]
/// (its dictionary takes the window's share, its state the zstd context's),
/// refused before anything is allocated if it asks more. A malformed or
/// truncated header, a bzip2 stream or a transform nested in a transform is
/// refused.
fn replace_decoder<'a>(
    index: usize,
    kind: &'static str,
    data: &'a [u8],
    dst_len: u64,
) -> Result<(Box<dyn Read + 'a>, Option<u64>), ApplyError> {
    let refuse = |reason: String| ApplyError::Decode {
        op: index,
        kind,
        reason,
    };
    let Some(after) = data.strip_prefix(crate::arm64::MAGIC) else {
        return Ok((Box::new(decoder(index, kind, data, dst_len)?), None));
    };
    let mut inner = after;
    let base = patch_streams::get_varint(&mut inner)
        .ok_or_else(|| refuse("arm64: truncated or malformed base".into()))?;
    if inner.starts_with(crate::arm64::MAGIC) {
        return Err(refuse("arm64: the data is transformed again".into()));
    }
    if inner.starts_with(patch_streams::XZ_MAGIC) {
        let limit = dst_len + patch_streams::XZ_DCTX_BYTES;
        let stream = xz2::stream::Stream::new_stream_decoder(limit, 0)
            .map_err(|e| refuse(format!("arm64: creating an xz decoder: {e}")))?;
        let dec = XzReplace {
            dec: xz2::bufread::XzDecoder::new_stream(inner, stream),
            len: inner.len() as u64,
            limit,
        };
        return Ok((Box::new(dec), Some(base)));
    }
    Ok((Box::new(decoder(index, kind, inner, dst_len)?), Some(base)))
}

/// An xz stream of `REPLACE` data: liblzma's memory-limit error named as
/// such, and bytes after the stream refused.
struct XzReplace<'a> {
    dec: xz2::bufread::XzDecoder<&'a [u8]>,
    len: u64,
    limit: u64,
}

impl Read for XzReplace<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.dec.read(buf).map_err(|e| {
            if e.get_ref()
                .and_then(|e| e.downcast_ref::<xz2::stream::Error>())
                .is_some_and(|e| matches!(e, xz2::stream::Error::MemLimit))
            {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "xz stream asks for more than {} bytes of decoder memory \
                         (its destination allows a dictionary of at most its size)",
                        self.limit
                    ),
                )
            } else {
                e
            }
        })?;
        if n == 0 && !buf.is_empty() && self.dec.total_in() != self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} bytes after the xz stream",
                    self.len - self.dec.total_in()
                ),
            ));
        }
        Ok(n)
    }
}

/// A streaming decoder for a `REPLACE` frame of a `dst_len`-byte
/// destination, whose window (the memory it allocates) is at most the
/// destination: a frame that declares more content is refused before
/// decoding, and one that declares none may use a window of at most the
/// destination rounded up to a power of two (the generator's frames declare
/// their size, and their window is then their content).
fn decoder<'a>(
    index: usize,
    kind: &'static str,
    data: &'a [u8],
    dst_len: u64,
) -> Result<zstd::stream::read::Decoder<'a, &'a [u8]>, ApplyError> {
    let refuse = |reason: String| ApplyError::Decode {
        op: index,
        kind,
        reason,
    };
    let window_log = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) if n > dst_len => {
            return Err(refuse(format!(
                "the frame declares {n} bytes, destination is {dst_len}"
            )));
        }
        // Never let a frame header make the decoder allocate more than the format allows.
        Ok(Some(_)) => 23,
        _ => dst_len
            .max(1 << 10)
            .next_power_of_two()
            .trailing_zeros()
            .min(23),
    };
    let mut dec = zstd::stream::read::Decoder::with_buffer(data)
        .map_err(io_err("creating a zstd decoder"))?;
    dec.window_log_max(window_log)
        .map_err(|e| refuse(e.to_string()))?;
    Ok(dec)
}

fn check_output(
    index: usize,
    op: &Operation,
    actual: Digest,
    hint: &'static str,
) -> Result<(), ApplyError> {
    if actual != op.dst_sha256 {
        return Err(ApplyError::OutputHash {
            op: index,
            kind: op.kind.name(),
            expected: op.dst_sha256,
            actual,
            hint,
        });
    }
    Ok(())
}

/// Whether the destination extent of `op` already holds its expected output.
/// A resumed agent calls this for every operation its (untrusted) progress
/// record claims done.
pub fn verify_operation_output<D: ReadAt + ?Sized>(op: &Operation, dest: &D) -> io::Result<bool> {
    Ok(hash_range(dest, op.dst.offset, op.dst.length)? == op.dst_sha256)
}

/// SHA-256 of a byte range, streamed.
pub fn hash_range<R: ReadAt + ?Sized>(src: &R, offset: u64, len: u64) -> io::Result<Digest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (1 << 20).min(len as usize).max(1)];
    for_each_piece(src, offset, len, &mut buf, |p, _| {
        h.update(p);
        Ok(())
    })?;
    Ok(h.into())
}

/// Checks that `source` (of `len` bytes) is the image the manifest's delta
/// applies to. Reads it whole: a delta applied to the wrong base would be
/// caught per operation anyway, but failing before writing anything is kinder.
pub fn check_source<S: ReadAt + ?Sized>(
    manifest: &Manifest,
    source: &S,
    len: u64,
) -> Result<(), ApplyError> {
    let Some(from) = &manifest.from else {
        return Ok(());
    };
    if len != from.size {
        return Err(ApplyError::SourceSize {
            version: from.version.clone(),
            expected: from.size,
            actual: len,
        });
    }
    let actual = hash_range(source, 0, len).map_err(io_err("reading the source image"))?;
    if actual != from.sha256 {
        return Err(ApplyError::SourceImageHash {
            version: from.version.clone(),
            expected: from.sha256,
            actual,
        });
    }
    Ok(())
}

/// Options for [`apply_image`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// The destination is known to read as zeros (a freshly created sparse
    /// file), so `ZERO` operations need not write. Never set for a slot.
    pub dest_is_zeroed: bool,
    /// Operations applied at once by [`apply_image`] (0 or 1: one at a time).
    pub threads: usize,
    /// Memory the operations applied at once by [`apply_image`] may hold
    /// together, as [`op_memory`] counts it (0: [`APPLY_MEMORY_BUDGET`]).
    pub memory_budget: u64,
}

/// Checks the payload's size and sha256 against the manifest. Per-operation
/// data hashes already cover every payload byte; checking the whole first
/// means a wrong payload is refused before anything is written.
pub fn check_payload<P: ReadAt + ?Sized>(
    manifest: &Manifest,
    payload: &P,
    len: u64,
) -> Result<(), ApplyError> {
    if len != manifest.payload.size {
        return Err(ApplyError::PayloadSize {
            expected: manifest.payload.size,
            actual: len,
        });
    }
    let actual = hash_range(payload, 0, len).map_err(io_err("reading the payload"))?;
    if actual != manifest.payload.sha256 {
        return Err(ApplyError::PayloadHash {
            expected: manifest.payload.sha256,
            actual,
        });
    }
    Ok(())
}

/// Memory the operations applied at once may hold together, by default
/// ([`ApplyOptions::memory_budget`] 0). One operation larger than this still
/// runs, alone; the format's limits bound that case.
pub const APPLY_MEMORY_BUDGET: u64 = 16 << 20;

/// Memory an operation holds while it is applied, besides its data: an
/// upper bound the engine keeps (each allocation is sized within it), so a
/// budget of these bounds the memory of operations in flight by design.
///
/// - `COPY`, `ZERO`: one streaming buffer;
/// - `REPLACE`: the streaming buffer, the zstd decoder's window (at most
///   the frame's content, which must fit the destination) and its context;
/// - `BSDIFF`: the source window's cache (the window, up to
///   [`crate::bspatch::WINDOW_CACHE`] bytes), the output, the decoded
///   streams (at most
///   2 × the output and [`patch_streams::CTRL_SLACK`],
///   [`patch_streams::decode_bounded`]) and a zstd context.
///   An xz stream's dictionary (at most the output) and decoder state (at
///   most [`patch_streams::XZ_DCTX_BYTES`]) exist only while the streams
///   are decoded, before the output is allocated: they fit the output's and
///   the zstd context's shares.
///   A bzip2 stream's decoder is not counted here: the process holds at most
///   [`patch_streams::BZIP2_DECODERS`] of them, a constant of the bound.
///
/// The pool of the agent (`ota-agent run`) and [`apply_image`]
/// (`ota-agent apply`) both account with this.
pub fn op_work(op: &Operation) -> u64 {
    let zstd = patch_streams::ZSTD_DCTX_BYTES;
    match op.kind {
        OpKind::Bsdiff => {
            window_work(op) + 3 * op.dst.length + patch_streams::CTRL_SLACK as u64 + zstd
        }
        OpKind::Replace => STREAM_BUF as u64 + op.dst.length + zstd,
        OpKind::Copy | OpKind::Zero => STREAM_BUF as u64,
    }
}

/// Memory an operation holds while it is applied: its data and [`op_work`].
pub fn op_memory(op: &Operation) -> u64 {
    op.data.map_or(0, |d| d.length) + op_work(op)
}

/// The operations of `manifest` grouped by the data range they name, in
/// order of their first operation: operations without data, and those
/// whose data no other names, alone.
pub fn groups(manifest: &Manifest) -> Vec<Vec<usize>> {
    let mut units: Vec<Vec<usize>> = Vec::with_capacity(manifest.operations.len());
    let mut by_data: std::collections::HashMap<u64, usize> = Default::default();
    for (i, op) in manifest.operations.iter().enumerate() {
        match op.data {
            Some(d) => match by_data.entry(d.offset) {
                std::collections::hash_map::Entry::Occupied(e) => units[*e.get()].push(i),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(units.len());
                    units.push(vec![i]);
                }
            },
            None => units.push(vec![i]),
        }
    }
    units
}

/// A byte budget shared by the apply workers.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }
    /// Takes `n` more if that fits now; never waits (the caller already
    /// holds part of the budget: waiting would be hold-and-wait).
    fn try_acquire(&self, n: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if *used + n > self.limit {
            return false;
        }
        *used += n;
        true
    }
    fn release(&self, n: u64) {
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) -= n;
        self.freed.notify_all();
    }
}

/// Applies every operation, reading each one's data from `payload` at its
/// offset (operations may share data), then verifies the destination image
/// digest.
///
/// Operations are independent, so up to `opts.threads` of them are applied
/// at once, within `opts.memory_budget` as [`op_memory`] counts it (a single
/// larger operation runs alone). The first failure stops the others; the error reported is the
/// failing operation with the lowest index.
///
/// The caller has verified the manifest's envelope and checked the payload
/// with [`check_payload`] and the source with [`check_source`] (or does so
/// alongside: an operation's output is verified whatever the source). `progress` is called with the target
/// bytes done.
pub fn apply_image<P: ReadAt + ?Sized, S: ReadAt + ?Sized, D: WriteAt + ReadAt + ?Sized>(
    manifest: &Manifest,
    payload: &P,
    source: Option<&S>,
    dest: &D,
    opts: ApplyOptions,
    progress: impl Fn(u64) + Sync,
) -> Result<(), ApplyError> {
    let _span =
        tracing::info_span!("apply", to = %manifest.to.version, ops = manifest.operations.len())
            .entered();
    let ops = &manifest.operations;
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<(usize, ApplyError)>> = Mutex::new(None);
    let budget = Budget {
        limit: match opts.memory_budget {
            0 => APPLY_MEMORY_BUDGET,
            n => n,
        },
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    // Units of work: the operations that name one data range (applied
    // together, a compression frame decoded once), and each other one.
    let units = groups(manifest);
    // A frame's members side by side, within the threads asked for.
    let frame_threads = opts.threads.clamp(1, FRAME_THREADS);
    let worker = || {
        let mut data = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let u = next.fetch_add(1, Ordering::Relaxed);
            let Some(unit) = units.get(u) else { break };
            let first = unit[0];
            let data_len = ops[first].data.map_or(0, |d| d.length);
            let need = data_len + group_work(manifest, unit);
            budget.acquire(need);
            let held = std::cell::Cell::new(need);
            let plan = std::cell::Cell::new(FramePlan::ONE);
            let r = (|| {
                data.clear();
                if let Some(d) = &ops[first].data {
                    data.resize(d.length as usize, 0);
                    payload
                        .read_exact_at(&mut data, d.offset)
                        .map_err(io_err(format!("reading the data of operation {first}")))?;
                    // A frame's header says what it needs: the fastest plan
                    // that fits what is held (or can be added without
                    // waiting); the rest of the reservation goes back to
                    // the other workers.
                    let plans: Vec<_> = frame_plans(manifest, unit, &data, frame_threads)
                        .into_iter()
                        .map(|(p, w)| (p, data_len + w))
                        .collect();
                    let (chosen, keep) =
                        choose_frame_plan(&plans, held.get(), budget.limit, |more| {
                            budget.try_acquire(more)
                        });
                    plan.set(chosen);
                    if plans.len() > 1 {
                        tracing::debug!(
                            op = first,
                            members = unit.len(),
                            threads = chosen.threads,
                            streamed = chosen.streamed,
                            bytes = keep,
                            "frame plan"
                        );
                    }
                    if keep > held.get() {
                        held.set(keep);
                    } else {
                        budget.release(held.get() - keep);
                        held.set(keep);
                    }
                }
                apply_group_inner(
                    manifest,
                    unit,
                    unit,
                    &data,
                    source,
                    dest,
                    opts,
                    plan.get(),
                    |i| {
                        let n = ops[i].dst.length;
                        progress(done.fetch_add(n, Ordering::Relaxed) + n)
                    },
                )
            })();
            data = Vec::new();
            budget.release(held.get());
            if let Err(e) = r {
                stop.store(true, Ordering::Relaxed);
                let i = match &e {
                    ApplyError::DataHash { op, .. }
                    | ApplyError::DataLength { op, .. }
                    | ApplyError::SourceHash { op, .. }
                    | ApplyError::OutputHash { op, .. }
                    | ApplyError::Decode { op, .. }
                    | ApplyError::NoSource { op, .. }
                    | ApplyError::Limits { op, .. } => *op,
                    _ => first,
                };
                let mut first_err = first_error.lock().unwrap_or_else(|e| e.into_inner());
                if first_err.as_ref().is_none_or(|(j, _)| i < *j) {
                    *first_err = Some((i, e));
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..opts.threads.max(1) {
            s.spawn(worker);
        }
        worker();
    });
    if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let actual =
        hash_range(dest, 0, manifest.to.size).map_err(io_err("reading back the written image"))?;
    if actual != manifest.to.sha256 {
        return Err(ApplyError::TargetHash {
            expected: manifest.to.sha256,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ota_format::Extent;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>);
    impl WriteAt for Mem {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut v = self.0.lock().unwrap();
            let end = offset as usize + buf.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
    }

    fn copy_op(dst: Extent, src: Vec<Extent>) -> Operation {
        Operation {
            kind: OpKind::Copy,
            dst,
            src,
            src_sha256: None,
            data: None,
            dst_sha256: Digest::of(b""),
        }
    }

    fn replace_op(offset: u64, chunk: &[u8], data: &[u8]) -> Operation {
        Operation {
            kind: OpKind::Replace,
            dst: Extent::new(offset, chunk.len() as u64),
            src: vec![],
            src_sha256: None,
            data: Some(ota_format::DataRange {
                offset: 0,
                length: data.len() as u64,
                sha256: Digest::of(data),
            }),
            dst_sha256: Digest::of(chunk),
        }
    }

    fn apply_replace(offset: u64, chunk: &[u8], data: &[u8]) -> Result<Vec<u8>, ApplyError> {
        let dest = Mem(Mutex::new(vec![]));
        let op = replace_op(offset, chunk, data);
        apply_operation(0, &op, data, None::<&[u8]>, &dest)?;
        Ok(dest.0.into_inner().unwrap()[offset as usize..].to_vec())
    }

    fn a64(base: u64, inner: &[u8]) -> Vec<u8> {
        let mut out = crate::arm64::MAGIC.to_vec();
        patch_streams::put_varint(&mut out, base);
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn arm64_replace_data_applies_byte_exactly_streaming() {
        // Longer than the streaming buffer, a length and a base that are not
        // multiples of 4: reads cut words, which wait for their rest.
        for (offset, base, len) in [
            (0x2000u64, 0x2000u64, 600_003usize),
            (4096, 0x1002, 300_001),
            (0, 0, 3),
            (0, 1, 1),
            (8192, 8192, STREAM_BUF + 4),
        ] {
            let chunk = crate::arm64::synthetic_code(len.div_ceil(4), base, 5)[..len].to_vec();
            let mut t = chunk.clone();
            crate::arm64::encode(&mut t, base);
            for xz in [true, false] {
                let data = patch_streams::replace_arm64(&t, base, 3, xz).unwrap();
                assert_eq!(
                    apply_replace(offset, &chunk, &data).unwrap(),
                    chunk,
                    "{offset} {base} {len} xz {xz}"
                );
            }
        }
        // Where the transform pays, the data is smaller than plain zstd.
        let chunk = crate::arm64::synthetic_code(200_000, 1 << 20, 3);
        let mut t = chunk.clone();
        crate::arm64::encode(&mut t, 1 << 20);
        let a = patch_streams::replace_arm64(&t, 1 << 20, 19, false).unwrap();
        let plain = zstd::bulk::compress(&chunk, 19).unwrap();
        assert!(
            a.len() * 10 < plain.len() * 9,
            "{} {}",
            a.len(),
            plain.len()
        );
    }

    #[test]
    fn malformed_arm64_replace_data_is_refused() {
        let base = 0x10_0000u64;
        let chunk = crate::arm64::synthetic_code(20_000, base, 9);
        let mut t = chunk.clone();
        crate::arm64::encode(&mut t, base);
        let good = patch_streams::replace_arm64(&t, base, 3, true).unwrap();
        assert_eq!(apply_replace(base, &chunk, &good).unwrap(), chunk);
        let decode_err = |data: &[u8]| match apply_replace(base, &chunk, data) {
            Err(ApplyError::Decode { reason, .. }) => reason,
            r => panic!("{:?}", r.map(|_| ())),
        };
        let xz_inner = &good[crate::arm64::MAGIC.len() + 3..];
        // Truncated and malformed bases.
        assert!(decode_err(crate::arm64::MAGIC).contains("base"));
        assert!(decode_err(&[crate::arm64::MAGIC, &[0x80][..]].concat()).contains("base"));
        assert!(decode_err(&[crate::arm64::MAGIC, &[0xFF; 10][..]].concat()).contains("base"));
        // Nested, bzip2 inside, nothing inside, truncated inside, bytes
        // after the xz stream.
        assert!(decode_err(&a64(base, &a64(base, xz_inner))).contains("again"));
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        std::io::Write::write_all(&mut bz, &t).unwrap();
        decode_err(&a64(base, &bz.finish().unwrap()));
        decode_err(&a64(base, &[]));
        decode_err(&a64(base, &xz_inner[..xz_inner.len() - 9]));
        let r = decode_err(&[&good[..], &[0u8; 5][..]].concat());
        assert!(
            r.contains("after the xz stream") || r.contains("corrupt"),
            "{r}"
        );
        // An xz stream asking for a larger dictionary than the destination.
        let mut o = xz2::stream::LzmaOptions::new_preset(6).unwrap();
        o.dict_size(8 << 20);
        let mut f = xz2::stream::Filters::new();
        f.lzma2(&o);
        let st = xz2::stream::Stream::new_stream_encoder(&f, xz2::stream::Check::None).unwrap();
        let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), st);
        std::io::Write::write_all(&mut e, &t).unwrap();
        let big = a64(base, &e.finish().unwrap());
        assert!(decode_err(&big).contains("decoder memory"));
        // A zstd frame declaring more than the destination.
        let mut more = t.clone();
        more.push(0);
        decode_err(&a64(base, &zstd::bulk::compress(&more, 3).unwrap()));
        // A wrong base: other bytes, refused by the output hash.
        let wrong = a64(base + 4096, xz_inner);
        assert!(matches!(
            apply_replace(base, &chunk, &wrong),
            Err(ApplyError::OutputHash { .. })
        ));
        // Every truncation is an error.
        for cut in (0..good.len()).step_by(53) {
            assert!(apply_replace(base, &chunk, &good[..cut]).is_err(), "{cut}");
        }
    }

    // Found by the apply_op fuzz target (fuzz/regressions/apply_op-unvalidated-copy-empty-dst-hang):
    // an operation that bypassed validation looped forever on 0-byte pieces.
    #[test]
    fn unvalidated_copy_with_empty_dst_is_refused_not_a_hang() {
        let src = vec![1u8; 4096];
        let dest = Mem(Mutex::new(vec![0; 4096]));
        let op = copy_op(Extent::new(0, 0), vec![Extent::new(0, 100)]);
        let r = apply_operation(0, &op, &[], Some(src.as_slice()), &dest);
        assert!(matches!(r, Err(ApplyError::Limits { .. })), "{r:?}");
    }

    // Found by the same fuzz target (apply_op-unvalidated-copy-no-src-ok): a COPY
    // with no source extents returned Ok without writing its destination.
    #[test]
    fn unvalidated_copy_without_source_extents_is_refused() {
        let src = vec![1u8; 4096];
        let dest = Mem(Mutex::new(vec![0; 4096]));
        let op = copy_op(Extent::new(0, 256), vec![]);
        let r = apply_operation(0, &op, &[], Some(src.as_slice()), &dest);
        assert!(matches!(r, Err(ApplyError::Limits { .. })), "{r:?}");
        // And one whose source is longer than its destination cannot write past it.
        let op = copy_op(Extent::new(0, 256), vec![Extent::new(0, 1024)]);
        assert!(apply_operation(0, &op, &[], Some(src.as_slice()), &dest).is_err());
        assert!(
            dest.0.lock().unwrap().len() == 4096
                && dest.0.lock().unwrap()[256..].iter().all(|&b| b == 0)
        );
    }

    /// A source that counts the bytes read from it.
    struct Counted {
        bytes: Vec<u8>,
        read: AtomicU64,
    }
    impl ReadAt for Counted {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.bytes.as_slice().read_exact_at(buf, offset)
        }
    }

    /// A `BSDIFF` operation from a 1 MiB window at offset 4096 of its
    /// source (4 × the cache) to a changed copy of it, and that source.
    fn bsdiff_case() -> (Operation, Vec<u8>, Counted, Vec<u8>) {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let old: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8 & 0x3f
            })
            .collect();
        let mut new = old.clone();
        for i in (0..new.len()).step_by(997) {
            new[i] = new[i].wrapping_add(3);
        }
        new[300_000..300_400].fill(0xaa);
        let mut patch = Vec::new();
        bsdiff::diff(&old, &new, &mut patch).unwrap();
        let streams = patch_streams::split(&patch).unwrap();
        let (data, _) = patch_streams::compress(&streams, 3, None).unwrap();
        let mut source = vec![7u8; 4096];
        source.extend_from_slice(&old);
        source.extend_from_slice(&[9u8; 4096]);
        let op = Operation {
            kind: OpKind::Bsdiff,
            dst: Extent::new(0, new.len() as u64),
            src: vec![Extent::new(4096, old.len() as u64)],
            src_sha256: Some(Digest::of(&old)),
            data: Some(ota_format::DataRange {
                offset: 0,
                length: data.len() as u64,
                sha256: Digest::of(&data),
            }),
            dst_sha256: Digest::of(&new),
        };
        let source = Counted {
            bytes: source,
            read: AtomicU64::new(0),
        };
        (op, data, source, new)
    }

    // The window was hashed in one pass and then read again to patch: two
    // reads of windows about 4 × the output, for what the output's digest
    // checks anyway.
    #[test]
    fn bsdiff_reads_its_window_once_when_its_output_verifies() {
        let (op, data, source, new) = bsdiff_case();
        let dest = Mem(Mutex::new(vec![]));
        apply_operation(0, &op, &data, Some(&source), &dest).unwrap();
        assert!(*dest.0.lock().unwrap() == new);
        let read = source.read.load(Ordering::Relaxed);
        let window = op.src_len();
        assert!(
            read <= window + (64 << 10),
            "read {read} bytes of a {window}-byte window"
        );
    }

    #[test]
    fn bsdiff_over_a_changed_source_window_is_a_source_error_and_writes_nothing() {
        let (op, data, mut source, _) = bsdiff_case();
        for i in (4096..4096 + (1 << 20)).step_by(4099) {
            source.bytes[i] ^= 0x40;
        }
        let dest = Mem(Mutex::new(vec![]));
        let r = apply_operation(0, &op, &data, Some(&source), &dest);
        assert!(
            matches!(&r, Err(ApplyError::SourceHash { op: 0, expected, .. }) if Some(*expected) == op.src_sha256),
            "{r:?}"
        );
        assert!(dest.0.lock().unwrap().is_empty());
    }

    #[test]
    fn bsdiff_whose_output_differs_over_the_right_window_is_an_output_error_and_writes_nothing() {
        let (mut op, data, source, _) = bsdiff_case();
        op.dst_sha256 = Digest::of(b"another output");
        let dest = Mem(Mutex::new(vec![]));
        let r = apply_operation(0, &op, &data, Some(&source), &dest);
        assert!(
            matches!(r, Err(ApplyError::OutputHash { op: 0, .. })),
            "{r:?}"
        );
        assert!(dest.0.lock().unwrap().is_empty());
    }
}
