//! Reloading `server.toml` without a restart (`SIGHUP`, or
//! `POST /api/v1/admin/reload`).
//!
//! A reload is all or nothing: the new file is parsed and validated, every
//! resource it names is opened (the TLS certificate and key, the signing
//! keys, the log filter) and only then is each live value swapped, each in
//! one atomic pointer store (`arc-swap`). A request reads the configuration
//! once, so one in flight finishes on the old values while the next sees the
//! new ones; nothing waits on a lock. A file that does not validate, or a
//! certificate that does not match its key, is refused with one log line
//! naming the problem, and everything stays as it was.
//!
//! Reloadable: `[checkin]` (pacing, lease), `[tls] client_crls` (and the
//! CRL files' contents), `[connections]` (timeouts and
//! caps of new connections; open ones keep theirs), `freshness_secs`,
//! `log_level`,
//! the TLS certificate and key (they expire: renew the files, then reload),
//! the signing keys (`signing_key`, `[signing]`: a key rotation without a
//! restart). Everything else (listen address, data directory, storage,
//! throttle backend, admin token, enrollment key, build settings, turning
//! TLS on or off, the fleet CA `client_ca` / `client_ca_key` /
//! `client_cert_days`) needs a restart; a reload that changes one of those is
//! refused, so an operator never believes a change took effect when it did
//! not.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ConnectionsConfig, ServerConfig, TlsConfig};
use crate::rollout::Pacing;
use crate::signing::{SignerSlot, Signers};
use crate::tls::Refusals;

/// Why a reload was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the server was started without a configuration file, so there is nothing to reload")]
    NoFile,
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "{0} changed: that setting needs a restart (nothing was changed; revert it, or restart ota-server)"
    )]
    NeedsRestart(&'static str),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("signing keys: {0}")]
    Signing(#[from] crate::signing::SigningError),
    #[error("log_level: {0}")]
    LogLevel(String),
    #[error("another reload is in progress; try again")]
    Busy,
}

/// Loads a certificate chain and its private key (PEM) into what rustls
/// serves, checking that they belong together.
pub fn load_certified_key(tls: &TlsConfig) -> Result<CertifiedKey, ReloadError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ReloadError::Tls(format!("certificate {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(ReloadError::Tls(format!(
            "{} holds no certificate",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| ReloadError::Tls(format!("private key {}: {e}", tls.key.display())))?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::aws_lc_rs::default_provider()).map_err(
        |e| {
            ReloadError::Tls(format!(
                "certificate {} and key {} do not make a usable pair: {e}",
                tls.cert.display(),
                tls.key.display()
            ))
        },
    )
}

/// Serves whatever certificate is current: new TLS handshakes pick up a
/// reloaded certificate, established connections keep theirs.
#[derive(Debug)]
pub struct LiveCert(ArcSwap<CertifiedKey>);

impl LiveCert {
    pub fn new(key: CertifiedKey) -> LiveCert {
        LiveCert(ArcSwap::from_pointee(key))
    }
    pub fn store(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Applies a log filter (installed by the binary; absent in tests, where
/// a changed `log_level` is then validated but not applied).
pub type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_RELOADER: std::sync::OnceLock<LogReloader> = std::sync::OnceLock::new();

/// Installs the process's log-filter reloader (once, by `main`).
pub fn set_log_reloader(f: LogReloader) {
    let _ = LOG_RELOADER.set(f);
}

/// Checks that `level` is a valid `tracing` filter (`info`,
/// `warn,ota_server=debug`, ...).
pub fn check_log_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("{level:?} is not a log filter: {e}"))
}

/// Applies `level` now, if a reloader is installed.
pub fn apply_log_level(level: &str) -> Result<(), String> {
    match LOG_RELOADER.get() {
        Some(f) => f(level),
        None => Ok(()),
    }
}

/// The live, swappable part of the configuration.
pub struct Live {
    config: ArcSwap<ServerConfig>,
    pacing: Arc<ArcSwap<Pacing>>,
    cert: Option<Arc<LiveCert>>,
    signers: SignerSlot,
    /// The listener's limits ([`crate::listener::Listener::limits`]), set
    /// once the listener exists.
    connections: OnceLock<watch::Sender<Arc<ConnectionsConfig>>>,
    /// The HTTPS listener's rustls configuration and the refusals its client
    /// verifier records into, set once the listener exists: a reload
    /// rebuilds the configuration (fleet CA, CRLs) around the same ones.
    tls: OnceLock<(RustlsConfig, Arc<Refusals>)>,
    reloading: AtomicBool,
}

/// The engines' view of the pacing knobs.
pub fn pacing_of(c: &ServerConfig) -> Pacing {
    Pacing {
        lease_ms: c.checkin.lease_ms,
        idle_ms: c.checkin.idle_interval_ms,
        max_parallel_ranges: c.checkin.max_parallel_ranges,
    }
}

impl Live {
    pub fn new(
        config: ServerConfig,
        pacing: Arc<ArcSwap<Pacing>>,
        cert: Option<Arc<LiveCert>>,
        signers: SignerSlot,
    ) -> Live {
        Live {
            config: ArcSwap::from_pointee(config),
            pacing,
            cert,
            signers,
            connections: OnceLock::new(),
            tls: OnceLock::new(),
            reloading: AtomicBool::new(false),
        }
    }

