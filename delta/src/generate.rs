//! The delta generator.
//!
//! # How it finds where content went
//!
//! Filesystem images move blocks between versions, and binaries shift code by
//! arbitrary amounts, so comparing the same offsets is not enough. Two
//! indexes over the source are built in one streaming pass:
//!
//! 1. a **block index**: xxh3 of every non-zero, 4 KiB-aligned source block.
//!    Target blocks found there (and byte-compared) become `COPY` runs: this is
//!    what finds files that an image rebuild merely relocated.
//! 2. an **anchor index**: content-defined samples of a rolling hash over
//!    32-byte windows. The same content is sampled at the same place in source
//!    and target whatever its offset, so the anchors of a changed target chunk
//!    vote for the source regions it came from. Those regions (not a
//!    same-offset window) are the `BSDIFF` source extents.
//!
//! Zero blocks are neither indexed nor diffed: they become `ZERO` runs, and
//! each bsdiff window is kept to a few MiB, so that the match search (see
//! [`crate::suffix_diff`]: bsdiff's algorithm over a libsais suffix array)
//! never meets the whole-image inputs where plain bsdiff runs for hours.
//!
//! # Memory bound
//!
//! `16 B × source_size / 4 KiB` (block index) + at most [`MAX_ANCHORS`] × 16 B
//! (64 MiB anchor index) + `16 B × target_size / 4 KiB` (block classes) + per
//! worker thread about `6 × window + 3 × chunk` (the window, its 4-byte
//! suffix array and 1-byte substring filter, the chunk and its diff and
//! extra streams) plus a zstd
//! level-19 context, and one batch of compressed outputs. For a 4 GiB image
//! pair at the defaults this is about 300 MiB whatever the content (the
//! `bsdiff` crate's qsufsort needed `17 × window` per thread: 48 MiB more
//! per thread at the default 4 MiB window); nothing holds a whole image.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::atomic::Ordering;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ota_format::limits::{MAX_BSDIFF_WINDOW, MAX_BUFFERED_DST, MAX_SRC_EXTENTS};
use ota_format::manifest::FORMAT_VERSION;
use ota_format::{DataRange, Digest, Extent, ImageRef, Manifest, OpKind, Operation, PayloadInfo};
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};
use xxhash_rust::xxh3::xxh3_64;

use crate::apply::hash_range;
use crate::io::ReadAt;
use crate::patch_streams;
pub use crate::progress::{Phase, Progress};
use crate::suffix_diff;

/// Block size of the block index and of run detection. ext4, and most
/// filesystems on flash, allocate in 4 KiB blocks.
pub const BLOCK: u64 = 4096;

/// Rolling hash window of the anchor index.
const ANCHOR_W: usize = 32;

/// Most anchors kept for the source: bounds the anchor index to 64 MiB for
/// any source size by sampling more sparsely on larger sources.
pub const MAX_ANCHORS: u64 = 4 << 20;

/// An anchor value seen more often than this in the source says nothing about
/// where a chunk came from (padding, tables) and is dropped.
const MAX_ANCHOR_REPEATS: usize = 4;

/// Runs of moved or zero blocks shorter than this (256 KiB) are diffed with
/// their neighbours instead of becoming operations of their own: an operation
/// costs about 200 manifest bytes, while bsdiff spends a few bytes on a block
/// it finds in its window, and the moved blocks' known source locations are
/// put in that window first.
const MIN_RUN_BLOCKS: u64 = 64;

/// Duplicated new content shorter than this (16 KiB) is diffed with its
/// neighbours rather than mirrored.
const MIN_DUP_BLOCKS: u64 = 4;

/// Largest `COPY` or `ZERO` operation: bounds the work redone when an agent
/// resumes a partly written operation.
const MAX_STREAM_OP: u64 = 16 << 20;

/// Read size of the streaming passes.
const SCAN_BUF: u64 = 8 << 20;

/// How a delta is built.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Target bytes per changed chunk (`REPLACE`/`BSDIFF`). Larger chunks
    /// compress a little better; smaller ones resume and parallelise better.
    /// A multiple of 4 KiB, at most [`MAX_BUFFERED_DST`].
    pub chunk_size: u64,
    /// zstd level for `REPLACE` data and bsdiff patches.
    pub zstd_level: i32,
    /// Also try xz (LZMA2) for each stream of a bsdiff patch, keeping it
    /// where smaller. The manifest then lists the `xz` codec, which agents
    /// older than it cannot apply: the server builds a payload without it
    /// for them (the full image is built without xz).
    pub xz: bool,
    /// With `xz`, also try zero-run coding each bsdiff diff stream
    /// (`patch_streams::compress_with`), keeping it where smaller: 1–4 %
    /// smaller diff streams of binaries than xz on the raw stream, for a
    /// fraction of its CPU. The manifest then also lists the `zero-runs`
    /// codec, which agents older than it (including those that decode xz)
    /// cannot apply.
    pub zero_runs: bool,
    /// With `xz`, also try the arm64 transform (`crate::arm64`: AArch64 BL
    /// and ADRP immediates made absolute) on `REPLACE` data (then xz) and
    /// on bsdiff extra streams, keeping it where smaller: new AArch64 code
    /// compresses 8–20 % smaller. The manifest then also lists the `arm64`
    /// codec, which agents older than it cannot apply. Callers building a
    /// full image (no source) leave it off: a full image is what agents
    /// that decode none of the newer codecs get.
    pub arm64: bool,
    /// With `xz`, store the `BSDIFF` operations' data in compression frames
    /// (`patch_streams::encode_frame`): consecutive `BSDIFF` operations
    /// share one data range, whose control, diff and extra streams are each
    /// one stream across the frame, so compression keeps its context from
    /// one operation to the next (5–6 % smaller `BSDIFF` data on
    /// filesystem images). The manifest then also lists the `frames`
    /// codec, which agents older than it cannot apply. A resumed or retried
    /// operation refetches its frame (at most [`FRAME_MEMBERS`] operations'
    /// data).
    pub frames: bool,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// Show a progress bar on stderr when it is a terminal.
    pub progress: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            chunk_size: 1 << 20,
            zstd_level: 19,
            xz: true,
            zero_runs: true,
            arm64: true,
            frames: true,
            threads: 0,
            progress: true,
        }
    }
}

/// What the manifest says about the update besides its operations.
#[derive(Debug, Clone)]
pub struct DeltaSpec {
    pub device_type: String,
    /// Version of the source image; `None` builds a full image.
    pub from_version: Option<String>,
    pub to_version: String,
    pub security_counter: u64,
    /// RFC 3339 expiry, see [`Manifest::expires_at`].
    pub expires_at: String,
}

/// Why a delta could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("bad delta options: {0}")]
    Options(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("the generated manifest is invalid (a generator bug; please report it): {0}")]
    Internal(#[from] ota_format::ManifestError),
    #[error("generation cancelled")]
    Cancelled,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> GenerateError {
    let context = context.into();
    move |source| GenerateError::Io { context, source }
}

/// The terminal progress bar and the caller's [`Progress`], moved together.
struct Meter<'a> {
    bar: ProgressBar,
    sink: Option<&'a Progress>,
}

