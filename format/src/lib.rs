//! The edge-ota update format: what the server signs, what travels, and what
//! the agent trusts.
//!
//! An update is a **signed manifest** plus a **payload**. The manifest lists
//! independent operations; the payload is the concatenation of their data.
//! Because destination extents never overlap and the source is read-only, any
//! subset of operations can be fetched (HTTP Range), verified and applied in any
//! order, and re-applied after a crash. `docs/format.md` is the normative
//! description; this crate is its only implementation.
//!
//! # Layout
//!
//! - [`digest`]: the SHA-256 newtype used everywhere a byte string is pinned.
//! - [`manifest`]: the manifest, its operations, and [`Manifest::validate`],
//!   which turns untrusted JSON into a manifest whose invariants the apply
//!   engine can rely on (non-overlapping, covering, bounded operations).
//! - [`envelope`]: the DSSE signing envelope around the exact manifest bytes,
//!   key files, key ids and threshold verification for key rotation.
//! - [`freshness`]: the short-lived signed statement of the latest release
//!   per device type (TUF's timestamp role) and the agent's time floor,
//!   against freeze and replay attacks.
//! - [`limits`]: every size bound applied to untrusted input, in one place.
//! - [`api`]: the device API's JSON bodies (check-in, events, enrollment),
//!   shared by agent and server; `docs/api.md` describes the protocol.
//! - [`version`]: release versions (semantic versioning) and their one
//!   order, which the server applies at `release add` and the agent before
//!   installing.
//! - [`term`]: the binaries' edges: one-line error reports without repeated
//!   causes, and whether logs may be coloured (`NO_COLOR`, terminals).

pub mod api;
pub mod digest;
pub mod envelope;
pub mod freshness;
pub mod limits;
pub mod manifest;
pub mod term;
pub mod version;

pub use digest::Digest;
pub use envelope::{
    Envelope, EnvelopeError, ManifestSigner, SignError, SigningKeyPair, TrustedKeys,
};
pub use freshness::{Freshness, FreshnessError, FreshnessFloor};
pub use manifest::{
    DataRange, Extent, ImageRef, Manifest, ManifestError, OpKind, Operation, PayloadInfo,
};
pub use version::{Version, VersionError};
