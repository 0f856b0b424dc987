//! The data of a `BSDIFF` operation: a bsdiff patch split into its three
//! streams, each a zstd frame.
//!
//! A bsdiff patch interleaves 24-byte control entries, "diff" bytes (mostly
//! zeros: old and new bytes that nearly match) and "extra" bytes (new data).
//! Compressed together, the three kinds of statistics spoil each other's
//! models; compressed apart (as bsdiff 4 and Android's BSDF2 do) the patch is
//! 3–6 % smaller on real binaries. The data is therefore three concatenated
//! compressed streams — control, diff, extra — each a zstd frame or, where
//! smaller, a bzip2 stream or an xz (LZMA2) stream, told apart by their
//! magic numbers. xz streams appear only in payloads whose manifest lists the
//! `xz` codec ([`ota_format::manifest::CODEC_XZ`]): agents older than the
//! codec refuse such a manifest, and the server offers them a payload
//! without it.
//!
//! # xz in bounded memory
//!
//! An LZMA2 decoder allocates its dictionary, whose size the stream header
//! declares. The generator sets it to at most the operation's output size
//! ([`xz_dict_size`]), and the applier decodes with a liblzma memlimit of the
//! output size plus [`XZ_DCTX_BYTES`] ([`decode_bounded`]): a stream that asks
//! for more is refused before anything is allocated. The dictionary lives
//! only while the streams are decoded, before the output buffer exists, so it
//! fits in the output's share of the operation's accounted memory
//! ([`crate::apply::op_work`]); the decoder's own state fits the share of a
//! zstd context ([`ZSTD_DCTX_BYTES`]).
//!
//! The control stream is stored **transposed**: byte 0 of every 24-byte entry,
//! then byte 1 of every entry, and so on. Control entries are small integers
//! in fixed-width fields, so each byte plane is nearly constant and the
//! control stream compresses about 25 % smaller than entry by entry.
//!
//! [`from_streams`] is used by the generator ([`split`] does the same for a
//! patch of the `bsdiff` crate); [`Interleaved`] re-creates the bsdiff patch
//! stream for `bsdiff::patch` without materialising it.

use std::io::{self, Read, Write};

use crate::arm64;

/// Splits a bsdiff patch (as written by `bsdiff::diff`) into its control,
/// diff and extra streams.
pub fn split(patch: &[u8]) -> io::Result<[Vec<u8>; 3]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed bsdiff patch");
    let (mut ctrl, mut diff, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    let mut rest = patch;
    while !rest.is_empty() {
        let hdr = rest.get(..24).ok_or_else(bad)?;
        let mix = u64::from_le_bytes(hdr[0..8].try_into().expect("8 bytes")) as usize;
        let copy = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes")) as usize;
        ctrl.extend_from_slice(hdr);
        rest = &rest[24..];
        diff.extend_from_slice(rest.get(..mix).ok_or_else(bad)?);
        rest = &rest[mix..];
        extra.extend_from_slice(rest.get(..copy).ok_or_else(bad)?);
        rest = &rest[copy..];
    }
    Ok([transpose(&ctrl, CTRL_LEN), diff, extra])
}

/// The streams of a patch made by [`crate::suffix_diff::diff`], laid out as
/// [`split`] lays out a `bsdiff::diff` patch (control entries transposed).
#[cfg(feature = "generate")]
pub fn from_streams(s: crate::suffix_diff::Streams) -> [Vec<u8>; 3] {
    [transpose(&s.ctrl, CTRL_LEN), s.diff, s.extra]
}

/// Size of one bsdiff control entry.
pub(crate) const CTRL_LEN: usize = 24;

/// Rows of `width` bytes to byte planes. `data.len()` is a multiple of `width`.
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

/// Inverse of [`transpose`].
fn untranspose(planes: &[u8], width: usize) -> Vec<u8> {
    let rows = planes.len() / width;
    let mut out = vec![0u8; planes.len()];
    for (b, plane) in planes.chunks_exact(rows.max(1)).enumerate().take(width) {
        for (r, &byte) in plane.iter().enumerate() {
            out[r * width + b] = byte;
        }
    }
    out
}

/// Magic of a bzip2 stream ("BZh" and a block size digit).
const BZIP2_MAGIC: &[u8] = b"BZh";

/// Magic of an xz stream.
pub(crate) const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];

/// Magic of a zero-run-coded stream ("ZRL", layout 1; see [`zero_runs_encode`]).
const ZRL_MAGIC: &[u8] = b"ZRL\x01";

/// The unit, in bytes, in which the generator codes zero runs (see
/// [`zero_runs_encode`]).
pub(crate) const ZRL_UNIT: usize = 4;

/// Largest unit a zero-run-coded stream may declare.
const ZRL_MAX_UNIT: usize = 16;

/// Appends `v` as a LEB128 varint (7 bits a byte, low first).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint from the front of `p`: `None` if `p` ends inside
/// it or it does not fit 64 bits.
pub(crate) fn get_varint(p: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (k, &b) in p.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7F);
        if k == 9 && bits > 1 {
            return None;
        }
        v |= bits << (7 * k);
        if b < 0x80 {
            *p = &p[k + 1..];
            return Some(v);
        }
    }
    None
}

/// The zero-run coding of a diff stream: its content cut into `unit`-byte
/// units, runs of all-zero units and runs of other units as `(zero units,
/// literal units)` varint pairs, then the literal units themselves (and the
/// `len % unit` tail bytes):
///
/// ```text
/// varint P | P bytes of pairs (varint zero_units, varint literal_units)* | literal bytes
/// ```
///
/// Every pair covers at least one unit. A zero-run-coded stream in the
/// payload is [`ZRL_MAGIC`], the unit (one byte), the decoded length (a
/// varint), then one zstd, bzip2 or xz stream of this coding, never longer
/// than the decoded length ([`decode_stream`]).
///
/// Why: a `BSDIFF` diff stream is as long as the bytes its control entries
/// cover, mostly zeros between short differences (relocated addresses), and
/// LZMA2's encoder spends about as much per zero byte as per any other:
/// xz's full search on libcrypto's 4.67 MB of diff streams cost more CPU
/// than HDiffPatch's whole run. Coded in runs they are 4.2–4.4 × shorter
/// (libcrypto 1.11 of 4.67 MB, ruff-arm64 4.64 of 20.5 MB), and xz at preset 9 costs
/// about a fifth of before on them (valgrind instruction counts, liblzma
/// 5.4: 0.56 against 2.68 billion on libcrypto's first 949 KB stream).
/// Whole 4-byte units, and the pairs apart from the literals, because that
/// keeps the stream's structure where LZMA2 can use it: instructions and
/// pointers are whole units, and their differences repeat (ruff-arm64's
/// diff streams 4.3 % smaller than xz on the raw stream, libcrypto's 1.7 %;
/// single-byte runs were 2.7 % larger on ruff, pairs interleaved with their
/// literals 6 % larger, 8-byte units 3 % larger on ruff and 1.5 % smaller
/// on libcrypto but twice the CPU).
///
/// `unit` must be 1..=16 (the decoder's range); the generator uses 4.
pub fn zero_runs_encode(s: &[u8], unit: usize) -> Vec<u8> {
    assert!(
        (1..=ZRL_MAX_UNIT).contains(&unit),
        "zero-run unit {unit} is not 1..={ZRL_MAX_UNIT}"
    );
    let units = s.len() / unit;
    let zero = |k: usize| s[k * unit..(k + 1) * unit].iter().all(|&b| b == 0);
    let mut pairs = Vec::new();
    let mut literals = Vec::new();
    let mut k = 0;
    while k < units {
        let z = k;
        while k < units && zero(k) {
            k += 1;
        }
        let l = k;
        while k < units && !zero(k) {
            k += 1;
        }
        put_varint(&mut pairs, (l - z) as u64);
        put_varint(&mut pairs, (k - l) as u64);
        literals.extend_from_slice(&s[l * unit..k * unit]);
    }
    literals.extend_from_slice(&s[units * unit..]);
    let mut out = Vec::with_capacity(10 + pairs.len() + literals.len());
    put_varint(&mut out, pairs.len() as u64);
    out.extend_from_slice(&pairs);
    out.extend_from_slice(&literals);
    out
}

/// A zero-run-coded stream as it is stored: [`ZRL_MAGIC`], `unit`, the
/// decoded length `len`, then `inner`, one zstd, bzip2 or xz stream of the
/// coding ([`zero_runs_encode`]). Public for tests and fuzzing.
pub fn zero_runs_frame(unit: u8, len: u64, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ZRL_MAGIC.len() + 11 + inner.len());
    out.extend_from_slice(ZRL_MAGIC);
    out.push(unit);
    put_varint(&mut out, len);
    out.extend_from_slice(inner);
    out
}

/// Expands the zero-run coding `coded` (see [`zero_runs_encode`]) of
/// stream `i` into exactly `len` bytes. Every count is checked against
/// what is left before anything is written: a pair that runs past `len`,
/// a literal section shorter or longer than the pairs say, an empty pair or
/// a malformed varint is an error, and the output is never more than `len`
/// bytes.
pub(crate) fn zero_runs_decode(
    coded: &[u8],
    len: usize,
    unit: usize,
    i: usize,
) -> io::Result<Vec<u8>> {
    let bad = |what: &str| invalid(&format!("stream {i} (zero runs): {what}"));
    let mut p = coded;
    let pairs_len = get_varint(&mut p).ok_or_else(|| bad("bad length of the run pairs"))?;
    if pairs_len > p.len() as u64 {
        return Err(bad(&format!(
            "its run pairs claim {pairs_len} bytes, {} are left",
            p.len()
        )));
    }
    let (mut pairs, mut literals) = p.split_at(pairs_len as usize);
    let mut out = Vec::with_capacity(len);
    while !pairs.is_empty() {
        let (Some(zeros), Some(lits)) = (get_varint(&mut pairs), get_varint(&mut pairs)) else {
            return Err(bad("truncated or malformed run pair"));
        };
        if zeros == 0 && lits == 0 {
            return Err(bad("an empty run pair"));
        }
        let room = ((len - out.len()) / unit) as u64;
        if zeros > room || lits > room - zeros {
            return Err(bad(&format!(
                "a run of {zeros} zero and {lits} literal units of {unit} bytes goes past \
                 the declared {len} bytes"
            )));
        }
        out.resize(out.len() + zeros as usize * unit, 0);
        let n = lits as usize * unit;
        let Some(piece) = literals.get(..n) else {
            return Err(bad(&format!(
                "the run pairs need more literal bytes than the {} left",
                literals.len()
            )));
        };
        out.extend_from_slice(piece);
        literals = &literals[n..];
    }
    if literals.len() != len - out.len() {
        return Err(bad(&format!(
            "{} literal bytes are left for the last {} bytes",
            literals.len(),
            len - out.len()
        )));
    }
    out.extend_from_slice(literals);
    Ok(out)
}

/// Memory an xz decoder may use besides its dictionary (the LZMA2 decoder's
/// probability tables, about 28 KiB at the generator's settings, and the
/// stream and block decoders), as part of its liblzma memlimit. At most
/// [`ZSTD_DCTX_BYTES`]: an xz decoder takes the place of a zstd context.
pub const XZ_DCTX_BYTES: u64 = 256 << 10;
const _: () = assert!(XZ_DCTX_BYTES <= ZSTD_DCTX_BYTES);

/// Smallest LZMA2 dictionary.
const XZ_MIN_DICT: usize = 4096;

/// An LZMA2 dictionary size as its header stores it: `2^n` or `3 × 2^(n-1)`,
/// rounded up (`up`) or down.
fn xz_dict_round(n: usize, up: bool) -> usize {
    let n = n.max(XZ_MIN_DICT);
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros()); // largest 2^k <= n
    let candidates = [p, p + p / 2, 2 * p];
    if up {
        *candidates.iter().find(|&&c| c >= n).expect("2p >= n")
    } else {
        *candidates.iter().rev().find(|&&c| c <= n).expect("p <= n")
    }
}

