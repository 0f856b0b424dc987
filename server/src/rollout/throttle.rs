//! The fleet-wide throttle of one rollout: download leases under a
//! concurrency cap, a start-rate limiter, and a fair waiting queue.
//!
//! # Why it is shaped like this
//!
//! - **The cap can never be exceeded.** A lease is granted only under the
//!   gate mutex, which checks the count and increments it in one step.
//!   Releases and expiries decrement without the gate; that can only make the
//!   gate see *more* leases than exist, never fewer.
//! - **Leases expire.** Each lease has a deadline renewed by check-ins and
//!   progress; a reaper frees expired ones, so a dead device never holds a
//!   slot forever. Each lease carries a fencing number, so a renewal racing
//!   with an expiry cannot resurrect a lease that was given away.
//! - **Nobody starves.** A device that is turned away gets a ticket; only
//!   tickets within a window behind the oldest waiting ticket may take a
//!   free slot. Later arrivals cannot pass a device that keeps checking in;
//!   a device that stops checking in leaves the queue after `stale_after`.
//! - **The hot path does not serialise.** Devices that are downloading,
//!   idle or done never take the gate; only admission attempts do, and they
//!   hold it for a few map operations (no `.await`, no I/O).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

/// One download lease.
#[derive(Debug)]
pub struct Lease {
    pub update_id: String,
    /// Deadline (ms since the epoch); renewed by progress.
    pub expires_at_ms: AtomicU64,
    /// Fencing number: unique per grant.
    pub fence: u64,
}

/// Throttle limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_concurrent: u64,
    /// Starts per minute now (the rollout ramps it).
    pub starts_per_min: f64,
    pub lease_ms: u64,
    /// A waiting device not seen for this long leaves the queue.
    pub stale_after_ms: u64,
}

/// Why a device was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    ConcurrencyCap,
    StartRate,
    Queued,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::ConcurrencyCap => "concurrency cap reached",
            WaitReason::StartRate => "start rate limit",
            WaitReason::Queued => "queued behind devices that waited longer",
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            WaitReason::ConcurrencyCap => "concurrency_cap",
            WaitReason::StartRate => "start_rate",
            WaitReason::Queued => "queued",
        }
    }
}

/// The result of an admission attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Granted { fence: u64 },
    Wait { reason: WaitReason, near_head: bool },
}

struct Gate {
    /// Start-rate bucket: tokens available and when it was last refilled.
    tokens: f64,
    refilled_ms: u64,
    next_ticket: u64,
    /// Waiting devices by ticket (oldest first).
    queue: BTreeMap<u64, String>,
    /// Device → (ticket, last seen ms).
    waiting: HashMap<String, (u64, u64)>,
    next_fence: u64,
}

/// The throttle of one rollout.
pub struct Throttle {
    leases: DashMap<String, Lease>,
    active: AtomicU64,
    gate: Mutex<Gate>,
    /// Leases granted and expired so far (metrics).
    pub granted: AtomicU64,
    pub expired: AtomicU64,
}

