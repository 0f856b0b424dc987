//! Rollouts: who may update, when, and how fast.
//!
//! A rollout offers one release to the devices of one type (optionally
//! narrowed by tags), in **waves**: cumulative percentages of the eligible
//! devices, filled by rank (see [`wave_bounds`]): at creation the devices
//! that need the release are ordered by a hash of (device id, rollout id),
//! and each wave takes its share of them, rounded up, at least one device
//! when its percentage is above zero — so a 1 % canary of 30 devices holds
//! one device, not none. The hash of the last device of each wave is stored
//! with the rollout, so a device's wave never changes during the rollout,
//! and a device that enrolls later falls into the wave its hash ranks it in.
//! A wave opens when the previous one has soaked for `soak` and enough of its
//! devices *committed* (healthy after reboot). Within open waves a device is
//! admitted by the [`throttle`]: a free download lease under the concurrency
//! cap, a start-rate token and its turn in the waiting queue.
//!
//! Failures (`failed` after its retries, `rolled-back`, lease expiries beyond
//! retries) are counted over the waves opened so far; once `min_sample`
//! outcomes are in and the failure rate reaches the threshold, the rollout
//! pauses or aborts itself and records why. Counting over all opened waves,
//! not just the newest, is deliberate: the canary wave is usually smaller
//! than the minimum sample, and a threshold that can never fire is worse
//! than one that fires a little early.
//!
//! Every state change that a device or operator was told about is written to
//! sled and made durable (group commit) before the answer goes out, so a
//! kill -9 never forgets an admission, an event or a pause.

pub mod membership;
pub mod redis_throttle;
pub mod schedule;
pub mod shared;
pub mod throttle;
pub mod window;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use ota_format::api::{Action, AgentState, Event, EventKind, UpdateOffer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{info, info_span, warn};

use crate::releases::{Artifacts, Releases};
use crate::store::{Store, StoreError, decode, encode, key2, load_all};
use throttle::{Admission, Limits, Throttle};

/// What to do when the failure threshold is reached.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    Pause,
    Abort,
}

/// A rollout's lifecycle state.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    Active,
    Paused,
    Aborted,
    Completed,
}

/// What the operator asked for (`rollout create`). Validated by
/// [`RolloutSpec::validate`] before anything is stored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    pub release: String,
    /// Filled from the group when `group` is given.
    #[serde(default)]
    pub device_type: String,
    /// The [`crate::groups::Group`] targeted (`rollout create --group`): its
    /// device type and tags were copied here at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Every tag here must match the device's.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Cumulative percentages, increasing, ending at 100.
    #[serde(default = "default_waves")]
    pub waves: Vec<u8>,
    /// Minimum time a wave stays open before the next opens.
    #[serde(default)]
    pub soak_ms: u64,
    /// Fleet-wide cap on concurrent downloads.
    pub max_concurrent: u64,
    /// Starts per minute (before ramping).
    pub max_starts_per_min: f64,
    /// Each `ramp_every` commits multiply the start rate by this (≥ 1; 1 =
    /// constant), like AWS IoT Jobs' exponential rollout: the rate is
    /// `max_starts_per_min × ramp_factor^⌊committed ÷ ramp_every⌋`, at most
    /// `ramp_max_per_min` ([`ramped_rate`]).
    #[serde(default = "one")]
    pub ramp_factor: f64,
    /// Commits per ramp step; default `min_sample` (at least 1).
    #[serde(default)]
    pub ramp_every: u64,
    /// The ramp's ceiling in starts per minute (AWS's `maximumPerMinute`);
    /// default 1000 × `max_starts_per_min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_max_per_min: Option<f64>,
    /// When the rollout starts admitting devices (Unix ms); absent or past:
    /// at once ([`schedule`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<u64>,
    /// The earliest opening of each wave, as an offset from the start (one
    /// per wave, the first 0, non-decreasing); empty: no time floor. A wave
    /// still needs the previous one soaked and successful.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wave_offsets_ms: Vec<u64>,
    /// Failure rate (0..1) that stops the rollout.
    #[serde(default = "default_threshold")]
    pub failure_threshold: f64,
    /// Committed fraction (0..1] of a wave's devices needed to open the next.
    #[serde(default = "default_success")]
    pub success_threshold: f64,
    /// Outcomes needed before the failure threshold is evaluated.
    #[serde(default = "default_min_sample")]
    pub min_sample: u64,
    #[serde(default = "default_on_failure")]
    pub on_failure: OnFailure,
    /// Extra attempts after a `failed` report or a lease expiry.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Maintenance windows ([`window`]): with any, devices download and
    /// verify when admitted but switch slots only inside one (or when an
    /// operator says `rollout install-now`). None: install at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<window::Window>,
}

fn default_waves() -> Vec<u8> {
    vec![100]
}
fn one() -> f64 {
    1.0
}
fn default_threshold() -> f64 {
    0.05
}
fn default_success() -> f64 {
    0.9
}
fn default_min_sample() -> u64 {
    20
}
fn default_on_failure() -> OnFailure {
    OnFailure::Pause
}
fn default_retries() -> u32 {
    2
}

impl RolloutSpec {
    /// Checks the spec; the message says which field is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        ota_format::api::check_name("release", &self.release)?;
        ota_format::api::check_name("device type", &self.device_type)?;
        for (k, v) in &self.selector {
            ota_format::api::check_name("selector key", k)?;
            ota_format::api::check_name("selector value", v)?;
        }
        if self.waves.is_empty() || self.waves.len() > 20 {
            return Err("waves must list 1 to 20 cumulative percentages".into());
        }
        if self.waves.windows(2).any(|w| w[0] >= w[1]) || self.waves.contains(&0) {
            return Err("waves must be strictly increasing percentages above 0".into());
        }
        if *self.waves.last().unwrap() != 100 {
            return Err("the last wave must be 100 (every eligible device)".into());
        }
        if self.max_concurrent == 0 || self.max_concurrent > 10_000_000 {
            return Err("max_concurrent must be 1 to 10,000,000".into());
        }
        if !(self.max_starts_per_min > 0.0 && self.max_starts_per_min.is_finite()) {
            return Err("max_starts_per_min must be positive".into());
        }
        if !(self.ramp_factor >= 1.0 && self.ramp_factor <= 100.0) {
            return Err("ramp_factor must be 1 to 100".into());
        }
        if let Some(m) = self.ramp_max_per_min
            && !(m.is_finite() && m >= self.max_starts_per_min)
        {
            return Err("ramp_max_per_min must be at least max_starts_per_min".into());
        }
        schedule::check(self, crate::now_ms())?;
        if !(self.failure_threshold > 0.0 && self.failure_threshold <= 1.0) {
            return Err("failure_threshold must be in (0, 100%]".into());
        }
        if !(self.success_threshold > 0.0 && self.success_threshold <= 1.0) {
            return Err("success_threshold must be in (0, 100%]".into());
        }
        if self.max_retries > 100 {
            return Err("max_retries must be at most 100".into());
        }
        window::check_windows(&self.windows)?;
        Ok(())
    }
}

/// The persisted rollout.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RolloutRecord {
    pub id: String,
    pub spec: RolloutSpec,
    pub created_at_ms: u64,
    pub state: RolloutState,
    /// Why the rollout is in its state (who paused it, which threshold).
    pub reason: String,
    /// Index of the newest open wave.
    pub wave: usize,
    pub wave_opened_at_ms: u64,
    /// Failures and successes when the operator last resumed: the failure
    /// threshold is evaluated on what happened since.
    #[serde(default)]
    pub baseline: (u64, u64),
    /// The rank key of the last device of each wave but the last, fixed at
    /// creation ([`wave_bounds`]). Empty for a rollout created with no
    /// device to update (or before waves were filled by rank): waves then
    /// come from the hash percentile.
    #[serde(default)]
    pub wave_bounds: Vec<u64>,
}