impl Meter<'_> {
    fn phase(&self, p: Phase) {
        self.bar.set_message(p.name());
        if let Some(s) = self.sink {
            s.phase.store(p as u8, Ordering::Relaxed);
        }
    }

    /// `Err(Cancelled)` once the caller asked to stop.
    fn check(&self) -> Result<(), GenerateError> {
        match self.sink {
            Some(s) if s.cancelled.load(Ordering::Relaxed) => Err(GenerateError::Cancelled),
            _ => Ok(()),
        }
    }

    fn inc(&self, n: u64) {
        self.bar.inc(n);
        if let Some(s) = self.sink {
            s.done.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Builds a delta (or, without a source, a full image) from `target`, writing
/// the payload to `payload_out` and returning the unsigned manifest.
pub fn generate<W: Write + Send>(
    spec: &DeltaSpec,
    source: Option<&File>,
    target: &File,
    payload_out: W,
    opts: &GenerateOptions,
) -> Result<Manifest, GenerateError> {
    generate_with_progress(spec, source, target, payload_out, opts, None)
}

/// [`generate`], reporting its phase and bytes processed to `progress`.
///
/// The worker threads are created by the calling thread, so they inherit its
/// scheduling priority (Linux: nice value, policy): a caller that lowered its
/// own priority gets a generation that uses idle cores without competing
/// with more urgent work (the server's builds, see `ota-server`'s releases).
pub fn generate_with_progress<W: Write + Send>(
    spec: &DeltaSpec,
    source: Option<&File>,
    target: &File,
    payload_out: W,
    opts: &GenerateOptions,
    progress: Option<&Progress>,
) -> Result<Manifest, GenerateError> {
    if opts.chunk_size == 0 || opts.chunk_size % BLOCK != 0 || opts.chunk_size > MAX_BUFFERED_DST {
        return Err(GenerateError::Options(format!(
            "chunk size {} must be a multiple of {BLOCK} between {BLOCK} and {MAX_BUFFERED_DST}",
            opts.chunk_size
        )));
    }
    if source.is_some() != spec.from_version.is_some() {
        return Err(GenerateError::Options(
            "a source image and a from-version go together".into(),
        ));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| GenerateError::Options(e.to_string()))?;
    pool.install(|| generate_inner(spec, source, target, payload_out, opts, progress))
}

fn generate_inner<W: Write>(
    spec: &DeltaSpec,
    source: Option<&File>,
    target: &File,
    payload_out: W,
    opts: &GenerateOptions,
    progress: Option<&Progress>,
) -> Result<Manifest, GenerateError> {
    let _span =
        tracing::info_span!("generate", to = %spec.to_version, from = ?spec.from_version).entered();
    let target_len = target
        .metadata()
        .map_err(io_err("reading the target image's size"))?
        .len();
    let source_len = match source {
        Some(s) => s
            .metadata()
            .map_err(io_err("reading the source image's size"))?
            .len(),
        None => 0,
    };
    let bar = Meter {
        bar: progress_bar(opts.progress, source_len + target_len * 2),
        sink: progress,
    };
    if let Some(p) = progress {
        p.total
            .store(source_len + target_len * 2, Ordering::Relaxed);
        p.done.store(0, Ordering::Relaxed);
    }

    let index = match source {
        Some(s) => {
            bar.phase(Phase::IndexingSource);
            Some(SourceIndex::build(s, source_len, &bar)?)
        }
        None => None,
    };
    bar.phase(Phase::MatchingBlocks);
    let (classes, target_sha) = classify_target(target, target_len, index.as_ref(), source, &bar)?;
    let plan = plan_operations(&classes, target_len, opts.chunk_size);
    drop(classes);
    tracing::info!(operations = plan.len(), "planned");

    bar.phase(if index.is_some() {
        Phase::Diffing
    } else {
        Phase::Compressing
    });
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, payload_out),
        hash: Sha256::new(),
        len: 0,
    };
    let mut operations: Vec<Operation> = Vec::with_capacity(plan.len());
    let used = UsedCodecs::default();
    // Compression frames: `BSDIFF` operations whose streams are kept for
    // one (never one that a mirror names: its data range is copied).
    let framing = opts.frames && opts.xz && index.is_some();
    let mirrored: std::collections::HashSet<usize> = plan
        .iter()
        .filter_map(|p| match p {
            Plan::Mirror(_, of) => Some(*of),
            _ => None,
        })
        .collect();
    let mut frames = Frames::default();
    let batch = rayon::current_num_threads() * 4;
    let mut i = 0;
    while i < plan.len() {
        // A batch holds a bounded number of diff chunks, and so a bounded
        // amount of compressed output, between parallel work and the
        // in-order payload writer.
        let mut end = i;
        let mut diffs = 0;
        bar.check()?;
        while end < plan.len() && diffs < batch {
            diffs += matches!(plan[end], Plan::Diff(..)) as usize;
            end += 1;
        }
        // The frames closed by the last batch are encoded beside this one.
        let (encoded, done): (io::Result<()>, Vec<Result<Option<Built>, GenerateError>>) =
            rayon::join(
                || frames.encode_closed(&operations, opts),
                || {
                    plan[i..end]
                        .par_iter()
                        .enumerate()
                        .map(|(k, p)| {
                            let frameable = framing && !mirrored.contains(&(i + k));
                            let r =
                                build_op(p, source, target, index.as_ref(), opts, &used, frameable);
                            bar.inc(p.dst().length);
                            r
                        })
                        .collect()
                },
            );
        encoded.map_err(io_err("compressing a frame"))?;
        frames
            .write_closed(&mut operations, &mut out, &used)
            .map_err(io_err("writing the payload"))?;
        for (k, r) in done.into_iter().enumerate() {
            let at = operations.len();
            let op = match (r?, &plan[i + k]) {
                (Some((mut op, data, member)), _) => {
                    match member {
                        Some(member) => frames.add_member(at, member, opts.zero_runs),
                        _ if op.data.is_some() && frames.busy() => frames.hold(at, data),
                        _ => {
                            if let Some(d) = &mut op.data {
                                d.offset = out.len;
                                out.write_all(&data)
                                    .map_err(io_err("writing the payload"))?;
                            }
                        }
                    }
                    op
                }
                // Same kind, source and data range as the first occurrence:
                // the payload carries those bytes once. Its data range must
                // be final: the frames before it are written first.
                (None, Plan::Mirror(dst, of)) => {
                    frames
                        .flush(&mut operations, &mut out, opts, &used)
                        .map_err(io_err("writing the payload"))?;
                    Operation {
                        dst: *dst,
                        ..operations[*of].clone()
                    }
                }
                (None, _) => unreachable!("only mirrors are built without data"),
            };
            operations.push(op);
        }
        i = end;
    }
    frames
        .flush(&mut operations, &mut out, opts, &used)
        .map_err(io_err("writing the payload"))?;
    out.inner.flush().map_err(io_err("writing the payload"))?;
    bar.bar.finish_and_clear();
    bar.phase(Phase::Done);

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        device_type: spec.device_type.clone(),
        from: match (&spec.from_version, &index) {
            (Some(v), Some(ix)) => Some(ImageRef {
                version: v.clone(),
                size: source_len,
                sha256: ix.sha256,
            }),
            _ => None,
        },
        to: ImageRef {
            version: spec.to_version.clone(),
            size: target_len,
            sha256: target_sha,
        },
        security_counter: spec.security_counter,
        expires_at: spec.expires_at.clone(),
        payload: PayloadInfo {
            size: out.len,
            sha256: out.hash.into(),
        },
        codecs: [
            (&used.xz, ota_format::manifest::CODEC_XZ),
            (&used.zero_runs, ota_format::manifest::CODEC_ZERO_RUNS),
            (&used.arm64, ota_format::manifest::CODEC_ARM64),
            (&used.frames, ota_format::manifest::CODEC_FRAMES),
        ]
        .into_iter()
        .filter(|(u, _)| u.load(Ordering::Relaxed))
        .map(|(_, c)| c.to_string())
        .collect(),
        operations,
    };
    manifest.validate()?;
    Ok(manifest)
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar
}

struct HashingWriter<W: Write> {
    inner: BufWriter<W>,
    hash: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash.update(b);
        self.len += b.len() as u64;
        self.inner.write_all(b)
    }
}

// ---------------------------------------------------------------------------
// Source index

struct SourceIndex {
    len: u64,
    sha256: Digest,
    /// (xxh3 of block, block number), sorted.
    blocks: Vec<(u64, u64)>,
    /// (rolling hash, source offset), sorted, over-frequent values removed.
    anchors: Vec<(u64, u64)>,
    /// An anchor is sampled where the top `anchor_bits` bits of the hash are 0.
    anchor_bits: u32,
}

/// Calls `f(hash, offset)` for each sampled anchor starting in
/// `buf[..starts]` (`buf` must extend `ANCHOR_W - 1` bytes past `starts`
/// where the data allows). Anchors over a constant run (zeros, 0xff padding)
/// are skipped: they match everywhere and locate nothing.
fn for_each_anchor(buf: &[u8], starts: usize, base: u64, bits: u32, mut f: impl FnMut(u64, u64)) {
    const P: u64 = 0x100_0000_01b3;
    if buf.len() < ANCHOR_W {
        return;
    }
    let last = starts.min(buf.len() - ANCHOR_W + 1);
    let pw = P.wrapping_pow(ANCHOR_W as u32);
    let mut h = 0u64;
    for &b in &buf[..ANCHOR_W] {
        h = h.wrapping_mul(P).wrapping_add(b as u64);
    }
    let shift = 64 - bits;
    for s in 0..last {
        if s > 0 {
            h = h
                .wrapping_mul(P)
                .wrapping_add(buf[s + ANCHOR_W - 1] as u64)
                .wrapping_sub((buf[s - 1] as u64).wrapping_mul(pw));
        }
        // The low bits of a polynomial hash are weak; mix before sampling.
        let k = mix(h);
        if k >> shift == 0 {
            let w = &buf[s..s + ANCHOR_W];
            if w.iter().any(|&b| b != w[0]) {
                f(k, base + s as u64);
            }
        }
    }
}

fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl SourceIndex {
    fn build(src: &File, len: u64, bar: &Meter) -> Result<Self, GenerateError> {
        let _span = tracing::info_span!("index_source", len).entered();
        // Sample about one position in 2^bits, so that at most MAX_ANCHORS
        // anchors are kept whatever the source size (and at least one per 32
        // bytes on small sources).
        let want = len / MAX_ANCHORS.max(1);
        let anchor_bits = (64 - want.leading_zeros()).max(5);
        let mut sha = Sha256::new();
        let mut blocks = Vec::with_capacity((len / BLOCK) as usize);
        let mut anchors = Vec::new();
        let mut buf = vec![0u8; (SCAN_BUF as usize) + ANCHOR_W];
        let mut pos = 0u64;
        while pos < len {
            let seg = (len - pos).min(SCAN_BUF) as usize;
            let with_tail = (len - pos).min(SCAN_BUF + ANCHOR_W as u64 - 1) as usize;
            src.read_exact_at(&mut buf[..with_tail], pos)
                .map_err(io_err("reading the source image"))?;
            sha.update(&buf[..seg]);
            for (i, b) in buf[..seg].chunks_exact(BLOCK as usize).enumerate() {
                if !is_zero(b) {
                    blocks.push((xxh3_64(b), pos / BLOCK + i as u64));
                }
            }
            for_each_anchor(&buf[..with_tail], seg, pos, anchor_bits, |k, p| {
                anchors.push((k, p))
            });
            pos += seg as u64;
            bar.inc(seg as u64);
            bar.check()?;
        }
        blocks.par_sort_unstable();
        anchors.par_sort_unstable();
        // Drop anchor values that repeat too often to locate anything.
        let mut kept = Vec::with_capacity(anchors.len());
        for group in anchors.chunk_by(|a, b| a.0 == b.0) {
            if group.len() <= MAX_ANCHOR_REPEATS {
                kept.extend_from_slice(group);
            }
        }
        kept.shrink_to_fit();
        tracing::info!(
            blocks = blocks.len(),
            anchors = kept.len(),
            anchor_bits,
            "source indexed"
        );
        Ok(SourceIndex {
            len,
            sha256: sha.into(),
            blocks,
            anchors: kept,
            anchor_bits,
        })
    }

    fn blocks_with_hash(&self, h: u64) -> impl Iterator<Item = u64> + '_ {
        let start = self.blocks.partition_point(|e| e.0 < h);
        self.blocks[start..]
            .iter()
            .take_while(move |e| e.0 == h)
            .map(|e| e.1)
    }

    fn anchors_with_hash(&self, h: u64) -> impl Iterator<Item = u64> + '_ {
        let start = self.anchors.partition_point(|e| e.0 < h);
        self.anchors[start..]
            .iter()
            .take_while(move |e| e.0 == h)
            .map(|e| e.1)
    }
}

// ---------------------------------------------------------------------------
// Target classification and planning

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Zero,
    /// Same bytes as this source block.
    Copy(u64),
    /// Not in the source, but the same bytes as this earlier target block
    /// (the first of its kind). The same new file often lands in an image
    /// twice (packages built from one source ship identical changelogs,
    /// filesystems keep backup superblocks), and a payload should carry new
    /// bytes once.
    Dup(u64),
    Changed,
}

fn classify_target(
    target: &File,
    len: u64,
    index: Option<&SourceIndex>,
    source: Option<&File>,
    bar: &Meter,
) -> Result<(Vec<Class>, Digest), GenerateError> {
    let _span = tracing::info_span!("classify_target", len).entered();
    let nblocks = len.div_ceil(BLOCK);
    let mut classes = Vec::with_capacity(nblocks as usize);
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; SCAN_BUF as usize];
    let mut cand = vec![0u8; BLOCK as usize];
    let mut prev: Option<u64> = None;
    // First occurrence of each changed block's content: (xxh3 → block).
    let mut firsts: HashMap<u64, u64> = HashMap::new();
    let mut prev_dup: Option<u64> = None;
    let mut pos = 0u64;
    while pos < len {
        let seg = (len - pos).min(SCAN_BUF) as usize;
        target
            .read_exact_at(&mut buf[..seg], pos)
            .map_err(io_err("reading the target image"))?;
        sha.update(&buf[..seg]);
        for (i, b) in buf[..seg].chunks(BLOCK as usize).enumerate() {
            let blockno = pos / BLOCK + i as u64;
            let class = if is_zero(b) {
                Class::Zero
            } else if let (Some(ix), Some(src), true) = (index, source, b.len() as u64 == BLOCK) {
                // Prefer continuing the previous run, then the same offset,
                // so that COPY source extents stay long.
                let h = xxh3_64(b);
                let mut best = None;
                for s in ix.blocks_with_hash(h) {
                    let rank = if Some(s) == prev.map(|p| p + 1) {
                        0
                    } else if s == blockno {
                        1
                    } else {
                        2
                    };
                    if best.is_none_or(|(r, _)| rank < r) {
                        src.read_exact_at(&mut cand, s * BLOCK)
                            .map_err(io_err("reading the source image"))?;
                        if cand == b {
                            best = Some((rank, s));
                            if rank == 0 {
                                break;
                            }
                        }
                    }
                }
                match best {
                    Some((_, s)) => Class::Copy(s),
                    None => Class::Changed,
                }
            } else {
                Class::Changed
            };
            let class = match class {
                Class::Changed if b.len() as u64 == BLOCK => {
                    // Prefer continuing the previous duplicate run, then any
                    // earlier first occurrence with the same bytes.
                    let h = xxh3_64(b);
                    let next = prev_dup
                        .map(|f| f + 1)
                        .filter(|&f| classes.get(f as usize) == Some(&Class::Changed));
                    let mut dup = None;
                    for f in next.into_iter().chain(firsts.get(&h).copied()) {
                        target
                            .read_exact_at(&mut cand, f * BLOCK)
                            .map_err(io_err("reading the target image"))?;
                        if cand == b {
                            dup = Some(f);
                            break;
                        }
                    }
                    match dup {
                        Some(f) => Class::Dup(f),
                        None => {
                            firsts.entry(h).or_insert(blockno);
                            Class::Changed
                        }
                    }
                }
                c => c,
            };
            prev = match class {
                Class::Copy(s) => Some(s),
                _ => None,
            };
            prev_dup = match class {
                Class::Dup(f) => Some(f),
                _ => None,
            };
            classes.push(class);
        }
        pos += seg as u64;
        bar.inc(seg as u64);
        bar.check()?;
    }
    Ok((classes, sha.into()))
}

/// One planned operation before its data is built.
#[derive(Debug, Clone)]
enum Plan {
    Zero(Extent),
    Copy(Extent, Vec<Extent>),
    /// A changed chunk, with the source blocks known to hold some of its
    /// blocks (short moved runs folded into it).
    Diff(Extent, Vec<u64>),
    /// The same content as the operation at this plan index: same kind,
    /// source and data, another destination.
    Mirror(Extent, usize),
}

impl Plan {
    fn dst(&self) -> Extent {
        match self {
            Plan::Zero(e) | Plan::Copy(e, _) | Plan::Diff(e, _) | Plan::Mirror(e, _) => *e,
        }
    }
}

fn plan_operations(classes: &[Class], len: u64, chunk: u64) -> Vec<Plan> {
    let nb = classes.len();
    let extent = |a: usize, b: usize| {
        let start = a as u64 * BLOCK;
        Extent::new(start, (b as u64 * BLOCK).min(len) - start)
    };
    let mut classes = classes.to_vec();
    // Duplicate runs long enough to pay for their operations mirror the
    // operations of their first occurrence; shorter ones are diffed.
    let mut mirrors: HashMap<usize, (usize, usize)> = HashMap::new();
    let mut forced: BTreeSet<usize> = BTreeSet::new();
    let mut i = 0;
    while i < nb {
        let Class::Dup(f) = classes[i] else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < nb && classes[j] == Class::Dup(f + (j - i) as u64) {
            j += 1;
        }
        if (j - i) as u64 >= MIN_DUP_BLOCKS {
            mirrors.insert(i, (f as usize, j - i));
            forced.insert(f as usize);
            forced.insert(f as usize + (j - i));
        } else {
            classes[i..j].fill(Class::Changed);
        }
        i = j;
    }
    let run_end = |i: usize| {
        let kind = std::mem::discriminant(&classes[i]);
        let mut j = i + 1;
        while j < nb && std::mem::discriminant(&classes[j]) == kind {
            j += 1;
        }
        j
    };

    let mut plan: Vec<Plan> = Vec::new();
    // Cuts a changed region into chunks: first at the boundaries of
    // duplicated content (so that its copies can mirror whole operations),
    // then into equal block-aligned chunks of at most `chunk` bytes.
    let flush = |plan: &mut Vec<Plan>, start: usize, end: usize| {
        let mut cuts: Vec<usize> = forced.range(start + 1..end).copied().collect();
        cuts.push(end);
        let mut a = start;
        for b in cuts {
            let region = extent(a, b);
            let n = region.length.div_ceil(chunk);
            let per = region.length.div_ceil(n).div_ceil(BLOCK) * BLOCK;
            let mut off = region.offset;
            while off < region.end() {
                let l = per.min(region.end() - off);
                let (x, y) = ((off / BLOCK) as usize, (off + l).div_ceil(BLOCK) as usize);
                let known = classes[x..y]
                    .iter()
                    .filter_map(|c| {
                        if let Class::Copy(s) = c {
                            Some(*s)
                        } else {
                            None
                        }
                    })
                    .collect();
                plan.push(Plan::Diff(Extent::new(off, l), known));
                off += l;
            }
            a = b;
        }
    };
    let mut region: Option<usize> = None;
    let mut i = 0;
    while i < nb {
        let j = run_end(i);
        match classes[i] {
            Class::Dup(_) => {
                if let Some(s) = region.take() {
                    flush(&mut plan, s, i);
                }
                let (a, n) = mirrors[&i];
                // The first occurrence lies earlier and was cut at a and
                // a + n, so whole operations cover it.
                let first = plan.partition_point(|p| p.dst().offset < a as u64 * BLOCK);
                let mut k = first;
                while k < plan.len() && plan[k].dst().end() <= (a + n) as u64 * BLOCK {
                    let d = plan[k].dst();
                    let shifted =
                        Extent::new(d.offset - a as u64 * BLOCK + i as u64 * BLOCK, d.length);
                    plan.push(Plan::Mirror(shifted, k));
                    k += 1;
                }
                i += n;
                continue;
            }
            Class::Zero | Class::Copy(_) if (j - i) as u64 >= MIN_RUN_BLOCKS => {
                if let Some(s) = region.take() {
                    flush(&mut plan, s, i);
                }
                push_stream_ops(&mut plan, &classes[i..j], i, extent);
            }
            _ => {
                region.get_or_insert(i);
            }
        }
        i = j;
    }
    if let Some(s) = region {
        flush(&mut plan, s, nb);
    }
    plan
}

