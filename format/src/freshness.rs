//! Freshness statements: the defence against freeze and replay attacks,
//! the way TUF's *timestamp* role does it.
//!
//! A signed manifest proves *what* an update is, not that it is *current*:
//! whoever can answer a device's check-in (a compromised mirror, a man in the
//! middle holding a stolen TLS key, a server restored from an old backup) could
//! keep offering an old, validly signed release — or "nothing to do" — forever.
//! So the server also signs, per device type, a short-lived statement: "at
//! `issued_at` the newest release of this device type was `latest_version`
//! with security counter `latest_security_counter`; believe this until
//! `expires_at`". The statement rides in every check-in answer.
//!
//! The agent ([`FreshnessFloor::check`]) accepts a statement only if it is
//! signed by its trusted keys (same threshold as manifests), is for its device
//! type, is not older than the newest statement it has seen, and has not
//! expired — where "now" is never earlier than the newest signed time seen
//! (the *time floor*), so a device whose clock restarts in 1970 still works,
//! and a clock that runs ahead only shortens windows. It refuses an offer
//! whose manifest's security counter is below the newest statement's. The
//! floor is persisted atomically by the agent, so a reboot does not reopen
//! the window. `docs/format.md` states the threat model.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, EnvelopeError, ManifestSigner, SignError, TrustedKeys};
use crate::limits::MAX_NAME_LEN;

/// DSSE payload type of a freshness statement: a signature over a statement
/// never verifies as a manifest, nor the reverse.
pub const FRESHNESS_PAYLOAD_TYPE: &str = "application/vnd.edge-ota.freshness.v1+json";

/// Largest serialized statement an agent parses.
pub const MAX_FRESHNESS_BYTES: usize = 16 << 10;

/// The signed statement.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Freshness {
    pub device_type: String,
    /// Newest release of the device type; `None` before the first release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<String>,
    /// Highest security counter of any release of the device type.
    pub latest_security_counter: u64,
    /// Seconds since the Unix epoch when the server signed the statement.
    pub issued_at: u64,
    /// Seconds since the Unix epoch after which the statement is refused.
    pub expires_at: u64,
}

/// Why a statement (or an offer, against the statement) was refused.
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    #[error("freshness statement refused: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("freshness statement is not valid JSON: {0}")]
    Malformed(String),
    #[error("freshness statement is for device type {found:?}, this device is {ours:?}")]
    DeviceType { found: String, ours: String },
    #[error(
        "freshness statement issued at {issued_at} is older than the newest one this device has seen ({newest}): a replayed answer; check the path to the server (proxy, mirror, DNS)"
    )]
    Replayed { issued_at: u64, newest: u64 },
    #[error(
        "freshness statement expired at {expires_at} (now is at least {now}): the server (or something between it and the device) is serving stale answers; check that ota-server runs and its clock"
    )]
    Expired { expires_at: u64, now: u64 },
    #[error("the server sent no freshness statement, and this device requires one")]
    Missing,
    #[error(
        "offered manifest has security counter {found}, below {latest} of the newest release the server signed for: refusing a stale or frozen offer"
    )]
    StaleOffer { found: u64, latest: u64 },
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Freshness {
    /// A statement issued now, valid for `window`.
    pub fn new(
        device_type: &str,
        latest_version: Option<String>,
        latest_security_counter: u64,
        now: SystemTime,
        window: Duration,
    ) -> Freshness {
        let issued_at = secs(now);
        Freshness {
            device_type: device_type.into(),
            latest_version,
            latest_security_counter,
            issued_at,
            expires_at: issued_at.saturating_add(window.as_secs().max(1)),
        }
    }

    /// Signs the statement with every signer.
    pub fn sign(&self, signers: &[&dyn ManifestSigner]) -> Result<Envelope, SignError> {
        let body = serde_json::to_vec(self).expect("statement serialization cannot fail");
        Envelope::sign_with(FRESHNESS_PAYLOAD_TYPE, &body, signers)
    }

    /// Verifies the signatures and parses the statement. Checks nothing
    /// about time: that is [`FreshnessFloor::check`]'s job.
    pub fn open(env: &Envelope, trusted: &TrustedKeys) -> Result<Freshness, FreshnessError> {
        if env.payload_type != FRESHNESS_PAYLOAD_TYPE {
            return Err(EnvelopeError::WrongPayloadType {
                found: env.payload_type.chars().take(100).collect(),
            }
            .into());
        }
        if env.payload.len() > MAX_FRESHNESS_BYTES {
            return Err(FreshnessError::Malformed("statement too large".into()));
        }
        let body = env.verify_signatures(trusted)?;
        let f: Freshness =
            serde_json::from_slice(&body).map_err(|e| FreshnessError::Malformed(e.to_string()))?;
        if f.device_type.len() > MAX_NAME_LEN
            || f.latest_version
                .as_ref()
                .is_some_and(|v| v.len() > MAX_NAME_LEN)
        {
            return Err(FreshnessError::Malformed("name too long".into()));
        }
        Ok(f)
    }
}

/// What a device remembers between statements: the newest statement's
/// issue time (the time floor) and security counter. Persisted by the agent
/// after every accepted statement.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FreshnessFloor {
    /// `issued_at` of the newest statement accepted; also the time floor:
    /// the device never believes a clock earlier than this.
    pub newest_issued_at: u64,
    /// `latest_security_counter` of the newest statement accepted.
    pub latest_security_counter: u64,
    /// Whether a statement was ever accepted: once one was, answers without
    /// one are refused (a server that signs statements cannot have them
    /// stripped by whoever sits in between).
    pub seen: bool,
}