/// Dictionary of the xz stream of `len` bytes in an operation whose output
/// is `dst_len` bytes: enough for the whole stream, but never more than the
/// output, the applier's limit ([`decode_bounded`]).
pub fn xz_dict_size(len: usize, dst_len: usize) -> usize {
    xz_dict_round(len, true).min(xz_dict_round(dst_len, false))
}

/// Which of a bsdiff patch's three streams (they differ in what LZMA2
/// settings pay off, see [`xz_compress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Ctrl,
    Diff,
    Extra,
    /// An arm64-transformed `REPLACE` chunk: AArch64 code, whose xz
    /// settings are [`XZ_CODE_LC`] and [`XZ_CODE_LP`].
    Code,
}

/// LZMA2's literal context bits for arm64-transformed streams (default 3).
///
/// Why: AArch64 instructions are 4-byte words, so a byte's position in its
/// word (`lp` = 2 bits) predicts it better than the bits of the byte
/// before it (`lc`), which belong to another field of the same word. With
/// the transform, on six 1 MiB chunks of exe-large's new code (xz 5.4
/// `--arm64`, preset 9) lc 2 / lp 2 were 0.981–0.996 × the defaults on five
/// and 1.006 × on the sixth (data, which the transform rarely wins on);
/// on whole executables 0.993 × (exe-large) and 0.986 × (ruff-arm64) at
/// preset 9e. Through the generator (one run each, `ota-server delta`):
/// exe-large 5,474,796 → 5,423,028 bytes with it on `REPLACE` chunks and
/// extra streams, but ruff-arm64 +1,691 and sec-small +769 bytes, whose
/// arm64 data is mostly extra streams (new code mixed with data): so
/// `REPLACE` chunks only. The decoder reads both from the stream header:
/// nothing changes for agents (lc + lp ≤ 4 is what every LZMA2 decoder
/// takes).
const XZ_CODE_LC: u32 = 2;
/// LZMA2's literal position bits for arm64-transformed streams (default 0);
/// see [`XZ_CODE_LC`].
const XZ_CODE_LP: u32 = 2;

impl StreamKind {
    fn of(i: usize) -> StreamKind {
        match i {
            0 => StreamKind::Ctrl,
            1 => StreamKind::Diff,
            _ => StreamKind::Extra,
        }
    }
}

/// LZMA2 match finder settings of diff streams: a match of up to 128 bytes
/// is taken without looking further (`nice_len`, preset 9: 64), and at most
/// 16 binary-tree nodes are visited per position (`depth`, preset 9: 48).
///
/// Why (measured with liblzma 5.4 on the corpus' streams, CPU seconds of the
/// xz calls alone, total of the best codec per stream): a diff stream is
/// mostly zero bytes (old and new agree) between short runs of small
/// differences, the same few patterns (relocated pointers) again and again:
/// long matches pay, deep searches barely do. On libcrypto's diff streams
/// 201,392 bytes in 0.95 s against preset 9's 207,140 bytes in 0.79 s (nice
/// 273 at preset 9's depth: 193,392 bytes, at about twice preset 9's CPU);
/// on ruff-arm64's (20 MB) 1,301,844 bytes in 4.41 s against 1,332,056 in
/// 4.10 s. The control and extra streams lose or gain nothing from it,
/// so they keep preset 9.
const XZ_DIFF_NICE_LEN: u32 = 128;
/// See [`XZ_DIFF_NICE_LEN`].
const XZ_DIFF_DEPTH: u32 = 16;

/// A diff stream is compressed with xz's full settings only if xz at
/// preset 1 ([`xz_probe`]) times `XZ_PROBE_NUM / XZ_PROBE_DEN` is smaller
/// than the best stream so far (bzip2's, or zstd's).
///
/// Why: on the sparse diff streams of Go programs (relocated pointer tables)
/// bzip2 is 25–70 % smaller than xz, and xz's full search was thrown away:
/// containerd's delta spent 47 % of its CPU in liblzma for one xz stream
/// out of 47. Preset 1 (hash chains, fast mode) costs 5–11 % of the full
/// settings, and the full settings were never less than 0.67 × its size on
/// the corpus binaries' diff streams of 16 KiB or more: at 3/4 the probe
/// skipped 35 of containerd's 36 full xz runs on them (4.87 of 4.92 CPU s)
/// and lost no byte on containerd, ruff-arm64 or libcrypto.
const XZ_PROBE_NUM: usize = 4;
/// See [`XZ_PROBE_NUM`].
const XZ_PROBE_DEN: usize = 3;

/// Where a diff stream is zero-run coded ([`compress_with`]), xz's full
/// search also runs on the raw stream only if the preset-1 probe of the
/// runs is at least `XZ_RUNS_PROBE_NUM / XZ_RUNS_PROBE_DEN` × the probe of
/// the raw stream.
const XZ_RUNS_PROBE_NUM: usize = 99;
/// See [`XZ_RUNS_PROBE_NUM`].
const XZ_RUNS_PROBE_DEN: usize = 100;

/// The size of a patch's three streams as xz at preset 1 ([`xz_probe`]),
/// an estimate of what [`compress_streams`] makes of them at a small part
/// of its cost (see `generate`'s use: whether a patch can beat a `REPLACE`
/// already in hand).
pub fn probe_len(streams: &[Vec<u8>; 3], dst_len: usize) -> io::Result<usize> {
    let mut n = 0;
    for s in streams {
        n += xz_probe(s, xz_dict_size(s.len(), dst_len))?.len();
    }
    Ok(n)
}

/// What a patch's three streams compressed alone may come to, cheaply: per
/// stream its preset-1 xz probe ([`xz_probe`]) × `num / den`, and for the
/// diff stream the smaller of that and bzip2 (which wins by 25–70 % on the
/// sparse diff streams of Go programs' pointer tables, where xz's probe
/// overestimates the patch).
pub fn estimate_len(
    streams: &[Vec<u8>; 3],
    dst_len: usize,
    num: usize,
    den: usize,
) -> io::Result<Estimate> {
    let mut est = Estimate::default();
    for (i, s) in streams.iter().enumerate() {
        let p = xz_probe(s, xz_dict_size(s.len(), dst_len))?.len() * num / den;
        est.len += if i == 1 && s.len() > XZ_MIN_GAIN {
            let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
            bz.write_all(s)?;
            let bz = bz.finish()?.len();
            est.bzip2_diff = (bz < p).then_some(bz);
            p.min(bz)
        } else {
            p
        };
    }
    Ok(est)
}

/// What [`estimate_len`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The estimated size of the patch compressed alone.
    pub len: usize,
    /// The diff stream's size in bzip2, where that was the smaller
    /// estimate: a frame's LZMA2 may code the stream worse than bzip2 does
    /// alone (`generate` then sees with [`lzma_diff_len`]).
    pub bzip2_diff: Option<usize>,
}

/// The size of diff stream `s` as a frame codes it (see
/// `crate::frames::encode`) and [`compress_stream`] may: with `zero_runs`
/// zero-run coded with its runs in xz, else xz. What bzip2 has to beat for
/// an operation to be left out of a frame.
pub fn lzma_diff_len(s: &[u8], dst_len: usize, zero_runs: bool) -> io::Result<usize> {
    Ok(if zero_runs {
        zero_runs_xz(&zero_runs_encode(s, ZRL_UNIT), s.len(), dst_len)?.len()
    } else {
        xz_compress(s, xz_dict_size(s.len(), dst_len), StreamKind::Diff)?.len()
    })
}

/// A diff stream of `len` bytes whose zero-run coding
/// ([`zero_runs_encode`], [`ZRL_UNIT`]) is `coded`, with the coding's runs
/// in xz: one of [`compress_stream`]'s candidates, and what
/// [`lzma_diff_len`] measures, kept in one place so that the two agree
/// (the runs in xz with preset 9's settings, [`StreamKind::Extra`], not the
/// diff stream's search settings).
fn zero_runs_xz(coded: &[u8], len: usize, dst_len: usize) -> io::Result<Vec<u8>> {
    let x = xz_compress(coded, xz_dict_size(coded.len(), dst_len), StreamKind::Extra)?;
    Ok(zero_runs_frame(ZRL_UNIT as u8, len as u64, &x))
}

/// `s` as xz at preset 1 with a dictionary of `dict` bytes: a cheap estimate
/// of what [`xz_compress`] can reach (see [`XZ_PROBE_NUM`]).
pub(crate) fn xz_probe(s: &[u8], dict: usize) -> io::Result<Vec<u8>> {
    xz_encode(s, {
        let mut opts = xz2::stream::LzmaOptions::new_preset(1).map_err(io::Error::other)?;
        opts.dict_size(dict as u32);
        opts
    })
}

/// `s` as xz in LZMA2's fast mode with the longest match length (273) and
/// hash chains of depth 16: the candidate for sparse diff streams
/// ([`compress`] keeps it where it is the smallest).
///
/// Why: a diff stream of a filesystem's metadata (inode tables: 256-byte
/// records whose few changed bytes are checksums and block numbers) is
/// mostly zero runs of 100–250 bytes between short islands. The normal mode's
/// search at [`XZ_DIFF_NICE_LEN`] (128) cuts each run in two matches and its
/// price model does not recover them; the full search at 273 does (20 %
/// smaller) but took 2.6 s per 630 KB stream. The fast mode at 273 got most
/// of it at the probe's cost: on the inode table of the `moved` pair 12,628
/// bytes in 0.025 s against bzip2's 14,489 and the full search's 14,812 in
/// 0.27 s, and 5,464 against 6,220 on the other half. The decoder is the same
/// LZMA2 decoder with the same dictionary: nothing changes for agents.
fn xz_fast(s: &[u8], dict: usize) -> io::Result<Vec<u8>> {
    xz_encode(s, {
        let mut opts = xz2::stream::LzmaOptions::new_preset(2).map_err(io::Error::other)?;
        opts.dict_size(dict as u32)
            .mode(xz2::stream::Mode::Fast)
            .match_finder(xz2::stream::MatchFinder::HashChain4)
            .nice_len(XZ_FAST_NICE_LEN)
            .depth(XZ_FAST_DEPTH);
        opts
    })
}

/// See [`xz_fast`]: LZMA2's longest match.
const XZ_FAST_NICE_LEN: u32 = 273;
/// See [`xz_fast`].
const XZ_FAST_DEPTH: u32 = 16;

/// Compresses `s` as one xz stream (LZMA2, no integrity check: every
/// operation's data and output are SHA-256 verified) with a dictionary of
/// `dict` bytes, at preset 9 or, for diff streams, preset 9 with
/// [`XZ_DIFF_NICE_LEN`] and [`XZ_DIFF_DEPTH`]. The settings change only the
/// encoder's search: the decoder's memory depends on `dict` alone.
pub(crate) fn xz_compress(s: &[u8], dict: usize, kind: StreamKind) -> io::Result<Vec<u8>> {
    let mut opts = xz2::stream::LzmaOptions::new_preset(9).map_err(io::Error::other)?;
    opts.dict_size(dict as u32);
    match kind {
        StreamKind::Diff => {
            opts.nice_len(XZ_DIFF_NICE_LEN).depth(XZ_DIFF_DEPTH);
        }
        StreamKind::Code => {
            opts.literal_context_bits(XZ_CODE_LC)
                .literal_position_bits(XZ_CODE_LP);
        }
        StreamKind::Ctrl | StreamKind::Extra => {}
    }
    xz_encode(s, opts)
}

/// `s` as one xz stream of LZMA2 with `opts`, without an integrity check.
fn xz_encode(s: &[u8], opts: xz2::stream::LzmaOptions) -> io::Result<Vec<u8>> {
    let mut filters = xz2::stream::Filters::new();
    filters.lzma2(&opts);
    let stream = xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::None)
        .map_err(io::Error::other)?;
    let mut enc = xz2::write::XzEncoder::new_stream(Vec::with_capacity(s.len() / 2), stream);
    enc.write_all(s)?;
    enc.finish()
}

