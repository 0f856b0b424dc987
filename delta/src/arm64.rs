//! The `arm64` codec's transform: branch-with-link and ADRP immediates of
//! AArch64 code made absolute, so that the many calls of one function and
//! the many references to one page become the same bytes again
//! ([`ota_format::manifest::CODEC_ARM64`], `docs/format.md`, "Codecs").
//!
//! A64 instructions are 4-byte little-endian words at 4-byte-aligned
//! addresses. Two of them carry a PC-relative immediate that differs at
//! every call site even when the target is the same:
//!
//! - `BL imm26` (`1001 01ii …`, `word & 0xFC00_0000 == 0x9400_0000`):
//!   target = PC + 4 × imm26. The transform stores (imm26 + PC/4) mod 2²⁶.
//! - `ADRP Xd, imm21` (`1ii1 0000 iiii …`, `word & 0x9F00_0000 ==
//!   0x9000_0000`; immlo in bits 29–30, immhi in bits 5–23): target page =
//!   PC/4096 + imm21. The transform stores (imm21 + PC/4096) with the
//!   arithmetic done modulo 2¹⁸, and only on immediates whose signed value
//!   fits 18 bits (±128 Ki pages, ±512 MiB: any ADRP within one binary).
//!   Outside code, bytes that happen to match the ADRP pattern are common
//!   (about 1 in 8 words of data has those bits); leaving the ones with
//!   large immediates alone spares most of them, and the set of words with
//!   an 18-bit immediate maps onto itself, so the transform stays a bijection.
//!
//! "PC" is the word's position: the offset of its first byte in the buffer
//! plus a `base`. Only words whose position is a multiple of 4 are
//! transformed (a buffer's leading bytes before the first such position and
//! its trailing bytes after the last whole word are left alone), so
//! [`decode`]`(`[`encode`]`(x, b), b) == x` for every buffer and every base,
//! and both work in place without allocating. The generator uses the
//! operation's destination offset in the image as the base (for a bsdiff
//! extra stream, the output offset of each extra segment: [`extra_segments`]);
//! file offsets of code agree with its addresses modulo the page size in ELF
//! and Mach-O binaries, which is what ADRP's page arithmetic needs.

/// Magic of an arm64-transformed stream ("A64", layout 1): then the base (a
/// LEB128 varint), then one zstd, bzip2 or xz stream of the transformed
/// bytes.
pub const MAGIC: &[u8] = b"A64\x01";

const BL_MASK: u32 = 0xFC00_0000;
const BL_OP: u32 = 0x9400_0000;
const BL_IMM: u32 = 0x03FF_FFFF;
const ADRP_MASK: u32 = 0x9F00_0000;
const ADRP_OP: u32 = 0x9000_0000;
/// Immediates of 18 bits, as their offset into the 21-bit field.
const ADRP_RANGE_BITS: u32 = 18;
const ADRP_WRAP: u32 = (1 << ADRP_RANGE_BITS) - 1;
const ADRP_SIGN: u32 = 1 << (ADRP_RANGE_BITS - 1);

/// One word at position `pos`, transformed (`enc`) or restored.
#[inline]
fn convert(word: u32, pos: u64, enc: bool) -> u32 {
    if word & BL_MASK == BL_OP {
        let pc = (pos >> 2) as u32;
        let imm = word & BL_IMM;
        let v = if enc {
            imm.wrapping_add(pc)
        } else {
            imm.wrapping_sub(pc)
        };
        return BL_OP | (v & BL_IMM);
    }
    if word & ADRP_MASK == ADRP_OP {
        let imm = ((word >> 29) & 3) | ((word >> 3) & 0x001F_FFFC);
        // In range: bits 17..=20 all equal (a signed 18-bit value). The
        // output is in range too (sign-extended below), so the set maps
        // onto itself.
        if (imm.wrapping_add(ADRP_SIGN)) & (0x001F_FFFF & !ADRP_WRAP) != 0 {
            return word;
        }
        let page = (pos >> 12) as u32;
        let v = if enc {
            imm.wrapping_add(page)
        } else {
            imm.wrapping_sub(page)
        } & ADRP_WRAP;
        // Sign-extend the 18-bit result to 21 bits.
        let v = v.wrapping_sub((v & ADRP_SIGN) << 1) & 0x001F_FFFF;
        return (word & !0x60FF_FFE0) | ((v & 3) << 29) | ((v >> 2) << 5);
    }
    word
}

fn run(buf: &mut [u8], base: u64, enc: bool) {
    let first = (base.wrapping_neg() & 3) as usize;
    if first >= buf.len() {
        return;
    }
    let mut pos = base.wrapping_add(first as u64);
    for w in buf[first..].chunks_exact_mut(4) {
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let c = convert(word, pos, enc);
        if c != word {
            w.copy_from_slice(&c.to_le_bytes());
        }
        pos = pos.wrapping_add(4);
    }
}

/// Transforms `buf`, whose first byte is at position `base`, in place.
pub fn encode(buf: &mut [u8], base: u64) {
    run(buf, base, true);
}

