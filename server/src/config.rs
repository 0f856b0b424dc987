//! `server.toml`: every option, its default, and why.
//!
//! [`ServerConfig::load`] is the only way to get a config, and it validates,
//! so a server never runs with, say, a zero lease or an empty admin token.

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
    #[error("{0}")]
    Invalid(String),
}

/// The server's configuration (`server.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory holding the sled database, images and artifacts. Required.
    pub data_dir: PathBuf,
    /// Shared secret devices present to enroll themselves. Empty disables
    /// self-enrollment (devices must then be pre-provisioned with
    /// `ota-server device add`).
    #[serde(default)]
    pub enrollment_key: String,
    /// Token for the admin API (the CLI reads it from `OTA_ADMIN_TOKEN` or
    /// `--admin-token`). At least 16 characters.
    pub admin_token: String,
    /// PKCS#8 PEM ed25519 key that signs the manifests the server builds.
    /// Optional when `[signing]` names keys in a PKCS#11 token; when both
    /// are set, every manifest carries both signatures (key rotation).
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// `[signing]`: keys in a PKCS#11 token (see [`crate::signing`]).
    #[serde(default)]
    pub signing: Option<crate::signing::Pkcs11Config>,
    /// Lifetime of the signed freshness statements in check-in answers
    /// (seconds). Default 3600. A device refuses a statement older than
    /// this, so it bounds how long a replayed answer can freeze a device;
    /// statements are re-signed every quarter of it.
    #[serde(default = "default_freshness_secs")]
    pub freshness_secs: u64,
    /// Log filter (`info`, `warn,ota_server=debug`, ...), applied at start
    /// and at every reload. Default: unset (`RUST_LOG`, else `info`).
    #[serde(default)]
    pub log_level: Option<String>,
    /// The file this configuration was read from (what a reload re-reads).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// How many earlier releases of a device type get a delta to a new
    /// release. Devices on older versions get the full image. Default 3.
    #[serde(default = "default_delta_history")]
    pub delta_history: usize,
    /// Target size of a changed chunk in built deltas (bytes). Default 1 MiB.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
    /// zstd level for built deltas. Default: see [`DEFAULT_ZSTD_LEVEL`].
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// zstd level for full-image payloads, which only devices without a
    /// delta fetch. Default: see [`DEFAULT_FULL_ZSTD_LEVEL`].
    #[serde(default = "default_full_zstd_level")]
    pub full_zstd_level: i32,
    /// Whether deltas may use xz (LZMA2) for bsdiff streams where smaller
    /// (5-7 % smaller deltas of binaries, about 0.1 CPU s more per 20 MB
    /// applied). Default `"auto"`: a delta from a version uses xz when every
    /// agent seen on that version since the server started lists `xz` in
    /// its check-ins ([`CodecUse::Auto`]). `true` uses it regardless: agents
    /// that do not decode it then get the full image instead of the delta.
    /// `false` never uses it.
    #[serde(default)]
    pub delta_xz: CodecUse,
    /// Whether deltas that use xz may also zero-run code their bsdiff diff
    /// streams where smaller (1-4 % smaller deltas of binaries, and a
    /// fraction of xz's generation CPU on those streams); agents list it as
    /// `zero-runs`. Default `"auto"`, as for `delta_xz`.
    #[serde(default)]
    pub delta_zero_runs: CodecUse,
    /// Whether deltas that use xz may also store new AArch64 code (`REPLACE`
    /// data, bsdiff extra streams) arm64-transformed where smaller: BL and
    /// ADRP immediates made absolute before xz, 2-9 % smaller deltas of
    /// aarch64 executables; agents list it as `arm64`. Default `"auto"`, as
    /// for `delta_xz`.
    #[serde(default)]
    pub delta_arm64: CodecUse,
    /// Whether deltas that use xz may also store their `BSDIFF` operations'
    /// data in compression frames spanning several operations, so xz keeps
    /// its context from one operation to the next (5-6 % smaller `BSDIFF`
    /// data on filesystem images); agents list it as `frames`. Default
    /// `"auto"`, as for `delta_xz`.
    #[serde(default)]
    pub delta_frames: CodecUse,
    /// Threads a build uses; 0 = one per core. Default 0: builds run at
    /// `build_nice`, so they take only the CPU time check-ins leave idle.
    #[serde(default)]
    pub build_threads: usize,
    /// Nice value (0..=19) of build threads: higher yields more readily to
    /// the server's request threads. Default 19.
    #[serde(default = "default_build_nice")]
    pub build_nice: i32,
    /// Days until built manifests expire. Default 365.
    #[serde(default = "default_expiry_days")]
    pub manifest_expiry_days: u64,
    /// Server-wide cap on payload bytes per second; 0 = none. Default 0.
    #[serde(default)]
    pub egress_bytes_per_sec: u64,
    /// Check-in pacing.
    #[serde(default)]
    pub checkin: CheckinConfig,
    /// TLS; plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Where durable state lives: sled in `data_dir` (default) or PostgreSQL.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Where the fleet-wide throttle lives: this process (default) or Redis.
    #[serde(default)]
    pub throttle: ThrottleConfig,
    /// Connection hygiene of the listener (timeouts and caps).
    #[serde(default)]
    pub connections: ConnectionsConfig,
    /// `[ddi]`: the hawkBit DDI device API (`docs/ddi.md`).
    #[serde(default)]
    pub ddi: DdiConfig,
}

