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
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Overwrite an existing key (devices trusting the old key will refuse updates).
        #[arg(long)]
        force: bool,
    },
    /// Build a signed update: OUTDIR/manifest.json and OUTDIR/payload.bin.
    Delta(DeltaArgs),
    /// Run the rollout server.
    Serve {
        #[arg(long, value_name = "server.toml")]
        config: PathBuf,
        /// Log as JSON lines (for log shippers) instead of text.
        #[arg(long)]
        log_json: bool,
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
        #[arg(long)]
        id: String,
        #[arg(long = "type", value_name = "T")]
        device_type: String,
        /// Tag for rollout selectors, repeatable.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_kv)]
        tags: Vec<(String, String)>,
    },
    /// Show a device: version, state, rollouts.
    Show { id: String },
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

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Upload an image; the server builds the full payload and deltas in the background.
    Add {
        #[arg(long)]
        version: String,
        #[arg(long)]
        device_type: String,
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// Anti-rollback counter for this release's manifests.
        #[arg(long, default_value_t = 0)]
        security_counter: u64,
        /// Wait until every build is ready (or failed).
        #[arg(long)]
        wait: bool,
    },
    /// List releases and their builds.
    List,
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Start a waved, throttled rollout.
    Create(RolloutArgs),
    /// One rollout's status per wave.
    Status {
        id: String,
        /// Refresh every second until the rollout completes, pauses or aborts.
        #[arg(long)]
        watch: bool,
    },
    /// Every rollout.
    List,
    /// Stop admitting devices (in-flight downloads finish).
    Pause { id: String },
    /// Resume admitting devices.
    Resume { id: String },
    /// Stop the rollout: downloading devices are told to cancel.
    Abort { id: String },
}

#[derive(clap::Args)]
struct RolloutArgs {
    #[arg(long)]
    release: String,
    #[arg(long)]
    device_type: String,
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
    /// Failure rate that pauses or aborts the rollout (e.g. 5%).
    #[arg(long, default_value = "5%", value_parser = parse_fraction)]
    failure_threshold: f64,
    /// Committed share of a wave needed to open the next (e.g. 90%).
    #[arg(long, default_value = "90%", value_parser = parse_fraction)]
    success_threshold: f64,
    /// Outcomes needed before the failure threshold applies.
    #[arg(long, default_value_t = 20)]
    min_sample: u64,
    #[arg(long, value_enum, default_value = "pause")]
    on_failure: FailureAction,
    /// Extra attempts per device after a failure or a lost lease.
    #[arg(long, default_value_t = 2)]
    max_retries: u32,
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
    #[arg(long, value_name = "V2")]
    to_version: String,
    /// The image devices run now; omit for a full image.
    #[arg(long, value_name = "OLD.img", requires = "from_version")]
    from: Option<PathBuf>,
    #[arg(long, value_name = "V1", requires = "from")]
    from_version: Option<String>,
    /// PKCS#8 PEM signing key (from `keygen`).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    #[arg(long, value_name = "OUTDIR")]
    out: PathBuf,
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
    /// Worker threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() {
    let cli = Cli::parse();
    let (default_level, json) = match &cli.cmd {
        Cmd::Serve { log_json, .. } => ("info", *log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let r = match cli.cmd {
        Cmd::Keygen { out, force } => keygen(&out, force),
        Cmd::Delta(a) => delta(a),
        Cmd::Serve { config, .. } => runtime().and_then(|rt| rt.block_on(serve(&config))),
        Cmd::Device { conn, cmd } => runtime().and_then(|rt| rt.block_on(device_cmd(conn, cmd))),
        Cmd::Release { conn, cmd } => runtime().and_then(|rt| rt.block_on(release_cmd(conn, cmd))),
        Cmd::Rollout { conn, cmd } => runtime().and_then(|rt| rt.block_on(rollout_cmd(conn, cmd))),
    };
    if let Err(e) = r {
        eprintln!("ota-server: error: {e:#}");
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(config: &Path) -> Result<()> {
    let config = ServerConfig::load(config)?;
    let cancel = CancellationToken::new();
    // The handler is installed before the server announces itself, so a
    // SIGTERM sent as soon as it listens is a graceful stop, not a kill.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    let running = ota_server::app::start(config, cancel.clone()).await?;
    println!("ota-server listening on {}", running.addr);
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
        } => {
            let r = c
                .device_add(&id, &device_type, &tags.into_iter().collect())
                .await?;
            println!("{}", r.token);
            eprintln!(
                "device {} provisioned; put the token above in its token file (it is not shown again)",
                r.device_id
            );
        }
        DeviceCmd::Show { id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&c.device_get(&id).await?)?
            );
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

async fn release_cmd(conn: Conn, cmd: ReleaseCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    match cmd {
        ReleaseCmd::Add {
            version,
            device_type,
            image,
            security_counter,
            wait,
        } => {
            let r = c
                .release_add(
                    &device_type,
                    &version,
                    security_counter,
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
                loop {
                    let all = c.releases().await?;
                    let r = all
                        .iter()
                        .find(|x| x.device_type == device_type && x.version == version)
                        .context("the release disappeared")?;
                    if r.builds.iter().all(|b| {
                        matches!(
                            b.status,
                            ota_server::releases::BuildStatus::Ready
                                | ota_server::releases::BuildStatus::Failed
                        )
                    }) {
                        print_release(r);
                        if r.builds
                            .iter()
                            .any(|b| b.status == ota_server::releases::BuildStatus::Failed)
                        {
                            bail!("some builds failed");
                        }
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
        ReleaseCmd::List => {
            for r in c.releases().await? {
                print_release(&r);
            }
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
        println!("  from {from:<16} {:?} {size} {err}", b.status);
    }
}

async fn rollout_cmd(conn: Conn, cmd: RolloutCmd) -> Result<()> {
    let c = AdminClient::new(&conn.server, &conn.admin_token)?;
    match cmd {
        RolloutCmd::Create(a) => {
            let spec = RolloutSpec {
                release: a.release,
                device_type: a.device_type,
                selector: a.selector.into_iter().collect(),
                waves: a.waves,
                soak_ms: a.soak.as_millis() as u64,
                max_concurrent: a.max_concurrent,
                max_starts_per_min: a.max_starts_per_min,
                ramp_factor: a.ramp_factor,
                ramp_every: a.ramp_every,
                failure_threshold: a.failure_threshold,
                success_threshold: a.success_threshold,
                min_sample: a.min_sample,
                on_failure: match a.on_failure {
                    FailureAction::Pause => OnFailure::Pause,
                    FailureAction::Abort => OnFailure::Abort,
                },
                max_retries: a.max_retries,
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
        RolloutCmd::List => {
            for s in c.rollouts().await? {
                let t = s.totals();
                println!(
                    "{:<6} {:<12} {:<12} {:<10} wave {}/{} committed {}/{} failed {} — {}",
                    s.id,
                    s.spec.device_type,
                    s.spec.release,
                    format!("{:?}", s.state),
                    s.open_wave,
                    s.waves.len(),
                    t.committed + t.already_current,
                    t.eligible,
                    t.failed + t.rolled_back,
                    s.reason
                );
            }
        }
        RolloutCmd::Pause { id } => {
            print!("{}", render_status(&c.rollout_action(&id, "pause").await?))
        }
        RolloutCmd::Resume { id } => {
            print!("{}", render_status(&c.rollout_action(&id, "resume").await?))
        }
        RolloutCmd::Abort { id } => {
            print!("{}", render_status(&c.rollout_action(&id, "abort").await?))
        }
    }
    Ok(())
}