/// The bucket holds at most one second's worth of starts (at least one), so
/// over any window of `t` seconds at most `rate × t / 60 + burst` starts
/// happen: "within one token" for rates up to 119 per minute.
fn burst(starts_per_min: f64) -> f64 {
    (starts_per_min / 60.0).floor().max(1.0)
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle {
            leases: DashMap::new(),
            active: AtomicU64::new(0),
            gate: Mutex::new(Gate {
                tokens: 0.0,
                refilled_ms: 0,
                next_ticket: 0,
                queue: BTreeMap::new(),
                waiting: HashMap::new(),
                next_fence: 1,
            }),
            granted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    /// Leases held now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::SeqCst)
    }

    /// Devices in the waiting queue now.
    pub fn waiting(&self) -> usize {
        self.gate.lock().unwrap().queue.len()
    }

    /// Restores a lease after a restart (devices that were admitted before
    /// the crash). Not subject to the cap: they were admitted under it.
    pub fn restore(&self, device: &str, update_id: &str, now_ms: u64, lease_ms: u64) {
        let fence = {
            let mut g = self.gate.lock().unwrap();
            g.next_fence += 1;
            g.next_fence
        };
        if self
            .leases
            .insert(
                device.to_string(),
                Lease {
                    update_id: update_id.to_string(),
                    expires_at_ms: AtomicU64::new(now_ms + lease_ms),
                    fence,
                },
            )
            .is_none()
        {
            self.active.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Restores a lease under its original fence (the shared-throttle
    /// rebuild): renewals naming that fence keep working, and later grants
    /// get larger fences.
    pub fn restore_fenced(
        &self,
        device: &str,
        update_id: &str,
        fence: u64,
        now_ms: u64,
        lease_ms: u64,
    ) {
        {
            let mut g = self.gate.lock().unwrap();
            g.next_fence = g.next_fence.max(fence);
        }
        let mut fresh = false;
        self.leases.entry(device.to_string()).or_insert_with(|| {
            fresh = true;
            Lease {
                update_id: update_id.to_string(),
                expires_at_ms: AtomicU64::new(now_ms + lease_ms),
                fence,
            }
        });
        if fresh {
            self.active.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Moves the fence counter past `min_fence` (never reuse a fence) and
    /// starts the start-rate bucket full (a new rollout: one burst at first
    /// use) or empty at `now_ms` (after a loss of state: admit fewer).
    pub fn start(&self, now_ms: u64, min_fence: u64, full: bool) {
        let mut g = self.gate.lock().unwrap();
        if !full {
            g.tokens = 0.0;
            g.refilled_ms = now_ms.max(1);
        }
        g.next_fence = g.next_fence.max(min_fence);
    }

    /// Tries to admit `device` for `update_id`.
    pub fn try_admit(&self, device: &str, update_id: &str, now_ms: u64, l: Limits) -> Admission {
        let mut g = self.gate.lock().unwrap();
        let g = &mut *g;
        // Refill the start-rate bucket.
        let b = burst(l.starts_per_min);
        if g.refilled_ms == 0 {
            // First use (new rollout or restart): one burst's worth, which
            // keeps "rate × t + burst" true from the first second.
            g.refilled_ms = now_ms;
            g.tokens = b;
        }
        let dt = now_ms.saturating_sub(g.refilled_ms) as f64;
        g.tokens = (g.tokens + dt * l.starts_per_min / 60_000.0).min(b);
        g.refilled_ms = now_ms;
        // Drop stale waiters from the head so a vanished device does not
        // hold the queue.
        while let Some((&t, id)) = g.queue.first_key_value() {
            let seen = g.waiting.get(id).map_or(0, |w| w.1);
            if now_ms.saturating_sub(seen) <= l.stale_after_ms {
                break;
            }
            let id = id.clone();
            g.queue.remove(&t);
            g.waiting.remove(&id);
        }
        let ticket = match g.waiting.get_mut(device) {
            Some(w) => {
                w.1 = now_ms;
                w.0
            }
            None => {
                let t = g.next_ticket;
                g.next_ticket += 1;
                g.waiting.insert(device.to_string(), (t, now_ms));
                g.queue.insert(t, device.to_string());
                t
            }
        };
        let head = g.queue.first_key_value().map_or(ticket, |(&t, _)| t);
        let active = self.active.load(Ordering::SeqCst);
        let free = l.max_concurrent.saturating_sub(active);
        let tokens = g.tokens.floor() as u64;
        let grantable = free.min(tokens);
        // The window in ticket numbers: tickets are dense except for devices
        // that left, so this admits at most `2 × grantable + 1` positions
        // behind the head, and the head itself always.
        let window = 2 * grantable + 1;
        let near_head = ticket < head + 4 * window.max(l.max_concurrent.min(64));
        if free == 0 {
            return Admission::Wait {
                reason: WaitReason::ConcurrencyCap,
                near_head,
            };
        }
        if tokens == 0 {
            return Admission::Wait {
                reason: WaitReason::StartRate,
                near_head,
            };
        }
        if ticket >= head + window {
            return Admission::Wait {
                reason: WaitReason::Queued,
                near_head,
            };
        }
        g.tokens -= 1.0;
        g.queue.remove(&ticket);
        g.waiting.remove(device);
        g.next_fence += 1;
        let fence = g.next_fence;
        self.leases.insert(
            device.to_string(),
            Lease {
                update_id: update_id.to_string(),
                expires_at_ms: AtomicU64::new(now_ms + l.lease_ms),
                fence,
            },
        );
        self.active.fetch_add(1, Ordering::SeqCst);
        self.granted.fetch_add(1, Ordering::Relaxed);
        Admission::Granted { fence }
    }

    /// Removes `device` from the waiting queue (it left the rollout).
    pub fn forget_waiting(&self, device: &str) {
        let mut g = self.gate.lock().unwrap();
        if let Some((t, _)) = g.waiting.remove(device) {
            g.queue.remove(&t);
        }
    }

    /// Renews `device`'s lease for `update_id`. False if it holds none (it
    /// expired, or belongs to another attempt).
    pub fn renew(&self, device: &str, update_id: &str, now_ms: u64, lease_ms: u64) -> bool {
        match self.leases.get(device) {
            Some(l) if l.update_id == update_id => {
                // Renew only forward, and only if not already expired: an
                // expired lease waits for the reaper and is not resurrected.
                let cur = l.expires_at_ms.load(Ordering::SeqCst);
                if cur < now_ms {
                    return false;
                }
                l.expires_at_ms
                    .fetch_max(now_ms + lease_ms, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// Renews `device`'s lease if it is still the grant `fence`.
    pub fn renew_fenced(&self, device: &str, fence: u64, now_ms: u64, lease_ms: u64) -> bool {
        match self.leases.get(device) {
            Some(l) if l.fence == fence => {
                if l.expires_at_ms.load(Ordering::SeqCst) < now_ms {
                    return false;
                }
                l.expires_at_ms
                    .fetch_max(now_ms + lease_ms, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// Releases `device`'s lease if it is still the grant `fence`.
    pub fn release_fenced(&self, device: &str, fence: u64) -> bool {
        if self
            .leases
            .remove_if(device, |_, l| l.fence == fence)
            .is_some()
        {
            self.active.fetch_sub(1, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Whether `device` holds a live lease for `update_id`.
    pub fn holds(&self, device: &str, update_id: &str, now_ms: u64) -> bool {
        self.leases.get(device).is_some_and(|l| {
            l.update_id == update_id && l.expires_at_ms.load(Ordering::SeqCst) >= now_ms
        })
    }

    /// Whether `device` holds any live lease.
    pub fn holds_any(&self, device: &str, now_ms: u64) -> bool {
        self.leases
            .get(device)
            .is_some_and(|l| l.expires_at_ms.load(Ordering::SeqCst) >= now_ms)
    }

    /// Releases `device`'s lease (download finished or failed).
    pub fn release(&self, device: &str) -> bool {
        if self.leases.remove(device).is_some() {
            self.active.fetch_sub(1, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Frees every lease past its deadline; returns (device, update id).
    pub fn reap(&self, now_ms: u64) -> Vec<(String, String)> {
        self.reap_fenced(now_ms)
            .into_iter()
            .map(|(d, u, _)| (d, u))
            .collect()
    }

    /// Like [`Throttle::reap`], with each lease's fence.
    pub fn reap_fenced(&self, now_ms: u64) -> Vec<(String, String, u64)> {
        let expired: Vec<(String, u64)> = self
            .leases
            .iter()
            .filter(|l| l.expires_at_ms.load(Ordering::SeqCst) < now_ms)
            .map(|l| (l.key().clone(), l.fence))
            .collect();
        let mut out = Vec::new();
        for (dev, fence) in expired {
            // Remove only the lease we saw expire (same fence, still expired).
            if let Some((_, l)) = self.leases.remove_if(&dev, |_, l| {
                l.fence == fence && l.expires_at_ms.load(Ordering::SeqCst) < now_ms
            }) {
                self.active.fetch_sub(1, Ordering::SeqCst);
                self.expired.fetch_add(1, Ordering::Relaxed);
                out.push((dev, l.update_id, l.fence));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cap: u64, rate: f64) -> Limits {
        Limits {
            max_concurrent: cap,
            starts_per_min: rate,
            lease_ms: 10_000,
            stale_after_ms: 60_000,
        }
    }

    #[test]
    fn cap_is_never_exceeded_under_contention() {
        let t = std::sync::Arc::new(Throttle::new());
        let l = limits(7, 1e9);
        t.try_admit("warm", "u", 1, l); // fill the bucket
        t.release("warm");
        let max_seen = std::sync::Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for th in 0..4 {
                let t = t.clone();
                let max_seen = max_seen.clone();
                s.spawn(move || {
                    for i in 0..5000u64 {
                        let d = format!("d{th}-{}", i % 50);
                        if let Admission::Granted { .. } = t.try_admit(&d, "u", 1000 + i, l) {
                            max_seen.fetch_max(t.active(), Ordering::SeqCst);
                            t.release(&d);
                        }
                    }
                });
            }
        });
        assert!(max_seen.load(Ordering::SeqCst) <= 7);
        assert_eq!(t.active(), 0);
    }

    #[test]
    fn start_rate_holds_within_one_token() {
        let t = Throttle::new();
        let l = limits(1000, 30.0); // one start every 2 s
        let mut starts = Vec::new();
        for ms in (0..120_000u64).step_by(100) {
            let d = format!("d{ms}");
            if let Admission::Granted { .. } = t.try_admit(&d, "u", ms + 1, l) {
                starts.push(ms);
            }
            t.forget_waiting(&d);
        }
        // Any 60 s window holds at most 30 + 1 starts.
        for (i, &s) in starts.iter().enumerate() {
            let n = starts[i..].iter().take_while(|&&x| x < s + 60_000).count();
            assert!(n <= 31, "{n} starts in the minute from {s} ms");
        }
        assert!(starts.len() >= 58, "rate starved: {}", starts.len());
    }

    #[test]
    fn later_arrivals_cannot_pass_a_waiting_device() {
        let t = Throttle::new();
        let l = limits(1, 1e6);
        assert!(matches!(
            t.try_admit("holder", "u", 1, l),
            Admission::Granted { .. }
        ));
        // "old" waits first, then 100 newcomers arrive.
        assert!(matches!(
            t.try_admit("old", "u", 2, l),
            Admission::Wait { .. }
        ));
        for i in 0..100 {
            assert!(matches!(
                t.try_admit(&format!("new{i}"), "u", 3, l),
                Admission::Wait { .. }
            ));
        }
        t.release("holder");
        // A newcomer asking first still may not take the freed slot.
        for i in 50..100 {
            assert!(matches!(
                t.try_admit(&format!("new{i}"), "u", 4, l),
                Admission::Wait {
                    reason: WaitReason::Queued,
                    ..
                }
            ));
        }
        assert!(matches!(
            t.try_admit("old", "u", 5, l),
            Admission::Granted { .. }
        ));
    }

    #[test]
    fn a_vanished_waiter_leaves_the_queue() {
        let t = Throttle::new();
        let l = limits(1, 1e6);
        t.try_admit("holder", "u", 1, l);
        t.try_admit("ghost", "u", 2, l);
        t.try_admit("live", "u", 3, l);
        t.release("holder");
        // "live" is within the window anyway; make ghost stale and check it
        // is pruned.
        let later = 2 + l.stale_after_ms + 1;
        assert!(matches!(
            t.try_admit("live", "u", later, l),
            Admission::Granted { .. }
        ));
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn leases_expire_and_are_not_resurrected() {
        let t = Throttle::new();
        let l = limits(1, 1e6);
        assert!(matches!(
            t.try_admit("a", "u1", 1, l),
            Admission::Granted { .. }
        ));
        assert!(t.renew("a", "u1", 5_000, l.lease_ms));
        assert!(!t.renew("a", "other", 5_000, l.lease_ms));
        // Silent past the deadline: renewal refused, reaper frees it.
        assert!(!t.renew("a", "u1", 15_001 + 1, l.lease_ms));
        assert_eq!(t.reap(15_002), vec![("a".to_string(), "u1".to_string())]);
        assert_eq!(t.active(), 0);
        assert!(matches!(
            t.try_admit("b", "u1", 15_003, l),
            Admission::Granted { .. }
        ));
    }
}
