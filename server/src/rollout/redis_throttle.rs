//! TEMPORARY placeholder until the redis-throttle branch is merged.
use super::shared::{FleetThrottle, HeldLease, ThrottleError, ThrottleStats};
use super::throttle::{Admission, Limits};
pub struct RedisThrottle;
pub async fn connect(_url: &str, _prefix: &str) -> Result<RedisThrottle, ThrottleError> {
    Err(ThrottleError::Backend("not merged yet".into()))
}
#[async_trait::async_trait]
impl FleetThrottle for RedisThrottle {
    async fn try_admit(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Limits,
    ) -> Result<Admission, ThrottleError> {
        unreachable!()
    }
    async fn renew(&self, _: &str, _: &str, _: u64, _: u64) -> Result<bool, ThrottleError> {
        unreachable!()
    }
    async fn release(&self, _: &str, _: &str, _: u64) -> Result<bool, ThrottleError> {
        unreachable!()
    }
    async fn reap(&self, _: &str) -> Result<Vec<HeldLease>, ThrottleError> {
        unreachable!()
    }
    async fn rebuild(&self, _: &str, _: &[HeldLease], _: u64, _: u64) -> Result<(), ThrottleError> {
        unreachable!()
    }
    async fn stats(&self, _: &str) -> Result<ThrottleStats, ThrottleError> {
        unreachable!()
    }
    async fn forget(&self, _: &str) -> Result<(), ThrottleError> {
        unreachable!()
    }
}