impl RolloutRecord {
    /// A new rollout's record, created at `now`: a scheduled one says when
    /// it starts, and its first wave's soak counts from the start.
    pub fn new(id: String, spec: RolloutSpec, now: u64, wave_bounds: Vec<u64>) -> RolloutRecord {
        RolloutRecord {
            id,
            reason: schedule::created_reason(&spec, now),
            wave_opened_at_ms: schedule::first_wave_opens(&spec, now),
            spec,
            created_at_ms: now,
            state: RolloutState::Active,
            wave: 0,
            baseline: (0, 0),
            wave_bounds,
        }
    }

    /// The wave (index) `device` belongs to.
    pub fn wave_of(&self, device: &str) -> usize {
        wave_of(&self.spec, &self.id, &self.wave_bounds, device)
    }
}

/// Where a device is in a rollout.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Waiting,
    Downloading,
    Downloaded,
    Installed,
    Rebooting,
    Committed,
    /// Failed after its retries (final).
    Failed,
    RolledBack,
    /// The rollout was aborted while the device downloaded.
    Cancelled,
    /// Downloaded and verified; holds no lease; waits for a maintenance
    /// window (or `rollout install-now`) to switch. Not a success: a wave
    /// whose devices wait does not count them as committed.
    WaitingForWindow,
}

/// Phases a status counts (the length of its per-phase table).
pub const PHASES: usize = 10;

impl Phase {
    /// Every phase, in declaration order (`p as usize` indexes it).
    pub const ALL: [Phase; PHASES] = [
        Phase::Waiting,
        Phase::Downloading,
        Phase::Downloaded,
        Phase::Installed,
        Phase::Rebooting,
        Phase::Committed,
        Phase::Failed,
        Phase::RolledBack,
        Phase::Cancelled,
        Phase::WaitingForWindow,
    ];

    /// Admitted and not finished, and not back to waiting for a retry:
    /// the dashboard's "in progress".
    pub fn is_in_progress(self) -> bool {
        matches!(
            self,
            Phase::Downloading
                | Phase::Downloaded
                | Phase::WaitingForWindow
                | Phase::Installed
                | Phase::Rebooting
        )
    }

    /// The name stored and shown (`waiting-for-window`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Downloading => "downloading",
            Phase::Downloaded => "downloaded",
            Phase::Installed => "installed",
            Phase::Rebooting => "rebooting",
            Phase::Committed => "committed",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled-back",
            Phase::Cancelled => "cancelled",
            Phase::WaitingForWindow => "waiting-for-window",
        }
    }
}

/// A device's record in a rollout.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Member {
    pub device: String,
    pub wave: usize,
    pub phase: Phase,
    /// Attempts started (the update id is `rollout.attempt`).
    pub attempt: u32,
    pub update_id: String,
    pub artifacts: Option<Artifacts>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub bytes_verified: u64,
    /// An operator said install now (`rollout install-now`): the device
    /// switches when its update is verified, window or not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub install_now: bool,
}

/// Per-wave counters (atomics: updated on the hot path without locks).
#[derive(Default)]
pub struct WaveCounters {
    pub eligible: AtomicU64,
    /// Already on the release when it was created (count as done).
    pub current: AtomicU64,
    pub admitted: AtomicU64,
    pub installed: AtomicU64,
    pub committed: AtomicU64,
    pub failed: AtomicU64,
    pub rolled_back: AtomicU64,
    pub bytes_served: AtomicU64,
}

/// One rollout in memory.
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    /// The record; written under this lock by operator actions, the
    /// failure threshold and the tick.
    rec: Mutex<RolloutRecord>,
    /// Copies of `rec.state` and `rec.wave` for the check-in path, which
    /// reads them on every check-in: atomics, so check-ins of one rollout
    /// never queue on its record lock. Updated under that lock
    /// ([`Rollout::publish`]).
    state_now: std::sync::atomic::AtomicU8,
    wave_now: std::sync::atomic::AtomicUsize,
    pub throttle: Throttle,
    members: DashMap<String, Member>,
    pub waves: Vec<WaveCounters>,
    /// `rec.wave_bounds` (fixed for the rollout's life).
    bounds: Vec<u64>,
    /// When it starts admitting ([`schedule::start_ms`]; fixed).
    starts_at: u64,
}

impl Rollout {
    /// Whether `device` is a member: the rollout admitted it at least once
    /// (members are recorded at admission).
    pub fn has_member(&self, device: &str) -> bool {
        self.members.contains_key(device)
    }
}

/// The wave percentile (0..100) of a device in a rollout: stable for the
/// rollout's life, independent across rollouts (so the same devices are not
/// always the canaries).
pub fn percentile(device: &str, rollout: &str) -> u8 {
    (rank_key(device, rollout) % 100) as u8
}

/// The rank key of a device in a rollout: the first 8 bytes of the hash
/// [`percentile`] reduces, so ranks and percentiles agree.
pub fn rank_key(device: &str, rollout: &str) -> u64 {
    let h = Sha256::new()
        .chain_update(rollout.as_bytes())
        .chain_update([0])
        .chain_update(device.as_bytes())
        .finalize();
    u64::from_be_bytes(h[..8].try_into().unwrap())
}

/// The waves filled by rank: `keys` are the [`rank_key`]s of the devices the
/// rollout is to update (any order). Wave `i` takes its share
/// `waves[i] - waves[i-1]` percent of them, rounded up and at least one
/// device, until none are left; the result is the key of the last device of
/// each wave but the last (the last wave takes everything above). Rounding
/// up favours the early waves on purpose: a canary too small to hold a
/// device protects nothing. Empty when there are no devices.
pub fn wave_bounds(spec: &RolloutSpec, mut keys: Vec<u64>) -> Vec<u64> {
    let n = keys.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    keys.sort_unstable();
    let mut bounds = Vec::with_capacity(spec.waves.len().saturating_sub(1));
    let (mut cum, mut prev) = (0u64, 0u64);
    for &p in &spec.waves[..spec.waves.len().saturating_sub(1)] {
        let share = u64::from(p).saturating_sub(prev);
        prev = u64::from(p);
        if share > 0 {
            cum = (cum + (n * share).div_ceil(100).max(1)).min(n);
        }
        bounds.push(keys[cum.max(1) as usize - 1]);
    }
    bounds
}

/// The wave (index) `device` belongs to in rollout `id` with the stored
/// `bounds` ([`wave_bounds`]): the first wave whose last key is not below
/// the device's, else the last wave. Without bounds, its hash percentile.
pub fn wave_of(spec: &RolloutSpec, id: &str, bounds: &[u64], device: &str) -> usize {
    if bounds.is_empty() {
        let p = percentile(device, id);
        return spec.waves.iter().position(|&w| p < w).unwrap_or(0);
    }
    let k = rank_key(device, id);
    bounds
        .iter()
        .position(|&b| k <= b)
        .unwrap_or(bounds.len())
        .min(spec.waves.len() - 1)
}