    /// The current configuration. Load it once per request.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Where a reload sends new `[connections]` limits (the listener's
    /// channel). Set once; a second call is ignored.
    pub fn set_connection_limits(&self, tx: watch::Sender<Arc<ConnectionsConfig>>) {
        let _ = self.connections.set(tx);
    }

    /// The HTTPS listener's rustls configuration, rebuilt by a reload. Set
    /// once; a second call is ignored.
    pub fn set_tls(&self, config: RustlsConfig, refusals: Arc<Refusals>) {
        let _ = self.tls.set((config, refusals));
    }

    /// The certificate resolver of the HTTPS listener (`None`: plain HTTP).
    pub fn cert_resolver(&self) -> Option<Arc<LiveCert>> {
        self.cert.clone()
    }

    /// Re-reads the file the configuration came from and swaps in what
    /// changed; see the module documentation.
    ///
    /// # Cancel safety
    /// Cancel safe: every swap happens after the last `.await`, so a
    /// cancelled reload changes nothing (a blocking key load it started
    /// finishes and is dropped).
    pub async fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        if self.reloading.swap(true, Ordering::AcqRel) {
            return Err(ReloadError::Busy);
        }
        struct Clear<'a>(&'a AtomicBool);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _clear = Clear(&self.reloading);
        let old = self.config();
        let path = old.source.clone().ok_or(ReloadError::NoFile)?;
        let r = self.reload_from(&old, &path).await;
        match &r {
            Ok(changed) => info!(path = %path.display(), ?changed, "configuration reloaded"),
            Err(e) => {
                warn!(path = %path.display(), "configuration reload refused, the running configuration stays: {e}")
            }
        }
        r
    }

    async fn reload_from(
        &self,
        old: &ServerConfig,
        path: &Path,
    ) -> Result<Vec<&'static str>, ReloadError> {
        let path: PathBuf = path.into();
        let new = tokio::task::spawn_blocking(move || ServerConfig::load(&path))
            .await
            .map_err(|e| ReloadError::Tls(format!("loading task failed: {e}")))??;
        fixed_settings_unchanged(old, &new)?;
        // Open everything first; swap only when all of it worked.
        let cert = match &new.tls {
            Some(tls) => {
                let tls = tls.clone();
                Some(
                    tokio::task::spawn_blocking(move || load_certified_key(&tls))
                        .await
                        .map_err(|e| ReloadError::Tls(e.to_string()))??,
                )
            }
            None => None,
        };
        // The client verifier reads the fleet CA and the CRL files: a
        // renewed CRL applies at reload (same path, new content).
        let tls_config = match (&new.tls, self.tls.get(), &self.cert) {
            (Some(t), Some((_, refusals)), Some(live)) => {
                let (t, refusals) = (t.clone(), refusals.clone());
                let resolver: Arc<dyn ResolvesServerCert> = live.clone();
                Some(
                    tokio::task::spawn_blocking(move || {
                        crate::tls::server_config(&t, &refusals, resolver)
                    })
                    .await
                    .map_err(|e| ReloadError::Tls(e.to_string()))?
                    .map_err(|e| ReloadError::Tls(e.to_string()))?,
                )
            }
            _ => None,
        };
        let signers = if new.signing_key != old.signing_key
            || format!("{:?}", new.signing) != format!("{:?}", old.signing)
        {
            let (file, token) = (new.signing_key.clone(), new.signing.clone());
            Some(
                tokio::task::spawn_blocking(move || Signers::open(file.as_deref(), token.as_ref()))
                    .await
                    .map_err(|e| ReloadError::Tls(e.to_string()))??,
            )
        } else {
            None
        };
        if let Some(level) = &new.log_level {
            check_log_level(level).map_err(ReloadError::LogLevel)?;
        }
        // Commit.
        let mut changed = Vec::new();
        if let Some(level) = &new.log_level
            && new.log_level != old.log_level
        {
            apply_log_level(level).map_err(ReloadError::LogLevel)?;
            changed.push("log_level");
        }
        if let (Some(live), Some(cert)) = (&self.cert, cert) {
            live.store(cert);
            changed.push("tls certificate");
        }
        if let (Some((rustls, _)), Some(c)) = (self.tls.get(), tls_config) {
            rustls.reload_from_config(c);
            if new.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
                changed.push("tls client_ca and client_crls");
            }
        }
        if let Some(s) = signers {
            info!(keys = ?s.keyids(), "signing keys swapped");
            self.signers.store(Arc::new(s));
            changed.push("signing keys");
        }
        let pacing = pacing_of(&new);
        if format!("{:?}", new.checkin) != format!("{:?}", old.checkin) {
            changed.push("checkin");
        }
        if format!("{:?}", new.connections) != format!("{:?}", old.connections) {
            if let Some(tx) = self.connections.get() {
                tx.send_replace(Arc::new(new.connections.clone()));
            }
            changed.push("[connections]");
        }
        if new.freshness_secs != old.freshness_secs {
            changed.push("freshness_secs");
        }
        self.pacing.store(Arc::new(pacing));
        self.config.store(Arc::new(new));
        Ok(changed)
    }
}

