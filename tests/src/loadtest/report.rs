//! The load test's report: figures, invariants, the terminal table, JSON and
//! an SVG chart of the rollout over time.

use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::Result;
use serde::Serialize;

use super::Args;
use super::faults::FaultRecord;
use super::proxy::ProxyStats;
use super::sim::Shared;

/// Devices per state at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub waiting: u64,
    pub downloading: u64,
    pub installed: u64,
    /// Downloaded and verified, waiting for a maintenance window.
    pub waiting_for_window: u64,
    pub committed: u64,
    pub failed: u64,
    pub rolled_back: u64,
    pub silent: u64,
    pub finished: u64,
    pub committed_per_wave: Vec<u64>,
    /// Cumulative check-ins and failed check-ins, download starts.
    pub checkins: u64,
    pub checkin_errors: u64,
    pub starts: u64,
    /// Active leases the server reported at its last poll.
    pub server_leases: u64,
}

pub struct Inputs<'a> {
    pub args: &'a Args,
    pub seed: u64,
    pub run_secs: f64,
    pub enroll_secs: f64,
    pub shared: &'a Shared,
    pub status: &'a ota_server::rollout::RolloutStatus,
    pub events_stored: u64,
    pub server_on_new_version: u64,
    pub not_on_new_version: Vec<String>,
    pub server_cpu_secs: f64,
    pub balancer_cpu_secs: f64,
    pub server_peak_rss: u64,
    pub image_size: u64,
    pub delta_size: u64,
    pub samples: Vec<Sample>,
    pub proxy: ProxyStats,
    pub max_server_leases: u64,
    pub lease_polls: u64,
    pub server_restarts: u64,
    /// Faults that refilled a start-rate bucket (see
    /// [`super::faults::Action::resets_throttle`]).
    pub throttle_resets: u64,
    pub replicas: usize,
    pub storage: &'static str,
    pub throttle: &'static str,
    pub faults: Vec<FaultRecord>,
}

/// Everything the run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub devices: usize,
    pub seed: u64,
    /// Server processes behind nginx (0: one, no balancer), their storage
    /// and throttle backends.
    pub replicas: usize,
    pub storage: String,
    pub throttle: String,
    pub faults: serde_json::Value,
    /// Infrastructure faults as they happened.
    pub fault_timeline: Vec<FaultRecord>,
    pub completion_secs: f64,
    pub enroll_secs: f64,
    pub max_concurrent_cap: u64,
    /// Most devices fetching at once (manifest or payload) with a live
    /// lease by their own clock, counted by the devices themselves.
    pub max_concurrent_observed_devices: u64,
    /// Most agents still counted at a download start whose lease had run
    /// out but whose task had not yet run to stop (the simulator's
    /// scheduling lag; a real device's timer is its own).
    pub max_lapsed_not_yet_stopped: u64,
    pub max_concurrent_observed_server_leases: u64,
    /// When the device-side maximum was first reached (s into the run).
    pub max_concurrent_observed_devices_at_secs: f64,
    /// How many of the devices at that maximum were DDI targets.
    pub max_concurrent_observed_ddi_targets: u64,
    /// Downloads the server stopped (`cancel`), and downloads devices
    /// stopped themselves because their lease could not be renewed in time.
    pub server_cancels: u64,
    pub lease_stops: u64,
    /// `--window-zones`: the zones, installs after waiting for a window,
    /// and installs outside the device's window (must be 0).
    pub window_zones: Vec<String>,
    pub installs_after_waiting_for_window: u64,
    pub switched_outside_window: u64,
    /// `--late-share`: devices that enrolled after the rollout started.
    pub late_enrolled: u64,
    pub server_lease_polls: u64,
    pub max_starts_per_min: f64,
    pub start_burst: f64,
    pub max_starts_in_any_minute: u64,
    pub start_rate_violations: u64,
    pub throttle_resets: u64,
    pub checkins: u64,
    pub checkin_errors: u64,
    pub checkin_p50_ms: f64,
    pub checkin_p99_ms: f64,
    pub checkin_max_ms: f64,
    /// Check-ins' waits for a harness request slot (not the server's time).
    pub queue_wait_p99_ms: f64,
    pub queue_wait_max_ms: f64,
    pub delta_payload_bytes: u64,
    pub image_bytes: u64,
    pub bytes_received: u64,
    pub bytes_full_image_equivalent: u64,
    pub bytes_served_by_server: u64,
    pub retries: u64,
    pub resumes: u64,
    pub bytes_redownloaded: u64,
    pub events_acked: u64,
    pub events_stored_by_server: u64,
    pub events_lost: u64,
    /// Stored beyond those acknowledged: only events given up at the
    /// deadline and DDI feedback whose answer was lost may be (stored,
    /// their answer lost); more is double counting.
    pub events_extra: u64,
    pub events_given_up: u64,
    pub ddi_feedback_unanswered: u64,
    pub wrong_images: u64,
    pub real_slots_verified: u64,
    pub operations_verified: u64,
    pub committed: u64,
    /// Of the devices, hawkBit DDI targets (`--ddi-share`), and how many
    /// of those committed (included in `committed`).
    pub ddi_targets: u64,
    pub ddi_committed: u64,
    /// Devices the rollout counts committed (fleet-wide, all replicas). A
    /// device whose lease expired (say, during an outage) before it
    /// reported may have committed without being counted here.
    pub server_committed: u64,
    /// Committed devices that, having checked in on 2.0 after the run, the
    /// server (any replica, through the balancer) knows to run 2.0.
    pub server_on_new_version: u64,
    /// A few of the others, with why.
    pub not_on_new_version: Vec<String>,
    pub rolled_back: u64,
    pub failed: u64,
    pub silent: u64,
    pub timed_out: u64,
    pub failure_rate: f64,
    pub rollout_state: String,
    pub rollout_reason: String,
    pub server_cpu_secs: f64,
    /// nginx (master and workers), with replicas.
    pub balancer_cpu_secs: f64,
    pub server_peak_rss_mib: f64,
    pub server_restarts: u64,
    pub proxy: ProxyStats,
    pub samples: Vec<Sample>,
}

