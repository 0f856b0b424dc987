//! `zero_runs`: the zero-run decoder of `BSDIFF` diff streams, reached
//! through `ota_delta::patch_streams::decode_bounded` as the apply engine
//! calls it, and checked against a reference decoder written here from the
//! layout in `docs/format.md`.
//!
//! `apply_op` reaches this parser too, but behind digests, manifests and a
//! compression layer the fuzzer rarely gets through with a malformed run
//! coding. Here the run coding itself is the fuzzed input: either arbitrary
//! bytes, or the generator's coding of arbitrary content with arbitrary
//! byte edits (near-valid codings reach the deep checks), with an arbitrary
//! unit (valid is 1..=16) and a declared length near the true one. It is
//! wrapped in a valid zstd frame (or an xz stream) between valid empty
//! control and extra streams.
//!
//! Checked:
//! - no panic, no abort, no allocation past libFuzzer's limits;
//! - `Ok` only if the reference decoder accepts the coding too, and then
//!   the decoded diff stream equals the reference's output, byte for byte,
//!   and is exactly the declared length;
//! - with zstd (whose frame the decoder accepts whatever the output size),
//!   every coding the reference accepts is accepted;
//! - the decoded streams hold at most `2 × dst_len + CTRL_SLACK` bytes.
//!
//! `OTA_FUZZ_TRACE=1` prints each input's outcome (accepted, or the error
//! with its numbers blanked) to tally what a corpus reaches.

#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ota_delta::patch_streams::{CTRL_SLACK, decode_bounded, zero_runs_encode, zero_runs_frame};

#[derive(Arbitrary, Debug)]
enum Coding {
    /// Arbitrary bytes as the run coding.
    Raw(Vec<u8>),
    /// The generator's coding of `content` (unit 1..=16), then each edit
    /// XORs one byte of it.
    Edited {
        content: Vec<u8>,
        edits: Vec<(u16, u8)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The unit the frame declares (the decoder must refuse 0 and > 16).
    unit: u8,
    coding: Coding,
    /// Added to the true length of `Edited` content (or the declared length
    /// of a `Raw` coding), to declare lengths that lie.
    len_delta: i16,
    /// The operation's output beyond the declared length.
    slack: u16,
    /// Wrap the coding in xz instead of zstd.
    xz: bool,
}

/// Reads a LEB128 varint below 2^64 of at most 10 bytes.
fn varint(p: &mut &[u8]) -> Option<u64> {
    let mut v: u128 = 0;
    for k in 0..10 {
        let b = *p.get(k)?;
        v |= u128::from(b & 0x7f) << (7 * k);
        if b & 0x80 == 0 {
            *p = &p[k + 1..];
            return u64::try_from(v).ok();
        }
    }
    None
}

/// The layout, decoded as plainly as it is described: a varint `P`, `P`
/// bytes of (zero units, literal units) varint pairs, each pair covering
/// at least one unit, then the literal units in order, then whatever bytes
/// complete the declared length. Anything else is `None`.
fn reference(coded: &[u8], len: usize, unit: usize) -> Option<Vec<u8>> {
    let mut p = coded;
    let pairs_len = usize::try_from(varint(&mut p)?).ok()?;
    let mut pairs = p.get(..pairs_len)?;
    let mut literals = &p[pairs_len..];
    let mut out = Vec::new();
    while !pairs.is_empty() {
        let zeros = varint(&mut pairs)? as u128;
        let lits = varint(&mut pairs)? as u128;
        if zeros + lits == 0 {
            return None;
        }
        if (out.len() as u128) + (zeros + lits) * unit as u128 > len as u128 {
            return None;
        }
        out.resize(out.len() + zeros as usize * unit, 0);
        let n = lits as usize * unit;
        out.extend_from_slice(literals.get(..n)?);
        literals = &literals[n..];
    }
    if out.len() + literals.len() != len {
        return None;
    }
    out.extend_from_slice(literals);
    Some(out)
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).expect("zstd compresses")
}

fn xz(data: &[u8]) -> Vec<u8> {
    common::xz(data, 0, 4096)
}

fuzz_target!(|input: Input| {
    let (coded, true_len) = match input.coding {
        Coding::Raw(bytes) => (bytes, 0usize),
        Coding::Edited { content, edits } => {
            let unit = usize::from(input.unit).clamp(1, 16);
            let mut coded = zero_runs_encode(&content, unit);
            for (at, x) in edits {
                let i = usize::from(at) % coded.len().max(1);
                if let Some(b) = coded.get_mut(i) {
                    *b ^= x;
                }
            }
            (coded, content.len())
        }
    };
    let len = (true_len as i64 + i64::from(input.len_delta)).clamp(0, 1 << 20) as usize;
    let dst_len = len + usize::from(input.slack);
    let inner = if input.xz { xz(&coded) } else { zstd(&coded) };
    let mut data = zstd(&[]);
    data.extend(zero_runs_frame(input.unit, len as u64, &inner));
    data.extend(zstd(&[]));

    let unit = usize::from(input.unit);
    let expected = if (1..=16).contains(&unit) && coded.len() <= len {
        reference(&coded, len, unit)
    } else {
        None
    };
    let r = decode_bounded(&data, dst_len);
    if std::env::var_os("OTA_FUZZ_TRACE").is_some() {
        // What the corpus reaches: each outcome with its numbers blanked,
        // so that runs can be tallied (`sort | uniq -c`).
        let what = match &r {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string().replace(|c: char| c.is_ascii_digit(), "#"),
        };
        eprintln!("zero_runs: {what}");
    }
    match r {
        Ok(dec) => {
            let want = expected
                .as_deref()
                .unwrap_or_else(|| panic!("accepted a coding the reference refuses: {coded:?}"));
            assert_eq!(dec.diff(), want, "decoded differently from the reference");
            assert_eq!(dec.diff().len(), len);
            assert!(
                dec.capacity() <= 2 * dst_len + CTRL_SLACK,
                "holds {} bytes",
                dec.capacity()
            );
        }
        Err(e) => {
            assert!(
                input.xz || expected.is_none(),
                "refused a coding the reference accepts ({e}): {coded:?}"
            );
        }
    }
});
