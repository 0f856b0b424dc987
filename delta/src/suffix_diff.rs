//! bsdiff's match search over a suffix array built by libsais.
//!
//! # Why not the `bsdiff` crate's `diff`
//!
//! The crate sorts suffixes with Larsson–Sadakane qsufsort, which needs two
//! `isize` arrays (16 bytes per source byte) and degrades on repetitive input
//! (`O(n log n)` passes over every group of equal prefixes): it was most of
//! the generator's time (52 % of it on libcrypto). libsais (Ilya Grebnov's
//! induced-sorting SA-IS implementation, the fastest suffix array
//! construction available) builds the same suffix array in one `i32` array
//! (4 bytes per source byte), several times faster on real images and
//! binaries. The pure-Rust port of divsufsort was also tried: the whole
//! delta of containerd took 28.5 CPU seconds with it against 22 with libsais.
//!
//! A wrong suffix array could only make patches bigger, never wrong: every
//! match is re-measured byte by byte against the source before it is used.
//!
//! The match search and the choice of control entries are Colin Percival's
//! bsdiff algorithm (so patches are as small as before), with speed-ups:
//!
//! - the binary search keeps the common prefix length of both bounds and
//!   compares from there, instead of re-comparing a long shared prefix at
//!   every step (long matches are the common case in deltas);
//! - byte comparisons go eight bytes at a time;
//! - the binary search starts within the suffixes that share the first two
//!   bytes ([`Buckets`]), and positions whose first 8 bytes occur nowhere in
//!   the source are not searched at all ([`Grams`]): in new content bsdiff
//!   searches at every byte, and each search was ~22 cache misses. These
//!   two cut exe-large's generation CPU by 30 % and ruff's by about 18 %,
//!   with patches within 0.04 % (README, "Generation time: the match
//!   search").
//! - bsdiff's comparison took a suffix that is a proper prefix of the
//!   searched string for greater than it, and could then miss the longest
//!   match; here it sorts before, as in the suffix array.
//!
//! [`diff_each`] runs the search once and builds the streams under several
//! rules for extending a match over differing bytes ([`Extend`]): the
//! generator keeps whichever compresses smaller (`generate::EXTEND_LOOSE`).
//!
//! # Output
//!
//! The result is the three streams of a bsdiff 4 patch — control entries
//! (`mix`, `copy`, `seek`: 8-byte little-endian, `seek` in sign-magnitude),
//! "diff" bytes (new − old) and "extra" bytes — exactly the layout that
//! [`crate::patch_streams`] stores and that every agent's apply side
//! (`bsdiff::patch` over [`crate::patch_streams::Interleaved`]) reads.

/// Largest source window: suffix array indices are `i32`.
pub const MAX_OLD: usize = i32::MAX as usize;

/// The three streams of a bsdiff patch, control entries not yet transposed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Streams {
    /// 24-byte control entries, one after another.
    pub ctrl: Vec<u8>,
    /// Byte-wise differences of the approximately matching regions.
    pub diff: Vec<u8>,
    /// New bytes not taken from `old`.
    pub extra: Vec<u8>,
}