/// Decodes one xz stream at the start of `rest` into at most `cap` bytes,
/// with a liblzma memlimit of `dict_max` + [`XZ_DCTX_BYTES`]; advances
/// `rest` past the stream.
fn xz_decode(rest: &mut &[u8], cap: usize, dict_max: usize, i: usize) -> io::Result<Vec<u8>> {
    use xz2::stream::{Action, Error as XzError, Status, Stream};
    let limit = dict_max as u64 + XZ_DCTX_BYTES;
    let mut dec = Stream::new_stream_decoder(limit, 0).map_err(io::Error::other)?;
    // One byte over the cap tells a stream that decompresses past it.
    let mut out = Vec::with_capacity(cap + 1);
    loop {
        let (in_before, out_before) = (dec.total_in(), out.len());
        let input = &rest[in_before as usize..];
        match dec.process_vec(input, &mut out, Action::Run) {
            Ok(Status::StreamEnd) => break,
            Ok(_) => {}
            Err(XzError::MemLimit) => {
                return Err(xz_over_limit(
                    i,
                    limit,
                    &format!("its operation allows a dictionary of at most {dict_max} bytes"),
                ));
            }
            Err(e) => return Err(invalid(&format!("xz stream {i}: {e}"))),
        }
        if out.len() > cap {
            return Err(invalid(&format!(
                "stream {i} decompresses past {cap} bytes"
            )));
        }
        if dec.total_in() == in_before && out.len() == out_before {
            return Err(invalid(&format!("xz stream {i} is truncated")));
        }
    }
    if out.len() > cap {
        return Err(invalid(&format!(
            "stream {i} decompresses past {cap} bytes"
        )));
    }
    out.shrink_to_fit();
    *rest = &rest[dec.total_in() as usize..];
    Ok(out)
}

/// Decompresses the three streams of a `BSDIFF` operation's data, refusing any
/// stream larger than `cap` bytes. For inspection and tests; the apply engine
/// uses [`decode_bounded`], whose memory the manifest bounds.
pub fn decompress(data: &[u8], cap: usize) -> io::Result<[Vec<u8>; 3]> {
    let mut rest = data;
    let mut out: [Vec<u8>; 3] = Default::default();
    for i in 0..3 {
        out[i] = if i == 2 {
            if out[0].len() % CTRL_LEN != 0 {
                return Err(invalid("control stream is not a whole number of entries"));
            }
            decode_extra(&mut rest, cap, cap, &out[0])?
        } else {
            decode_stream(&mut rest, cap, cap, i)?
        };
    }
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the three streams"));
    }
    if out[0].len() % CTRL_LEN != 0 {
        return Err(invalid("control stream is not a whole number of entries"));
    }
    out[0] = untranspose(&out[0], CTRL_LEN);
    Ok(out)
}

pub(crate) fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// bzip2 decoders alive at once in this process. A bzip2 decoder holds
/// about 3.6 MiB (4 bytes per byte of its 900 kB block) whatever the size
/// of the stream, so it is not part of any operation's accounted memory
/// ([`crate::apply::op_work`]): the process holds at most this many, a
/// constant of the agent's memory bound ([`BZIP2_DECODER_BYTES`]).
pub const BZIP2_DECODERS: usize = 1;

/// Memory of one bzip2 decoder at the largest block size (900 kB): the
/// 4-byte-per-byte `tt` array and its bookkeeping, rounded up.
pub const BZIP2_DECODER_BYTES: u64 = 3800 << 10;

/// Bound on the working memory of a zstd decoding context besides the
/// window of a streaming decode: the context (`ZSTD_estimateDCtxSize`,
/// about 96 KiB) and a streaming decode's input and block buffers
/// (128 KiB each), rounded up.
pub const ZSTD_DCTX_BYTES: u64 = 512 << 10;

/// Counts the bzip2 decoders alive (see [`BZIP2_DECODERS`]).
static BZIP2_SLOTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static BZIP2_FREED: std::sync::Condvar = std::sync::Condvar::new();
static BZIP2_DECODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// bzip2 streams decoded by this process so far (for memory accounting in
/// tests: an operation that decoded one may also have held a decoder).
pub fn bzip2_decodes() -> u64 {
    BZIP2_DECODES.load(std::sync::atomic::Ordering::Relaxed)
}

/// A slot for one bzip2 decoder, released on drop.
struct Bzip2Slot;

impl Bzip2Slot {
    fn acquire() -> Bzip2Slot {
        let mut n = BZIP2_SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= BZIP2_DECODERS {
            n = BZIP2_FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        BZIP2_DECODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Bzip2Slot
    }
}

impl Drop for Bzip2Slot {
    fn drop(&mut self) {
        *BZIP2_SLOTS.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        BZIP2_FREED.notify_one();
    }
}

/// Decodes the next stream of `rest` (a zstd frame, a bzip2 stream or an
/// xz stream whose dictionary is at most `dict_max` bytes) into a vector of
/// at most `cap` bytes, advancing `rest` past it.
///
/// Allocates no more than the stream needs: a zstd frame's declared content
/// size (checked against `cap` before anything is allocated), or for bzip2
/// and xz (whose size is only known once decoded) `cap` bytes, shrunk to the
/// stream's size afterwards.
pub(crate) fn decode_stream(
    rest: &mut &[u8],
    cap: usize,
    dict_max: usize,
    i: usize,
) -> io::Result<Vec<u8>> {
    let too_big = || invalid(&format!("stream {i} decompresses past {cap} bytes"));
    if rest.starts_with(arm64::MAGIC) {
        // The extra stream's header is read by `decode_extra`: here it is
        // on another stream, or nested.
        return Err(invalid(&format!(
            "stream {i} is arm64-transformed where it may not be (only the extra stream, once)"
        )));
    }
    if rest.starts_with(ZRL_MAGIC) {
        return zero_runs_stream(rest, cap, dict_max, i);
    }
    if rest.starts_with(XZ_MAGIC) {
        return xz_decode(rest, cap, dict_max, i);
    }
    if rest.starts_with(BZIP2_MAGIC) {
        let _slot = Bzip2Slot::acquire();
        let mut out = Vec::with_capacity(cap);
        let mut dec = bzip2::read::BzDecoder::new(*rest);
        (&mut dec).take(cap as u64 + 1).read_to_end(&mut out)?;
        if out.len() > cap {
            return Err(too_big());
        }
        let used = dec.total_in() as usize;
        drop(dec);
        out.shrink_to_fit();
        *rest = &rest[used.min(rest.len())..];
        return Ok(out);
    }
    let n = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(|_| {
        invalid(&format!(
            "stream {i} is neither a zstd frame, a bzip2 stream nor an xz stream"
        ))
    })?;
    let frame = &rest[..n];
    // The generator's frames declare their size; a frame that does not is
    // given the whole cap.
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(s)) if s > cap as u64 => return Err(too_big()),
        Ok(Some(s)) => s as usize,
        Ok(None) => cap,
        Err(_) => return Err(invalid(&format!("stream {i}: bad zstd frame header"))),
    };
    let mut out = Vec::with_capacity(size);
    let mut dec = zstd::bulk::Decompressor::new()?;
    dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(23))?;
    dec.decompress_to_buffer(frame, &mut out)?;
    *rest = &rest[n..];
    Ok(out)
}

/// Refuses a compression frame's stream `bytes` that is not one of the
/// kinds a frame may hold: an xz stream, a bzip2 stream, or a zstd frame
/// declaring its content size, which must be the `total` its members
/// declare (so a streaming decoder's window is at most that). Read from
/// the stream's first bytes, before any decoder exists.
pub(crate) fn frame_stream_kind(bytes: &[u8], i: usize, total: usize) -> io::Result<()> {
    if bytes.starts_with(XZ_MAGIC) || bytes.starts_with(BZIP2_MAGIC) {
        return Ok(());
    }
    match zstd::zstd_safe::get_frame_content_size(bytes) {
        Ok(Some(n)) if n == total as u64 => Ok(()),
        Ok(Some(n)) => Err(invalid(&format!(
            "frame stream {i}: its zstd frame declares {n} bytes, its members {total}"
        ))),
        Ok(None) => Err(invalid(&format!(
            "frame stream {i}: its zstd frame does not declare its size"
        ))),
        Err(_) => Err(invalid(&format!(
            "frame stream {i} is neither a zstd frame, a bzip2 stream nor an xz stream"
        ))),
    }
}

/// Why an xz stream `i` was refused by liblzma's memory limit `limit`:
/// what its operation or frame allows (`allows`), and what to do.
fn xz_over_limit(i: usize, limit: u64, allows: &str) -> io::Error {
    invalid(&format!(
        "xz stream {i} asks for more than {limit} bytes of decoder memory ({allows}); \
         the payload was not made by a compatible generator"
    ))
}

/// Decodes one stream of a compression frame (a zstd frame declaring its
/// content size, a bzip2 stream or an xz stream), exactly `bytes` long,
/// into `shares` in order, handing each share to `filled` (with its index)
/// once it is whole: its members can be applied while the rest of the
/// stream still decodes ([`crate::frames::decode_streamed`]). `filled`
/// returns false to stop early (then `Ok`, the rest not decoded).
///
/// The stream must decode to exactly the shares' total and end exactly at
/// the end of `bytes`. Memory besides the shares: an xz dictionary of at
/// most that total (liblzma memlimit of it + [`XZ_DCTX_BYTES`]), or a zstd
/// window of at most the declared content size, which must be that total
/// (checked before a decoder exists), and its context; a bzip2 decoder
/// takes one of the process's [`BZIP2_DECODERS`] slots.
pub(crate) fn stream_into<'b>(
    bytes: &[u8],
    i: usize,
    shares: Vec<&'b mut [u8]>,
    mut filled: impl FnMut(usize, &'b mut [u8]) -> bool,
) -> io::Result<()> {
    let total: usize = shares.iter().map(|s| s.len()).sum();
    frame_stream_kind(bytes, i, total)?;
    let mem_limit = |e: &io::Error| {
        e.get_ref()
            .and_then(|x| x.downcast_ref::<xz2::stream::Error>())
            .is_some_and(|x| matches!(x, xz2::stream::Error::MemLimit))
    };
    let limit = total.max(1) as u64 + XZ_DCTX_BYTES;
    let fail = |e: io::Error| {
        if mem_limit(&e) {
            xz_over_limit(i, limit, &format!("its members declare {total} bytes"))
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid(&format!(
                "frame stream {i} ends before the {total} bytes its members declare"
            ))
        } else {
            invalid(&format!("frame stream {i}: {e}"))
        }
    };
    // Fills the shares, then checks the stream has nothing more to give;
    // returns whether it ran to the end (rather than stopped).
    let pump = |r: &mut dyn Read| -> io::Result<bool> {
        for (k, share) in shares.into_iter().enumerate() {
            r.read_exact(share).map_err(fail)?;
            if !filled(k, share) {
                return Ok(false);
            }
        }
        let mut one = [0u8; 1];
        if r.read(&mut one).map_err(fail)? != 0 {
            return Err(invalid(&format!(
                "frame stream {i} decodes past the {total} bytes its members declare"
            )));
        }
        Ok(true)
    };
    let rest = if bytes.starts_with(XZ_MAGIC) {
        let st = xz2::stream::Stream::new_stream_decoder(limit, 0).map_err(io::Error::other)?;
        let mut dec = xz2::bufread::XzDecoder::new_stream(bytes, st);
        if !pump(&mut dec)? {
            return Ok(());
        }
        dec.into_inner()
    } else if bytes.starts_with(BZIP2_MAGIC) {
        let _slot = Bzip2Slot::acquire();
        let mut dec = bzip2::bufread::BzDecoder::new(bytes);
        if !pump(&mut dec)? {
            return Ok(());
        }
        dec.into_inner()
    } else {
        let mut dec = zstd::stream::read::Decoder::with_buffer(bytes)?.single_frame();
        dec.window_log_max(23)?;
        if !pump(&mut dec)? {
            return Ok(());
        }
        dec.finish()
    };
    if !rest.is_empty() {
        return Err(invalid(&format!(
            "frame stream {i}: {} bytes after its end, within its stored length",
            rest.len()
        )));
    }
    Ok(())
}