/// `[ddi]`: hawkBit Direct Device Integration for SWUpdate, RAUC and other
/// hawkBit clients ([`crate::ddi`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdiConfig {
    /// The tenant in `/{tenant}/controller/v1/...`, compared without case
    /// (hawkBit's default is `DEFAULT`). Other tenants get 404.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// A gateway token: `Authorization: GatewayToken <t>` acts for any
    /// provisioned target. Empty (the default) turns gateway tokens off;
    /// otherwise at least 16 characters. Anonymous DDI access is never
    /// allowed.
    #[serde(default)]
    pub gateway_token: String,
    /// Download ahead of maintenance windows, as hawkBit does: a target of
    /// a rollout with windows is admitted outside them too, its
    /// `deploymentBase` says `download: forced`, `update: skip`,
    /// `maintenanceWindow: unavailable`, its `downloaded` feedback frees its
    /// lease (it waits for the window), and a poll inside the window offers
    /// the action again with `update: forced`. Off (the default), targets
    /// of such rollouts are admitted only while a window is open, because
    /// a client that ignores `update: skip` would install on the spot:
    /// turn it on only for a fleet whose DDI clients honor
    /// `maintenanceWindow` (docs/ddi.md).
    #[serde(default)]
    pub download_ahead: bool,
}

fn default_tenant() -> String {
    "DEFAULT".into()
}

impl Default for DdiConfig {
    fn default() -> Self {
        DdiConfig {
            tenant: default_tenant(),
            gateway_token: String::new(),
            download_ahead: false,
        }
    }
}

/// `[storage]`: the durable state backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub backend: StorageBackend,
    /// `postgres://user:password@host:port/db` (postgres only).
    #[serde(default)]
    pub url: String,
    /// Connections this replica keeps to PostgreSQL. Default 16.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// This replica's name (logs, metrics, its own `tmp/` subdirectory of a
    /// shared `data_dir`). Default: the host name and the listen port.
    #[serde(default)]
    pub replica_id: String,
}

/// Durable state backends.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Embedded sled database in `data_dir/db`: one process, no services.
    #[default]
    Sled,
    /// PostgreSQL: several replicas share one database; `data_dir` (images
    /// and artifacts) must then be a directory every replica can read and
    /// write (NFS, CephFS, EFS...).
    Postgres,
}

/// `[throttle]`: where leases, the start-rate bucket and the queue live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    #[serde(default)]
    pub backend: ThrottleBackend,
    /// `redis://host:port/db` (redis only).
    #[serde(default)]
    pub url: String,
    /// Prefix of every Redis key, so several fleets can share one Redis.
    /// Default `ota`.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
}

/// Throttle backends.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ThrottleBackend {
    /// In this process: limits hold for this replica only.
    #[default]
    Local,
    /// Redis: limits hold for every replica together.
    Redis,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Sled,
            url: String::new(),
            pool_size: default_pool(),
            replica_id: String::new(),
        }
    }
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            backend: ThrottleBackend::Local,
            url: String::new(),
            key_prefix: default_prefix(),
        }
    }
}

