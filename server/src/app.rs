//! Wiring: open the state, start the background tasks, serve HTTP, and shut
//! everything down in order on SIGTERM.
//!
//! Shutdown is explicit: one `CancellationToken` reaches the HTTP server
//! (graceful: in-flight requests finish), the tick, the builder and the
//! flusher; a `TaskTracker` waits for all of them; the flusher's last act
//! is a final flush, so nothing acknowledged is lost.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::artifacts::{ArtifactStore, EgressLimiter};
use crate::backend::{Backend, LocalState};
use crate::config::{ServerConfig, StorageBackend, ThrottleBackend};
use crate::fleet::Fleet;
use crate::listener::{Listener, PlainAcceptor, RustlsAcceptor};
use crate::metrics::Metrics;
use crate::releases::{BuildSettings, ReleaseDb, Releases};
use crate::rollout::Rollouts;
use crate::rollout::shared::{FleetThrottle, LocalFleetThrottle};
use crate::store::{Store, StoreError};

/// Everything a request handler can reach.
pub struct App {
    pub config: ServerConfig,
    /// Devices and rollouts (sled or PostgreSQL).
    pub state: Backend,
    /// The sled backend's concrete state (tests inspect its throttles).
    pub local: Option<Arc<LocalState>>,
    pub replica_id: String,
    pub releases: Arc<Releases>,
    pub artifacts: ArtifactStore,
    pub egress: Option<Arc<EgressLimiter>>,
    pub metrics: Metrics,
    pub bytes_served: Arc<AtomicU64>,
    /// Rate limit for the "backend unavailable" WARN (one per second).
    pub unavailable_log: LogGate,
    /// The keys manifests and freshness statements are signed with.
    pub signers: crate::signing::SignerSlot,
    /// The signed freshness statements check-in answers carry.
    pub freshness: crate::freshness::FreshnessService,
    /// The reloadable configuration (`SIGHUP`, `POST /api/v1/admin/reload`):
    /// read settings that a reload may change from here, once per request;
    /// `config` is the configuration the server started with.
    pub live: crate::reload::Live,
    /// The fleet CA that signs devices' CSRs (`[tls] client_ca_key`).
    pub device_ca: crate::certs::SharedCa,
    /// The dashboard's sign-in sessions (in memory: [`crate::ui`]).
    pub ui_sessions: crate::ui::Sessions,
    /// The dashboard's shared rollouts list ([`crate::admin::rollout_list`]).
    pub rollout_list_cache: crate::admin::RolloutListCache,
    admin_hash: [u8; 32],
    tmp: PathBuf,
}