/// Decodes the zero-run-coded stream at the start of `rest` (see
/// [`zero_runs_encode`]) into at most `cap` bytes, advancing `rest` past it.
///
/// Only the diff stream (`i` = 1) may be zero-run coded, and its coding is
/// one zstd, bzip2 or xz stream of at most the declared length: the
/// decoded length is checked against `cap` before anything is allocated,
/// and the coded bytes and the output together hold at most twice it. In
/// [`decode_bounded`] that fits the operation's accounted memory
/// ([`crate::apply::op_work`]): the coding is decoded before the output
/// buffer exists, into the output's share, and the xz dictionary (at most
/// `dict_max`) is freed before the runs are expanded.
fn zero_runs_stream(
    rest: &mut &[u8],
    cap: usize,
    dict_max: usize,
    i: usize,
) -> io::Result<Vec<u8>> {
    if i != 1 {
        return Err(invalid(&format!(
            "stream {i} is zero-run coded, which only the diff stream (1) may be"
        )));
    }
    let mut p = &rest[ZRL_MAGIC.len()..];
    let unit = match p.first() {
        Some(&u) if (1..=ZRL_MAX_UNIT).contains(&(u as usize)) => u as usize,
        Some(&u) => {
            return Err(invalid(&format!(
                "stream {i} (zero runs): unit {u} is not 1..={ZRL_MAX_UNIT} bytes"
            )));
        }
        None => return Err(invalid(&format!("stream {i} (zero runs) is truncated"))),
    };
    p = &p[1..];
    let len = get_varint(&mut p)
        .ok_or_else(|| invalid(&format!("stream {i} (zero runs): bad decoded length")))?;
    if len > cap as u64 {
        return Err(invalid(&format!(
            "stream {i} (zero runs) declares {len} bytes, past {cap}"
        )));
    }
    let len = len as usize;
    if p.starts_with(ZRL_MAGIC) {
        return Err(invalid(&format!(
            "stream {i} (zero runs) codes its runs in zero runs again"
        )));
    }
    let coded = decode_stream(&mut p, len, dict_max, i)?;
    let out = zero_runs_decode(&coded, len, unit, i)?;
    *rest = p;
    Ok(out)
}

/// Decodes the extra stream (stream 2) at the start of `rest` into at most
/// `cap` bytes, advancing `rest` past it: one zstd, bzip2 or xz stream
/// ([`decode_stream`]), or where it starts with [`arm64::MAGIC`] the base (a
/// varint) and one such stream of the arm64-transformed extra bytes, which
/// are then restored in place, each extra segment of the control entries
/// (`ctrl_planes`, transposed as stored) at its output offset from the base
/// ([`arm64::extra_segments`]). Nothing is allocated beyond what
/// [`decode_stream`] allocates for the inner stream, so
/// [`decode_bounded`]'s bound holds as for a plain extra stream. A
/// truncated header or an inner stream that is transformed again or
/// zero-run coded is refused; a wrong base decodes to other bytes, which the
/// operation's output hash refuses.
fn decode_extra(
    rest: &mut &[u8],
    cap: usize,
    dict_max: usize,
    ctrl_planes: &[u8],
) -> io::Result<Vec<u8>> {
    let Some(after) = rest.strip_prefix(arm64::MAGIC) else {
        return decode_stream(rest, cap, dict_max, 2);
    };
    let mut p = after;
    let base = get_varint(&mut p)
        .ok_or_else(|| invalid("stream 2 (arm64): truncated or malformed base"))?;
    if p.starts_with(arm64::MAGIC) {
        return Err(invalid("stream 2 (arm64) is transformed again"));
    }
    let mut extra = decode_stream(&mut p, cap, dict_max, 2)?;
    let len = extra.len();
    arm64::extra_segments(ctrl_planes, len, |e, n, o| {
        arm64::decode(&mut extra[e..e + n], base.wrapping_add(o))
    })
    .map_err(|e| invalid(&format!("stream 2 (arm64): {e}")))?;
    *rest = p;
    Ok(extra)
}

/// Slack of the control stream's bound over the output: a tiny output may
/// take a few entries more than its size in bytes (2,730 entries).
pub const CTRL_SLACK: usize = 64 << 10;

/// Largest control stream [`decode_bounded`] accepts for an output of
/// `dst_len` bytes (the generator emits `REPLACE` rather than exceed it).
pub fn max_ctrl_len(dst_len: usize) -> usize {
    dst_len + CTRL_SLACK
}

/// The decoded streams of one `BSDIFF` operation (see [`decode_bounded`]).
pub struct Decoded {
    /// Control entries as stored: transposed into byte planes.
    ctrl_planes: Vec<u8>,
    diff: Vec<u8>,
    extra: Vec<u8>,
}

impl Decoded {
    /// The interleaved bsdiff patch these streams make, for `bsdiff::patch`.
    pub fn patch(&self) -> Interleaved<'_> {
        Interleaved::from_planes(&self.ctrl_planes, &self.diff, &self.extra)
    }

    /// The decoded diff stream (the `zero_runs` fuzz target compares it with
    /// a reference decoder).
    pub fn diff(&self) -> &[u8] {
        &self.diff
    }

    /// The decoded extra stream, arm64 transform undone (the `arm64` fuzz
    /// target compares it with a reference).
    pub fn extra(&self) -> &[u8] {
        &self.extra
    }

    /// Bytes held.
    pub fn capacity(&self) -> usize {
        self.ctrl_planes.capacity() + self.diff.capacity() + self.extra.capacity()
    }
}

/// Decodes the data of a `BSDIFF` operation whose output is `dst_len` bytes
/// in memory the manifest bounds: at most `2 × dst_len` bytes of streams
/// (plus [`CTRL_SLACK`]), whatever the data claims.
///
/// - diff and extra together hold at most `dst_len` bytes: bspatch emits
///   exactly one output byte per diff or extra byte, so a valid patch never
///   has more (the generator's have exactly `dst_len`);
/// - the control stream holds at most [`max_ctrl_len`] bytes (24 per entry; on the
///   2 GiB benchmark pair the largest was 0.52 × its output, the median
///   0.0006 ×) and is read transposed, as stored, without a second copy;
/// - each zstd frame is allocated at its declared size, each bzip2 stream
///   shrunk to its size once decoded, and at most [`BZIP2_DECODERS`] bzip2
///   decoders exist at once in the process;
/// - an xz stream is decoded with a dictionary of at most `dst_len` bytes
///   (liblzma memlimit `dst_len` + [`XZ_DCTX_BYTES`]), and shrunk to its size
///   once decoded.
pub fn decode_bounded(data: &[u8], dst_len: usize) -> io::Result<Decoded> {
    let mut rest = data;
    let ctrl_planes = decode_stream(&mut rest, max_ctrl_len(dst_len), dst_len, 0)?;
    if ctrl_planes.len() % CTRL_LEN != 0 {
        return Err(invalid("control stream is not a whole number of entries"));
    }
    let diff = decode_stream(&mut rest, dst_len, dst_len, 1)?;
    let extra = decode_extra(&mut rest, dst_len - diff.len(), dst_len, &ctrl_planes)?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the three streams"));
    }
    Ok(Decoded {
        ctrl_planes,
        diff,
        extra,
    })
}

/// Streams this long or longer are tried with zstd at level 1 only when xz
/// is tried (see [`compress`]).
pub const ZSTD_BESIDE_XZ_MAX: usize = 16 << 10;

/// xz is not tried on a stream that another codec already shrank to this
/// many bytes or fewer: an xz stream costs about 60 bytes of container.
const XZ_MIN_GAIN: usize = 128;

/// Compresses the three streams of a split patch into an operation's data:
/// each stream with zstd, bzip2 or (when `xz_dst_len` gives the operation's
/// output size) xz, whichever is smallest. zstd-19 is the fastest to decode;
/// on the sparse diff streams of some binaries (relocated pointer tables in
/// Go programs) bzip2's block sorting is 25 % smaller, which is why bsdiff
/// itself uses it; LZMA2's larger model and literal coding make the extra
/// (new bytes) stream about 5–10 % smaller than zstd-19, which is most of
/// what HDiffPatch's lzma2 mode gains.
///
/// When xz is tried, streams of [`ZSTD_BESIDE_XZ_MAX`] or more are
/// tried with zstd at level 1 rather than `level`, unless bzip2 shrinks
/// them to almost nothing (≤ 128 bytes: xz is not tried on those, zstd gets
/// `level`). zstd-19 took as much CPU as xz (perf on ruff-arm64: 30 % of the
/// generation, xz 27 %), nearly all of it on the ~1 MiB diff streams, and
/// there it rarely won: of the corpus binaries' 111 streams of 16 KiB or
/// more, zstd was the smallest in 7, all diff streams — three of
/// libcrypto's by 1–2 % over xz at preset 9 (xz with [`XZ_DIFF_NICE_LEN`] is
/// 1.7–3.2 % smaller than zstd there), and four that are almost all zeros
/// (25–258 bytes: the bzip2 rule keeps zstd-19 for three, the fourth is 25
/// bytes larger as bzip2). Level 1 costs about 1 % of level 19 and is still
/// the smallest where nothing compresses (diff bytes of changed compressed
/// data, as in the `compressed` held-out pair: zstd's raw blocks cost less
/// than xz's or bzip2's framing), which keeps such payloads free of xz.
/// Control and extra streams were kept at `level` at first, but of the 31
/// control and extra streams of 16 KiB or more in the deltas of ruff-arm64,
/// exe-large and libcrypto zstd-19 was the smallest in one (by 47 bytes),
/// for 2–5 % of the generation's CPU; they now get level `level` only where
/// xz does not win. An earlier attempt (zstd skipped on every stream above 64 KiB, xz
/// at preset 9 on every stream) made libcrypto's delta 0.6 % larger.
///
/// Returns the data and whether any stream is xz (the manifest must then
/// list the `xz` codec). Never zero-run codes a stream: see
/// [`compress_with`].
pub fn compress(
    streams: &[Vec<u8>; 3],
    level: i32,
    xz_dst_len: Option<usize>,
) -> io::Result<(Vec<u8>, bool)> {
    compress_with(streams, level, xz_dst_len, false).map(|(data, used)| (data, used.xz))
}

/// The codecs beyond zstd and bzip2 that an operation's data uses: the
/// manifest must list them ([`ota_format::manifest::CODEC_XZ`],
/// [`ota_format::manifest::CODEC_ZERO_RUNS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub xz: bool,
    pub zero_runs: bool,
    /// The extra stream is arm64-transformed
    /// ([`ota_format::manifest::CODEC_ARM64`]).
    pub arm64: bool,
}

/// [`compress`], and with `zero_runs` (only together with xz,
/// `xz_dst_len`) the diff stream may also be zero-run coded
/// ([`zero_runs_encode`]) with its runs in xz, where that is smallest.
///
/// Where it is tried, it replaces xz's fast and full searches on the raw
/// diff stream, which cost 4–5 × as much, except where preset-1 probes of
/// both forms say the raw stream may win ([`XZ_RUNS_PROBE_NUM`]). Measured
/// on the diff streams of the benchmark's binaries (xz at these settings):
/// LZMA2 on the raw stream was 0.1–8.8 % smaller than on its runs in 18 of
/// `exe-large`'s 22 (Go code), and for each of those the probe of the runs
/// was at least 1.002 × the probe of the raw stream; on libcrypto's and
/// ruff-arm64's 27 the probes were 0.47–0.985 × but for one (1.007, where
/// the runs won anyway), and the runs were smaller in all but four, by at
/// most 1,288 bytes (2.9 KB in all, against 6.3 KB saved on libcrypto's
/// other two streams).
pub fn compress_with(
    streams: &[Vec<u8>; 3],
    level: i32,
    xz_dst_len: Option<usize>,
    zero_runs: bool,
) -> io::Result<(Vec<u8>, Used)> {
    compress_streams(streams, level, xz_dst_len, zero_runs, None)
}