/// Whether a device of `device_type` with `tags` is in the rollout.
pub fn spec_matches(
    spec: &RolloutSpec,
    device_type: &str,
    tags: &BTreeMap<String, String>,
) -> bool {
    spec.device_type == device_type && spec.selector.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// The start rate after ramping by `committed` commits.
pub fn ramped_rate(s: &RolloutSpec, committed: u64) -> f64 {
    if s.ramp_factor <= 1.0 {
        return s.max_starts_per_min;
    }
    let step = if s.ramp_every > 0 {
        s.ramp_every
    } else {
        s.min_sample.max(1)
    };
    let steps = (committed / step).min(64) as i32;
    let ceiling = s.ramp_max_per_min.unwrap_or(s.max_starts_per_min * 1000.0);
    (s.max_starts_per_min * s.ramp_factor.powi(steps)).min(ceiling)
}

/// The failure-threshold rule over (ok, bad) outcomes of the opened waves:
/// the new state and its reason when the rollout must stop.
pub fn failure_verdict(
    spec: &RolloutSpec,
    rec: &RolloutRecord,
    ok: u64,
    bad: u64,
) -> Option<(RolloutState, String)> {
    if rec.state != RolloutState::Active {
        return None;
    }
    let bad = bad.saturating_sub(rec.baseline.0);
    let ok = ok.saturating_sub(rec.baseline.1);
    let n = ok + bad;
    if n < spec.min_sample.max(1) || (bad as f64) < spec.failure_threshold * n as f64 {
        return None;
    }
    let state = match spec.on_failure {
        OnFailure::Pause => RolloutState::Paused,
        OnFailure::Abort => RolloutState::Aborted,
    };
    Some((
        state,
        format!(
            "failure rate {:.1}% ({bad} of {n} outcomes in waves 1-{}) reached the {:.1}% threshold",
            100.0 * bad as f64 / n as f64,
            rec.wave + 1,
            100.0 * spec.failure_threshold
        ),
    ))
}

/// The wave rule: opens the next wave when the open one soaked and enough
/// devices succeeded; completes the rollout when every eligible device
/// finished, or when it is done with the devices it has ([`membership`]:
/// `in_flight` members, counted by the caller when
/// [`membership::needs_in_flight`] says so, else `None`). `waves` holds
/// (eligible, ok = committed + already current, failures) per wave.
/// Changes `rec` and returns whether it changed.
pub fn advance_record(
    spec: &RolloutSpec,
    rec: &mut RolloutRecord,
    waves: &[(u64, u64, u64)],
    now: u64,
    in_flight: Option<u64>,
) -> bool {
    if rec.state != RolloutState::Active
        || schedule::not_started(spec, rec.created_at_ms, now).is_some()
    {
        return false;
    }
    let upto = rec.wave;
    let (mut eligible, mut done, mut finished) = (0, 0, 0);
    for &(e, ok, bad) in &waves[..=upto.min(waves.len() - 1)] {
        eligible += e;
        done += ok;
        finished += ok + bad;
    }
    let soaked = now >= rec.wave_opened_at_ms + spec.soak_ms;
    let succeeded = done as f64 >= spec.success_threshold * eligible as f64;
    if upto + 1 < waves.len() {
        let due = now >= schedule::wave_not_before(spec, rec.created_at_ms, upto + 1);
        if soaked && succeeded && due {
            rec.wave += 1;
            rec.wave_opened_at_ms = now;
            rec.reason = format!(
                "wave {} opened: {done} of {eligible} devices in waves 1-{} committed",
                rec.wave + 1,
                upto + 1
            );
            return true;
        }
    } else if (eligible > 0 && finished >= eligible)
        || (in_flight == Some(0) && soaked && succeeded)
    {
        rec.state = RolloutState::Completed;
        rec.reason = membership::completed_reason(done, finished, eligible);
        return true;
    }
    false
}

impl Rollout {
    fn new(rec: RolloutRecord) -> Rollout {
        Rollout {
            id: rec.id.clone(),
            spec: rec.spec.clone(),
            waves: (0..rec.spec.waves.len())
                .map(|_| WaveCounters::default())
                .collect(),
            state_now: std::sync::atomic::AtomicU8::new(rec.state as u8),
            wave_now: std::sync::atomic::AtomicUsize::new(rec.wave),
            bounds: rec.wave_bounds.clone(),
            starts_at: schedule::start_ms(&rec.spec, rec.created_at_ms),
            rec: Mutex::new(rec),
            throttle: Throttle::new(),
            members: DashMap::new(),
        }
    }

    /// Publishes `rec`'s state and open wave to the check-in path. Called
    /// with the record lock held, after every change of either.
    fn publish(&self, rec: &RolloutRecord) {
        self.state_now.store(rec.state as u8, Ordering::Release);
        self.wave_now.store(rec.wave, Ordering::Release);
    }

    /// The newest open wave (index).
    fn open_wave(&self) -> usize {
        self.wave_now.load(Ordering::Acquire)
    }

    pub fn wave_of(&self, device: &str) -> usize {
        wave_of(&self.spec, &self.id, &self.bounds, device)
    }

    pub fn record(&self) -> RolloutRecord {
        self.rec.lock().unwrap().clone()
    }

    pub fn state(&self) -> RolloutState {
        match self.state_now.load(Ordering::Acquire) {
            0 => RolloutState::Active,
            1 => RolloutState::Paused,
            2 => RolloutState::Aborted,
            _ => RolloutState::Completed,
        }
    }

    fn matches(&self, device_type: &str, tags: &BTreeMap<String, String>) -> bool {
        spec_matches(&self.spec, device_type, tags)
    }

    /// Sum of committed (+ already current) and of failures over waves `..=w`.
    fn outcomes(&self, upto: usize) -> (u64, u64) {
        let mut ok = 0;
        let mut bad = 0;
        for c in &self.waves[..=upto.min(self.waves.len() - 1)] {
            ok += c.committed.load(Ordering::Relaxed);
            bad += c.failed.load(Ordering::Relaxed) + c.rolled_back.load(Ordering::Relaxed);
        }
        (ok, bad)
    }

    /// (eligible, ok = committed + already current, failures) per wave, as
    /// [`advance_record`] takes them.
    fn outcomes_per_wave(&self) -> Vec<(u64, u64, u64)> {
        self.waves
            .iter()
            .map(|c| {
                let ok = c.committed.load(Ordering::Relaxed) + c.current.load(Ordering::Relaxed);
                let bad = c.failed.load(Ordering::Relaxed) + c.rolled_back.load(Ordering::Relaxed);
                (c.eligible.load(Ordering::Relaxed), ok, bad)
            })
            .collect()
    }

    /// The start rate now, after ramping by commits.
    pub fn starts_per_min(&self) -> f64 {
        let committed: u64 = self
            .waves
            .iter()
            .map(|c| c.committed.load(Ordering::Relaxed))
            .sum();
        ramped_rate(&self.spec, committed)
    }
}

/// The offer a device gets for an admitted update.
fn offer(r: &Rollout, m: &Member, a: &Artifacts, parallel: u32, lease_ms: u64) -> UpdateOffer {
    offer_for(&r.id, &r.spec, m, a, parallel, lease_ms)
}

/// The offer for member `m` of rollout `id` (both engines).
pub(crate) fn offer_for(
    id: &str,
    spec: &RolloutSpec,
    m: &Member,
    a: &Artifacts,
    parallel: u32,
    lease_ms: u64,
) -> UpdateOffer {
    UpdateOffer {
        update_id: m.update_id.clone(),
        rollout_id: id.to_string(),
        version: spec.release.clone(),
        from_version: a.from_version.clone(),
        manifest_url: format!("/api/v1/artifacts/{}", a.manifest_sha256),
        manifest_sha256: a.manifest_sha256,
        payload_url: format!("/api/v1/artifacts/{}", a.payload_sha256),
        payload_sha256: a.payload_sha256,
        payload_size: a.payload_size,
        max_parallel_ranges: parallel,
        lease_ms,
        install_gated: !spec.windows.is_empty(),
    }
}

// Check-in rules both engines share. The side effects (leases, writes) are
// each engine's own; the answers are decided here so that sled and
// PostgreSQL cannot drift apart.

/// Whether a downloading member's device is already past the download of
/// this attempt (installing, rebooting into or testing it): nothing to say.
pub(crate) fn past_download(req: &ota_format::api::CheckinRequest, m: &Member) -> bool {
    matches!(
        req.state,
        AgentState::Installing | AgentState::Rebooting | AgentState::Testing
    ) && req
        .update
        .as_ref()
        .is_some_and(|u| u.update_id == m.update_id)
}

/// Whether the device reports holding member `m`'s update verified and
/// waiting for its install permission (the member may still show
/// `downloading`: events travel apart from check-ins).
pub(crate) fn reports_waiting(req: &ota_format::api::CheckinRequest, m: &Member) -> bool {
    req.state == AgentState::WaitingForWindow
        && matches!(
            m.phase,
            Phase::Downloading | Phase::Downloaded | Phase::WaitingForWindow
        )
        && req
            .update
            .as_ref()
            .is_some_and(|u| u.update_id == m.update_id)
}

/// The install gate (both engines): the answer to a device holding member
/// `m`'s update verified ([`reports_waiting`]). Install inside a window or
/// when an operator said so; wait outside (the answer says when the next
/// window opens) and while the rollout is paused; an aborted rollout
/// cancels the update, whose verified slot is then never switched to.
pub(crate) fn install_gate(
    id: &str,
    spec: &RolloutSpec,
    state: RolloutState,
    m: &Member,
    now: jiff::Timestamp,
    zone: &window::DeviceZone,
) -> Decision {
    let span = info_span!("install_gate", rollout = %id, device = %m.device);
    let _g = span.enter();
    match state {
        RolloutState::Aborted => {
            return Decision::Answer(Action::Cancel {
                update_id: m.update_id.clone(),
                reason: format!("rollout {id} was aborted"),
            });
        }
        RolloutState::Paused => {
            return Decision::Wait {
                reason: format!("rollout {id} is paused; the downloaded update waits for resume"),
                class: "paused",
                near_head: false,
            };
        }
        RolloutState::Active | RolloutState::Completed => {}
    }
    if m.install_now || window::install_allowed(&spec.windows, now, zone) {
        info!(update_id = %m.update_id, operator = m.install_now, "install allowed");
        return Decision::Answer(Action::Install {
            update_id: m.update_id.clone(),
        });
    }
    Decision::Wait {
        reason: {
            let local = if spec.windows.iter().any(window::Window::is_device_local) {
                format!(" (`local` windows: {})", zone.describe())
            } else {
                String::new()
            };
            match window::next_opening(&spec.windows, now, zone) {
                Some(t) => format!(
                    "outside the maintenance windows of rollout {id}{local}; the next opens at {t}"
                ),
                None => format!("outside the maintenance windows of rollout {id}{local}"),
            }
        },
        class: "window",
        near_head: false,
    }
}

/// A client that cannot hold a verified update until told to install (no
/// `install_gate` in its check-in: an agent older than maintenance windows,
/// a DDI target) would install as soon as it downloaded: a rollout with
/// windows admits it only while a window is open (both engines, before the
/// throttle, so it takes no lease while it waits).
pub(crate) fn ungated_outside_window(
    id: &str,
    spec: &RolloutSpec,
    req: &ota_format::api::CheckinRequest,
    now: jiff::Timestamp,
) -> Option<Decision> {
    if spec.windows.is_empty() || req.install_gate {
        return None;
    }
    let zone = window::DeviceZone::reported(req.time_zone.as_deref());
    if window::install_allowed(&spec.windows, now, &zone) {
        return None;
    }
    let next = window::next_opening(&spec.windows, now, &zone)
        .map(|t| format!("; the next opens at {t}"))
        .unwrap_or_default();
    Some(Decision::Wait {
        reason: format!(
            "outside the maintenance windows of rollout {id}: this client cannot wait with a \
             verified update (an agent older than windows, or a DDI target), so it is admitted \
             only inside a window{next}"
        ),
        class: "window",
        near_head: false,
    })
}

/// The answer to a device whose download lease is gone.
pub(crate) fn lease_expired(m: &Member) -> Action {
    Action::Cancel {
        update_id: m.update_id.clone(),
        reason: "download lease expired; the slot was given to another device".into(),
    }
}

/// A device still downloading an attempt of rollout `id` that the server
/// has ended (lease expired, failed, aborted) must stop.
pub(crate) fn cancel_ended_attempt(
    id: &str,
    m: &Member,
    req: &ota_format::api::CheckinRequest,
) -> Option<Action> {
    let u = req.update.as_ref()?;
    (req.state == AgentState::Downloading && u.update_id.starts_with(&format!("{id}."))).then(
        || Action::Cancel {
            update_id: u.update_id.clone(),
            reason: m
                .reason
                .clone()
                .unwrap_or_else(|| "this attempt is no longer valid".into()),
        },
    )
}

/// Whether a device not holding an update of the rollout has nothing to get
/// from it: it runs the release already, is busy, or the rollout was
/// aborted. A completed rollout still takes newcomers ([`membership`]).
pub(crate) fn nothing_to_offer(
    release: &str,
    state: RolloutState,
    req: &ota_format::api::CheckinRequest,
) -> bool {
    req.current_version == release
        || req.state != AgentState::Idle
        || state == RolloutState::Aborted
}

/// Why an eligible device must wait before admission is even tried (the
/// rollout is paused, its wave is not open yet), if it must.
/// `starts_at` is [`schedule::start_ms`] (a scheduled start).
pub(crate) fn held_back(
    id: &str,
    starts_at: u64,
    state: RolloutState,
    wave: usize,
    open_wave: usize,
    now: u64,
) -> Option<Decision> {
    if state == RolloutState::Paused {
        return Some(Decision::Wait {
            reason: format!("rollout {id} is paused"),
            class: "paused",
            near_head: false,
        });
    }
    if now < starts_at {
        let s = schedule::at_in(starts_at, now);
        return Some(Decision::Wait {
            reason: format!("rollout {id} starts {s}"),
            class: "scheduled",
            near_head: false,
        });
    }
    (wave > open_wave).then(|| Decision::Wait {
        reason: format!("wave {} of rollout {id} is not open yet", wave + 1),
        class: "wave_closed",
        near_head: false,
    })
}

/// What a check-in decided.
pub enum Decision {
    /// Answer at once.
    Answer(Action),
    /// Answer after the store is durable (an admission was written).
    AnswerDurable(Action),
    /// Throttled: `near_head` devices are told to come back sooner.
    Wait {
        reason: String,
        /// Metric label of the reason (`ota_throttled_total{reason}`).
        class: &'static str,
        near_head: bool,
    },
}

/// Pacing knobs the engine needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub lease_ms: u64,
    pub idle_ms: u64,
    pub max_parallel_ranges: u32,
}

