//! `ota-server`: the operator's side of edge-ota.
//!
//! For now it holds the offline tools: `keygen` makes the signing key and
//! `delta` builds a signed update (delta or full image). The rollout service
//! (`serve`) builds on the same pieces.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
use ota_format::{Envelope, Manifest, OpKind, SigningKeyPair};

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Keygen { out, force } => keygen(&out, force),
        Cmd::Delta(a) => delta(a),
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
