//! The throttle as a service shared by every replica: [`FleetThrottle`].
//!
//! The single-process server keeps each rollout's [`Throttle`] in memory
//! and calls it synchronously. When several replicas serve one fleet, the
//! cap, the start-rate bucket and the waiting queue must be *one* for all of
//! them, so the PostgreSQL-backed engine talks to the throttle through this
//! trait: [`LocalFleetThrottle`] (one process; for `backend = "postgres"`
//! with a single replica) or [`super::redis_throttle::RedisThrottle`]
//! (several replicas; every decision is one atomic Lua script).
//!
//! # Contract every implementation keeps
//!
//! - **Admission is atomic**: checking the cap, taking a start token and
//!   granting the lease happen in one step, so two replicas can never take
//!   the same slot.
//! - **Every lease expires** unless renewed; renewal and release name the
//!   lease's **fence**, so a caller holding an old grant (a replica that
//!   stalled past the deadline) cannot renew or free a lease granted since.
//!   Fences only grow, also across a loss of the throttle's data.
//! - **Losing state is loud**: if the throttle has no record of a rollout
//!   (fresh process, Redis restarted empty), every call for that rollout
//!   fails with [`ThrottleError::Lost`] until the engine calls
//!   [`FleetThrottle::rebuild`] with the leases its database knows of.
//!   Rebuilt leases all count against the cap and the bucket restarts empty:
//!   after a loss the fleet admits fewer devices for a while, never more.

use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;

use super::throttle::{Admission, Limits, Throttle};

/// How a (re)built rollout's start-rate bucket begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// A new rollout: one burst's worth, as the in-process throttle's first
    /// use gives, so both backends start a rollout alike. "rate × t +
    /// burst" holds from the first second either way.
    Full,
    /// After the state was lost: no tokens. Starts granted just before the
    /// loss are unknown, so the fleet admits fewer for a while, never more.
    Empty,
}

/// A lease the engine's database knows of (device in `downloading`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub device: String,
    pub update_id: String,
    pub fence: u64,
}

/// Counters of one rollout's throttle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// Leases held now.
    pub active: u64,
    /// Devices in the waiting queue.
    pub waiting: u64,
    /// Leases granted and expired since the throttle's state was created.
    pub granted: u64,
    pub expired: u64,
}

/// Why a throttle call failed.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// The throttle holds no state for this rollout: rebuild it.
    #[error("the throttle has no state for rollout {0} (restarted or flushed); rebuilding it")]
    Lost(String),
    #[error(
        "throttle backend: {0} (check that Redis is running and reachable at the configured URL)"
    )]
    Backend(String),
}

/// The fleet-wide throttle, keyed by rollout id.
///
/// # Cancel safety
/// Every method is one request to the backend (one script run for Redis):
/// if the future is dropped, the step either happened or did not, and the
/// state stays consistent either way. A dropped `try_admit` may leave a
/// granted lease nobody uses; it expires after `lease_ms` (errs on fewer).
#[async_trait]
pub trait FleetThrottle: Send + Sync + 'static {
    /// Tries to admit `device` for `update_id` under `limits`.
    async fn try_admit(
        &self,
        rollout: &str,
        device: &str,
        update_id: &str,
        limits: Limits,
    ) -> Result<Admission, ThrottleError>;

    /// Extends the lease to now + `lease_ms` if `device` holds the live lease
    /// `fence`. `Ok(false)`: it expired or was given away.
    async fn renew(
        &self,
        rollout: &str,
        device: &str,
        fence: u64,
        lease_ms: u64,
    ) -> Result<bool, ThrottleError>;

    /// Frees `device`'s lease if it is still `fence`.
    async fn release(&self, rollout: &str, device: &str, fence: u64)
    -> Result<bool, ThrottleError>;

    /// Removes every lease past its deadline and returns them (each is
    /// returned to exactly one caller, across all replicas).
    async fn reap(&self, rollout: &str) -> Result<Vec<HeldLease>, ThrottleError>;

    /// Creates the state of a new rollout (`Bucket::Full`) or recreates it
    /// after [`ThrottleError::Lost`] (`Bucket::Empty`): `leases` (from the
    /// database) get a fresh `lease_ms` term and keep their fences; the
    /// fence counter moves past `min_fence`. Idempotent: replicas may
    /// rebuild concurrently, and a state that exists is left as it is.
    async fn rebuild(
        &self,
        rollout: &str,
        leases: &[HeldLease],
        lease_ms: u64,
        min_fence: u64,
        bucket: Bucket,
    ) -> Result<(), ThrottleError>;

    /// The rollout's counters.
    async fn stats(&self, rollout: &str) -> Result<ThrottleStats, ThrottleError>;

    /// Drops the rollout's state (it completed or was aborted and has no
    /// leases left).
    async fn forget(&self, rollout: &str) -> Result<(), ThrottleError>;
}

