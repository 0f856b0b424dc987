//! `arm64`: the `arm64` codec's decoder of `BSDIFF` extra streams, reached
//! through `ota_delta::patch_streams::decode_bounded` as the apply engine
//! calls it, and the transform itself, both checked against a reference
//! written here from `docs/format.md` ("arm64-transformed stream").
//!
//! `apply_op` reaches this code too, but behind digests and a compression
//! layer; here the control entries (which place each extra segment in the
//! output), the base (any u64, or malformed varint bytes), the extra bytes
//! and a nested header are the fuzzed input, wrapped in valid zstd frames
//! (or an xz stream).
//!
//! Checked:
//! - no panic, no abort, no allocation past libFuzzer's limits;
//! - the transform is a bijection: `decode(encode(x, b), b) == x` for any
//!   bytes and base, and `encode` equals the reference;
//! - `Ok` only if the reference accepts (every control entry's extra bytes
//!   within the stream, a well-formed base, no nested header), and then the
//!   decoded extra stream is the original bytes;
//! - with zstd, every stream the reference accepts is accepted;
//! - the decoded streams hold at most `2 × dst_len + CTRL_SLACK` bytes.

#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ota_delta::arm64;
use ota_delta::patch_streams::{CTRL_SLACK, decode_bounded};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Control entries: diff bytes, extra bytes, seek.
    entries: Vec<(u16, u16, i32)>,
    /// Make this entry's extra count huge (past the stream, or overflowing).
    huge: Option<(u8, u64)>,
    extra: Vec<u8>,
    base: u64,
    /// These bytes instead of the base's varint (truncated, malformed).
    raw_base: Option<Vec<u8>>,
    /// The inner stream starts with the arm64 magic again.
    nested: bool,
    /// The operation's output beyond diff + extra.
    slack: u16,
    /// The inner stream as xz instead of zstd.
    xz: bool,
}

/// One word at position `p`, from the format page: BL's imm26 plus p/4
/// modulo 2^26; ADRP's imm21 (immhi:immlo), when it is a signed 18-bit
/// value, to the sign extension of (imm21 + floor(p/4096)) mod 2^18;
/// decoding subtracts. Written with signed arithmetic, unlike the crate.
fn ref_word(w: u32, p: u64, enc: bool) -> u32 {
    let sign: i64 = if enc { 1 } else { -1 };
    if w >> 26 == 0b100101 {
        let imm = i64::from(w & 0x03ff_ffff);
        let v = (imm + sign * ((p / 4) as i64 & 0x03ff_ffff)).rem_euclid(1 << 26);
        return (w & 0xfc00_0000) | v as u32;
    }
    if w & 0x9f00_0000 == 0x9000_0000 {
        let immlo = (w >> 29) & 3;
        let immhi = (w >> 5) & 0x7_ffff;
        let raw = (immhi << 2) | immlo; // 21 bits
        let imm = if raw & (1 << 20) != 0 {
            i64::from(raw) - (1 << 21)
        } else {
            i64::from(raw)
        };
        if !(-(1 << 17)..(1 << 17)).contains(&imm) {
            return w;
        }
        let mut v = (imm + sign * ((p / 4096) as i64 & 0x3_ffff)).rem_euclid(1 << 18);
        if v >= 1 << 17 {
            v -= 1 << 18;
        }
        let raw = (v as u32) & 0x1f_ffff;
        return (w & !((3 << 29) | (0x7_ffff << 5))) | ((raw & 3) << 29) | ((raw >> 2) << 5);
    }
    w
}

/// The transform of `buf` whose first byte is at position `base`.
fn ref_transform(buf: &mut [u8], base: u64, enc: bool) {
    for i in 0..buf.len() {
        let p = base.wrapping_add(i as u64);
        if p % 4 == 0 && i + 4 <= buf.len() {
            let w = u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
            buf[i..i + 4].copy_from_slice(&ref_word(w, p, enc).to_le_bytes());
        }
    }
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).expect("zstd compresses")
}