/// Length of the common prefix of `a` and `b`.
fn matchlen(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != y {
            return i + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Where each two-byte prefix's suffixes start in a suffix array: the
/// suffixes of `old` beginning with bytes `a, b` are `sa[start[k]..start[k + 1]]`
/// for `k = a << 8 | b`, except that the one-byte suffix `old[n - 1]` sorts
/// first among those beginning with its byte (before any pair of it).
///
/// Why: the match search is a binary search over the suffix array, and each
/// of its ~22 steps over a 4 MiB window is two cache misses (the array entry,
/// then the source bytes it points to): perf put 70 % of the match scan on
/// those two loads. Starting inside the prefix's bucket skips the first
/// steps, which touch memory farthest apart; the table is 256 KiB, in
/// cache. HDiffPatch's `--big-cache-match` does the same.
pub(crate) struct Buckets {
    start: Vec<u32>,
}

const PAIRS: usize = 1 << 16;

impl Buckets {
    /// Counts `old`'s two-byte prefixes: one pass, no suffix array needed.
    pub(crate) fn new(old: &[u8]) -> Buckets {
        let mut start = vec![0u32; PAIRS + 1];
        for w in old.windows(2) {
            start[(w[0] as usize) << 8 | w[1] as usize] += 1;
        }
        // Prefix sums, with the lone last suffix ahead of its byte's pairs.
        let lone = old.last().map(|&b| (b as usize) << 8);
        let mut sum = 0u32;
        for (k, s) in start.iter_mut().enumerate().take(PAIRS) {
            if lone == Some(k) {
                sum += 1;
            }
            let c = *s;
            *s = sum;
            sum += c;
        }
        start[PAIRS] = sum;
        Buckets { start }
    }

    /// The suffix array range whose suffixes begin with `new[..2]`, if any.
    fn range(&self, new: &[u8]) -> Option<(usize, usize)> {
        let k = (*new.first()? as usize) << 8 | *new.get(1)? as usize;
        let (a, b) = (self.start[k] as usize, self.start[k + 1] as usize);
        (a < b).then_some((a, b))
    }
}

/// Length of the substrings [`Grams`] records.
const GRAM: usize = 8;

/// Which `GRAM`-byte substrings occur in `old`: a one-hash Bloom filter of
/// 8 bits per source byte (about 12 % false positives).
///
/// Why: bsdiff searches the suffix array at every position of `new` where no
/// match has won yet, and in new content (code that was added, a changed
/// file) that is every byte — a ~22-step binary search, each step a cache
/// miss, per byte. A match can only win there if it is longer than 8 bytes
/// ([`diff`]'s `len > oldscore + 8`), so a position whose first 8 bytes occur
/// nowhere in `old` needs no search: one bit answers.
struct Grams {
    bits: Vec<u64>,
    shift: u32,
}

impl Grams {
    fn key(w: &[u8]) -> u64 {
        u64::from_le_bytes(w[..GRAM].try_into().expect("GRAM bytes"))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn new(old: &[u8]) -> Grams {
        let nbits = (old.len().max(64) * 8).next_power_of_two();
        let shift = 64 - nbits.trailing_zeros();
        let mut bits = vec![0u64; nbits / 64];
        for w in old.windows(GRAM) {
            let h = Self::key(w) >> shift;
            bits[(h / 64) as usize] |= 1 << (h % 64);
        }
        Grams { bits, shift }
    }

    /// `new`'s first `GRAM` bytes occur nowhere in `old` (false when unsure).
    fn absent(&self, new: &[u8]) -> bool {
        if new.len() < GRAM {
            return false;
        }
        let h = Self::key(new) >> self.shift;
        self.bits[(h / 64) as usize] & (1 << (h % 64)) == 0
    }
}

/// The source position whose suffix shares the longest prefix with `new`,
/// and that length (bsdiff's `search`). `sa` is non-empty.
///
/// The binary search runs within the suffixes sharing `new`'s first two
/// bytes ([`Buckets`]) when there are any: the longest match is among them.
fn search(sa: &[i32], buckets: &Buckets, old: &[u8], new: &[u8]) -> (usize, usize) {
    let at = |k: usize| sa[k] as usize;
    // The bucket and one neighbour on each side: the search then ends at the
    // same pair of suffixes around `new` as over the whole array, and so
    // picks the same match on ties.
    let (mut lo, mut hi) = match buckets.range(new) {
        Some((a, b)) => (a.saturating_sub(1), b.min(sa.len() - 1)),
        None => (0, sa.len() - 1),
    };
    let mut llo = matchlen(&old[at(lo)..], new);
    let mut lhi = matchlen(&old[at(hi)..], new);
    while hi - lo >= 2 {
        let mid = lo + (hi - lo) / 2;
        // Every suffix between lo and hi starts with new[..k].
        let k = llo.min(lhi);
        let s = &old[at(mid)..];
        let l = k + matchlen(&s[k..], &new[k..]);
        // A suffix that is a proper prefix of `new` sorts before it (bsdiff
        // itself took it for greater, and could then miss the longest match).
        if l < new.len() && (l == s.len() || s[l] < new[l]) {
            lo = mid;
            llo = l;
        } else {
            hi = mid;
            lhi = l;
        }
    }
    if llo > lhi {
        (at(lo), llo)
    } else {
        (at(hi), lhi)
    }
}

/// The suffix array of `old` (non-empty, at most [`MAX_OLD`] bytes).
fn suffix_array(old: &[u8]) -> Vec<i32> {
    libsais::SuffixArrayConstruction::for_text(old)
        .in_owned_buffer32()
        .single_threaded()
        .run()
        // libsais fails only on bad arguments (a text too long for i32
        // indices), which `diff` rules out first.
        .expect("libsais rejected a text within its limits")
        .into_vec()
}

/// bsdiff's encoding of a signed offset: little-endian magnitude, sign in
/// the top bit.
fn offtout(x: i64, out: &mut Vec<u8>) {
    let v = if x >= 0 {
        x as u64
    } else {
        x.unsigned_abs() | (1 << 63)
    };
    out.extend_from_slice(&v.to_le_bytes());
}

/// How far bsdiff extends a match over bytes that differ: forwards (and
/// backwards) to where `matched × den − length × num` peaks, so over
/// stretches where at least `num / den` of the bytes equal the source's.
/// Bytes taken this way go to the diff stream (new − old) rather than the
/// extra stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extend {
    pub num: isize,
    pub den: isize,
}

/// bsdiff's own: a match extends while half the bytes or more agree.
pub const EXTEND_HALF: Extend = Extend { num: 1, den: 2 };

/// Diffs `new` against `old` (at most [`MAX_OLD`] bytes) with bsdiff's
/// algorithm.
///
/// Memory: `old.len() × 5` bytes (the suffix array and [`Grams`]) plus
/// 256 KiB ([`Buckets`]) and the output streams.
pub fn diff(old: &[u8], new: &[u8]) -> Streams {
    diff_each(old, new, &[EXTEND_HALF]).pop().expect("one")
}

/// [`diff`] once per extension rule in `each`: the match search (the
/// cost) runs once; only the extension of each match over differing bytes
/// differs, which is linear.
pub fn diff_each(old: &[u8], new: &[u8], each: &[Extend]) -> Vec<Streams> {
    let search = Search::new(old, new);
    each.iter().map(|&e| search.streams(e)).collect()
}

/// bsdiff's match search of `new` against `old`, run once: the streams
/// under each extension rule are built from it one at a time
/// ([`Search::streams`]), so a caller comparing rules holds only the ones
/// it keeps.
pub struct Search<'a> {
    old: &'a [u8],
    new: &'a [u8],
    /// `None` where `old` is empty (nothing to match).
    matches: Option<Vec<(usize, usize)>>,
}

impl<'a> Search<'a> {
    /// Runs the search (suffix sorting `old`: the cost).
    pub fn new(old: &'a [u8], new: &'a [u8]) -> Self {
        assert!(old.len() <= MAX_OLD, "bsdiff window over 2 GiB");
        let matches = (!old.is_empty()).then(|| matches(old, new));
        Search { old, new, matches }
    }

    /// The streams under extension rule `e`.
    pub fn streams(&self, e: Extend) -> Streams {
        match &self.matches {
            Some(m) => streams_of(self.old, self.new, m, e),
            None => {
                let mut out = Streams::default();
                if !self.new.is_empty() {
                    offtout(0, &mut out.ctrl);
                    offtout(self.new.len() as i64, &mut out.ctrl);
                    offtout(0, &mut out.ctrl);
                    out.extra.extend_from_slice(self.new);
                }
                out
            }
        }
    }
}

/// bsdiff's match search: the (scan, pos) of each match it takes, in
/// order, `scan` in `new` and `pos` in `old`; the last has `scan ==
/// new.len()`. Where each match starts and ends is [`streams_of`]'s.
fn matches(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    let sa = suffix_array(old);
    let buckets = Buckets::new(old);
    let grams = Grams::new(old);

    let oldlen = old.len() as isize;
    let mut out = Vec::new();
    let (mut scan, mut len, mut pos) = (0usize, 0usize, 0usize);
    let mut lastoffset = 0isize;
    while scan < new.len() {
        let mut oldscore = 0usize;
        scan += len;
        let mut scsc = scan;
        while scan < new.len() {
            (pos, len) = if grams.absent(&new[scan..]) {
                // No match of GRAM bytes or more exists, so none can beat the
                // current alignment by more than 8 bytes: take the alignment's
                // own match (as long as a search would find it or nearly)
                // instead of searching. New content costs a bit test per
                // byte instead of a binary search over the window.
                let o = scan as isize + lastoffset;
                if (0..oldlen).contains(&o) {
                    (o as usize, matchlen(&old[o as usize..], &new[scan..]))
                } else {
                    (0, 0)
                }
            } else {
                search(&sa, &buckets, old, &new[scan..])
            };
            while scsc < scan + len {
                let o = scsc as isize + lastoffset;
                if (0..oldlen).contains(&o) && old[o as usize] == new[scsc] {
                    oldscore += 1;
                }
                scsc += 1;
            }
            if (len == oldscore && len != 0) || len > oldscore + 8 {
                break;
            }
            let o = scan as isize + lastoffset;
            if (0..oldlen).contains(&o) && old[o as usize] == new[scan] {
                oldscore -= 1;
            }
            scan += 1;
        }
        if len == oldscore && scan != new.len() {
            continue;
        }
        out.push((scan, pos));
        lastoffset = pos as isize - scan as isize;
    }
    out
}

/// The streams of the matches `matches` ([`matches`]), each extended
/// over differing bytes by `e`.
fn streams_of(old: &[u8], new: &[u8], matches: &[(usize, usize)], e: Extend) -> Streams {
    let mut out = Streams::default();
    let (mut lastscan, mut lastpos) = (0usize, 0usize);
    for &(scan, pos) in matches {
        // Extend the previous match forwards ...
        let (mut s, mut sf, mut lenf) = (0isize, 0isize, 0usize);
        let mut i = 0usize;
        while lastscan + i < scan && lastpos + i < old.len() {
            if old[lastpos + i] == new[lastscan + i] {
                s += 1;
            }
            i += 1;
            if s * e.den - i as isize * e.num > sf * e.den - lenf as isize * e.num {
                sf = s;
                lenf = i;
            }
        }
        // ... and this one backwards.
        let mut lenb = 0usize;
        if scan < new.len() {
            let (mut s, mut sb) = (0isize, 0isize);
            let mut i = 1;
            while scan >= lastscan + i && pos >= i {
                if old[pos - i] == new[scan - i] {
                    s += 1;
                }
                if s * e.den - i as isize * e.num > sb * e.den - lenb as isize * e.num {
                    sb = s;
                    lenb = i;
                }
                i += 1;
            }
        }
        // Where they overlap, split at the best point.
        if lastscan + lenf > scan - lenb {
            let overlap = lastscan + lenf - (scan - lenb);
            let (mut s, mut ss, mut lens) = (0isize, 0isize, 0usize);
            for i in 0..overlap {
                if new[lastscan + lenf - overlap + i] == old[lastpos + lenf - overlap + i] {
                    s += 1;
                }
                if new[scan - lenb + i] == old[pos - lenb + i] {
                    s -= 1;
                }
                if s > ss {
                    ss = s;
                    lens = i + 1;
                }
            }
            lenf = lenf + lens - overlap;
            lenb -= lens;
        }

        let extra_len = scan - lenb - (lastscan + lenf);
        offtout(lenf as i64, &mut out.ctrl);
        offtout(extra_len as i64, &mut out.ctrl);
        offtout(
            pos as i64 - lenb as i64 - (lastpos + lenf) as i64,
            &mut out.ctrl,
        );
        out.diff.extend(
            new[lastscan..lastscan + lenf]
                .iter()
                .zip(&old[lastpos..lastpos + lenf])
                .map(|(n, o)| n.wrapping_sub(*o)),
        );
        out.extra
            .extend_from_slice(&new[lastscan + lenf..lastscan + lenf + extra_len]);

        lastscan = scan - lenb;
        lastpos = pos - lenb;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_the_longest_match() {
        let old = b"the quick brown fox jumps over the lazy dog";
        let sa = suffix_array(old);
        let b = Buckets::new(old);
        assert_eq!(search(&sa, &b, old, b"the lazy cat"), (31, 9));
        assert_eq!(search(&sa, &b, old, b"quick"), (4, 5));
        assert_eq!(search(&sa, &b, old, b"#!").1, 0);
    }

    /// Every suffix of two bytes or more lies in its pair's bucket, and the
    /// buckets (with the one-byte last suffix) cover the whole array: a
    /// bucket off by one would make the search miss the longest match.
    #[test]
    fn buckets_hold_exactly_the_suffixes_of_their_pair() {
        let texts: [&[u8]; 5] = [
            b"the quick brown fox jumps over the lazy dog",
            &[0, 0, 0, 0, 0],
            &[255, 255, 0, 255],
            &[7],
            &[0, 1, 0, 1, 0, 1, 0, 255, 255, 1, 0],
        ];
        for old in texts {
            let sa = suffix_array(old);
            let b = Buckets::new(old);
            assert_eq!(b.start[PAIRS] as usize, old.len(), "{old:?}");
            for (idx, &p) in sa.iter().enumerate() {
                let p = p as usize;
                match b.range(&old[p..]) {
                    Some((lo, hi)) => assert!((lo..hi).contains(&idx), "{old:?} suffix {p}"),
                    None => assert_eq!(p, old.len() - 1, "{old:?} suffix {p} has no bucket"),
                }
            }
        }
    }

    #[test]
    fn bucketed_search_finds_the_same_match_as_the_full_search() {
        let old: Vec<u8> = (0..50_000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 29) as u8) & 0x3)
            .collect();
        let sa = suffix_array(&old);
        let b = Buckets::new(&old);
        let none = Buckets {
            start: vec![0; PAIRS + 1],
        };
        for start in (0..old.len() - 64).step_by(997) {
            let mut new = old[start..start + 64].to_vec();
            new[40] ^= 0x80;
            let (fpos, full) = search(&sa, &none, &old, &new);
            let (pos, len) = search(&sa, &b, &old, &new);
            let best = (0..old.len())
                .map(|p| matchlen(&old[p..], &new))
                .max()
                .unwrap();
            assert_eq!((len, full), (best, best), "start {start} at {fpos} {pos}");
            assert_eq!(matchlen(&old[pos..], &new), len);
        }
    }

    /// A gram of `old` reported absent would skip a search that could find
    /// a winning match; absent ones are mostly reported so (else no speed-up).
    #[test]
    fn grams_never_call_present_content_absent() {
        let old: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let g = Grams::new(&old);
        assert!(old.windows(GRAM).all(|w| !g.absent(w)));
        let other: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(40503) >> 7) as u8 ^ 0x5a)
            .collect();
        let absent = other.windows(GRAM).filter(|w| g.absent(w)).count();
        assert!(absent > other.len() * 8 / 10, "{absent} of {}", other.len());
        assert!(!g.absent(&old[..GRAM - 1]), "short input must be searched");
    }

    #[test]
    fn matchlen_counts_across_word_boundaries() {
        let a = b"0123456789abcdefXYZ";
        let mut b = a.to_vec();
        assert_eq!(matchlen(a, &b), a.len());
        b[13] = b'!';
        assert_eq!(matchlen(a, &b), 13);
        assert_eq!(matchlen(&a[..3], &b), 3);
    }
}