/// The pacing knobs as the engines hold them: swapped as a whole by a
/// configuration reload ([`crate::reload`]), read once per decision.
pub type SharedPacing = std::sync::Arc<arc_swap::ArcSwap<Pacing>>;

/// Every rollout, and the decisions over them.
pub struct Rollouts {
    store: Store,
    releases: Arc<Releases>,
    /// Read on every check-in, written on create: a read-mostly lock whose
    /// read side is shared.
    all: RwLock<Vec<Arc<Rollout>>>,
    pacing: SharedPacing,
    /// The clock maintenance windows are judged by ([`window::WindowClock`]).
    window_clock: window::WindowClock,
    /// Events counted (first time seen), for metrics and the load test.
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
}

/// Errors the admin API maps to 4xx.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no rollout {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Rollouts {
    /// Loads rollouts and members; restores leases of devices that were
    /// downloading (they get a fresh lease term to report back in).
    pub fn load(
        store: Store,
        releases: Arc<Releases>,
        pacing: SharedPacing,
        fleet: &crate::fleet::Fleet,
    ) -> Result<Rollouts, StoreError> {
        let now = crate::now_ms();
        let mut all = Vec::new();
        for rec in load_all::<RolloutRecord>(&store.rollouts)? {
            all.push(Arc::new(Rollout::new(rec)));
        }
        all.sort_by_key(|r| r.record().created_at_ms);
        for kv in store.members.iter() {
            let (k, v) = kv?;
            let m: Member = decode(&k, &v)?;
            let rid =
                String::from_utf8_lossy(k.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
            let Some(r) = all.iter().find(|r| r.id == rid) else {
                continue;
            };
            let c = &r.waves[m.wave.min(r.waves.len() - 1)];
            // Admissions, as counted while running: one per attempt
            // started (a member waiting to retry was admitted before).
            c.admitted
                .fetch_add(u64::from(m.attempt), Ordering::Relaxed);
            match m.phase {
                Phase::Downloading => {
                    r.throttle
                        .restore(&m.device, &m.update_id, now, pacing.load().lease_ms)
                }
                Phase::Installed | Phase::Rebooting => {
                    c.installed.fetch_add(1, Ordering::Relaxed);
                }
                Phase::Committed => {
                    c.installed.fetch_add(1, Ordering::Relaxed);
                    c.committed.fetch_add(1, Ordering::Relaxed);
                }
                Phase::Failed => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
                Phase::RolledBack => {
                    c.rolled_back.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            r.members.insert(m.device.clone(), m);
        }
        let rollouts = Rollouts {
            store,
            releases,
            all: RwLock::new(all),
            pacing,
            window_clock: window::WindowClock::default(),
            events_accepted: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
        };
        for r in rollouts.list() {
            rollouts.count_eligible(&r, fleet);
        }
        Ok(rollouts)
    }

    /// Recounts eligible devices per wave from the fleet.
    fn count_eligible(&self, r: &Rollout, fleet: &crate::fleet::Fleet) {
        for c in &r.waves {
            c.eligible.store(0, Ordering::Relaxed);
            c.current.store(0, Ordering::Relaxed);
        }
        fleet.for_each(|d| {
            let rec = d.record.lock().unwrap();
            if r.matches(&rec.device_type, &rec.tags) {
                let w = r.wave_of(&rec.id);
                r.waves[w].eligible.fetch_add(1, Ordering::Relaxed);
                let committed_here = r
                    .members
                    .get(&rec.id)
                    .is_some_and(|m| m.phase == Phase::Committed);
                if rec.version.as_deref() == Some(&r.spec.release) && !committed_here {
                    r.waves[w].current.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    /// A newly enrolled device joins the eligible counts of matching rollouts.
    pub fn on_enroll(
        &self,
        device: &str,
        device_type: &str,
        tags: &BTreeMap<String, String>,
        new: bool,
    ) {
        if !new {
            return;
        }
        for r in self.list() {
            if r.matches(device_type, tags) {
                r.waves[r.wave_of(device)]
                    .eligible
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The clock maintenance windows are judged by.
    pub fn window_clock(&self) -> &window::WindowClock {
        &self.window_clock
    }

    pub fn list(&self) -> Vec<Arc<Rollout>> {
        self.all.read().unwrap().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Rollout>> {
        self.all
            .read()
            .unwrap()
            .iter()
            .find(|r| r.id == id)
            .cloned()
    }

    /// Creates a rollout. Refused while another active or paused rollout
    /// targets the same device type: two rollouts racing for one fleet is
    /// how stampedes start.
    pub async fn create(
        &self,
        spec: RolloutSpec,
        fleet: &crate::fleet::Fleet,
    ) -> Result<Arc<Rollout>, RolloutError> {
        spec.validate().map_err(RolloutError::Invalid)?;
        if !self.releases.exists(&spec.device_type, &spec.release) {
            return Err(RolloutError::Invalid(format!(
                "no release {} for device type {}; add it with `ota-server release add`",
                spec.release, spec.device_type
            )));
        }
        if let Some(other) = self.list().iter().find(|r| {
            r.spec.device_type == spec.device_type
                && matches!(r.state(), RolloutState::Active | RolloutState::Paused)
        }) {
            return Err(RolloutError::Conflict(format!(
                "rollout {} for device type {} is still {:?}; abort it first",
                other.id,
                spec.device_type,
                other.state()
            )));
        }
        let now = crate::now_ms();
        let id = format!("r{}", self.store.next_id("rollout")?);
        // The devices to update, ranked into waves.
        let mut keys = Vec::new();
        fleet.for_each(|d| {
            let rec = d.record.lock().unwrap();
            if spec_matches(&spec, &rec.device_type, &rec.tags)
                && rec.version.as_deref() != Some(spec.release.as_str())
            {
                keys.push(rank_key(&rec.id, &id));
            }
        });
        let wave_bounds = wave_bounds(&spec, keys);
        let rec = RolloutRecord::new(id.clone(), spec, now, wave_bounds);
        self.store.rollouts.insert(id.as_bytes(), encode(&rec))?;
        self.store.durable().await?;
        let r = Arc::new(Rollout::new(rec));
        self.count_eligible(&r, fleet);
        info!(rollout = %id, release = %r.spec.release, device_type = %r.spec.device_type, "rollout created");
        self.all.write().unwrap().push(r.clone());
        Ok(r)
    }

    /// A completed rollout reopened by `device`, a newcomer that needs its
    /// release ([`membership`]); returns the state now (another check-in
    /// or the operator may have changed it first).
    fn reopen(&self, r: &Rollout, device: &str) -> Result<RolloutState, StoreError> {
        let mut rec = r.rec.lock().unwrap();
        if rec.state == RolloutState::Completed {
            rec.state = RolloutState::Active;
            rec.reason = membership::reopened_reason(device);
            r.publish(&rec);
            // Durable with the admission that follows (or, if throttled,
            // redone by the device's next check-in after a crash).
            self.store.rollouts.insert(r.id.as_bytes(), encode(&*rec))?;
            info!(rollout = %r.id, device, "completed rollout reopened by a new device");
        }
        Ok(rec.state)
    }

    /// A device's type or tags changed from `old` to `new` (re-enrolment,
    /// DDI attributes): the eligible counts of the rollouts it left or
    /// joined follow, so waves and completion see it.
    pub fn on_tags_changed(
        &self,
        device: &str,
        old: (&str, &BTreeMap<String, String>),
        new: (&str, &BTreeMap<String, String>),
    ) {
        for r in self.list() {
            let (was, is) = (r.matches(old.0, old.1), r.matches(new.0, new.1));
            let c = &r.waves[r.wave_of(device)].eligible;
            match (was, is) {
                (false, true) => {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                (true, false) => {
                    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                }
                _ => {}
            }
        }
    }

    /// Operator action: pause, resume or abort.
    pub async fn set_state(
        &self,
        id: &str,
        to: RolloutState,
        reason: String,
    ) -> Result<Arc<Rollout>, RolloutError> {
        let r = self
            .get(id)
            .ok_or_else(|| RolloutError::NotFound(id.into()))?;
        {
            let mut rec = r.rec.lock().unwrap();
            match (rec.state, to) {
                (RolloutState::Aborted, _) => {
                    return Err(RolloutError::Conflict(format!(
                        "rollout {id} is {:?}; it cannot change any more",
                        rec.state
                    )));
                }
                // A completed rollout still takes newcomers: it may be
                // paused or aborted (to stop that), resuming it is a no-op.
                (RolloutState::Active | RolloutState::Completed, RolloutState::Active) => {
                    return Ok(r.clone());
                }
                _ => {}
            }
            if to == RolloutState::Active {
                // Resuming restarts the failure count from here.
                let (ok, bad) = r.outcomes(rec.wave);
                rec.baseline = (bad, ok);
            }
            rec.state = to;
            rec.reason = reason;
            r.publish(&rec);
            self.store.rollouts.insert(id.as_bytes(), encode(&*rec))?;
        }
        self.store.durable().await?;
        info!(rollout = %id, state = ?to, "rollout state changed by operator");
        Ok(r)
    }

    /// Operator action (`rollout install-now`): members of rollout `id`
    /// install as soon as their update is verified, window or not. With
    /// `devices` empty, every member admitted and not yet installed;
    /// else exactly those, each of which must be such a member (otherwise
    /// nothing changes and the error names it). Returns the devices
    /// marked; durable on return.
    pub async fn install_now(
        &self,
        id: &str,
        devices: &[String],
    ) -> Result<Vec<String>, RolloutError> {
        let r = self
            .get(id)
            .ok_or_else(|| RolloutError::NotFound(id.into()))?;
        if r.state() == RolloutState::Aborted {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} is aborted; nothing of it will be installed"
            )));
        }
        let targets: Vec<String> = if devices.is_empty() {
            r.members
                .iter()
                .filter(|m| window::before_install(m.phase))
                .map(|m| m.device.clone())
                .collect()
        } else {
            for d in devices {
                match r.members.get(d) {
                    Some(m) if window::before_install(m.phase) => {}
                    Some(m) => {
                        return Err(RolloutError::Conflict(format!(
                            "device {d} is {:?} in rollout {id}: it has nothing left to install",
                            m.phase
                        )));
                    }
                    None => {
                        return Err(RolloutError::Invalid(format!(
                            "device {d} has not been admitted to rollout {id} yet; \
                             install-now applies to admitted devices (see `rollout status {id}`)"
                        )));
                    }
                }
            }
            devices.to_vec()
        };
        for d in &targets {
            if let Some(mut m) = r.members.get_mut(d) {
                m.install_now = true;
                self.store.members.insert(key2(&r.id, d), encode(&*m))?;
            }
        }
        self.store.durable().await?;
        info!(rollout = %id, devices = targets.len(), "install now, by the operator");
        Ok(targets)
    }

    /// The newest active or paused rollout for this device.
    fn active_for(
        &self,
        device_type: &str,
        tags: &BTreeMap<String, String>,
    ) -> Option<Arc<Rollout>> {
        let all = self.all.read().unwrap();
        let mut superseded = false;
        for r in all.iter().rev() {
            if r.spec.device_type != device_type {
                continue;
            }
            if membership::takes_devices(r.state(), superseded) && r.matches(device_type, tags) {
                return Some(r.clone());
            }
            superseded = true;
        }
        None
    }

    /// Decides a check-in. Writes (admissions) are made here; the caller
    /// awaits durability for [`Decision::AnswerDurable`].
    pub fn checkin(
        &self,
        device: &str,
        device_type: &str,
        tags: &BTreeMap<String, String>,
        req: &ota_format::api::CheckinRequest,
    ) -> Result<Decision, StoreError> {
        let now = crate::now_ms();
        let Some(r) = self.active_for(device_type, tags) else {
            return Ok(Decision::Answer(Action::None));
        };
        let state = r.state();
        let p = **self.pacing.load();
        if let Some(mut m) = r.members.get_mut(device) {
            if reports_waiting(req, &m) {
                let d = install_gate(
                    &r.id,
                    &r.spec,
                    state,
                    &m,
                    self.window_clock.now(),
                    &window::DeviceZone::reported(req.time_zone.as_deref()),
                );
                if let Decision::Answer(Action::Cancel { .. }) = &d {
                    r.throttle.release(device);
                    m.phase = Phase::Cancelled;
                    m.reason = Some("rollout aborted while the update waited to install".into());
                    self.store
                        .members
                        .insert(key2(&r.id, device), encode(&*m))?;
                }
                return Ok(d);
            }
            match m.phase {
                Phase::Downloading => {
                    if past_download(req, &m) {
                        return Ok(Decision::Answer(Action::None));
                    }
                    if state == RolloutState::Aborted {
                        r.throttle.release(device);
                        m.phase = Phase::Cancelled;
                        m.reason = Some("rollout aborted".into());
                        self.store
                            .members
                            .insert(key2(&r.id, device), encode(&*m))?;
                        return Ok(Decision::AnswerDurable(Action::Cancel {
                            update_id: m.update_id.clone(),
                            reason: format!("rollout {} was aborted", r.id),
                        }));
                    }
                    if r.throttle.renew(device, &m.update_id, now, p.lease_ms) {
                        let a = m
                            .artifacts
                            .clone()
                            .expect("downloading members have artifacts");
                        return Ok(Decision::Answer(Action::Update(offer(
                            &r,
                            &m,
                            &a,
                            p.max_parallel_ranges,
                            p.lease_ms,
                        ))));
                    }
                    // The lease expired; the reaper turns that into a retry
                    // or a failure. Tell the device to stop.
                    return Ok(Decision::Answer(lease_expired(&m)));
                }
                Phase::Waiting | Phase::Cancelled | Phase::Failed => {
                    if let Some(cancel) = cancel_ended_attempt(&r.id, &m, req) {
                        return Ok(Decision::Answer(cancel));
                    }
                    if m.phase == Phase::Failed {
                        return Ok(Decision::Answer(Action::None));
                    }
                }
                _ => return Ok(Decision::Answer(Action::None)),
            }
        }
        // Not holding an update from this rollout.
        if nothing_to_offer(&r.spec.release, state, req) {
            return Ok(Decision::Answer(Action::None));
        }
        let state = if state == RolloutState::Completed {
            self.reopen(&r, device)?
        } else {
            state
        };
        let wave = r.wave_of(device);
        let mut m = r
            .members
            .entry(device.to_string())
            .or_insert_with(|| Member {
                device: device.to_string(),
                wave,
                phase: Phase::Waiting,
                attempt: 0,
                update_id: String::new(),
                artifacts: None,
                reason: None,
                bytes_verified: 0,
                install_now: false,
            });
        if m.phase == Phase::Cancelled {
            return Ok(Decision::Answer(Action::None));
        }
        if let Some(wait) = held_back(&r.id, r.starts_at, state, wave, r.open_wave(), now) {
            return Ok(wait);
        }
        if let Some(wait) = ungated_outside_window(&r.id, &r.spec, req, self.window_clock.now()) {
            return Ok(wait);
        }
        let Some(artifacts) = self.releases.pick(
            device_type,
            &r.spec.release,
            &req.current_version,
            req.delta_codecs,
        ) else {
            return Ok(Decision::Wait {
                reason: format!("release {} is still being built", r.spec.release),
                class: "building",
                near_head: false,
            });
        };
        let update_id = format!("{}.{}", r.id, m.attempt + 1);
        let limits = Limits {
            max_concurrent: r.spec.max_concurrent,
            starts_per_min: r.starts_per_min(),
            lease_ms: p.lease_ms,
            stale_after_ms: 3 * p.idle_ms,
        };
        let span = info_span!("admission", rollout = %r.id, device, wave = wave + 1);
        let _g = span.enter();
        match r.throttle.try_admit(device, &update_id, now, limits) {
            Admission::Granted { fence } => {
                m.attempt += 1;
                m.update_id = update_id;
                m.phase = Phase::Downloading;
                m.artifacts = Some(artifacts.clone());
                m.reason = None;
                self.store
                    .members
                    .insert(key2(&r.id, device), encode(&*m))?;
                r.waves[wave].admitted.fetch_add(1, Ordering::Relaxed);
                info!(fence, update_id = %m.update_id, delta_from = ?artifacts.from_version, "admitted");
                Ok(Decision::AnswerDurable(Action::Update(offer(
                    &r,
                    &m,
                    &artifacts,
                    p.max_parallel_ranges,
                    p.lease_ms,
                ))))
            }
            Admission::Wait { reason, near_head } => {
                tracing::debug!(reason = reason.as_str(), "throttled");
                Ok(Decision::Wait {
                    reason: reason.as_str().into(),
                    class: reason.label(),
                    near_head,
                })
            }
        }
    }

    /// Applies one event (idempotent by device and seq). Returns whether it
    /// was new.
    pub fn apply_event(&self, device: &str, ev: &Event) -> Result<bool, StoreError> {
        let key = {
            let mut k = device.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&ev.seq.to_be_bytes());
            k
        };
        let rid = ev.update_id.split('.').next().unwrap_or("");
        let rollout = self.get(rid);
        // Compute the member's next state under its entry lock; write event
        // and member in one transaction so a crash keeps both or neither.
        let mut guard = rollout.as_ref().and_then(|r| r.members.get_mut(device));
        let next = match (&rollout, &guard) {
            (Some(r), Some(m)) if m.update_id == ev.update_id => transition(r, m, ev),
            _ => None,
        };
        let ev_bytes = encode(ev);
        let mkey = key2(rid, device);
        let m_bytes = next.as_ref().map(|(m, _)| encode(m));
        let new: Result<bool, sled::transaction::TransactionError<()>> = {
            use sled::Transactional;
            (&self.store.events, &self.store.members).transaction(|(e, mt)| {
                if e.get(&key)?.is_some() {
                    return Ok(false);
                }
                e.insert(key.as_slice(), ev_bytes.as_slice())?;
                if let Some(b) = &m_bytes {
                    mt.insert(mkey.as_slice(), b.as_slice())?;
                }
                Ok(true)
            })
        };
        let new = new.map_err(|e| StoreError::Transaction(format!("{e:?}")))?;
        if !new {
            self.events_duplicate.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        self.events_accepted.fetch_add(1, Ordering::Relaxed);
        if let (Some(r), Some(m)) = (&rollout, guard.as_deref_mut())
            && m.update_id == ev.update_id
        {
            // Progress renews the lease even when it changes no phase.
            if matches!(ev.kind, EventKind::Progress | EventKind::DownloadStarted) {
                r.throttle.renew(
                    device,
                    &ev.update_id,
                    crate::now_ms(),
                    self.pacing.load().lease_ms,
                );
            }
            if let Some((nm, effect)) = next {
                *m = nm;
                drop(guard);
                self.effect(r, device, effect);
            }
        }
        Ok(true)
    }

    fn effect(&self, r: &Rollout, device: &str, e: Effect) {
        let w = r.wave_of(device);
        let c = &r.waves[w];
        match e {
            Effect::None => {}
            Effect::ReleaseLease => {
                r.throttle.release(device);
            }
            Effect::Installed => {
                r.throttle.release(device);
                c.installed.fetch_add(1, Ordering::Relaxed);
            }
            Effect::Committed => {
                r.throttle.release(device);
                c.committed.fetch_add(1, Ordering::Relaxed);
            }
            Effect::Failed | Effect::RolledBack => {
                r.throttle.release(device);
                if e == Effect::Failed {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.rolled_back.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(err) = self.check_failures(r) {
                    warn!(rollout = %r.id, error = %err, "could not record the failure threshold decision");
                }
            }
        }
    }

    /// Pauses or aborts `r` if its failure rate reached the threshold.
    fn check_failures(&self, r: &Rollout) -> Result<(), StoreError> {
        let mut rec = r.rec.lock().unwrap();
        let (ok, bad) = r.outcomes(rec.wave);
        let Some((state, reason)) = failure_verdict(&r.spec, &rec, ok, bad) else {
            return Ok(());
        };
        rec.state = state;
        rec.reason = reason;
        r.publish(&rec);
        warn!(rollout = %r.id, state = ?rec.state, reason = %rec.reason, "failure threshold reached");
        self.store.rollouts.insert(r.id.as_bytes(), encode(&*rec))?;
        Ok(())
    }

    /// Periodic work: expire leases, open waves, complete rollouts. Returns
    /// leases expired.
    pub fn tick(&self) -> Result<u64, StoreError> {
        let now = crate::now_ms();
        let mut expired_total = 0;
        for r in self.list() {
            for (device, update_id) in r.throttle.reap(now) {
                expired_total += 1;
                let _s = info_span!("lease_expiry", rollout = %r.id, device = %device).entered();
                let effect = if let Some(mut m) = r.members.get_mut(&device) {
                    if m.update_id != update_id || m.phase != Phase::Downloading {
                        continue;
                    }
                    let eff = if m.attempt <= r.spec.max_retries {
                        m.phase = Phase::Waiting;
                        m.reason = Some("lease expired; will retry".into());
                        Effect::None
                    } else {
                        m.phase = Phase::Failed;
                        m.reason = Some(format!("lease expired after {} attempts", m.attempt));
                        Effect::Failed
                    };
                    info!(phase = ?m.phase, "download lease expired");
                    self.store
                        .members
                        .insert(key2(&r.id, &device), encode(&*m))?;
                    eff
                } else {
                    continue;
                };
                if effect == Effect::Failed {
                    // The lease is already gone; count the failure.
                    r.waves[r.wave_of(&device)]
                        .failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.check_failures(&r)?;
                }
            }
            self.advance(&r, now)?;
        }
        Ok(expired_total)
    }

    /// Opens the next wave when the open one soaked and succeeded; marks the
    /// rollout completed when every eligible device is done.
    fn advance(&self, r: &Rollout, now: u64) -> Result<(), StoreError> {
        let mut rec = r.rec.lock().unwrap();
        let waves = r.outcomes_per_wave();
        let in_flight = membership::needs_in_flight(&r.spec, &rec, &waves, now).then(|| {
            r.members
                .iter()
                .filter(|m| membership::in_flight(m.phase))
                .count() as u64
        });
        if advance_record(&r.spec, &mut rec, &waves, now, in_flight) {
            r.publish(&rec);
            info!(rollout = %r.id, state = ?rec.state, wave = rec.wave + 1, reason = %rec.reason, "rollout advanced");
            self.store.rollouts.insert(r.id.as_bytes(), encode(&*rec))?;
        }
        Ok(())
    }

    /// Adds payload bytes served to `device` to its rollout wave's counter.
    pub fn count_bytes(&self, device: &str, bytes: u64) {
        for r in self.all.read().unwrap().iter().rev() {
            if let Some(m) = r.members.get(device) {
                r.waves[m.wave.min(r.waves.len() - 1)]
                    .bytes_served
                    .fetch_add(bytes, Ordering::Relaxed);
                return;
            }
        }
    }

    /// The operator's view of a rollout.
    pub fn status(&self, r: &Rollout) -> RolloutStatus {
        let rec = r.record();
        let n = r.waves.len();
        let mut per_phase = vec![[0u64; PHASES]; n];
        let mut reasons = FailureTally::default();
        for m in r.members.iter() {
            per_phase[m.wave.min(n - 1)][m.phase as usize] += 1;
            reasons.add(&m);
        }
        let waves = (0..n)
            .map(|w| {
                let c = &r.waves[w];
                let ph = &per_phase[w];
                WaveStatus {
                    wave: w + 1,
                    percent: r.spec.waves[w],
                    open: w <= rec.wave,
                    eligible: c.eligible.load(Ordering::Relaxed),
                    already_current: c.current.load(Ordering::Relaxed),
                    admitted: c.admitted.load(Ordering::Relaxed),
                    waiting: ph[Phase::Waiting as usize],
                    downloading: ph[Phase::Downloading as usize],
                    installed: c.installed.load(Ordering::Relaxed),
                    committed: c.committed.load(Ordering::Relaxed),
                    failed: c.failed.load(Ordering::Relaxed),
                    rolled_back: c.rolled_back.load(Ordering::Relaxed),
                    cancelled: ph[Phase::Cancelled as usize],
                    waiting_for_window: ph[Phase::WaitingForWindow as usize],
                    in_progress: Phase::ALL
                        .iter()
                        .filter(|p| p.is_in_progress())
                        .map(|&p| ph[p as usize])
                        .sum(),
                    bytes_served: c.bytes_served.load(Ordering::Relaxed),
                }
            })
            .collect();
        let next_wave =
            schedule::next_wave_wait(&r.spec, &rec, &r.outcomes_per_wave(), crate::now_ms());
        RolloutStatus {
            soak_ends_at_ms: schedule::soak_ends_at(&r.spec, &rec, r.spec.waves.len()),
            id: r.id.clone(),
            state: rec.state,
            next_wave,
            reason: rec.reason,
            open_wave: rec.wave + 1,
            created_at_ms: rec.created_at_ms,
            active_leases: r.throttle.active(),
            queued: r.throttle.waiting() as u64,
            starts_per_min_now: r.starts_per_min(),
            leases_granted: r.throttle.granted.load(Ordering::Relaxed),
            leases_expired: r.throttle.expired.load(Ordering::Relaxed),
            spec: r.spec.clone(),
            waves,
            wave_bounds: r.bounds.clone(),
            failure_reasons: reasons.top(),
            next_window: window::status_next_opening(&r.spec.windows, self.window_clock.now()),
        }
    }

    /// [`crate::backend::StateBackend::renew_lease`].
    pub fn renew_lease(&self, device: &str, update_id: &str) -> bool {
        let rid = update_id.split('.').next().unwrap_or("");
        let Some(r) = self.get(rid) else {
            return false;
        };
        let downloading = r
            .members
            .get(device)
            .is_some_and(|m| m.update_id == update_id && m.phase == Phase::Downloading);
        downloading
            && r.throttle.renew(
                device,
                update_id,
                crate::now_ms(),
                self.pacing.load().lease_ms,
            )
    }

    /// [`crate::backend::StateBackend::installed_update`]: newest rollout
    /// first.
    pub fn installed_update(&self, device: &str, release: &str) -> Option<String> {
        let all = self.all.read().unwrap();
        all.iter()
            .rev()
            .filter(|r| r.spec.release == release)
            .find_map(|r| {
                r.members
                    .get(device)
                    .filter(|m| m.phase == Phase::Committed)
                    .map(|m| m.update_id.clone())
            })
    }

    /// One member (admin views and tests).
    pub fn member(&self, rollout: &str, device: &str) -> Option<Member> {
        self.get(rollout)?.members.get(device).map(|m| m.clone())
    }
}

/// What a transition does besides changing the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    None,
    ReleaseLease,
    Installed,
    Committed,
    Failed,
    RolledBack,
}

/// The member's next state after `ev`, if the event changes it.
fn transition(r: &Rollout, m: &Member, ev: &Event) -> Option<(Member, Effect)> {
    transition_for(r.spec.max_retries, m, ev)
}

/// The member's next state after `ev` (both engines).
pub(crate) fn transition_for(max_retries: u32, m: &Member, ev: &Event) -> Option<(Member, Effect)> {
    let mut n = m.clone();
    let effect = match (m.phase, ev.kind) {
        (Phase::Downloading, EventKind::Progress) => {
            if let Some(p) = &ev.detail.progress {
                n.bytes_verified = p.bytes_verified;
            }
            // Progress is not persisted per event (it is a hint); the event
            // itself is.
            return None;
        }
        (Phase::Downloading, EventKind::Downloaded) => {
            n.phase = Phase::Downloaded;
            // The last progress figure, persisted with the phase: progress
            // events themselves are not, so without this a committed
            // device would show 0 bytes verified.
            if let Some(p) = &ev.detail.progress {
                n.bytes_verified = p.bytes_verified;
            }
            Effect::ReleaseLease
        }
        (Phase::Downloading | Phase::Downloaded, EventKind::WaitingForWindow) => {
            n.phase = Phase::WaitingForWindow;
            if let Some(p) = &ev.detail.progress {
                n.bytes_verified = p.bytes_verified;
            }
            Effect::ReleaseLease
        }
        // The lease of this attempt expired (the member went back to
        // waiting for a retry) before the device's report arrived: the
        // device holds the attempt verified all the same, and waits for its
        // window; without this it would wait for ever, the server offering
        // nothing to a device that is not idle.
        (Phase::Waiting, EventKind::WaitingForWindow) => {
            n.phase = Phase::WaitingForWindow;
            n.reason = None;
            Effect::None
        }
        (
            Phase::Downloading | Phase::Downloaded | Phase::WaitingForWindow,
            EventKind::Installed,
        ) => {
            n.phase = Phase::Installed;
            Effect::Installed
        }
        (Phase::Installed, EventKind::Rebooting) => {
            n.phase = Phase::Rebooting;
            Effect::None
        }
        (
            Phase::Downloading
            | Phase::Downloaded
            | Phase::WaitingForWindow
            | Phase::Installed
            | Phase::Rebooting,
            EventKind::Committed,
        ) => {
            n.phase = Phase::Committed;
            Effect::Committed
        }
        (
            Phase::Downloading
            | Phase::Downloaded
            | Phase::WaitingForWindow
            | Phase::Installed
            | Phase::Rebooting,
            EventKind::RolledBack,
        ) => {
            n.phase = Phase::RolledBack;
            n.reason = ev.detail.reason.clone();
            Effect::RolledBack
        }
        (Phase::Downloading | Phase::Downloaded | Phase::WaitingForWindow, EventKind::Failed) => {
            n.reason = ev.detail.reason.clone();
            if m.attempt <= max_retries {
                n.phase = Phase::Waiting;
                Effect::ReleaseLease
            } else {
                n.phase = Phase::Failed;
                Effect::Failed
            }
        }
        _ => return None,
    };
    Some((n, effect))
}

/// Per-wave figures in a status.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WaveStatus {
    pub wave: usize,
    pub percent: u8,
    pub open: bool,
    pub eligible: u64,
    pub already_current: u64,
    pub admitted: u64,
    pub waiting: u64,
    pub downloading: u64,
    pub installed: u64,
    pub committed: u64,
    pub failed: u64,
    pub rolled_back: u64,
    pub cancelled: u64,
    /// Downloaded, verified, waiting for a maintenance window (no lease).
    #[serde(default)]
    pub waiting_for_window: u64,
    /// Members on their way now: downloading, downloaded, waiting for a
    /// window, installed or rebooting ([`Phase::is_in_progress`]). Counted
    /// from the members' phases, unlike `admitted` (attempts while the
    /// server runs, members after a restart), from which it cannot be
    /// derived: the dashboard did, and showed "in progress 0" beside
    /// download leases held.
    #[serde(default)]
    pub in_progress: u64,
    pub bytes_served: u64,
}

/// A rollout's status, as the admin API returns it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RolloutStatus {
    pub id: String,
    pub state: RolloutState,
    pub reason: String,
    pub open_wave: usize,
    pub created_at_ms: u64,
    pub active_leases: u64,
    pub queued: u64,
    pub starts_per_min_now: f64,
    pub leases_granted: u64,
    pub leases_expired: u64,
    pub spec: RolloutSpec,
    pub waves: Vec<WaveStatus>,
    /// See [`RolloutRecord::wave_bounds`].
    #[serde(default)]
    pub wave_bounds: Vec<u64>,
    /// The commonest reasons devices gave for their last failed attempt
    /// (failed, rolled back, or waiting to retry), most frequent first: what
    /// an operator needs when a rollout pauses on its failure rate.
    #[serde(default)]
    pub failure_reasons: Vec<FailureReason>,
    /// When the earliest maintenance window next opens, by the server's
    /// window clock (now, if one is open); absent without windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window: Option<String>,
    /// In words, what the next wave (or a scheduled start) waits for
    /// ([`schedule::next_wave_wait`]); absent when nothing is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_wave: Option<String>,
    /// When the open wave's soak ends (Unix ms), while a next wave is
    /// pending ([`schedule::soak_ends_at`]): the dashboard counts down to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_ends_at_ms: Option<u64>,
}

/// One failure reason and how many devices gave it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FailureReason {
    pub reason: String,
    pub devices: u64,
}

/// Reasons shown in a status.
pub const TOP_FAILURE_REASONS: usize = 5;

/// Counts failure reasons over members (the sled engine's status scan).
#[derive(Default)]
struct FailureTally(std::collections::HashMap<String, u64>);

impl FailureTally {
    fn add(&mut self, m: &Member) {
        if matches!(m.phase, Phase::Failed | Phase::RolledBack | Phase::Waiting)
            && let Some(r) = &m.reason
        {
            *self.0.entry(r.clone()).or_default() += 1;
        }
    }

    fn top(self) -> Vec<FailureReason> {
        let mut v: Vec<FailureReason> = self
            .0
            .into_iter()
            .map(|(reason, devices)| FailureReason { reason, devices })
            .collect();
        v.sort_by(|a, b| b.devices.cmp(&a.devices).then(a.reason.cmp(&b.reason)));
        v.truncate(TOP_FAILURE_REASONS);
        v
    }
}

impl RolloutStatus {
    /// The wave (index) `device` belongs to in this rollout.
    pub fn wave_of(&self, device: &str) -> usize {
        wave_of(&self.spec, &self.id, &self.wave_bounds, device)
    }

    /// Totals over every wave.
    pub fn totals(&self) -> WaveStatus {
        let mut t = WaveStatus {
            wave: 0,
            percent: 100,
            open: true,
            eligible: 0,
            already_current: 0,
            admitted: 0,
            waiting: 0,
            downloading: 0,
            installed: 0,
            committed: 0,
            failed: 0,
            rolled_back: 0,
            cancelled: 0,
            waiting_for_window: 0,
            in_progress: 0,
            bytes_served: 0,
        };
        for w in &self.waves {
            t.eligible += w.eligible;
            t.already_current += w.already_current;
            t.admitted += w.admitted;
            t.waiting += w.waiting;
            t.downloading += w.downloading;
            t.installed += w.installed;
            t.committed += w.committed;
            t.failed += w.failed;
            t.rolled_back += w.rolled_back;
            t.cancelled += w.cancelled;
            t.waiting_for_window += w.waiting_for_window;
            t.in_progress += w.in_progress;
            t.bytes_served += w.bytes_served;
        }
        t
    }
}

impl From<sled::Error> for RolloutError {
    fn from(e: sled::Error) -> Self {
        RolloutError::Store(e.into())
    }
}

#[cfg(test)]
mod phase_tests {
    use super::*;

    #[test]
    fn phase_names_are_the_stored_names_and_all_is_in_index_order() {
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::Value::from(p.name())
            );
        }
    }
}
