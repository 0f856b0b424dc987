//! `ota-agent run`: the daemon.
//!
//! # Life of an update
//!
//! 1. **Check in** at the server's pace (`next_checkin_ms`, already
//!    jittered); when the server is unreachable, back off exponentially with
//!    jitter up to `max_backoff`.
//! 2. **Offer** → fetch the signed manifest and check it ([`crate::verify`])
//!    before any payload byte, record the decision in `update.json`, report
//!    `download-started`.
//! 3. **Download** through the chunk pool ([`crate::pool`]) straight into the
//!    inactive slot. A recorder fsyncs the slot, then records the applied
//!    operations in sled and a coalesced `progress` event. While downloading
//!    the agent checks in every `lease_ms / 3` to keep its lease; a `cancel`
//!    answer, SIGTERM, or a lease it could not renew in time cancels the
//!    pool — before the server's deadline, by [`crate::lease`]'s clock, so
//!    the slot is never re-granted while this device still downloads.
//! 4. **Install**: hash the whole target slot against `to.sha256`, switch
//!    boot to it on trial, record phase `rebooting`, report `installed` and
//!    `rebooting`, run the reboot command and exit. A **gated** offer (the
//!    rollout has maintenance windows) stops before the switch: phase
//!    `waiting-for-window` recorded, event `waiting-for-window` (the server
//!    frees the download lease), check-ins as `waiting-for-window` until the
//!    answer is `install` or a local `ota-agent install-now`
//!    ([`crate::install_now`]); then the slot is hashed again and the switch
//!    follows ([`install_task`]). The wait survives restarts and reboots.
//! 5. **After boot** (next start): booted into the new slot → health check →
//!    commit and report `committed`; unhealthy → switch back, reboot, then
//!    report `rolled-back`; booted into the old slot although the switch was
//!    made → the bootloader gave up (boot count exhausted) → `rolled-back`.
//!
//! # Crash safety
//!
//! Every step is idempotent and restartable from `update.json` (atomic) and
//! the boot environment (atomic): a kill at any point resumes the phase it
//! was in. Operations recorded done are re-verified against their
//! `dst_sha256` before being trusted. The booted slot is never opened for
//! writing.
//!
//! # Cancellation
//!
//! One [`CancellationToken`] tree: the root is SIGTERM/SIGINT (from
//! `main`); each download gets a child, cancelled by the server's `cancel`
//! or a lost lease. Network waits select on it; disk writes and state
//! updates (the recorder) are outside it and finish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ota_delta::io::ReadAt;
use ota_format::api::{
    Action, AgentState, CheckinRequest, EnrollRequest, EventDetail, EventKind, Progress, Slot,
    UpdateInHand, UpdateOffer,
};
use ota_format::envelope::public_key_from_pem;
use ota_format::{Digest, Manifest, TrustedKeys};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant as LeaseInstant;

use crate::lease::LeaseClock;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bootctl::{BootControl, write_atomic};
use crate::client::{Client, ClientError, Timeouts, TlsSettings};
use crate::config::Config;
use crate::pool::{self, PoolConfig, PoolError, PoolStats};
use crate::state::{Phase, SlotInfo, State, StatusRecord, UpdateRecord, VerifiedImage};
use crate::verify::{self, Running};

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Boot(#[from] crate::bootctl::BootError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Setup(String),
}

/// How the daemon ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (SIGTERM).
    Shutdown,
    /// The reboot command ran: the device is going down.
    Rebooting,
}

/// How an update task ended well.
#[derive(Debug)]
enum Done {
    /// Boot switched: reboot.
    Reboot,
    /// Verified; the switch waits for the maintenance window (the offer was
    /// gated) or a local install-now.
    Waiting(Box<UpdateRecord>),
}

/// Why an update attempt ended without installing.
#[derive(Debug)]
enum UpdateEnd {
    Cancelled,
    Failed(String),
}

impl<E: std::fmt::Display> From<E> for UpdateEnd
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from(e: E) -> Self {
        UpdateEnd::Failed(e.to_string())
    }
}

/// Live progress of the update in hand.
#[derive(Default)]
struct Live {
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    ops_done: AtomicU64,
    ops_total: AtomicU64,
}

impl Live {
    fn snapshot(&self) -> Progress {
        Progress {
            bytes_verified: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            ops_done: self.ops_done.load(Ordering::Relaxed),
            ops_total: self.ops_total.load(Ordering::Relaxed),
        }
    }
    fn percent(&self) -> u64 {
        let p = self.snapshot();
        (p.bytes_verified * 100)
            .checked_div(p.bytes_total)
            .unwrap_or(0)
    }
}

/// The agent: everything the loop and the update task share.
struct Agent {
    cfg: Config,
    state: State,
    boot: BootControl,
    client: Client,
    /// Trusted keys and bandwidth cap: swapped by a reload (`SIGHUP`).
    live_settings: crate::reload::LiveSettings,
    freshness: crate::freshness::FreshnessGuard,
    events: Notify,
    live: Live,
    status: Mutex<StatusRecord>,
    last_status_write: Mutex<Option<Instant>>,
    /// Counters of the current pool, for status and tests.
    pool_stats: Mutex<Arc<PoolStats>>,
    /// The daemon's stop request (SIGTERM): a reboot command that fails
    /// after it fired was stopped by the shutdown it started.
    shutdown: CancellationToken,
}

/// Loads the trusted keys the configuration names.
pub fn load_trusted(cfg: &Config) -> Result<TrustedKeys, DaemonError> {
    let keys = cfg
        .trusted_keys
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| DaemonError::Setup(format!("reading key {}: {e}", p.display())))?;
            public_key_from_pem(&pem)
                .map_err(|e| DaemonError::Setup(format!("key {}: {e}", p.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    TrustedKeys::try_new(keys, cfg.key_threshold)
        .map_err(|e| DaemonError::Setup(format!("trusted keys: {e}")))
}

/// Runs the daemon until `shutdown` fires or a reboot is under way.
///
/// # Cancel safety
/// Stop it with `shutdown`, not by dropping the future: it then cancels the
/// download, lets the recorder sync and record what was written, flushes
/// events for at most a second, and returns. Dropping the future is still
/// safe for the device (every state change is atomic and re-verified on
/// restart) but may redo more work.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<Exit, DaemonError> {
    // systemd's watchdog runs from the start, not from READY=1: the start-up
    // steps ping as they finish (a slow board, or an emulated one under
    // load, took longer than a short `WatchdogSec` for all of them), and
    // enrollment pings from its retry loop.
    let mut watchdog = Watchdog::from_env();
    let state = State::open(&cfg.data_dir)?;
    watchdog.ping();
    let boot = BootControl::from_config(&cfg.boot, [&cfg.slots.a, &cfg.slots.b])?;
    let trusted = load_trusted(&cfg)?;
    let timeouts = Timeouts {
        request: cfg.request_timeout,
        read: cfg.stall_timeout,
    };
    let server_ca =
        match &cfg.server_ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                DaemonError::Setup(format!("reading server_ca {}: {e}", p.display()))
            })?),
            None => None,
        };
    let mut identity =
        crate::identity::prepare(&cfg).map_err(|e| DaemonError::Setup(e.to_string()))?;
    watchdog.ping();
    let base = Client::with_tls(
        &cfg.server_url,
        timeouts,
        &TlsSettings {
            server_ca: server_ca.clone(),
            identity: None,
        },
    )?;
    let bs = boot.state()?;
    let mut slots = state.slots()?;
    if slots.get(bs.booted).is_none() {
        slots.set(
            bs.booted,
            Some(SlotInfo {
                version: cfg.factory_version.clone(),
                security_counter: cfg.factory_security_counter,
            }),
        );
        state.set_slots(&slots)?;
    }
    let freshness = crate::freshness::FreshnessGuard::load(&state, cfg.require_freshness)?;
    watchdog.ping();
    let csr = match &identity {
        crate::identity::Identity::NeedsCertificate { csr } => Some(csr.clone()),
        _ => None,
    };
    let token =
        match obtain_token(&cfg, &base, &shutdown, &mut watchdog, false, csr.as_deref()).await? {
            Some(t) => t,
            None => return Ok(Exit::Shutdown),
        };
    if csr.is_some() {
        identity = crate::identity::prepare(&cfg).map_err(|e| DaemonError::Setup(e.to_string()))?;
    }
    // With a certificate it is the device's identity: no bearer token.
    let client = match identity {
        crate::identity::Identity::Ready(pem) => Client::with_tls(
            &cfg.server_url,
            timeouts,
            &TlsSettings {
                server_ca,
                identity: Some(pem),
            },
        )?,
        _ => base.with_token(token),
    };
    let live_settings = crate::reload::LiveSettings::new(cfg.clone(), trusted);
    let agent = Arc::new(Agent {
        client,
        cfg,
        state,
        boot,
        live_settings,
        freshness,
        events: Notify::new(),
        live: Live::default(),
        status: Mutex::new(StatusRecord::default()),
        last_status_write: Mutex::new(None),
        pool_stats: Mutex::new(Arc::new(PoolStats::default())),
        shutdown: shutdown.clone(),
    });
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let bg = shutdown.child_token();
    let reloader = tokio::spawn(reload_on_sighup(agent.clone(), bg.clone()));
    let events = tokio::spawn(events_loop(agent.clone(), bg.clone()));
    let r = async {
        // The health check may take longer than the watchdog interval: the
        // finishing step is pinged for while it runs (every step in it is
        // bounded by a timeout).
        let after = after_boot(&agent);
        tokio::pin!(after);
        let exit = loop {
            tokio::select! {
                r = &mut after => break r?,
                _ = watchdog.due() => watchdog.ping(),
            }
        };
        if let Some(exit) = exit {
            return Ok(exit);
        }
        main_loop(&agent, &shutdown, &mut watchdog).await
    }
    .await;
    // Last chance to deliver events (e.g. `rebooting`), briefly.
    bg.cancel();
    let _ = reloader.await;
    let _ = events.await;
    let _ = tokio::time::timeout(Duration::from_secs(1), flush_events(&agent)).await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    r
}

