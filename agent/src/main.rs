//! `ota-agent`: the device side of edge-ota.
//!
//! - `run --config PATH`: the daemon (systemd service), see [`ota_agent::daemon`];
//! - `status --config PATH`: what runs and what is pending;
//! - `apply`: the offline command: verify a signed update and apply it to a file;
//! - `simulate-boot`: what the bootloader does at power-on, on a `file` boot
//!   environment (tests and demos use it as the reboot command).
//!
//! The library's errors are typed (thiserror); this binary is the edge where
//! they become messages (anyhow).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ota_delta::apply::{ApplyOptions, apply_image, check_payload, check_source};
use ota_format::envelope::public_key_from_pem;
use ota_format::limits::MAX_ENVELOPE_BYTES;
use ota_format::{Envelope, TrustedKeys};

#[derive(Parser)]
#[command(name = "ota-agent", version, about = "edge-ota device agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon: check in, download, install, commit or roll back.
    Run {
        /// The agent configuration (TOML).
        #[arg(long, default_value = "/etc/ota-agent/agent.toml")]
        config: PathBuf,
        /// `file` boot back-end only (demos, development): after the
        /// simulated reboot, start again in this process instead of exiting,
        /// as a real device would come back up.
        #[arg(long)]
        restart_after_reboot: bool,
    },
    /// Print the running version, booted slot, pending update, phase and progress.
    Status {
        /// The agent configuration (TOML).
        #[arg(long, default_value = "/etc/ota-agent/agent.toml")]
        config: PathBuf,
    },
    /// Install the update that waits for its maintenance window now (or as
    /// soon as it is verified), and reboot: the device's own trigger.
    InstallNow {
        /// The agent configuration (TOML).
        #[arg(long, default_value = "/etc/ota-agent/agent.toml")]
        config: PathBuf,
    },
    /// Apply the bootloader's power-on logic to a `file` boot environment
    /// (count a trial boot, fall back past --bootlimit, record the booted slot).
    SimulateBoot {
        /// The `file` back-end's boot environment ([boot] env_file in agent.toml).
        #[arg(long, value_name = "BOOT.env")]
        env_file: PathBuf,
        /// Trial boots before falling back to the other slot.
        #[arg(long, default_value_t = 3)]
        bootlimit: u32,
    },
    /// Verify a signed update and apply it to an image file. Exits 0 only when
    /// the output verifies; on failure nothing is left at --out.
    Apply(ApplyArgs),
}

#[derive(clap::Args)]
struct ApplyArgs {
    /// The signed manifest (manifest.json).
    #[arg(long, value_name = "M")]
    manifest: PathBuf,
    /// The payload (payload.bin).
    #[arg(long, value_name = "P")]
    payload: PathBuf,
    /// A trusted public key (SPKI PEM). Repeat to trust several.
    #[arg(long = "pubkey", value_name = "PUB", required = true)]
    pubkeys: Vec<PathBuf>,
    /// How many of the trusted keys must have signed.
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// The image the delta applies to (not needed for a full image).
    #[arg(long, value_name = "OLD.img")]
    source: Option<PathBuf>,
    /// Where to write the new image.
    #[arg(long, value_name = "NEW.img")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn init_logging(default: &str, journal: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // The filter is reloadable: `log_level` in agent.toml applies at start
    // and at every SIGHUP.
    if journal {
        // journald adds timestamps and does not render colours.
        let b = b.without_time().with_ansi(false).with_filter_reloading();
        let h = b.reload_handle();
        b.init();
        ota_agent::reload::set_log_reloader(log_reloader(h));
    } else {
        let b = b
            .with_ansi(ota_format::term::stderr_colors())
            .with_filter_reloading();
        let h = b.reload_handle();
        b.init();
        ota_agent::reload::set_log_reloader(log_reloader(h));
    }
}

/// What a reload calls to swap the log filter.
fn log_reloader<S: 'static>(
    h: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> ota_agent::reload::LogReloader {
    Box::new(move |l| {
        let f = tracing_subscriber::EnvFilter::try_new(l).map_err(|e| e.to_string())?;
        h.reload(f).map_err(|e| e.to_string())
    })
}