/// Refuses a reload that changes a setting only a restart applies.
/// The settings the builder took at start-up, as one comparable string.
fn build_settings(c: &ServerConfig) -> String {
    format!(
        "{} {} {} {} {} {} {} {} {} {} {} {}",
        c.delta_history,
        c.chunk_size,
        c.zstd_level,
        c.full_zstd_level,
        c.delta_xz,
        c.delta_zero_runs,
        c.delta_arm64,
        c.delta_frames,
        c.build_threads,
        c.build_nice,
        c.manifest_expiry_days,
        c.egress_bytes_per_sec
    )
}

fn fixed_settings_unchanged(old: &ServerConfig, new: &ServerConfig) -> Result<(), ReloadError> {
    let same = |a: String, b: String, what| {
        if a == b {
            Ok(())
        } else {
            Err(ReloadError::NeedsRestart(what))
        }
    };
    same(old.listen.clone(), new.listen.clone(), "listen")?;
    same(
        old.data_dir.display().to_string(),
        new.data_dir.display().to_string(),
        "data_dir",
    )?;
    same(
        format!("{:?}", old.storage),
        format!("{:?}", new.storage),
        "[storage]",
    )?;
    same(
        format!("{:?}", old.throttle),
        format!("{:?}", new.throttle),
        "[throttle]",
    )?;
    same(
        old.admin_token.clone(),
        new.admin_token.clone(),
        "admin_token",
    )?;
    same(
        old.enrollment_key.clone(),
        new.enrollment_key.clone(),
        "enrollment_key",
    )?;
    same(
        build_settings(old),
        build_settings(new),
        "a build setting (delta_history, chunk_size, zstd_level, full_zstd_level, delta_xz, delta_zero_runs, delta_arm64, delta_frames, build_threads, build_nice, manifest_expiry_days) or egress_bytes_per_sec",
    )?;
    same(
        old.tls.is_some().to_string(),
        new.tls.is_some().to_string(),
        "[tls] (turning TLS on or off)",
    )?;
    // The CA that signs devices' CSRs is loaded at start (`App::device_ca`)
    // and must stay the issuer the verifier trusts.
    let signing_ca = |c: &ServerConfig| {
        c.tls
            .as_ref()
            .map(|t| {
                format!(
                    "{:?} {:?} {}",
                    t.client_ca, t.client_ca_key, t.client_cert_days
                )
            })
            .unwrap_or_default()
    };
    same(
        signing_ca(old),
        signing_ca(new),
        "tls.client_ca, tls.client_ca_key or tls.client_cert_days",
    )?;
    Ok(())
}