/// Re-reads `agent.toml` on every `SIGHUP` until `stop`.
///
/// # Cancel safety
/// Stops at `stop`; a reload in progress runs to completion on its
/// blocking thread (it swaps nothing until everything validated).
async fn reload_on_sighup(agent: Arc<Agent>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: configuration reload is unavailable");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            s = hup.recv() => if s.is_none() { return },
        }
        let a = agent.clone();
        // The outcome is logged by the reload itself.
        let _ = tokio::task::spawn_blocking(move || a.live_settings.reload()).await;
    }
}

/// Reads the device token, enrolling first if there is none.
///
/// # Cancel safety
/// Returns `Ok(None)` when `shutdown` fires; the token file is replaced
/// atomically, so a crash leaves the old token or the new one.
async fn obtain_token(
    cfg: &Config,
    client: &Client,
    shutdown: &CancellationToken,
    watchdog: &mut Watchdog,
    force: bool,
    csr: Option<&str>,
) -> Result<Option<String>, DaemonError> {
    let path = cfg.token_path();
    if force {
        tracing::warn!("the server rejected the device token: enrolling again");
    } else if csr.is_some() {
        tracing::info!("no client certificate yet: enrolling with a CSR");
    } else if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(Some(t));
        }
    }
    let key_file = cfg.enrollment_key_file.as_ref().ok_or_else(|| {
        DaemonError::Setup(match (csr, &cfg.client_cert) {
            (Some(_), Some(cert)) => format!(
                "no client certificate at {} and no enrollment_key_file to enroll with a CSR; install the device's certificate there or set enrollment_key_file",
                cert.display()
            ),
            _ => format!(
                "no device token at {} and no enrollment_key_file to enroll with",
                path.display()
            ),
        })
    })?;
    let key = std::fs::read_to_string(key_file)
        .map_err(|e| DaemonError::Setup(format!("reading {}: {e}", key_file.display())))?;
    let req = EnrollRequest {
        enrollment_key: key.trim().into(),
        device_id: cfg.device_id.clone(),
        device_type: cfg.device_type.clone(),
        tags: cfg.tags.clone(),
        csr: csr.map(String::from),
    };
    let mut failures = 0;
    loop {
        // This loop is the work while the device enrolls (each request is
        // bounded by the client's timeouts, each wait by `max_backoff`), so
        // it pings the watchdog: a server that stays unreachable at first
        // boot, or after it rejected the token, is retried, not reported to
        // systemd as a hung agent every `WatchdogSec`.
        let enroll = client.enroll(&req);
        tokio::pin!(enroll);
        let r = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = &mut enroll => break r,
                _ = watchdog.due() => watchdog.ping(),
            }
        };
        match r {
            Ok(resp) => {
                use std::os::unix::fs::PermissionsExt;
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                write_atomic(&path, resp.token.as_bytes())
                    .and_then(|()| {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    })
                    .map_err(|e| DaemonError::Setup(format!("writing {}: {e}", path.display())))?;
                if csr.is_some() {
                    let pem = resp.certificate.as_deref().ok_or_else(|| {
                        DaemonError::Setup(
                            "the server enrolled the device but returned no certificate for its CSR; set tls.client_ca_key on the server, or remove client_cert from agent.toml".into(),
                        )
                    })?;
                    crate::identity::store_certificate(cfg, pem)
                        .map_err(|e| DaemonError::Setup(e.to_string()))?;
                    tracing::info!(device = %resp.device_id, "client certificate received");
                }
                tracing::info!(device = %resp.device_id, "enrolled");
                return Ok(Some(resp.token));
            }
            Err(e) if e.is_transient() => {
                failures += 1;
                let wait = pool::backoff(Duration::from_secs(1), cfg.max_backoff, failures);
                tracing::warn!("enrollment failed, retrying in {wait:?}: {e}");
                let sleep = tokio::time::sleep(wait);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = &mut sleep => break,
                        _ = watchdog.due() => watchdog.ping(),
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The systemd watchdog (`WatchdogSec=`), pinged by the loop that does the
/// work — never by a timer task beside it, which would go on pinging while
/// the main loop hangs. [`main_loop`] selects on [`Watchdog::due`] with its
/// other branches, so a ping proves the loop came round; a loop stuck in a
/// branch stops the pings and systemd restarts the agent.
struct Watchdog {
    /// Half the interval systemd gave (`None`: no watchdog).
    tick: Option<tokio::time::Interval>,
}

impl Watchdog {
    fn from_env() -> Watchdog {
        let mut usec = 0u64;
        let tick = (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| {
            let mut i = tokio::time::interval(Duration::from_micros(usec / 2));
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Watchdog { tick }
    }

    /// Resolves when a ping is due; never, without a watchdog.
    ///
    /// # Cancel safety
    /// Cancel safe (a tick not taken stays due).
    async fn due(&mut self) {
        match &mut self.tick {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    fn ping(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

/// Test-only fault injection, compiled into debug builds (the tests') and
/// builds with the `test-hooks` feature, never into a release build.
/// `OTA_AGENT_TEST_HANG_AFTER_CHECKINS=N`: after N check-ins the main loop
/// hangs for good (a deadlock stand-in), so tests can prove that the
/// watchdog pings stop and systemd restarts the agent.
#[cfg(any(debug_assertions, feature = "test-hooks"))]
async fn test_hook_hang(checkins: u64) {
    let after = std::env::var("OTA_AGENT_TEST_HANG_AFTER_CHECKINS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if after.is_some_and(|n| checkins >= n) {
        tracing::error!("test hook: the main loop hangs now (OTA_AGENT_TEST_HANG_AFTER_CHECKINS)");
        std::future::pending::<()>().await;
    }
}
#[cfg(not(any(debug_assertions, feature = "test-hooks")))]
async fn test_hook_hang(_checkins: u64) {}

/// Test-only fault injection (debug and `test-hooks` builds only):
/// `OTA_AGENT_TEST_CRASH_AT=<point>` aborts the process at the named point,
/// with nothing flushed or dropped, as a kill -9 or a power cut landing
/// exactly there would. Tests crash at each step of finishing an update.
#[cfg(any(debug_assertions, feature = "test-hooks"))]
fn test_hook_crash(point: &str) {
    if std::env::var("OTA_AGENT_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::error!(point, "test hook: crashing here (OTA_AGENT_TEST_CRASH_AT)");
        std::process::abort();
    }
}
#[cfg(not(any(debug_assertions, feature = "test-hooks")))]
fn test_hook_crash(_point: &str) {}

/// Sends the outbox whenever told to, and every few seconds.
///
/// # Cancel safety
/// Stops at `stop`; unsent events stay in the outbox.
async fn events_loop(agent: Arc<Agent>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let wait = if failures == 0 {
            Duration::from_secs(5)
        } else {
            pool::backoff(Duration::from_secs(1), agent.cfg.max_backoff, failures)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = agent.events.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = flush_events(&agent) => r,
        };
        match r {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::debug!("sending events failed: {e}");
            }
        }
    }
}

/// Sends every pending event, oldest first, deleting each batch once the
/// server acknowledged it.
///
/// # Cancel safety
/// Cancel-safe: a batch is removed only after its acknowledgement; one
/// cut short is sent again and deduplicated by the server.
async fn flush_events(agent: &Agent) -> Result<(), DaemonError> {
    loop {
        let batch = agent
            .state
            .pending_events(ota_format::api::MAX_EVENTS_PER_BATCH);
        if batch.is_empty() {
            return Ok(());
        }
        agent.client.events(&batch).await?;
        let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
        agent.state.ack_events(&seqs).await?;
    }
}

impl Agent {
    async fn event(&self, update_id: &str, kind: EventKind, detail: EventDetail) {
        match self.state.push_event(update_id, kind, detail).await {
            Ok(e) => tracing::info!(seq = e.seq, kind = ?kind, update = update_id, "event"),
            Err(e) => tracing::error!("could not record event {kind:?}: {e}"),
        }
        self.events.notify_one();
    }

    fn running(&self) -> Result<(Slot, Running), DaemonError> {
        let booted = self.boot.state()?.booted;
        let slots = self.state.slots()?;
        let info = slots.get(booted).cloned().unwrap_or(SlotInfo {
            version: self.cfg.factory_version.clone(),
            security_counter: self.cfg.factory_security_counter,
        });
        // The counter never goes back, whichever slot runs.
        let counter = [slots.a.as_ref(), slots.b.as_ref()]
            .into_iter()
            .flatten()
            .map(|s| s.security_counter)
            .max()
            .unwrap_or(0)
            .max(info.security_counter);
        Ok((
            booted,
            Running {
                device_type: self.cfg.device_type.clone(),
                version: info.version,
                security_counter: counter,
            },
        ))
    }

    /// Sets the phase shown by systemd (`STATUS=`) and `ota-agent status`.
    /// Progress-only updates are written at most once a second.
    fn set_status(&self, phase: &str, update: Option<&UpdateRecord>, error: Option<String>) {
        let force = {
            let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s.phase != phase || error.is_some()
        };
        {
            let mut last = self
                .last_status_write
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (booted, version) = match self.running() {
            Ok((b, r)) => (b.name().to_string(), r.version),
            Err(_) => ("?".into(), "?".into()),
        };
        let percent = self.live.percent();
        let rec = {
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s.phase = phase.into();
            s.version = version;
            s.booted_slot = booted;
            s.update_id = update.map(|u| u.offer.update_id.clone());
            s.to_version = update.map(|u| u.to_version.clone());
            s.progress = self.live.snapshot();
            if error.is_some() {
                s.last_error = error;
            }
            s.updated_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            s.clone()
        };
        let text = match update {
            Some(u) if phase == "downloading" => {
                format!("{phase} {} {percent}%", u.to_version)
            }
            Some(u) => format!("{phase} {}", u.to_version),
            None => format!("{phase}, running {}", rec.version),
        };
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&text)]);
        if let Err(e) = self.state.set_status(&rec) {
            tracing::debug!("writing status: {e}");
        }
    }
}

/// Runs a shell command with a timeout; `Ok(())` if it exited 0.
///
/// # Cancel safety
/// Dropping the future kills the command (`kill_on_drop`).
async fn run_command(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what} `{cmd}` could not start: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Err(_) => Err(format!("{what} `{cmd}` did not finish within {timeout:?}")),
        Ok(Err(e)) => Err(format!("{what} `{cmd}`: {e}")),
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("{what} `{cmd}` failed ({s})")),
    }
}

/// How long a failed reboot command waits for the daemon's stop request
/// before it counts as a failure: the shutdown that killed the command
/// signals the agent in the same instant, but the two are seen in either
/// order (CI's systemd VM saw the command's death first).
const REBOOT_STOP_GRACE: Duration = Duration::from_secs(5);

/// Flushes events briefly, then runs the reboot command.
///
/// A command that fails after the daemon was told to stop is the reboot
/// under way, not a failure: `systemctl reboot` makes systemd stop the
/// agent's whole cgroup, the `systemctl` it waits for included (SIGTERM).
/// The stop request may come just after the command's death
/// ([`REBOOT_STOP_GRACE`]). If no reboot follows after all, the next start
/// re-runs it (the update record still says rebooting).
///
/// # Cancel safety
/// Not cancelled by the daemon: the decision to reboot is already on disk,
/// so a restart re-runs it.
async fn reboot(agent: &Agent) -> Result<Exit, DaemonError> {
    let _ = tokio::time::timeout(Duration::from_secs(3), flush_events(agent)).await;
    tracing::info!(command = %agent.cfg.reboot_command, "rebooting");
    if let Err(e) = run_command(
        "reboot command",
        &agent.cfg.reboot_command,
        Duration::from_secs(300),
    )
    .await
    {
        // systemd signals the whole cgroup at once: the command may be seen
        // dying before the agent's own SIGTERM is handled. Give that stop
        // request a moment to arrive before calling the reboot failed.
        let stopped = tokio::time::timeout(REBOOT_STOP_GRACE, agent.shutdown.cancelled())
            .await
            .is_ok();
        if stopped {
            tracing::info!("the reboot command ended with the system's shutdown ({e}): rebooting");
            return Ok(Exit::Rebooting);
        }
        return Err(DaemonError::Setup(e));
    }
    Ok(Exit::Rebooting)
}

/// Finishes what a previous boot started: commit or roll back a trial
/// boot, report a bootloader fallback, or re-run an interrupted reboot.
/// Returns `Some(exit)` if the agent must stop (a reboot is under way).
///
/// # Cancel safety
/// Every step is recorded before the next begins (boot environment and
/// `update.json` are replaced atomically), so an interruption resumes at
/// the same step after a restart.
async fn after_boot(agent: &Arc<Agent>) -> Result<Option<Exit>, DaemonError> {
    let Some(mut rec) = agent.state.update()? else {
        agent.set_status("idle", None, None);
        return Ok(None);
    };
    let bs = agent.boot.state()?;
    let id = rec.offer.update_id.clone();
    let span = tracing::info_span!("after_boot", update = %id, phase = ?rec.phase);
    async {
        if let Some(ev) = rec.final_event.clone() {
            // Ended before the restart, its end noted but maybe not queued:
            // queue the same event (same number) and clear the record.
            tracing::info!(kind = ?ev.kind, seq = ev.seq, "the update had ended: reporting its end");
            finish_update(agent, &mut rec, ev.kind, ev.detail.clone()).await?;
            agent.set_status("idle", None, ev.detail.reason);
            return Ok(None);
        }
        match rec.phase {
            Phase::Downloading | Phase::Installing => Ok(None),
            // Verified and waiting for its window: the main loop holds it
            // (the slot is hashed again before any switch).
            Phase::WaitingForWindow => {
                agent.set_status("waiting-for-window", Some(&rec), None);
                Ok(None)
            }
            // Killed (not rebooted) after deciding to switch: the running
            // slot is still the old one, whatever the environment says next.
            // Finish the switch (idempotent) and reboot; never commit here.
            Phase::Rebooting if same_boot(agent, &rec)? => {
                if !(bs.next == rec.target && bs.upgrade_available) {
                    agent.boot.switch_to(rec.target)?;
                }
                agent.set_status("rebooting", Some(&rec), None);
                reboot(agent).await.map(Some)
            }
            Phase::Rebooting if bs.booted == rec.target => {
                agent.set_status("testing", Some(&rec), None);
                let healthy = run_command(
                    "health check",
                    &agent.cfg.health_check,
                    agent.cfg.health_timeout,
                )
                .await;
                match healthy {
                    Ok(()) => {
                        agent.boot.commit(rec.target)?;
                        let mut slots = agent.state.slots()?;
                        slots.set(
                            rec.target,
                            Some(SlotInfo {
                                version: rec.to_version.clone(),
                                security_counter: rec.to_security_counter,
                            }),
                        );
                        agent.state.set_slots(&slots)?;
                        let detail = EventDetail {
                            version: Some(rec.to_version.clone()),
                            ..Default::default()
                        };
                        finish_update(agent, &mut rec, EventKind::Committed, detail).await?;
                        tracing::info!(version = %rec.to_version, "committed");
                        agent.set_status("idle", None, None);
                        Ok(None)
                    }
                    Err(reason) => {
                        tracing::error!("unhealthy after update: {reason}; rolling back");
                        agent.boot.rollback_to(rec.from_slot)?;
                        rec.phase = Phase::RollingBack;
                        rec.reason = Some(format!("health check failed: {reason}"));
                        agent.state.set_update(Some(&rec))?;
                        agent.set_status("rolling-back", Some(&rec), rec.reason.clone());
                        reboot(agent).await.map(Some)
                    }
                }
            }
            Phase::Rebooting
                if rec.switched_in_boot.is_none()
                    && bs.next == rec.target
                    && bs.upgrade_available =>
            {
                // Switched, but killed before the reboot happened (a record
                // from an agent that did not note the boot id).
                agent.set_status("rebooting", Some(&rec), None);
                reboot(agent).await.map(Some)
            }
            Phase::Rebooting if bs.next == rec.target && bs.upgrade_available => {
                // Rebooted, yet the old slot runs while the environment still
                // asks for a trial of the new one: the bootloader does not
                // follow the contract. Rebooting again could loop forever.
                agent.boot.rollback_to(rec.from_slot)?;
                let reason = format!(
                    "the bootloader booted slot {} although the boot environment asked for a \
                     trial of slot {}: check the boot script against deploy/uboot/boot.cmd",
                    bs.booted.name(),
                    rec.target.name()
                );
                finish_rollback(agent, &rec, reason).await?;
                Ok(None)
            }
            Phase::Rebooting
                if rec.switched_in_boot.is_some()
                    && bs.bootcount == 0
                    && !bs.upgrade_available
                    && rec.redone_switches >= MAX_REDONE_SWITCHES =>
            {
                // "Lost" every time: no power cut does that. Either the
                // environment write never reaches what the bootloader reads,
                // or the boot script resets the count when it falls back, so
                // a fallback looks like a lost switch. Redoing it again would
                // boot the broken slot forever: give up on this update.
                let reason = format!(
                    "the switch to slot {} was lost {} times in a row after a reboot (slot {} came \
                     up with bootcount 0 and no trial): the boot script must leave bootcount above \
                     zero when it falls back (see deploy/uboot/boot.cmd, deploy/grub/ota-ab.cfg) \
                     and the agent's boot environment must be the one the bootloader reads",
                    rec.target.name(),
                    rec.redone_switches + 1,
                    bs.booted.name()
                );
                finish_rollback(agent, &rec, reason).await?;
                agent.boot.commit(bs.booted)?;
                Ok(None)
            }
            Phase::Rebooting
                if rec.switched_in_boot.is_some() && bs.bootcount == 0 && !bs.upgrade_available =>
            {
                // Rebooted on the old slot with an untouched environment: the
                // power went before the switch reached it (a fallback leaves
                // `bootcount` above zero). Resume at "installing": the slot is
                // read back and verified again before the next switch.
                tracing::warn!(
                    slot = rec.target.name(),
                    "the boot switch did not reach the boot environment before the power went; \
                     verifying the slot again and switching"
                );
                rec.phase = Phase::Installing;
                rec.switched_in_boot = None;
                rec.redone_switches += 1;
                agent.state.set_update(Some(&rec))?;
                Ok(None)
            }
            Phase::Rebooting => {
                let reason = format!(
                    "boot count exhausted: the bootloader fell back to slot {} without a commit",
                    bs.booted.name()
                );
                finish_rollback(agent, &rec, reason).await?;
                // Acknowledge the fallback: the running slot is the good one
                // and the count the bootloader left goes back to 0, so that a
                // later switch lost to a power cut is not taken for another
                // fallback.
                agent.boot.commit(bs.booted)?;
                Ok(None)
            }
            Phase::RollingBack if bs.booted == rec.from_slot => {
                let reason = rec.reason.clone().unwrap_or_else(|| "rolled back".into());
                finish_rollback(agent, &rec, reason).await?;
                Ok(None)
            }
            Phase::RollingBack => {
                agent.boot.rollback_to(rec.from_slot)?;
                reboot(agent).await.map(Some)
            }
        }
    }
    .instrument(span)
    .await
}

/// How many switches found lost after a reboot are redone for one update
/// before the agent gives up on it (`UpdateRecord::redone_switches`). One
/// power cut in the instant of the environment write is plausible, three
/// in a row for the same update are not.
const MAX_REDONE_SWITCHES: u32 = 3;

/// Whether the device is still in the boot in which the agent decided to
/// switch (`update.json` names it): then nothing has rebooted since, and the
/// running slot cannot be the new one.
fn same_boot(agent: &Agent, rec: &UpdateRecord) -> Result<bool, DaemonError> {
    match &rec.switched_in_boot {
        Some(id) => Ok(*id == agent.boot.boot_id()?),
        None => Ok(false),
    }
}

async fn finish_rollback(
    agent: &Agent,
    rec: &UpdateRecord,
    reason: String,
) -> Result<(), DaemonError> {
    let mut slots = agent.state.slots()?;
    slots.set(rec.target, None);
    agent.state.set_slots(&slots)?;
    let version = agent.running()?.1.version;
    tracing::warn!(%version, "rolled back: {reason}");
    let detail = EventDetail {
        reason: Some(reason.clone()),
        version: Some(version),
        ..Default::default()
    };
    finish_update(agent, &mut rec.clone(), EventKind::RolledBack, detail).await?;
    agent.set_status("idle", None, Some(reason));
    Ok(())
}

/// Ends the update in hand with its terminal event (`committed`,
/// `rolled-back`, `failed`), reported exactly once whatever step a crash or
/// power cut lands on:
///
/// 1. the event is made, its sequence number synced, and noted in the
///    update record (`final_event`, the file replaced atomically);
/// 2. it is queued in the outbox under that number (synced);
/// 3. the record goes.
///
/// A start that finds a record with `final_event` ([`after_boot`]) comes
/// back here and queues the same event again: the outbox is keyed by
/// sequence number and the server counts each number once. Before, the
/// record went first, and a crash between it and the event left a device
/// idle on its new version whose server never heard of the commit (found
/// by the kill -9 trials in CI).
///
/// What ended the update (the boot environment's commit or rollback, the
/// slots record) is done by the caller before this.
///
/// # Cancel safety
/// Each step is on disk before the next; the next start finishes an
/// interrupted one.
async fn finish_update(
    agent: &Agent,
    rec: &mut UpdateRecord,
    kind: EventKind,
    detail: EventDetail,
) -> Result<(), DaemonError> {
    let ev = match &rec.final_event {
        Some(ev) => ev.clone(),
        None => {
            let ev = agent
                .state
                .new_event(&rec.offer.update_id, kind, detail)
                .await?;
            rec.final_event = Some(ev.clone());
            agent.state.set_update(Some(rec))?;
            ev
        }
    };
    test_hook_crash("finish:noted");
    agent.state.put_event(&ev).await?;
    tracing::info!(seq = ev.seq, kind = ?ev.kind, update = %ev.update_id, "event");
    agent.events.notify_one();
    test_hook_crash("finish:queued");
    agent.state.set_update(None)?;
    test_hook_crash("finish:cleared");
    // A failed update's applied operations stay, keyed by payload hash, in
    // case the same payload is offered again (as on a cancel); a finished
    // one's are of no further use.
    if ev.kind != EventKind::Failed {
        agent.state.drop_progress_except(None).await?;
    }
    Ok(())
}

/// A running update task.
struct Download {
    update_id: String,
    lease: LeaseClock,
    /// Stopped because the lease ran out (the task is winding down).
    lease_lost: bool,
    /// Switching to an update verified while it waited (no download, no
    /// lease: [`install_task`]).
    installing: bool,
    cancel: CancellationToken,
    task: JoinHandle<Result<Done, UpdateEnd>>,
}

/// The check-in loop, supervising at most one update task.
///
/// # Cancel safety
/// Stops at `shutdown` after cancelling the update task and awaiting it, so
/// the recorder finishes syncing and recording what was written.
async fn main_loop(
    agent: &Arc<Agent>,
    shutdown: &CancellationToken,
    watchdog: &mut Watchdog,
) -> Result<Exit, DaemonError> {
    let mut download: Option<Download> = None;
    // An update verified in the inactive slot, waiting for its window.
    let mut waiting: Option<UpdateRecord> = agent
        .state
        .update()?
        .filter(|r| r.phase == Phase::WaitingForWindow);
    let mut checkins = 0u64;
    // When to look for a local install-now next (a deadline, so check-ins
    // more frequent than it cannot starve it).
    let mut flag_check = tokio::time::Instant::now();
    // Resume an update interrupted by a crash or a stop, without waiting
    // for the server.
    if let Some(rec) = agent.state.update()?
        && matches!(rec.phase, Phase::Downloading | Phase::Installing)
    {
        // The lease is unconfirmed: the first check-in (at once) renews it
        // or cancels the update; without an answer the download stops
        // within one lease term, as if the lease had just been granted.
        download = Some(start_download(
            agent,
            rec.offer,
            shutdown,
            LeaseInstant::now(),
        ));
    }
    let mut wait = Duration::ZERO;
    // The next check-in is a deadline, not a sleep started anew each time
    // round: the watchdog branch comes round more often than check-ins.
    let mut next_checkin = tokio::time::Instant::now();
    let mut failures = 0u32;
    // The token the server last refused, once we have said so.
    let mut refused: Option<String> = None;
    loop {
        let mut pinged = false;
        let stop_at = lease_stop_at(&download);
        tokio::select! {
            _ = sleep_until_opt(stop_at) => stop_for_lost_lease(&mut download),
            _ = shutdown.cancelled() => {
                if let Some(d) = download.take() {
                    d.cancel.cancel();
                    let _ = d.task.await;
                }
                return Ok(Exit::Shutdown);
            }
            r = async { (&mut download.as_mut().expect("guarded").task).await }, if download.is_some() => {
                let d = download.take().expect("guarded");
                match r {
                    Ok(Ok(Done::Reboot)) => return reboot(agent).await,
                    Ok(Ok(Done::Waiting(rec))) => waiting = Some(*rec),
                    Ok(Err(UpdateEnd::Cancelled)) => {
                        tracing::info!(update = %d.update_id, "download stopped");
                        agent.set_status("idle", None, None);
                    }
                    Ok(Err(UpdateEnd::Failed(reason))) => fail_update(agent, &d.update_id, reason).await?,
                    Err(e) => fail_update(agent, &d.update_id, format!("update task died: {e}")).await?,
                }
                wait = Duration::ZERO;
            }
            _ = watchdog.due() => {
                watchdog.ping();
                pinged = true;
            }
            // The device's own install-now (a flag file), looked for every
            // second while an update waits; like the watchdog branch, it
            // does not move the next check-in.
            _ = tokio::time::sleep_until(flag_check), if waiting.is_some() && download.is_none() => {
                pinged = true;
                flag_check = tokio::time::Instant::now() + Duration::from_secs(1);
                let w = waiting.as_ref().expect("guarded");
                if crate::install_now::pending(&agent.cfg.data_dir)
                    && crate::install_now::take(&agent.cfg.data_dir, &w.offer.update_id)
                {
                    let rec = waiting.take().expect("guarded");
                    download = Some(start_install(agent, rec, shutdown));
                }
            }
            _ = tokio::time::sleep_until(next_checkin) => {
                checkins += 1;
                test_hook_hang(checkins).await;
                let (booted, running) = agent.running()?;
                let req = CheckinRequest {
                    install_gate: true,
                    time_zone: crate::config::device_time_zone(
                        agent.cfg.time_zone.as_deref(),
                        std::path::Path::new("/"),
                    ),
                    current_version: running.version.clone(),
                    booted_slot: booted,
                    state: match (&download, &waiting) {
                        (Some(d), _) if d.installing => AgentState::Installing,
                        (Some(_), _) => AgentState::Downloading,
                        (None, Some(_)) => AgentState::WaitingForWindow,
                        (None, None) => AgentState::Idle,
                    },
                    update: match (&download, &waiting) {
                        (Some(d), _) => Some(UpdateInHand {
                            update_id: d.update_id.clone(),
                            progress: agent.live.snapshot(),
                        }),
                        (None, Some(w)) => Some(UpdateInHand {
                            update_id: w.offer.update_id.clone(),
                            progress: Progress::default(),
                        }),
                        (None, None) => None,
                    },
                    freshness_held: agent.freshness.held(&agent.live_settings.trusted()),
                    delta_codecs: ota_format::manifest::codecs(),
                };
                let sent = LeaseInstant::now();
                let checkin = agent.client.checkin(&req);
                tokio::pin!(checkin);
                // A check-in that hangs must not keep a lost lease
                // downloading.
                let r = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break None,
                        r = &mut checkin => break Some(r),
                        _ = sleep_until_opt(lease_stop_at(&download)) => stop_for_lost_lease(&mut download),
                    }
                };
                let Some(r) = r else { continue };
                match r {
                    Ok((resp, retry_after)) => {
                        failures = 0;
                        refused = None;
                        wait = Duration::from_millis(resp.next_checkin_ms.clamp(100, 86_400_000));
                        // A stale or replayed answer is not acted on: no
                        // new download starts from it.
                        let fresh = agent.freshness.accept(
                            resp.freshness.as_ref(),
                            &agent.live_settings.trusted(),
                            &agent.cfg.device_type,
                            SystemTime::now(),
                            &agent.state,
                        );
                        if let Err(e) = &fresh {
                            tracing::warn!("check-in answer not acted on: {e}");
                        }
                        match resp.action {
                            Action::None => {}
                            Action::Wait { reason } => {
                                tracing::debug!("server says wait: {reason}");
                                wait = wait.max(retry_after.unwrap_or_default());
                            }
                            Action::Update(offer) => match &mut download {
                                // The offer of the update in hand renews its lease.
                                Some(d) if d.update_id == offer.update_id => {
                                    if !d.lease_lost {
                                        d.lease.renewed(sent);
                                    }
                                }
                                Some(d) => tracing::warn!(holding = %d.update_id, offered = %offer.update_id, "ignoring a second offer while one is in hand"),
                                None if waiting.is_some() => tracing::warn!(offered = %offer.update_id, "ignoring an offer while a verified update waits for its window"),
                                None if fresh.is_err() => {}
                                None => download = Some(start_download(agent, offer, shutdown, sent)),
                            },
                            Action::Install { update_id } => {
                                match waiting.as_ref() {
                                    Some(w) if w.offer.update_id == update_id && download.is_none() => {
                                        tracing::info!(update = %update_id, "the server says install (maintenance window open or operator)");
                                        let rec = waiting.take().expect("checked");
                                        download = Some(start_install(agent, rec, shutdown));
                                    }
                                    _ => tracing::debug!(update = %update_id, "install answer for no waiting update: ignored"),
                                }
                            }
                            Action::Cancel { update_id, reason } if waiting.as_ref().is_some_and(|w| w.offer.update_id == update_id) => {
                                tracing::warn!(update = %update_id, "server cancelled the waiting update: {reason}");
                                waiting = None;
                                agent.state.set_update(None)?;
                                agent.set_status("idle", None, Some(format!("cancelled by the server: {reason}")));
                            }
                            Action::Cancel { update_id, reason } => {
                                if let Some(d) = download.as_ref().filter(|d| d.update_id == update_id) {
                                    tracing::warn!(update = %update_id, "server cancelled the update: {reason}");
                                    d.cancel.cancel();
                                    let d = download.take().expect("checked");
                                    let _ = d.task.await;
                                    // Progress stays, keyed by payload hash, in
                                    // case the same payload is offered again.
                                    agent.state.set_update(None)?;
                                    agent.set_status("idle", None, Some(format!("cancelled by the server: {reason}")));
                                }
                            }
                        }
                        if let Some(d) = &download {
                            wait = wait.min(d.lease.term() / 3).max(Duration::from_millis(100));
                        }
                    }
                    Err(e) if e.is_unauthorized() => {
                        failures += 1;
                        wait = pool::backoff(Duration::from_secs(1), agent.cfg.max_backoff, failures);
                        if on_unauthorized(agent, shutdown, watchdog, &mut refused).await {
                            wait = Duration::ZERO;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        wait = pool::backoff(Duration::from_secs(1), agent.cfg.max_backoff, failures);
                        tracing::warn!(retry_in_ms = wait.as_millis() as u64, "check-in failed: {e}");
                        if let Some(d) = &download {
                            wait = wait.min(d.lease.term() / 3).max(Duration::from_millis(100));
                        }
                    }
                }
            }
        }
        if !pinged {
            next_checkin = tokio::time::Instant::now() + wait;
        }
    }
}

