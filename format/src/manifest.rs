//! The manifest: what an update produces, from what, and by which operations.
//!
//! A manifest arrives as untrusted bytes. [`Manifest::from_json`] parses it
//! under size limits and then [`Manifest::validate`] establishes every
//! invariant the apply engine relies on, so that engine never has to re-check
//! structure: operations cover the target exactly once, in order, and their
//! data ranges tile the payload exactly once, in order.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::limits::*;

/// Version of this format. Bumped on any incompatible change; an agent refuses
/// versions it does not know rather than guessing.
pub const FORMAT_VERSION: u32 = 1;

/// The codec name of xz (LZMA2) streams in `BSDIFF` data.
pub const CODEC_XZ: &str = "xz";

/// The codec name of zero-run-coded diff streams in `BSDIFF` data: the
/// stream's runs of zero and other 4-byte units, coded as varint pairs and
/// literals, in an inner zstd, bzip2 or xz stream (`docs/format.md`,
/// "Codecs"). Agents older than it refuse a manifest that lists it.
pub const CODEC_ZERO_RUNS: &str = "zero-runs";

/// The codec name of arm64-transformed data: `REPLACE` data and `BSDIFF`
/// extra streams whose AArch64 BL and ADRP immediates were made absolute
/// before compression (magic `A64` 1, a base, then a zstd, bzip2 or xz
/// stream; `docs/format.md`, "Codecs"). Agents older than it refuse a
/// manifest that lists it.
pub const CODEC_ARM64: &str = "arm64";

/// The codec name of compression frames: the `BSDIFF` operations that
/// name one data range share it as a frame, their control, diff and extra
/// streams each in one stream across the frame, so that compression keeps
/// its context from one operation to the next (magic `FRM` 1, the members'
/// stream lengths, then three streams; `docs/format.md`, "Codecs"). Agents
/// older than it refuse a manifest that lists it.
pub const CODEC_FRAMES: &str = "frames";

/// Codecs beyond format version 1's zstd and bzip2 that this build decodes.
/// An agent advertises them in its check-in
/// ([`crate::api::CheckinRequest::delta_codecs`]) and refuses a manifest
/// that lists any other ([`Manifest::codecs`]).
pub const CODECS: &[&str] = &[CODEC_XZ, CODEC_ZERO_RUNS, CODEC_ARM64, CODEC_FRAMES];

/// The bundle formats of clients that fetch a bundle of their own rather
/// than an edge-ota payload (hawkBit DDI targets: SWUpdate, RAUC), as the
/// server's DDI API names them in the check-ins it makes for those targets.
/// An `ota-agent` never lists them.
pub const BUNDLE_CODECS: &[&str] = &["bundle:swu", "bundle:raucb", "bundle:file"];

/// Every name a [`Codecs`] set can hold: [`CODECS`], then
/// [`BUNDLE_CODECS`] (one bit each, in this order).
const KNOWN_CODECS: &[&str] = &[
    CODEC_XZ,
    CODEC_ZERO_RUNS,
    CODEC_ARM64,
    CODEC_FRAMES,
    "bundle:swu",
    "bundle:raucb",
    "bundle:file",
];

/// Every codec this build decodes ([`CODECS`]), as a check-in carries them.
pub fn codecs() -> Codecs {
    Codecs((1u8 << CODECS.len()) - 1)
}

/// A set of codecs of [`CODECS`]: what a check-in says its agent decodes
/// ([`crate::api::CheckinRequest::delta_codecs`]). In JSON a list of names.
/// Names this build does not know are ignored when parsing (a newer agent
/// lists codecs an older server cannot produce: of no use to it); a
/// manifest, by contrast, refuses them ([`Manifest::validate`]).
///
/// A bit set rather than a `Vec<String>`: every check-in of every agent
/// carries it, and the server parses it without allocating.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Codecs(u8);

const _: () = assert!(KNOWN_CODECS.len() <= 8, "Codecs holds one bit per codec");

impl Codecs {
    /// No codec beyond zstd and bzip2 (what agents older than the field
    /// decode).
    pub const NONE: Codecs = Codecs(0);

    /// Every bundle format ([`BUNDLE_CODECS`]): what the DDI API's
    /// check-ins for a DDI target carry.
    pub fn bundles() -> Codecs {
        Codecs(((1u8 << BUNDLE_CODECS.len()) - 1) << CODECS.len())
    }

