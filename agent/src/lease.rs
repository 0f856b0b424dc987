//! The device's side of the download lease: when it must stop downloading.
//!
//! The server counts a device against the fleet-wide cap while its lease
//! is live and gives the slot away once the lease's deadline passed. It
//! cannot reach a device to tell it to stop: when check-ins fail (the
//! server, its database or Redis restarting, the network cut) the lease
//! runs out on the server while the device still downloads, and the slot
//! is re-granted with two devices downloading on it. So the device keeps
//! its own conservative copy of the deadline and stops itself first.
//!
//! # Why "from the send time, minus a margin"
//!
//! The server sets the deadline to *its* now + `lease_ms` while it handles
//! the check-in, which is after the device sent it and before the answer
//! arrives. Counting the term from the moment the renewing check-in was
//! **sent** therefore never ends later than the server's deadline, however
//! slow the answer was (counting from the answer, as the agent once did,
//! overran it by the answer's latency). The margin (a tenth of the term,
//! 50 ms to 2 s) covers clocks that tick at slightly different rates and
//! the time a stop takes to land.
//!
//! Only an answer that renews the lease — an `update` offer for the update
//! in hand — moves the deadline; any other answer, and any failure, leaves
//! it where it is.

use std::time::Duration;

use tokio::time::Instant;

/// The device's copy of one download lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseClock {
    term: Duration,
    until: Instant,
}

impl LeaseClock {
    /// A lease of `lease` granted by a check-in sent at `sent`.
    pub fn granted(lease: Duration, sent: Instant) -> LeaseClock {
        let term = lease.saturating_sub(margin(lease));
        LeaseClock {
            term,
            until: sent + term,
        }
    }

    /// The lease was renewed by a check-in sent at `sent`; it only moves
    /// forward (answers can arrive out of order).
    pub fn renewed(&mut self, sent: Instant) {
        self.until = self.until.max(sent + self.term);
    }

    /// The term each renewal grants (the lease minus the margin).
    pub fn term(&self) -> Duration {
        self.term
    }

    /// When the device must have stopped downloading.
    pub fn stop_at(&self) -> Instant {
        self.until
    }

    /// Whether the device must stop now.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }
}

/// How much earlier than the server the device stops.
fn margin(lease: Duration) -> Duration {
    (lease / 10).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19, defect 4: a renewal whose answer took 2 s of a 3 s lease.
    /// Counting from the answer kept the device downloading until 5 s,
    /// 2 s after the server's deadline (3 s at the latest) had given its
    /// slot away.
    #[test]
    fn a_slow_renewal_does_not_outlast_the_servers_deadline() {
        let lease = Duration::from_secs(3);
        let t0 = Instant::now();
        let mut l = LeaseClock::granted(lease, t0);
        // A renewal sent at 1 s, answered at 3 s: the server handled it
        // somewhere in between, so its deadline is at most 1 s + 3 s.
        l.renewed(t0 + Duration::from_secs(1));
        let server_deadline_at_latest = t0 + Duration::from_secs(1) + lease;
        assert!(l.stop_at() < server_deadline_at_latest);
        assert!(l.stop_at() >= server_deadline_at_latest - Duration::from_millis(300));
        assert!(
            l.expired(t0 + Duration::from_millis(3700)),
            "still downloading at 3.7 s"
        );
    }

    #[test]
    fn renewals_only_move_forward_and_stop_before_the_deadline() {
        let t0 = Instant::now();
        let mut l = LeaseClock::granted(Duration::from_millis(1000), t0);
        assert_eq!(l.stop_at(), t0 + Duration::from_millis(900));
        l.renewed(t0 + Duration::from_millis(500));
        assert_eq!(l.stop_at(), t0 + Duration::from_millis(1400));
        // A late answer to an older check-in does not shorten it.
        l.renewed(t0 + Duration::from_millis(100));
        assert_eq!(l.stop_at(), t0 + Duration::from_millis(1400));
        assert!(!l.expired(t0 + Duration::from_millis(1399)));
        assert!(l.expired(t0 + Duration::from_millis(1400)));
        // Tiny and huge leases keep a sane margin.
        let short = LeaseClock::granted(Duration::from_millis(300), t0);
        assert_eq!(short.stop_at(), t0 + Duration::from_millis(250));
        let long = LeaseClock::granted(Duration::from_secs(600), t0);
        assert_eq!(long.stop_at(), t0 + Duration::from_secs(598));
    }
}
