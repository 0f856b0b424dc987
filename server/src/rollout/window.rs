//! Maintenance windows: when a device of a rollout may switch slots and
//! reboot (issue 15).
//!
//! A window is a recurring local time in a named IANA zone, written as an
//! operator types it: `DAYS HH:MM+DURATION ZONE`, e.g.
//! `mon-fri 02:00+3h Europe/Berlin`, `sat,sun 22:30+90m America/New_York`,
//! `daily 01:00+1h30m UTC`, or `daily 02:00+3h local` (below). DAYS is
//! `daily` or a comma list of days and
//! day ranges (`mon-fri`, `fri-mon` wraps, `mon,wed,fri`). A [`Window`] can
//! only be made by parsing ([`Window::parse`], also what deserialising
//! does), so a bad window cannot exist: the error names the part that is
//! wrong.
//!
//! # Device-local windows
//!
//! ZONE `local` is each device's own zone, as it reports it in its
//! check-in (`time_zone`, an IANA name: the agent's `time_zone` setting,
//! else `/etc/timezone` or the `/etc/localtime` link): one rollout over a
//! fleet spread across zones then switches every device at 02:00 on its
//! own wall clock. A device that reports no zone, or one the server's
//! database does not know, is judged in UTC, and the answer that tells it
//! to wait says so ([`DeviceZone`]). DDI targets report none: for them a
//! `local` window is a UTC window.
//!
//! # Time zones and DST
//!
//! Zones come from the system's zone database (`/usr/share/zoneinfo`,
//! through `jiff`), never from hand-written offsets. A window is **wall
//! clock** time in its zone: `02:00+3h` means "from 02:00 to 05:00 by the
//! clock on the depot's wall", which is what an operator who closes a depot
//! at night means. Across a DST change this makes the window shorter or
//! longer in elapsed time:
//!
//! - spring forward (02:00 → 03:00 in Europe/Berlin): 02:00 does not exist;
//!   the window opens at the first instant after the gap (03:00 CEST) and
//!   closes at 05:00 CEST: two hours that night;
//! - fall back (03:00 → 02:00): 02:00 happens twice; the window opens at
//!   the first 02:00 (CEST) and closes at 05:00 CET: four hours that night.
//!
//! Both follow `jiff`'s "compatible" disambiguation (the one RFC 5545
//! calendars use). A window may run past midnight (`23:00+4h`): it belongs
//! to the day it opens on.
//!
//! # The clock
//!
//! Windows are judged by the server's [`WindowClock`]: the system clock plus
//! an offset that is zero in production and that tests move (hours ahead,
//! into a window) through a hook compiled only into test builds
//! (`PUT /api/v1/admin/test/window-clock`), instead of sleeping for hours.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use serde::{Deserialize, Serialize};

/// Most windows on one rollout.
pub const MAX_WINDOWS: usize = 16;
/// Longest window: a week (a longer one is always open).
pub const MAX_DURATION_MIN: u32 = 7 * 24 * 60;

/// A recurring maintenance window. See the module documentation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    /// Bit `i` set: the window opens on weekday `i` (Monday = 0).
    days: u8,
    hour: i8,
    minute: i8,
    duration_min: u32,
    zone: String,
    /// `None`: the device's own zone (`local`).
    tz: Option<TimeZone>,
}

/// The zone a device's `local` windows are judged in: the one it reported,
/// else UTC.
#[derive(Clone, Debug)]
pub struct DeviceZone {
    tz: TimeZone,
    /// The IANA name the device reported, if the database knows it.
    name: Option<String>,
}

impl DeviceZone {
    /// The zone of a device that reported `reported` (its check-in's
    /// `time_zone`); UTC when absent or unknown here.
    pub fn reported(reported: Option<&str>) -> DeviceZone {
        match reported.map(|n| (n, TimeZone::get(n))) {
            Some((n, Ok(tz))) => DeviceZone {
                tz,
                name: Some(n.to_string()),
            },
            _ => DeviceZone::utc(),
        }
    }

    /// A device with no zone of its own (DDI targets, old agents).
    pub fn utc() -> DeviceZone {
        DeviceZone {
            tz: TimeZone::UTC,
            name: None,
        }
    }

