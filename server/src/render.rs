//! Human output of the CLI: the device table, one device, rollout lists,
//! build progress.
//!
//! Times are shown as RFC 3339 (UTC) and as an age ("12 s ago"), never as
//! epoch milliseconds; wave numbers count from 1 as in `rollout status`.
//! `--json` prints the API's raw answer instead, for scripts.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use ota_format::api::{AgentState, Event, Slot};
use serde::Deserialize;

use crate::inventory::DevicePage;
use crate::rollout::{Member, RolloutStatus};

/// "12 s ago", "5 min ago", "3 h ago", "2 d ago"; "never" for 0.
pub fn ago(now_ms: u64, t_ms: u64) -> String {
    if t_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(t_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// RFC 3339 in UTC, to the second; "never" for 0.
pub fn rfc3339(t_ms: u64) -> String {
    if t_ms == 0 {
        return "never".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(t_ms)).to_string()
}

/// "2026-12-01T22:30:00Z (12 s ago)".
pub fn when(now_ms: u64, t_ms: u64) -> String {
    if t_ms == 0 {
        return "never".into();
    }
    format!("{} ({})", rfc3339(t_ms), ago(now_ms, t_ms))
}

fn state_name(s: Option<AgentState>) -> String {
    s.and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| "-".into())
}

fn tags_text(t: &std::collections::BTreeMap<String, String>) -> String {
    if t.is_empty() {
        return "-".into();
    }
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The device table of `device list`, with a footer that says how many
/// matched and how to get the next page.
pub fn device_table(p: &DevicePage, now_ms: u64) -> String {
    let mut o = String::new();
    if p.devices.is_empty() {
        let _ = writeln!(
            o,
            "no devices match{}",
            if p.total > 0 {
                " on this page"
            } else {
                " (enroll some with `ota-server device add`, or loosen the filters)"
            }
        );
        return o;
    }
    let w = |f: &dyn Fn(&crate::inventory::DeviceSummary) -> usize, min: usize| {
        p.devices.iter().map(f).max().unwrap_or(0).max(min)
    };
    let (wi, wt, wv) = (
        w(&|d| d.id.len(), 2),
        w(&|d| d.device_type.len(), 4),
        w(&|d| d.version.as_deref().map_or(1, str::len), 7),
    );
    let _ = writeln!(
        o,
        "{:<wi$}  {:<wt$}  {:<wv$}  {:<11}  {:<4}  {:<12}  TAGS",
        "ID", "TYPE", "VERSION", "STATE", "SLOT", "LAST SEEN"
    );
    for d in &p.devices {
        let _ = writeln!(
            o,
            "{:<wi$}  {:<wt$}  {:<wv$}  {:<11}  {:<4}  {:<12}  {}",
            d.id,
            d.device_type,
            d.version.as_deref().unwrap_or("-"),
            state_name(d.state),
            d.booted_slot.map_or("-", |s| match s {
                Slot::A => "a",
                Slot::B => "b",
            }),
            ago(now_ms, d.last_seen_ms),
            tags_text(&d.tags)
        );
    }
    match &p.next {
        Some(n) => {
            let _ = writeln!(
                o,
                "{} of {} matching devices; next page: --after {n}",
                p.devices.len(),
                p.total
            );
        }
        None => {
            let _ = writeln!(o, "{} matching devices", p.total);
        }
    }
    o
}

/// The admin view of one device (`GET /api/v1/admin/devices/{id}`).
#[derive(Deserialize, Debug, Clone)]
pub struct DeviceView {
    pub id: String,
    pub device_type: String,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    pub version: Option<String>,
    pub booted_slot: Option<Slot>,
    pub state: Option<AgentState>,
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default)]
    pub rollouts: Vec<Member>,
    #[serde(default)]
    pub history: Vec<Event>,
}

/// `device show` in human form.
pub fn device(v: &DeviceView, now_ms: u64) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "device {} ({})", v.id, v.device_type);
    let _ = writeln!(o, "  version    {}", v.version.as_deref().unwrap_or("-"));
    let _ = writeln!(
        o,
        "  state      {}{}",
        state_name(v.state.filter(|_| v.last_seen_ms > 0)),
        v.booted_slot
            .filter(|_| v.last_seen_ms > 0)
            .map_or(String::new(), |s| format!(
                ", booted slot {}",
                if s == Slot::A { "a" } else { "b" }
            ))
    );
    let _ = writeln!(o, "  last seen  {}", when(now_ms, v.last_seen_ms));
    let _ = writeln!(o, "  tags       {}", tags_text(&v.tags));
    if v.rollouts.is_empty() {
        let _ = writeln!(o, "  rollouts   none has admitted this device");
    }
    for m in &v.rollouts {
        let rollout = m.update_id.split('.').next().unwrap_or(&m.update_id);
        let phase = serde_json::to_value(m.phase)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  rollout {rollout}: wave {}, {phase}, attempt {}, {} bytes verified{}",
            m.wave + 1,
            m.attempt,
            m.bytes_verified,
            m.reason
                .as_deref()
                .map_or(String::new(), |r| format!(" — last failure: {r}"))
        );
    }
    if !v.history.is_empty() {
        let _ = writeln!(o, "  history (device clock, newest last):");
        for e in &v.history {
            let _ = writeln!(o, "    {}", event_line(e));
        }
    }
    o
}

/// One stored event: device time, kind, update id, version and reason.
fn event_line(e: &Event) -> String {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let mut extra = String::new();
    if let Some(v) = &e.detail.version {
        let _ = write!(extra, " version {v}");
    }
    if let Some(r) = &e.detail.reason {
        let _ = write!(extra, " — {r}");
    }
    format!("{}  {:<16} {}{extra}", e.at, kind, e.update_id)
}