    /// Whether the set holds the codec named `name`.
    pub fn contains(self, name: &str) -> bool {
        KNOWN_CODECS
            .iter()
            .position(|c| *c == name)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The codecs in both sets.
    pub fn intersection(self, other: Codecs) -> Codecs {
        Codecs(self.0 & other.0)
    }

    /// The set as bits (one per name of [`KNOWN_CODECS`]), to keep in an
    /// atomic; [`Codecs::from_bits`] reads them back.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The set of [`Codecs::bits`].
    pub fn from_bits(bits: u8) -> Codecs {
        Codecs(bits)
    }

    /// The names in the set, [`CODECS`] first, then [`BUNDLE_CODECS`].
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        KNOWN_CODECS
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, c)| *c)
    }
}

impl std::fmt::Debug for Codecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Serialize for Codecs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for Codecs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, SeqAccess, Visitor};
        /// One name: its bit in the set (0 for a name this build does not
        /// know), read without allocating.
        struct Name(u8);
        impl<'de> Deserialize<'de> for Name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = Name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a codec name")
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<Name, E> {
                        Ok(Name(
                            KNOWN_CODECS
                                .iter()
                                .position(|c| *c == s)
                                .map_or(0, |i| 1 << i),
                        ))
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct Set;
        impl<'de> Visitor<'de> for Set {
            type Value = Codecs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of codec names")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Codecs, A::Error> {
                let mut bits = 0;
                // Bounded by the request's size limit, like every list in it.
                while let Some(Name(b)) = seq.next_element()? {
                    bits |= b;
                }
                Ok(Codecs(bits))
            }
        }
        d.deserialize_seq(Set)
    }
}

/// The operation kinds. See `docs/format.md` for the exact data each carries.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OpKind {
    /// Destination = concatenation of the source extents. No data.
    Copy,
    /// Destination = zeros. No data.
    Zero,
    /// Destination = zstd-decompressed data.
    Replace,
    /// Destination = bspatch(concatenation of source extents, zstd-decompressed data).
    Bsdiff,
}

impl OpKind {
    /// Upper-case name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Copy => "COPY",
            OpKind::Zero => "ZERO",
            OpKind::Replace => "REPLACE",
            OpKind::Bsdiff => "BSDIFF",
        }
    }
    /// Whether the operation carries payload data.
    pub fn has_data(self) -> bool {
        matches!(self, OpKind::Replace | OpKind::Bsdiff)
    }
    /// Whether the operation reads the source image.
    pub fn reads_source(self) -> bool {
        matches!(self, OpKind::Copy | OpKind::Bsdiff)
    }
}

/// A byte range of an image: `[offset, offset + length)`. Serialized as a
/// two-element array to keep manifests with thousands of extents small.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(from = "(u64, u64)", into = "(u64, u64)")]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn new(offset: u64, length: u64) -> Self {
        Extent { offset, length }
    }
    /// One past the last byte, or `None` on overflow (hostile input).
    pub fn checked_end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
    /// One past the last byte. Only for validated extents.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

impl From<(u64, u64)> for Extent {
    fn from((offset, length): (u64, u64)) -> Self {
        Extent { offset, length }
    }
}

impl From<Extent> for (u64, u64) {
    fn from(e: Extent) -> Self {
        (e.offset, e.length)
    }
}

/// Where an operation's data lies in the payload, and its digest.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DataRange {
    pub offset: u64,
    pub length: u64,
    pub sha256: Digest,
}

/// One independent step: produce `dst` of the target image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub kind: OpKind,
    /// The target bytes this operation produces. Never overlaps another
    /// operation's `dst`, which is what makes operations independent.
    pub dst: Extent,
    /// Source extents read (`COPY`, `BSDIFF`), concatenated in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src: Vec<Extent>,
    /// Digest of the concatenated source extents (`BSDIFF`). For `COPY`,
    /// `dst_sha256` already pins the source bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_sha256: Option<Digest>,
    /// The operation's data in the payload (`REPLACE`, `BSDIFF`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataRange>,
    /// Digest of the `dst` bytes once applied. Also how a resumed agent tells
    /// whether an operation it believes done really is.
    pub dst_sha256: Digest,
}