    /// What the device's `local` means, for messages.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("the device's zone {n}"),
            None => "UTC (the device reported no time zone this server knows)".into(),
        }
    }
}

// Two windows are equal when they read the same (the zone is its name).
impl PartialEq for Window {
    fn eq(&self, o: &Self) -> bool {
        (
            self.days,
            self.hour,
            self.minute,
            self.duration_min,
            &self.zone,
        ) == (o.days, o.hour, o.minute, o.duration_min, &o.zone)
    }
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day_index(s: &str) -> Result<u8, String> {
    DAY_NAMES
        .iter()
        .position(|d| s.eq_ignore_ascii_case(d))
        .map(|i| i as u8)
        .ok_or_else(|| {
            format!("window days: {s:?} is not a day; use mon, tue, wed, thu, fri, sat, sun")
        })
}

fn parse_days(s: &str) -> Result<u8, String> {
    if s.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut days = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day_index(a)?, day_index(b)?);
                let mut d = a;
                loop {
                    days |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days |= 1 << day_index(part)?,
        }
    }
    Ok(days)
}

fn parse_duration(s: &str) -> Result<u32, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("window duration {s:?}: {e}; write it like 3h, 90m or 1h30m"))?;
    if d.as_secs() % 60 != 0 || d.subsec_nanos() != 0 {
        return Err(format!("window duration {s:?} must be whole minutes"));
    }
    let min = d.as_secs() / 60;
    if min == 0 || min > u64::from(MAX_DURATION_MIN) {
        return Err(format!(
            "window duration {s:?} must be 1 minute to 7 days (168h)"
        ));
    }
    Ok(min as u32)
}