/// The server refused our token (401): it was rotated (`ota-server device
/// add --rotate`), or the id was enrolled again elsewhere, or the server lost
/// it. In that order of preference: a different token in the token file
/// (the operator put the rotated one there) is used at once; with an
/// `enrollment_key_file` the device enrolls anew; else it cannot help
/// itself, and says once per refused token that it needs re-provisioning.
/// Returns whether to check in again at once.
///
/// # Cancel safety
/// Reads the token file; re-enrolling replaces it atomically (see
/// [`obtain_token`]); cancelled by `shutdown` while enrolling.
async fn on_unauthorized(
    agent: &Agent,
    shutdown: &CancellationToken,
    watchdog: &mut Watchdog,
    refused: &mut Option<String>,
) -> bool {
    let path = agent.cfg.token_path();
    let in_use = agent.client.token();
    let on_disk = std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(t) = on_disk
        && Some(&t) != in_use.as_ref()
    {
        tracing::info!(path = %path.display(), "the server refused the device token; the token file holds another one: using it");
        agent.client.set_token(t);
        return true;
    }
    if agent.cfg.enrollment_key_file.is_some() {
        let plain = agent.client.clone();
        match obtain_token(&agent.cfg, &plain, shutdown, watchdog, true, None).await {
            Ok(Some(t)) => {
                agent.client.set_token(t);
                return true;
            }
            Ok(None) => {}
            Err(e) => tracing::error!("re-enrolling failed: {e}"),
        }
        return false;
    }
    let refused_now = in_use.unwrap_or_default();
    if refused.as_deref() != Some(refused_now.as_str()) {
        tracing::error!(
            device = %agent.cfg.device_id,
            path = %path.display(),
            "the server refuses this device's token (401) and there is no enrollment_key_file to enroll again: \
             this device needs re-provisioning — run `ota-server device add --rotate --id {} --type {}` \
             and put the token it prints in {} (read again at the next attempt; no restart needed)",
            agent.cfg.device_id,
            agent.cfg.device_type,
            path.display()
        );
        *refused = Some(refused_now);
    }
    false
}