/// `ZERO` or `COPY` operations for a run of zero or moved blocks starting at
/// block `first`, each at most [`MAX_STREAM_OP`] bytes and
/// [`MAX_SRC_EXTENTS`] extents.
fn push_stream_ops(
    plan: &mut Vec<Plan>,
    run: &[Class],
    first: usize,
    extent: impl Fn(usize, usize) -> Extent,
) {
    let max = (MAX_STREAM_OP / BLOCK) as usize;
    let mut a = 0;
    while a < run.len() {
        if run[0] == Class::Zero {
            let b = run.len().min(a + max);
            plan.push(Plan::Zero(extent(first + a, first + b)));
            a = b;
            continue;
        }
        let mut src: Vec<Extent> = Vec::new();
        let mut b = a;
        while b < run.len() && b - a < max {
            let Class::Copy(s) = run[b] else {
                unreachable!("a run has one class")
            };
            let full = src.len() == MAX_SRC_EXTENTS;
            match src.last_mut() {
                Some(e) if e.end() == s * BLOCK => e.length += BLOCK,
                _ if full => break,
                _ => src.push(Extent::new(s * BLOCK, BLOCK)),
            }
            b += 1;
        }
        plan.push(Plan::Copy(extent(first + a, first + b), src));
        a = b;
    }
}

// ---------------------------------------------------------------------------
// Building one operation

/// An operation and its data, before the data's payload offset is known;
/// for a `BSDIFF` operation that may join a compression frame, its streams
/// instead ([`Member`]: its data is made with its frame).
type Built = (Operation, Vec<u8>, Option<Member>);

/// A `BSDIFF` operation's streams, waiting for its frame, and the estimate
/// of its data compressed alone that chose `BSDIFF` for it
/// ([`FRAME_EST_NUM`]).
struct Member {
    streams: [Vec<u8>; 3],
    estimate: usize,
    /// Its diff stream's size in bzip2 where that was the smaller estimate
    /// ([`patch_streams::Estimate::bzip2_diff`]): a frame may code it worse
    /// than the member alone does (see [`Encoded::Frame`]).
    bzip2_diff: Option<usize>,
}

/// An operation that may join a frame is not compressed alone in full (its
/// frame is compressed instead): `BSDIFF` or `REPLACE` is chosen with its
/// patch estimated as its preset-1 xz probe × `FRAME_EST_NUM /
/// FRAME_EST_DEN`, its diff stream's as bzip2 where smaller
/// ([`patch_streams::estimate_len`]: without it, frames of containerd's
/// Go code were taken against xz estimates while bzip2 alone was 12 %
/// smaller). The probe was 1.06–1.22 × what the
/// full compression made of the streams (exe-large and ruff-arm64, see
/// [`PROBE_SKIP_NUM`]), and a frame makes them 2–6 % smaller still.
///
/// Why: compressing each operation in full (bzip2, zstd, xz's searches and
/// probes) and then its frame again cost ruff-arm64 52 % more generation
/// CPU than without frames.
const FRAME_EST_NUM: usize = 7;
/// See [`FRAME_EST_NUM`].
const FRAME_EST_DEN: usize = 8;

/// A frame of at most `FRAME_SURE_NUM / FRAME_SURE_DEN` × its members'
/// estimates is taken without compressing the members alone in full to
/// compare; otherwise they are, and the smaller is written.
///
/// Why 1: on binaries a frame gains 1–2 % (its members' code shares little
/// context), about the estimate's own error, and at 0.95 nearly every frame
/// of ruff-arm64 was compared with its members compressed alone: both
/// compressions, 37 % more generation CPU than without frames.
///
/// Why 1.01 rather than 1: every frame of the ten benchmark pairs compared
/// in full (49 frames, Dec 4; `frame against its …` debug events): the
/// members alone were 0.88–1.63 × their estimate, so a frame just over its
/// estimate was usually still the smaller. The 4 frames at 1.00–1.01 × all
/// were (by 1.2–5 %: ruff-arm64's second, realloc's third, two of
/// upgrade-large's), and comparing ruff's cost 1.8 CPU s, half of what
/// frames added to its generation. The first frame over 1.01 that lost to
/// its members was at 1.014 × (containerd: bzip2, which a frame cannot
/// use, was 3 % smaller on its Go pointer tables). Frames under their
/// estimate can lose too (two of rootfs's, by 0.5 and 0.8 %, 8.9 KB in
/// all): comparing every frame with its members alone to find those cost
/// more than they save on binaries. What those frames lost was bzip2-friendly
/// members forced into LZMA2; [`FRAME_SPLIT_MIN`] finds them without that
/// comparison and leaves those members out.
const FRAME_SURE_NUM: usize = 101;
/// See [`FRAME_SURE_NUM`].
const FRAME_SURE_DEN: usize = 100;

/// A whole frame taken on its estimate ([`FRAME_SURE_NUM`]) is still
/// compared with a frame of its other members and those left out alone
/// ([`Encoded::Frame`]) where at least `FRAME_SPLIT_MIN` members' diff
/// streams were estimated smaller in bzip2 and the frame is over
/// `FRAME_SPLIT_NUM / FRAME_SPLIT_DEN` × its estimate (it gained little
/// from its shared context).
///
/// Why (Dec 5, `ota-server delta`, the frames of the ten pairs): the split
/// won by 0.2–2.1 % on frames at 0.924–0.995 × their estimate with 5–23
/// such members (`rootfs`'s first and third, `upgrade-large`'s first and
/// two more: 31 KB in all); never at 0.89 × or less, where the whole
/// frame's context paid; and the frames with 1 or 2 such members gained
/// nothing. Trying it on every frame with such a member added 11 % of
/// `ruff-arm64`'s generation CPU (one frame of 32 with two) for no byte.
/// Nor where the whole frame is not sure (its members are then compressed
/// alone and compared with it): there the split won 328 and 90 bytes
/// (`rootfs`, `containerd`) and its bzip2-against-LZMA2 tests cost
/// containerd 13 % more generation CPU, 2.08 × HDiffPatch's (bench run
/// Dec 5 00:10).
const FRAME_SPLIT_MIN: usize = 4;
/// See [`FRAME_SPLIT_MIN`].
const FRAME_SPLIT_NUM: usize = 92;
/// See [`FRAME_SPLIT_MIN`].
const FRAME_SPLIT_DEN: usize = 100;

/// `frameable`: a `BSDIFF` operation may join a compression frame (see
/// [`Member`]).
fn build_op(
    plan: &Plan,
    source: Option<&File>,
    target: &File,
    index: Option<&SourceIndex>,
    opts: &GenerateOptions,
    used: &UsedCodecs,
    frameable: bool,
) -> Result<Option<Built>, GenerateError> {
    if let Plan::Mirror(..) = plan {
        // Filled in from the first occurrence by the in-order writer.
        return Ok(None);
    }
    build_data_op(plan, source, target, index, opts, used, frameable).map(Some)
}

/// The extension rules tried for each `BSDIFF` patch besides bsdiff's own
/// ([`suffix_diff::EXTEND_HALF`]): a match also extends over stretches
/// where only a quarter, an eighth or a sixteenth of the bytes agree. The
/// smallest in zstd-3 is taken where under `LOOSE_NUM / LOOSE_DEN` × the
/// streams under bsdiff's rule ([`bsdiff_streams`]).
///
/// Why: HDiffPatch, given exactly our windows as its old file, made 2–9 %
/// smaller patches than ours of the rootfs pair's largest operations (the
/// window is not what loses: with the whole old image it made the same).
/// Where new and old differ in many bytes but systematically (tables of
/// block numbers, checksummed records, shifted pointers), the differences
/// are a repetitive diff stream while bsdiff's rule, stopping where fewer
/// than half the bytes agree, sends them to the extra stream as new bytes.
/// A quarter for every patch: rootfs −1.0 %, but exe-large +1.8 %,
/// upgrade-large +7.7 % (Dec 4, `ota-server delta`, the ten benchmark
/// pairs). Per patch, the smaller of the two by zstd-3 (the search runs
/// once; only the linear extension and zstd-3 passes are added,
/// generation CPU within noise): rootfs −1.25 %, libcrypto −0.9 %,
/// compressed −0.3 %, ruff −0.3 %, but sec-small +0.5 % and realloc
/// +0.4 % where zstd-3 misjudged what xz makes of the streams; with the
/// 0.97 margin rootfs −1.0 %, libcrypto −0.9 %, sec-small and realloc
/// unchanged, upgrade-large +0.13 %. An eighth and a sixteenth as well:
/// rootfs −0.27 % more, compressed −205 B, upgrade-large +1.3 KB, the other
/// seven byte for byte the same. Choosing by the xz probe instead judged
/// better but cost up to 19 % more CPU (compressed), against the
/// 2 × HDiffPatch generation bound.
const EXTEND_LOOSE: [suffix_diff::Extend; 3] = [
    suffix_diff::Extend { num: 1, den: 4 },
    suffix_diff::Extend { num: 1, den: 8 },
    suffix_diff::Extend { num: 1, den: 16 },
];
/// See [`EXTEND_LOOSE`].
const LOOSE_NUM: usize = 97;
/// See [`EXTEND_LOOSE`].
const LOOSE_DEN: usize = 100;