/// Most starts within any window of `window_ms`, and how many windows broke
/// `rate × window + burst + slack`.
fn start_windows(starts: &[u64], window_ms: u64, per_min: f64, allowance: f64) -> (u64, u64) {
    let mut max = 0u64;
    let mut bad = 0u64;
    let mut j = 0;
    for i in 0..starts.len() {
        while j < starts.len() && starts[j] < starts[i] + window_ms {
            j += 1;
        }
        let n = (j - i) as u64;
        max = max.max(n);
        if n as f64 > per_min * window_ms as f64 / 60_000.0 + allowance {
            bad += 1;
        }
    }
    (max, bad)
}

pub fn build(i: Inputs<'_>) -> Report {
    let st = &i.shared.stats;
    let a = i.args;
    let mut starts = st.starts.lock().unwrap().clone();
    starts.sort_unstable();
    let burst = (a.max_starts_per_min / 60.0).floor().max(1.0);
    // Client-side timestamps lag the server's decisions by up to a request;
    // each reset of the throttle (restart of the process holding it, Redis
    // losing its data) refills one burst.
    let allowance = burst * (1 + i.throttle_resets) as f64 + 1.0;
    let (max_minute, bad60) = start_windows(&starts, 60_000, a.max_starts_per_min, allowance);
    let (_, bad10) = start_windows(&starts, 10_000, a.max_starts_per_min, allowance);
    let lat = st.latency();
    let qw = st.queue_wait();
    let q = |p: f64| lat.value_at_quantile(p) as f64 / 1000.0;
    let mut c = [0u64; 10];
    for s in &st.state {
        c[s.load(Ordering::Relaxed) as usize] += 1;
    }
    let acked = st.events_acked.load(Ordering::Relaxed);
    let finished = c[4] + c[5] + c[6];
    let updated = c[4] + c[6];
    Report {
        devices: a.devices,
        seed: i.seed,
        replicas: i.replicas,
        storage: i.storage.into(),
        throttle: i.throttle.into(),
        fault_timeline: i.faults,
        faults: serde_json::json!({
            "cut_rate": a.cut_rate, "corrupt_rate": a.corrupt_rate, "kill_rate": a.kill_rate,
            "silent_rate": a.silent_rate, "slow_rate": a.slow_rate, "slow_bps": a.slow_bps,
            "health_fail_rate": a.health_fail_rate, "real_slot_rate": a.real_slot_rate,
            "server_restart_at_secs": a.server_restart_at.as_secs_f64(),
            "kill_replica_at_secs": a.kill_replica_at.as_secs_f64(),
            "replica_down_for_secs": a.replica_down_for.as_secs_f64(),
            "restart_redis_at_secs": a.restart_redis_at.as_secs_f64(),
            "restart_postgres_at_secs": a.restart_postgres_at.as_secs_f64(),
        }),
        completion_secs: i.run_secs,
        enroll_secs: i.enroll_secs,
        max_concurrent_cap: a.max_concurrent,
        max_concurrent_observed_devices: st.max_downloading.load(Ordering::Relaxed),
        max_concurrent_observed_server_leases: i.max_server_leases,
        max_lapsed_not_yet_stopped: st.max_lapsed.load(Ordering::Relaxed),
        max_concurrent_observed_devices_at_secs: st.max_downloading_at_ms.load(Ordering::Relaxed)
            as f64
            / 1000.0,
        max_concurrent_observed_ddi_targets: st.max_downloading_ddi.load(Ordering::Relaxed),
        server_lease_polls: i.lease_polls,
        server_cancels: st.cancels.load(Ordering::Relaxed),
        lease_stops: st.lease_stops.load(Ordering::Relaxed),
        window_zones: a.window_zones.clone(),
        installs_after_waiting_for_window: st.installs_after_waiting.load(Ordering::Relaxed),
        switched_outside_window: st.switched_outside_window.load(Ordering::Relaxed),
        late_enrolled: st.late_enrolled.load(Ordering::Relaxed),
        max_starts_per_min: a.max_starts_per_min,
        start_burst: burst,
        max_starts_in_any_minute: max_minute,
        start_rate_violations: bad60 + bad10,
        throttle_resets: i.throttle_resets,
        checkins: st.checkins.load(Ordering::Relaxed),
        checkin_errors: st.checkin_errors.load(Ordering::Relaxed),
        checkin_p50_ms: q(0.5),
        checkin_p99_ms: q(0.99),
        checkin_max_ms: lat.max() as f64 / 1000.0,
        queue_wait_p99_ms: qw.value_at_quantile(0.99) as f64 / 1000.0,
        queue_wait_max_ms: qw.max() as f64 / 1000.0,
        delta_payload_bytes: i.delta_size,
        image_bytes: i.image_size,
        bytes_received: st.bytes_received.load(Ordering::Relaxed),
        bytes_full_image_equivalent: updated * i.image_size,
        bytes_served_by_server: i.status.totals().bytes_served,
        retries: st.retries.load(Ordering::Relaxed),
        resumes: st.resumes.load(Ordering::Relaxed),
        bytes_redownloaded: st.bytes_redownloaded.load(Ordering::Relaxed),
        events_acked: acked,
        events_stored_by_server: i.events_stored,
        events_lost: acked.saturating_sub(i.events_stored),
        events_extra: i.events_stored.saturating_sub(acked),
        events_given_up: st.events_given_up.load(Ordering::Relaxed),
        ddi_feedback_unanswered: st.ddi_feedback_unanswered.load(Ordering::Relaxed),
        wrong_images: st.wrong_images.load(Ordering::Relaxed),
        real_slots_verified: st.real_slots_verified.load(Ordering::Relaxed),
        operations_verified: st.ops_verified.load(Ordering::Relaxed),
        committed: c[4],
        ddi_targets: i.shared.is_ddi.iter().filter(|d| **d).count() as u64,
        ddi_committed: st
            .state
            .iter()
            .zip(&i.shared.is_ddi)
            .filter(|(s, d)| {
                **d && s.load(Ordering::Relaxed) == super::sim::DevState::Committed as u8
            })
            .count() as u64,
        server_committed: i.status.totals().committed,
        server_on_new_version: i.server_on_new_version,
        not_on_new_version: i.not_on_new_version,
        rolled_back: c[6],
        failed: c[5],
        silent: c[7],
        timed_out: c[8] + c[0] + c[1] + c[2] + c[3],
        failure_rate: if finished == 0 {
            0.0
        } else {
            (c[5] + c[6]) as f64 / finished as f64
        },
        rollout_state: format!("{:?}", i.status.state),
        rollout_reason: i.status.reason.clone(),
        server_cpu_secs: i.server_cpu_secs,
        balancer_cpu_secs: i.balancer_cpu_secs,
        server_peak_rss_mib: i.server_peak_rss as f64 / (1 << 20) as f64,
        server_restarts: i.server_restarts,
        proxy: i.proxy,
        samples: i.samples,
    }
}

