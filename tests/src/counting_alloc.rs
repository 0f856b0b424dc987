//! A counting global allocator for memory-bound tests (`apply_memory`,
//! `agent/tests/pool_memory.rs`): it forwards every call to the system
//! allocator and keeps the bytes live and their peak. A test binary installs
//! it with `#[global_allocator] static A: Counting = Counting;` and runs a
//! single test, so nothing else allocates while it counts; threads whose
//! memory is not under test (a test server's) call [`ignore_this_thread`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The allocator (see the module doc).
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static IGNORED: Cell<bool> = const { Cell::new(false) };
}

/// Allocations and frees on this thread are not counted from now on.
pub fn ignore_this_thread() {
    IGNORED.with(|c| c.set(true));
}

/// Starts a measurement: the peak is reset to what is live now, which is
/// returned.
pub fn start() -> usize {
    let now = LIVE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// Most bytes live at once since [`start`] returned `before`, above it.
pub fn held_since(before: usize) -> usize {
    PEAK.load(Ordering::Relaxed).saturating_sub(before)
}

fn counted() -> bool {
    !IGNORED.try_with(Cell::get).unwrap_or(true)
}

fn note_alloc(n: usize) {
    if counted() {
        let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn note_free(n: usize) {
    if counted() {
        LIVE.fetch_sub(n, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters are only arithmetic on the sizes (and a const-initialised
// thread-local, which does not allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note_alloc(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note_alloc(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        note_free(l.size());
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            // Both blocks may exist during the copy: count the new one first.
            note_alloc(new);
            note_free(l.size());
        }
        q
    }
}