fn parse_start(s: &str) -> Result<(i8, i8), String> {
    let bad = || format!("window start {s:?} must be a 24-hour time HH:MM (00:00 to 23:59)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: i8 = h.parse().map_err(|_| bad())?;
    let m: i8 = m.parse().map_err(|_| bad())?;
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    Ok((h, m))
}

impl Window {
    /// Parses `DAYS HH:MM+DURATION ZONE`; the error names the part that is
    /// wrong and how to write it.
    pub fn parse(s: &str) -> Result<Window, String> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [days, when, zone] = parts[..] else {
            return Err(format!(
                "window {s:?} must be \"DAYS HH:MM+DURATION ZONE\", e.g. \"mon-fri 02:00+3h Europe/Berlin\""
            ));
        };
        let days = parse_days(days)?;
        let (start, duration) = when.split_once('+').ok_or_else(|| {
            format!("window {s:?}: {when:?} must be HH:MM+DURATION, e.g. 02:00+3h")
        })?;
        let (hour, minute) = parse_start(start)?;
        let duration_min = parse_duration(duration)?;
        let tz = if zone == "local" {
            None
        } else {
            Some(TimeZone::get(zone).map_err(|e| {
                format!(
                    "window zone {zone:?} is not in the system's time zone database ({e}); \
                     use an IANA name such as Europe/Berlin or UTC, or `local` for each \
                     device's own zone"
                )
            })?)
        };
        Ok(Window {
            days,
            hour,
            minute,
            duration_min,
            zone: zone.to_string(),
            tz,
        })
    }

    /// The zone's IANA name, or `local`.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// In each device's own zone (`local`).
    pub fn is_device_local(&self) -> bool {
        self.tz.is_none()
    }

    fn tz<'a>(&'a self, device: &'a DeviceZone) -> &'a TimeZone {
        self.tz.as_ref().unwrap_or(&device.tz)
    }

    fn opens_on(&self, d: Weekday) -> bool {
        self.days & (1 << d.to_monday_zero_offset()) != 0
    }

    /// The occurrence that opens on local date `date`, as [open, close)
    /// instants, if the window opens that day.
    fn occurrence(&self, date: Date, tz: &TimeZone) -> Option<(Zoned, Zoned)> {
        if !self.opens_on(date.weekday()) {
            return None;
        }
        let start: DateTime = date.at(self.hour, self.minute, 0, 0);
        let end = start
            .checked_add(jiff::Span::new().minutes(i64::from(self.duration_min)))
            .ok()?;
        let open = start.to_zoned(tz.clone()).ok()?;
        let close = end.to_zoned(tz.clone()).ok()?;
        Some((open, close))
    }

    /// The occurrences that may contain or follow `now`: those opening from
    /// 8 days before (a week-long window opened last week) to 8 days after.
    fn occurrences_around<'a>(
        &'a self,
        now: Timestamp,
        tz: &'a TimeZone,
    ) -> impl Iterator<Item = (Zoned, Zoned)> + 'a {
        let today = now.to_zoned(tz.clone()).date();
        (-8i64..=8).filter_map(move |k| {
            let d = today.checked_add(jiff::Span::new().days(k)).ok()?;
            self.occurrence(d, tz)
        })
    }

    /// Whether the window is open at `now` for a device in `device`'s zone
    /// (which matters only to a `local` window).
    pub fn is_open(&self, now: Timestamp, device: &DeviceZone) -> bool {
        self.occurrences_around(now, self.tz(device))
            .any(|(o, c)| o.timestamp() <= now && now < c.timestamp())
    }

    /// When the window next opens at or after `now` (`now` itself when it
    /// is open), in its zone (a `local` window: in `device`'s).
    pub fn next_open(&self, now: Timestamp, device: &DeviceZone) -> Option<Zoned> {
        let tz = self.tz(device);
        self.occurrences_around(now, tz)
            .filter(|(_, c)| c.timestamp() > now)
            .map(|(o, _)| {
                if o.timestamp() < now {
                    now.to_zoned(tz.clone())
                } else {
                    o
                }
            })
            .min_by_key(|z| z.timestamp())
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = if self.days == 0x7f {
            "daily".to_string()
        } else {
            (0..7)
                .filter(|i| self.days & (1 << i) != 0)
                .map(|i| DAY_NAMES[i])
                .collect::<Vec<_>>()
                .join(",")
        };
        let (h, m) = (self.duration_min / 60, self.duration_min % 60);
        let dur = match (h, m) {
            (0, m) => format!("{m}m"),
            (h, 0) => format!("{h}h"),
            (h, m) => format!("{h}h{m}m"),
        };
        write!(
            f,
            "{days} {:02}:{:02}+{dur} {}",
            self.hour, self.minute, self.zone
        )
    }
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Window, String> {
        Window::parse(&s)
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.to_string()
    }
}

/// Checks a rollout's windows as a whole (each one is valid by
/// construction).
pub fn check_windows(ws: &[Window]) -> Result<(), String> {
    if ws.len() > MAX_WINDOWS {
        return Err(format!(
            "windows: at most {MAX_WINDOWS} per rollout, {} given",
            ws.len()
        ));
    }
    Ok(())
}

/// Whether a device in zone `device` may switch now under `windows`:
/// always without windows; else when any of them is open.
pub fn install_allowed(windows: &[Window], now: Timestamp, device: &DeviceZone) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.is_open(now, device))
}

/// When the earliest of `windows` next opens for a device in zone `device`
/// (RFC 3339 with its zone), for the answer that tells a device to wait
/// and for `rollout status` (which passes UTC: see [`local_note`]).
pub fn next_opening(windows: &[Window], now: Timestamp, device: &DeviceZone) -> Option<String> {
    windows
        .iter()
        .filter_map(|w| w.next_open(now, device))
        .min_by_key(|z| z.timestamp())
        .map(|z| z.strftime("%Y-%m-%dT%H:%M%:z[%Q]").to_string())
}

/// For the rollout's own status, where no one device's zone applies: the
/// next opening of its windows with `local` ones read in UTC, and a note
/// saying so when there are such windows.
pub fn status_next_opening(windows: &[Window], now: Timestamp) -> Option<String> {
    let next = next_opening(windows, now, &DeviceZone::utc())?;
    Some(if windows.iter().any(Window::is_device_local) {
        format!("{next} (`local` windows open at that wall-clock time in each device's own zone)")
    } else {
        next
    })
}