impl Report {
    /// The invariants; each violation as a sentence.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.switched_outside_window > 0 {
            v.push(format!(
                "{} devices were told to install outside their maintenance window",
                self.switched_outside_window
            ));
        }
        if self.max_concurrent_observed_devices > self.max_concurrent_cap {
            v.push(format!(
                "{} devices downloaded at once; the cap is {}",
                self.max_concurrent_observed_devices, self.max_concurrent_cap
            ));
        }
        if self.max_concurrent_observed_server_leases > self.max_concurrent_cap {
            v.push(format!(
                "the server held {} leases; the cap is {}",
                self.max_concurrent_observed_server_leases, self.max_concurrent_cap
            ));
        }
        if self.start_rate_violations > 0 {
            v.push(format!(
                "{} windows exceeded the start rate ({} per minute, burst {})",
                self.start_rate_violations, self.max_starts_per_min, self.start_burst
            ));
        }
        if self.events_lost > 0 {
            v.push(format!(
                "{} acknowledged events are missing on the server",
                self.events_lost
            ));
        }
        if self.events_extra > self.events_given_up + self.ddi_feedback_unanswered {
            v.push(format!(
                "the server stored {} events more than the devices had acknowledged (only {} were given up unacknowledged, {} DDI feedback events unanswered): double counted",
                self.events_extra, self.events_given_up, self.ddi_feedback_unanswered
            ));
        }
        if self.server_on_new_version != self.committed {
            v.push(format!(
                "{} devices committed but the server knows only {} on the new version (e.g. {:?})",
                self.committed, self.server_on_new_version, self.not_on_new_version
            ));
        }
        if self.timed_out > 0 {
            v.push(format!(
                "{} devices never finished (the deadline stopped them)",
                self.timed_out
            ));
        }
        for f in &self.fault_timeline {
            if let Some(e) = &f.error {
                v.push(format!(
                    "fault at {:.1} s ({}) failed: {e}",
                    f.at_secs, f.what
                ));
            }
        }
        if self.wrong_images > 0 {
            v.push(format!(
                "{} devices ended on a wrong image",
                self.wrong_images
            ));
        }
        v
    }

    pub fn invariants_hold(&self) -> bool {
        self.violations().is_empty()
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut rows: Vec<(&str, String)> = vec![
            ("devices", format!("{} (seed {})", self.devices, self.seed)),
            (
                "servers",
                if self.replicas == 0 {
                    format!("one process, {} storage, no balancer", self.storage)
                } else {
                    format!(
                        "{} replica(s) behind nginx, {} storage, {} throttle",
                        self.replicas, self.storage, self.throttle
                    )
                },
            ),
            (
                "completion",
                format!(
                    "{:.1} s (enrollment {:.1} s before)",
                    self.completion_secs, self.enroll_secs
                ),
            ),
            (
                "outcome",
                format!(
                    "{} committed{} ({} counted by the rollout, {} known on 2.0 by the server), {} rolled back, {} failed, {} silent, {} unfinished",
                    self.committed,
                    if self.ddi_targets > 0 {
                        format!(
                            " ({} of {} hawkBit DDI targets)",
                            self.ddi_committed, self.ddi_targets
                        )
                    } else {
                        String::new()
                    },
                    self.server_committed,
                    self.server_on_new_version,
                    self.rolled_back,
                    self.failed,
                    self.silent,
                    self.timed_out
                ),
            ),
            (
                "rollout",
                format!("{} — {}", self.rollout_state, self.rollout_reason),
            ),
            (
                "max concurrent downloads",
                format!(
                    "{} devices (fleet-wide, device side, live leases; {} DDI targets, at {:.0} s; at most {} more lapsed, not yet stopped) / {} server leases ({} polls), cap {}",
                    self.max_concurrent_observed_devices,
                    self.max_concurrent_observed_ddi_targets,
                    self.max_concurrent_observed_devices_at_secs,
                    self.max_lapsed_not_yet_stopped,
                    self.max_concurrent_observed_server_leases,
                    self.server_lease_polls,
                    self.max_concurrent_cap
                ),
            ),
            (
                "max starts in a minute",
                format!(
                    "{} (rate {}/min, burst {}; {} windows over the limit, {} throttle resets allowed for)",
                    self.max_starts_in_any_minute,
                    self.max_starts_per_min,
                    self.start_burst,
                    self.start_rate_violations,
                    self.throttle_resets
                ),
            ),
            (
                "check-ins",
                format!(
                    "{} ({} errors), p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; \
                     queued in the harness for a request slot p99 {:.0} ms, max {:.0} ms",
                    self.checkins,
                    self.checkin_errors,
                    self.checkin_p50_ms,
                    self.checkin_p99_ms,
                    self.checkin_max_ms,
                    self.queue_wait_p99_ms,
                    self.queue_wait_max_ms
                ),
            ),
            (
                "bytes",
                format!(
                    "{:.1} MiB received vs {:.1} MiB of full images ({:.2}%); delta {} B of a {} B image",
                    mib(self.bytes_received),
                    mib(self.bytes_full_image_equivalent),
                    100.0 * self.bytes_received as f64
                        / self.bytes_full_image_equivalent.max(1) as f64,
                    self.delta_payload_bytes,
                    self.image_bytes
                ),
            ),
            (
                "resumes",
                format!(
                    "{} (kill -9 of the device), {} bytes fetched again; {} range retries",
                    self.resumes, self.bytes_redownloaded, self.retries
                ),
            ),
            (
                "events",
                format!(
                    "{} acknowledged, {} stored by the server, {} lost, {} extra, {} given up at the deadline, \
                     {} of DDI feedback unanswered (maybe stored)",
                    self.events_acked,
                    self.events_stored_by_server,
                    self.events_lost,
                    self.events_extra,
                    self.events_given_up,
                    self.ddi_feedback_unanswered
                ),
            ),
            (
                "images",
                format!(
                    "{} wrong; {} real slot files verified; {} operations verified",
                    self.wrong_images, self.real_slots_verified, self.operations_verified
                ),
            ),
            ("failure rate", format!("{:.3}%", 100.0 * self.failure_rate)),
            (
                "fault proxy",
                format!(
                    "{} connections, {} cut, {} corrupted",
                    self.proxy.connections, self.proxy.cut, self.proxy.corrupted
                ),
            ),
            (
                "server",
                format!(
                    "{:.1} CPU-s (all replicas; nginx {:.1}), peak RSS {:.1} MiB (largest replica), {} kill -9",
                    self.server_cpu_secs,
                    self.balancer_cpu_secs,
                    self.server_peak_rss_mib,
                    self.server_restarts
                ),
            ),
        ];
        if !self.window_zones.is_empty() {
            rows.push((
                "maintenance windows",
                format!(
                    "one `local` window, zones {}: {} installs after waiting for their window, {} outside it",
                    self.window_zones.join(", "),
                    self.installs_after_waiting_for_window,
                    self.switched_outside_window
                ),
            ));
        }
        if self.late_enrolled > 0 {
            rows.push((
                "late enrollment",
                format!(
                    "{} devices enrolled while the rollout ran",
                    self.late_enrolled
                ),
            ));
        }
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut s = String::new();
        for (k, v) in rows {
            s += &format!("  {k:<w$}  {v}\n");
        }
        if !self.fault_timeline.is_empty() {
            s += "  faults:\n";
            for f in &self.fault_timeline {
                s += &format!("    {}\n", super::faults::describe(f));
            }
        }
        s
    }

    /// Writes report.json and chart.svg into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        chart(&self.samples, &dir.join("chart.svg"))?;
        Ok(())
    }
}

