//! `SIGHUP`: re-reading `agent.toml` while the agent runs.
//!
//! Like the server's reload, all or nothing: the new file is parsed and
//! validated, the trusted keys it names are read and checked against the
//! threshold, the log filter parsed — and only then is anything swapped
//! (`arc-swap`, one pointer store each). A verification in progress keeps
//! the key set it loaded; the next manifest or statement is checked against
//! the new one. A broken file is refused with one log line and changes
//! nothing.
//!
//! Reloadable: `trusted_keys` and `key_threshold` (a key rotation: drop the
//! retired key, reload), `bandwidth_limit` (from the next download or
//! resume), `require_freshness` is not (the floor's policy is fixed for a
//! run), `log_level`. Settings that describe the device itself (server
//! URL, id, type, slots, boot back-end, data directory) need a restart, and
//! a reload that changes them is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use ota_format::TrustedKeys;
use tracing::{info, warn};

use crate::config::Config;

/// Why a reload was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the agent was started without a configuration file")]
    NoFile,
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Keys(String),
    #[error("log_level: {0}")]
    LogLevel(String),
    #[error("{0} changed: that setting needs a restart of ota-agent (nothing was changed)")]
    NeedsRestart(&'static str),
}

/// Applies a log filter (installed by the binary).
pub type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_RELOADER: std::sync::OnceLock<LogReloader> = std::sync::OnceLock::new();

/// Installs the process's log-filter reloader (once, by `main`).
pub fn set_log_reloader(f: LogReloader) {
    let _ = LOG_RELOADER.set(f);
}

/// Applies `level` now, if a reloader is installed.
pub fn apply_log_level(level: &str) -> Result<(), String> {
    match LOG_RELOADER.get() {
        Some(f) => f(level),
        None => Ok(()),
    }
}

/// The settings a reload may change, as the daemon reads them.
pub struct LiveSettings {
    config: ArcSwap<Config>,
    trusted: ArcSwap<TrustedKeys>,
    bandwidth_limit: AtomicU64,
}

impl LiveSettings {
    pub fn new(cfg: Config, trusted: TrustedKeys) -> LiveSettings {
        LiveSettings {
            bandwidth_limit: AtomicU64::new(cfg.bandwidth_limit),
            config: ArcSwap::from_pointee(cfg),
            trusted: ArcSwap::from_pointee(trusted),
        }
    }

    /// The keys manifests and freshness statements must be signed by.
    pub fn trusted(&self) -> Arc<TrustedKeys> {
        self.trusted.load_full()
    }

    /// Download cap in bytes per second (0: none).
    pub fn bandwidth_limit(&self) -> u64 {
        self.bandwidth_limit.load(Ordering::Relaxed)
    }