impl Operation {
    /// Checks what can be checked of one operation on its own: its fields
    /// fit its kind, nothing is empty or overflows, it is within the
    /// engine's memory limits, and its source extents lie below `src_size`
    /// (`None`: the update has no source image). [`Manifest::validate`] calls
    /// it for every operation; the apply engine calls it again so that an
    /// operation that bypassed validation cannot make it misbehave.
    pub fn check_shape(&self, src_size: Option<u64>) -> Result<(), String> {
        let op = self;
        if op.dst.length == 0 || op.dst.checked_end().is_none() {
            return Err("empty or overflowing dst".into());
        }
        if op.kind.reads_source() {
            let Some(src_size) = src_size else {
                return Err(format!(
                    "{} needs a source image but the manifest has no `from`",
                    op.kind.name()
                ));
            };
            if op.src.is_empty() || op.src.len() > MAX_SRC_EXTENTS {
                return Err(format!(
                    "needs 1..={MAX_SRC_EXTENTS} source extents, has {}",
                    op.src.len()
                ));
            }
            let mut total = 0u64;
            for e in &op.src {
                let end = e.checked_end().ok_or("src extent overflows")?;
                if e.length == 0 || end > src_size {
                    return Err(format!(
                        "src extent [{}, {end}) is empty or past the source size {src_size}",
                        e.offset
                    ));
                }
                total = total.checked_add(e.length).ok_or("src overflows")?;
            }
            match op.kind {
                OpKind::Copy if total != op.dst.length => {
                    return Err(format!(
                        "COPY reads {total} bytes but writes {}",
                        op.dst.length
                    ));
                }
                OpKind::Bsdiff if total > MAX_BSDIFF_WINDOW => {
                    return Err(format!(
                        "BSDIFF source window {total} over the limit {MAX_BSDIFF_WINDOW}"
                    ));
                }
                _ => {}
            }
        } else if !op.src.is_empty() {
            return Err(format!("{} takes no source extents", op.kind.name()));
        }
        if (op.kind == OpKind::Bsdiff) != op.src_sha256.is_some() {
            return Err("src_sha256 is required for BSDIFF and only for it".into());
        }
        match (&op.data, op.kind.has_data()) {
            (None, true) => return Err(format!("{} needs data", op.kind.name())),
            (Some(_), false) => return Err(format!("{} takes no data", op.kind.name())),
            (Some(d), true) => {
                if d.length == 0
                    || d.length > MAX_OP_DATA
                    || d.offset.checked_add(d.length).is_none()
                {
                    return Err(format!("data length {} not in 1..={MAX_OP_DATA}", d.length));
                }
                if op.dst.length > MAX_BUFFERED_DST {
                    return Err(format!(
                        "{} dst of {} bytes over the limit {MAX_BUFFERED_DST}",
                        op.kind.name(),
                        op.dst.length
                    ));
                }
            }
            (None, false) => {}
        }
        Ok(())
    }

    /// Total bytes of source read.
    pub fn src_len(&self) -> u64 {
        self.src.iter().map(|e| e.length).sum()
    }
}

/// One image version: the source or the target of an update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub version: String,
    pub size: u64,
    pub sha256: Digest,
}

/// Size and digest of the whole payload.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    pub size: u64,
    pub sha256: Digest,
}

/// The signed description of one update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub device_type: String,
    /// The image this delta applies to; absent for a full image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<ImageRef>,
    pub to: ImageRef,
    /// Monotonic anti-rollback counter: an agent never installs a manifest
    /// whose counter is below the one it runs, even if the version string
    /// looks newer, so a leaked old-but-signed manifest cannot downgrade.
    pub security_counter: u64,
    /// RFC 3339 UTC time after which the manifest is refused. Bounds how long a
    /// captured manifest can be replayed (freeze attacks).
    pub expires_at: String,
    pub payload: PayloadInfo,
    /// Codecs beyond zstd and bzip2 that the payload's data uses (see
    /// [`CODECS`]); absent when none. An agent that does not know one
    /// refuses the manifest before fetching anything: agents older than
    /// this field refuse it as an unknown field, newer ones by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codecs: Vec<String>,
    pub operations: Vec<Operation>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {size} bytes, over the {limit}-byte limit: refusing to parse it")]
    TooLarge { size: usize, limit: usize },
    #[error("manifest is not valid JSON for format version {FORMAT_VERSION}: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "manifest format version {found} is not supported (this build reads {FORMAT_VERSION}); upgrade the agent"
    )]
    UnsupportedVersion { found: u32 },
    #[error(
        "manifest needs codec {0:?}, which this agent cannot decode: upgrade the agent (the server offers agents that do not advertise a codec a payload without it)"
    )]
    UnsupportedCodec(String),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error("manifest operation {op} is invalid: {reason}")]
    InvalidOp { op: usize, reason: String },
    #[error("manifest expired at {expires_at} (now {now}): ask the server for a fresh one")]
    Expired { expires_at: String, now: String },
}