/// The rollout over time: devices per state, and committed per wave.
fn chart(samples: &[Sample], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let tmax = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let ymax = samples
        .iter()
        .map(|s| {
            s.waiting
                + s.downloading
                + s.waiting_for_window
                + s.installed
                + s.committed
                + s.failed
                + s.rolled_back
                + s.silent
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("rollout over time (devices per state)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..tmax, 0u64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("devices")
        .draw()?;
    type Get = fn(&Sample) -> u64;
    let series: [(&str, RGBColor, Get); 8] = [
        ("waiting", RGBColor(150, 150, 150), |s| s.waiting),
        ("downloading", BLUE, |s| s.downloading),
        ("server leases", RGBColor(0, 0, 90), |s| s.server_leases),
        ("waiting for window", RGBColor(230, 160, 0), |s| {
            s.waiting_for_window
        }),
        ("installed", CYAN, |s| s.installed),
        ("committed", RGBColor(0, 150, 0), |s| s.committed),
        ("failed", RED, |s| s.failed),
        ("rolled back", MAGENTA, |s| s.rolled_back),
    ];
    for (name, color, get) in series {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t, get(s))),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    let waves = samples.first().map_or(0, |s| s.committed_per_wave.len());
    for w in 0..waves {
        let shade = RGBColor(0, 90 + (120 * w / waves.max(1)) as u8, 0);
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(move |s| (s.t, s.committed_per_wave[w])),
                shade.stroke_width(1),
            ))?
            .label(format!("committed, wave {}", w + 1))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], shade));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_windows_count_the_busiest_window() {
        let s = [0, 100, 200, 30_000, 60_050, 60_100];
        assert_eq!(start_windows(&s, 60_000, 3.0, 0.0), (4, 3));
        assert_eq!(start_windows(&s, 60_000, 3.0, 1.0).1, 0);
    }
}