/// Inverse of [`encode`] with the same `base`, in place.
pub fn decode(buf: &mut [u8], base: u64) {
    run(buf, base, false);
}

/// The extra segments of a bsdiff patch whose control entries are stored
/// transposed in `ctrl_planes` (see `patch_streams`), as `(start in the
/// extra stream, length, offset in the operation's output)`, for an extra
/// stream of `extra_len` bytes. The extra bytes of an entry follow its diff
/// bytes in the output, so each segment is transformed at its own output
/// position: code keeps its alignment and its PC whatever the segments'
/// lengths. Errors (control entries that cover more extra bytes than the
/// stream has, or overflow) are reported as a reason; nothing is allocated.
pub fn extra_segments(
    ctrl_planes: &[u8],
    extra_len: usize,
    mut f: impl FnMut(usize, usize, u64),
) -> Result<(), String> {
    const CTRL: usize = 24;
    if ctrl_planes.len() % CTRL != 0 {
        return Err("control stream is not a whole number of entries".into());
    }
    let rows = ctrl_planes.len() / CTRL;
    let field = |r: usize, at: usize| -> u64 {
        let mut b = [0u8; 8];
        for (k, x) in b.iter_mut().enumerate() {
            *x = ctrl_planes[(at + k) * rows + r];
        }
        u64::from_le_bytes(b)
    };
    let (mut out, mut e) = (0u64, 0usize);
    for r in 0..rows {
        let (mix, copy) = (field(r, 0), field(r, 8));
        out = out
            .checked_add(mix)
            .ok_or("control entries overflow the output")?;
        let left = (extra_len - e) as u64;
        if copy > left {
            return Err(format!(
                "control entry {r} takes {copy} extra bytes, {left} are left"
            ));
        }
        if copy > 0 {
            f(e, copy as usize, out);
        }
        e += copy as usize;
        out = out
            .checked_add(copy)
            .ok_or("control entries overflow the output")?;
    }
    Ok(())
}