/// Makes freed memory go back to the system, so the agent's resident memory
/// follows what it holds (the budgets of `ota_delta::apply::op_memory`)
/// rather than what it once held.
///
/// glibc's malloc serves a block of 128 KiB or more with its own mmap, but
/// raises that threshold to the size of every such block freed (up to
/// 32 MiB): after the first operation's buffers are freed, the next ones
/// come from the heaps of its arenas — one per thread that allocated, up to
/// 8 per core — which keep their peak, fragmented, and are trimmed only from
/// the top. On the 2 GiB benchmark pair that was 61–79 MiB for a pool whose
/// buffers never held more than 20 MiB at once (`MALLOC_ARENA_MAX=2`: 55
/// MiB). A fixed threshold stops the raising: every large buffer is mapped
/// when allocated and unmapped when freed (measured on that pair: 35 MiB
/// for the debug build, and 10 % faster, since the kernel hands out zeroed
/// pages cheaper than the allocator searched its heaps). musl, the static
/// ARM64 agent's libc, maps large blocks this way by design.
///
/// glibc's own `MALLOC_MMAP_THRESHOLD_`, when set, wins (it fixes the
/// threshold the same way).
fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator; it is
        // called first thing in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        }
    }
}

fn main() {
    bound_allocator();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Apply(a) => {
            init_logging("warn", false);
            apply(a)
        }
        Cmd::Run {
            config,
            restart_after_reboot,
        } => run(&config, restart_after_reboot),
        Cmd::Status { config } => status(&config),
        Cmd::InstallNow { config } => install_now(&config),
        Cmd::SimulateBoot {
            env_file,
            bootlimit,
        } => ota_agent::bootctl::simulate_boot(&env_file, bootlimit)
            .map(|slot| println!("booted slot {slot}"))
            .map_err(Into::into),
    };
    if let Err(e) = r {
        eprintln!(
            "ota-agent: error: {}",
            ota_format::term::error_chain(e.as_ref())
        );
        std::process::exit(1);
    }
}

fn run(config: &Path, restart_after_reboot: bool) -> Result<()> {
    let cfg = ota_agent::config::Config::load(config)?;
    if restart_after_reboot && cfg.boot.backend != "file" {
        bail!(
            "--restart-after-reboot is for the `file` boot back-end only; with `{}` the device really reboots and systemd starts the agent again",
            cfg.boot.backend
        );
    }
    init_logging("info", cfg.log_format == "journal");
    // `log_level` in agent.toml wins over RUST_LOG, at start as at reload.
    if let Some(level) = &cfg.log_level {
        ota_agent::reload::apply_log_level(level).map_err(anyhow::Error::msg)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        // Devices have few cores; the work is I/O and hashing.
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
            s.cancel();
        });
        let file_backend = cfg.boot.backend == "file";
        let exit = ota_agent::daemon::run(cfg, shutdown).await?;
        match exit {
            ota_agent::daemon::Exit::Rebooting if file_backend && restart_after_reboot => {
                tracing::info!("simulated reboot done: starting again (--restart-after-reboot)");
            }
            ota_agent::daemon::Exit::Rebooting if file_backend => {
                tracing::warn!(
                    "the `file` boot back-end has no real reboot: the agent exits here and the \
                     device stays `installed` until `ota-agent run` starts again (a supervisor \
                     loop, or --restart-after-reboot for demos)"
                );
                return Ok(());
            }
            _ => {
                tracing::info!(?exit, "agent stopped");
                return Ok(());
            }
        }
        // Like a device coming back up: a new process image, same arguments.
        let exe = std::env::current_exe().context("finding this executable to restart")?;
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(std::env::args_os().skip(1));
        let err = std::os::unix::process::CommandExt::exec(&mut cmd);
        Err(anyhow::Error::new(err).context(format!("restarting {}", exe.display())))
    })
}

