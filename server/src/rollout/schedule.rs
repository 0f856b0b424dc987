//! When a rollout starts and when each of its waves may open (issue 15,
//! items 4 and 5), and the words `rollout status` shows for why the next
//! wave is not open yet.
//!
//! A rollout may be created ahead of time (`--start-at`): until then it is
//! active but admits nobody, and its first wave's soak counts from the
//! start, not from the creation. A wave may also be held to a time offset
//! from the start (`--wave-offsets 0s,6h,1d`): it then opens when the
//! previous wave soaked, met the success threshold **and** the offset has
//! passed — timing is a floor, never a reason to open a wave whose
//! predecessor failed. Both are pure functions of the spec and the record,
//! so the sled and PostgreSQL engines decide alike.

use std::time::{Duration, UNIX_EPOCH};

use super::{RolloutRecord, RolloutSpec, RolloutState};

/// How far ahead a start or a wave offset may lie: a year. Further is
/// almost certainly a typo (a millisecond value where seconds were meant).
pub const MAX_AHEAD_MS: u64 = 366 * 24 * 3600 * 1000;

/// Checks the scheduling fields of `spec` (part of
/// [`RolloutSpec::validate`]); `now` is the creation time.
pub fn check(spec: &RolloutSpec, now: u64) -> Result<(), String> {
    if let Some(at) = spec.start_at_ms
        && at > now.saturating_add(MAX_AHEAD_MS)
    {
        return Err(format!(
            "start_at {} is more than a year ahead",
            rfc3339(at)
        ));
    }
    let o = &spec.wave_offsets_ms;
    if o.is_empty() {
        return Ok(());
    }
    if o.len() != spec.waves.len() {
        return Err(format!(
            "wave_offsets lists {} offsets for {} waves: give one per wave (the first 0)",
            o.len(),
            spec.waves.len()
        ));
    }
    if o[0] != 0 {
        return Err("the first wave offset must be 0 (the first wave opens at the start)".into());
    }
    if o.windows(2).any(|w| w[0] > w[1]) {
        return Err("wave_offsets must not decrease: a later wave cannot open earlier".into());
    }
    if o.last().is_some_and(|&l| l > MAX_AHEAD_MS) {
        return Err("a wave offset is more than a year after the start".into());
    }
    Ok(())
}

/// When the rollout starts admitting devices: `start_at_ms`, or its
/// creation when that is later (a start in the past means now).
pub fn start_ms(spec: &RolloutSpec, created_at_ms: u64) -> u64 {
    spec.start_at_ms.unwrap_or(0).max(created_at_ms)
}

/// The earliest time wave `wave` (index) may open.
pub fn wave_not_before(spec: &RolloutSpec, created_at_ms: u64, wave: usize) -> u64 {
    start_ms(spec, created_at_ms) + spec.wave_offsets_ms.get(wave).copied().unwrap_or(0)
}

/// The first wave's record at creation: its soak counts from the start.
pub fn first_wave_opens(spec: &RolloutSpec, now: u64) -> u64 {
    start_ms(spec, now)
}

/// The reason a new rollout is created with.
pub fn created_reason(spec: &RolloutSpec, now: u64) -> String {
    let start = start_ms(spec, now);
    if start > now {
        format!("scheduled: starts {}", at_in(start, now))
    } else {
        "created".into()
    }
}

/// "at 2026-12-03T01:00:00Z (in 9h 12m)".
pub fn at_in(at: u64, now: u64) -> String {
    format!("at {} (in {})", rfc3339(at), left(at.saturating_sub(now)))
}

/// Why the rollout does not admit anyone yet, if it has not started.
pub fn not_started(spec: &RolloutSpec, created_at_ms: u64, now: u64) -> Option<String> {
    let start = start_ms(spec, created_at_ms);
    (now < start).then(|| format!("starts {}", at_in(start, now)))
}

/// In words, what the next wave (or the rollout's start) waits for; `None`
/// when nothing is pending: the rollout is not active, or its last wave is
/// open. `waves` holds (eligible, ok, failures) per wave, as for
/// [`super::advance_record`].
pub fn next_wave_wait(
    spec: &RolloutSpec,
    rec: &RolloutRecord,
    waves: &[(u64, u64, u64)],
    now: u64,
) -> Option<String> {
    if rec.state != RolloutState::Active {
        return None;
    }
    if let Some(s) = not_started(spec, rec.created_at_ms, now) {
        return Some(format!("the rollout {s}"));
    }
    let next = rec.wave + 1;
    if next >= waves.len() {
        return None;
    }
    let mut why = Vec::new();
    let soak_end = rec.wave_opened_at_ms + spec.soak_ms;
    if now < soak_end {
        why.push(format!("the soak ({} left)", left(soak_end - now)));
    }
    let (eligible, done, _) = super::membership::totals(&waves[..next]);
    let needed = (spec.success_threshold * eligible as f64).ceil() as u64;
    if done < needed {
        why.push(format!(
            "{needed} of {eligible} devices in waves 1-{next} to commit ({done} have, {:.0} % needed)",
            100.0 * spec.success_threshold
        ));
    }
    let not_before = wave_not_before(spec, rec.created_at_ms, next);
    if now < not_before {
        why.push(format!(
            "its time offset: not before {}",
            at_in(not_before, now)
        ));
    }
    Some(if why.is_empty() {
        format!("wave {} opens at the next rollout tick", next + 1)
    } else {
        format!("wave {} waits for {}", next + 1, why.join(", "))
    })
}

