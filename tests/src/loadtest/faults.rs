//! Infrastructure faults at set times of a run: kill -9 of a replica (and
//! its return), a Redis restart that loses its data, a PostgreSQL restart;
//! and what the fleet looked like around each one.
//!
//! The driver runs beside the sampler, so a slow action (a replica's
//! start-up) never stops the sampling that judges it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Args;
use super::report::Sample;
use crate::cluster::Cluster;

/// What to break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// kill -9 and start again at once (--server-restart-at).
    RestartReplica(usize),
    /// kill -9, left down.
    KillReplica(usize),
    /// Start the killed replica again.
    ReplicaBack(usize),
    /// services.sh restart-redis: SHUTDOWN NOSAVE, start; data lost.
    RestartRedis,
    /// services.sh restart-postgres: pg_ctl restart -m fast.
    RestartPostgres,
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::RestartReplica(i) => format!("kill -9 of replica {i}, restarted at once"),
            Action::KillReplica(i) => format!("kill -9 of replica {i}"),
            Action::ReplicaBack(i) => format!("replica {i} started again"),
            Action::RestartRedis => "Redis restart (its data lost)".into(),
            Action::RestartPostgres => "PostgreSQL restart (fast mode)".into(),
        }
    }

    /// Whether it resets a throttle's start-rate bucket: a restart of a
    /// process that holds it (no Redis), or Redis losing its data.
    pub fn resets_throttle(&self, redis: bool) -> bool {
        match self {
            Action::RestartReplica(_) | Action::KillReplica(_) => !redis,
            Action::RestartRedis => true,
            Action::ReplicaBack(_) | Action::RestartPostgres => false,
        }
    }
}

/// One planned fault.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub at: Duration,
    pub action: Action,
}

/// The faults the options ask for, in time order, for `replicas`
/// processes (at least 1).
pub fn plan(a: &Args, replicas: usize) -> Vec<Planned> {
    let mut v = Vec::new();
    let victim = 1.min(replicas.saturating_sub(1));
    if !a.server_restart_at.is_zero() {
        v.push(Planned {
            at: a.server_restart_at,
            action: Action::RestartReplica(0),
        });
    }
    if !a.kill_replica_at.is_zero() {
        v.push(Planned {
            at: a.kill_replica_at,
            action: Action::KillReplica(victim),
        });
        v.push(Planned {
            at: a.kill_replica_at + a.replica_down_for,
            action: Action::ReplicaBack(victim),
        });
    }
    if !a.restart_redis_at.is_zero() {
        v.push(Planned {
            at: a.restart_redis_at,
            action: Action::RestartRedis,
        });
    }
    if !a.restart_postgres_at.is_zero() {
        v.push(Planned {
            at: a.restart_postgres_at,
            action: Action::RestartPostgres,
        });
    }
    v.sort_by_key(|p| p.at);
    v
}

/// A fault as it happened, and the run around it.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub what: String,
    #[serde(skip)]
    pub action: Option<Action>,
    /// Seconds into the run when it was done, and how long doing it took.
    pub at_secs: f64,
    pub took_secs: f64,
    pub error: Option<String>,
    /// Devices waiting / downloading (client side) when it happened.
    pub waiting_at: u64,
    pub downloading_at: u64,
    pub checkin_errors_10s_before: u64,
    pub checkins_10s_after: u64,
    pub checkin_errors_10s_after: u64,
    /// Most devices downloading at once (client side) and most server
    /// leases seen, in the 10 s after.
    pub max_downloading_10s_after: u64,
    pub max_server_leases_10s_after: u64,
    /// From the fault to the first download start after the action ended;
    /// None when no device started after it.
    pub admissions_resumed_after_secs: Option<f64>,
}