/// [`FleetThrottle`] in this process: one [`Throttle`] per rollout. Limits
/// hold for this replica only, so it is for a single replica (PostgreSQL
/// for durability, no Redis). A fresh process knows no rollout, so the
/// engine rebuilds each from its database on first use, exactly as after a
/// Redis loss.
#[derive(Default)]
pub struct LocalFleetThrottle {
    rollouts: DashMap<String, Arc<Throttle>>,
}

impl LocalFleetThrottle {
    pub fn new() -> LocalFleetThrottle {
        LocalFleetThrottle::default()
    }

    fn get(&self, rollout: &str) -> Result<Arc<Throttle>, ThrottleError> {
        self.rollouts
            .get(rollout)
            .map(|t| t.clone())
            .ok_or_else(|| ThrottleError::Lost(rollout.to_string()))
    }
}

#[async_trait]
impl FleetThrottle for LocalFleetThrottle {
    async fn try_admit(
        &self,
        rollout: &str,
        device: &str,
        update_id: &str,
        limits: Limits,
    ) -> Result<Admission, ThrottleError> {
        let t = self.get(rollout)?;
        let now = crate::now_ms();
        if t.holds_any(device, now) {
            return Ok(Admission::Wait {
                reason: super::throttle::WaitReason::ConcurrencyCap,
                near_head: true,
            });
        }
        Ok(t.try_admit(device, update_id, now, limits))
    }

    async fn renew(
        &self,
        rollout: &str,
        device: &str,
        fence: u64,
        lease_ms: u64,
    ) -> Result<bool, ThrottleError> {
        Ok(self
            .get(rollout)?
            .renew_fenced(device, fence, crate::now_ms(), lease_ms))
    }

    async fn release(
        &self,
        rollout: &str,
        device: &str,
        fence: u64,
    ) -> Result<bool, ThrottleError> {
        Ok(self.get(rollout)?.release_fenced(device, fence))
    }

    async fn reap(&self, rollout: &str) -> Result<Vec<HeldLease>, ThrottleError> {
        Ok(self
            .get(rollout)?
            .reap_fenced(crate::now_ms())
            .into_iter()
            .map(|(device, update_id, fence)| HeldLease {
                device,
                update_id,
                fence,
            })
            .collect())
    }

    async fn rebuild(
        &self,
        rollout: &str,
        leases: &[HeldLease],
        lease_ms: u64,
        min_fence: u64,
        bucket: Bucket,
    ) -> Result<(), ThrottleError> {
        let now = crate::now_ms();
        let t = self
            .rollouts
            .entry(rollout.to_string())
            .or_insert_with(|| {
                let t = Throttle::new();
                t.start(now, min_fence, bucket == Bucket::Full);
                Arc::new(t)
            })
            .clone();
        for l in leases {
            t.restore_fenced(&l.device, &l.update_id, l.fence, now, lease_ms);
        }
        Ok(())
    }

    async fn stats(&self, rollout: &str) -> Result<ThrottleStats, ThrottleError> {
        let t = self.get(rollout)?;
        Ok(ThrottleStats {
            active: t.active(),
            waiting: t.waiting() as u64,
            granted: t.granted.load(std::sync::atomic::Ordering::Relaxed),
            expired: t.expired.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    async fn forget(&self, rollout: &str) -> Result<(), ThrottleError> {
        self.rollouts.remove(rollout);
        Ok(())
    }
}
