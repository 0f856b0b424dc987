//! The signed freshness statements check-in answers carry
//! ([`ota_format::freshness`] has the format and the threat model).
//!
//! One statement per device type, re-signed every quarter of
//! `freshness_secs` and whenever the release catalogue changes, so signing
//! (possibly in a token) happens a few times an hour, not per check-in.
//! Issue times are aligned to that quarter-period grid: every replica of a
//! scale-out deployment then issues the same `issued_at` for the same period,
//! and a device that talks to two replicas never sees time go backwards
//! (which it would refuse as a replay).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ota_format::{Envelope, Freshness};
use tracing::{debug, warn};

use crate::releases::Releases;
use crate::signing::SignerSlot;

#[derive(Clone)]
struct Cached {
    period: u64,
    window: Duration,
    generation: u64,
    signers: Arc<crate::signing::Signers>,
    env: Arc<Envelope>,
}

/// Signs and caches the statements.
pub struct FreshnessService {
    signers: SignerSlot,
    cache: Mutex<HashMap<String, Cached>>,
}

impl FreshnessService {
    pub fn new(signers: SignerSlot) -> FreshnessService {
        FreshnessService {
            signers,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The current statement for `device_type`, signing a new one when the
    /// period or the catalogue changed. `None` (and a WARN) only when the
    /// signers fail: a check-in is still answered, and agents that require
    /// statements wait for the next one.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled call at most leaves a finished signature
    /// uncached (the blocking task completes on its own).
    pub async fn statement(
        &self,
        releases: &Releases,
        device_type: &str,
        window: Duration,
    ) -> Option<Arc<Envelope>> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Re-signing period: a quarter of the window, at least 15 s.
        let step = (window.as_secs() / 4).max(15);
        let period = now - now % step;
        let generation = releases.generation();
        let signers = self.signers.load_full();
        if let Some(c) = self.cache.lock().unwrap().get(device_type)
            && c.period == period
            && c.window == window
            && c.generation == generation
            && Arc::ptr_eq(&c.signers, &signers)
        {
            return Some(c.env.clone());
        }
        let (latest, counter) = releases.latest(device_type);
        let statement = Freshness::new(
            device_type,
            latest,
            counter,
            UNIX_EPOCH + Duration::from_secs(period),
            window,
        );
        let signed = {
            let signers = signers.clone();
            tokio::task::spawn_blocking(move || statement.sign(&signers.refs())).await
        };
        match signed {
            Ok(Ok(env)) => {
                let env = Arc::new(env);
                debug!(device_type, period, "signed a freshness statement");
                self.cache.lock().unwrap().insert(
                    device_type.to_string(),
                    Cached {
                        period,
                        window,
                        generation,
                        signers: signers.clone(),
                        env: env.clone(),
                    },
                );
                Some(env)
            }
            Ok(Err(e)) => {
                warn!(error = %e, device_type, "signing the freshness statement failed: devices that require one will not act on offers until it works");
                None
            }
            Err(e) => {
                warn!(error = %e, "the freshness signing task failed");
                None
            }
        }
    }
}