/// `device history`: its update attempts, then its events newest first.
pub fn device_history(v: &serde_json::Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "device {} on {}",
        v["id"].as_str().unwrap_or("?"),
        v["version"].as_str().unwrap_or("-")
    );
    let attempts: Vec<Member> = serde_json::from_value(v["attempts"].clone()).unwrap_or_default();
    for m in &attempts {
        let phase = serde_json::to_value(m.phase)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  attempt {} (wave {}): {phase}{}",
            m.update_id,
            m.wave + 1,
            m.reason
                .as_deref()
                .map_or(String::new(), |r| format!(" — {r}"))
        );
    }
    let events: Vec<Event> = serde_json::from_value(v["events"].clone()).unwrap_or_default();
    if events.is_empty() {
        let _ = writeln!(o, "  no events stored");
    } else {
        let _ = writeln!(o, "  events (device clock, newest first; seq):");
        for e in &events {
            let _ = writeln!(o, "    {:>6}  {}", e.seq, event_line(e));
        }
    }
    if let Some(b) = v["next_before"].as_u64() {
        let _ = writeln!(o, "  older: --before {b}");
    }
    o
}

/// `audit list`: newest first.
pub fn audit(p: &crate::audit::AuditPage) -> String {
    let mut o = String::new();
    if p.entries.is_empty() {
        return "the audit log is empty\n".into();
    }
    for e in &p.entries {
        let detail = if e.detail.is_null() {
            String::new()
        } else {
            format!(" {}", e.detail)
        };
        let _ = writeln!(
            o,
            "{:>6} {} {} ({}) from {}: {} {} -> {}{detail}",
            e.seq,
            rfc3339(e.at_ms),
            e.actor,
            e.role.name(),
            e.from,
            e.action,
            e.path.strip_prefix("/api/v1/admin/").unwrap_or(&e.path),
            e.status
        );
    }
    if let Some(b) = p.next_before {
        let _ = writeln!(o, "older: --before {b}");
    }
    o
}

/// `rollout list`; says so when there are none.
pub fn rollout_list(all: &[RolloutStatus]) -> String {
    let mut o = String::new();
    if all.is_empty() {
        o.push_str(
            "no rollouts yet; start one with `ota-server rollout create --release V --device-type T ...`\n",
        );
        return o;
    }
    for s in all {
        let t = s.totals();
        let _ = writeln!(
            o,
            "{:<6} {:<12} {:<12} {:<10} wave {}/{} committed {}/{} failed {} — {}",
            s.id,
            s.spec.device_type,
            s.spec.release,
            format!("{:?}", s.state),
            s.open_wave,
            s.waves.len(),
            t.committed + t.already_current,
            t.eligible,
            t.failed + t.rolled_back,
            s.reason
        );
    }
    o
}

/// The maintenance-window lines of `rollout status` (empty without
/// windows): the windows, when the next opens, and how many devices hold a
/// verified update waiting for one.
pub fn windows(s: &RolloutStatus) -> String {
    use std::fmt::Write;
    if s.spec.windows.is_empty() {
        return String::new();
    }
    let mut o = String::new();
    let list: Vec<String> = s.spec.windows.iter().map(|w| w.to_string()).collect();
    let _ = writeln!(o, "  install windows: {}", list.join("; "));
    let _ = writeln!(
        o,
        "  next window opens: {}; waiting-for-window: {} (downloaded and verified, no lease)",
        s.next_window.as_deref().unwrap_or("never"),
        s.totals().waiting_for_window
    );
    o
}

/// The failure-reason lines of `rollout status` (empty when none failed).
pub fn failure_reasons(s: &RolloutStatus) -> String {
    let mut o = String::new();
    if s.failure_reasons.is_empty() {
        return o;
    }
    let _ = writeln!(
        o,
        "  top failure reasons (devices whose last attempt failed):"
    );
    for r in &s.failure_reasons {
        let _ = writeln!(o, "  {:>8}  {}", r.devices, r.reason);
    }
    o
}

/// A running build's progress from the server: phase, bytes processed of
/// the total, and time since it started, e.g.
/// `diffing 2.1 GiB / 6.0 GiB (35 %), 1m 3s`.
pub fn build_progress(p: &crate::releases::BuildProgress) -> String {
    let pct = if p.total_bytes > 0 {
        format!(
            " ({:.0} %)",
            100.0 * p.done_bytes as f64 / p.total_bytes as f64
        )
    } else {
        String::new()
    };
    format!(
        "{} {} / {}{pct}, {}",
        p.phase,
        indicatif::HumanBytes(p.done_bytes),
        indicatif::HumanBytes(p.total_bytes),
        humantime::format_duration(std::time::Duration::from_secs(p.elapsed_secs as u64))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_times_are_human() {
        let now = 1_800_000_000_000;
        assert_eq!(ago(now, 0), "never");
        assert_eq!(ago(now, now - 12_000), "12 s ago");
        assert_eq!(ago(now, now - 300_000), "5 min ago");
        assert_eq!(ago(now, now - 3 * 3_600_000), "3 h ago");
        assert_eq!(ago(now, now - 2 * 86_400_000), "2 d ago");
        assert_eq!(rfc3339(now), "2027-01-15T08:00:00Z");
        assert_eq!(when(now, now - 12_000), "2027-01-15T07:59:48Z (12 s ago)");
    }

    #[test]
    fn an_empty_inventory_says_what_to_do() {
        let p = DevicePage {
            devices: vec![],
            total: 0,
            next: None,
        };
        assert!(device_table(&p, 0).contains("ota-server device add"));
        assert!(rollout_list(&[]).contains("no rollouts yet"));
    }
}
