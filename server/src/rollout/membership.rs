//! Dynamic membership: which devices a rollout takes after its creation,
//! and when it counts as done (issue 15).
//!
//! A rollout has no fixed member list. Its selector (device type and tags)
//! is evaluated on every check-in against what the device is *now*, so a
//! device that enrolls after the rollout was created, whose tags change to
//! match, or that comes back online after weeks, joins at its next check-in:
//! in the wave its stable hash ranks it in ([`super::wave_of`] against the
//! bounds fixed at creation), admitted by the same throttle (cap, start
//! rate, queue) and counted by the same failure threshold.
//!
//! **Completion.** A rollout is `completed` when it is done with the
//! devices it has: its last wave is open and soaked, the success threshold
//! is met over every eligible device, and no member is in flight (waiting
//! in the queue, downloading, installed, rebooting) — or simply when every
//! eligible device finished. Devices that never checked in (offline) do
//! not keep it open for ever; the status reason says how many are
//! outstanding ("complete, awaiting new devices"). Completion is not an
//! end: the next matching device that needs the release *reopens* it
//! (state back to `active`, reason naming the device) and is admitted
//! under the same limits; when it finishes, the rollout completes again.
//!
//! A completed rollout stops taking devices when a newer rollout for its
//! device type is created (that one supersedes it, even where its selector
//! is narrower: two rollouts of one type never run side by side), or when
//! the operator aborts it. Pausing a completed rollout keeps newcomers
//! waiting.
//!
//! The failure baseline is not reset by a reopening: a newcomer's failure
//! counts against the whole rollout's outcomes, as it would have had it
//! enrolled a minute earlier.

use super::{Phase, RolloutRecord, RolloutSpec, RolloutState};

/// The start of a completed rollout's reason (operators and tests match it).
pub const AWAITING: &str = "complete, awaiting new devices";

/// Whether a member in `phase` is still in flight: it holds or waits for a
/// lease, or installs; a completed rollout must not leave it behind.
pub fn in_flight(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Waiting
            | Phase::Downloading
            | Phase::Downloaded
            | Phase::WaitingForWindow
            | Phase::Installed
            | Phase::Rebooting
    )
}

/// Whether [`super::advance_record`] needs the in-flight count to decide
/// completion: the rollout is active on its last wave, soaked, the success
/// threshold is met, and some eligible device has not finished. `waves`
/// as for `advance_record`. Lets the engines count members only then.
pub fn needs_in_flight(
    spec: &RolloutSpec,
    rec: &RolloutRecord,
    waves: &[(u64, u64, u64)],
    now: u64,
) -> bool {
    if rec.state != RolloutState::Active || rec.wave + 1 < waves.len() {
        return false;
    }
    let (eligible, done, finished) = totals(waves);
    now >= rec.wave_opened_at_ms + spec.soak_ms
        && done as f64 >= spec.success_threshold * eligible as f64
        && finished < eligible
}

/// (eligible, ok, ok + failures) summed over `waves`.
pub(super) fn totals(waves: &[(u64, u64, u64)]) -> (u64, u64, u64) {
    waves.iter().fold((0, 0, 0), |(e, d, f), &(we, ok, bad)| {
        (e + we, d + ok, f + ok + bad)
    })
}

/// The reason of a rollout completed with `done` of `eligible` devices
/// committed (or already current) and `finished` with an outcome.
pub fn completed_reason(done: u64, finished: u64, eligible: u64) -> String {
    let outstanding = eligible.saturating_sub(finished);
    if outstanding == 0 {
        format!("{AWAITING}: every eligible device finished, {done} of {eligible} on the release")
    } else {
        format!(
            "{AWAITING}: {done} of {eligible} eligible devices on the release; \
             {outstanding} not checked in yet join when they do"
        )
    }
}

/// The reason of a completed rollout reopened by `device`.
pub fn reopened_reason(device: &str) -> String {
    format!(
        "reopened: device {device} joined after completion; updating it under the same cap, rate and thresholds"
    )
}

/// Whether a rollout in `state` takes devices at check-in; `superseded`:
/// a newer rollout exists for its device type.
pub fn takes_devices(state: RolloutState, superseded: bool) -> bool {
    match state {
        // Aborted rollouts are still found, to cancel their downloads.
        RolloutState::Active | RolloutState::Paused | RolloutState::Aborted => true,
        RolloutState::Completed => !superseded,
    }
}

/// Whether rollout `all[i]` (of `all`, in creation order) can still
/// update devices: active, paused, or completed and not superseded by a
/// newer rollout of its device type. What it offers must stay available.
pub fn still_updates(all: &[super::RolloutStatus], i: usize) -> bool {
    let r = &all[i];
    let superseded = all[i + 1..]
        .iter()
        .any(|n| n.spec.device_type == r.spec.device_type);
    match r.state {
        RolloutState::Active | RolloutState::Paused => true,
        RolloutState::Completed => !superseded,
        RolloutState::Aborted => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(waves: Vec<u8>, wave: usize) -> RolloutRecord {
        let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
            "release": "2.0", "device_type": "t", "waves": waves,
            "max_concurrent": 5, "max_starts_per_min": 60.0, "success_threshold": 0.9
        }))
        .unwrap();
        RolloutRecord {
            id: "r1".into(),
            spec,
            created_at_ms: 0,
            state: RolloutState::Active,
            reason: String::new(),
            wave,
            wave_opened_at_ms: 0,
            baseline: (0, 0),
            wave_bounds: Vec::new(),
        }
    }

    #[test]
    fn a_rollout_with_absent_devices_completes_only_when_nothing_is_in_flight() {
        // 10 eligible, 9 committed, 1 never checked in.
        let waves = [(10, 9, 0)];
        let mut r = rec(vec![100], 0);
        let spec = r.spec.clone();
        assert!(needs_in_flight(&spec, &r, &waves, 1));
        assert!(!super::super::advance_record(
            &spec,
            &mut r,
            &waves,
            1,
            Some(1)
        ));
        assert!(!super::super::advance_record(
            &spec, &mut r, &waves, 1, None
        ));
        assert_eq!(r.state, RolloutState::Active);
        assert!(super::super::advance_record(
            &spec,
            &mut r,
            &waves,
            1,
            Some(0)
        ));
        assert_eq!(r.state, RolloutState::Completed);
        assert!(r.reason.starts_with(AWAITING), "{}", r.reason);
        // Below the success threshold it stays open.
        let mut r = rec(vec![100], 0);
        assert!(!needs_in_flight(&spec, &r, &[(10, 8, 0)], 1));
        assert!(!super::super::advance_record(
            &spec,
            &mut r,
            &[(10, 8, 0)],
            1,
            Some(0)
        ));
        // Not on the last wave: the wave rule, not completion.
        let r = rec(vec![50, 100], 0);
        assert!(!needs_in_flight(&r.spec, &r, &[(5, 5, 0), (5, 0, 0)], 1));
    }

    #[test]
    fn a_superseded_completed_rollout_takes_no_devices() {
        assert!(takes_devices(RolloutState::Completed, false));
        assert!(!takes_devices(RolloutState::Completed, true));
        assert!(takes_devices(RolloutState::Active, true));
    }

    #[test]
    fn the_completed_reason_counts_outstanding_devices() {
        assert!(completed_reason(3, 3, 3).starts_with(AWAITING));
        assert!(completed_reason(9, 9, 10).contains("1 not checked in yet"));
    }
}
