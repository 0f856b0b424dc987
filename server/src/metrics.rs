//! Prometheus metrics (`GET /metrics`, text format).
//!
//! Counters on the hot path are plain atomics inside `prometheus-client`
//! types; per-rollout figures are gauges refreshed by the periodic tick, so
//! a scrape never walks the fleet.

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
        registry.register("rollout", "Per-rollout, per-wave figures (what = eligible, admitted, downloading, installed, committed, failed, rolled_back, waiting, bytes_served)", m.rollout.clone());
        registry.register("devices", "Enrolled devices", m.devices.clone());
        Metrics { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }

    /// Refreshes the per-rollout gauges from a status.
    pub fn set_rollout(&self, st: &crate::rollout::RolloutStatus) {
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
