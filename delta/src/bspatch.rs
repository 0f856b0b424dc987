//! bspatch against a source window read in pieces.
//!
//! A `BSDIFF` operation's source window (its source extents, concatenated)
//! is often several times its output: the generator gives a changed chunk
//! the source region its content came from, with room around it for code
//! that moved (4.3 MiB of window for a 1 MiB member of an executable).
//! Read whole, the window was the largest thing an operation held, and it
//! decided how many operations (or frame members) fit the apply budget at
//! once. bspatch reads the window at positions that mostly move forward
//! (the control entries' seeks are small), so a cache of
//! [`WINDOW_CACHE`] bytes serves it with about one read of each byte:
//! [`Window`] keeps that cache, and [`patch`] is bspatch over it, with the
//! bsdiff crate's semantics (same output for every patch it accepts, and
//! it refuses what that refuses) and one more check: the output never
//! grows past the destination.
//!
//! The output's digest is what `apply` checks before writing; the window's
//! ([`Window::digest`], one pass through the cache) only where the output's
//! is wrong, to tell a changed source from a bad patch
//! (`apply::patch_and_write`).

use std::io::{self, Read};

use ota_format::Digest;
use ota_format::manifest::Extent;
use sha2::{Digest as _, Sha256};

use crate::io::ReadAt;

/// Bytes of a window [`Window`] holds at once: what an operation holds for
/// its source, whatever the window's length ([`crate::apply::op_work`]).
pub const WINDOW_CACHE: usize = 256 << 10;

/// The cache's unit: a miss reads one block of the window (aligned to its
/// size), so a small seek back finds the block it left still cached and a
/// jump costs one block's read, not the cache's.
const BLOCK: usize = 16 << 10;

/// A source window (extents of `src`, concatenated) read through a cache of
/// at most [`WINDOW_CACHE`] bytes: blocks of [`BLOCK`] bytes, the least
/// recently used replaced.
pub struct Window<'a, S: ReadAt + ?Sized> {
    src: &'a S,
    extents: &'a [Extent],
    /// Window offset of each extent.
    starts: Vec<u64>,
    len: u64,
    block: usize,
    buf: Vec<u8>,
    /// Per slot of `block` bytes in `buf`: the window block it holds
    /// (`u64::MAX`: none) and when it was last used.
    tags: Vec<u64>,
    used: Vec<u64>,
    clock: u64,
    /// Blocks read so far (for tests and benchmarks).
    fills: u64,
}

/// Why [`patch`] failed: the source could not be read, or the patch is
/// malformed (the caller reports these differently: an I/O error names the
/// device, a bad patch the operation's data).
#[derive(Debug)]
pub enum PatchError {
    Source(io::Error),
    Patch(String),
}

impl<'a, S: ReadAt + ?Sized> Window<'a, S> {
    /// The window `extents` of `src`, with a cache of [`WINDOW_CACHE`]
    /// bytes (less for a shorter window).
    pub fn new(src: &'a S, extents: &'a [Extent]) -> Self {
        Self::with_cache(src, extents, WINDOW_CACHE, BLOCK)
    }

    /// [`Window::new`] with a cache of `cache` bytes in blocks of `block`
    /// bytes (each at least 1; at least one block).
    pub fn with_cache(src: &'a S, extents: &'a [Extent], cache: usize, block: usize) -> Self {
        let mut starts = Vec::with_capacity(extents.len());
        let mut len = 0u64;
        for e in extents {
            starts.push(len);
            len = len.saturating_add(e.length);
        }
        let block = block.max(1);
        let slots = (cache / block).max(1);
        // No more slots than the window has blocks.
        let slots = slots.min(len.div_ceil(block as u64).max(1) as usize);
        let block = (block as u64).min(len.max(1)) as usize;
        Window {
            src,
            extents,
            starts,
            len,
            block,
            buf: vec![0; slots * block],
            tags: vec![u64::MAX; slots],
            used: vec![0; slots],
            clock: 0,
            fills: 0,
        }
    }

    /// The window's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks read so far.
    pub fn fills(&self) -> u64 {
        self.fills
    }

    /// Fills `buf[at..at + n]` with window bytes from `pos` (within the
    /// window).
    fn read(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let mut i = self.starts.partition_point(|&s| s <= pos) - 1;
        let mut done = 0usize;
        while done < buf.len() {
            let e = self.extents[i];
            let within = pos + done as u64 - self.starts[i];
            let take = (e.length - within).min((buf.len() - done) as u64) as usize;
            if take > 0 {
                self.src
                    .read_exact_at(&mut buf[done..done + take], e.offset + within)?;
                done += take;
            }
            i += 1;
        }
        Ok(())
    }