fn op_err(op: usize, reason: impl Into<String>) -> ManifestError {
    ManifestError::InvalidOp {
        op,
        reason: reason.into(),
    }
}

impl Manifest {
    /// Parses untrusted JSON and validates it. Never panics.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        let m: Manifest = serde_json::from_slice(bytes)?;
        m.validate()?;
        Ok(m)
    }

    /// Deterministic serialization: fixed field order, no whitespace.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serialization cannot fail")
    }

    /// The expiry as a time.
    pub fn expiry(&self) -> Result<SystemTime, ManifestError> {
        humantime::parse_rfc3339(&self.expires_at)
            .map_err(|e| ManifestError::Invalid(format!("expires_at {:?}: {e}", self.expires_at)))
    }

    /// Formats a time as the manifest's `expires_at`.
    pub fn format_time(t: SystemTime) -> String {
        humantime::format_rfc3339_seconds(t).to_string()
    }

    /// Refuses a manifest past its expiry.
    pub fn check_expiry(&self, now: SystemTime) -> Result<(), ManifestError> {
        if now > self.expiry()? {
            return Err(ManifestError::Expired {
                expires_at: self.expires_at.clone(),
                now: Self::format_time(now),
            });
        }
        Ok(())
    }

    /// Establishes the invariants the apply engine relies on:
    /// - operations are sorted by destination and tile `[0, to.size)` exactly;
    /// - their data ranges tile `[0, payload.size)` exactly, in order, except
    ///   that an operation may name exactly the data of an earlier one;
    /// - each operation has exactly the fields its kind needs, within limits;
    /// - source extents lie inside the source image.
    pub fn validate(&self) -> Result<(), ManifestError> {
        use ManifestError::Invalid;
        if self.format_version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                found: self.format_version,
            });
        }
        if let Some(c) = self.codecs.iter().find(|c| !CODECS.contains(&c.as_str())) {
            return Err(ManifestError::UnsupportedCodec(c.clone()));
        }
        for (what, s) in [
            ("device_type", &self.device_type),
            ("to.version", &self.to.version),
        ]
        .into_iter()
        .chain(self.from.as_ref().map(|f| ("from.version", &f.version)))
        {
            if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(|c| c.is_control()) {
                return Err(Invalid(format!(
                    "{what} must be 1..={MAX_NAME_LEN} printable characters"
                )));
            }
        }
        self.expiry()?;
        if self.operations.len() > MAX_OPERATIONS {
            return Err(Invalid(format!(
                "{} operations, over the limit of {MAX_OPERATIONS}",
                self.operations.len()
            )));
        }
        let src_size = self.from.as_ref().map(|f| f.size);
        let mut next_dst = 0u64;
        let mut next_data = 0u64;
        let mut ranges: std::collections::HashMap<u64, (u64, Digest)> =
            std::collections::HashMap::new();
        for (i, op) in self.operations.iter().enumerate() {
            let dst_end = op
                .dst
                .checked_end()
                .ok_or_else(|| op_err(i, "dst overflows"))?;
            if op.dst.offset != next_dst {
                return Err(op_err(
                    i,
                    format!(
                        "dst starts at {} but the previous operation ends at {next_dst}: operations must tile the target in order",
                        op.dst.offset
                    ),
                ));
            }
            if dst_end > self.to.size {
                return Err(op_err(
                    i,
                    format!(
                        "dst ends at {dst_end}, past the target size {}",
                        self.to.size
                    ),
                ));
            }
            next_dst = dst_end;

            op.check_shape(src_size)
                .map_err(|reason| op_err(i, reason))?;
            if let Some(d) = &op.data {
                // New data continues the payload; data already used by an
                // earlier operation (identical new content at two places in
                // the image) may be named again, exactly.
                if d.offset == next_data {
                    ranges.insert(d.offset, (d.length, d.sha256));
                    next_data = next_data
                        .checked_add(d.length)
                        .ok_or_else(|| op_err(i, "data overflows"))?;
                } else if ranges.get(&d.offset) != Some(&(d.length, d.sha256)) {
                    return Err(op_err(
                        i,
                        format!(
                            "data at {} is neither the next payload bytes (at {next_data}) nor exactly an earlier operation's data",
                            d.offset
                        ),
                    ));
                }
            }
        }
        if next_dst != self.to.size {
            return Err(Invalid(format!(
                "operations cover {next_dst} bytes of a {}-byte target",
                self.to.size
            )));
        }
        if next_data != self.payload.size {
            return Err(Invalid(format!(
                "operation data covers {next_data} bytes of a {}-byte payload",
                self.payload.size
            )));
        }
        Ok(())
    }

    /// Per operation kind: operations, destination bytes, and payload bytes
    /// (data shared with an earlier operation counted once), for summaries.
    pub fn stats(&self) -> Vec<(OpKind, usize, u64, u64)> {
        let mut out: Vec<(OpKind, usize, u64, u64)> = Vec::new();
        for k in [OpKind::Copy, OpKind::Zero, OpKind::Replace, OpKind::Bsdiff] {
            let mut next = 0;
            let (mut n, mut dst, mut data) = (0, 0, 0);
            for o in &self.operations {
                let fresh = o.data.filter(|d| d.offset >= next);
                if let Some(d) = fresh {
                    next = d.offset + d.length;
                }
                if o.kind == k {
                    n += 1;
                    dst += o.dst.length;
                    data += fresh.map_or(0, |d| d.length);
                }
            }
            out.push((k, n, dst, data));
        }
        out
    }

    /// A default expiry: `days` from now.
    pub fn expiry_in(days: u64) -> String {
        Self::format_time(SystemTime::now() + Duration::from_secs(days * 86_400))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let d = Digest::of(b"x");
        Manifest {
            format_version: FORMAT_VERSION,
            device_type: "rpi4".into(),
            from: Some(ImageRef {
                version: "1".into(),
                size: 100,
                sha256: d,
            }),
            to: ImageRef {
                version: "2".into(),
                size: 30,
                sha256: d,
            },
            security_counter: 1,
            expires_at: "2099-01-01T00:00:00Z".into(),
            payload: PayloadInfo { size: 5, sha256: d },
            codecs: vec![],
            operations: vec![
                Operation {
                    kind: OpKind::Copy,
                    dst: Extent::new(0, 10),
                    src: vec![Extent::new(90, 10)],
                    src_sha256: None,
                    data: None,
                    dst_sha256: d,
                },
                Operation {
                    kind: OpKind::Zero,
                    dst: Extent::new(10, 10),
                    src: vec![],
                    src_sha256: None,
                    data: None,
                    dst_sha256: d,
                },
                Operation {
                    kind: OpKind::Replace,
                    dst: Extent::new(20, 10),
                    src: vec![],
                    src_sha256: None,
                    data: Some(DataRange {
                        offset: 0,
                        length: 5,
                        sha256: d,
                    }),
                    dst_sha256: d,
                },
            ],
        }
    }

    #[test]
    fn valid_manifest_round_trips() {
        let m = sample();
        m.validate().unwrap();
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn overlapping_destinations_are_refused() {
        let mut m = sample();
        m.operations[1].dst.offset = 5;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::InvalidOp { op: 1, .. })
        ));
    }

    #[test]
    fn source_extent_past_source_is_refused() {
        let mut m = sample();
        m.operations[0].src[0].offset = 95;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::InvalidOp { op: 0, .. })
        ));
    }

    #[test]
    fn overflowing_extent_does_not_panic() {
        let mut m = sample();
        m.operations[0].dst = Extent::new(u64::MAX, 10);
        assert!(m.validate().is_err());
        let mut m = sample();
        m.operations[0].src[0] = Extent::new(u64::MAX - 1, 10);
        assert!(m.validate().is_err());
    }

    #[test]
    fn data_may_be_shared_exactly_with_an_earlier_operation() {
        let mut m = sample();
        let mut mirror = m.operations[2].clone();
        mirror.dst = Extent::new(30, 10);
        m.to.size = 40;
        m.operations.push(mirror.clone());
        m.validate().unwrap();
        // Any other reuse of payload bytes is refused.
        mirror.data.as_mut().unwrap().length = 4;
        m.operations[3] = mirror;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::InvalidOp { op: 3, .. })
        ));
    }

    #[test]
    fn gaps_in_payload_are_refused() {
        let mut m = sample();
        m.payload.size = 6;
        assert!(matches!(m.validate(), Err(ManifestError::Invalid(_))));
    }

    #[test]
    fn copy_without_source_image_is_refused() {
        let mut m = sample();
        m.from = None;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::InvalidOp { op: 0, .. })
        ));
    }

    #[test]
    fn expiry_is_enforced() {
        let mut m = sample();
        m.expires_at = "2001-01-01T00:00:00Z".into();
        assert!(matches!(
            m.check_expiry(SystemTime::now()),
            Err(ManifestError::Expired { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Manifest::from_json(&bytes);
        }
    }

    #[test]
    fn a_manifest_naming_an_unknown_codec_is_refused_by_name() {
        let mut m = sample();
        m.codecs = vec!["brotli".into()];
        let e = Manifest::from_json(&m.to_json()).unwrap_err();
        assert!(
            matches!(&e, ManifestError::UnsupportedCodec(c) if c == "brotli"),
            "{e}"
        );
        assert!(e.to_string().contains("upgrade the agent"), "{e}");
        m.codecs = vec![CODEC_XZ.into()];
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        m.codecs = vec![CODEC_XZ.into(), CODEC_ZERO_RUNS.into()];
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        m.codecs = vec![CODEC_XZ.into(), CODEC_ARM64.into()];
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        m.codecs = vec![CODEC_XZ.into(), CODEC_ZERO_RUNS.into(), CODEC_ARM64.into()];
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        assert_eq!(CODEC_ARM64, "arm64");
        // A near miss is an unknown codec.
        m.codecs = vec!["arm64 ".into()];
        assert!(matches!(
            Manifest::from_json(&m.to_json()),
            Err(ManifestError::UnsupportedCodec(c)) if c == "arm64 "
        ));
    }

    #[test]
    fn a_check_ins_codecs_parse_without_the_names_this_build_does_not_know() {
        let c: Codecs =
            serde_json::from_str(r#"["brotli","frames","arm64","zero-runs","xz","xz","\u0078z"]"#)
                .unwrap();
        assert_eq!(c, codecs());
        assert!(c.contains(CODEC_XZ) && !c.contains("brotli") && !c.is_empty());
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"["xz","zero-runs","arm64","frames"]"#
        );
        // An agent of the xz codec's time lists xz alone: it decodes no
        // zero-run-coded stream.
        let xz_only: Codecs = serde_json::from_str(r#"["xz"]"#).unwrap();
        assert!(xz_only.contains(CODEC_XZ) && !xz_only.contains(CODEC_ZERO_RUNS));
        assert_ne!(xz_only, codecs());
        // An agent of the zero-runs codec's time: no arm64.
        let before_arm64: Codecs = serde_json::from_str(r#"["xz","zero-runs"]"#).unwrap();
        assert!(before_arm64.contains(CODEC_ZERO_RUNS) && !before_arm64.contains(CODEC_ARM64));
        assert_ne!(before_arm64, codecs());
        assert!(codecs().contains(CODEC_ARM64));
        // An agent of the arm64 codec's time: no frames.
        let before_frames: Codecs = serde_json::from_str(r#"["xz","zero-runs","arm64"]"#).unwrap();
        assert!(before_frames.contains(CODEC_ARM64) && !before_frames.contains(CODEC_FRAMES));
        assert_ne!(before_frames, codecs());
        assert!(codecs().contains(CODEC_FRAMES));
        let none: Codecs = serde_json::from_str(r#"["brotli"]"#).unwrap();
        assert!(none.is_empty() && none == Codecs::NONE && !none.contains(CODEC_XZ));
        assert_eq!(serde_json::to_string(&none).unwrap(), "[]");
        assert!(serde_json::from_str::<Codecs>(r#""xz""#).is_err());
        assert!(serde_json::from_str::<Codecs>(r#"[1]"#).is_err());
        // The bundle formats are a set of their own, after the codecs.
        assert_eq!(KNOWN_CODECS, [CODECS, BUNDLE_CODECS].concat());
        let b = Codecs::bundles();
        assert!(BUNDLE_CODECS.iter().all(|n| b.contains(n)) && !b.contains(CODEC_XZ));
        assert!(!codecs().names().any(|n| BUNDLE_CODECS.contains(&n)));
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Codecs>(&json).unwrap(), b);
    }

    #[test]
    fn a_manifest_without_codecs_is_byte_identical_to_format_one() {
        // Agents older than the field refuse unknown fields: a payload that
        // needs no new codec must not carry it.
        let m = sample();
        let json = String::from_utf8(m.to_json()).unwrap();
        assert!(!json.contains("codecs"), "{json}");
        let mut xz = m.clone();
        xz.codecs = codecs().names().map(String::from).collect();
        assert!(
            String::from_utf8(xz.to_json())
                .unwrap()
                .contains(r#""codecs":["xz","zero-runs","arm64","frames"]"#)
        );
    }
}
