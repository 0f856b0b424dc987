//! `ota-server`: the operator's side of edge-ota.
//!
//! `serve` runs the rollout service (see the library's Layout); `device`,
//! `release` and `rollout` drive it through the admin API; `keygen` and
//! `delta` are offline tools that need no server.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
use ota_format::{Envelope, Manifest, OpKind, SigningKeyPair};
use ota_server::client::{AdminClient, render_status};
use ota_server::config::ServerConfig;
use ota_server::rollout::{OnFailure, RolloutSpec, RolloutState};
use tokio_util::sync::CancellationToken;

/// File names inside a `keygen --out` directory.
const KEY_FILE: &str = "ota-signing.key";
const PUB_FILE: &str = "ota-signing.pub";

#[derive(Parser)]
#[command(
    name = "ota-server",
    version,
    about = "edge-ota rollout server and update builder"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an ed25519 signing key: DIR/ota-signing.key (0600) and DIR/ota-signing.pub.
    Keygen {
        /// Directory to write the key pair into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Overwrite an existing key (devices trusting the old key will refuse updates).
        #[arg(long)]
        force: bool,
    },
    /// Generate an Ed25519 signing key inside the PKCS#11 token of the
    /// config's [signing] section; write its public key (what devices trust).
    TokenKeygen {
        #[arg(long, value_name = "server.toml")]
        config: PathBuf,
        /// Label (CKA_LABEL) of the new key; list it in signing.key_labels.
        #[arg(long)]
        label: String,
        /// Where to write the public key (SPKI PEM).
        #[arg(long, value_name = "FILE.pub")]
        out: PathBuf,
    },
    /// Build a signed update: OUTDIR/manifest.json and OUTDIR/payload.bin.
    Delta(DeltaArgs),
    /// Run the rollout server.
    Serve {
        /// The server's configuration (see deploy/server.toml for every option).
        #[arg(long, value_name = "server.toml")]
        config: PathBuf,
        /// Log as JSON lines (for log shippers) instead of text.
        #[arg(long)]
        log_json: bool,
        /// Start even with placeholder or weak secrets in the config (a
        /// throw-away test set-up only: anyone who guesses them runs the fleet).
        #[arg(long)]
        insecure_dev: bool,
    },
    /// Manage devices (admin API).
    Device {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Manage releases (admin API).
    Release {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: ReleaseCmd,
    },
    /// Manage rollouts (admin API).
    Rollout {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Manage groups: named, saved device selectors (admin API).
    Group {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Manage admin users and their roles (admin API).
    User {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Read the audit log of admin actions (admin API).
    Audit {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: AuditCmd,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Save a selector under a name (`rollout create --group NAME`).
    Create {
        /// The group's name.
        name: String,
        /// Device type the group selects.
        #[arg(long, value_name = "T")]
        device_type: String,
        /// Only devices with this tag, repeatable.
        #[arg(long = "selector", value_name = "TAG=VALUE", value_parser = parse_kv)]
        selector: Vec<(String, String)>,
        /// Default maintenance window of the group's rollouts (those that
        /// give no --window of their own), repeatable: "DAYS HH:MM+DURATION ZONE".
        #[arg(long = "window", value_name = "WINDOW", value_parser = ota_server::rollout::window::Window::parse)]
        windows: Vec<ota_server::rollout::window::Window>,
    },
    /// Every group.
    List,
    /// One group.
    Show {
        /// The group's name.
        name: String,
    },
    /// Delete a group (refused while a live rollout targets it).
    Delete {
        /// The group's name.
        name: String,
    },
}

/// Where the admin API is.
#[derive(clap::Args)]
struct Conn {
    /// Server base URL.
    #[arg(
        long,
        env = "OTA_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// The server's admin_token.
    #[arg(
        long,
        env = "OTA_ADMIN_TOKEN",
        hide_env_values = true,
        default_value = "",
        global = true
    )]
    admin_token: String,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Pre-provision a device and print its token (shown once).
    Add {
        /// Unique device id (what the device's agent.toml calls device_id).
        #[arg(long)]
        id: String,
        /// Device type: which releases and rollouts apply to it (e.g. rpi4).
        #[arg(long = "type", value_name = "T")]
        device_type: String,
        /// Tag for rollout selectors, repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_kv)]
        tags: Vec<(String, String)>,
        /// Issue a new token for an existing device; its old token stops working at once.
        #[arg(long)]
        rotate: bool,
    },
    /// Take a device out of service: its token stops working, its history stays.
    Retire {
        /// The device id.
        id: String,
    },
    /// List devices, filtered and paged by the server.
    List(DeviceListArgs),
    /// Show a device: version, state, rollouts and recent events.
    Show {
        /// The device id.
        id: String,
        /// Print the API's raw JSON instead of the human form.
        #[arg(long)]
        json: bool,
    },
    /// A device's update attempts and its stored events, newest first.
    History {
        /// The device id.
        id: String,
        /// Events to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only events with a sequence number below this (paging).
        #[arg(long)]
        before: Option<u64>,
        /// Include download progress events.
        #[arg(long)]
        progress: bool,
        /// Print the API's raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device's client certificates: every one the server issued
    /// to it, or the one with --serial (also one made outside the server).
    /// Takes effect at the device's next request.
    RevokeCert {
        id: String,
        /// Serial in hex, as `openssl x509 -noout -serial` prints it.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(clap::Args)]
struct DeviceListArgs {
    /// Only devices of this type.
    #[arg(long = "type", value_name = "T")]
    device_type: Option<String>,
    /// Only devices that last reported this version.
    #[arg(long)]
    version: Option<String>,
    /// Only devices with this tag, repeatable (all must match).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_kv)]
    tags: Vec<(String, String)>,
    /// Only devices the rollout has admitted.
    #[arg(long, value_name = "ID")]
    rollout: Option<String>,
    /// Only devices in this agent state.
    #[arg(long, value_parser = ["idle", "downloading", "installing", "rebooting", "testing", "never"])]
    state: Option<String>,
    /// Only devices seen within this long (e.g. 10m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    seen_within: Option<std::time::Duration>,
    /// Only devices silent for at least this long, never-seen ones included (e.g. 1h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    silent_for: Option<std::time::Duration>,
    /// Rows per page (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Start after this device id (the `next page` hint of the previous page).
    #[arg(long, value_name = "ID")]
    after: Option<String>,
    /// Every page, not just the first.
    #[arg(long)]
    all: bool,
    /// Print the API's raw JSON pages (one per line with --all).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Upload an image; the server builds the full payload and deltas in the background.
    Add {
        /// The release's version (what devices report once they run it).
        #[arg(long)]
        version: String,
        /// Device type the image is for.
        #[arg(long, value_name = "T")]
        device_type: String,
        /// The complete root filesystem image; deltas from every earlier release are built from it.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "artifact",
            conflicts_with = "artifact"
        )]
        image: Option<PathBuf>,
        /// A DDI client's own bundle (with --format), stored as is for
        /// hawkBit DDI targets (SWUpdate, RAUC); no deltas are built.
        #[arg(long, value_name = "FILE", requires = "format")]
        artifact: Option<PathBuf>,
        /// The bundle's format: swu (SWUpdate), raucb (RAUC) or file.
        #[arg(long, value_parser = ["swu", "raucb", "file"], requires = "artifact")]
        format: Option<String>,
        /// The artifact's file name DDI clients see (default TYPE-VERSION.EXT).
        #[arg(long, requires = "artifact")]
        filename: Option<String>,
        /// The DDI software-module type (default os; file: application).
        #[arg(long, requires = "artifact")]
        module_type: Option<String>,
        /// Attach the bundle to the existing image release of --version, so
        /// one rollout serves agents and DDI targets of the device type.
        #[arg(long, requires = "artifact")]
        attach: bool,
        /// Anti-rollback counter for this release's manifests.
        #[arg(long, default_value_t = 0)]
        security_counter: u64,
        /// Accept a version not greater than the newest release (a deliberate
        /// rollback); needs a --security-counter above every earlier release's.
        #[arg(long)]
        allow_downgrade: bool,
        /// Wait until every build is ready (or failed).
        #[arg(long)]
        wait: bool,
    },
    /// List releases and their builds.
    List,
    /// Delete a release no live rollout offers and no device runs.
    Delete {
        /// Device type of the release.
        #[arg(long, value_name = "T")]
        device_type: String,
        /// Version of the release.
        #[arg(long)]
        version: String,
    },
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Start a waved, throttled rollout.
    Create(Box<RolloutArgs>),
    /// One rollout's status per wave.
    Status {
        /// The rollout id (from `rollout create` or `rollout list`).
        id: String,
        /// Refresh every second until the rollout completes, pauses or aborts.
        #[arg(long)]
        watch: bool,
    },
    /// Every rollout.
    List,
    /// Stop admitting devices (in-flight downloads finish).
    Pause {
        /// The rollout id.
        id: String,
        /// Why (shown in `rollout status`, kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume admitting devices.
    Resume {
        /// The rollout id.
        id: String,
        /// Why (shown in `rollout status`, kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop the rollout: downloading devices are told to cancel.
    Abort {
        /// The rollout id.
        id: String,
        /// Why (shown in `rollout status`, kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let devices switch as soon as their update is verified, whatever
    /// the rollout's maintenance windows say.
    InstallNow {
        /// The rollout id.
        id: String,
        /// Only these devices (comma-separated; each must be admitted and
        /// not yet installed). Default: every such device.
        #[arg(long, value_delimiter = ',', value_name = "ID,...")]
        devices: Vec<String>,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a named admin identity and print its token (shown once).
    Add {
        /// The user's name (what the audit log shows).
        name: String,
        /// viewer (reads), operator (also groups and rollouts) or admin (everything).
        #[arg(long, value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<ota_server::audit::Role>()))]
        role: ota_server::audit::Role,
    },
    /// Every user and its role (tokens are never shown again).
    List,
    /// Delete a user: its token stops working at once.
    Delete {
        /// The user's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// The audit log, newest first: who changed what, when, from where.
    List {
        /// Entries to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only entries older than this sequence number (paging).
        #[arg(long)]
        before: Option<u64>,
        /// Print the API's raw JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RolloutArgs {
    /// Version of the release to roll out (from `release add`).
    #[arg(long, value_name = "VERSION")]
    release: String,
    /// Device type to update (not needed with --group).
    #[arg(long, value_name = "T", required_unless_present = "group")]
    device_type: Option<String>,
    /// Target a saved group (`group create`): its device type and tags.
    #[arg(long, value_name = "NAME", conflicts_with = "selector")]
    group: Option<String>,
    /// Only devices with this tag, repeatable.
    #[arg(long = "selector", value_name = "TAG=VALUE", value_parser = parse_kv)]
    selector: Vec<(String, String)>,
    /// Cumulative percentages of eligible devices per wave.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    waves: Vec<u8>,
    /// Minimum time each wave stays open before the next opens (e.g. 10m).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    soak: std::time::Duration,
    /// Fleet-wide cap on concurrent downloads.
    #[arg(long)]
    max_concurrent: u64,
    /// Downloads started per minute.
    #[arg(long)]
    max_starts_per_min: f64,
    /// Multiply the start rate by this every --ramp-every commits.
    #[arg(long, default_value_t = 1.0)]
    ramp_factor: f64,
    /// Commits per ramp step (default: --min-sample).
    #[arg(long, default_value_t = 0)]
    ramp_every: u64,
    /// The ramp's ceiling in starts per minute (default: 1000 × --max-starts-per-min).
    #[arg(long, value_name = "PER_MIN")]
    ramp_max: Option<f64>,
    /// Start admitting devices at this time: RFC 3339 with its offset
    /// (2026-12-03T02:00:00+01:00) or a delay from now (+2h, +30m).
    #[arg(long, value_name = "TIME", value_parser = parse_start_at)]
    start_at: Option<u64>,
    /// Earliest opening of each wave after the start, one per wave, the
    /// first 0 (e.g. 0s,6h,1d): a wave still needs the previous one soaked
    /// and successful.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration)]
    wave_offsets: Vec<std::time::Duration>,
    /// Failure rate that pauses or aborts the rollout (e.g. 5%).
    #[arg(long, default_value = "5%", value_parser = parse_fraction)]
    failure_threshold: f64,
    /// Committed share of a wave needed to open the next (e.g. 90%).
    #[arg(long, default_value = "90%", value_parser = parse_fraction)]
    success_threshold: f64,
    /// Outcomes needed before the failure threshold applies.
    #[arg(long, default_value_t = 20)]
    min_sample: u64,
    /// What the failure threshold does to the rollout.
    #[arg(long, value_enum, default_value = "pause")]
    on_failure: FailureAction,
    /// Extra attempts per device after a failure or a lost lease.
    #[arg(long, default_value_t = 2)]
    max_retries: u32,
    /// Maintenance window, repeatable: "DAYS HH:MM+DURATION ZONE", e.g.
    /// "mon-fri 02:00+3h Europe/Berlin" (IANA zone, wall-clock time).
    /// Devices download at once but switch only inside a window.
    #[arg(long = "window", value_name = "WINDOW", value_parser = ota_server::rollout::window::Window::parse)]
    windows: Vec<ota_server::rollout::window::Window>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FailureAction {
    Pause,
    Abort,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// `--start-at` ([`schedule::parse_start_at`]).
fn parse_start_at(s: &str) -> Result<u64, String> {
    ota_server::rollout::schedule::parse_start_at(s, ota_server::now_ms())
}

/// "5%" or "0.05".
fn parse_fraction(s: &str) -> Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v)
}

#[derive(clap::Args)]
struct DeltaArgs {
    /// The new image.
    #[arg(long, value_name = "NEW.img")]
    to: PathBuf,
    /// Version of the new image.
    #[arg(long, value_name = "V2")]
    to_version: String,
    /// The image devices run now; omit for a full image.
    #[arg(long, value_name = "OLD.img", requires = "from_version")]
    from: Option<PathBuf>,
    /// Version of the image devices run now.
    #[arg(long, value_name = "V1", requires = "from")]
    from_version: Option<String>,
    /// PKCS#8 PEM signing key (from `keygen`).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Directory for manifest.json and payload.bin (created if missing).
    #[arg(long, value_name = "OUTDIR")]
    out: PathBuf,
    /// Device type written into the manifest (agents refuse other types).
    #[arg(long, value_name = "T", default_value = "generic")]
    device_type: String,
    /// Target bytes per changed chunk (multiple of 4096, at most 4 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    chunk_size: u64,
    /// Anti-rollback counter: agents refuse manifests below the one they run.
    #[arg(long, default_value_t = 0)]
    security_counter: u64,
    /// Days until the manifest expires.
    #[arg(long, value_name = "DAYS", default_value_t = 90)]
    expires_in_days: u64,
    /// zstd level of payload data (1-22).
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: i32,
    /// Do not use xz (LZMA2) for bsdiff streams: the payload then applies on
    /// agents older than the xz codec, at 5-10 % more bytes.
    #[arg(long)]
    no_xz: bool,
    /// Do not zero-run code bsdiff diff streams: the payload then applies on
    /// agents that decode xz but are older than the zero-runs codec, at
    /// 1-4 % more bytes on binaries and more generation time.
    #[arg(long)]
    no_zero_runs: bool,
    /// Do not arm64-transform new code (REPLACE data, bsdiff extra streams):
    /// the payload then applies on agents that decode xz but are older than
    /// the arm64 codec, at a few % more bytes on aarch64 executables. A full
    /// image (no --from) never uses it.
    #[arg(long)]
    no_arm64: bool,
    /// Do not store BSDIFF data in compression frames spanning several
    /// operations: the payload then applies on agents that decode xz but
    /// are older than the frames codec, at 5-6 % more BSDIFF bytes on
    /// filesystem images. A full image (no --from) never uses them.
    #[arg(long)]
    no_frames: bool,
    /// Worker threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// What a reload calls to swap the log filter.
fn log_reloader<S: 'static>(
    h: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> ota_server::reload::LogReloader {
    Box::new(move |l| {
        let f = tracing_subscriber::EnvFilter::try_new(l).map_err(|e| e.to_string())?;
        h.reload(f).map_err(|e| e.to_string())
    })
}

fn main() {
    let cli = Cli::parse();
    let (default_level, json) = match &cli.cmd {
        Cmd::Serve { log_json, .. } => ("info", *log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    // The filter is reloadable: `log_level` in server.toml applies at start
    // and at every reload (SIGHUP).
    if json {
        let b = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_filter_reloading();
        let h = b.reload_handle();
        b.init();
        ota_server::reload::set_log_reloader(log_reloader(h));
    } else {
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(ota_format::term::stderr_colors())
            .with_filter_reloading();
        let h = b.reload_handle();
        b.init();
        ota_server::reload::set_log_reloader(log_reloader(h));
    }
    let r = match cli.cmd {
        Cmd::Keygen { out, force } => keygen(&out, force),
        Cmd::TokenKeygen { config, label, out } => token_keygen(&config, &label, &out),
        Cmd::Delta(a) => delta(a),
        Cmd::Serve {
            config,
            insecure_dev,
            ..
        } => runtime().and_then(|rt| rt.block_on(serve(&config, insecure_dev))),
        Cmd::Device { conn, cmd } => runtime().and_then(|rt| rt.block_on(device_cmd(conn, cmd))),
        Cmd::Release { conn, cmd } => runtime().and_then(|rt| rt.block_on(release_cmd(conn, cmd))),
        Cmd::Rollout { conn, cmd } => runtime().and_then(|rt| rt.block_on(rollout_cmd(conn, cmd))),
        Cmd::Group { conn, cmd } => runtime().and_then(|rt| rt.block_on(group_cmd(conn, cmd))),
        Cmd::User { conn, cmd } => runtime().and_then(|rt| rt.block_on(user_cmd(conn, cmd))),
        Cmd::Audit { conn, cmd } => runtime().and_then(|rt| rt.block_on(audit_cmd(conn, cmd))),
    };
    if let Err(e) = r {
        eprintln!(
            "ota-server: error: {}",
            ota_format::term::error_chain(e.as_ref())
        );
        std::process::exit(1);
    }
}

fn keygen(dir: &Path, force: bool) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join(KEY_FILE);
    let pub_path = dir.join(PUB_FILE);
    if key_path.exists() && !force {
        bail!(
            "{} exists; pass --force to replace it (devices that trust the old key will refuse updates signed by the new one)",
            key_path.display()
        );
    }
    let key = SigningKeyPair::generate()?;
    write_atomic(&key_path, key.to_pem()?.as_bytes(), 0o600)?;
    write_atomic(&pub_path, key.public_pem().as_bytes(), 0o644)?;
    println!(
        "wrote {} (keep it secret) and {}",
        key_path.display(),
        pub_path.display()
    );
    println!("key id {}", key.keyid());
    Ok(())
}

/// Writes a file so that a crash leaves either the old or the new content:
/// a temporary file in the same directory, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn read_signing_key(path: &Path) -> Result<SigningKeyPair> {
    let meta =
        fs::metadata(path).with_context(|| format!("reading signing key {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "signing key is readable by group or others; chmod 600 it");
    }
    let pem = fs::read_to_string(path)
        .with_context(|| format!("reading signing key {}", path.display()))?;
    SigningKeyPair::from_pem(&pem).with_context(|| format!("signing key {}", path.display()))
}

fn delta(a: DeltaArgs) -> Result<()> {
    let started = Instant::now();
    // Agents refuse a manifest whose version they cannot order.
    for v in std::iter::once(&a.to_version).chain(a.from_version.as_ref()) {
        ota_format::Version::parse(v)?;
    }
    let key = read_signing_key(&a.key)?;
    let target =
        File::open(&a.to).with_context(|| format!("opening target image {}", a.to.display()))?;
    let source = match &a.from {
        Some(p) => {
            Some(File::open(p).with_context(|| format!("opening source image {}", p.display()))?)
        }
        None => None,
    };
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let spec = DeltaSpec {
        device_type: a.device_type.clone(),
        from_version: a.from_version.clone(),
        to_version: a.to_version.clone(),
        security_counter: a.security_counter,
        expires_at: Manifest::expiry_in(a.expires_in_days),
    };
    let opts = GenerateOptions {
        chunk_size: a.chunk_size,
        zstd_level: a.zstd_level,
        xz: !a.no_xz,
        zero_runs: !a.no_zero_runs,
        arm64: !a.no_arm64 && a.from.is_some(),
        frames: !a.no_frames && a.from.is_some(),
        threads: a.threads,
        progress: !a.no_progress,
    };
    let payload_path = a.out.join("payload.bin");
    let mut tmp = tempfile::Builder::new()
        .prefix(".payload-")
        .tempfile_in(&a.out)?;
    let manifest = generate(&spec, source.as_ref(), &target, tmp.as_file_mut(), &opts)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&payload_path)
        .with_context(|| format!("writing {}", payload_path.display()))?;
    let envelope = Envelope::sign_compressed(&manifest.to_json(), &[&key]).to_json();
    // The manifest goes last: a directory with a manifest always has its payload.
    write_atomic(&a.out.join("manifest.json"), &envelope, 0o644)?;
    print_summary(&manifest, envelope.len(), started.elapsed().as_secs_f64());
    Ok(())
}

fn print_summary(m: &Manifest, manifest_len: usize, secs: f64) {
    let from = m
        .from
        .as_ref()
        .map_or("(full image)".to_string(), |f| f.version.clone());
    println!(
        "update {from} -> {} for device type {}",
        m.to.version, m.device_type
    );
    for (kind, n, dst, data) in m.stats() {
        if n > 0 {
            let name = kind.name();
            let data = if matches!(kind, OpKind::Replace | OpKind::Bsdiff) {
                format!(", {data} bytes of data")
            } else {
                String::new()
            };
            println!(
                "  {name:<8} {n:>6} operations covering {:>12} bytes{data}",
                dst
            );
        }
    }
    let total = m.payload.size + manifest_len as u64;
    println!(
        "  payload  {:>12} bytes   manifest {manifest_len} bytes",
        m.payload.size
    );
    println!(
        "  ratio    {:.2}% of the {}-byte target (payload + manifest)   built in {secs:.1} s",
        100.0 * total as f64 / m.to.size.max(1) as f64,
        m.to.size
    );
}

fn token_keygen(config: &Path, label: &str, out: &Path) -> Result<()> {
    let cfg = ServerConfig::load(config)?;
    let token = cfg
        .signing
        .as_ref()
        .context("the config has no [signing] section naming the PKCS#11 module and token")?;
    let public = ota_server::signing::generate_in_token(token, label)?;
    let pem = ota_server::signing::public_pem(&public);
    std::fs::write(out, &pem).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "key {label:?} generated in token {:?}; key id {}; public key in {}",
        token.token_label,
        ota_format::envelope::key_id(&public),
        out.display()
    );
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(config_path: &Path, insecure_dev: bool) -> Result<()> {
    let config = ServerConfig::load(config_path)?;
    if insecure_dev {
        if let Err(e) = config.check_secrets() {
            tracing::warn!("--insecure-dev: starting anyway: {e}");
        }
    } else {
        config
            .check_secrets()
            .with_context(|| format!("refusing to start with {}", config_path.display()))?;
    }
    let cancel = CancellationToken::new();
    // The handler is installed before the server announces itself, so a
    // SIGTERM sent as soon as it listens is a graceful stop, not a kill.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing a SIGHUP handler")?;
    let running = ota_server::app::start(config, cancel.clone()).await?;
    println!("ota-server listening on {}", running.addr);
    // SIGHUP: reload server.toml (the outcome is logged either way).
    let (app, c) = (running.app.clone(), cancel.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                s = hup.recv() => if s.is_none() { return },
            }
            let _ = app.live.reload().await;
        }
    });
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: finishing in-flight requests");
        c.cancel();
    });
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

async fn device_cmd(conn: Conn, cmd: DeviceCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    match cmd {
        DeviceCmd::Add {
            id,
            device_type,
            tags,
            rotate,
        } => {
            let r = c
                .device_add(&id, &device_type, &tags.into_iter().collect(), rotate)
                .await?;
            println!("{}", r.token);
            if rotate {
                eprintln!(
                    "device {}: new token above; the old token no longer works — put the new one in the device's token file (it is not shown again)",
                    r.device_id
                );
            } else {
                eprintln!(
                    "device {} provisioned; put the token above in its token file (it is not shown again)",
                    r.device_id
                );
            }
        }
        DeviceCmd::History {
            id,
            limit,
            before,
            progress,
            json,
        } => {
            let v = c.device_history(&id, before, limit, progress).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", ota_server::render::device_history(&v));
            }
        }
        DeviceCmd::Show { id, json } => {
            let v = c.device_get(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let v: ota_server::render::DeviceView =
                    serde_json::from_value(v).context("unexpected device view")?;
                print!("{}", ota_server::render::device(&v, ota_server::now_ms()));
            }
        }
        DeviceCmd::List(a) => device_list(&c, a).await?,
        DeviceCmd::Retire { id } => {
            c.device_retire(&id).await?;
            println!("device {id} retired: its token no longer works; its events stay as history");
        }
        DeviceCmd::RevokeCert { id, serial } => {
            let r = c.device_revoke_cert(&id, serial.as_deref()).await?;
            let revoked: Vec<&str> = r["revoked"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            if revoked.is_empty() {
                println!("device {id}: that certificate was already revoked");
            }
            for s in revoked {
                println!("device {id}: certificate {s} revoked");
            }
        }
    }
    Ok(())
}

/// `device list`: one page, or every page with `--all`.
async fn device_list(c: &AdminClient, a: DeviceListArgs) -> Result<()> {
    let mut q = ota_server::inventory::DeviceQuery {
        device_type: a.device_type,
        version: a.version,
        tags: (!a.tags.is_empty()).then(|| {
            a.tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }),
        rollout: a.rollout,
        state: a.state,
        seen_within_s: a.seen_within.map(|d| d.as_secs()),
        silent_for_s: a.silent_for.map(|d| d.as_secs()),
        after: a.after,
        limit: Some(a.limit),
        ids: None,
    };
    // With --all, the human form is one table over every page.
    let mut all: Option<ota_server::inventory::DevicePage> = None;
    loop {
        let mut page = c.device_list(&q).await?;
        let next = page.next.clone();
        if a.json {
            println!("{}", serde_json::to_string(&page)?);
        } else if let Some(acc) = all.as_mut() {
            acc.devices.append(&mut page.devices);
            acc.next = page.next;
        } else {
            all = Some(page);
        }
        match next {
            Some(n) if a.all => q.after = Some(n),
            _ => break,
        }
    }
    if let Some(p) = all {
        print!(
            "{}",
            ota_server::render::device_table(&p, ota_server::now_ms())
        );
    }
    Ok(())
}

async fn release_cmd(conn: Conn, cmd: ReleaseCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    match cmd {
        ReleaseCmd::Add {
            version,
            device_type,
            image,
            artifact,
            format,
            filename,
            module_type,
            attach,
            security_counter,
            allow_downgrade,
            wait,
        } => {
            if let (Some(artifact), Some(format)) = (artifact, format) {
                if allow_downgrade {
                    bail!("--allow-downgrade applies to image releases only");
                }
                let format = ota_server::releases::bundle::BundleFormat::parse(&format)
                    .map_err(|e| anyhow::anyhow!(e))?;
                let r = c
                    .release_add_bundle(
                        &device_type,
                        &version,
                        security_counter,
                        format,
                        filename.as_deref(),
                        module_type.as_deref(),
                        attach,
                        &artifact,
                        std::io::IsTerminal::is_terminal(&std::io::stderr()),
                    )
                    .await?;
                let b = r
                    .bundle
                    .as_ref()
                    .context("the server answered without the bundle")?;
                println!(
                    "release {} of {} added: {} ({} bytes, sha256 {}, sha1 {}, md5 {}), module type {}; served to DDI targets as is",
                    r.version,
                    r.device_type,
                    b.filename,
                    b.size,
                    b.sha256,
                    b.sha1,
                    b.md5,
                    b.module_type
                );
                return Ok(());
            }
            let image = image.context("give --image, or --artifact with --format")?;
            let r = c
                .release_add_opts(
                    &device_type,
                    &version,
                    security_counter,
                    allow_downgrade,
                    &image,
                    std::io::IsTerminal::is_terminal(&std::io::stderr()),
                )
                .await?;
            println!(
                "release {} of {} added ({} bytes, image sha256 {}); {} builds queued",
                r.version,
                r.device_type,
                r.image_size,
                r.image_sha256,
                r.builds.len()
            );
            if wait {
                let r = c
                    .wait_release(
                        &device_type,
                        &version,
                        std::io::IsTerminal::is_terminal(&std::io::stderr()),
                    )
                    .await?;
                print_release(&r);
                if r.builds
                    .iter()
                    .any(|b| b.status == ota_server::releases::BuildStatus::Failed)
                {
                    bail!(
                        "some builds failed (reasons above); fix the cause and add the release again under a new version"
                    );
                }
            }
        }
        ReleaseCmd::List => {
            let all = c.releases().await?;
            if all.is_empty() {
                println!(
                    "no releases yet; add one with `ota-server release add --version V --device-type T --image PATH --wait`"
                );
            }
            for r in all {
                print_release(&r);
            }
        }
        ReleaseCmd::Delete {
            device_type,
            version,
        } => {
            c.release_delete(&device_type, &version).await?;
            println!("release {version} of {device_type} deleted");
        }
    }
    Ok(())
}

fn print_release(r: &ota_server::releases::ReleaseRecord) {
    println!(
        "{} {} ({} bytes, security counter {})",
        r.device_type, r.version, r.image_size, r.security_counter
    );
    for b in &r.builds {
        let from = b.from_version.as_deref().unwrap_or("(full image)");
        let size = b
            .artifacts
            .as_ref()
            .map(|a| format!("{} bytes payload", a.payload_size))
            .unwrap_or_default();
        let err = b.error.as_deref().unwrap_or("");
        let progress = b
            .progress
            .as_ref()
            .map(ota_server::render::build_progress)
            .unwrap_or_default();
        println!("  from {from:<16} {:?} {size}{progress} {err}", b.status);
    }
}

async fn user_cmd(conn: Conn, cmd: UserCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    match cmd {
        UserCmd::Add { name, role } => {
            let u = c.user_create(&name, role).await?;
            println!("{}", u["token"].as_str().unwrap_or_default());
            eprintln!(
                "user {name} ({}) created; the token above is shown once: give it to them as their --admin-token",
                role.name()
            );
        }
        UserCmd::List => {
            let users = c.users().await?;
            if users.is_empty() {
                println!(
                    "no users yet (the bootstrap admin_token always works): ota-server user add NAME --role operator"
                );
            } else {
                println!("{:<24} {:<9} CREATED", "NAME", "ROLE");
                for u in users {
                    println!(
                        "{:<24} {:<9} {}",
                        u["name"].as_str().unwrap_or(""),
                        u["role"].as_str().unwrap_or(""),
                        ota_server::render::when(
                            ota_server::now_ms(),
                            u["created_at_ms"].as_u64().unwrap_or(0)
                        )
                    );
                }
            }
        }
        UserCmd::Delete { name } => {
            c.user_delete(&name).await?;
            println!("deleted user {name}; its token no longer works");
        }
    }
    Ok(())
}

async fn audit_cmd(conn: Conn, cmd: AuditCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    let AuditCmd::List {
        limit,
        before,
        json,
    } = cmd;
    let page = c.audit(before, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&page)?);
    } else {
        print!("{}", ota_server::render::audit(&page));
    }
    Ok(())
}

async fn group_cmd(conn: Conn, cmd: GroupCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    let show = |g: &ota_server::groups::Group| {
        let tags: Vec<String> = g.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let windows = if g.windows.is_empty() {
            String::new()
        } else {
            let w: Vec<String> = g.windows.iter().map(|w| w.to_string()).collect();
            format!("  windows: {}", w.join("; "))
        };
        println!(
            "{:<24} {:<16} {}{windows}",
            g.name,
            g.device_type,
            tags.join(",")
        );
    };
    match cmd {
        GroupCmd::Create {
            name,
            device_type,
            selector,
            windows,
        } => {
            let g = c
                .group_create(&ota_server::groups::Group {
                    name,
                    device_type,
                    selector: selector.into_iter().collect(),
                    created_at_ms: 0,
                    windows,
                })
                .await?;
            show(&g);
        }
        GroupCmd::List => {
            println!("{:<24} {:<16} SELECTOR", "NAME", "DEVICE TYPE");
            for g in c.groups().await? {
                show(&g);
            }
        }
        GroupCmd::Show { name } => show(&c.group(&name).await?),
        GroupCmd::Delete { name } => {
            c.group_delete(&name).await?;
            println!("deleted group {name}");
        }
    }
    Ok(())
}

async fn rollout_cmd(conn: Conn, cmd: RolloutCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    match cmd {
        RolloutCmd::Create(a) => {
            let spec = RolloutSpec {
                release: a.release,
                device_type: a.device_type.unwrap_or_default(),
                group: a.group,
                selector: a.selector.into_iter().collect(),
                waves: a.waves,
                soak_ms: a.soak.as_millis() as u64,
                max_concurrent: a.max_concurrent,
                max_starts_per_min: a.max_starts_per_min,
                ramp_factor: a.ramp_factor,
                ramp_every: a.ramp_every,
                ramp_max_per_min: a.ramp_max,
                start_at_ms: a.start_at,
                wave_offsets_ms: a
                    .wave_offsets
                    .iter()
                    .map(|d| d.as_millis() as u64)
                    .collect(),
                failure_threshold: a.failure_threshold,
                success_threshold: a.success_threshold,
                min_sample: a.min_sample,
                on_failure: match a.on_failure {
                    FailureAction::Pause => OnFailure::Pause,
                    FailureAction::Abort => OnFailure::Abort,
                },
                max_retries: a.max_retries,
                windows: a.windows,
            };
            let s = c.rollout_create(&spec).await?;
            println!("{}", s.id);
            eprint!("{}", render_status(&s));
        }
        RolloutCmd::Status { id, watch } => loop {
            let s = c.rollout(&id).await?;
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_status(&s));
            if !watch || s.state != RolloutState::Active {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        },
        RolloutCmd::List => print!("{}", ota_server::render::rollout_list(&c.rollouts().await?)),
        RolloutCmd::Pause { id, reason } => print!(
            "{}",
            render_status(
                &c.rollout_action_why(&id, "pause", reason.as_deref())
                    .await?
            )
        ),
        RolloutCmd::Resume { id, reason } => print!(
            "{}",
            render_status(
                &c.rollout_action_why(&id, "resume", reason.as_deref())
                    .await?
            )
        ),
        RolloutCmd::Abort { id, reason } => print!(
            "{}",
            render_status(
                &c.rollout_action_why(&id, "abort", reason.as_deref())
                    .await?
            )
        ),
        RolloutCmd::InstallNow { id, devices } => {
            let r = c.rollout_install_now(&id, &devices).await?;
            println!(
                "rollout {}: {} device(s) will install as soon as verified: {}",
                r.rollout,
                r.devices.len(),
                r.devices.join(", ")
            );
        }
    }
    Ok(())
}