/// Whether a member in `phase` has not installed yet (what
/// `rollout install-now` can still apply to).
pub fn before_install(phase: super::Phase) -> bool {
    use super::Phase::*;
    matches!(phase, Waiting | Downloading | Downloaded | WaitingForWindow)
}

/// The clock windows are judged by: the system clock plus an offset that
/// only tests move ([`WindowClock::set_offset_ms`], behind a test-build
/// route). Shared by clones; lock-free (one atomic load per check-in).
#[derive(Clone, Default, Debug)]
pub struct WindowClock {
    offset_ms: Arc<AtomicI64>,
}

impl WindowClock {
    /// Now, as windows see it.
    pub fn now(&self) -> Timestamp {
        let ms = crate::now_ms() as i64 + self.offset_ms.load(Ordering::Relaxed);
        Timestamp::from_millisecond(ms).unwrap_or_else(|_| Timestamp::now())
    }

    /// Moves the window clock `offset_ms` away from the system clock (tests).
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn u() -> DeviceZone {
        DeviceZone::utc()
    }

    #[test]
    fn a_local_window_opens_on_each_devices_own_wall_clock() {
        let w = Window::parse("daily 13:00+1h local").unwrap();
        assert!(w.is_device_local());
        assert_eq!(w.to_string(), "daily 13:00+1h local");
        let dhaka = DeviceZone::reported(Some("Asia/Dhaka")); // +06:00
        let kolkata = DeviceZone::reported(Some("Asia/Kolkata")); // +05:30
        // 07:10Z is 13:10 in Dhaka, 12:40 in Kolkata.
        assert!(w.is_open(at("2026-12-02T07:10:00Z"), &dhaka));
        assert!(!w.is_open(at("2026-12-02T07:10:00Z"), &kolkata));
        assert!(w.is_open(at("2026-12-02T07:40:00Z"), &kolkata));
        assert_eq!(
            next_opening(
                std::slice::from_ref(&w),
                at("2026-12-02T07:10:00Z"),
                &kolkata
            )
            .unwrap(),
            "2026-12-02T13:00+05:30[Asia/Kolkata]"
        );
        // No zone, or one this server does not know: UTC, and said so.
        for z in [
            DeviceZone::reported(None),
            DeviceZone::reported(Some("Mars/Olympus")),
        ] {
            assert!(w.is_open(at("2026-12-02T13:30:00Z"), &z));
            assert!(!w.is_open(at("2026-12-02T07:10:00Z"), &z));
            assert!(z.describe().contains("UTC"), "{}", z.describe());
        }
        assert!(dhaka.describe().contains("Asia/Dhaka"));
        // A named zone ignores the device's.
        let berlin = Window::parse("daily 13:00+1h Europe/Berlin").unwrap();
        assert!(!berlin.is_device_local());
        assert_eq!(
            berlin.is_open(at("2026-12-02T12:30:00Z"), &dhaka),
            berlin.is_open(at("2026-12-02T12:30:00Z"), &u())
        );
        assert!(
            status_next_opening(&[w], at("2026-12-02T07:10:00Z"))
                .unwrap()
                .contains("each device's own zone")
        );
    }

    #[test]
    fn a_window_round_trips_through_its_text() {
        for s in [
            "mon-fri 02:00+3h Europe/Berlin",
            "sat,sun 22:30+90m America/New_York",
            "daily 01:00+1h30m UTC",
        ] {
            let w = Window::parse(s).unwrap();
            let back = Window::parse(&w.to_string()).unwrap();
            assert_eq!(back.to_string(), w.to_string());
            let j = serde_json::to_string(&w).unwrap();
            let w2: Window = serde_json::from_str(&j).unwrap();
            assert_eq!(w2.to_string(), w.to_string());
        }
        assert_eq!(
            Window::parse("mon-fri 02:00+3h Europe/Berlin")
                .unwrap()
                .to_string(),
            "mon,tue,wed,thu,fri 02:00+3h Europe/Berlin"
        );
        assert_eq!(
            Window::parse("fri-mon 02:00+3h UTC").unwrap().to_string(),
            "mon,fri,sat,sun 02:00+3h UTC"
        );
    }

