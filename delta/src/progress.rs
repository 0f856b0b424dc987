//! Progress of a running generation, readable from other threads (the
//! server's `release list`), and its stop request.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// What a running generation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    /// Hashing and indexing the source image (deltas only).
    IndexingSource,
    /// Hashing the target and finding its blocks in the source.
    MatchingBlocks,
    /// Diffing changed chunks against the source (deltas).
    Diffing,
    /// Compressing the target's chunks (full images).
    Compressing,
    /// The payload is written and the manifest built.
    Done,
}

impl Phase {
    /// Lower-case words, as the server's release list shows them.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::IndexingSource => "indexing source",
            Phase::MatchingBlocks => "matching blocks",
            Phase::Diffing => "diffing",
            Phase::Compressing => "compressing",
            Phase::Done => "done",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Phase {
        [
            Phase::Starting,
            Phase::IndexingSource,
            Phase::MatchingBlocks,
            Phase::Diffing,
            Phase::Compressing,
            Phase::Done,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Phase::Starting)
    }
}

/// Where a running [`generate_with_progress`](crate::generate::generate_with_progress) is, readable from any thread
/// while it runs (the server shows it in `release list`). Work is counted in
/// image bytes processed: the source once (indexing), the target twice
/// (matching, then diffing or compressing), so `done` reaches `total` at the
/// end and moves at a fairly even pace in between.
///
/// It also carries a stop request: after [`Progress::cancel`] the generation
/// returns [`GenerateError::Cancelled`](crate::generate::GenerateError::Cancelled) within one read or batch of work.
#[derive(Debug, Default)]
pub struct Progress {
    pub(crate) phase: AtomicU8,
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) cancelled: AtomicBool,
}

impl Progress {
    /// Asks the running generation to stop (it returns
    /// [`GenerateError::Cancelled`](crate::generate::GenerateError::Cancelled), having written part of the payload).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// (phase, bytes done, bytes in total; 0 until the sizes are known).
    pub fn snapshot(&self) -> (Phase, u64, u64) {
        (
            Phase::from_u8(self.phase.load(Ordering::Relaxed)),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}