/// The bsdiff streams of `chunk` against `old` (stored layout,
/// [`patch_streams::from_streams`]) under bsdiff's own extension rule or,
/// where clearly smaller, one of [`EXTEND_LOOSE`].
fn bsdiff_streams(old: &[u8], chunk: &[u8]) -> Result<[Vec<u8>; 3], GenerateError> {
    // One rule's streams at a time: at most two (the best so far and a
    // candidate) are held, each about the chunk's size.
    let search = suffix_diff::Search::new(old, chunk);
    let zstd3 = |st: &[Vec<u8>; 3]| -> Result<usize, GenerateError> {
        let mut n = 0;
        for x in st {
            n += zstd::bulk::compress(x, 3)
                .map_err(io_err("compressing with zstd"))?
                .len();
        }
        Ok(n)
    };
    let half = patch_streams::from_streams(search.streams(suffix_diff::EXTEND_HALF));
    // (the size a looser rule's streams must get under, the streams)
    let mut best = (zstd3(&half)? * LOOSE_NUM / LOOSE_DEN, half);
    for &rule in &EXTEND_LOOSE {
        let loose = patch_streams::from_streams(search.streams(rule));
        if loose == best.1 {
            continue;
        }
        let n = zstd3(&loose)?;
        if n < best.0 {
            best = (n, loose);
        }
    }
    Ok(best.1)
}

/// Most operations in one compression frame (the format allows
/// [`ota_format::limits::MAX_FRAME_MEMBERS`]); a frame also stops at
/// [`ota_format::limits::MAX_FRAME_DECODED`] decoded bytes.
///
/// Why 32 (`examples/shared_context.rs --frames`, the streams coded as
/// stored, xz -9 per kind and frame): on `upgrade-large`'s 481 `BSDIFF`
/// operations frames of 4 saved 3.7 % of their data, of 16 5.7 %, of 64
/// 6.6 %; on `rootfs`'s 142, 32 saved 1.1 % more than 16, and 64 nothing
/// more (the 4 MiB bound ends those frames first). A resumed or retried
/// operation refetches and decodes its whole frame, so not more.
pub const FRAME_MEMBERS: usize = 32;

/// `BSDIFF` operations gathered into a compression frame, and the data of
/// the operations after its first member, which the payload carries after
/// the frame (written when the frame is: [`Frames::finish`]).
#[derive(Default)]
struct OpenFrame {
    /// Each member's operation and streams.
    members: Vec<(usize, Member)>,
    /// Decoded size so far ([`crate::frames::member_size`]).
    size: usize,
    /// (operation, data) of the operations with data after the first
    /// member that are not members.
    held: Vec<(usize, Vec<u8>)>,
    /// The frame's data once encoded, or each member's own.
    encoded: Option<Encoded>,
}

/// What a closed frame is written as.
enum Encoded {
    /// The frame and the codecs it uses, of all members but those left out
    /// with their data compressed alone: (the member's index in
    /// [`OpenFrame::members`], its data and codecs).
    ///
    /// Why leave members out: a member whose diff stream bzip2 codes better
    /// than xz's probe (sparse diffs of filesystem metadata and of Go's
    /// pointer tables) can cost a frame more than its context saves the
    /// others. `rootfs` (Dec 4, every frame compared three ways): its third
    /// frame 582,330 bytes whole, 579,563 as 32 members alone, 570,278 as a
    /// frame of the 20 others with those 12 alone; its first 758,153 whole,
    /// 752,473 so. Tried where [`FRAME_SPLIT_MIN`] says, each member
    /// left out only where bzip2 beats [`patch_streams::lzma_diff_len`] on
    /// its diff stream, and taken only where smaller.
    Frame(Vec<u8>, patch_streams::Used, Vec<(usize, Alone)>),
    /// Each member's data compressed alone, and its codecs.
    Alone(Vec<Alone>),
}

/// A member's data compressed alone, and its codecs.
type Alone = (Vec<u8>, patch_streams::Used);

/// The frames of a generation: the one gathering members, and those closed
/// but not yet encoded and written. A frame is encoded in parallel with the
/// next batch of operations; until it is written, the data of the
/// operations after it waits with it.
#[derive(Default)]
struct Frames {
    open: Option<OpenFrame>,
    closed: Vec<OpenFrame>,
}

impl Frames {
    fn busy(&self) -> bool {
        self.open.is_some() || !self.closed.is_empty()
    }

    /// Takes operation `i`, a `BSDIFF` operation with its streams.
    fn add_member(&mut self, i: usize, member: Member, zero_runs: bool) {
        let size = crate::frames::member_size(&member.streams, zero_runs);
        if let Some(f) = &self.open
            && (f.members.len() >= FRAME_MEMBERS
                || (f.size + size) as u64 > ota_format::limits::MAX_FRAME_DECODED)
        {
            self.closed.extend(self.open.take());
        }
        let f = self.open.get_or_insert_with(Default::default);
        f.members.push((i, member));
        f.size += size;
    }

    /// Holds the data of operation `i` until the frames before it are written.
    fn hold(&mut self, i: usize, data: Vec<u8>) {
        match (&mut self.open, self.closed.last_mut()) {
            (Some(f), _) | (None, Some(f)) => f.held.push((i, data)),
            (None, None) => unreachable!("hold only while busy"),
        }
    }