    #[test]
    fn bad_windows_are_refused_naming_the_part() {
        let e = |s: &str| Window::parse(s).unwrap_err();
        assert!(e("mon-fri 02:00+3h").contains("DAYS HH:MM+DURATION ZONE"));
        assert!(e("mon-fry 02:00+3h UTC").contains("\"fry\" is not a day"));
        assert!(e("mon 24:00+3h UTC").contains("window start"));
        assert!(e("mon 2:0+3h UTC").contains("window start"));
        assert!(e("mon 02:00 UTC").contains("HH:MM+DURATION"));
        assert!(e("mon 02:00+0m UTC").contains("1 minute to 7 days"));
        assert!(e("mon 02:00+8d UTC").contains("1 minute to 7 days"));
        assert!(e("mon 02:00+30s UTC").contains("whole minutes"));
        assert!(e("mon 02:00+3h Mars/Olympus").contains("window zone"));
        // Deserialising is parsing: a stored or posted bad window fails.
        assert!(serde_json::from_str::<Window>("\"mon 02:00+3h Nowhere/X\"").is_err());
    }

    #[test]
    fn open_and_next_opening_in_a_plain_week() {
        // 2026-12-02 is a Wednesday; Berlin is UTC+1 in winter.
        let w = Window::parse("mon-fri 02:00+3h Europe/Berlin").unwrap();
        assert!(!w.is_open(at("2026-12-02T00:59:59Z"), &u()));
        assert!(w.is_open(at("2026-12-02T01:00:00Z"), &u()));
        assert!(w.is_open(at("2026-12-02T03:59:59Z"), &u()));
        assert!(!w.is_open(at("2026-12-02T04:00:00Z"), &u()));
        assert_eq!(
            next_opening(std::slice::from_ref(&w), at("2026-12-02T12:00:00Z"), &u()).unwrap(),
            "2026-12-03T02:00+01:00[Europe/Berlin]"
        );
        // Friday afternoon: next is Monday.
        assert_eq!(
            next_opening(std::slice::from_ref(&w), at("2026-12-04T12:00:00Z"), &u()).unwrap(),
            "2026-12-07T02:00+01:00[Europe/Berlin]"
        );
        // Inside: now.
        assert!(w.next_open(at("2026-12-02T02:00:00Z"), &u()).is_some());
        assert!(!w.is_open(at("2026-12-05T01:30:00Z"), &u()), "Saturday");
    }

    #[test]
    fn a_window_past_midnight_belongs_to_the_day_it_opens() {
        let w = Window::parse("fri 23:00+4h UTC").unwrap();
        // Saturday 02:00 is inside Friday's window.
        assert!(w.is_open(at("2026-12-05T02:00:00Z"), &u()));
        assert!(!w.is_open(at("2026-12-05T03:00:00Z"), &u()));
        // Thursday night is not.
        assert!(!w.is_open(at("2026-12-04T02:00:00Z"), &u()));
    }

    #[test]
    fn dst_spring_forward_shortens_the_night_in_wall_clock_time() {
        // Europe/Berlin, Sunday 2026-03-29: 02:00 CET jumps to 03:00 CEST
        // (01:00 UTC). 02:00 does not exist: the window opens at 03:00
        // CEST (01:00 UTC) and closes at 05:00 CEST (03:00 UTC).
        let w = Window::parse("sun 02:00+3h Europe/Berlin").unwrap();
        assert!(!w.is_open(at("2026-03-29T00:59:59Z"), &u()));
        assert!(w.is_open(at("2026-03-29T01:00:00Z"), &u()));
        assert!(w.is_open(at("2026-03-29T02:59:59Z"), &u()));
        assert!(!w.is_open(at("2026-03-29T03:00:00Z"), &u()));
        // The Sunday before, in CET: 01:00 to 04:00 UTC.
        assert!(w.is_open(at("2026-03-22T01:00:00Z"), &u()));
        assert!(w.is_open(at("2026-03-22T03:59:59Z"), &u()));
        assert!(!w.is_open(at("2026-03-22T04:00:00Z"), &u()));
        // And the Sunday after, in CEST: 00:00 to 03:00 UTC.
        assert!(w.is_open(at("2026-04-05T00:00:00Z"), &u()));
        assert!(!w.is_open(at("2026-04-05T03:00:00Z"), &u()));
    }

