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
//!
//! Every check-in reads the cache, so the read path takes no lock and
//! copies nothing: the cache is an [`ArcSwap`] replaced whole on the rare
//! re-signing, and each entry keeps the envelope's JSON, serialised once,
//! which the check-in answer embeds as it is ([`Statement::json`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ota_format::{Envelope, Freshness};
use serde_json::value::RawValue;
use tracing::{debug, warn};

use crate::releases::Releases;
use crate::signing::SignerSlot;

#[derive(Clone)]
struct Cached {
    period: u64,
    window: Duration,
    generation: u64,
    signers: Arc<crate::signing::Signers>,
    statement: Statement,
}

/// A signed statement, and its JSON as check-in answers carry it.
#[derive(Clone, Debug)]
pub struct Statement {
    pub envelope: Arc<Envelope>,
    /// `envelope` serialised (what `serde_json::to_string` gives for it).
    pub json: Arc<RawValue>,
    /// [`Envelope::payload_digest`] of `envelope`: a device that echoes it
    /// holds this statement already.
    pub payload_sha256: ota_format::Digest,
}

/// Signs and caches the statements.
pub struct FreshnessService {
    signers: SignerSlot,
    cache: ArcSwap<HashMap<String, Cached>>,
}

impl FreshnessService {
    pub fn new(signers: SignerSlot) -> FreshnessService {
        FreshnessService {
            signers,
            cache: ArcSwap::from_pointee(HashMap::new()),
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
    ) -> Option<Statement> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Re-signing period: a quarter of the window, at least 15 s.
        let step = (window.as_secs() / 4).max(15);
        let period = now - now % step;
        let generation = releases.generation();
        let signers = self.signers.load_full();
        if let Some(c) = self.cache.load().get(device_type)
            && c.period == period
            && c.window == window
            && c.generation == generation
            && Arc::ptr_eq(&c.signers, &signers)
        {
            return Some(c.statement.clone());
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
                let json = match serde_json::value::to_raw_value(&env) {
                    Ok(j) => Arc::<RawValue>::from(j),
                    Err(e) => {
                        warn!(error = %e, "serialising the freshness statement failed");
                        return None;
                    }
                };
                let statement = Statement {
                    payload_sha256: env.payload_digest(),
                    envelope: Arc::new(env),
                    json,
                };
                debug!(device_type, period, "signed a freshness statement");
                // Concurrent signers of other device types may replace
                // the map meanwhile: `rcu` retries on the newest one.
                self.cache.rcu(|old| {
                    let mut m = HashMap::clone(old);
                    m.insert(
                        device_type.to_string(),
                        Cached {
                            period,
                            window,
                            generation,
                            signers: signers.clone(),
                            statement: statement.clone(),
                        },
                    );
                    m
                });
                Some(statement)
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
