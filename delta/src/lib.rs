//! The edge-ota delta engine: builds payloads of independent operations and
//! applies them with memory bounded independently of image size.
//!
//! # Layout
//!
//! - [`io`]: positional read/write traits over files (slots, images) and
//!   memory, so the same engine drives block devices, image files and the
//!   load test's in-memory slots.
//! - [`apply`]: the apply engine. [`apply::apply_operation`] is the unit the
//!   agent's chunk pool calls for each verified operation;
//!   [`apply::apply_image`] streams a whole payload (the offline CLI);
//!   [`apply::op_work`] bounds what one operation allocates, the unit of
//!   both appliers' memory budgets.
//! - [`arm64`]: the `arm64` codec's transform of AArch64 code (BL and
//!   ADRP immediates made absolute) for `REPLACE` data and bsdiff extra
//!   streams.
//! - [`bspatch`]: bspatch against a source window read through a small
//!   cache, so an operation holds its output, not its (often several
//!   times larger) window.
//! - [`frames`]: compression frames (codec `frames`): several `BSDIFF`
//!   operations' streams compressed together, decoded once (its three
//!   streams at once where memory allows) and applied member by member, two
//!   at a time where memory allows ([`apply::apply_group`]).
//! - [`patch_streams`]: the layout of `BSDIFF` data (a bsdiff patch as three
//!   zstd, bzip2 or xz streams) shared by generator and apply engine, and its
//!   bounded decoding ([`patch_streams::decode_bounded`]).
//! - [`generate`] (feature `generate`): the generator. Indexes the source by
//!   block hash and by content-defined anchors, splits the target into runs
//!   of zero, moved and changed blocks, and picks for each changed chunk the
//!   smallest of `REPLACE` and `BSDIFF` against the source window where its
//!   content lives.
//! - [`progress`] (feature `generate`): a running generation's phase and
//!   bytes processed, readable from other threads, and its cancel flag.
//! - [`suffix_diff`] (feature `generate`): bsdiff's match search over a
//!   libsais suffix array, writing the streams `patch_streams` stores.
//!
//! The format itself (manifest, envelope, limits) lives in `ota-format`.

pub mod apply;
pub mod arm64;
pub mod bspatch;
pub mod frames;
#[cfg(feature = "generate")]
pub mod generate;
pub mod io;
pub mod patch_streams;
#[cfg(feature = "generate")]
pub mod progress;
#[cfg(feature = "generate")]
pub mod suffix_diff;

pub use apply::{ApplyError, apply_image, apply_operation, verify_operation_output};
