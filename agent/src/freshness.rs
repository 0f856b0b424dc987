//! The agent's side of freshness statements ([`ota_format::freshness`]):
//! the persisted time floor, and the checks every check-in answer and every
//! offered manifest go through.
//!
//! The floor lives in `freshness.json` in the data directory, replaced
//! atomically (write, fsync, rename, fsync the directory) each time a newer
//! statement is accepted, so neither a crash nor a reboot lets an older
//! statement — or an older offer — back in.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ota_format::{Envelope, Freshness, FreshnessError, FreshnessFloor, TrustedKeys};

use crate::state::{State, StateError};

/// The floor and the policy.
pub struct FreshnessGuard {
    floor: Mutex<FreshnessFloor>,
    required: bool,
    /// The last statement accepted, verified: the server repeats one
    /// statement for a quarter of its window, so most check-ins skip the
    /// signature check (the time checks always run).
    /// Keyed by the trusted key set too: a reload that retires a key
    /// re-verifies.
    last: Mutex<Option<(Envelope, Freshness, Arc<TrustedKeys>)>>,
}

/// What went wrong accepting a statement.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Refused(#[from] FreshnessError),
    #[error("recording the freshness floor: {0}")]
    State(#[from] StateError),
}

impl FreshnessGuard {
    /// Loads the floor. `required`: refuse answers without a statement even
    /// before the first one was seen (`require_freshness`).
    pub fn load(state: &State, required: bool) -> Result<FreshnessGuard, StateError> {
        Ok(FreshnessGuard {
            floor: Mutex::new(state.freshness()?.unwrap_or_default()),
            required,
            last: Mutex::new(None),
        })
    }

    /// The floor as it stands.
    pub fn floor(&self) -> FreshnessFloor {
        *self.floor.lock().unwrap()
    }

    /// "Now" for expiry checks: the clock, never earlier than the floor.
    pub fn now(&self, clock: SystemTime) -> SystemTime {
        self.floor().now(clock)
    }