async fn fail_update(agent: &Agent, update_id: &str, reason: String) -> Result<(), DaemonError> {
    tracing::error!(update = %update_id, "update failed: {reason}");
    let detail = EventDetail {
        reason: Some(reason.chars().take(1000).collect()),
        ..Default::default()
    };
    match agent
        .state
        .update()?
        .filter(|r| r.offer.update_id == update_id)
    {
        Some(mut rec) => finish_update(agent, &mut rec, EventKind::Failed, detail).await?,
        // Failed before it had a record (the manifest was refused): nothing
        // on disk to clear, so nothing a crash could leave half done.
        None => agent.event(update_id, EventKind::Failed, detail).await,
    }
    agent.set_status("idle", None, Some(reason));
    Ok(())
}

/// When the download in hand must have stopped (none if there is none, it
/// is already stopping, or it is an install that holds no lease).
fn lease_stop_at(download: &Option<Download>) -> Option<LeaseInstant> {
    download
        .as_ref()
        .filter(|d| !d.lease_lost && !d.installing)
        .map(|d| d.lease.stop_at())
}

/// Sleeps until `at`; never returns without it.
async fn sleep_until_opt(at: Option<LeaseInstant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The lease could not be renewed in time: stop downloading now, before the
/// server's deadline gives the slot to another device. The update stays in
/// `update.json`; the next check-in that renews it resumes the download.
fn stop_for_lost_lease(download: &mut Option<Download>) {
    if let Some(d) = download.as_mut().filter(|d| !d.lease_lost) {
        tracing::warn!(update = %d.update_id, "lease not renewed in time (server unreachable?): stopping the download before the server gives the slot away");
        d.lease_lost = true;
        d.cancel.cancel();
    }
}

/// Starts the update task for `offer`, granted by a check-in sent at `sent`.
fn start_download(
    agent: &Arc<Agent>,
    offer: UpdateOffer,
    shutdown: &CancellationToken,
    sent: LeaseInstant,
) -> Download {
    let cancel = shutdown.child_token();
    let span = tracing::info_span!("update", id = %offer.update_id, version = %offer.version);
    let d = Download {
        update_id: offer.update_id.clone(),
        lease: LeaseClock::granted(Duration::from_millis(offer.lease_ms.max(300)), sent),
        lease_lost: false,
        installing: false,
        cancel: cancel.clone(),
        task: tokio::spawn(update_task(agent.clone(), offer, cancel).instrument(span)),
    };
    agent.set_status("downloading", None, None);
    d
}

/// Starts the switch to `rec`, an update verified while it waited for its
/// window ([`install_task`]). Supervised like a download, without a lease.
fn start_install(agent: &Arc<Agent>, rec: UpdateRecord, shutdown: &CancellationToken) -> Download {
    let cancel = shutdown.child_token();
    let span = tracing::info_span!("install", id = %rec.offer.update_id, version = %rec.to_version);
    agent.set_status("installing", Some(&rec), None);
    Download {
        update_id: rec.offer.update_id.clone(),
        lease: LeaseClock::granted(Duration::from_secs(86_400), LeaseInstant::now()),
        lease_lost: false,
        installing: true,
        cancel: cancel.clone(),
        task: tokio::spawn(install_task(agent.clone(), rec, cancel).instrument(span)),
    }
}

/// Switches to an update verified while it waited for its window: the
/// target slot is hashed again first (days may have passed; anything may
/// have written to it), then boot switches as after a download.
///
/// # Cancel safety
/// Cancel with `cancel`: the hash stops and `update.json` still says
/// waiting, so a restart waits again (and is told to install again while
/// the window is open). Once the switch is recorded it is not cancelled.
async fn install_task(
    agent: Arc<Agent>,
    mut rec: UpdateRecord,
    cancel: CancellationToken,
) -> Result<Done, UpdateEnd> {
    let Some(v) = rec.verified else {
        return Err(UpdateEnd::Failed(
            "the waiting update's record names no verified image".into(),
        ));
    };
    let (booted, _) = agent
        .running()
        .map_err(|e| UpdateEnd::Failed(e.to_string()))?;
    if booted == rec.target {
        return Err(UpdateEnd::Failed(format!(
            "the verified update was in slot {}, which is now running",
            rec.target.name()
        )));
    }
    let path = agent.cfg.slot_path(rec.target).to_path_buf();
    let f = std::fs::File::open(&path).map_err(|e| {
        format!(
            "opening slot {} ({}): {e}",
            rec.target.name(),
            path.display()
        )
    })?;
    let actual = {
        let c = cancel.clone();
        tokio::task::spawn_blocking(move || hash_cancellable(&f, v.size, &c))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading back slot {}: {e}", rec.target.name()))?
    };
    let Some(actual) = actual else {
        return Err(UpdateEnd::Cancelled);
    };
    if actual != v.sha256 {
        agent.state.drop_progress_except(None).await?;
        return Err(UpdateEnd::Failed(format!(
            "slot {} changed while the update waited for its window: sha256 {actual}, verified {}",
            rec.target.name(),
            v.sha256
        )));
    }
    switch_boot(&agent, &mut rec).await?;
    Ok(Done::Reboot)
}

/// Records the decision to switch (with this boot's id), switches boot to
/// the target slot on trial and reports `installed` and `rebooting`.
///
/// # Cancel safety
/// The decision is recorded before the boot environment changes: after a
/// crash, [`after_boot`] knows whether the switch may have happened.
async fn switch_boot(agent: &Agent, rec: &mut UpdateRecord) -> Result<(), UpdateEnd> {
    rec.phase = Phase::Rebooting;
    rec.switched_in_boot = Some(agent.boot.boot_id()?);
    agent.state.set_update(Some(rec))?;
    agent.boot.switch_to(rec.target)?;
    agent
        .event(
            &rec.offer.update_id,
            EventKind::Installed,
            EventDetail {
                version: Some(rec.to_version.clone()),
                ..Default::default()
            },
        )
        .await;
    agent
        .event(
            &rec.offer.update_id,
            EventKind::Rebooting,
            Default::default(),
        )
        .await;
    agent.set_status("rebooting", Some(rec), None);
    Ok(())
}

/// Opens a slot for reading and writing, without truncating.
fn open_rw(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Download, verify and install one update; `Ok` when boot has been
/// switched and the reboot should follow.
///
/// # Cancel safety
/// Cancel with `cancel` (never by aborting the task): network waits stop,
/// writes and progress records complete, and `Err(Cancelled)` is returned
/// with `update.json` still naming the update so it resumes.
async fn update_task(
    agent: Arc<Agent>,
    offer: UpdateOffer,
    cancel: CancellationToken,
) -> Result<Done, UpdateEnd> {
    let (booted, running) = agent
        .running()
        .map_err(|e| UpdateEnd::Failed(e.to_string()))?;
    // The manifest: the stored copy when resuming this update, else fetched.
    let existing = agent.state.update()?.filter(|r| {
        r.offer.update_id == offer.update_id && r.offer.manifest_sha256 == offer.manifest_sha256
    });
    let manifest_path = agent.state.manifest_path(&offer.manifest_sha256);
    let envelope = match existing
        .as_ref()
        .and_then(|_| std::fs::read(&manifest_path).ok())
    {
        Some(b) if Digest::of(&b) == offer.manifest_sha256 => b,
        _ => tokio::select! {
            _ = cancel.cancelled() => return Err(UpdateEnd::Cancelled),
            r = agent.client.fetch_manifest(&offer.manifest_url, &offer.manifest_sha256) => r?,
        },
    };
    let manifest = Arc::new(verify::check_manifest(
        &envelope,
        &agent.live_settings.trusted(),
        &running,
        Some(&offer),
        agent.freshness.now(SystemTime::now()),
    )?);
    agent
        .freshness
        .check_offer(manifest.security_counter)
        .map_err(|e| UpdateEnd::Failed(e.to_string()))?;
    let target = booted.other();
    if let Some(r) = &existing
        && r.target != target
    {
        return Err(UpdateEnd::Failed(format!(
            "the update was being written to slot {} but that slot is now running",
            r.target.name()
        )));
    }
    let target_path = agent.cfg.slot_path(target).to_path_buf();
    let booted_path = agent.cfg.slot_path(booted).to_path_buf();
    let source = std::fs::File::open(&booted_path)
        .map_err(|e| format!("opening booted slot {}: {e}", booted_path.display()))?;
    let dest = open_rw(&target_path).map_err(|e| {
        format!(
            "opening slot {} ({}): {e}",
            target.name(),
            target_path.display()
        )
    })?;
    if dest.metadata().map(|m| m.is_file()).unwrap_or(false)
        && dest.metadata().map(|m| m.len()).unwrap_or(0) < manifest.to.size
    {
        dest.set_len(manifest.to.size)
            .map_err(|e| format!("growing slot file {}: {e}", target_path.display()))?;
    }
    let (source, dest) = (Arc::new(source), Arc::new(dest));
    {
        let (m, s, d) = (manifest.clone(), source.clone(), dest.clone());
        let name = target.name().to_string();
        tokio::task::spawn_blocking(move || verify::check_slots(&m, &s, &d, &name))
            .await
            .map_err(|e| e.to_string())??;
    }
    let mut rec = UpdateRecord {
        offer: offer.clone(),
        phase: existing.as_ref().map_or(Phase::Downloading, |r| r.phase),
        from_slot: booted,
        target,
        to_version: manifest.to.version.clone(),
        to_security_counter: manifest.security_counter,
        reason: None,
        switched_in_boot: None,
        verified: None,
        redone_switches: existing.as_ref().map_or(0, |r| r.redone_switches),
        final_event: None,
    };
    if existing.is_none() {
        write_atomic(&manifest_path, &envelope).map_err(|e| format!("saving the manifest: {e}"))?;
        agent.state.set_update(Some(&rec))?;
        agent
            .state
            .drop_progress_except(Some(&manifest.payload.sha256))
            .await?;
        agent
            .event(
                &offer.update_id,
                EventKind::DownloadStarted,
                Default::default(),
            )
            .await;
    }
    let payload = manifest.payload.sha256;
    let live = &agent.live;
    live.bytes_total.store(manifest.to.size, Ordering::Relaxed);
    live.ops_total
        .store(manifest.operations.len() as u64, Ordering::Relaxed);

    // sled is a hint: re-verify every extent it believes done.
    let believed = agent.state.done_ops(&payload)?;
    let bad = {
        let (m, d, ops) = (manifest.clone(), dest.clone(), believed.clone());
        let c = cancel.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<Vec<usize>> {
            let mut bad = Vec::new();
            for i in ops {
                if c.is_cancelled() {
                    break;
                }
                let op = m.operations.get(i);
                match op {
                    Some(op) if ota_delta::apply::verify_operation_output(op, &*d)? => {}
                    _ => bad.push(i),
                }
            }
            Ok(bad)
        })
        .await
        .map_err(|e| e.to_string())??
    };
    if cancel.is_cancelled() {
        return Err(UpdateEnd::Cancelled);
    }
    if !bad.is_empty() {
        tracing::warn!(
            count = bad.len(),
            "extents recorded done do not verify: redoing them"
        );
        agent.state.unmark(&payload, &bad).await?;
    }
    let done: std::collections::BTreeSet<usize> = believed
        .into_iter()
        .filter(|i| !bad.contains(i) && *i < manifest.operations.len())
        .collect();
    live.ops_done.store(done.len() as u64, Ordering::Relaxed);
    live.bytes_done.store(
        done.iter()
            .map(|&i| manifest.operations[i].dst.length)
            .sum(),
        Ordering::Relaxed,
    );
    let todo: Vec<usize> = (0..manifest.operations.len())
        .filter(|i| !done.contains(i))
        .collect();
    tracing::info!(
        resumed = done.len(),
        todo = todo.len(),
        "downloading into slot {}",
        target.name()
    );
    agent.set_status("downloading", Some(&rec), None);

    if !todo.is_empty() {
        let stats = Arc::new(PoolStats::default());
        *agent.pool_stats.lock().unwrap_or_else(|e| e.into_inner()) = stats.clone();
        let cfg = PoolConfig {
            parallel: agent
                .cfg
                .parallel_ranges
                .min(offer.max_parallel_ranges.max(1) as usize),
            range_size: agent.cfg.range_size,
            memory_budget: agent.cfg.memory_budget,
            stall_timeout: agent.cfg.stall_timeout,
            attempts: agent.cfg.range_attempts,
            bandwidth_limit: agent.live_settings.bandwidth_limit(),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        };
        let (tx, rx) = mpsc::channel(256);
        let source: Option<Arc<std::fs::File>> = manifest.from.as_ref().map(|_| source.clone());
        let pool_fut = pool::run(
            &agent.client,
            &offer.payload_url,
            manifest.clone(),
            &todo,
            dest.clone(),
            source,
            &cfg,
            &cancel,
            tx,
            stats,
        );
        let rec_fut = recorder(&agent, &manifest, &rec, dest.clone(), rx);
        let (pooled, recorded) = tokio::join!(pool_fut, rec_fut);
        recorded?;
        match pooled {
            Ok(()) => {}
            Err(PoolError::Cancelled) => return Err(UpdateEnd::Cancelled),
            Err(e) => return Err(UpdateEnd::Failed(e.to_string())),
        }
    }
    if rec.phase == Phase::Downloading {
        agent
            .event(
                &offer.update_id,
                EventKind::Downloaded,
                EventDetail {
                    progress: Some(live.snapshot()),
                    ..Default::default()
                },
            )
            .await;
        rec.phase = Phase::Installing;
        agent.state.set_update(Some(&rec))?;
    }
    agent.set_status("installing", Some(&rec), None);

    // The whole image, read back from the slot.
    let actual = {
        let (d, len, c) = (dest.clone(), manifest.to.size, cancel.clone());
        tokio::task::spawn_blocking(move || hash_cancellable(&*d, len, &c))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading back slot {}: {e}", target.name()))?
    };
    let Some(actual) = actual else {
        return Err(UpdateEnd::Cancelled);
    };
    if actual != manifest.to.sha256 {
        // Something changed the slot behind our back: forget all progress so
        // a retry re-verifies and rewrites.
        agent.state.drop_progress_except(None).await?;
        return Err(UpdateEnd::Failed(format!(
            "slot {} holds sha256 {actual} after applying, the manifest says {}",
            target.name(),
            manifest.to.sha256
        )));
    }
    dest.sync_all()
        .map_err(|e| format!("syncing slot {}: {e}", target.name()))?;
    // A gated offer (the rollout has maintenance windows): verified, the
    // switch waits for the server's `install` or a local install-now. The
    // download lease is released by the server on `waiting-for-window`.
    if offer.install_gated && !crate::install_now::take(&agent.cfg.data_dir, &offer.update_id) {
        rec.phase = Phase::WaitingForWindow;
        rec.verified = Some(VerifiedImage {
            sha256: manifest.to.sha256,
            size: manifest.to.size,
        });
        agent.state.set_update(Some(&rec))?;
        agent
            .event(
                &offer.update_id,
                EventKind::WaitingForWindow,
                EventDetail {
                    progress: Some(live.snapshot()),
                    ..Default::default()
                },
            )
            .await;
        tracing::info!(
            "verified in slot {}; waiting for the maintenance window to switch",
            target.name()
        );
        agent.set_status("waiting-for-window", Some(&rec), None);
        return Ok(Done::Waiting(Box::new(rec)));
    }
    // The decision is recorded (with this boot's id) before the boot
    // environment changes: after a crash or power cut, `after_boot` then
    // knows whether the switch may have happened and whether the device has
    // rebooted since, instead of guessing from the environment alone.
    switch_boot(&agent, &mut rec).await?;
    Ok(Done::Reboot)
}

/// SHA-256 of `[0, len)`, or `None` if cancelled midway.
fn hash_cancellable<R: ReadAt + ?Sized>(
    r: &R,
    len: u64,
    cancel: &CancellationToken,
) -> std::io::Result<Option<Digest>> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let n = (len - at).min(buf.len() as u64) as usize;
        r.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(Some(h.into()))
}