    /// Encodes the closed frames (in parallel), each as the smallest of:
    /// - a frame of all members (two or more), taken at once where it is
    ///   clearly under its members' estimates ([`FRAME_SURE_NUM`]) unless
    ///   [`FRAME_SPLIT_MIN`] says a split is worth trying;
    /// - beside such a sure frame, where [`FRAME_SPLIT_MIN`] says, a frame
    ///   of the others (two or more) with the members whose diff stream
    ///   bzip2 codes best compressed alone ([`Encoded::Frame`]);
    /// - where the whole frame is not clearly smaller, every member
    ///   compressed alone in full.
    fn encode_closed(
        &mut self,
        operations: &[Operation],
        opts: &GenerateOptions,
    ) -> io::Result<()> {
        self.closed
            .par_iter_mut()
            .filter(|f| f.encoded.is_none())
            .try_for_each(|f| {
                let _span = tracing::debug_span!(
                    "frame",
                    first_op = f.members.first().map(|m| m.0),
                    members = f.members.len()
                )
                .entered();
                let frame_of = |members: &mut dyn Iterator<Item = &(usize, Member)>| {
                    let inputs: Vec<crate::frames::Input<'_>> = members
                        .map(|(i, m)| crate::frames::Input {
                            dst_offset: operations[*i].dst.offset,
                            streams: &m.streams,
                        })
                        .collect();
                    crate::frames::encode(
                        &inputs,
                        opts.zstd_level,
                        opts.zero_runs,
                        opts.xz && opts.arm64,
                    )
                };
                let alone_of = |(i, m): &(usize, Member)| {
                    let dst = operations[*i].dst;
                    patch_streams::compress_streams(
                        &m.streams,
                        opts.zstd_level,
                        Some(dst.length as usize),
                        opts.zero_runs,
                        (opts.xz && opts.arm64).then_some(dst.offset),
                    )
                };
                let bz = f
                    .members
                    .iter()
                    .filter(|(_, m)| m.bzip2_diff.is_some())
                    .count();
                let whole = if f.members.len() >= 2 {
                    Some(frame_of(&mut f.members.iter())?)
                } else {
                    None
                };
                let estimate: usize = f.members.iter().map(|(_, m)| m.estimate).sum();
                let sure = whole
                    .as_ref()
                    .is_some_and(|w| w.0.len() * FRAME_SURE_DEN <= estimate * FRAME_SURE_NUM);
                tracing::debug!(
                    frame = whole.as_ref().map(|w| w.0.len()),
                    estimate,
                    bzip2_members = bz,
                    "frame against its estimate"
                );
                // Whether a frame of the others is worth trying beside a
                // sure whole frame ([`FRAME_SPLIT_MIN`]).
                let split_worth = sure
                    && bz >= FRAME_SPLIT_MIN
                    && whole
                        .as_ref()
                        .is_some_and(|w| w.0.len() * FRAME_SPLIT_DEN > estimate * FRAME_SPLIT_NUM);
                if sure && !split_worth {
                    let (data, used) = whole.expect("sure of a frame made");
                    f.encoded = Some(Encoded::Frame(data, used, Vec::new()));
                    return Ok(());
                }
                // Left out of the frame: members whose diff stream bzip2
                // codes smaller than the frame's LZMA2 would alone.
                let left = f
                    .members
                    .par_iter()
                    .map(|(i, m)| match m.bzip2_diff.filter(|_| split_worth) {
                        Some(bz) => Ok(bz
                            < patch_streams::lzma_diff_len(
                                &m.streams[1],
                                operations[*i].dst.length as usize,
                                opts.zero_runs,
                            )?),
                        None => Ok(false),
                    })
                    .collect::<io::Result<Vec<bool>>>()?;
                // Each member alone where a candidate needs it: those left
                // out, and all where the whole frame is not sure.
                let need_all = !sure;
                let mut alone = f
                    .members
                    .par_iter()
                    .zip(&left)
                    .map(|(m, l)| (need_all || *l).then(|| alone_of(m)).transpose())
                    .collect::<io::Result<Vec<Option<Alone>>>>()?;
                let n_left = left.iter().filter(|l| **l).count();
                let others = (n_left > 0 && f.members.len() - n_left >= 2)
                    .then(|| {
                        frame_of(
                            &mut f
                                .members
                                .iter()
                                .zip(&left)
                                .filter(|(_, l)| !**l)
                                .map(|(m, _)| m),
                        )
                    })
                    .transpose()?;
                let len_of = |a: &Option<Alone>| a.as_ref().map_or(0, |a| a.0.len());
                let split_len = others.as_ref().map(|o| {
                    o.0.len()
                        + alone
                            .iter()
                            .zip(&left)
                            .filter(|(_, l)| **l)
                            .map(|(a, _)| len_of(a))
                            .sum::<usize>()
                });
                let alone_len = need_all.then(|| alone.iter().map(len_of).sum::<usize>());
                tracing::debug!(
                    frame = whole.as_ref().map(|w| w.0.len()),
                    split = split_len,
                    alone = alone_len,
                    "frame against its members alone"
                );
                let whole_len = whole.as_ref().map(|w| w.0.len());
                let smallest = [whole_len, split_len, alone_len]
                    .into_iter()
                    .enumerate()
                    .filter_map(|(k, n)| n.map(|n| (n, k)))
                    .min()
                    .expect("alone, or the whole frame with a split, is a candidate")
                    .1;
                f.encoded = Some(match smallest {
                    0 => {
                        let (data, used) = whole.expect("the whole frame was a candidate");
                        Encoded::Frame(data, used, Vec::new())
                    }
                    1 => {
                        let (data, used) = others.expect("the split was a candidate");
                        let left = alone
                            .iter_mut()
                            .zip(&left)
                            .enumerate()
                            .filter(|(_, (_, l))| **l)
                            .map(|(k, (a, _))| (k, a.take().expect("made for the split")))
                            .collect();
                        Encoded::Frame(data, used, left)
                    }
                    _ => Encoded::Alone(
                        alone
                            .into_iter()
                            .map(|a| a.expect("every member alone was made"))
                            .collect(),
                    ),
                });
                Ok(())
            })
    }

    /// Writes the closed frames (encoded) and the data they held: a frame
    /// where it is smaller than its members' own data together, else each
    /// member's own data.
    fn write_closed<W: Write>(
        &mut self,
        operations: &mut [Operation],
        out: &mut HashingWriter<W>,
        used: &UsedCodecs,
    ) -> io::Result<()> {
        for f in self.closed.drain(..) {
            let mut rest = f.held;
            let note = |u: patch_streams::Used| {
                used.xz.fetch_or(u.xz, Ordering::Relaxed);
                used.zero_runs.fetch_or(u.zero_runs, Ordering::Relaxed);
                used.arm64.fetch_or(u.arm64, Ordering::Relaxed);
            };
            let mut alone_data = |k: usize, (data, u): Alone, rest: &mut Vec<(usize, Vec<u8>)>| {
                let i = f.members[k].0;
                note(u);
                operations[i].data = Some(DataRange {
                    offset: 0,
                    length: data.len() as u64,
                    sha256: Digest::of(&data),
                });
                rest.push((i, data));
            };
            // The frame and where it goes: at its first member, since data
            // ranges tile the payload in the operations' order.
            let mut frame = None;
            match f
                .encoded
                .expect("closed frames are encoded before they are written")
            {
                Encoded::Frame(data, u, left) => {
                    let out_of_frame: Vec<usize> = left.iter().map(|l| l.0).collect();
                    for (k, a) in left {
                        alone_data(k, a, &mut rest);
                    }
                    let members: Vec<usize> = (0..f.members.len())
                        .filter(|k| !out_of_frame.contains(k))
                        .map(|k| f.members[k].0)
                        .collect();
                    note(u);
                    frame = Some((data, members));
                }
                Encoded::Alone(alone) => {
                    for (k, a) in alone.into_iter().enumerate() {
                        alone_data(k, a, &mut rest);
                    }
                }
            }
            rest.sort_by_key(|r| r.0);
            let at = frame.as_ref().map_or(rest.len(), |(_, members)| {
                rest.partition_point(|r| r.0 < members[0])
            });
            /// Writes each operation's data at the payload's end.
            fn write<W: Write>(
                rest: &[(usize, Vec<u8>)],
                operations: &mut [Operation],
                out: &mut HashingWriter<W>,
            ) -> io::Result<()> {
                for (i, data) in rest {
                    if let Some(d) = &mut operations[*i].data {
                        d.offset = out.len;
                    }
                    out.write_all(data)?;
                }
                Ok(())
            }
            write(&rest[..at], operations, out)?;
            if let Some((frame, members)) = frame {
                let range = DataRange {
                    offset: out.len,
                    length: frame.len() as u64,
                    sha256: Digest::of(&frame),
                };
                out.write_all(&frame)?;
                for i in &members {
                    operations[*i].data = Some(range);
                }
                used.frames.store(true, Ordering::Relaxed);
                tracing::debug!(
                    members = members.len(),
                    left_out = f.members.len() - members.len(),
                    frame = frame.len(),
                    "frame"
                );
            }
            write(&rest[at..], operations, out)?;
        }
        Ok(())
    }

    /// Closes the open frame, then encodes and writes every frame.
    fn flush<W: Write>(
        &mut self,
        operations: &mut [Operation],
        out: &mut HashingWriter<W>,
        opts: &GenerateOptions,
        used: &UsedCodecs,
    ) -> io::Result<()> {
        self.closed.extend(self.open.take());
        self.encode_closed(operations, opts)?;
        self.write_closed(operations, out, used)
    }
}