fn default_pool() -> usize {
    16
}
fn default_prefix() -> String {
    "ota".into()
}

/// Check-in pacing: what `next_checkin_ms` the server hands out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckinConfig {
    /// Interval for devices with nothing to do. Default 60 s. Longer means
    /// less load; shorter means rollouts start sooner.
    #[serde(default = "default_idle_ms")]
    pub idle_interval_ms: u64,
    /// Interval for throttled devices. Default 15 s. Devices near the head of
    /// the waiting queue are told to come back sooner (a quarter of this).
    #[serde(default = "default_wait_ms")]
    pub wait_interval_ms: u64,
    /// Download lease lifetime. Default 120 s. A device that neither checks
    /// in nor reports progress for this long loses its download slot.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Relative jitter applied to every interval, 0..1. Default 0.2 (±20 %).
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Most parallel Range requests a device may make. Default 4.
    #[serde(default = "default_parallel")]
    pub max_parallel_ranges: u32,
}

/// TLS certificate and key (PEM), and optionally device certificates
/// (mTLS): see [`crate::tls`] and `docs/api.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The fleet CA (PEM, one or more certificates): client certificates
    /// chaining to it are verified during the handshake and identify a
    /// device by their subject CN. Presenting one stays optional, so
    /// bearer-token devices keep working on the same listener. Default:
    /// none (client certificates are not asked for).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The fleet CA's private key (PKCS#8 PEM): with it the server signs
    /// the CSRs devices send at enrollment. The first certificate of
    /// `client_ca` is the issuer. Default: none (no CSR enrollment).
    #[serde(default)]
    pub client_ca_key: Option<PathBuf>,
    /// CRL files (PEM or DER) of the fleet CA, checked at the handshake in
    /// addition to the revocation list in the server's state. Default: none.
    #[serde(default)]
    pub client_crls: Vec<PathBuf>,
    /// Validity of the certificates the server issues, in days. Default 365.
    #[serde(default = "default_client_cert_days")]
    pub client_cert_days: u32,
}

fn default_client_cert_days() -> u32 {
    365
}

/// Whether built deltas may use one of the codecs agents list in their
/// check-ins (`delta_codecs`): `true`, `false` or `"auto"` in `server.toml`.
///
/// A delta that uses a codec is offered only to agents that list it; the
/// others get the full image, which needs none. Turned on for a fleet whose
/// agents predate the codec, a codec would so move full images to every
/// device, and left off it would cost every device the few percent it
/// saves. `Auto` (the default) asks the fleet: a delta from version `F`
/// uses the codec when every agent seen on `F` since the server started
/// listed it, and no codec when no agent on `F` has been seen (every agent
/// decodes that delta). In an A/B fleet the agent ships in the image, so
/// the devices on one version agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CodecUse {
    /// Use the codec when the agents seen on the delta's source version
    /// all decode it.
    #[default]
    Auto,
    /// Use the codec where it is smaller, whatever the agents list.
    On,
    /// Never use the codec.
    Off,
}

impl CodecUse {
    /// Whether a delta from a version whose agents were seen to decode
    /// `seen` (`None`: none seen) may use the codec named `codec`.
    pub fn allows(self, codec: &str, seen: Option<ota_format::manifest::Codecs>) -> bool {
        match self {
            CodecUse::On => true,
            CodecUse::Off => false,
            CodecUse::Auto => seen.is_some_and(|c| c.contains(codec)),
        }
    }
}

impl std::fmt::Display for CodecUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CodecUse::Auto => "auto",
            CodecUse::On => "true",
            CodecUse::Off => "false",
        })
    }
}

