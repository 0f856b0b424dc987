//! Bounds applied to untrusted input.
//!
//! Every number here bounds memory the agent must allocate because of bytes it
//! received. They are part of the format: a manifest that exceeds them is
//! rejected before any download, so the generator must respect them too.

/// Largest signed envelope accepted (bytes). A 16 GiB image at 1 MiB chunks is
/// about 16k operations, about 5 MiB of JSON; 32 MiB leaves room and stays far
/// below what a 128 MiB device can hold.
pub const MAX_ENVELOPE_BYTES: usize = 32 << 20;

/// Most operations in one manifest.
pub const MAX_OPERATIONS: usize = 1 << 20;

/// Most source extents one operation may name.
pub const MAX_SRC_EXTENTS: usize = 4096;

/// Largest destination of a `REPLACE` or `BSDIFF` operation. The apply engine
/// holds one such output in memory (bsdiff needs random access to it), so this
/// bounds apply memory; `COPY` and `ZERO` stream and have no such bound.
pub const MAX_BUFFERED_DST: u64 = 4 << 20;

/// Largest source window (sum of source extents) of a `BSDIFF` operation.
/// bspatch reads its old input at random; agents since Dec 4 read the
/// window through a small cache (`ota_delta::bspatch::WINDOW_CACHE`), so
/// for them it bounds the generator's work per operation (a suffix array
/// of 4 bytes per window byte, per worker), not apply memory. Older agents held
/// the whole window in memory, which is why the bound stays: a manifest
/// over it would still exhaust them.
pub const MAX_BSDIFF_WINDOW: u64 = 8 << 20;

/// Largest data of one operation. Data is verified before use, so it is held
/// in memory whole; a compressed chunk is never much larger than its output.
pub const MAX_OP_DATA: u64 = MAX_BUFFERED_DST + (MAX_BUFFERED_DST >> 6) + 4096;

/// Largest decoded size of a compression frame (codec `frames`): the
/// control, diff and extra streams of all its operations together. An
/// agent holds one decoded frame while it applies the frame's operations in
/// turn (and, while a stream decodes, an xz dictionary of at most that
/// stream), so this bounds that memory as [`MAX_BUFFERED_DST`] bounds an
/// operation's. Frames of 16 operations of the `upgrade-large` benchmark
/// pair decode to at most 4.9 MiB, of 4 operations 1.6 MiB.
pub const MAX_FRAME_DECODED: u64 = MAX_BUFFERED_DST;

/// Most operations in one compression frame.
pub const MAX_FRAME_MEMBERS: usize = 64;

/// Longest version or device-type string.
pub const MAX_NAME_LEN: usize = 128;

/// Most signatures one envelope may carry.
pub const MAX_SIGNATURES: usize = 16;
