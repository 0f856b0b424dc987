//! Prometheus metrics (`GET /metrics`).
//!
//! Counters on the hot path are plain atomics inside `prometheus-client`
//! types; per-rollout figures are gauges refreshed by the periodic tick, so
//! a scrape never walks the fleet.
//!
//! Two expositions, chosen by the scraper's `Accept` header
//! ([`Format::negotiate`]): the Prometheus text format 0.0.4 (the default,
//! what `promtool`, node-exporter-style tooling and most other consumers
//! read) and OpenMetrics 1.0 (when asked for `application/openmetrics-text`,
//! as Prometheus itself does). They differ in how a counter is declared:
//! OpenMetrics names the family `x` and its sample `x_total`, 0.0.4 names
//! both `x_total` — [`Metrics::encode`] writes each format's own way.
//!
//! The per-rollout series an operator alerts on (see
//! `deploy/prometheus/alerts.yml`): `ota_rollout_state` (one series per
//! state, 1 for the current one; `reason` says why a rollout is paused or
//! stopped: `failure_threshold` or `operator`), `ota_rollout_failure_ratio`
//! against `ota_rollout_failure_threshold`, `ota_rollout_leases` against
//! `ota_rollout_max_concurrent`, and
//! `ota_rollout_last_progress_timestamp_seconds` for stalled rollouts.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabel {
    pub rollout: String,
    pub wave: String,
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutIdLabel {
    pub rollout: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutStateLabel {
    pub rollout: String,
    pub state: &'static str,
    /// Why the rollout is in this state: `failure_threshold` (it stopped
    /// itself), `operator`, or empty for `active` and `complete`.
    pub reason: &'static str,
}

/// The connection-hygiene figures of the listener ([`crate::listener`]).
#[derive(Clone, Default)]
pub struct ConnMetrics {
    pub open: Gauge,
    pub refused: Family<ReasonLabel, Counter>,
    pub closed: Family<ReasonLabel, Counter>,
}

impl ConnMetrics {
    /// Counts an open connection until the guard is dropped.
    pub fn open(&self) -> OpenConnection {
        self.open.inc();
        OpenConnection(self.open.clone())
    }
    /// A connection refused at accept (`max_connections`, ...).
    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
    /// A connection closed by a deadline (`header_timeout`, ...).
    pub fn closed(&self, reason: &str) {
        self.closed
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
}

/// One open connection in `ota_connections_open` (decremented on drop).
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What was last exported for a rollout: its state series (to drop stale
/// ones), its progress figure and when (Unix seconds) that last changed.
type Seen = (Vec<RolloutStateLabel>, u64, i64);

/// Per-rollout series.
#[derive(Default)]
struct RolloutSeries {
    state: Family<RolloutStateLabel, Gauge>,
    failure_ratio: Family<RolloutIdLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    failure_threshold: Family<RolloutIdLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    leases: Family<RolloutIdLabel, Gauge>,
    max_concurrent: Family<RolloutIdLabel, Gauge>,
    queued: Family<RolloutIdLabel, Gauge>,
    last_progress: Family<RolloutIdLabel, Gauge>,
    /// Per rollout: the state series last exported (to drop stale ones)
    /// and the progress figure with the time it last changed.
    seen: Mutex<HashMap<String, Seen>>,
}

/// Which exposition a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text004,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of this exposition.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Picks the format from an `Accept` header: OpenMetrics when the
    /// client prefers `application/openmetrics-text` (by `q`) to
    /// `text/plain` and wildcards; the 0.0.4 text otherwise, also without
    /// a header or when nothing listed is supported (a scraper that can
    /// read neither cannot be helped by a 406).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text004;
        };
        let (mut om, mut text) = (0.0f64, 0.0f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0;
            let mut version = None;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    let v = v.trim().trim_matches('"');
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.parse().unwrap_or(0.0),
                        "version" => version = Some(v.to_string()),
                        _ => {}
                    }
                }
            }
            match media.as_str() {
                "application/openmetrics-text"
                    if version
                        .as_deref()
                        .is_none_or(|v| v == "1.0.0" || v == "0.0.1") =>
                {
                    om = om.max(q)
                }
                "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => {
                    text = text.max(q)
                }
                "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om > text {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub checkins: Family<ActionLabel, Counter>,
    pub throttled: Family<ReasonLabel, Counter>,
    pub admissions: Counter,
    pub lease_expiries: Counter,
    pub active_leases: Gauge,
    pub bytes_served: Counter,
    pub events: Family<KindLabel, Counter>,
    pub events_duplicate: Counter,
    pub enrollments: Counter,
    /// Requests refused with 503 because PostgreSQL or Redis could not be
    /// reached (logged at most once a second, so this is the exact count).
    pub backend_unavailable: Counter,
    pub rollout: Family<RolloutLabel, Gauge>,
    pub devices: Gauge,
    pub connections: ConnMetrics,
    rollouts: RolloutSeries,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ota");
        let m = Metrics {
            checkins: Family::default(),
            throttled: Family::default(),
            admissions: Counter::default(),
            lease_expiries: Counter::default(),
            active_leases: Gauge::default(),
            bytes_served: Counter::default(),
            events: Family::default(),
            events_duplicate: Counter::default(),
            enrollments: Counter::default(),
            backend_unavailable: Counter::default(),
            rollout: Family::default(),
            devices: Gauge::default(),
            connections: ConnMetrics::default(),
            rollouts: RolloutSeries::default(),
            registry: Registry::default(),
        };
        registry.register(
            "checkins",
            "Check-ins answered, by action",
            m.checkins.clone(),
        );
        registry.register(
            "throttled",
            "Check-ins answered wait, by reason",
            m.throttled.clone(),
        );
        registry.register(
            "admissions",
            "Downloads admitted (leases granted)",
            m.admissions.clone(),
        );
        registry.register(
            "lease_expiries",
            "Download leases that expired",
            m.lease_expiries.clone(),
        );
        registry.register(
            "active_leases",
            "Download leases held now, all rollouts",
            m.active_leases.clone(),
        );
        registry.register(
            "bytes_served",
            "Artifact bytes sent",
            m.bytes_served.clone(),
        );
        registry.register("events", "Device events counted, by kind", m.events.clone());
        registry.register(
            "events_duplicate",
            "Device events received again and ignored",
            m.events_duplicate.clone(),
        );
        registry.register(
            "enrollments",
            "Devices enrolled or re-enrolled",
            m.enrollments.clone(),
        );
        registry.register(
            "backend_unavailable",
            "Requests answered 503 because PostgreSQL or Redis could not be reached",
            m.backend_unavailable.clone(),
        );
        registry.register("rollout", "Per-rollout, per-wave figures (what = eligible, admitted, downloading, installed, committed, failed, rolled_back, waiting, waiting_for_window, bytes_served)", m.rollout.clone());
        registry.register("devices", "Enrolled devices", m.devices.clone());
        registry.register(
            "connections_open",
            "HTTP connections open now",
            m.connections.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept because a connection limit was reached, by limit",
            m.connections.refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed by a deadline (header_timeout, first_request_timeout, handshake_timeout, idle_timeout, body_timeout)",
            m.connections.closed.clone(),
        );
        let r = &m.rollouts;
        registry.register(
            "rollout_state",
            "Rollout state: 1 for the current state (active, paused, aborted, complete), 0 for the others; reason = failure_threshold or operator",
            r.state.clone(),
        );
        registry.register(
            "rollout_failure_ratio",
            "Failed and rolled-back outcomes over all outcomes of the rollout so far",
            r.failure_ratio.clone(),
        );
        registry.register(
            "rollout_failure_threshold",
            "Failure ratio at which the rollout stops itself (its spec)",
            r.failure_threshold.clone(),
        );
        registry.register(
            "rollout_leases",
            "Download leases the rollout holds now",
            r.leases.clone(),
        );
        registry.register(
            "rollout_max_concurrent",
            "The rollout's cap on concurrent downloads (its spec)",
            r.max_concurrent.clone(),
        );
        registry.register(
            "rollout_queued",
            "Devices waiting in the rollout's queue",
            r.queued.clone(),
        );
        registry.register(
            "rollout_last_progress_timestamp_seconds",
            "When a device of the rollout last finished (committed, failed or rolled back) as seen by this replica, Unix seconds",
            r.last_progress.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The exposition in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        match format {
            Format::OpenMetrics => s,
            Format::Text004 => openmetrics_to_text004(&s),
        }
    }

    /// Refreshes the per-rollout gauges from a status.
    pub fn set_rollout(&self, st: &crate::rollout::RolloutStatus) {
        use crate::rollout::RolloutState;
        let r = &self.rollouts;
        let id = RolloutIdLabel {
            rollout: st.id.clone(),
        };
        let current = match st.state {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "complete",
        };
        // A rollout that stopped itself says so in its reason
        // (`failure_verdict`); any other pause or abort is an operator's.
        let reason = match st.state {
            RolloutState::Active | RolloutState::Completed => "",
            _ if st.reason.starts_with("failure rate") => "failure_threshold",
            _ => "operator",
        };
        let t = st.totals();
        let bad = t.failed + t.rolled_back;
        let outcomes = bad + t.committed;
        let progress = outcomes + t.installed;
        let now_s = (crate::now_ms() / 1000) as i64;
        let labels: Vec<RolloutStateLabel> = ["active", "paused", "aborted", "complete"]
            .into_iter()
            .map(|state| RolloutStateLabel {
                rollout: st.id.clone(),
                state,
                reason: if state == current { reason } else { "" },
            })
            .collect();
        let (stale, last_at) = {
            let mut seen = self.rollouts.seen.lock().unwrap();
            let e = seen
                .entry(st.id.clone())
                .or_insert_with(|| (Vec::new(), progress, now_s));
            if e.1 != progress {
                e.1 = progress;
                e.2 = now_s;
            }
            let stale = std::mem::replace(&mut e.0, labels.clone());
            (stale, e.2)
        };
        for old in stale.iter().filter(|l| !labels.contains(l)) {
            r.state.remove(old);
        }
        for l in &labels {
            r.state.get_or_create(l).set(i64::from(l.state == current));
        }
        r.failure_ratio.get_or_create(&id).set(if outcomes == 0 {
            0.0
        } else {
            bad as f64 / outcomes as f64
        });
        r.failure_threshold
            .get_or_create(&id)
            .set(st.spec.failure_threshold);
        r.leases.get_or_create(&id).set(st.active_leases as i64);
        r.max_concurrent
            .get_or_create(&id)
            .set(st.spec.max_concurrent as i64);
        r.queued.get_or_create(&id).set(st.queued as i64);
        r.last_progress.get_or_create(&id).set(last_at);
        for w in &st.waves {
            let wave = w.wave.to_string();
            for (what, v) in [
                ("eligible", w.eligible),
                ("admitted", w.admitted),
                ("downloading", w.downloading),
                ("installed", w.installed),
                ("committed", w.committed),
                ("failed", w.failed),
                ("rolled_back", w.rolled_back),
                ("waiting", w.waiting),
                ("waiting_for_window", w.waiting_for_window),
                ("bytes_served", w.bytes_served),
            ] {
                self.rollout
                    .get_or_create(&RolloutLabel {
                        rollout: st.id.clone(),
                        wave: wave.clone(),
                        what,
                    })
                    .set(v as i64);
            }
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics exposition as Prometheus text
/// 0.0.4: a counter family `x` (samples `x_total`) is declared as `x_total`
/// in `# HELP` and `# TYPE`, `# UNIT` and `# EOF` go, everything else (sample
/// lines, gauges, label escaping) is the same in both formats for the types
/// this server exports (counters and gauges).
fn openmetrics_to_text004(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_picks_the_format() {
        use Format::*;
        assert_eq!(Format::negotiate(None), Text004);
        assert_eq!(Format::negotiate(Some("text/plain;version=0.0.4")), Text004);
        assert_eq!(Format::negotiate(Some("*/*")), Text004);
        assert_eq!(Format::negotiate(Some("application/json")), Text004);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            OpenMetrics
        );
        // What Prometheus 2.x/3.x sends.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;q=0.2, text/plain;version=0.0.4"
            )),
            Text004
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Text004
        );
    }

    /// Regression: counters were declared `# TYPE ota_checkins counter`
    /// with samples `ota_checkins_total`, which 0.0.4 readers see as an
    /// untyped sample without help.
    #[test]
    fn text004_declares_counters_by_their_sample_name() {
        let m = Metrics::new();
        m.admissions.inc();
        let t = m.encode(Format::Text004);
        assert!(
            t.contains("# HELP ota_admissions_total Downloads admitted"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE ota_admissions_total counter\nota_admissions_total 1\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE ota_devices gauge\n"), "{t}");
        assert!(!t.contains("# EOF"), "{t}");
        let om = m.encode(Format::OpenMetrics);
        assert!(
            om.contains("# TYPE ota_admissions counter\nota_admissions_total 1\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