/// Lets a repeated log line through at most once per period and counts what
/// it held back, so an outage is reported once a second with a count rather
/// than once per refused request.
///
/// Lock-free: called on every refused request, from every worker thread.
pub struct LogGate {
    start: Instant,
    period_ms: u64,
    /// Milliseconds after `start` of the last line let through, plus one
    /// (0 = never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    pub fn new(period: Duration) -> LogGate {
        LogGate {
            start: Instant::now(),
            period_ms: period.as_millis().max(1) as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the caller may log now (`n` lines were held back since
    /// the last one), `None` when it must not.
    pub fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= self.period_ms)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Constant-time equality of two digests.
fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Constant-time equality for secrets (compares hashes, so lengths leak
/// nothing either).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    digest_eq(&Sha256::digest(a), &Sha256::digest(b))
}

impl App {
    pub fn is_admin(&self, token: &str) -> bool {
        digest_eq(&Sha256::digest(token.as_bytes()), &self.admin_hash)
    }

    pub fn tmp_dir(&self) -> &std::path::Path {
        &self.tmp
    }

    /// The sled backend's state (panics on PostgreSQL: tests only).
    pub fn local(&self) -> &LocalState {
        self.local.as_deref().expect("the sled backend")
    }

    /// Enrolls (or re-enrolls) a device and updates rollout eligibility.
    pub async fn enroll(
        &self,
        id: &str,
        device_type: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<String, StoreError> {
        let (token, new) = self.state.enroll(id, device_type, tags).await?;
        self.metrics.enrollments.inc();
        if new {
            self.metrics.devices.inc();
        }
        info!(device = id, device_type, new, "device enrolled");
        Ok(token)
    }
}

/// A running server (tests and `serve`).
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub app: Arc<App>,
    /// The listener's connection limits: send a new `[connections]` here
    /// (a reload) and new connections get it.
    pub connection_limits: tokio::sync::watch::Sender<Arc<crate::config::ConnectionsConfig>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    flusher_stop: CancellationToken,
    flusher: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops everything and waits for the tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.wait().await;
    }

    /// Waits until the server stops (after its token is cancelled), then
    /// stops the flusher last, so every write made by a finishing request is
    /// flushed.
    pub async fn wait(self) {
        self.tracker.close();
        self.tracker.wait().await;
        self.flusher_stop.cancel();
        if let Some(f) = self.flusher {
            let _ = f.await;
        }
    }
}

/// Opens the state in the configured data directory and starts serving.
pub async fn start(config: ServerConfig, cancel: CancellationToken) -> Result<Running> {
    let data = &config.data_dir;
    let replica_id = config.replica_id();
    let shared = config.storage.backend == StorageBackend::Postgres;
    // With a shared data directory each replica has its own tmp/, on the
    // same filesystem as artifacts/ (atomic renames), which only it empties.
    let tmp = if shared {
        data.join("tmp").join(&replica_id)
    } else {
        data.join("tmp")
    };
    for sub in ["images", "artifacts"] {
        std::fs::create_dir_all(data.join(sub))
            .with_context(|| format!("creating {}", data.join(sub).display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // Half-written uploads and builds of an earlier run.
    for e in std::fs::read_dir(&tmp)? {
        let p = e?.path();
        if p.is_file() {
            let _ = std::fs::remove_file(p);
        }
    }
    let (key_file, token) = (config.signing_key.clone(), config.signing.clone());
    let signers: crate::signing::SignerSlot = Arc::new(arc_swap::ArcSwap::from_pointee(
        tokio::task::spawn_blocking(move || {
            crate::signing::Signers::open(key_file.as_deref(), token.as_ref())
        })
        .await
        .context("opening the signing keys")??,
    ));
    let images = ArtifactStore::open(data.join("images")).context("opening images/")?;
    let artifacts = ArtifactStore::open(data.join("artifacts")).context("opening artifacts/")?;
    let (store, pool) = match config.storage.backend {
        StorageBackend::Sled => {
            std::fs::create_dir_all(data.join("db"))?;
            // Blocking: sled reads its log, and may wait for the lock of a
            // database this process closed a moment ago.
            let dir = data.join("db");
            let store = tokio::task::spawn_blocking(move || Store::open(&dir))
                .await
                .context("opening the state database")?
                .context("opening the state database")?;
            (Some(store), None)
        }
        StorageBackend::Postgres => {
            let pool = crate::pg::connect(&config.storage.url, config.storage.pool_size)
                .await
                .context("opening the PostgreSQL state database (storage.url)")?;
            (None, Some(pool))
        }
    };
    let release_db = match (&store, &pool) {
        (Some(s), _) => ReleaseDb::Sled(s.clone()),
        (None, Some(p)) => ReleaseDb::Postgres(p.clone()),
        (None, None) => unreachable!("one backend is always opened"),
    };
    let (releases, jobs) = Releases::load(
        release_db,
        images,
        artifacts.clone(),
        tmp.clone(),
        BuildSettings {
            delta_history: config.delta_history,
            chunk_size: config.chunk_size,
            zstd_level: config.zstd_level,
            full_zstd_level: config.full_zstd_level,
            delta_xz: config.delta_xz,
            delta_zero_runs: config.delta_zero_runs,
            delta_arm64: config.delta_arm64,
            delta_frames: config.delta_frames,
            expiry_days: config.manifest_expiry_days,
            // Every core, at a low priority: check-ins take what they need
            // and builds the rest (half the cores left one idle on 2).
            threads: config.build_threads,
            nice: config.build_nice,
        },
        signers.clone(),
    )
    .await?;
    let releases = Arc::new(releases);
    let pacing: crate::rollout::SharedPacing = Arc::new(arc_swap::ArcSwap::from_pointee(
        crate::reload::pacing_of(&config),
    ));
    let (state, local): (Backend, Option<Arc<LocalState>>) = match (&store, pool) {
        (Some(store), _) => {
            let fleet = Fleet::load(store.clone())?;
            let rollouts = Rollouts::load(store.clone(), releases.clone(), pacing.clone(), &fleet)?;
            let local = Arc::new(LocalState {
                store: store.clone(),
                fleet,
                rollouts,
            });
            (local.clone(), Some(local))
        }
        (None, Some(pool)) => {
            let throttle: Arc<dyn FleetThrottle> = match config.throttle.backend {
                ThrottleBackend::Local => Arc::new(LocalFleetThrottle::new()),
                ThrottleBackend::Redis => Arc::new(
                    crate::rollout::redis_throttle::connect(
                        &config.throttle.url,
                        &config.throttle.key_prefix,
                    )
                    .await
                    .context("connecting to Redis (throttle.url)")?,
                ),
            };
            let pg =
                crate::pg::PgState::open(pool, throttle, releases.clone(), pacing.clone()).await?;
            (Arc::new(pg), None)
        }
        (None, None) => unreachable!("one backend is always opened"),
    };
    let device_ca = match &config.tls {
        Some(t) => match (&t.client_ca, &t.client_ca_key) {
            (Some(cert), Some(key)) => Some(Arc::new(crate::certs::DeviceCa::load(
                cert,
                key,
                t.client_cert_days,
            )?)),
            _ => None,
        },
        None => None,
    };
    let egress = std::num::NonZeroU64::new(config.egress_bytes_per_sec)
        .map(|bps| Arc::new(EgressLimiter::new(bps)));
    let listen: std::net::SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen = {:?} is not an address:port", config.listen))?;
    let listener =
        crate::listener::bind(listen).with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics = Metrics::new();
    let devices = state.device_count().await?;
    metrics.devices.set(devices as i64);
    // The certificate is loaded before the server announces itself, so a
    // bad pair fails the start, like a bad file fails a reload.
    let cert = match &config.tls {
        Some(tls) => Some(Arc::new(crate::reload::LiveCert::new(
            crate::reload::load_certified_key(tls)?,
        ))),
        None => None,
    };
    if let Some(level) = &config.log_level {
        crate::reload::apply_log_level(level).map_err(anyhow::Error::msg)?;
    }
    let live = crate::reload::Live::new(config.clone(), pacing, cert, signers.clone());
    let app = Arc::new(App {
        ui_sessions: Default::default(),
        rollout_list_cache: Default::default(),
        admin_hash: Sha256::digest(config.admin_token.as_bytes()).into(),
        tmp,
        config,
        state,
        local,
        replica_id: replica_id.clone(),
        releases: releases.clone(),
        artifacts,
        egress,
        metrics,
        bytes_served: Arc::new(AtomicU64::new(0)),
        unavailable_log: LogGate::new(Duration::from_secs(1)),
        freshness: crate::freshness::FreshnessService::new(signers.clone()),
        signers,
        live,
        device_ca,
    });
    info!(%addr, devices, backend = app.state.kind(), replica = %replica_id, "ota-server listening");

    let tracker = TaskTracker::new();
    let flusher_stop = CancellationToken::new();
    let flusher = store
        .clone()
        .map(|s| tokio::spawn(s.run_flusher(flusher_stop.clone())));
    releases.requeue_unfinished();
    tracker.spawn(releases.clone().run_builder(jobs, cancel.clone()));
    tracker.spawn(tick(app.clone(), cancel.clone()));
    let router = crate::http::router(app.clone());
    // One accept loop for plain and TLS (crate::listener): timeouts and
    // connection caps that axum::serve does not have.
    let listener = Listener::new(listener, app.config.connections.clone());
    let connection_limits = listener.limits();
    app.live.set_connection_limits(connection_limits.clone());
    let conn_metrics = app.metrics.connections.clone();
    match &app.config.tls {
        None => {
            tracker.spawn(listener.serve(
                PlainAcceptor,
                router,
                conn_metrics,
                cancel.clone(),
                tracker.clone(),
            ));
        }
        Some(tls) => {
            // Already installed (a second server in one process): fine.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            // One rustls configuration: the live certificate (a reload swaps
            // it, see `crate::reload::LiveCert`) and the client-certificate
            // verifier of `crate::tls`, with one `Refusals` for the life of
            // the listener (a reload rebuilds the configuration around it).
            let resolver = app
                .live
                .cert_resolver()
                .expect("loaded above when [tls] is set");
            let refusals = Arc::new(crate::tls::Refusals::default());
            let rustls = axum_server::tls_rustls::RustlsConfig::from_config(
                crate::tls::server_config(tls, &refusals, resolver).context("loading [tls]")?,
            );
            app.live.set_tls(rustls.clone(), refusals.clone());
            // TLS, then the client certificate on every request.
            tracker.spawn(listener.serve(
                RustlsAcceptor::new(rustls, refusals),
                router,
                conn_metrics,
                cancel.clone(),
                tracker.clone(),
            ));
        }
    }
    Ok(Running {
        addr,
        app,
        connection_limits,
        cancel,
        tracker,
        flusher_stop,
        flusher,
    })
}

/// Periodic work: lease expiry, wave advancement, gauges.
async fn tick(app: Arc<App>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    // While the backend is down every tick fails: one line per 5 s.
    let log = LogGate::new(Duration::from_secs(5));
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        if let Some(suppressed) = log.admit() {
            warn!(error = %e, failed_since_last_log = suppressed, "{what} failed");
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        n += 1;
        match app.state.tick().await {
            Ok(expired) => {
                app.metrics.lease_expiries.inc_by(expired);
            }
            Err(e) => fail("rollout tick", &e),
        }
        if n % 8 == 0
            && let Err(e) = app.releases.refresh().await
        {
            fail("refreshing the release catalogue", &e);
        }
        app.metrics
            .active_leases
            .set(app.state.total_leases().await as i64);
        app.metrics
            .bytes_served
            .inner()
            .store(app.bytes_served.load(Ordering::Relaxed), Ordering::Relaxed);
        if n % 8 == 0 {
            match app.state.rollout_statuses().await {
                Ok(all) => {
                    for s in all {
                        app.metrics.set_rollout(&s);
                    }
                }
                Err(e) => fail("reading rollout status for metrics", &e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogGate;
    use std::time::Duration;

    /// Regression: during a PostgreSQL restart every refused request logged
    /// a WARN (hundreds a second per replica).
    #[test]
    fn log_gate_lets_one_line_through_per_period_and_counts_the_rest() {
        let g = LogGate::new(Duration::from_millis(200));
        assert_eq!(g.admit(), Some(0), "the first line is logged");
        for _ in 0..50 {
            assert_eq!(g.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            g.admit(),
            Some(50),
            "the next line reports the held-back count"
        );
        assert_eq!(g.admit(), None);
    }
}