    /// Re-reads the file the configuration came from. Blocking (small file
    /// reads): call from a blocking context or accept a short stall.
    pub fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        let old = self.config.load_full();
        let path = old.source.clone().ok_or(ReloadError::NoFile)?;
        let r = self.reload_from(&old, &path);
        match &r {
            Ok(changed) => info!(path = %path.display(), ?changed, "configuration reloaded"),
            Err(e) => {
                warn!(path = %path.display(), "configuration reload refused, the running configuration stays: {e}")
            }
        }
        r
    }

    fn reload_from(
        &self,
        old: &Config,
        path: &std::path::Path,
    ) -> Result<Vec<&'static str>, ReloadError> {
        let new = Config::load(path)?;
        let fixed: [(&'static str, String, String); 7] = [
            ("server_url", old.server_url.clone(), new.server_url.clone()),
            ("device_id", old.device_id.clone(), new.device_id.clone()),
            (
                "device_type",
                old.device_type.clone(),
                new.device_type.clone(),
            ),
            (
                "data_dir",
                format!("{:?}", old.data_dir),
                format!("{:?}", new.data_dir),
            ),
            (
                "slots",
                format!("{:?}", old.slots),
                format!("{:?}", new.slots),
            ),
            ("boot", format!("{:?}", old.boot), format!("{:?}", new.boot)),
            (
                "require_freshness",
                old.require_freshness.to_string(),
                new.require_freshness.to_string(),
            ),
        ];
        for (what, a, b) in fixed {
            if a != b {
                return Err(ReloadError::NeedsRestart(what));
            }
        }
        let trusted =
            crate::daemon::load_trusted(&new).map_err(|e| ReloadError::Keys(e.to_string()))?;
        if let Some(level) = &new.log_level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| ReloadError::LogLevel(format!("{level:?}: {e}")))?;
        }
        // Commit.
        let mut changed = Vec::new();
        if let Some(level) = &new.log_level
            && new.log_level != old.log_level
        {
            apply_log_level(level).map_err(ReloadError::LogLevel)?;
            changed.push("log_level");
        }
        if new.trusted_keys != old.trusted_keys || new.key_threshold != old.key_threshold {
            changed.push("trusted_keys");
        }
        // Key files may have been replaced in place: always swap.
        self.trusted.store(Arc::new(trusted));
        if new.bandwidth_limit != old.bandwidth_limit {
            changed.push("bandwidth_limit");
        }
        self.bandwidth_limit
            .store(new.bandwidth_limit, Ordering::Relaxed);
        self.config.store(Arc::new(new));
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ota_format::{Envelope, EnvelopeError, SigningKeyPair};
    use std::path::Path;

    fn write_cfg(
        dir: &Path,
        keys: &[&str],
        bandwidth: u64,
        device_type: &str,
    ) -> std::path::PathBuf {
        let keys: Vec<String> = keys.iter().map(|k| format!("{:?}", dir.join(k))).collect();
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            format!(
                "server_url = \"http://127.0.0.1:1\"\ndevice_id = \"d1\"\ndevice_type = \"{device_type}\"\n\
                 trusted_keys = [{}]\nbandwidth_limit = {bandwidth}\n\
                 [slots]\na = \"/dev/a\"\nb = \"/dev/b\"\n[boot]\nbackend = \"file\"\nenv_file = \"/tmp/x.env\"\n",
                keys.join(", ")
            ),
        )
        .unwrap();
        p
    }

    /// The retirement step of a key rotation, on a running agent: after
    /// the reload, a manifest signed only by the retired key is refused.
    #[test]
    fn sighup_reload_swaps_keys_and_cap_and_a_broken_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            SigningKeyPair::generate().unwrap(),
            SigningKeyPair::generate().unwrap(),
        );
        std::fs::write(dir.path().join("old.pub"), old.public_pem()).unwrap();
        std::fs::write(dir.path().join("new.pub"), new.public_pem()).unwrap();
        let p = write_cfg(dir.path(), &["old.pub", "new.pub"], 0, "rpi4");
        let cfg = Config::load(&p).unwrap();
        let live = LiveSettings::new(cfg.clone(), crate::daemon::load_trusted(&cfg).unwrap());
        let by_old = Envelope::sign(b"{}", &[&old]);
        assert!(by_old.verify(&live.trusted()).is_ok());

        // Retire the old key, cap the bandwidth.
        write_cfg(dir.path(), &["new.pub"], 1 << 20, "rpi4");
        let changed = live.reload().unwrap();
        assert!(changed.contains(&"trusted_keys") && changed.contains(&"bandwidth_limit"));
        assert!(matches!(
            by_old.verify(&live.trusted()),
            Err(EnvelopeError::UntrustedSigner { .. })
        ));
        assert!(
            Envelope::sign(b"{}", &[&new])
                .verify(&live.trusted())
                .is_ok()
        );
        assert_eq!(live.bandwidth_limit(), 1 << 20);

        // Broken files: refused, nothing changes.
        let before = live.trusted();
        std::fs::write(&p, "server_url = [").unwrap();
        assert!(matches!(live.reload(), Err(ReloadError::Config(_))));
        write_cfg(dir.path(), &["missing.pub"], 5, "rpi4");
        assert!(matches!(live.reload(), Err(ReloadError::Keys(_))));
        write_cfg(dir.path(), &["new.pub"], 5, "x86");
        assert!(matches!(
            live.reload(),
            Err(ReloadError::NeedsRestart("device_type"))
        ));
        assert!(Arc::ptr_eq(&before, &live.trusted()));
        assert_eq!(live.bandwidth_limit(), 1 << 20);
    }
}