/// When the open wave's soak ends (Unix ms), while a next wave is pending
/// and the rollout active: the dashboard's countdown. `None` otherwise.
pub fn soak_ends_at(spec: &RolloutSpec, rec: &RolloutRecord, waves: usize) -> Option<u64> {
    (rec.state == RolloutState::Active && rec.wave + 1 < waves && spec.soak_ms > 0)
        .then(|| rec.wave_opened_at_ms + spec.soak_ms)
}

/// A start time as an operator writes it: RFC 3339 with its offset
/// (`2026-12-03T02:00:00+01:00`, `…Z`) or `+DURATION` from `now` (`+2h`).
/// Unix ms. A time without an offset is refused: which zone it meant is a
/// guess this must not make.
pub fn parse_start_at(s: &str, now: u64) -> Result<u64, String> {
    if let Some(d) = s.strip_prefix('+') {
        let d = humantime::parse_duration(d.trim()).map_err(|e| format!("{s:?}: {e}"))?;
        return Ok(now.saturating_add(d.as_millis() as u64));
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!(
                "{s:?}: {e}: give RFC 3339 with an offset (2026-12-03T02:00:00+01:00 or \
                 2026-12-03T01:00:00Z) or a delay from now (+2h)"
            )
        })?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{s:?} is before 1970"))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A duration to the second ("1h 2m 3s"); "0s" below a second.
fn left(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms.div_ceil(1000))).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600 * 1000;

    fn spec(waves: &[u8], offsets: &[u64]) -> RolloutSpec {
        let mut s: RolloutSpec = serde_json::from_value(serde_json::json!({
            "release": "2.0.0", "device_type": "t", "max_concurrent": 5,
            "max_starts_per_min": 60.0,
        }))
        .unwrap();
        s.waves = waves.to_vec();
        s.wave_offsets_ms = offsets.to_vec();
        s
    }

    #[test]
    fn offsets_are_one_per_wave_start_at_zero_and_do_not_decrease() {
        let now = 1_000;
        assert!(check(&spec(&[10, 100], &[]), now).is_ok());
        assert!(check(&spec(&[10, 100], &[0, H]), now).is_ok());
        assert!(
            check(&spec(&[10, 100], &[0]), now)
                .unwrap_err()
                .contains("one per wave")
        );
        assert!(
            check(&spec(&[10, 100], &[H, H]), now)
                .unwrap_err()
                .contains("must be 0")
        );
        assert!(
            check(&spec(&[10, 50, 100], &[0, 2 * H, H]), now)
                .unwrap_err()
                .contains("must not decrease")
        );
        assert!(
            check(&spec(&[10, 100], &[0, MAX_AHEAD_MS + 1]), now)
                .unwrap_err()
                .contains("more than a year")
        );
        let mut s = spec(&[100], &[]);
        s.start_at_ms = Some(now + MAX_AHEAD_MS + 1);
        assert!(
            check(&s, now)
                .unwrap_err()
                .contains("more than a year ahead")
        );
    }

    #[test]
    fn start_times_need_an_offset_or_a_delay() {
        assert_eq!(
            parse_start_at("1970-01-01T02:00:00+01:00", 0).unwrap(),
            H,
            "the offset is applied"
        );
        assert_eq!(parse_start_at("1970-01-01T01:00:00Z", 0).unwrap(), H);
        assert_eq!(parse_start_at("+2h", 5).unwrap(), 2 * H + 5);
        let e = parse_start_at("2026-12-03T02:00:00", 0).unwrap_err();
        assert!(e.contains("with an offset"), "{e}");
        assert!(parse_start_at("+soon", 0).is_err());
        assert!(
            parse_start_at("1960-01-01T00:00:00Z", 0)
                .unwrap_err()
                .contains("before 1970")
        );
    }

    #[test]
    fn a_start_in_the_past_means_now_and_offsets_count_from_the_start() {
        let mut s = spec(&[10, 100], &[0, 6 * H]);
        assert_eq!(start_ms(&s, 5_000), 5_000);
        s.start_at_ms = Some(1_000);
        assert_eq!(start_ms(&s, 5_000), 5_000, "past start: now");
        s.start_at_ms = Some(10 * H);
        assert_eq!(start_ms(&s, 5_000), 10 * H);
        assert_eq!(wave_not_before(&s, 5_000, 1), 16 * H);
        assert_eq!(
            created_reason(&s, 9 * H),
            "scheduled: starts at 1970-01-01T10:00:00Z (in 1h)"
        );
    }
}