fn xz(data: &[u8]) -> Vec<u8> {
    common::xz(data, 0, 4096)
}

fuzz_target!(|input: Input| {
    // The transform alone: a bijection, equal to the reference.
    let mut t = input.extra.clone();
    arm64::encode(&mut t, input.base);
    let mut r = input.extra.clone();
    ref_transform(&mut r, input.base, true);
    assert_eq!(t, r, "encode differs from the reference");
    arm64::decode(&mut t, input.base);
    assert_eq!(t, input.extra, "decode(encode(x)) != x");

    // Control entries as stored: mix u64le, copy u64le, seek sign-magnitude,
    // transposed into 24 byte planes.
    let mut entries: Vec<(u64, u64, i64)> = input
        .entries
        .iter()
        .take(64)
        .map(|&(m, c, s)| (u64::from(m), u64::from(c), i64::from(s)))
        .collect();
    if let Some((i, n)) = input.huge
        && !entries.is_empty()
    {
        let i = usize::from(i) % entries.len();
        entries[i].1 = n;
    }
    let rows = entries.len();
    let mut planes = vec![0u8; rows * 24];
    for (r, &(m, c, s)) in entries.iter().enumerate() {
        let seek = if s < 0 {
            s.unsigned_abs() | 1 << 63
        } else {
            s as u64
        };
        let bytes = [m.to_le_bytes(), c.to_le_bytes(), seek.to_le_bytes()].concat();
        for (k, b) in bytes.into_iter().enumerate() {
            planes[k * rows + r] = b;
        }
    }
    // The reference's segments: (start in extra, length, output offset).
    let mut segments = Some(Vec::new());
    let (mut out, mut e) = (0u64, 0u64);
    for &(m, c, _) in &entries {
        let Some(o) = out.checked_add(m) else {
            segments = None;
            break;
        };
        if c > input.extra.len() as u64 - e {
            segments = None;
            break;
        }
        if let Some(s) = segments.as_mut() {
            s.push((e as usize, c as usize, o));
        }
        e += c;
        let Some(o) = o.checked_add(c) else {
            segments = None;
            break;
        };
        out = o;
    }
    let diff_len = entries
        .iter()
        .fold(0u64, |a, &(m, _, _)| a.saturating_add(m))
        .min(1 << 20) as usize;
    let dst_len = diff_len + input.extra.len() + usize::from(input.slack);

    // The extra stream, transformed as the generator does (the reference's
    // encoding of each segment at its output position).
    let mut transformed = input.extra.clone();
    for &(s, n, o) in segments.iter().flatten() {
        ref_transform(&mut transformed[s..s + n], input.base.wrapping_add(o), true);
    }
    let inner = if input.xz {
        xz(&transformed)
    } else {
        zstd(&transformed)
    };
    let mut data = zstd(&planes);
    data.extend(zstd(&vec![0u8; diff_len]));
    data.extend_from_slice(arm64::MAGIC);
    match &input.raw_base {
        Some(b) => data.extend_from_slice(b),
        None => data.extend(common::varint(input.base)),
    }
    if input.nested {
        data.extend_from_slice(arm64::MAGIC);
        data.extend(common::varint(0));
    }
    data.extend(inner);

    let well_formed = input.raw_base.is_none() && !input.nested && segments.is_some();
    match decode_bounded(&data, dst_len) {
        Ok(dec) => {
            assert!(
                input.raw_base.is_some() || (!input.nested && segments.is_some()),
                "accepted what the reference refuses: segments {segments:?}, nested {}",
                input.nested
            );
            if well_formed {
                assert_eq!(dec.extra(), &input.extra[..], "extra bytes not restored");
            }
            assert!(
                dec.capacity() <= 2 * dst_len + CTRL_SLACK,
                "holds {} bytes",
                dec.capacity()
            );
        }
        Err(err) => {
            assert!(
                !well_formed || input.xz,
                "refused a well-formed stream ({err}): {input:?}"
            );
        }
    }
});