    /// The digest of the statement held, verified under `trusted`, to echo
    /// in a check-in (`CheckinRequest::freshness_held`): a server whose
    /// current statement it is leaves it out of the answer.
    pub fn held(&self, trusted: &Arc<TrustedKeys>) -> Option<ota_format::Digest> {
        self.last
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(_, _, t)| Arc::ptr_eq(t, trusted))
            .map(|(e, _, _)| e.payload_digest())
    }

    /// Checks the statement of a check-in answer and, when it moves the
    /// floor, persists the new floor before returning. `Ok` means the
    /// answer may be acted on.
    ///
    /// An answer without a statement stands on the statement held (see
    /// [`FreshnessGuard::held`]), checked again against the clock and the
    /// floor, so it expires as it would have had the server repeated it.
    pub fn accept(
        &self,
        statement: Option<&Envelope>,
        trusted: &Arc<TrustedKeys>,
        device_type: &str,
        clock: SystemTime,
        state: &State,
    ) -> Result<(), GuardError> {
        let current = self.floor();
        let Some(env) = statement else {
            let held = self
                .last
                .lock()
                .unwrap()
                .as_ref()
                .filter(|(_, _, t)| Arc::ptr_eq(t, trusted))
                .map(|(_, f, _)| f.clone());
            if let Some(f) = held {
                current.check(&f, device_type, clock)?;
                return Ok(());
            }
            if self.required || current.seen {
                return Err(FreshnessError::Missing.into());
            }
            return Ok(());
        };
        let cached = self
            .last
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(e, _, t)| e == env && Arc::ptr_eq(t, trusted))
            .map(|(_, f, _)| f.clone());
        let f = match cached {
            Some(f) => f,
            None => Freshness::open(env, trusted)?,
        };
        let next = current.check(&f, device_type, clock)?;
        if next != current {
            state.set_freshness(&next)?;
            let mut floor = self.floor.lock().unwrap();
            // Another accept may have raced ahead: keep the newer.
            if next.newest_issued_at >= floor.newest_issued_at {
                *floor = next;
            }
        }
        *self.last.lock().unwrap() = Some((env.clone(), f, trusted.clone()));
        Ok(())
    }

    /// Refuses an offered manifest older than the newest release vouched for.
    pub fn check_offer(&self, security_counter: u64) -> Result<(), FreshnessError> {
        self.floor().check_offer(security_counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ota_format::SigningKeyPair;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn the_floor_survives_a_restart_so_a_replay_stays_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKeyPair::generate().unwrap();
        let trusted = Arc::new(TrustedKeys::try_new([key.verifying_key()], 1).unwrap());
        let hour = Duration::from_secs(3600);
        let old = Freshness::new("rpi4", None, 1, at(1_800_000_000), hour)
            .sign(&[&key])
            .unwrap();
        let new = Freshness::new("rpi4", None, 2, at(1_800_000_900), hour)
            .sign(&[&key])
            .unwrap();
        {
            let state = State::open(dir.path()).unwrap();
            let g = FreshnessGuard::load(&state, false).unwrap();
            // No statement from a server that never sent one: fine.
            g.accept(None, &trusted, "rpi4", at(5), &state).unwrap();
            // A device whose clock says 1970 accepts a signed statement...
            g.accept(Some(&new), &trusted, "rpi4", at(5), &state)
                .unwrap();
            // ...and from then on believes no earlier time.
            assert_eq!(g.now(at(5)), at(1_800_000_900));
            assert!(g.check_offer(1).is_err(), "older than the newest release");
            assert!(g.check_offer(2).is_ok());
        }
        // After a reboot (the clock in 1970 again) the floor is still there.
        let state = State::open(dir.path()).unwrap();
        let g = FreshnessGuard::load(&state, false).unwrap();
        assert_eq!(g.now(at(5)), at(1_800_000_900));
        let e = g
            .accept(Some(&old), &trusted, "rpi4", at(5), &state)
            .unwrap_err();
        assert!(
            matches!(e, GuardError::Refused(FreshnessError::Replayed { .. })),
            "{e}"
        );
        // Once statements were seen, an answer without one is refused.
        let e = g.accept(None, &trusted, "rpi4", at(5), &state).unwrap_err();
        assert!(
            matches!(e, GuardError::Refused(FreshnessError::Missing)),
            "{e}"
        );
        // Past its window (by the floor, whatever the clock says): refused.
        let later = Freshness::new("rpi4", None, 2, at(1_800_000_900), hour)
            .sign(&[&key])
            .unwrap();
        g.accept(Some(&later), &trusted, "rpi4", at(1_800_004_501), &state)
            .unwrap_err();
    }

    /// A server leaves out the statement the device echoed: the answer
    /// stands on the held one, which expires all the same; a key reload
    /// (another trusted set) drops it, so it is neither echoed nor used.
    #[test]
    fn an_answer_without_the_held_statement_stands_on_it_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKeyPair::generate().unwrap();
        let trusted = Arc::new(TrustedKeys::try_new([key.verifying_key()], 1).unwrap());
        let hour = Duration::from_secs(3600);
        let s = Freshness::new("rpi4", None, 1, at(1_800_000_000), hour)
            .sign(&[&key])
            .unwrap();
        let state = State::open(dir.path()).unwrap();
        let g = FreshnessGuard::load(&state, true).unwrap();
        assert_eq!(g.held(&trusted), None, "nothing held yet");
        g.accept(Some(&s), &trusted, "rpi4", at(1_800_000_010), &state)
            .unwrap();
        assert_eq!(g.held(&trusted), Some(s.payload_digest()));
        g.accept(None, &trusted, "rpi4", at(1_800_001_000), &state)
            .unwrap();
        let e = g
            .accept(None, &trusted, "rpi4", at(1_800_003_601), &state)
            .unwrap_err();
        assert!(
            matches!(e, GuardError::Refused(FreshnessError::Expired { .. })),
            "{e}"
        );
        let reloaded = Arc::new(TrustedKeys::try_new([key.verifying_key()], 1).unwrap());
        assert_eq!(g.held(&reloaded), None);
        let e = g
            .accept(None, &reloaded, "rpi4", at(1_800_001_000), &state)
            .unwrap_err();
        assert!(
            matches!(e, GuardError::Refused(FreshnessError::Missing)),
            "{e}"
        );
    }

    #[test]
    fn a_required_statement_is_required_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKeyPair::generate().unwrap();
        let trusted = Arc::new(TrustedKeys::try_new([key.verifying_key()], 1).unwrap());
        let state = State::open(dir.path()).unwrap();
        let g = FreshnessGuard::load(&state, true).unwrap();
        assert!(g.accept(None, &trusted, "rpi4", at(5), &state).is_err());
    }
}