fn build_data_op(
    plan: &Plan,
    source: Option<&File>,
    target: &File,
    index: Option<&SourceIndex>,
    opts: &GenerateOptions,
    used: &UsedCodecs,
    frameable: bool,
) -> Result<Built, GenerateError> {
    let dst = plan.dst();
    let op = |kind, src: Vec<Extent>, dst_sha256| Operation {
        kind,
        dst,
        src,
        src_sha256: None,
        data: None,
        dst_sha256,
    };
    match plan {
        Plan::Zero(_) => Ok((
            op(OpKind::Zero, vec![], Digest::of_zeros(dst.length)),
            vec![],
            None,
        )),
        Plan::Copy(_, src) => {
            let h = hash_range(target, dst.offset, dst.length)
                .map_err(io_err("reading the target image"))?;
            Ok((op(OpKind::Copy, src.clone(), h), vec![], None))
        }
        Plan::Mirror(..) => unreachable!("mirrors carry no data of their own"),
        Plan::Diff(_, known) => {
            let _span =
                tracing::debug_span!("diff_chunk", offset = dst.offset, len = dst.length).entered();
            let mut chunk = vec![0u8; dst.length as usize];
            target
                .read_exact_at(&mut chunk, dst.offset)
                .map_err(io_err("reading the target image"))?;
            let dst_sha256 = Digest::of(&chunk);
            let compress = |b: &[u8]| {
                zstd::bulk::compress(b, opts.zstd_level).map_err(io_err("compressing with zstd"))
            };
            // (kind, data, source extents, source digest) of the smallest
            // candidate so far.
            let mut best: (OpKind, Vec<u8>, Vec<Extent>, Option<Digest>) =
                (OpKind::Replace, Vec::new(), Vec::new(), None);
            let mut best_used = patch_streams::Used::default();
            // The bsdiff streams against the chunk's window, and the window.
            let mut diff = None;
            if let (Some(ix), Some(src)) = (index, source) {
                let window = choose_window(&chunk, dst.offset, known, ix);
                if !window.is_empty() {
                    let total: u64 = window.iter().map(|e| e.length).sum();
                    let mut old = vec![0u8; total as usize];
                    let mut at = 0;
                    for e in &window {
                        src.read_exact_at(&mut old[at..at + e.length as usize], e.offset)
                            .map_err(io_err("reading the source image"))?;
                        at += e.length as usize;
                    }
                    let streams = bsdiff_streams(&old, &chunk)?;
                    // Appliers hold the control stream in at most about the
                    // chunk's size (`patch_streams::decode_bounded`); a
                    // patch with more entries than that is REPLACE's anyway.
                    if streams[0].len() <= patch_streams::max_ctrl_len(chunk.len()) {
                        diff = Some((streams, window, Digest::of(&old)));
                    }
                }
            }
            // The arm64 candidate: the chunk transformed at its offset in
            // the image, in xz. xz at preset 9 on the transformed 1 MiB
            // chunks of AArch64 code was 0.80 × plain zstd-19 (exe-large;
            // 0.87 × without the transform), 0.92 × where the transform
            // does not pay (libcrypto). It is made before the patch's
            // streams are compressed: where a preset-1 probe of the streams
            // says the patch cannot beat it, their full compression (bzip2,
            // zstd-19, xz: most of a chunk's cost) is skipped.
            let arm64 = opts.xz && opts.arm64;
            let z3 = zstd::bulk::compress(&chunk, 3)
                .map_err(io_err("compressing with zstd"))?
                .len();
            let mut plain_needed = true;
            let mut skip_patch = false;
            // The patch's preset-1 probe, where made.
            let mut probed = None;
            // The size of `best`: its data's, or a frame member's estimate.
            let mut best_len: Option<usize> = None;
            if arm64 {
                let mut t = chunk.clone();
                crate::arm64::encode(&mut t, dst.offset);
                let z3a = zstd::bulk::compress(&t, 3)
                    .map_err(io_err("compressing with zstd"))?
                    .len();
                plain_needed = z3a > z3;
                // The patch is at most its streams in zstd-3 (one of its
                // codecs is zstd-19): an arm64 candidate whose zstd-3 size is
                // 1.75 × that bound is not tried, as it was not against the
                // patch itself, and its probe (xz: 8 % of ruff-arm64's
                // generation CPU where it was made for every chunk) is
                // spared.
                // Nor where zstd-3 saves less than 5 %: compressed content
                // (squashfs, archives), which xz does not shrink either (on
                // the `compressed` pair, probing and trying it there cost a
                // third of the generation CPU).
                let compressible = 20 * z3a < 19 * chunk.len();
                let (plausible, probe) = match &diff {
                    Some((streams, ..)) => {
                        let mut bound = 0;
                        for st in streams {
                            bound += zstd::bulk::compress(st, 3)
                                .map_err(io_err("compressing with zstd"))?
                                .len();
                        }
                        if compressible && 4 * z3a < 7 * bound {
                            let p = patch_streams::probe_len(streams, chunk.len())
                                .map_err(io_err("compressing with xz"))?;
                            (true, Some(p))
                        } else {
                            (false, None)
                        }
                    }
                    None => (true, None),
                };
                // Tried where its zstd-3 size is under 1.75 × the patch,
                // estimated as the probe ÷ 1.2 (the probe is 1.06–1.22 ×
                // the patch: see PROBE_SKIP_NUM). ÷ 1 tried it on more
                // chunks than the patch itself had, all lost.
                let worth = plausible && compressible && probe.is_none_or(|p| 24 * z3a < 35 * p);
                if worth {
                    let a = patch_streams::replace_arm64(&t, dst.offset, opts.zstd_level, true)
                        .map_err(io_err("compressing with xz"))?;
                    tracing::debug!(
                        zstd3 = z3,
                        arm64_zstd3 = z3a,
                        arm64 = a.len(),
                        probe,
                        "replace arm64"
                    );
                    probed = probe;
                    skip_patch =
                        probe.is_some_and(|p| p * PROBE_SKIP_DEN >= a.len() * PROBE_SKIP_NUM);
                    best_len = Some(a.len());
                    best = (OpKind::Replace, a, Vec::new(), None);
                    best_used = patch_streams::Used {
                        xz: true,
                        arm64: true,
                        ..Default::default()
                    };
                }
            }
            let mut kept_streams = None;
            let diff = diff.filter(|_| !skip_patch);
            let (framed, alone) = if frameable {
                (diff, None)
            } else {
                (None, diff)
            };
            if let Some((streams, window, old_sha256)) = framed {
                let estimate = patch_streams::estimate_len(
                    &streams,
                    chunk.len(),
                    FRAME_EST_NUM,
                    FRAME_EST_DEN,
                )
                .map_err(io_err("compressing with xz"))?;
                tracing::debug!(
                    probe = probed,
                    estimate = estimate.len,
                    bzip2_diff = estimate.bzip2_diff,
                    "frame member candidate"
                );
                if best_len.is_none_or(|b| estimate.len <= b) {
                    best = (OpKind::Bsdiff, Vec::new(), window, Some(old_sha256));
                    best_len = Some(estimate.len);
                    best_used = patch_streams::Used::default();
                    kept_streams = Some(Member {
                        streams,
                        estimate: estimate.len,
                        bzip2_diff: estimate.bzip2_diff,
                    });
                }
            } else if let Some((streams, window, old_sha256)) = alone {
                let xz_dst = opts.xz.then_some(chunk.len());
                let (patch, codecs) = patch_streams::compress_streams(
                    &streams,
                    opts.zstd_level,
                    xz_dst,
                    opts.zero_runs,
                    arm64.then_some(dst.offset),
                )
                .map_err(io_err("compressing a bsdiff patch"))?;
                tracing::debug!(
                    window = window.iter().map(|e| e.length).sum::<u64>(),
                    extents = window.len(),
                    bsdiff = patch.len(),
                    "candidates"
                );
                // On a tie the patch, as before the arm64 candidate existed.
                if best_len.is_none_or(|b| patch.len() <= b) {
                    best_len = Some(patch.len());
                    best = (OpKind::Bsdiff, patch, window, Some(old_sha256));
                    best_used = codecs;
                }
            }
            // REPLACE at the full level costs as much as the diff; a fast
            // level tells whether it could win at all: level 19 was 0.69–0.95
            // × level 3 on the 1 MiB chunks of ruff-arm64, exe-large and
            // libcrypto, so REPLACE is tried only where level 3 is less than
            // 1.5 × the patch (REPLACE won at up to 1.39 ×). The bound was 2 ×,
            // which spent 5 % of ruff's generation on trials that all lost.
            // With the arm64 candidate, plain zstd-19 only where the
            // transform made zstd-3 larger.
            let worth_trying = best_len.is_none_or(|b| 2 * z3 < 3 * b);
            if worth_trying && plain_needed {
                let replace = compress(&chunk)?;
                if best_len.is_none_or(|b| replace.len() < b) {
                    best = (OpKind::Replace, replace, Vec::new(), None);
                    best_used = patch_streams::Used::default();
                    kept_streams = None;
                }
            }
            if best_used.xz {
                used.xz.store(true, Ordering::Relaxed);
            }
            if best_used.zero_runs {
                used.zero_runs.store(true, Ordering::Relaxed);
            }
            if best_used.arm64 {
                used.arm64.store(true, Ordering::Relaxed);
            }
            let (kind, data, src, src_sha256) = best;
            let range = DataRange {
                offset: 0,
                length: data.len() as u64,
                sha256: Digest::of(&data),
            };
            Ok((
                Operation {
                    kind,
                    dst,
                    src,
                    src_sha256,
                    data: Some(range),
                    dst_sha256,
                },
                data,
                kept_streams,
            ))
        }
    }
}

/// The codecs beyond zstd and bzip2 that some operation of the payload
/// uses, for the manifest's `codecs`.
#[derive(Default)]
struct UsedCodecs {
    xz: std::sync::atomic::AtomicBool,
    zero_runs: std::sync::atomic::AtomicBool,
    arm64: std::sync::atomic::AtomicBool,
    frames: std::sync::atomic::AtomicBool,
}

/// A patch whose preset-1 xz probe ([`patch_streams::probe_len`]) is at
/// least `PROBE_SKIP_NUM / PROBE_SKIP_DEN` × the arm64 `REPLACE` candidate
/// in hand is not compressed in full (bzip2, zstd-19, xz: most of a chunk's
/// cost): the probe was 1.06–1.22 × what the full compression made of the
/// streams on the 21 chunks of exe-large and ruff-arm64 that had both (one
/// run, dev build), so such a patch cannot win. On exe-large 13 of those
/// chunks are skipped, every one a chunk the arm64 candidate won.
const PROBE_SKIP_NUM: usize = 5;
/// See [`PROBE_SKIP_NUM`].
const PROBE_SKIP_DEN: usize = 4;

/// Granularity at which anchor votes locate source content.
const VOTE_BIN: u64 = 64 << 10;

