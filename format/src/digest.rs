//! SHA-256 digests, serialized as lowercase hex.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest. Every byte string the format pins (images, payloads,
/// operation data, operation outputs, source windows) is pinned by one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// Lowercase hex form, as used in JSON and URLs.
    pub fn to_hex(&self) -> String {
        let mut buf = [0u8; 64];
        self.hex_into(&mut buf).to_string()
    }

    /// Writes the lowercase hex form into `buf`, without allocating (the
    /// check-in path serializes and parses digests on every request).
    fn hex_into<'b>(&self, buf: &'b mut [u8; 64]) -> &'b str {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in self.0.iter().enumerate() {
            buf[2 * i] = DIGITS[usize::from(b >> 4)];
            buf[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        // Only ASCII hex digits were written.
        std::str::from_utf8(buf).expect("hex digits are ASCII")
    }

    /// Digest of `len` zero bytes, without allocating them.
    pub fn of_zeros(len: u64) -> Self {
        let block = [0u8; 64 << 10];
        let mut h = Sha256::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            h.update(&block[..n]);
            left -= n as u64;
        }
        Digest(h.finalize().into())
    }
}

impl From<Sha256> for Digest {
    fn from(h: Sha256) -> Self {
        Digest(h.finalize().into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex_into(&mut [0; 64]))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex_into(&mut [0; 64]))
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a sha256 digest (want 64 hex digits): {0:?}")]
pub struct BadDigest(String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let bad = || BadDigest(s.chars().take(80).collect());
        let Ok(b) = <&[u8; 64]>::try_from(s.as_bytes()) else {
            return Err(bad());
        };
        let mut out = [0u8; 32];
        // Invalid digits are collected and checked once, after the loop.
        let mut invalid = 0;
        for (i, o) in out.iter_mut().enumerate() {
            let (hi, lo) = (
                HEX_VALUE[usize::from(b[2 * i])],
                HEX_VALUE[usize::from(b[2 * i + 1])],
            );
            invalid |= hi | lo;
            *o = hi << 4 | lo;
        }
        if invalid & INVALID != 0 {
            return Err(bad());
        }
        Ok(Digest(out))
    }
}

/// Marks a byte that is not a hex digit in [`HEX_VALUE`] (any value with
/// this bit set; digits are 0..=15).
const INVALID: u8 = 0x80;

/// Value of each byte as a hex digit (either case), or [`INVALID`]. A table
/// because every check-in's `freshness_held` is parsed through it.
const HEX_VALUE: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex_into(&mut [0; 64]))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than `Cow<str>`, which serde always deserializes
        // into an owned `String`: parsing straight from the input's bytes
        // saves an allocation and a copy per digest.
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 digest (64 hex digits)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Digest, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_digest_matches_materialised_zeros() {
        for len in [0u64, 1, 4096, (64 << 10) + 3, 1 << 20] {
            assert_eq!(Digest::of_zeros(len), Digest::of(&vec![0u8; len as usize]));
        }
    }

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let d = Digest::of(b"edge-ota");
        assert_eq!(d.to_hex().parse::<Digest>().unwrap(), d);
        assert!("abc".parse::<Digest>().is_err());
        assert!("zz".repeat(32).parse::<Digest>().is_err());
        // One bad digit anywhere, either half of a byte; non-ASCII of the
        // right byte length.
        let good = d.to_hex();
        for i in [0, 1, 31, 62, 63] {
            for c in ["g", "/", ":", "G", " "] {
                let mut s = good.clone();
                s.replace_range(i..i + 1, c);
                assert!(s.parse::<Digest>().is_err(), "{s}");
            }
        }
        assert!(format!("é{}", &good[2..]).parse::<Digest>().is_err());
        assert_eq!(good.to_uppercase().parse::<Digest>().unwrap(), d);
        assert_eq!(format!("{d}"), good);
        assert_eq!(format!("{d:?}"), format!("sha256:{good}"));
        // Every byte value survives the table.
        let all = Digest(std::array::from_fn(|i| (i * 8 + 7) as u8));
        assert_eq!(all.to_hex().parse::<Digest>().unwrap(), all);
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), all);
        // Escaped JSON strings (not borrowable) parse too.
        let escaped = format!("\"\\u0030{}\"", &good[1..]);
        let zero_first = format!("0{}", &good[1..]).parse::<Digest>().unwrap();
        assert_eq!(
            serde_json::from_str::<Digest>(&escaped).unwrap(),
            zero_first
        );
        assert!(serde_json::from_str::<Digest>("12").is_err());
    }
}
