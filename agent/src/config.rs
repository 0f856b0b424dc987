//! The agent's configuration file (`/etc/ota-agent/agent.toml`).
//!
//! Every option is listed in [`Config`] with its default. [`Config::load`]
//! parses and then [`Config::validate`]s, so the rest of the agent never sees
//! a configuration that cannot work (no slots that are the same device, no
//! zero parallelism, no missing key). `deploy/agent.toml` is the annotated
//! example.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("configuration option `{option}`: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
}

fn invalid(option: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        reason: reason.into(),
    }
}

/// The whole configuration. Durations are humantime strings (`"10s"`,
/// `"5m"`), sizes plain byte counts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the rollout server, e.g. `https://ota.example.com`.
    /// Required.
    pub server_url: String,
    /// This device's id (1–128 of `[A-Za-z0-9._:+-]`). Required.
    pub device_id: String,
    /// This device's type; manifests for another type are refused. Required.
    pub device_type: String,
    /// Labels sent at enrollment, used by rollout selectors. Default: none.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// This device's time zone, an IANA name (`Europe/Berlin`), reported in
    /// every check-in: a rollout's `local` maintenance windows open on this
    /// zone's wall clock. Default: the system's (`/etc/timezone`, else the
    /// zone `/etc/localtime` links to), read at each check-in so a change
    /// (`timedatectl set-timezone`) is reported; none if neither says.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// File holding the fleet enrollment key, used once to obtain a device
    /// token when `token_file` does not exist yet. Default: none (then the
    /// token file must be provisioned).
    #[serde(default)]
    pub enrollment_key_file: Option<PathBuf>,
    /// Where the device token is kept (written 0600 after enrollment).
    /// Default: `<data_dir>/token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// This device's X.509 client certificate (PEM), presented in the TLS
    /// handshake so the server knows the device by it (mTLS). When it does
    /// not exist yet, the agent enrolls with a CSR for `client_key` and
    /// writes the certificate the server returns here. Needs `client_key`
    /// and an `https://` `server_url`. Default: none (bearer token only).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The private key of `client_cert` (PKCS#8 PEM). Created (ECDSA P-256,
    /// 0600) on first start when missing: it never leaves the device.
    /// Default: none.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) trusted for the server's TLS certificate,
    /// instead of the system's roots. Default: none (system roots).
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// Directory of the agent's state: the sled database (progress hints,
    /// events outbox, event counter), the current update's manifest and the
    /// atomically replaced decision files. Default: `/var/lib/ota-agent`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Trusted manifest signing keys (SPKI PEM files). At least one.
    pub trusted_keys: Vec<PathBuf>,
    /// How many of `trusted_keys` must have signed a manifest. Default: 1.
    #[serde(default = "one")]
    pub key_threshold: usize,
    /// Refuse check-in answers without a signed freshness statement, even
    /// before the first one was seen (once one was seen they are always
    /// required). Default: false, for servers older than statements; set it
    /// on new fleets.
    #[serde(default)]
    pub require_freshness: bool,
    /// The version the factory image runs, used until the agent has
    /// committed an update of its own. Default: `"0"`.
    #[serde(default = "default_factory_version")]
    pub factory_version: String,
    /// Security counter of the factory image. Default: 0.
    #[serde(default)]
    pub factory_security_counter: u64,
    /// The two slots: block devices or files.
    pub slots: SlotsConfig,
    /// Boot-control back-end.
    pub boot: BootConfig,
    /// Range requests in flight at once (the server's `max_parallel_ranges`
    /// may lower it). Default: 4.
    #[serde(default = "default_parallel")]
    pub parallel_ranges: usize,
    /// Target size of one range request: adjacent operations' data are
    /// fetched together up to this size, larger data are split. Default:
    /// 1 MiB (1048576).
    #[serde(default = "default_range_size")]
    pub range_size: u64,
    /// Memory that operations being fetched and applied may hold together,
    /// as `ota_delta::apply::op_memory` bounds each. Default: 16 MiB
    /// (16777216), which keeps the agent under 32 MiB resident on any
    /// update (README, "Agent memory"). One larger operation still runs,
    /// alone.
    #[serde(default = "default_memory_budget")]
    pub memory_budget: u64,
    /// Download bandwidth cap in bytes per second, 0 for none. Default: 0.
    #[serde(default)]
    pub bandwidth_limit: u64,
    /// A range request that receives no byte for this long is abandoned and
    /// retried (stall detection). Default: `"15s"`.
    #[serde(default = "default_stall", with = "humantime_serde_compat")]
    pub stall_timeout: Duration,
    /// Timeout of the API calls (enroll, check-in, events, manifest).
    /// Default: `"30s"`.
    #[serde(default = "default_request_timeout", with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Attempts per range before the update fails. Default: 8.
    #[serde(default = "default_retries")]
    pub range_attempts: u32,
    /// Longest wait between check-ins when the server is unreachable
    /// (exponential backoff with jitter up to this). Default: `"5m"`.
    #[serde(default = "default_max_backoff", with = "humantime_serde_compat")]
    pub max_backoff: Duration,
    /// Check-in interval used before the server has said one. Default: `"60s"`.
    #[serde(default = "default_checkin", with = "humantime_serde_compat")]
    pub checkin_interval: Duration,
    /// Run with `sh -c` after booting a new slot; exit status 0 is healthy.
    /// Default: `"true"` (always healthy).
    #[serde(default = "default_health")]
    pub health_check: String,
    /// How long the health check may run before it counts as failed.
    /// Default: `"120s"`.
    #[serde(default = "default_health_timeout", with = "humantime_serde_compat")]
    pub health_timeout: Duration,
    /// Run with `sh -c` to reboot after switching slots (or rolling back).
    /// When it returns, the agent exits: the reboot is under way.
    /// Default: `"systemctl reboot"`.
    #[serde(default = "default_reboot")]
    pub reboot_command: String,
    /// `"journal"` (no timestamps, systemd's journal adds them) or `"text"`.
    /// Default: `"text"`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Log filter (`info`, `warn,ota_agent=debug`, ...), applied at start
    /// (over `RUST_LOG`) and at every reload (`SIGHUP`). Default: unset
    /// (`RUST_LOG`, else `info`).
    #[serde(default)]
    pub log_level: Option<String>,
    /// The file this configuration was read from (what `SIGHUP` re-reads).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The A/B slots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsConfig {
    pub a: PathBuf,
    pub b: PathBuf,
}