impl FreshnessFloor {
    /// "Now" as this device may believe it: the clock, or the floor when the
    /// clock is behind it (no real-time clock, a battery gone flat).
    pub fn now(&self, clock: SystemTime) -> SystemTime {
        let floor = UNIX_EPOCH + Duration::from_secs(self.newest_issued_at);
        clock.max(floor)
    }

    /// Checks a verified statement against the floor and returns the floor
    /// to persist if it is accepted.
    pub fn check(
        &self,
        f: &Freshness,
        device_type: &str,
        clock: SystemTime,
    ) -> Result<FreshnessFloor, FreshnessError> {
        if f.device_type != device_type {
            return Err(FreshnessError::DeviceType {
                found: f.device_type.clone(),
                ours: device_type.into(),
            });
        }
        if f.issued_at < self.newest_issued_at {
            return Err(FreshnessError::Replayed {
                issued_at: f.issued_at,
                newest: self.newest_issued_at,
            });
        }
        let now = secs(self.now(clock));
        if now > f.expires_at {
            return Err(FreshnessError::Expired {
                expires_at: f.expires_at,
                now,
            });
        }
        Ok(FreshnessFloor {
            newest_issued_at: f.issued_at,
            latest_security_counter: self.latest_security_counter.max(f.latest_security_counter),
            seen: true,
        })
    }

    /// Refuses an offered manifest older (by security counter) than the
    /// newest release a statement vouched for.
    pub fn check_offer(&self, manifest_security_counter: u64) -> Result<(), FreshnessError> {
        if manifest_security_counter < self.latest_security_counter {
            return Err(FreshnessError::StaleOffer {
                found: manifest_security_counter,
                latest: self.latest_security_counter,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SigningKeyPair;

    fn setup() -> (SigningKeyPair, TrustedKeys) {
        let k = SigningKeyPair::generate().unwrap();
        let t = TrustedKeys::try_new([k.verifying_key()], 1).unwrap();
        (k, t)
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn replayed_statement_is_refused() {
        let (k, t) = setup();
        let old = Freshness::new(
            "rpi4",
            Some("1.0".into()),
            1,
            at(1_000_000),
            Duration::from_secs(3600),
        );
        let new = Freshness::new(
            "rpi4",
            Some("1.1".into()),
            1,
            at(1_000_600),
            Duration::from_secs(3600),
        );
        let (old_env, new_env) = (old.sign(&[&k]).unwrap(), new.sign(&[&k]).unwrap());
        let floor = FreshnessFloor::default();
        let floor = floor
            .check(
                &Freshness::open(&new_env, &t).unwrap(),
                "rpi4",
                at(1_000_700),
            )
            .unwrap();
        // The old statement is still within its window, but older than seen.
        let err = floor
            .check(
                &Freshness::open(&old_env, &t).unwrap(),
                "rpi4",
                at(1_000_700),
            )
            .unwrap_err();
        assert!(matches!(err, FreshnessError::Replayed { .. }), "{err}");
    }

    #[test]
    fn expired_statement_is_refused() {
        let (k, t) = setup();
        let f = Freshness::new("rpi4", None, 0, at(1_000_000), Duration::from_secs(60));
        let f = Freshness::open(&f.sign(&[&k]).unwrap(), &t).unwrap();
        let err = FreshnessFloor::default()
            .check(&f, "rpi4", at(1_000_061))
            .unwrap_err();
        assert!(matches!(err, FreshnessError::Expired { .. }), "{err}");
    }

    #[test]
    fn clock_in_1970_works_through_the_floor_and_cannot_revive_expired_statements() {
        let day = Duration::from_secs(86_400);
        let first = Freshness::new("rpi4", None, 0, at(1_800_000_000), day);
        let floor = FreshnessFloor::default()
            .check(&first, "rpi4", at(5))
            .expect("a device without RTC accepts a signed statement");
        assert_eq!(floor.now(at(5)), at(1_800_000_000));
        let later = Freshness::new("rpi4", None, 0, at(1_800_003_600), day);
        let floor = floor.check(&later, "rpi4", at(10)).unwrap();
        // A statement that expired before the floor is refused even though
        // the clock says 1970.
        let stale = Freshness::new("rpi4", None, 0, at(1_800_003_600 - 2 * 86_400), day);
        assert!(
            FreshnessFloor::default()
                .check(&stale, "rpi4", at(10))
                .is_ok()
        );
        assert!(matches!(
            floor.check(&stale, "rpi4", at(10)),
            Err(FreshnessError::Replayed { .. })
        ));
    }

    #[test]
    fn statement_and_manifest_signatures_do_not_cross() {
        let (k, t) = setup();
        let f = Freshness::new("rpi4", None, 0, at(1_000_000), Duration::from_secs(60));
        let env = f.sign(&[&k]).unwrap();
        assert!(env.verify(&t).is_err(), "a statement is not a manifest");
        let m = Envelope::sign(b"{}", &[&k]);
        assert!(
            Freshness::open(&m, &t).is_err(),
            "a manifest is not a statement"
        );
    }

    #[test]
    fn stale_offer_is_refused_and_other_device_types_too() {
        let f = Freshness::new(
            "rpi4",
            Some("2.0".into()),
            7,
            at(1_000),
            Duration::from_secs(60),
        );
        let floor = FreshnessFloor::default()
            .check(&f, "rpi4", at(1_000))
            .unwrap();
        assert!(floor.check_offer(7).is_ok());
        assert!(matches!(
            floor.check_offer(6),
            Err(FreshnessError::StaleOffer { .. })
        ));
        assert!(matches!(
            FreshnessFloor::default().check(&f, "x86", at(1_000)),
            Err(FreshnessError::DeviceType { .. })
        ));
    }
}