/// Picks the source extents a changed chunk most likely came from. Source
/// blocks are added in order of evidence until the window budget (4 × chunk,
/// at least 1 MiB, at most [`MAX_BSDIFF_WINDOW`]) is spent:
///
/// 1. the source blocks known to hold some of the chunk's blocks (short
///    moved runs folded into the chunk);
/// 2. the 64 KiB source bins holding the most anchor hits of the chunk: code
///    moves between versions and the pieces of a file land anywhere in an
///    image, so votes go to where the bytes are;
/// 3. the region aligned with the chunk along the dominant diagonal (source
///    offset − chunk offset of the hits): content with dense small changes
///    (symbol tables, relocated pointers) has few exact 32-byte anchors but
///    sits at the same relative place;
/// 4. the neighbours of the bins of step 2, for content between anchors;
/// 5. the same offset in the source (metadata such as inode tables stays
///    put).
fn choose_window(chunk: &[u8], chunk_off: u64, known: &[u64], ix: &SourceIndex) -> Vec<Extent> {
    const PER_BIN: u64 = VOTE_BIN / BLOCK;
    let chunk_len = chunk.len() as u64;
    let budget = ((4 * chunk_len).clamp(1 << 20, MAX_BSDIFF_WINDOW) / BLOCK) as usize;
    let last_block = (ix.len.max(1) - 1) / BLOCK;
    let mut chosen: BTreeSet<u64> = BTreeSet::new();
    let take_bin = |bin: u64, chosen: &mut BTreeSet<u64>| {
        if bin <= last_block / PER_BIN && chosen.len() + PER_BIN as usize <= budget {
            chosen.extend((bin * PER_BIN..(bin + 1) * PER_BIN).filter(|&b| b <= last_block));
        }
    };
    for &b in known {
        if chosen.len() < budget {
            chosen.insert(b);
        }
    }
    let mut bins: Vec<u64> = Vec::new();
    let mut diagonals: Vec<i64> = Vec::new();
    for_each_anchor(chunk, chunk.len(), 0, ix.anchor_bits, |k, rel| {
        for p in ix.anchors_with_hash(k) {
            bins.push(p / VOTE_BIN);
            diagonals.push((p as i64 - rel as i64).div_euclid(VOTE_BIN as i64));
        }
    });
    let mut core = Vec::new();
    if !bins.is_empty() {
        let mut votes = ranked(&mut bins);
        let min_votes = if votes[0].0 >= 2 { 2 } else { 1 };
        votes.retain(|v| v.0 >= min_votes);
        for &(_, bin) in &votes {
            if chosen.len() * 3 >= budget * 2 {
                break;
            }
            take_bin(bin, &mut chosen);
            core.push(bin);
        }
        let diag = ranked(&mut diagonals)[0].1;
        for d in (diag - 1).max(0)..=diag + (chunk_len / VOTE_BIN) as i64 + 1 {
            take_bin(d as u64, &mut chosen);
        }
    }
    for &bin in &core {
        if let Some(before) = bin.checked_sub(1) {
            take_bin(before, &mut chosen);
        }
        take_bin(bin + 1, &mut chosen);
    }
    if chunk_off < ix.len {
        for bin in chunk_off / VOTE_BIN..=(chunk_off + chunk_len) / VOTE_BIN {
            take_bin(bin, &mut chosen);
        }
    }
    let mut merged: Vec<Extent> = Vec::new();
    for b in chosen {
        let start = b * BLOCK;
        let len = BLOCK.min(ix.len - start);
        let full = merged.len() == MAX_SRC_EXTENTS;
        match merged.last_mut() {
            Some(e) if e.end() == start => e.length += len,
            _ if full => break,
            _ => merged.push(Extent::new(start, len)),
        }
    }
    // Bridge small gaps while the budget allows: a few KiB more window cost
    // less than the ~20 manifest bytes of each extra extent, and scattered
    // known blocks otherwise make long extent lists.
    let mut spare = (budget as u64 * BLOCK).saturating_sub(merged.iter().map(|e| e.length).sum());
    let mut bridged: Vec<Extent> = Vec::with_capacity(merged.len());
    for e in merged {
        match bridged.last_mut() {
            Some(last) if e.offset - last.end() <= MAX_BRIDGE && e.offset - last.end() <= spare => {
                spare -= e.offset - last.end();
                last.length = e.end() - last.offset;
            }
            _ => bridged.push(e),
        }
    }
    bridged
}

/// Largest gap between window extents filled in to join them.
const MAX_BRIDGE: u64 = 32 << 10;

/// Counts equal values: (count, value), most frequent first.
fn ranked<T: Ord + Copy>(values: &mut [T]) -> Vec<(usize, T)> {
    values.sort_unstable();
    let mut v: Vec<(usize, T)> = values
        .chunk_by(|a, b| a == b)
        .map(|g| (g.len(), g[0]))
        .collect();
    v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f
    }

    fn spec(from: Option<&str>) -> DeltaSpec {
        DeltaSpec {
            device_type: "t".into(),
            from_version: from.map(String::from),
            to_version: "2.0.0".into(),
            security_counter: 0,
            expires_at: Manifest::expiry_in(1),
        }
    }

    /// A frame whose first member is left out (compressed alone) starts at
    /// its first member still in it: the data of the operations before
    /// that, left out or held, goes first, since data ranges must tile the
    /// payload in the operations' order (`Manifest::validate`).
    #[test]
    fn a_frame_whose_first_member_is_left_out_goes_after_that_members_data() {
        let op = |k: u64| Operation {
            kind: OpKind::Bsdiff,
            dst: Extent::new(k * BLOCK, BLOCK),
            src: vec![],
            src_sha256: None,
            data: None,
            dst_sha256: Digest::of(&[]),
        };
        let mut operations: Vec<Operation> = (0..5).map(op).collect();
        // Operation 1 has data of its own and 4 comes after the frame's
        // last member: both are held until the frame is written.
        operations[1].data = Some(DataRange {
            offset: 0,
            length: 2,
            sha256: Digest::of(b"H1"),
        });
        operations[4].data = operations[1].data;
        let member = || Member {
            streams: Default::default(),
            estimate: 0,
            bzip2_diff: Some(0),
        };
        let mut frames = Frames::default();
        frames.closed.push(OpenFrame {
            members: vec![(0, member()), (2, member()), (3, member())],
            size: 0,
            held: vec![(1, b"H1".to_vec()), (4, b"H4".to_vec())],
            encoded: Some(Encoded::Frame(
                b"FRAME".to_vec(),
                Default::default(),
                vec![(0, (b"A0".to_vec(), Default::default()))],
            )),
        });
        let mut payload = Vec::new();
        let mut out = HashingWriter {
            inner: BufWriter::new(&mut payload),
            hash: Sha256::new(),
            len: 0,
        };
        frames
            .write_closed(&mut operations, &mut out, &UsedCodecs::default())
            .unwrap();
        out.inner.flush().unwrap();
        drop(out);
        assert_eq!(payload, b"A0H1FRAMEH4");
        let at: Vec<(u64, u64)> = operations
            .iter()
            .map(|o| o.data.map(|d| (d.offset, d.length)).unwrap())
            .collect();
        assert_eq!(at, [(0, 2), (2, 2), (4, 5), (4, 5), (9, 2)]);
        assert_eq!(operations[0].data.unwrap().sha256, Digest::of(b"A0"));
        assert_eq!(operations[2].data.unwrap().sha256, Digest::of(b"FRAME"));
    }

    /// The server shows this progress in `release list`: it must end at its
    /// total, in phase `Done`, and a cancel must stop the generation.
    #[test]
    fn progress_counts_to_its_total_and_cancel_stops_the_generation() {
        let old: Vec<u8> = (0..(4u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 5000].fill(9);
        let (src, dst) = (file_of(&old), file_of(&new));
        let opts = GenerateOptions {
            progress: false,
            threads: 2,
            ..Default::default()
        };
        let p = Progress::default();
        let m = generate_with_progress(
            &spec(Some("1.0.0")),
            Some(src.as_file()),
            dst.as_file(),
            io::sink(),
            &opts,
            Some(&p),
        )
        .unwrap();
        assert!(m.operations.len() > 1);
        let (phase, done, total) = p.snapshot();
        assert_eq!(phase, Phase::Done);
        assert_eq!(total, old.len() as u64 + 2 * new.len() as u64);
        assert_eq!(done, total);

        let p = Progress::default();
        p.cancel();
        let r = generate_with_progress(
            &spec(None),
            None,
            dst.as_file(),
            io::sink(),
            &opts,
            Some(&p),
        );
        assert!(matches!(r, Err(GenerateError::Cancelled)), "{r:?}");
    }

    #[test]
    fn anchors_are_found_at_the_same_content_whatever_the_offset() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut a = Vec::new();
        for_each_anchor(&data, data.len(), 0, 5, |k, p| a.push((k, p)));
        let shifted: Vec<u8> = [vec![7u8; 777], data.clone()].concat();
        let mut b = Vec::new();
        for_each_anchor(&shifted, shifted.len(), 0, 5, |k, p| {
            if p >= 777 {
                b.push((k, p - 777));
            }
        });
        assert!(a.len() > 1000, "sampling too sparse: {}", a.len());
        assert_eq!(a, b);
    }

    #[test]
    fn changed_runs_split_into_bounded_chunks() {
        let classes = vec![Class::Changed; 1000];
        let plan = plan_operations(&classes, 1000 * BLOCK - 100, 64 * BLOCK);
        let mut next = 0;
        for p in &plan {
            let d = p.dst();
            assert_eq!(d.offset, next);
            assert!(d.length <= 64 * BLOCK);
            next = d.end();
        }
        assert_eq!(next, 1000 * BLOCK - 100);
    }
}