/// Boot-control back-end and its variable names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// `"file"` (a state file: tests and demos), `"uboot"` (fw_printenv /
    /// fw_setenv) or `"grub"` (grub-editenv). Required.
    pub backend: String,
    /// `file`: the state file. `grub`: the grubenv file (default
    /// `/boot/grub/grubenv`). `uboot`: the `fw_env.config` for
    /// `fw_printenv`/`fw_setenv -c` (default: the tools' `/etc/fw_env.config`).
    #[serde(default)]
    pub env_file: Option<PathBuf>,
    /// Variable holding the slot to boot, `a`/`b`. Default: `"boot_part"`.
    #[serde(default = "default_var_part")]
    pub slot_var: String,
    /// Variable set to 1 while a new slot is on trial. Default:
    /// `"upgrade_available"`.
    #[serde(default = "default_var_upgrade")]
    pub upgrade_available_var: String,
    /// Boot counter the bootloader increments while on trial. Default:
    /// `"bootcount"`.
    #[serde(default = "default_var_bootcount")]
    pub bootcount_var: String,
    /// Boots on trial before the bootloader falls back (the file back-end
    /// models this; for U-Boot it is the `bootlimit` variable). Default: 3.
    #[serde(default = "default_bootlimit")]
    pub bootlimit: u32,
    /// Value of the slot variable for slot A and slot B. Default: `"a"`, `"b"`.
    #[serde(default = "default_slot_values")]
    pub slot_values: [String; 2],
    /// `uboot`/`grub`: how to tell which slot is running: a kernel command
    /// line substring per slot (A, B), e.g. `["root=/dev/mmcblk0p2",
    /// "root=/dev/mmcblk0p3"]`. Default: `root=<slot path>`.
    #[serde(default)]
    pub cmdline_markers: Option<[String; 2]>,
    /// `uboot`/`grub`: where the kernel command line is read. Default
    /// `/proc/cmdline`; other paths are for tests and containers.
    #[serde(default = "default_cmdline_file")]
    pub cmdline_file: PathBuf,
}

fn default_cmdline_file() -> PathBuf {
    "/proc/cmdline".into()
}

mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