/// [`compress_with`], and with `arm64_base` (the operation's destination
/// offset in the image) the extra stream may also be stored
/// arm64-transformed ([`crate::arm64`], each extra segment at its output
/// position from `arm64_base`) where that is smaller: [`arm64::MAGIC`], the
/// base, then the transformed stream as zstd, bzip2 or xz.
///
/// Both forms are compressed in full where the extra stream is short
/// (under [`ZSTD_BESIDE_XZ_MAX`]) or xz is not tried; otherwise preset-1 xz
/// probes of both decide which gets the full search, both where they are
/// within [`ARM64_PROBE_MARGIN`] percent of each other.
pub fn compress_streams(
    streams: &[Vec<u8>; 3],
    level: i32,
    xz_dst_len: Option<usize>,
    zero_runs: bool,
    arm64_base: Option<u64>,
) -> io::Result<(Vec<u8>, Used)> {
    let mut out = Vec::new();
    let mut used = Used::default();
    for (i, s) in streams.iter().enumerate() {
        let transformed = arm64_base.filter(|_| i == 2 && s.len() >= 4).map(|base| {
            let mut t = s.clone();
            arm64::extra_segments(&streams[0], t.len(), |e, n, o| {
                arm64::encode(&mut t[e..e + n], base.wrapping_add(o))
            })
            .map(|()| (base, t))
            .map_err(|e| invalid(&e))
        });
        let Some(t) = transformed else {
            let (best, is_xz, is_zr) =
                compress_stream(s, StreamKind::of(i), level, xz_dst_len, zero_runs)?;
            used.xz |= is_xz;
            used.zero_runs |= is_zr;
            out.extend_from_slice(&best);
            continue;
        };
        let (base, t) = t?;
        // Compressed content (zstd-1 saves under 5 %) is not code: neither
        // the transform nor its probes are tried on it.
        let incompressible =
            s.len() >= ZSTD_BESIDE_XZ_MAX && 20 * zstd::bulk::compress(s, 1)?.len() >= 19 * s.len();
        let (try_plain, try_arm64) = match xz_dst_len {
            _ if incompressible => (true, false),
            Some(dst_len) if s.len() >= ZSTD_BESIDE_XZ_MAX => {
                let dict = xz_dict_size(s.len(), dst_len);
                let p = xz_probe(s, dict)?.len() as u64;
                let pa = xz_probe(&t, dict)?.len() as u64;
                // The transformed form only where its probe is at least
                // 0.5 % smaller: where the transform changes nothing the
                // probes tie or nearly (compressed data: the `compressed`
                // pair's extra streams were compressed twice, doubling its
                // generation CPU).
                (
                    p * 100 <= pa * (100 + ARM64_PROBE_MARGIN),
                    pa * 1000 < p * 995,
                )
            }
            _ => (true, true),
        };
        let plain = try_plain
            .then(|| compress_stream(s, StreamKind::of(i), level, xz_dst_len, false))
            .transpose()?;
        let coded = try_arm64
            .then(|| -> io::Result<_> {
                // Extra streams keep the default literal settings: with
                // lc 2 / lp 2 ruff-arm64 was 1.7 KB and sec-small 0.8 KB
                // larger (new code and data mixed); see [`XZ_CODE_LC`].
                let (inner, is_xz, _) =
                    compress_stream(&t, StreamKind::Extra, level, xz_dst_len, false)?;
                let mut framed = Vec::with_capacity(arm64::MAGIC.len() + 10 + inner.len());
                framed.extend_from_slice(arm64::MAGIC);
                put_varint(&mut framed, base);
                framed.extend_from_slice(&inner);
                Ok((framed, is_xz))
            })
            .transpose()?;
        tracing::trace!(
            stream = i,
            len = s.len(),
            plain = plain.as_ref().map(|p| p.0.len()),
            arm64 = coded.as_ref().map(|c| c.0.len()),
            "arm64 extra"
        );
        let (best, is_xz, is_a64) = match (plain, coded) {
            (Some(p), Some(c)) if c.0.len() < p.0.len() => (c.0, c.1, true),
            (Some(p), _) => (p.0, p.1, false),
            (None, Some(c)) => (c.0, c.1, true),
            (None, None) => unreachable!("one of the two probes is the smaller"),
        };
        used.xz |= is_xz;
        used.arm64 |= is_a64;
        out.extend_from_slice(&best);
    }
    Ok((out, used))
}

/// The data of a `REPLACE` operation stored arm64-transformed:
/// [`arm64::MAGIC`], `base` (the destination offset the bytes were
/// transformed at, a varint), then `transformed` (the destination's bytes
/// after [`arm64::encode`]) as one xz stream with a dictionary of at most
/// its size, or without `xz` as a zstd frame at `level`
/// (`crate::apply`'s `REPLACE` path decodes both, streaming).
pub fn replace_arm64(transformed: &[u8], base: u64, level: i32, xz: bool) -> io::Result<Vec<u8>> {
    let inner = if xz {
        let dict = xz_dict_size(transformed.len(), transformed.len());
        xz_compress(transformed, dict, StreamKind::Code)?
    } else {
        zstd::bulk::compress(transformed, level)?
    };
    let mut out = Vec::with_capacity(arm64::MAGIC.len() + 10 + inner.len());
    out.extend_from_slice(arm64::MAGIC);
    put_varint(&mut out, base);
    out.extend_from_slice(&inner);
    Ok(out)
}

/// See [`compress_streams`]: both forms of an extra stream get the full
/// search where their xz probes are within this many percent of each other.
pub(crate) const ARM64_PROBE_MARGIN: u64 = 1;

/// One stream `s` of a patch, of `kind`, as the smallest of its
/// candidates (see [`compress`] and [`compress_with`]): the data, whether
/// it is xz, whether it is zero-run coded.
pub(crate) fn compress_stream(
    s: &[u8],
    kind: StreamKind,
    level: i32,
    xz_dst_len: Option<usize>,
    zero_runs: bool,
) -> io::Result<(Vec<u8>, bool, bool)> {
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    bz.write_all(s)?;
    let mut best = bz.finish()?;
    let bzip2_len = best.len();
    let full_zstd =
        xz_dst_len.is_none() || s.len() < ZSTD_BESIDE_XZ_MAX || bzip2_len <= XZ_MIN_GAIN;
    let z = zstd::bulk::compress(s, if full_zstd { level } else { 1 })?;
    let zstd_len = z.len();
    // On a tie zstd, the fastest to decode.
    if z.len() <= best.len() {
        best = z;
    }
    let mut is_xz = false;
    let mut xz_len = 0;
    if let Some(dst_len) = xz_dst_len.filter(|_| best.len() > XZ_MIN_GAIN) {
        let dict = xz_dict_size(s.len(), dst_len);
        let runs = (zero_runs && kind == StreamKind::Diff)
            .then(|| zero_runs_encode(s, ZRL_UNIT))
            // The coding is never longer than the stream (see
            // `zero_runs_stream`); a stream without zero runs is not.
            .filter(|t| t.len() < s.len());
        if let Some(t) = runs {
            let others = best.len();
            let mut is_zr = false;
            let zr = zero_runs_xz(&t, s.len(), dst_len)?;
            let zr_len = zr.len();
            if zr.len() < best.len() {
                best = zr;
                is_xz = true;
                is_zr = true;
            }
            let raw_may_win = s.len() < ZSTD_BESIDE_XZ_MAX || {
                let probe = xz_probe(s, dict)?.len();
                let probe_runs = xz_probe(&t, xz_dict_size(t.len(), dst_len))?.len();
                probe_runs * XZ_RUNS_PROBE_DEN >= probe * XZ_RUNS_PROBE_NUM
                    && probe * XZ_PROBE_DEN < others * XZ_PROBE_NUM
            };
            if raw_may_win {
                let x = xz_compress(s, dict, kind)?;
                xz_len = x.len();
                if x.len() < best.len() {
                    best = x;
                    is_xz = true;
                    is_zr = false;
                }
            }
            tracing::trace!(
                stream = ?kind,
                len = s.len(),
                runs = t.len(),
                zero_runs = zr_len,
                bzip2 = bzip2_len,
                zstd = zstd_len,
                xz = xz_len,
                "zero runs"
            );
            return Ok((best, is_xz, is_zr));
        }
        if kind == StreamKind::Diff {
            // The probe decides on the full search against bzip2 and
            // zstd alone, as it was measured to; the fast candidate may
            // then win on its own.
            let others = best.len();
            let fast = xz_fast(s, dict)?;
            if fast.len() < best.len() {
                best = fast;
                is_xz = true;
            }
            if s.len() >= ZSTD_BESIDE_XZ_MAX {
                let probe = xz_probe(s, dict)?.len();
                if probe * XZ_PROBE_DEN >= others * XZ_PROBE_NUM {
                    tracing::trace!(
                        stream = ?kind,
                        len = s.len(),
                        bzip2 = bzip2_len,
                        probe,
                        xz_fast = is_xz,
                        "xz probe: no full search"
                    );
                    return Ok((best, is_xz, false));
                }
            }
        }
        let x = xz_compress(s, dict, kind)?;
        xz_len = x.len();
        if x.len() < best.len() {
            best = x;
            is_xz = true;
        }
    }
    // Where xz lost (incompressible new bytes), a control or extra
    // stream gets zstd at the full level after all: on the `compressed`
    // pair level 1 left its extra streams 0.12 % larger.
    if !full_zstd && !is_xz && kind != StreamKind::Diff {
        let z = zstd::bulk::compress(s, level)?;
        if z.len() <= best.len() {
            best = z;
        }
    }
    tracing::trace!(
        stream = ?kind,
        len = s.len(),
        zstd = zstd_len,
        bzip2 = bzip2_len,
        xz = xz_len,
        "stream codecs"
    );
    Ok((best, is_xz, false))
}

/// Reads the three streams back as one interleaved bsdiff patch.
pub struct Interleaved<'a> {
    ctrl: &'a [u8],
    /// `Some(rows)`: `ctrl` holds the entries transposed (byte planes of
    /// `rows` bytes each), as stored in the data.
    planes: Option<usize>,
    /// Next control entry (transposed control only).
    row: usize,
    diff: &'a [u8],
    extra: &'a [u8],
    hdr: [u8; 24],
    /// Bytes of `hdr` already handed out (24: none pending).
    hdr_pos: usize,
    mix_left: u64,
    copy_left: u64,
}

impl<'a> Interleaved<'a> {
    /// Over control entries one after another (as [`decompress`] returns them).
    pub fn new([ctrl, diff, extra]: &'a [Vec<u8>; 3]) -> Self {
        Self::over(ctrl, None, diff, extra)
    }

    /// Over transposed control entries, read in place.
    pub(crate) fn from_planes(ctrl: &'a [u8], diff: &'a [u8], extra: &'a [u8]) -> Self {
        Self::over(ctrl, Some(ctrl.len() / CTRL_LEN), diff, extra)
    }

    fn over(ctrl: &'a [u8], planes: Option<usize>, diff: &'a [u8], extra: &'a [u8]) -> Self {
        Interleaved {
            ctrl,
            planes,
            row: 0,
            diff,
            extra,
            hdr: [0; 24],
            hdr_pos: 24,
            mix_left: 0,
            copy_left: 0,
        }
    }