impl<'de> Deserialize<'de> for CodecUse {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(CodecUse::On),
            Raw::Bool(false) => Ok(CodecUse::Off),
            Raw::Word(w) if w == "auto" => Ok(CodecUse::Auto),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected true, false or \"auto\", found \"{w}\""
            ))),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_freshness_secs() -> u64 {
    3600
}
fn default_delta_history() -> usize {
    3
}
fn default_chunk_size() -> u64 {
    1 << 20
}
/// zstd level of deltas, chosen by measurement on the 2 GiB image pair
/// (README, "Release pipeline"): a delta's time goes to diffing, not to
/// zstd, up to level 9 (levels 3 and 9 cost the same CPU time, 9 is 0.4 %
/// smaller); level 19 makes it 1.5 % smaller for 47 % more CPU time.
pub const DEFAULT_ZSTD_LEVEL: i32 = 9;
/// zstd level of full images, which only devices without a delta fetch:
/// on the 2 GiB image level 3 costs 17 CPU s, 9 costs 38 s for a payload
/// 5.6 % smaller, 19 kept a core busy for 1,007 s (README, "Release
/// pipeline").
pub const DEFAULT_FULL_ZSTD_LEVEL: i32 = 3;
fn default_zstd_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}
fn default_full_zstd_level() -> i32 {
    DEFAULT_FULL_ZSTD_LEVEL
}
fn default_build_nice() -> i32 {
    19
}
fn default_expiry_days() -> u64 {
    365
}
fn default_idle_ms() -> u64 {
    60_000
}
fn default_wait_ms() -> u64 {
    15_000
}
fn default_lease_ms() -> u64 {
    120_000
}
fn default_jitter() -> f64 {
    0.2
}
fn default_parallel() -> u32 {
    4
}

impl Default for CheckinConfig {
    fn default() -> Self {
        CheckinConfig {
            idle_interval_ms: default_idle_ms(),
            wait_interval_ms: default_wait_ms(),
            lease_ms: default_lease_ms(),
            jitter: default_jitter(),
            max_parallel_ranges: default_parallel(),
        }
    }
}

/// `[connections]`: how long a client may take and how many sockets it may
/// hold (see `server/src/listener.rs` for how each is enforced). The
/// defaults suit devices on slow cellular links and an operator uploading
/// images; tighten them behind a reverse proxy that buffers requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Time allowed from accepting a connection (TLS handshake included), or
    /// from the end of the previous response on a kept-alive HTTP/1.1
    /// connection, until a complete request head has arrived. Default 10 s.
    /// Defeats slowloris (headers one byte a second) and silent sockets.
    #[serde(default = "default_header_ms")]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight and no byte moving either way
    /// for this long is closed (HTTP/2 connections, and responses a client
    /// stopped reading). Default 60 s.
    #[serde(default = "default_conn_idle_ms")]
    pub idle_timeout_ms: u64,
    /// Longest wait for the next piece of a request body, and the grace
    /// before `body_min_bytes_per_sec` applies. Default 30 s.
    #[serde(default = "default_body_ms")]
    pub body_read_timeout_ms: u64,
    /// Average rate a request body must keep once `body_read_timeout_ms`
    /// has passed, so a body trickling a byte a second is cut off. Default
    /// 1024.
    #[serde(default = "default_body_rate")]
    pub body_min_bytes_per_sec: u64,
    /// Connections open at once, all clients. Over it, new connections are
    /// closed at accept. Keep it below the process's file limit
    /// (`LimitNOFILE`). Default 50000.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Connections open at once from one source address; 0 = no limit
    /// (behind a reverse proxy every connection comes from the proxy).
    /// Default 256 (many devices may share a carrier-grade NAT address).
    #[serde(default = "default_max_per_addr")]
    pub max_connections_per_address: usize,
    /// Largest request head: HTTP/1.1 read buffer (at least 8192) and the
    /// HTTP/2 header-list size. Default 16 KiB.
    #[serde(default = "default_header_bytes")]
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection. Default 64 (an agent uses
    /// at most `checkin.max_parallel_ranges`).
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
}

fn default_header_ms() -> u64 {
    10_000
}
fn default_conn_idle_ms() -> u64 {
    60_000
}
fn default_body_ms() -> u64 {
    30_000
}
fn default_body_rate() -> u64 {
    1024
}
fn default_max_conns() -> usize {
    50_000
}
fn default_max_per_addr() -> usize {
    256
}
fn default_header_bytes() -> usize {
    16 * 1024
}
fn default_h2_streams() -> u32 {
    64
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            header_read_timeout_ms: default_header_ms(),
            idle_timeout_ms: default_conn_idle_ms(),
            body_read_timeout_ms: default_body_ms(),
            body_min_bytes_per_sec: default_body_rate(),
            max_connections: default_max_conns(),
            max_connections_per_address: default_max_per_addr(),
            max_header_bytes: default_header_bytes(),
            h2_max_concurrent_streams: default_h2_streams(),
        }
    }
}