    #[test]
    fn dst_fall_back_lengthens_the_night_in_wall_clock_time() {
        // Europe/Berlin, Sunday 2026-10-25: 03:00 CEST falls back to 02:00
        // CET (01:00 UTC). The window opens at the first 02:00 (CEST,
        // 00:00 UTC) and closes at 05:00 CET (04:00 UTC): four hours.
        let w = Window::parse("sun 02:00+3h Europe/Berlin").unwrap();
        assert!(!w.is_open(at("2026-10-24T23:59:59Z"), &u()));
        assert!(w.is_open(at("2026-10-25T00:00:00Z"), &u()));
        assert!(w.is_open(at("2026-10-25T03:59:59Z"), &u()));
        assert!(!w.is_open(at("2026-10-25T04:00:00Z"), &u()));
        assert_eq!(
            next_opening(std::slice::from_ref(&w), at("2026-10-24T12:00:00Z"), &u()).unwrap(),
            "2026-10-25T02:00+02:00[Europe/Berlin]"
        );
    }

    #[test]
    fn dst_in_new_york_follows_its_own_rule_and_date() {
        // America/New_York, Sunday 2026-03-08: 02:00 EST jumps to 03:00 EDT.
        let w = Window::parse("sun 01:30+2h America/New_York").unwrap();
        // Opens 01:30 EST = 06:30 UTC; closes 03:30 EDT = 07:30 UTC.
        assert!(!w.is_open(at("2026-03-08T06:29:59Z"), &u()));
        assert!(w.is_open(at("2026-03-08T06:30:00Z"), &u()));
        assert!(!w.is_open(at("2026-03-08T07:30:00Z"), &u()));
    }

    #[test]
    fn several_windows_any_open_allows() {
        let ws = vec![
            Window::parse("mon 02:00+1h UTC").unwrap(),
            Window::parse("wed 12:00+1h UTC").unwrap(),
        ];
        assert!(install_allowed(&ws, at("2026-12-02T12:30:00Z"), &u()));
        assert!(!install_allowed(&ws, at("2026-12-02T13:30:00Z"), &u()));
        assert!(install_allowed(&[], at("2026-12-02T13:30:00Z"), &u()));
        assert_eq!(
            next_opening(&ws, at("2026-12-02T13:30:00Z"), &u()).unwrap(),
            "2026-12-07T02:00+00:00[UTC]"
        );
        assert!(check_windows(&vec![ws[0].clone(); 17]).is_err());
    }

    #[test]
    fn a_waiting_report_after_the_lease_expired_still_parks_the_member() {
        use super::super::{Effect, Member, Phase, transition_for};
        use ota_format::api::{Event, EventKind};
        let m = Member {
            device: "d".into(),
            wave: 0,
            phase: Phase::Waiting,
            attempt: 1,
            update_id: "r1.1".into(),
            artifacts: None,
            reason: Some("lease expired; will retry".into()),
            bytes_verified: 0,
            install_now: false,
        };
        let ev = Event {
            seq: 1,
            update_id: "r1.1".into(),
            kind: EventKind::WaitingForWindow,
            at: String::new(),
            detail: Default::default(),
        };
        let (n, e) = transition_for(2, &m, &ev).unwrap();
        assert_eq!((n.phase, e), (Phase::WaitingForWindow, Effect::None));
        assert_eq!(n.reason, None);
        // And from there, the usual end.
        let inst = Event {
            kind: EventKind::Installed,
            ..ev
        };
        let (n, e) = transition_for(2, &n, &inst).unwrap();
        assert_eq!((n.phase, e), (Phase::Installed, Effect::Installed));
    }

    #[test]
    fn the_clock_moves_by_its_offset() {
        let c = WindowClock::default();
        let a = c.now();
        c.clone().set_offset_ms(3_600_000);
        let b = c.now();
        assert!(b.as_millisecond() - a.as_millisecond() >= 3_600_000);
    }
}