fn status(config: &Path) -> Result<()> {
    let cfg = ota_agent::config::Config::load(config)?;
    print!(
        "{}",
        ota_agent::status::report(&cfg).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

fn install_now(config: &Path) -> Result<()> {
    let cfg = ota_agent::config::Config::load(config)?;
    println!(
        "{}",
        ota_agent::install_now::request(&cfg).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

/// Reads a file that must not exceed `limit` bytes, without trusting its size.
fn read_limited(path: &Path, limit: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() > limit {
        bail!(
            "{} is over the {limit}-byte manifest limit: refusing to parse it",
            path.display()
        );
    }
    Ok(buf)
}

fn apply(a: ApplyArgs) -> Result<()> {
    let started = Instant::now();
    let keys = a
        .pubkeys
        .iter()
        .map(|p| {
            let pem = fs::read_to_string(p)
                .with_context(|| format!("reading public key {}", p.display()))?;
            public_key_from_pem(&pem).with_context(|| format!("public key {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let trusted = TrustedKeys::try_new(keys, a.threshold)?;
    let bytes = read_limited(&a.manifest, MAX_ENVELOPE_BYTES)?;
    let manifest = Envelope::open(&bytes, &trusted, SystemTime::now())
        .with_context(|| format!("manifest {}", a.manifest.display()))?;

    let source = match (&manifest.from, &a.source) {
        (Some(from), None) => bail!(
            "this is a delta from version {}: pass its image with --source",
            from.version
        ),
        (Some(_), Some(p)) => {
            let f =
                File::open(p).with_context(|| format!("opening source image {}", p.display()))?;
            let len = f.metadata()?.len();
            if len != manifest.from.as_ref().map_or(len, |f| f.size) {
                // Wrong size: refused at once, without hashing.
                check_source(&manifest, &f, len)
                    .with_context(|| format!("source image {}", p.display()))?;
            }
            Some((f, len, p.clone()))
        }
        (None, _) => None,
    };

    let payload = File::open(&a.payload)
        .with_context(|| format!("opening payload {}", a.payload.display()))?;
    let payload_len = payload.metadata()?.len();
    check_payload(&manifest, &payload, payload_len)
        .with_context(|| format!("payload {}", a.payload.display()))?;

    // Write beside the destination, then rename: a crash or an error never
    // leaves a half-written image at --out.
    let dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".ota-apply-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.as_file().set_len(manifest.to.size).with_context(|| {
        format!(
            "reserving {} bytes in {} (disk full?)",
            manifest.to.size,
            dir.display()
        )
    })?;
    let bar = if a.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(manifest.to.size)
    };
    bar.set_style(
        ProgressStyle::with_template("applying [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("static template")
            .progress_chars("=> "),
    );
    // The source is hashed on a second thread while the operations apply:
    // the output is only renamed into place once both have succeeded, and a
    // wrong source is reported as such even if an operation tripped over it
    // first.
    let (source_check, applied) = std::thread::scope(|s| {
        let check = source
            .as_ref()
            .map(|(f, len, _)| s.spawn(|| check_source(&manifest, f, *len)));
        let applied = apply_image(
            &manifest,
            &payload,
            source.as_ref().map(|(f, _, _)| f),
            tmp.as_file(),
            ApplyOptions {
                // A fresh temporary file reads as zeros.
                dest_is_zeroed: true,
                // Operations are independent; two cores are common on
                // devices and the memory budget holds whatever the count.
                threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
                // The engine's default budget: the bound the README states.
                memory_budget: 0,
            },
            |done| bar.set_position(done),
        );
        let check = check.map(|h| h.join().expect("source check thread panicked"));
        (check, applied)
    });
    if let (Some(Err(e)), Some((_, _, p))) = (source_check, &source) {
        return Err(e).with_context(|| format!("source image {}", p.display()));
    }
    applied.with_context(|| format!("applying {}", a.payload.display()))?;
    bar.finish_and_clear();
    tmp.as_file().sync_all().context("syncing the new image")?;
    tmp.persist(&a.out)
        .with_context(|| format!("renaming into {}", a.out.display()))?;
    File::open(dir)?.sync_all()?;
    println!(
        "applied {} -> {}: {} bytes verified (sha256 {}) in {:.1} s",
        manifest
            .from
            .as_ref()
            .map_or("(full image)", |f| f.version.as_str()),
        manifest.to.version,
        manifest.to.size,
        manifest.to.sha256,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every option and argument of every subcommand explains itself in
    /// `--help` (`--config`, `--env-file`... once had none).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                if a.get_help().is_none() && a.get_id() != "help" && a.get_id() != "version" {
                    missing.push(format!("{path} --{}", a.get_id()));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "ota-agent", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