    /// The window's SHA-256, read through the cache's buffer.
    pub fn digest(&mut self) -> io::Result<Digest> {
        let mut hasher = Sha256::new();
        let mut buf = std::mem::take(&mut self.buf);
        self.tags.fill(u64::MAX);
        let mut pos = 0u64;
        let r = (|| {
            while pos < self.len {
                let n = (self.len - pos).min(buf.len() as u64) as usize;
                self.read(&mut buf[..n], pos)?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        r.map(|()| hasher.into())
    }

    /// Between 1 and `max` (≥ 1) window bytes from `pos` (< the window's
    /// length): the rest of its block at most, read into the cache first
    /// if it is not there.
    fn get(&mut self, pos: u64, max: usize) -> io::Result<&[u8]> {
        let b = pos / self.block as u64;
        self.clock += 1;
        let slot = match self.tags.iter().position(|&t| t == b) {
            Some(slot) => slot,
            None => {
                let slot = (0..self.used.len())
                    .min_by_key(|&k| self.used[k])
                    .expect("at least one slot");
                let start = b * self.block as u64;
                let n = (self.len - start).min(self.block as u64) as usize;
                let mut buf = std::mem::take(&mut self.buf);
                self.tags[slot] = u64::MAX;
                let r = self.read(&mut buf[slot * self.block..][..n], start);
                self.buf = buf;
                r?;
                self.tags[slot] = b;
                self.fills += 1;
                slot
            }
        };
        self.used[slot] = self.clock;
        let start = b * self.block as u64;
        let n = (self.len - start).min(self.block as u64) as usize;
        let from = (pos - start) as usize;
        let to = n.min(from.saturating_add(max));
        Ok(&self.buf[slot * self.block..][from..to])
    }
}

/// Reads bsdiff's sign-magnitude little-endian 64-bit integer.
fn offtin(b: [u8; 8]) -> i64 {
    let y = u64::from_le_bytes(b);
    let magnitude = (y & !(1 << 63)) as i64;
    if y & (1 << 63) == 0 {
        magnitude
    } else {
        -magnitude
    }
}

/// Fills `buf` from `r`; `Ok(false)` at the end of `r` before any byte,
/// an error at an end within it.
fn read_entry(r: &mut dyn Read, buf: &mut [u8; 24]) -> Result<bool, PatchError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(PatchError::Patch(format!(
                    "the patch ends inside a control entry ({got} of 24 bytes)"
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PatchError::Patch(e.to_string())),
        }
    }
    Ok(true)
}

/// Applies the bsdiff patch `patch` (control entries, each followed by its
/// diff and extra bytes, as [`crate::patch_streams::Interleaved`] reads)
/// against `window`, appending the output to `out`, which the patch may
/// not grow past `limit` bytes. The same output as `bsdiff::patch` over the
/// window read whole, for every patch that one accepts; refused: an entry
/// that reads past the window, a seek before its start, a patch that ends
/// inside an entry, and output past `limit`.
pub fn patch<S: ReadAt + ?Sized>(
    window: &mut Window<'_, S>,
    patch: &mut dyn Read,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), PatchError> {
    let bad = PatchError::Patch;
    let mut oldpos = 0u64;
    let mut entry = [0u8; 24];
    while read_entry(patch, &mut entry)? {
        let field = |k: usize| -> [u8; 8] { entry[8 * k..8 * k + 8].try_into().expect("8 bytes") };
        let mix = u64::from_le_bytes(field(0));
        let copy = u64::from_le_bytes(field(1));
        let seek = offtin(field(2));
        let room = limit.saturating_sub(out.len()) as u64;
        let take = mix
            .checked_add(copy)
            .filter(|&n| n <= room)
            .ok_or_else(|| {
                bad(format!(
                    "a control entry adds {mix} + {copy} bytes to {} of a {limit}-byte output",
                    out.len()
                ))
            })?;
        let start = out.len();
        let got = patch
            .take(take)
            .read_to_end(out)
            .map_err(|e| bad(e.to_string()))?;
        if got as u64 != take {
            return Err(bad(format!(
                "the patch ends inside an entry's data ({got} of {take} bytes)"
            )));
        }
        let end = oldpos
            .checked_add(mix)
            .filter(|&e| e <= window.len())
            .ok_or_else(|| {
                bad(format!(
                    "a control entry reads source bytes [{oldpos}, +{mix}) of a {}-byte window",
                    window.len()
                ))
            })?;
        let mut k = start;
        let mut pos = oldpos;
        while pos < end {
            let piece = window
                .get(pos, (end - pos).min(usize::MAX as u64) as usize)
                .map_err(PatchError::Source)?;
            for (n, o) in out[k..k + piece.len()].iter_mut().zip(piece) {
                *n = n.wrapping_add(*o);
            }
            k += piece.len();
            pos += piece.len() as u64;
        }
        // `end` is within the window, far below 2^63.
        oldpos = (end as i64)
            .checked_add(seek)
            .and_then(|p| u64::try_from(p).ok())
            .ok_or_else(|| bad(format!("a control entry seeks {seek} bytes from {end}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A bsdiff patch of arbitrary entries (mix, copy, seek) with arbitrary
    /// diff and extra bytes.
    fn raw_patch(entries: &[(u16, u16, i32)], fill: u8) -> Vec<u8> {
        let mut p = Vec::new();
        for (j, &(mix, copy, seek)) in entries.iter().enumerate() {
            let s = if seek < 0 {
                u64::from(seek.unsigned_abs()) | 1 << 63
            } else {
                seek as u64
            };
            p.extend(u64::from(mix).to_le_bytes());
            p.extend(u64::from(copy).to_le_bytes());
            p.extend(s.to_le_bytes());
            p.extend((0..usize::from(mix) + usize::from(copy)).map(|i| (i + j) as u8 ^ fill));
        }
        p
    }

    /// The window as extents of a source: `cuts` split `old` into pieces,
    /// laid out in the source in reverse order with gaps, plus empty ones.
    fn scatter(old: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<Extent>) {
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (old.len() + 1)).collect();
        bounds.extend([0, old.len()]);
        bounds.sort_unstable();
        let mut src = vec![0xEE; 7];
        let mut placed = Vec::new();
        for w in bounds.windows(2).rev() {
            placed.push((src.len() as u64, w[0], w[1]));
            src.extend_from_slice(&old[w[0]..w[1]]);
            src.extend([0xEE; 3]);
        }
        placed.sort_by_key(|p| p.1);
        let extents = placed
            .into_iter()
            .map(|(at, a, b)| Extent::new(at, (b - a) as u64))
            .collect();
        (src, extents)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Same output and the same accept/refuse as `bsdiff::patch` over
        /// the whole window, whatever the cache size and extent layout
        /// (output limit set high enough not to bite).
        #[test]
        fn matches_bsdiff_patch(
            old in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
            entries in proptest::collection::vec((0u16..400, 0u16..64, -600i32..600), 0..12),
            cut_patch in proptest::option::of(any::<usize>()),
            cache in 1usize..700,
            block in 1usize..200,
            fill in any::<u8>(),
        ) {
            let mut p = raw_patch(&entries, fill);
            if let Some(c) = cut_patch {
                p.truncate(c % (p.len() + 1));
            }
            let (src, extents) = scatter(&old, &cuts);
            let mut w = Window::with_cache(&src[..], &extents, cache, block);
            prop_assert_eq!(w.len(), old.len() as u64);
            let mut ours = Vec::new();
            let r = patch(&mut w, &mut &p[..], &mut ours, usize::MAX);
            let mut theirs = Vec::new();
            let t = bsdiff::patch(&old, &mut &p[..], &mut theirs);
            prop_assert_eq!(r.is_ok(), t.is_ok(), "ours {:?} theirs {:?}", r.err(), t.err());
            if t.is_ok() {
                prop_assert_eq!(ours, theirs);
            }
            prop_assert_eq!(w.digest().unwrap(), Digest::of(&old));
        }
    }

    #[test]
    fn output_past_the_limit_is_refused() {
        let old = [1u8; 100];
        let p = raw_patch(&[(50, 10, 0), (40, 0, 0)], 0);
        let extents = [Extent::new(0, 100)];
        let mut w = Window::new(&old[..], &extents);
        let mut out = Vec::new();
        assert!(patch(&mut w, &mut &p[..], &mut out, 100).is_ok());
        let mut w = Window::new(&old[..], &extents);
        let mut out = Vec::new();
        let e = patch(&mut w, &mut &p[..], &mut out, 99).unwrap_err();
        assert!(matches!(e, PatchError::Patch(m) if m.contains("99-byte output")));
    }

    #[test]
    fn a_source_that_fails_is_a_source_error() {
        struct Broken;
        impl ReadAt for Broken {
            fn read_exact_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
                Err(io::Error::other("EIO"))
            }
        }
        let p = raw_patch(&[(5, 0, 0)], 0);
        let extents = [Extent::new(0, 10)];
        let mut w = Window::new(&Broken, &extents);
        let e = patch(&mut w, &mut &p[..], &mut Vec::new(), 100).unwrap_err();
        assert!(matches!(e, PatchError::Source(_)));
    }

    /// Forward reads read each block about once.
    #[test]
    fn forward_reads_fill_once_per_cache() {
        let old: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        // 1000 entries of 900 mixed bytes, each then skipping 100.
        let p = raw_patch(&vec![(900, 0, 100); 1000], 0);
        let extents = [Extent::new(0, old.len() as u64)];
        let mut w = Window::with_cache(&old[..], &extents, 64 << 10, 4096);
        let mut out = Vec::new();
        patch(&mut w, &mut &p[..], &mut out, usize::MAX).unwrap();
        assert_eq!(out.len(), 900_000);
        assert!(w.fills() <= 245, "{} fills", w.fills());
    }

    /// Small seeks back, as bsdiff makes around code that moved, find their
    /// block still cached: each block is read about once.
    #[test]
    fn small_seeks_back_read_each_block_once() {
        let old: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
        // Each entry mixes 900 bytes and seeks 500 back: 400 forward net.
        let p = raw_patch(&vec![(900, 0, -500); 2400], 0);
        let extents = [Extent::new(0, old.len() as u64)];
        let mut w = Window::with_cache(&old[..], &extents, 64 << 10, 4096);
        let mut out = Vec::new();
        patch(&mut w, &mut &p[..], &mut out, usize::MAX).unwrap();
        let mut theirs = Vec::new();
        bsdiff::patch(&old, &mut &p[..], &mut theirs).unwrap();
        assert!(out == theirs);
        assert!(w.fills() <= 245, "{} fills", w.fills());
    }
}