/// Runs the plan until done or `cancel`, each action at its time in a
/// blocking thread: a kill and the return of that replica in order, the
/// other faults independently (a slow Redis restart does not delay the
/// replica's return).
pub async fn drive(
    plan: Vec<Planned>,
    cluster: Arc<Cluster>,
    script: Option<PathBuf>,
    started: Instant,
    cancel: CancellationToken,
    log: Arc<Mutex<Vec<FaultRecord>>>,
    bar: indicatif::ProgressBar,
) {
    let mut chains: Vec<Vec<Planned>> = Vec::new();
    for p in plan {
        let replica = |a: Action| match a {
            Action::RestartReplica(i) | Action::KillReplica(i) | Action::ReplicaBack(i) => Some(i),
            Action::RestartRedis | Action::RestartPostgres => None,
        };
        match chains
            .iter_mut()
            .find(|c| replica(p.action).is_some() && replica(c[0].action) == replica(p.action))
        {
            Some(c) => c.push(p),
            None => chains.push(vec![p]),
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for chain in chains {
        tasks.spawn(drive_chain(
            chain,
            cluster.clone(),
            script.clone(),
            started,
            cancel.clone(),
            log.clone(),
            bar.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
    log.lock()
        .unwrap()
        .sort_by(|a, b| a.at_secs.total_cmp(&b.at_secs));
}

async fn drive_chain(
    chain: Vec<Planned>,
    cluster: Arc<Cluster>,
    script: Option<PathBuf>,
    started: Instant,
    cancel: CancellationToken,
    log: Arc<Mutex<Vec<FaultRecord>>>,
    bar: indicatif::ProgressBar,
) {
    for p in chain {
        let wait = p.at.saturating_sub(started.elapsed());
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let at = started.elapsed().as_secs_f64();
        bar.println(format!("fault at {at:.1} s: {}", p.action.describe()));
        let c = cluster.clone();
        let script = script.clone();
        let t = Instant::now();
        let r = tokio::task::spawn_blocking(move || do_action(p.action, &c, script.as_deref()))
            .await
            .map_err(|e| anyhow::anyhow!("the fault action panicked: {e}"))
            .and_then(|r| r);
        let took = t.elapsed().as_secs_f64();
        let error = r.err().map(|e| format!("{e:#}"));
        match &error {
            None => bar.println(format!("  done in {took:.2} s")),
            Some(e) => bar.println(format!("  FAILED after {took:.2} s: {e}")),
        }
        log.lock().unwrap().push(FaultRecord {
            what: p.action.describe(),
            action: Some(p.action),
            at_secs: at,
            took_secs: took,
            error,
            waiting_at: 0,
            downloading_at: 0,
            checkin_errors_10s_before: 0,
            checkins_10s_after: 0,
            checkin_errors_10s_after: 0,
            max_downloading_10s_after: 0,
            max_server_leases_10s_after: 0,
            admissions_resumed_after_secs: None,
        });
    }
}

fn do_action(a: Action, c: &Cluster, script: Option<&std::path::Path>) -> anyhow::Result<()> {
    let run = |what: &str| -> anyhow::Result<()> {
        let s = script.ok_or_else(|| {
            anyhow::anyhow!("--services-script (or OTA_SERVICES_SCRIPT) is needed to {what}")
        })?;
        crate::services::run_script(s, what)
    };
    match a {
        Action::RestartReplica(i) => c.restart(i),
        Action::KillReplica(i) => c.kill9(i),
        Action::ReplicaBack(i) => c.start_again(i),
        Action::RestartRedis => run("restart-redis"),
        Action::RestartPostgres => run("restart-postgres"),
    }
}

/// Fills in what the samples and download starts say around each fault.
pub fn annotate(records: &mut [FaultRecord], samples: &[Sample], starts_ms: &[u64]) {
    const WINDOW: f64 = 10.0;
    let before = |t: f64| samples.iter().rev().find(|s| s.t <= t).or(samples.first());
    let after = |t: f64| samples.iter().find(|s| s.t >= t).or(samples.last());
    for r in records {
        let (Some(at), Some(pre), Some(end)) = (
            before(r.at_secs),
            before(r.at_secs - WINDOW),
            after(r.at_secs + WINDOW),
        ) else {
            continue;
        };
        r.waiting_at = at.waiting;
        r.downloading_at = at.downloading;
        r.checkin_errors_10s_before = at.checkin_errors.saturating_sub(pre.checkin_errors);
        r.checkins_10s_after = end.checkins.saturating_sub(at.checkins);
        r.checkin_errors_10s_after = end.checkin_errors.saturating_sub(at.checkin_errors);
        let window = samples
            .iter()
            .filter(|s| s.t >= r.at_secs && s.t <= r.at_secs + WINDOW);
        let (mut d, mut l) = (0, 0);
        for s in window {
            d = d.max(s.downloading);
            l = l.max(s.server_leases);
        }
        r.max_downloading_10s_after = d;
        r.max_server_leases_10s_after = l;
        let from_ms = ((r.at_secs + r.took_secs) * 1000.0) as u64;
        r.admissions_resumed_after_secs = starts_ms
            .iter()
            .find(|&&s| s >= from_ms)
            .map(|&s| s as f64 / 1000.0 - r.at_secs);
    }
}

/// One line per fault for the terminal.
pub fn describe(r: &FaultRecord) -> String {
    let mut s = format!(
        "{:>6.1} s  {} (took {:.2} s)",
        r.at_secs, r.what, r.took_secs
    );
    if let Some(e) = &r.error {
        s += &format!(" FAILED: {e}");
        return s;
    }
    s += &format!(
        "; then {} waiting, {} downloading; 10 s after: {} check-in errors of {} check-ins ({} in the 10 s before), at most {} downloading (sampled) / {} server leases; ",
        r.waiting_at,
        r.downloading_at,
        r.checkin_errors_10s_after,
        r.checkins_10s_after,
        r.checkin_errors_10s_before,
        r.max_downloading_10s_after,
        r.max_server_leases_10s_after
    );
    s += &match r.admissions_resumed_after_secs {
        Some(t) => format!("admissions resumed {t:.1} s after"),
        None if r.waiting_at == 0 => "no admission after it (nobody was waiting)".into(),
        None => "NO admission after it".into(),
    };
    s
}
