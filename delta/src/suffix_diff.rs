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
//! bsdiff algorithm unchanged (so patches are as small as before), with two
//! speed-ups that do not change which match is found:
//!
//! - the binary search keeps the common prefix length of both bounds and
//!   compares from there, instead of re-comparing a long shared prefix at
//!   every step (long matches are the common case in deltas);
//! - byte comparisons go eight bytes at a time.
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

/// The source position whose suffix shares the longest prefix with `new`,
/// and that length (bsdiff's `search`). `sa` is non-empty.
fn search(sa: &[i32], old: &[u8], new: &[u8]) -> (usize, usize) {
    let at = |k: usize| sa[k] as usize;
    let (mut lo, mut hi) = (0, sa.len() - 1);
    let mut llo = matchlen(&old[at(lo)..], new);
    let mut lhi = matchlen(&old[at(hi)..], new);
    while hi - lo >= 2 {
        let mid = lo + (hi - lo) / 2;
        // Every suffix between lo and hi starts with new[..k].
        let k = llo.min(lhi);
        let s = &old[at(mid)..];
        let l = k + matchlen(&s[k..], &new[k..]);
        if l < s.len() && l < new.len() && s[l] < new[l] {
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

/// Diffs `new` against `old` (at most [`MAX_OLD`] bytes) with bsdiff's
/// algorithm.
///
/// Memory: `old.len() × 4` bytes of suffix array plus the output streams.
pub fn diff(old: &[u8], new: &[u8]) -> Streams {
    assert!(old.len() <= MAX_OLD, "bsdiff window over 2 GiB");
    let mut out = Streams::default();
    if old.is_empty() {
        if !new.is_empty() {
            offtout(0, &mut out.ctrl);
            offtout(new.len() as i64, &mut out.ctrl);
            offtout(0, &mut out.ctrl);
            out.extra.extend_from_slice(new);
        }
        return out;
    }
    let sa = suffix_array(old);

    let oldlen = old.len() as isize;
    let (mut scan, mut len, mut pos) = (0usize, 0usize, 0usize);
    let (mut lastscan, mut lastpos, mut lastoffset) = (0usize, 0usize, 0isize);
    while scan < new.len() {
        let mut oldscore = 0usize;
        scan += len;
        let mut scsc = scan;
        while scan < new.len() {
            (pos, len) = search(&sa, old, &new[scan..]);
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

        // Extend the previous match forwards ...
        let (mut s, mut sf, mut lenf) = (0isize, 0isize, 0usize);
        let mut i = 0usize;
        while lastscan + i < scan && lastpos + i < old.len() {
            if old[lastpos + i] == new[lastscan + i] {
                s += 1;
            }
            i += 1;
            if s * 2 - i as isize > sf * 2 - lenf as isize {
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
                if s * 2 - i as isize > sb * 2 - lenb as isize {
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
        lastoffset = pos as isize - scan as isize;
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
        assert_eq!(search(&sa, old, b"the lazy cat"), (31, 9));
        assert_eq!(search(&sa, old, b"quick"), (4, 5));
        assert_eq!(search(&sa, old, b"#!").1, 0);
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