    /// The next control entry, or `None` at the end.
    fn next_entry(&mut self) -> io::Result<Option<[u8; CTRL_LEN]>> {
        let mut hdr = [0u8; CTRL_LEN];
        match self.planes {
            Some(rows) => {
                if self.row >= rows {
                    return Ok(None);
                }
                for (b, h) in hdr.iter_mut().enumerate() {
                    *h = self.ctrl[b * rows + self.row];
                }
                self.row += 1;
            }
            None => {
                if self.ctrl.is_empty() {
                    return Ok(None);
                }
                let h = self
                    .ctrl
                    .get(..CTRL_LEN)
                    .ok_or(io::ErrorKind::InvalidData)?;
                hdr.copy_from_slice(h);
                self.ctrl = &self.ctrl[CTRL_LEN..];
            }
        }
        Ok(Some(hdr))
    }
}

fn take(src: &mut &[u8], left: &mut u64, buf: &mut [u8]) -> io::Result<usize> {
    let n = buf
        .len()
        .min(src.len())
        .min(usize::try_from(*left).unwrap_or(usize::MAX));
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf[..n].copy_from_slice(&src[..n]);
    *src = &src[n..];
    *left -= n as u64;
    Ok(n)
}

impl Read for Interleaved<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.hdr_pos < 24 {
                let n = buf.len().min(24 - self.hdr_pos);
                buf[..n].copy_from_slice(&self.hdr[self.hdr_pos..self.hdr_pos + n]);
                self.hdr_pos += n;
                return Ok(n);
            }
            if self.mix_left > 0 {
                return take(&mut self.diff, &mut self.mix_left, buf);
            }
            if self.copy_left > 0 {
                return take(&mut self.extra, &mut self.copy_left, buf);
            }
            let Some(hdr) = self.next_entry()? else {
                return Ok(0);
            };
            self.hdr = hdr;
            self.mix_left = u64::from_le_bytes(self.hdr[0..8].try_into().expect("8 bytes"));
            self.copy_left = u64::from_le_bytes(self.hdr[8..16].try_into().expect("8 bytes"));
            self.hdr_pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zero-run-coded diff stream of `s` as the generator stores it (its
    /// runs in xz), at `unit`.
    fn zr_xz(s: &[u8], unit: usize) -> Vec<u8> {
        let t = zero_runs_encode(s, unit);
        let x = xz_compress(&t, xz_dict_size(t.len(), 1 << 20), StreamKind::Extra).unwrap();
        zero_runs_frame(unit as u8, s.len() as u64, &x)
    }

    /// `coded` (the runs, uncompressed) as a zero-run-coded stream whose
    /// runs are one zstd frame, claiming `len` bytes at `unit`.
    fn zr_raw(coded: &[u8], unit: u8, len: u64) -> Vec<u8> {
        zero_runs_frame(unit, len, &zstd::bulk::compress(coded, 1).unwrap())
    }

    /// A diff stream of relocated code: 4-byte instructions or pointers
    /// whose low bytes moved by one of a few offsets, between runs of
    /// unchanged ones; and a stretch of denser changes.
    fn relocations(n: usize) -> Vec<u8> {
        let mut s = vec![0u8; n];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut at = 0;
        while at + 4 <= n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = [0x10u16, 0x2f0, 0x1c8, 0x40, 0xff80][(x % 5) as usize];
            s[at..at + 2].copy_from_slice(&d.wrapping_add((x >> 40) as u16 & 0x3).to_le_bytes());
            at += 4 * (1 + (x >> 20) as usize % if at < n / 2 { 24 } else { 6 });
        }
        s
    }

    /// Sparse differences, as a diff stream of relocated code has them.
    fn sparse(n: usize, seed: u64) -> Vec<u8> {
        let mut s = vec![0u8; n];
        let mut x = seed | 1;
        let mut at = 0;
        while at < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s[at] = (x >> 32) as u8;
            at += 1 + (x % 37) as usize;
        }
        s
    }

    #[test]
    fn zero_runs_round_trip_at_every_unit_and_length() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 1],
            vec![5; 1],
            vec![0; 4096],
            vec![7; 4099],
            [vec![0u8; 13], vec![1, 2, 3], vec![0; 9], vec![4]].concat(),
            sparse(70_001, 3),
        ];
        for s in &cases {
            for unit in 1..=ZRL_MAX_UNIT {
                let t = zero_runs_encode(s, unit);
                assert_eq!(
                    zero_runs_decode(&t, s.len(), unit, 1).unwrap(),
                    *s,
                    "unit {unit}"
                );
                let data = zr_raw(&t, unit as u8, s.len() as u64);
                let mut rest = &data[..];
                // The coding of a stream with few zeros is longer than the
                // stream: the format refuses it (the generator keeps such
                // streams as they are).
                match decode_stream(&mut rest, s.len(), 1 << 20, 1) {
                    Ok(out) => {
                        assert_eq!(out, *s);
                        assert!(rest.is_empty() && t.len() <= s.len());
                    }
                    Err(e) => assert!(t.len() > s.len(), "{e}"),
                }
            }
        }
        // Mostly zeros code to a fraction of the stream.
        let s = sparse(1 << 20, 9);
        let t = zero_runs_encode(&s, ZRL_UNIT);
        assert!(t.len() * 2 < s.len(), "{}", t.len());
        let x = zr_xz(&s, ZRL_UNIT);
        let mut rest = &x[..];
        assert_eq!(decode_stream(&mut rest, s.len(), s.len(), 1).unwrap(), s);
    }

    #[test]
    fn zero_run_streams_are_chosen_where_smaller_and_named() {
        // The same relocations again and again (a table moved as a whole),
        // where LZMA2's long matches beat bzip2's blocks.
        let diff = relocations(20_000).repeat(30);
        let streams = [transpose(&[0u8; 24], CTRL_LEN), diff, vec![]];
        let (data, used) = compress_with(&streams, 19, Some(600_000), true).unwrap();
        assert_eq!(
            used,
            Used {
                xz: true,
                zero_runs: true,
                arm64: false,
            }
        );
        let (plain, plain_used) = compress_with(&streams, 19, Some(600_000), false).unwrap();
        assert!(!plain_used.zero_runs);
        assert!(
            data.len() < plain.len(),
            "{} !< {}",
            data.len(),
            plain.len()
        );
        let mut rest = &data[..];
        decode_stream(&mut rest, 1 << 20, 1 << 20, 0).unwrap();
        assert!(rest.starts_with(ZRL_MAGIC));
        let d = decode_bounded(&data, 600_000).unwrap();
        assert!(d.capacity() <= 2 * 600_000 + CTRL_SLACK);
        assert_eq!(d.diff, streams[1]);
        assert_eq!(decompress(&data, 1 << 20).unwrap()[1], streams[1]);
        // Without xz there is no zero-run coding (its runs are xz).
        let (_, no_xz) = compress_with(&streams, 19, None, true).unwrap();
        assert_eq!(no_xz, Used::default());
    }

    #[test]
    fn a_lying_zero_run_stream_is_an_error_not_a_panic_or_a_large_allocation() {
        let s = [vec![0u8; 400], vec![9u8; 8], vec![0u8; 100]].concat();
        let t = zero_runs_encode(&s, 4);
        let good = zr_raw(&t, 4, s.len() as u64);
        let err = |data: &[u8], cap: usize, i: usize| {
            let mut rest = data;
            decode_stream(&mut rest, cap, 1 << 20, i)
                .unwrap_err()
                .to_string()
        };
        // A declared length past the cap, even an absurd one, is refused
        // before anything is allocated.
        assert!(err(&good, s.len() - 1, 1).contains("past"));
        let huge = zr_raw(&t, 4, u64::MAX);
        assert!(err(&huge, 1 << 20, 1).contains("declares"));
        // A declared length the runs do not fill, or overfill.
        assert!(err(&zr_raw(&t, 4, s.len() as u64 + 4), 1 << 20, 1).contains("literal"));
        assert!(err(&zr_raw(&t, 4, s.len() as u64 - 4), 1 << 20, 1).contains("past"));
        // Runs whose counts lie: zero units past the end, literal units
        // the literal section does not hold, an empty pair, a pairs length
        // past the coding, a truncated or overlong varint.
        let coded = |pairs: &[u8], lits: &[u8]| {
            let mut c = vec![pairs.len() as u8];
            c.extend_from_slice(pairs);
            c.extend_from_slice(lits);
            c
        };
        let lying = [
            (coded(&[0x80, 0x80, 0x80, 0x80, 0x08, 0], &[]), "goes past"), // 2^31 zero units
            (coded(&[0, 3], &[1, 2, 3, 4]), "more literal"),
            (coded(&[0, 0, 1, 0], &[]), "empty run pair"),
            (coded(&[1], &[]), "truncated"),
            (coded(&[0xFF; 11], &[]), "malformed"),
            (vec![0x09, 1, 0], "claim"),
            (vec![0x80], "length of the run pairs"),
        ];
        for (c, why) in &lying {
            let e = err(&zr_raw(c, 4, 64), 1 << 20, 1);
            assert!(e.contains(why), "{why}: {e}");
        }
        // Units outside 1..=16, a truncated header, zero runs in the
        // control or extra stream, zero runs of zero runs.
        assert!(err(&zr_raw(&t, 0, s.len() as u64), 1 << 20, 1).contains("unit"));
        assert!(err(&zr_raw(&t, 17, s.len() as u64), 1 << 20, 1).contains("unit"));
        assert!(err(ZRL_MAGIC, 1 << 20, 1).contains("truncated"));
        assert!(err(&good, 1 << 20, 0).contains("only the diff stream"));
        assert!(err(&good, 1 << 20, 2).contains("only the diff stream"));
        let nested = zero_runs_frame(4, s.len() as u64, &good);
        assert!(err(&nested, 1 << 20, 1).contains("again"));
        // Runs longer than the stream they expand to are refused as the
        // inner stream is decoded (the coding is never longer than that).
        let mut padded = t.clone();
        padded.resize(s.len() + 1, 0);
        assert!(err(&zr_raw(&padded, 4, s.len() as u64), 1 << 20, 1).contains("past"));
        // Truncated or flipped bytes anywhere: an error or other bytes of
        // at most the declared length, never a panic.
        let x = zr_xz(&s, 4);
        for cut in 0..x.len() {
            let mut rest = &x[..cut];
            assert!(decode_stream(&mut rest, 1 << 20, 1 << 20, 1).is_err());
        }
        for at in 0..x.len() {
            let mut bad = x.clone();
            bad[at] ^= 0x41;
            let mut rest = &bad[..];
            if let Ok(out) = decode_stream(&mut rest, s.len(), 1 << 20, 1) {
                assert!(out.len() <= s.len());
            }
        }
        // The good stream itself decodes.
        let mut rest = &good[..];
        assert_eq!(decode_stream(&mut rest, s.len(), 1 << 20, 1).unwrap(), s);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Any stream, at any unit, round-trips through the coding, and
        /// through the stored stream with its runs in zstd.
        #[test]
        fn zero_runs_round_trip_any_stream(
            runs in proptest::collection::vec((0usize..300, proptest::collection::vec(proptest::num::u8::ANY, 0..40)), 0..40),
            unit in 1usize..=ZRL_MAX_UNIT,
        ) {
            let s: Vec<u8> = runs.iter().flat_map(|(z, lit)| std::iter::repeat_n(0u8, *z).chain(lit.iter().copied())).collect();
            let t = zero_runs_encode(&s, unit);
            proptest::prop_assert_eq!(zero_runs_decode(&t, s.len(), unit, 1).unwrap(), s.clone());
            let data = zr_raw(&t, unit as u8, s.len() as u64);
            let mut rest = &data[..];
            match decode_stream(&mut rest, s.len(), 1 << 20, 1) {
                Ok(out) => proptest::prop_assert_eq!(out, s),
                Err(_) => proptest::prop_assert!(t.len() > s.len()),
            }
        }

        /// Arbitrary bytes as the runs, an arbitrary declared length and
        /// unit: an error or exactly the declared length, never a panic.
        #[test]
        fn arbitrary_zero_run_codings_never_panic_or_overrun(
            coded in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            unit in 0u8..20,
            len in 0u64..5000,
            cap in 0usize..5000,
        ) {
            let data = zr_raw(&coded, unit, len);
            let mut rest = &data[..];
            if let Ok(out) = decode_stream(&mut rest, cap, 1 << 20, 1) {
                proptest::prop_assert!(out.len() as u64 == len && out.len() <= cap);
                proptest::prop_assert!(rest.is_empty());
            }
        }

        /// A whole operation's data with a zero-run-coded diff stream
        /// decodes within `decode_bounded`'s bound.
        #[test]
        fn zero_run_diff_streams_decode_within_the_bound(
            n in 1usize..200_000,
            seed in proptest::num::u64::ANY,
            extra in proptest::collection::vec(proptest::num::u8::ANY, 0..500),
        ) {
            let diff = sparse(n, seed);
            // As the generator: a stream is zero-run coded only where its
            // coding is shorter (a diff of a few bytes is not: its coding's
            // header alone is longer, and the decoder bounds the coding by
            // the output).
            proptest::prop_assume!(zero_runs_encode(&diff, ZRL_UNIT).len() < n);
            let mut ctrl = [0u8; 24];
            ctrl[0..8].copy_from_slice(&(n as u64).to_le_bytes());
            ctrl[8..16].copy_from_slice(&(extra.len() as u64).to_le_bytes());
            let ctrl = transpose(&ctrl, CTRL_LEN);
            let dst = n + extra.len();
            let mut data = zstd::bulk::compress(&ctrl, 3).unwrap();
            data.extend(zr_xz(&diff, ZRL_UNIT));
            data.extend(zstd::bulk::compress(&extra, 3).unwrap());
            let d = decode_bounded(&data, dst).unwrap();
            proptest::prop_assert!(d.capacity() <= 2 * dst + CTRL_SLACK);
            proptest::prop_assert_eq!(&d.diff, &diff);
            proptest::prop_assert_eq!(&d.extra, &extra);
            // One byte less of output than the diff stream: refused.
            proptest::prop_assert!(decode_bounded(&data, n - 1).is_err());
        }
    }

    #[test]
    fn split_and_interleave_round_trip() {
        let old: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[100..200].fill(7);
        new.splice(3000..3000, b"inserted bytes".iter().copied());
        let mut patch = Vec::new();
        bsdiff::diff(&old, &new, &mut patch).unwrap();
        let streams = split(&patch).unwrap();
        let data = compress(&streams, 3, None).unwrap().0;
        let back = decompress(&data, 1 << 20).unwrap();
        assert_eq!(back[1], streams[1]);
        assert_ne!(back[0], streams[0], "control stream is stored transposed");
        let mut joined = Vec::new();
        Interleaved::new(&back).read_to_end(&mut joined).unwrap();
        assert_eq!(joined, patch);
    }

    #[test]
    fn bzip2_and_zstd_streams_mix() {
        let bz = |s: &[u8]| {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
            e.write_all(s).unwrap();
            e.finish().unwrap()
        };
        let ctrl = transpose(&[3u8; 48], CTRL_LEN);
        let diff = vec![9u8; 5000];
        let extra = b"extra bytes".to_vec();
        let mut data = bz(&ctrl);
        data.extend(zstd::bulk::compress(&diff, 3).unwrap());
        data.extend(bz(&extra));
        let back = decompress(&data, 1 << 20).unwrap();
        assert_eq!(back, [vec![3u8; 48], diff, extra]);
        assert!(
            decompress(&data, 100).is_err(),
            "cap must hold for bzip2 streams too"
        );
    }

    #[test]
    fn decode_bounded_holds_streams_within_the_output() {
        let old: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        new[100..200].fill(7);
        let mut patch = Vec::new();
        bsdiff::diff(&old, &new, &mut patch).unwrap();
        let data = compress(&split(&patch).unwrap(), 3, None).unwrap().0;
        let d = decode_bounded(&data, new.len()).unwrap();
        assert!(
            d.capacity() <= 2 * new.len() + CTRL_SLACK,
            "{}",
            d.capacity()
        );
        let mut joined = Vec::new();
        d.patch().read_to_end(&mut joined).unwrap();
        assert_eq!(joined, patch, "transposed control read in place");
        // diff + extra are one byte per output byte: a shorter output is refused.
        assert!(decode_bounded(&data, new.len() - 1).is_err());
        // A control stream larger than the output is refused.
        let big_ctrl = compress(&[vec![0u8; 72_000], vec![1u8; 10], vec![]], 3, None)
            .unwrap()
            .0;
        assert!(decode_bounded(&big_ctrl, 1000).is_err());
    }

    /// Text-like bytes LZMA2 compresses better than zstd-19.
    fn words(n: usize, seed: u64) -> Vec<u8> {
        const W: [&str; 12] = [
            "update ", "delta ", "block ", "image ", "agent ", "slot ", "verify ", "fetch ",
            "commit ", "server ", "rollout ", "device ",
        ];
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(W[(x % 12) as usize].as_bytes());
        }
        out.truncate(n);
        out
    }

    /// Machine code (of this test binary), where LZMA2's literal coding
    /// beats zstd-19 and bzip2, as it does on the extra streams of real
    /// binaries.
    fn code(n: usize) -> Vec<u8> {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let at = exe.len() / 3;
        exe[at..at + n].to_vec()
    }

    fn three_streams(extra_len: usize) -> [Vec<u8>; 3] {
        let mut ctrl = [0u8; 24];
        ctrl[8..16].copy_from_slice(&(extra_len as u64).to_le_bytes());
        [transpose(&ctrl, CTRL_LEN), vec![], code(extra_len)]
    }

    #[test]
    fn xz_streams_round_trip_and_are_chosen_where_smaller() {
        let streams = three_streams(200_000);
        let (with_xz, used) = compress(&streams, 19, Some(200_000)).unwrap();
        let (without, unused) = compress(&streams, 19, None).unwrap();
        assert!(used && !unused);
        assert!(
            with_xz.len() < without.len(),
            "{} !< {}",
            with_xz.len(),
            without.len()
        );
        let d = decode_bounded(&with_xz, 200_000).unwrap();
        let mut joined = Vec::new();
        d.patch().read_to_end(&mut joined).unwrap();
        assert_eq!(&joined[24..], &streams[2][..]);
        assert_eq!(decompress(&with_xz, 1 << 20).unwrap()[2], streams[2]);
    }

    #[test]
    fn xz_dictionary_is_at_most_the_output() {
        assert_eq!(xz_dict_size(10, 1 << 20), 4096);
        assert_eq!(xz_dict_size(700_000, 1 << 20), 768 << 10);
        assert_eq!(xz_dict_size(1 << 20, 1 << 20), 1 << 20);
        // The last chunk of an image: never more than its output.
        assert_eq!(xz_dict_size(290_000, 300 << 10), 256 << 10);
        for len in [1usize, 4095, 4097, 65_537, 1_000_000, 3 << 20] {
            for dst in [4096usize, 12_288, 300 << 10, 1 << 20, 4 << 20] {
                let d = xz_dict_size(len, dst);
                assert!(d <= dst && d >= 4096, "{len} {dst} {d}");
            }
        }
    }

    #[test]
    fn xz_stream_asking_for_a_larger_dictionary_than_its_output_is_refused() {
        let extra = words(20_000, 3);
        // Made with an 8 MiB dictionary, as a foreign or hostile generator
        // might: the applier of a 1 MiB output refuses it before decoding.
        let big = xz_compress(&extra, 8 << 20, StreamKind::Extra).unwrap();
        let mut rest = &big[..];
        let e = decode_stream(&mut rest, 1 << 20, 1 << 20, 2).unwrap_err();
        assert!(e.to_string().contains("decoder memory"), "{e}");
        // The same content with a dictionary within the output decodes.
        let ok = xz_compress(
            &extra,
            xz_dict_size(extra.len(), 1 << 20),
            StreamKind::Extra,
        )
        .unwrap();
        let mut rest = &ok[..];
        assert_eq!(
            decode_stream(&mut rest, 1 << 20, 1 << 20, 2).unwrap(),
            extra
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn xz_stream_past_its_cap_truncated_or_tampered_is_an_error() {
        let extra = words(50_000, 5);
        let x = xz_compress(&extra, 65_536, StreamKind::Extra).unwrap();
        let mut rest = &x[..];
        let e = decode_stream(&mut rest, 49_999, 1 << 20, 2).unwrap_err();
        assert!(e.to_string().contains("past 49999"), "{e}");
        for cut in [7, x.len() / 2, x.len() - 1] {
            let mut rest = &x[..cut];
            assert!(
                decode_stream(&mut rest, 1 << 20, 1 << 20, 2).is_err(),
                "cut {cut}"
            );
        }
        for at in (6..x.len()).step_by(97) {
            let mut bad = x.clone();
            bad[at] ^= 0x55;
            let mut rest = &bad[..];
            // Either refused, or (LZMA has no check of its own here: the
            // operation's SHA-256 catches it) different bytes: never a panic
            // or more than the cap.
            if let Ok(out) = decode_stream(&mut rest, 60_000, 1 << 20, 2) {
                assert!(out.len() <= 60_000);
            }
        }
    }

    /// A bsdiff diff stream as relocations make them: `old` is machine code,
    /// `new` the same with a pointer-sized field changed by one of a few
    /// offsets at scattered places, as when a section moves.
    fn relocated_diff(n: usize) -> Vec<u8> {
        let old = code(n);
        let mut new = old.clone();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut at = 0;
        while at + 8 < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let delta = [0x40u8, 0x80, 0xc0][(x % 3) as usize];
            new[at + 1] = new[at + 1].wrapping_add(delta);
            at += 8 + (x >> 8) as usize % 120;
        }
        crate::suffix_diff::diff(&old, &new).diff
    }

    #[test]
    fn diff_stream_xz_settings_beat_preset_9_on_relocations() {
        let diff = relocated_diff(1 << 20);
        let dict = xz_dict_size(diff.len(), diff.len());
        let tuned = xz_compress(&diff, dict, StreamKind::Diff).unwrap();
        let preset9 = xz_compress(&diff, dict, StreamKind::Extra).unwrap();
        assert!(
            tuned.len() < preset9.len(),
            "{} !< {}",
            tuned.len(),
            preset9.len()
        );
        // Only the encoder's search differs: the stream decodes under the
        // same memory limit.
        let mut rest = &tuned[..];
        assert_eq!(
            decode_stream(&mut rest, diff.len(), diff.len(), 1).unwrap(),
            diff
        );
    }

    #[test]
    fn near_empty_long_streams_still_get_zstd_beside_xz() {
        // A diff stream of zeros (old and new agree everywhere, as in some
        // of containerd's operations): bzip2 and zstd both make a few dozen
        // bytes (xz is not tried), and zstd is the smaller.
        let diff = vec![0u8; 520_173];
        let mut ctrl = [0u8; 24];
        ctrl[0..8].copy_from_slice(&(diff.len() as u64).to_le_bytes());
        let streams = [transpose(&ctrl, CTRL_LEN), diff, vec![]];
        let (data, used_xz) = compress(&streams, 19, Some(1 << 20)).unwrap();
        assert!(!used_xz);
        let z = zstd::bulk::compress(&streams[1], 19).unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        bz.write_all(&streams[1]).unwrap();
        let bz = bz.finish().unwrap();
        assert!(
            z.len() < bz.len() && bz.len() <= XZ_MIN_GAIN,
            "{} {}",
            z.len(),
            bz.len()
        );
        let back = decompress(&data, 2 << 20).unwrap();
        assert_eq!(back[1], streams[1]);
        // The diff stream is the zstd frame.
        let mut rest = &data[..];
        decode_stream(&mut rest, 1 << 20, 1 << 20, 0).unwrap();
        assert!(rest.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]), "zstd magic");
    }

    #[test]
    fn incompressible_long_diff_streams_stay_zstd_and_need_no_xz() {
        // Diff bytes between changed compressed blocks are noise: zstd's raw
        // blocks (level 1 beside xz) are smaller than xz's and bzip2's
        // framing, so the payload does not need the xz codec.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let diff: Vec<u8> = (0..200_000)
            .map(|_| {
                // splitmix64
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        let streams = [transpose(&[0u8; 24], CTRL_LEN), diff, vec![]];
        let (data, used_xz) = compress(&streams, 19, Some(200_000)).unwrap();
        assert!(!used_xz, "noise should not need xz");
        let mut rest = &data[..];
        decode_stream(&mut rest, 1 << 20, 1 << 20, 0).unwrap();
        assert!(rest.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]), "zstd magic");
        assert_eq!(decompress(&data, 1 << 20).unwrap()[1], streams[1]);
    }

    #[test]
    fn diff_streams_where_bzip2_wins_by_far_are_bzip2_and_round_trip() {
        // Sparse, irregular differences (Go's relocated pointer tables):
        // bzip2's block sorting beats LZMA2 by far, the probe sees it and
        // the full xz search is skipped; the stream is bzip2.
        let mut diff = vec![0u8; 1 << 20];
        let mut x = 7u64;
        for at in (0..diff.len()).step_by(24) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            diff[at] = [0x10u8, 0x20, 0x30, 0x40][(x % 4) as usize];
        }
        let dict = xz_dict_size(diff.len(), diff.len());
        let probe = xz_probe(&diff, dict).unwrap().len();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        bz.write_all(&diff).unwrap();
        let bz = bz.finish().unwrap().len();
        assert!(
            probe * XZ_PROBE_DEN >= bz * XZ_PROBE_NUM,
            "probe {probe}, bzip2 {bz}"
        );
        let streams = [transpose(&[0u8; 24], CTRL_LEN), diff, vec![]];
        let (data, used_xz) = compress(&streams, 19, Some(1 << 20)).unwrap();
        assert!(!used_xz);
        let mut rest = &data[..];
        decode_stream(&mut rest, 1 << 20, 1 << 20, 0).unwrap();
        assert!(rest.starts_with(BZIP2_MAGIC));
        assert_eq!(decompress(&data, 2 << 20).unwrap()[1], streams[1]);
    }

    /// The diff stream of an ext4 inode table whose files were renumbered
    /// (the `moved` pair): per 256-byte inode only the checksum's 4 bytes
    /// differ, so the stream is zero runs of 120 and 252 bytes between
    /// random islands. xz's full search at nice length 128 cuts each long
    /// run in two; the fast mode at 273 does not. Before the fast candidate
    /// the stream was the full search's (or bzip2's), 7–8 % larger.
    #[test]
    fn inode_table_diff_streams_take_the_fast_long_match_xz() {
        let mut diff = vec![0u8; 630_784];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for rec in diff.chunks_exact_mut(256) {
            for at in [124, 125, 130, 131] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                rec[at] = (x >> 24) as u8;
            }
        }
        let dict = xz_dict_size(diff.len(), diff.len());
        let full = xz_compress(&diff, dict, StreamKind::Diff).unwrap().len();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        bz.write_all(&diff).unwrap();
        let bz = bz.finish().unwrap().len();
        let z = zstd::bulk::compress(&diff, 19).unwrap().len();
        let before = full.min(bz).min(z);

        let streams = [transpose(&[0u8; 24], CTRL_LEN), diff, vec![]];
        let (data, used_xz) = compress(&streams, 19, Some(streams[1].len())).unwrap();
        assert!(used_xz);
        let mut rest = &data[..];
        decode_stream(&mut rest, 1 << 20, 1 << 20, 0).unwrap();
        assert!(rest.starts_with(XZ_MAGIC), "the diff stream is xz");
        let at = rest.len();
        decode_stream(&mut rest, 1 << 20, 1 << 20, 1).unwrap();
        let chosen = at - rest.len();
        assert!(
            chosen * 100 <= before * 95,
            "diff stream {chosen} bytes, best before {before} (full xz {full}, bzip2 {bz}, zstd {z})"
        );
        assert_eq!(decompress(&data, 1 << 20).unwrap()[1], streams[1]);
    }

    /// A patch whose output is AArch64 code (at `base`) met by two extra
    /// segments that start at odd output offsets: control entries
    /// (mix 6, copy 4002), (mix 2, copy the rest).
    fn arm64_patch(base: u64) -> ([Vec<u8>; 3], Vec<u8>) {
        let new = arm64::synthetic_code(50_000, base, 11);
        let first = 4002;
        let mut rows = [[0u8; 24]; 2];
        rows[0][0..8].copy_from_slice(&6u64.to_le_bytes());
        rows[0][8..16].copy_from_slice(&(first as u64).to_le_bytes());
        rows[1][0..8].copy_from_slice(&2u64.to_le_bytes());
        let rest = (new.len() - 6 - first - 2) as u64;
        rows[1][8..16].copy_from_slice(&rest.to_le_bytes());
        let ctrl: Vec<u8> = rows.concat();
        let diff = [&new[..6], &new[6 + first..6 + first + 2]].concat();
        let extra = [&new[6..6 + first], &new[6 + first + 2..]].concat();
        ([transpose(&ctrl, CTRL_LEN), diff, extra], new)
    }

    /// The output of the patch `d` over an all-zero source.
    fn patched(d: &Decoded, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        bsdiff::patch(&vec![0u8; len], &mut d.patch(), &mut out).unwrap();
        out
    }

    #[test]
    fn arm64_extra_streams_round_trip_and_are_chosen_where_smaller() {
        let base = 0x40_1000;
        let (streams, new) = arm64_patch(base);
        let n = new.len();
        let (data, used) = compress_streams(&streams, 19, Some(n), true, Some(base)).unwrap();
        assert!(used.arm64, "{used:?}");
        let (plain, plain_used) = compress_streams(&streams, 19, Some(n), true, None).unwrap();
        assert!(!plain_used.arm64);
        assert!(
            data.len() * 100 < plain.len() * 95,
            "{} !< 0.95 x {}",
            data.len(),
            plain.len()
        );
        let d = decode_bounded(&data, n).unwrap();
        assert!(d.capacity() <= 2 * n + CTRL_SLACK);
        assert_eq!(d.extra, streams[2]);
        assert_eq!(patched(&d, n), new);
        assert_eq!(decompress(&data, 1 << 20).unwrap()[2], streams[2]);
        // The extra stream is stored transformed, behind the header.
        let mut rest = &data[..];
        decode_stream(&mut rest, n, n, 0).unwrap();
        decode_stream(&mut rest, n, n, 1).unwrap();
        assert!(rest.starts_with(arm64::MAGIC));
        // Without xz too (the inner stream is then zstd or bzip2).
        let (z, zu) = compress_streams(&streams, 19, None, false, Some(base)).unwrap();
        assert!(zu.arm64 && !zu.xz, "{zu:?}");
        assert_eq!(decode_bounded(&z, n).unwrap().extra, streams[2]);
        // compress_with never transforms.
        assert!(!compress_with(&streams, 19, Some(n), true).unwrap().1.arm64);
    }

    #[test]
    fn a_text_extra_stream_is_not_transformed() {
        let text = words(200_000, 9);
        let mut ctrl = [0u8; 24];
        ctrl[8..16].copy_from_slice(&(text.len() as u64).to_le_bytes());
        let streams = [transpose(&ctrl, CTRL_LEN), vec![], text];
        let (data, used) = compress_streams(&streams, 19, Some(200_000), true, Some(0)).unwrap();
        assert!(!used.arm64);
        assert_eq!(decode_bounded(&data, 200_000).unwrap().extra, streams[2]);
    }

    /// The data of [`arm64_patch`] with its extra stream framed as given.
    fn with_extra(streams: &[Vec<u8>; 3], extra: &[u8]) -> Vec<u8> {
        let z = |x: &[u8]| zstd::bulk::compress(x, 3).unwrap();
        [z(&streams[0]), z(&streams[1]), extra.to_vec()].concat()
    }

    fn a64_frame(base_varint: &[u8], inner: &[u8]) -> Vec<u8> {
        [arm64::MAGIC, base_varint, inner].concat()
    }

    #[test]
    fn a_malformed_arm64_stream_is_an_error_not_a_panic() {
        let base = 0x1000;
        let (streams, new) = arm64_patch(base);
        let n = new.len();
        let mut t = streams[2].clone();
        arm64::extra_segments(&streams[0], t.len(), |e, k, o| {
            arm64::encode(&mut t[e..e + k], base + o)
        })
        .unwrap();
        let inner = zstd::bulk::compress(&t, 3).unwrap();
        let mut b = Vec::new();
        put_varint(&mut b, base);
        let good = with_extra(&streams, &a64_frame(&b, &inner));
        let d = decode_bounded(&good, n).unwrap();
        assert_eq!(patched(&d, n), new);
        let err = |data: &[u8]| match decode_bounded(data, n) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        };
        // A truncated or malformed base.
        assert!(err(&with_extra(&streams, arm64::MAGIC)).contains("base"));
        assert!(err(&with_extra(&streams, &a64_frame(&[0x80], &[]))).contains("base"));
        assert!(err(&with_extra(&streams, &a64_frame(&[0xFF; 11], &inner))).contains("base"));
        // No inner stream, a truncated one, one transformed again, a
        // zero-run-coded one.
        assert!(decode_bounded(&with_extra(&streams, &a64_frame(&b, &[])), n).is_err());
        assert!(
            decode_bounded(
                &with_extra(&streams, &a64_frame(&b, &inner[..inner.len() / 2])),
                n
            )
            .is_err()
        );
        let nested = a64_frame(&b, &a64_frame(&b, &inner));
        assert!(err(&with_extra(&streams, &nested)).contains("again"));
        let zr = a64_frame(&b, &zero_runs_frame(4, t.len() as u64, &inner));
        assert!(decode_bounded(&with_extra(&streams, &zr), n).is_err());
        // An arm64 frame on the control or diff stream.
        let on_diff = [
            zstd::bulk::compress(&streams[0], 3).unwrap(),
            a64_frame(&b, &zstd::bulk::compress(&streams[1], 3).unwrap()),
            a64_frame(&b, &inner),
        ]
        .concat();
        assert!(err(&on_diff).contains("where it may not be"));
        assert!(err(&a64_frame(&b, &inner)).contains("where it may not be"));
        // Control entries that take more extra bytes than the stream has.
        let short = a64_frame(&b, &zstd::bulk::compress(&t[..t.len() - 1], 3).unwrap());
        assert!(err(&with_extra(&streams, &short)).contains("extra bytes"));
        // A wrong base: other bytes, which the output hash refuses.
        let mut wrong = Vec::new();
        put_varint(&mut wrong, base + 4096);
        let d = decode_bounded(&with_extra(&streams, &a64_frame(&wrong, &inner)), n).unwrap();
        assert_ne!(patched(&d, n), new);
        // Every truncation: an error, never a panic.
        for cut in 0..good.len() {
            if cut % 97 == 0 || cut + 64 > good.len() {
                assert!(decode_bounded(&good[..cut], n).is_err(), "cut {cut}");
            }
        }
    }

    #[test]
    fn truncated_streams_are_an_error_not_a_panic() {
        let streams = [vec![0u8; 24], vec![], vec![]];
        let mut hdr = [0u8; 24];
        hdr[0] = 5; // 5 diff bytes promised, none present
        let streams2 = [hdr.to_vec(), vec![], vec![]];
        let mut out = Vec::new();
        assert!(Interleaved::new(&streams).read_to_end(&mut out).is_ok());
        assert!(Interleaved::new(&streams2).read_to_end(&mut out).is_err());
        assert!(decompress(b"not zstd", 100).is_err());
        let ragged = compress(&[vec![1u8; 25], vec![], vec![]], 3, None)
            .unwrap()
            .0;
        assert!(decompress(&ragged, 100).is_err());
    }
}