/// Synthetic AArch64 code for tests: `words` instructions at positions
/// `base`, `base + 4`, … — calls (BL) to a few dozen functions, ADRPs of a
/// few pages, and other instructions of a small vocabulary, as compilers
/// emit them. Its BL and ADRP immediates differ at every site; made
/// absolute they repeat.
#[doc(hidden)]
pub fn synthetic_code(words: usize, base: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let funcs: Vec<u64> = (0..48)
        .map(|_| base + (next() % (words as u64 + 1)) * 4)
        .collect();
    let pages: Vec<u64> = (0..12)
        .map(|_| (base >> 12) + next() % (words as u64 / 1024 + 64))
        .collect();
    let vocab: Vec<u32> = (0..40)
        .map(|_| (next() as u32) & 0x6BFF_FFFF | 0x0A00_0000)
        .collect();
    let mut out = Vec::with_capacity(words * 4);
    for k in 0..words as u64 {
        let pos = base + 4 * k;
        let r = next();
        let w = match r % 8 {
            0 => {
                let t = funcs[(r >> 8) as usize % funcs.len()];
                BL_OP | ((t.wrapping_sub(pos) >> 2) as u32 & BL_IMM)
            }
            1 => {
                let p = pages[(r >> 8) as usize % pages.len()];
                let imm = (p.wrapping_sub(pos >> 12) as u32) & 0x1F_FFFF;
                ADRP_OP | ((imm & 3) << 29) | ((imm >> 2) << 5) | (r >> 40) as u32 & 0x1F
            }
            _ => vocab[(r >> 8) as usize % vocab.len()],
        };
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bl_and_adrp_become_absolute() {
        // BL +8 at 0x1000 and BL -0xff8 at 0x2000: both call 0x1008.
        let a = 0x9400_0002u32;
        let b = BL_OP | ((-(0xff8i32 / 4)) as u32 & BL_IMM);
        assert_eq!(convert(a, 0x1000, true), convert(b, 0x2000, true));
        // ADRP x0, page +1 at 0x1000 and ADRP x0, page 0 at 0x2000.
        let adrp = |imm: u32, rd: u32| ADRP_OP | ((imm & 3) << 29) | ((imm >> 2) << 5) | rd;
        assert_eq!(
            convert(adrp(1, 0), 0x1000, true),
            convert(adrp(0, 0), 0x2ff0, true)
        );
        // The register is kept.
        assert_eq!(convert(adrp(5, 17), 0x7000, true) & 0x1f, 17);
        // A negative immediate in range, and one out of range left alone.
        let neg = adrp(0x1F_FFFF, 3); // -1 page
        assert_eq!(convert(neg, 0x5000, true), adrp(4, 3));
        let far = adrp(0x04_0000, 3); // +2^18 pages: out of range
        assert_eq!(convert(far, 0x5000, true), far);
        // Other words are left alone.
        assert_eq!(convert(0xD65F_03C0, 0x1234, true), 0xD65F_03C0); // ret
    }

    #[test]
    fn every_word_of_the_two_kinds_round_trips() {
        // Every immediate of the two patterns at a few positions, and
        // neighbouring words that must not change.
        for pos in [0u64, 4, 0xFFC, 0x1000, 0x7FFF_F000, u64::MAX - 3] {
            for imm in (0..1u32 << 26).step_by(4099) {
                let w = BL_OP | imm;
                assert_eq!(convert(convert(w, pos, true), pos, false), w);
            }
            for imm in (0..1u32 << 21)
                .step_by(7)
                .chain([0x1F_FFFF, 0x2_0000, 0x1D_FFFF])
            {
                for other in [0u32, 0x1F, 0x11] {
                    let w = ADRP_OP | ((imm & 3) << 29) | ((imm >> 2) << 5) | other;
                    let e = convert(w, pos, true);
                    assert_eq!(e & ADRP_MASK, ADRP_OP);
                    assert_eq!(convert(e, pos, false), w, "{w:#x} at {pos:#x}");
                }
            }
        }
    }

    fn check(data: &[u8], base: u64) {
        let mut b = data.to_vec();
        encode(&mut b, base);
        assert_eq!(b.len(), data.len());
        let first = (base.wrapping_neg() & 3) as usize;
        // Bytes outside whole aligned words are untouched.
        let first = first.min(data.len());
        assert_eq!(b[..first], data[..first]);
        let tail = first + (data.len() - first) / 4 * 4;
        assert_eq!(b[tail..], data[tail..]);
        decode(&mut b, base);
        assert_eq!(b, data);
    }

    #[test]
    fn short_buffers_round_trip_at_every_alignment() {
        let words: Vec<u8> = [0x9400_0001u32, 0x9000_0020, 0xB000_0041, 0x97FF_FFFF]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        for len in 0..16 {
            for base in 0..8u64 {
                check(&words[..len], base);
                check(&words[..len], u64::MAX - base);
                check(&vec![0x94; len], base);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..16), base: u64) {
            check(&data, base);
        }

        #[test]
        fn random_big_buffers_round_trip(data in proptest::collection::vec(any::<u8>(), 0..70_000), base: u64) {
            check(&data, base);
        }

        /// Buffers made of the two instruction patterns only.
        #[test]
        fn random_code_round_trips(words in proptest::collection::vec(any::<u32>(), 0..4096), base: u64, cut in 0usize..4) {
            let mut data: Vec<u8> = words
                .iter()
                .map(|w| if w & 1 == 0 { BL_OP | (w & BL_IMM) } else { ADRP_OP | (w & 0x60FF_FFFF) })
                .flat_map(|w| w.to_le_bytes())
                .collect();
            data.truncate(data.len().saturating_sub(cut));
            check(&data, base);
        }

        /// Decoding with another base does not give the input back (where a
        /// word of either kind is in it): the operation's hash catches a
        /// wrong base.
        #[test]
        fn another_base_decodes_to_other_bytes(imm in 0u32..1 << 26, base in 0u64..1 << 40, other in 1u64..1 << 20) {
            let data = (BL_OP | imm).to_le_bytes();
            let mut b = data;
            encode(&mut b, base * 4);
            decode(&mut b, (base + other) * 4);
            prop_assert_ne!(b, data);
        }
    }

    #[test]
    fn synthetic_code_compresses_smaller_transformed() {
        let base = 0x41_2000;
        let code = synthetic_code(100_000, base, 7);
        let mut t = code.clone();
        encode(&mut t, base);
        let plain = zstd::bulk::compress(&code, 9).unwrap().len();
        let coded = zstd::bulk::compress(&t, 9).unwrap().len();
        assert!(coded * 10 < plain * 9, "{coded} !< 0.9 x {plain}");
        decode(&mut t, base);
        assert_eq!(t, code);
    }

    #[test]
    fn extra_segments_follow_the_output() {
        // Two entries: (mix 3, copy 5), (mix 2, copy 4).
        let mut rows = [[0u8; 24]; 2];
        rows[0][0] = 3;
        rows[0][8] = 5;
        rows[1][0] = 2;
        rows[1][8] = 4;
        let mut planes = vec![0u8; 48];
        for (r, row) in rows.iter().enumerate() {
            for (b, &x) in row.iter().enumerate() {
                planes[b * 2 + r] = x;
            }
        }
        let mut seen = Vec::new();
        extra_segments(&planes, 9, |e, n, o| seen.push((e, n, o))).unwrap();
        assert_eq!(seen, [(0, 5, 3), (5, 4, 10)]);
        // More extra bytes than the stream has: refused.
        assert!(extra_segments(&planes, 8, |_, _, _| {}).is_err());
        assert!(extra_segments(&planes[..47], 9, |_, _, _| {}).is_err());
        // Overflowing counts: refused, no panic.
        planes[7 * 2] = 0xFF;
        for b in 0..8 {
            planes[b * 2 + 1] = 0xFF;
        }
        assert!(extra_segments(&planes, 9, |_, _, _| {}).is_err());
    }
}