impl ConnectionsConfig {
    /// Checks the limits; the message names the option and its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("connections.{m}")));
        let ms = 100..=3_600_000;
        if !ms.contains(&self.header_read_timeout_ms) {
            return bad("header_read_timeout_ms must be 100..=3600000 (0.1 s to 1 h)");
        }
        if !ms.contains(&self.idle_timeout_ms) {
            return bad("idle_timeout_ms must be 100..=3600000 (0.1 s to 1 h)");
        }
        if !ms.contains(&self.body_read_timeout_ms) {
            return bad("body_read_timeout_ms must be 100..=3600000 (0.1 s to 1 h)");
        }
        if self.body_min_bytes_per_sec == 0 {
            return bad(
                "body_min_bytes_per_sec must be positive (1024 lets any real link through)",
            );
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return bad("max_connections must be 1..=1000000");
        }
        if self.max_connections_per_address > self.max_connections {
            return bad(
                "max_connections_per_address must be 0 (no limit) or at most max_connections",
            );
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            return bad("max_header_bytes must be 1024..=1048576");
        }
        if !(1..=1000).contains(&self.h2_max_concurrent_streams) {
            return bad("h2_max_concurrent_streams must be 1..=1000");
        }
        Ok(())
    }
}

impl ServerConfig {
    /// Reads and validates `path`. Relative paths inside are taken relative
    /// to the file's directory, so a config and its key can travel together.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut c: ServerConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let signing_pin = c.signing.as_mut().and_then(|s| s.pin_file.as_mut());
        for p in [Some(&mut c.data_dir), c.signing_key.as_mut(), signing_pin]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(tls) = &mut c.tls {
            let optional = tls.client_ca.iter_mut().chain(tls.client_ca_key.iter_mut());
            for p in [&mut tls.cert, &mut tls.key]
                .into_iter()
                .chain(optional)
                .chain(tls.client_crls.iter_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        c.validate()?;
        c.source = Some(path.into());
        Ok(c)
    }

    /// Checks every invariant the server relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.admin_token.len() < 16 {
            return bad("admin_token must be at least 16 characters".into());
        }
        if !self.ddi.gateway_token.is_empty() && self.ddi.gateway_token.len() < 16 {
            return bad(
                "ddi.gateway_token must be empty (gateway tokens off) or at least 16 characters"
                    .into(),
            );
        }
        let gw = &self.ddi.gateway_token;
        if gw.starts_with('-') || !gw.bytes().all(|b| b.is_ascii_graphic()) {
            // SWUpdate takes it as `-g <token>` and reads a leading `-` as
            // its own options (a `d` among them disables polling, silently).
            return bad("ddi.gateway_token must be printable ASCII without spaces and must not begin with '-' (clients read that as a command-line option); `openssl rand -hex 32` makes one".into());
        }
        if self.ddi.tenant.is_empty()
            || self.ddi.tenant.len() > 64
            || !self
                .ddi
                .tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad("ddi.tenant must be 1-64 characters of A-Z a-z 0-9 _ -".into());
        }
        if !self.enrollment_key.is_empty() && self.enrollment_key.len() < 16 {
            return bad(
                "enrollment_key must be empty (no self-enrollment) or at least 16 characters"
                    .into(),
            );
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!("listen = {:?} is not an address:port", self.listen));
        }
        if self.signing_key.is_none() && self.signing.is_none() {
            return bad("no signing key: set signing_key (a key file) or [signing] (keys in a PKCS#11 token)".into());
        }
        if let Some(s) = &self.signing {
            s.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(level) = &self.log_level {
            crate::reload::check_log_level(level)
                .map_err(|e| ConfigError::Invalid(format!("log_level: {e}")))?;
        }
        if !(60..=7 * 86_400).contains(&self.freshness_secs) {
            return bad("freshness_secs must be 60..=604800 (one minute to one week)".into());
        }
        let c = &self.checkin;
        if c.idle_interval_ms == 0 || c.wait_interval_ms == 0 {
            return bad("checkin intervals must be positive".into());
        }
        if c.lease_ms < 1000 {
            return bad("checkin.lease_ms must be at least 1000".into());
        }
        if !(0.0..1.0).contains(&c.jitter) {
            return bad("checkin.jitter must be in [0, 1)".into());
        }
        if c.max_parallel_ranges == 0 || c.max_parallel_ranges > 64 {
            return bad("checkin.max_parallel_ranges must be 1..=64".into());
        }
        if let Some(t) = &self.tls {
            if t.client_ca_key.is_some() && t.client_ca.is_none() {
                return bad("tls.client_ca_key is set without tls.client_ca: name the fleet CA certificate the key belongs to".into());
            }
            if !t.client_crls.is_empty() && t.client_ca.is_none() {
                return bad(
                    "tls.client_crls needs tls.client_ca (CRLs are checked against the fleet CA)"
                        .into(),
                );
            }
            if !(1..=3650).contains(&t.client_cert_days) {
                return bad("tls.client_cert_days must be 1..=3650".into());
            }
        }
        if !(1..=22).contains(&self.zstd_level) {
            return bad("zstd_level must be 1..=22".into());
        }
        if !(1..=22).contains(&self.full_zstd_level) {
            return bad("full_zstd_level must be 1..=22".into());
        }
        if !(0..=19).contains(&self.build_nice) {
            return bad(
                "build_nice must be 0..=19 (higher: builds yield more to check-ins)".into(),
            );
        }
        if self.build_threads > 1024 {
            return bad("build_threads must be 0 (one per core) or a thread count".into());
        }
        if self.chunk_size == 0
            || self.chunk_size % 4096 != 0
            || self.chunk_size > ota_format::limits::MAX_BUFFERED_DST
        {
            return bad("chunk_size must be a positive multiple of 4096, at most 4 MiB".into());
        }
        let st = &self.storage;
        match st.backend {
            StorageBackend::Sled => {
                if !st.url.is_empty() {
                    return bad("storage.url is set but storage.backend is \"sled\"; set backend = \"postgres\" or remove the url".into());
                }
                if self.throttle.backend == ThrottleBackend::Redis {
                    return bad("throttle.backend = \"redis\" needs storage.backend = \"postgres\": a shared throttle is for several replicas, and they must share their state too".into());
                }
            }
            StorageBackend::Postgres => {
                if !st.url.starts_with("postgres://") && !st.url.starts_with("postgresql://") {
                    return bad(
                        "storage.url must be a postgres:// URL when storage.backend = \"postgres\""
                            .into(),
                    );
                }
                if st.pool_size == 0 || st.pool_size > 1000 {
                    return bad("storage.pool_size must be 1..=1000".into());
                }
            }
        }
        if !st.replica_id.is_empty() {
            ota_format::api::check_name("storage.replica_id", &st.replica_id)
                .map_err(ConfigError::Invalid)?;
        }
        let th = &self.throttle;
        match th.backend {
            ThrottleBackend::Local => {
                if !th.url.is_empty() {
                    return bad("throttle.url is set but throttle.backend is \"local\"; set backend = \"redis\" or remove the url".into());
                }
            }
            ThrottleBackend::Redis => {
                if !th.url.starts_with("redis://") {
                    return bad(
                        "throttle.url must be a redis:// URL when throttle.backend = \"redis\" (TLS to Redis is not built in: use a local TLS tunnel such as stunnel)"
                            .into(),
                    );
                }
            }
        }
        if th.key_prefix.is_empty()
            || !th
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("throttle.key_prefix must be letters, digits, - and _".into());
        }
        self.connections.validate()?;
        Ok(())
    }

    /// Refuses placeholder or weak `admin_token` / `enrollment_key` (see
    /// [`crate::secrets`]); `serve` calls it unless `--insecure-dev`.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        crate::secrets::check(self)
    }

    /// This replica's name (see [`StorageConfig::replica_id`]).
    pub fn replica_id(&self) -> String {
        if !self.storage.replica_id.is_empty() {
            return self.storage.replica_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let port = self
            .listen
            .parse::<std::net::SocketAddr>()
            .map_or(0, |a| a.port());
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        format!("{}-{port}", if host.is_empty() { "replica" } else { &host })
    }

    /// The lease lifetime.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.checkin.lease_ms)
    }
}