/// Receives applied operations, fsyncs the slot, then records them: the
/// order that makes sled's "done" trustworthy enough to be a hint. Runs
/// until the pool drops its sender; not cancellable (it only writes).
///
/// # Cancel safety
/// Must not be cancelled: it is joined with the pool, which is what keeps
/// "recorded done" behind "synced to the slot".
async fn recorder(
    agent: &Agent,
    manifest: &Manifest,
    rec: &UpdateRecord,
    dest: Arc<std::fs::File>,
    mut rx: mpsc::Receiver<usize>,
) -> Result<(), UpdateEnd> {
    let payload = manifest.payload.sha256;
    let mut pending: Vec<usize> = Vec::new();
    let mut pending_bytes = 0u64;
    let mut last_flush = Instant::now();
    let mut last_event = Instant::now() - Duration::from_secs(10);
    // Sync at least every 8 MiB or half second: bounds what a power cut
    // makes us fetch again, at a small cost in throughput (measured:
    // 256 MiB in 2.06 s with these, 1.77 s syncing only at the end).
    let sync_bytes: u64 = 8 << 20;
    let sync_every = Duration::from_millis(500);
    loop {
        let next = tokio::time::timeout(Duration::from_millis(250), rx.recv()).await;
        let closed = matches!(next, Ok(None));
        if let Ok(Some(i)) = next {
            pending.push(i);
            pending_bytes += manifest.operations[i].dst.length;
        }
        let due = closed
            || pending_bytes >= sync_bytes
            || (!pending.is_empty() && last_flush.elapsed() >= sync_every);
        if due && !pending.is_empty() {
            let d = dest.clone();
            tokio::task::spawn_blocking(move || d.sync_data())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("syncing the target slot: {e}"))?;
            agent.state.mark_done(&payload, &pending).await?;
            agent
                .live
                .ops_done
                .fetch_add(pending.len() as u64, Ordering::Relaxed);
            agent
                .live
                .bytes_done
                .fetch_add(pending_bytes, Ordering::Relaxed);
            pending.clear();
            pending_bytes = 0;
            last_flush = Instant::now();
            agent.set_status("downloading", Some(rec), None);
            if last_event.elapsed() >= Duration::from_secs(2) || closed {
                last_event = Instant::now();
                agent
                    .event(
                        &rec.offer.update_id,
                        EventKind::Progress,
                        EventDetail {
                            progress: Some(agent.live.snapshot()),
                            ..Default::default()
                        },
                    )
                    .await;
            }
        }
        if closed {
            return Ok(());
        }
    }
}