fn default_data_dir() -> PathBuf {
    "/var/lib/ota-agent".into()
}
fn one() -> usize {
    1
}
fn default_factory_version() -> String {
    "0".into()
}
fn default_parallel() -> usize {
    4
}
fn default_range_size() -> u64 {
    1 << 20
}
fn default_memory_budget() -> u64 {
    ota_delta::apply::APPLY_MEMORY_BUDGET
}
fn default_stall() -> Duration {
    Duration::from_secs(15)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retries() -> u32 {
    8
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_checkin() -> Duration {
    Duration::from_secs(60)
}
fn default_health() -> String {
    "true".into()
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_reboot() -> String {
    "systemctl reboot".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_var_part() -> String {
    "boot_part".into()
}
fn default_var_upgrade() -> String {
    "upgrade_available".into()
}
fn default_var_bootcount() -> String {
    "bootcount".into()
}
fn default_bootlimit() -> u32 {
    3
}
fn default_slot_values() -> [String; 2] {
    ["a".into(), "b".into()]
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut c = Self::from_toml(&text, path)?;
        c.source = Some(path.into());
        Ok(c)
    }

    /// Parses and validates configuration text (`path` only names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks everything that can be checked without touching the device.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use ota_format::api::check_name;
        if !(self.server_url.starts_with("http://") || self.server_url.starts_with("https://")) {
            return Err(invalid("server_url", "must start with http:// or https://"));
        }
        check_name("device id", &self.device_id).map_err(|e| invalid("device_id", e))?;
        check_name("device type", &self.device_type).map_err(|e| invalid("device_type", e))?;
        check_name("version", &self.factory_version).map_err(|e| invalid("factory_version", e))?;
        ota_format::Version::parse(&self.factory_version)
            .map_err(|e| invalid("factory_version", e.to_string()))?;
        if self.trusted_keys.is_empty() {
            return Err(invalid("trusted_keys", "name at least one public key file"));
        }
        if self.key_threshold == 0 || self.key_threshold > self.trusted_keys.len() {
            return Err(invalid(
                "key_threshold",
                format!(
                    "must be 1..={} (the number of trusted keys)",
                    self.trusted_keys.len()
                ),
            ));
        }
        if self.slots.a == self.slots.b {
            return Err(invalid("slots", "slot a and slot b are the same path"));
        }
        if !(1..=64).contains(&self.parallel_ranges) {
            return Err(invalid("parallel_ranges", "must be 1..=64"));
        }
        if !(4096..=(64 << 20)).contains(&self.range_size) {
            return Err(invalid("range_size", "must be 4 KiB ..= 64 MiB"));
        }
        if self.memory_budget < (1 << 20) {
            return Err(invalid("memory_budget", "must be at least 1 MiB"));
        }
        if self.stall_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(invalid("stall_timeout", "timeouts must be positive"));
        }
        if self.range_attempts == 0 {
            return Err(invalid("range_attempts", "must be at least 1"));
        }
        match self.boot.backend.as_str() {
            "file" if self.boot.env_file.is_none() => {
                return Err(invalid(
                    "boot.env_file",
                    "the file back-end needs a state file",
                ));
            }
            "file" | "uboot" | "grub" => {}
            other => {
                return Err(invalid(
                    "boot.backend",
                    format!("{other:?} is not one of file, uboot, grub"),
                ));
            }
        }
        if self.boot.slot_values[0] == self.boot.slot_values[1] {
            return Err(invalid("boot.slot_values", "the two values must differ"));
        }
        if let Some(level) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| invalid("log_level", format!("{level:?} is not a log filter: {e}")))?;
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid(
                "client_cert",
                "client_cert and client_key go together: set both or neither",
            ));
        }
        if (self.client_cert.is_some() || self.server_ca.is_some())
            && !self.server_url.starts_with("https://")
        {
            return Err(invalid(
                "server_url",
                "client_cert and server_ca need an https:// server_url",
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "journal") {
            return Err(invalid("log_format", "must be \"text\" or \"journal\""));
        }
        Ok(())
    }

    /// Where the device token lives.
    pub fn token_path(&self) -> PathBuf {
        self.token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("token"))
    }

    /// Path of a slot.
    pub fn slot_path(&self, slot: ota_format::api::Slot) -> &Path {
        match slot {
            ota_format::api::Slot::A => &self.slots.a,
            ota_format::api::Slot::B => &self.slots.b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
server_url = "http://127.0.0.1:1"
device_id = "dev-1"
device_type = "rpi4"
trusted_keys = ["/k.pub"]
[slots]
a = "/dev/a"
b = "/dev/b"
[boot]
backend = "file"
env_file = "/tmp/boot.env"
"#;

    #[test]
    fn defaults_are_applied() {
        let c = Config::from_toml(MIN, Path::new("t")).unwrap();
        assert_eq!(c.parallel_ranges, 4);
        assert_eq!(c.range_size, 1 << 20);
        assert_eq!(c.stall_timeout, Duration::from_secs(15));
        assert_eq!(c.token_path(), Path::new("/var/lib/ota-agent/token"));
        assert_eq!(c.boot.bootlimit, 3);
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = Config::from_toml(
            include_str!("../../deploy/agent.toml"),
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(c.boot.backend, "uboot");
        assert_eq!(c.tags["site"], "lab");
    }

    #[test]
    fn the_grub_and_file_examples_are_valid() {
        let g = Config::from_toml(
            include_str!("../../deploy/examples/agent-grub.toml"),
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(g.boot.backend, "grub");
        let f = Config::from_toml(
            include_str!("../../deploy/examples/agent-file.toml"),
            Path::new("agent.toml"),
        )
        .unwrap();
        assert_eq!(f.boot.backend, "file");
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        let bad = MIN.replace("/dev/b", "/dev/a");
        let e = Config::from_toml(&bad, Path::new("t")).unwrap_err();
        assert!(e.to_string().contains("slots"), "{e}");
        let bad = format!("parallel_ranges = 0\n{MIN}");
        let e = Config::from_toml(&bad, Path::new("t")).unwrap_err();
        assert!(e.to_string().contains("parallel_ranges"), "{e}");
        let bad = MIN.replace("\"file\"", "\"lilo\"");
        assert!(Config::from_toml(&bad, Path::new("t")).is_err());
        let bad = format!("no_such_option = 1\n{MIN}");
        assert!(Config::from_toml(&bad, Path::new("t")).is_err());
    }
}

/// The time zone this device reports ([`Config::time_zone`]): `configured`
/// if set, else the system's under `root` (`/` on a device): the first
/// line of `etc/timezone`, else the zone name `etc/localtime` links to
/// (`../usr/share/zoneinfo/Europe/Berlin`). `None` when neither gives a
/// plausible IANA name; the server then judges `local` windows in UTC.
pub fn device_time_zone(configured: Option<&str>, root: &std::path::Path) -> Option<String> {
    fn plausible(n: &str) -> Option<String> {
        let n = n.trim();
        let ok = !n.is_empty()
            && n.len() <= 64
            && !n.starts_with('/')
            && !n.split('/').any(|p| p.is_empty() || p == "." || p == "..")
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
        ok.then(|| n.to_string())
    }
    if let Some(c) = configured {
        return plausible(c);
    }
    if let Ok(t) = std::fs::read_to_string(root.join("etc/timezone"))
        && let Some(n) = t.lines().next().and_then(plausible)
    {
        return Some(n);
    }
    let link = std::fs::read_link(root.join("etc/localtime")).ok()?;
    let link = link.to_str()?;
    let (_, name) = link.rsplit_once("zoneinfo/")?;
    plausible(name.trim_start_matches("posix/"))
}

#[cfg(test)]
mod time_zone_tests {
    use super::device_time_zone;

    #[test]
    fn the_configured_zone_wins_then_etc_timezone_then_the_localtime_link() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        assert_eq!(device_time_zone(None, root.path()), None);
        std::os::unix::fs::symlink(
            "../usr/share/zoneinfo/America/New_York",
            etc.join("localtime"),
        )
        .unwrap();
        assert_eq!(
            device_time_zone(None, root.path()).as_deref(),
            Some("America/New_York")
        );
        std::fs::write(etc.join("timezone"), "Asia/Kolkata\n").unwrap();
        assert_eq!(
            device_time_zone(None, root.path()).as_deref(),
            Some("Asia/Kolkata")
        );
        assert_eq!(
            device_time_zone(Some("Asia/Dhaka"), root.path()).as_deref(),
            Some("Asia/Dhaka")
        );
        // Nothing that is not a zone name goes on the wire.
        assert_eq!(
            device_time_zone(Some("../../etc/passwd"), root.path()),
            None
        );
        std::fs::write(etc.join("timezone"), "\n").unwrap();
        assert_eq!(
            device_time_zone(None, root.path()).as_deref(),
            Some("America/New_York")
        );
    }
}
