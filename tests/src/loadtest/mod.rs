//! `ota-loadtest`: a simulated fleet against a real `ota-server` process.
//!
//! Each simulated device is a tokio task that speaks the device API with the
//! agent's own [`ota_agent::client::Client`], checks manifests with
//! [`ota_agent::verify::check_manifest`] and downloads with the agent's chunk
//! pool ([`ota_agent::pool::run`]), so what is measured is the real code.
//! Most devices write into a discarding sink (every operation's output is
//! still hashed by the apply engine before it would be written); a fraction
//! writes real slot files whose final hash is checked.
//!
//! # Layout
//! - this module: configuration, orchestration (server process, releases,
//!   enrollment, rollout, the fleet), invariant checks and exit status;
//! - [`sim`]: one simulated device and its faults;
//! - [`proxy`]: the fault-injecting TCP proxy (cuts and corrupted bytes);
//! - [`report`]: samples, the terminal table, JSON and the SVG chart.
//!
//! Every loop is bounded: devices stop at the run's deadline, the harness
//! kills the server it started, and the run ends by itself.

pub mod proxy;
pub mod report;
pub mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ota_agent::client::{Client, Timeouts};
use tokio_util::sync::CancellationToken;

use crate::images;

/// Command-line options. Rates are fractions of the fleet (0..1).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ota-loadtest",
    about = "Simulate a fleet against a real ota-server and check the throttle holds"
)]
pub struct Args {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Image size in KiB (both versions; the delta is a few percent of it).
    #[arg(long, default_value_t = 1024)]
    pub image_kib: usize,
    /// Share of the image (64 KiB blocks) that changes between versions.
    #[arg(long, default_value_t = 20)]
    pub change_percent: u8,
    /// Waves (cumulative percentages).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    pub waves: Vec<u8>,
    /// Soak per wave (compressed time), e.g. 5s.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub soak: Duration,
    /// Fleet-wide concurrent download cap.
    #[arg(long, default_value_t = 200)]
    pub max_concurrent: u64,
    /// Download starts per minute.
    #[arg(long, default_value_t = 30000.0)]
    pub max_starts_per_min: f64,
    /// Failure rate that pauses the rollout.
    #[arg(long, default_value_t = 0.2)]
    pub failure_threshold: f64,
    /// Committed share of a wave needed to open the next.
    #[arg(long, default_value_t = 0.8)]
    pub success_threshold: f64,
    /// Server check-in interval for idle devices (ms).
    #[arg(long, default_value_t = 5000)]
    pub idle_ms: u64,
    /// Server check-in interval for throttled devices (ms).
    #[arg(long, default_value_t = 2000)]
    pub wait_ms: u64,
    /// Download lease (ms).
    #[arg(long, default_value_t = 5000)]
    pub lease_ms: u64,
    /// Parallel ranges per device.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Devices whose download is cut mid-way by the fault proxy (their
    /// connections go through it, each cut with probability --cut-prob).
    #[arg(long, default_value_t = 0.0)]
    pub cut_rate: f64,
    /// Devices whose wire corrupts bytes (through the proxy).
    #[arg(long, default_value_t = 0.0)]
    pub corrupt_rate: f64,
    /// Devices killed mid-download and restarted (resume).
    #[arg(long, default_value_t = 0.0)]
    pub kill_rate: f64,
    /// Devices that go silent after admission (leases must expire).
    #[arg(long, default_value_t = 0.0)]
    pub silent_rate: f64,
    /// Devices on slow links.
    #[arg(long, default_value_t = 0.0)]
    pub slow_rate: f64,
    /// Bandwidth of a slow link (bytes/s).
    #[arg(long, default_value_t = 64 * 1024)]
    pub slow_bps: u64,
    /// Devices whose health check fails after install (rolled back).
    #[arg(long, default_value_t = 0.0)]
    pub health_fail_rate: f64,
    /// Devices that apply into real slot files (the rest use a sink).
    #[arg(long, default_value_t = 0.01)]
    pub real_slot_rate: f64,
    /// Restart the server (kill -9) once this far into the run (0 = never).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub server_restart_at: Duration,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Loopback source addresses to spread devices over (127.0.x.y).
    #[arg(long, default_value_t = 256)]
    pub source_addrs: u32,
    /// Most API requests in flight at once across the fleet (bounds sockets).
    #[arg(long, default_value_t = 4096)]
    pub max_requests: usize,
    /// Where to write report.json and chart.svg.
    #[arg(long, default_value = "loadtest-report")]
    pub out: PathBuf,
    /// Random seed (printed; pass it to reproduce the fault assignment).
    #[arg(long)]
    pub seed: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub const ADMIN: &str = "loadtest-admin-token-0123456789";
pub const ENROLL: &str = "loadtest-enroll-key-0123456789";

/// The server process the harness runs (and restarts).
pub struct ServerProc {
    child: Option<Child>,
    cfg: PathBuf,
    pub addr: SocketAddr,
}

impl ServerProc {
    fn start(cfg: &Path, addr: SocketAddr) -> Result<ServerProc> {
        let mut s = ServerProc {
            child: None,
            cfg: cfg.to_path_buf(),
            addr,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(crate::bin("ota-server"))
            .arg("serve")
            .arg("--config")
            .arg(&self.cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting ota-server")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut line,
        )?;
        if !line.starts_with("ota-server listening on") {
            bail!("ota-server did not start: {line:?}");
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// kill -9 and start again on the same address.
    fn restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        // The port may linger briefly; retry the bind for a few seconds.
        let t = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if t.elapsed() < Duration::from_secs(10) => {
                    tracing::warn!(error = %e, "restart failed, retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Server CPU seconds and peak RSS from /proc.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((cpu, hwm * 1024))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `n`-th loopback source address: 127.0.x.y, skipping .0 and 127.0.0.1.
pub fn source_addr(n: u32) -> IpAddr {
    let v = n + 2;
    IpAddr::V4(Ipv4Addr::new(
        127,
        ((v >> 16) & 0xff) as u8,
        ((v >> 8) & 0xff) as u8,
        (v & 0xff) as u8,
    ))
}

/// Timeouts of the simulated devices' clients.
fn timeouts(read: Duration) -> Timeouts {
    Timeouts {
        request: Duration::from_secs(10),
        read,
    }
}

/// HTTP clients, one per source address (each has its own connection pool);
/// devices get their own [`Client`] (own token) over one of them.
fn clients(n: u32, read_timeout: Duration) -> Result<Vec<reqwest::Client>> {
    (0..n.max(1))
        .map(|i| {
            let http = reqwest::Client::builder()
                .local_address(source_addr(i))
                .no_gzip()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(24)
                .pool_idle_timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(read_timeout)
                .build()?;
            Ok(http)
        })
        .collect()
}

/// Runs the whole load test; returns the report and whether every
/// invariant held.
pub async fn run(args: Args) -> Result<(report::Report, bool)> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("ota-loadtest: {} devices, seed {seed}", args.devices);
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let key = ota_format::SigningKeyPair::generate()?;
    std::fs::write(dir.path().join("signing.key"), key.to_pem()?)?;
    let trusted = ota_format::TrustedKeys::try_new(vec![key.verifying_key()], 1)?;
    std::fs::write(
        dir.path().join("server.toml"),
        format!(
            "listen = \"{addr}\"\ndata_dir = \"data\"\nadmin_token = \"{ADMIN}\"\nenrollment_key = \"{ENROLL}\"\nsigning_key = \"signing.key\"\nzstd_level = 9\nchunk_size = 65536\n[checkin]\nidle_interval_ms = {}\nwait_interval_ms = {}\nlease_ms = {}\njitter = 0.3\nmax_parallel_ranges = {}\n",
            args.idle_ms, args.wait_ms, args.lease_ms, args.parallel
        ),
    )?;
    let mut server = ServerProc::start(&dir.path().join("server.toml"), addr)?;
    let base = format!("http://{addr}");
    let admin = ota_server::client::AdminClient::new(&base, ADMIN)?;

    // Two versions of an image, as releases.
    if args.image_kib == 0 || args.image_kib % 4 != 0 {
        bail!("--image-kib must be a positive multiple of 4");
    }
    let size = args.image_kib * 1024;
    let v1 = images::base(size, seed | 1);
    let mut v2 = images::next_version(&v1);
    v2.resize(size, 0);
    // Replace an evenly spread share of 64 KiB blocks with fresh noise, so
    // the payload has operations and ranges worth cutting, killing and
    // resuming, whatever the image size.
    let mut x = seed | 1;
    let pct = args.change_percent as usize;
    for (i, block) in v2.chunks_mut(64 << 10).enumerate() {
        if (i * pct) % 100 < pct {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    for (v, img) in [("1.0", &v1), ("2.0", &v2)] {
        let p = dir.path().join(format!("{v}.img"));
        std::fs::write(&p, img)?;
        admin.release_add("sim", v, 0, &p, false).await?;
    }
    let t = Instant::now();
    loop {
        let r = admin.releases().await?;
        if r.iter().all(|r| {
            r.builds
                .iter()
                .all(|b| b.status == ota_server::releases::BuildStatus::Ready)
        }) {
            break;
        }
        if r.iter().any(|r| {
            r.builds
                .iter()
                .any(|b| b.status == ota_server::releases::BuildStatus::Failed)
        }) {
            bail!("a release build failed: {r:?}");
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("release builds did not finish in 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rel = admin.releases().await?;
    let v2rec = rel
        .iter()
        .find(|r| r.version == "2.0")
        .context("release 2.0")?;
    let delta_size = v2rec
        .builds
        .iter()
        .find(|b| b.from_version.as_deref() == Some("1.0"))
        .and_then(|b| b.artifacts.as_ref())
        .map_or(0, |a| a.payload_size);

    // The fault proxy, for devices on bad links.
    let proxy_cancel = CancellationToken::new();
    let proxy = proxy::FaultProxy::start(addr, seed, proxy_cancel.clone()).await?;
    let proxy_base = format!("http://{}", proxy.addr);

    let read_timeout = Duration::from_secs(5);
    let direct = clients(args.source_addrs, read_timeout)?;
    let via_proxy = clients((args.source_addrs / 16).max(1), read_timeout)?;
    let t = timeouts(read_timeout);

    // Enroll the fleet.
    let enroll_started = Instant::now();
    let enrollers: Vec<Client> = direct
        .iter()
        .map(|h| Client::from_reqwest(h.clone(), &base, t))
        .collect();
    let tokens = sim::enroll_all(&enrollers, args.devices, ENROLL).await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    eprintln!("enrolled {} devices in {enroll_secs:.1} s", args.devices);

    let spec: ota_server::rollout::RolloutSpec = serde_json::from_value(serde_json::json!({
        "release": "2.0", "device_type": "sim", "waves": args.waves,
        "soak_ms": args.soak.as_millis() as u64, "max_concurrent": args.max_concurrent,
        "max_starts_per_min": args.max_starts_per_min, "failure_threshold": args.failure_threshold,
        "success_threshold": args.success_threshold, "min_sample": 50, "on_failure": "pause",
        "max_retries": 3
    }))?;
    let rollout = admin.rollout_create(&spec).await?;

    let slots_dir = dir.path().join("slots");
    std::fs::create_dir_all(&slots_dir)?;
    let v1_path = dir.path().join("1.0.img");
    let shared = Arc::new(sim::Shared {
        source: Arc::new(v1),
        source_path: v1_path,
        target_sha: ota_format::Digest::of(&v2),
        target_len: v2.len() as u64,
        trusted,
        cancel: CancellationToken::new(),
        stats: sim::FleetStats::new(args.devices),
        args: args.clone(),
        started: Instant::now(),
        slots_dir,
        in_flight: tokio::sync::Semaphore::new(args.max_requests),
    });
    drop(v2);

    let run_started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let plan = sim::assign_faults(&args, seed);
    for (i, (token, faults)) in tokens.into_iter().zip(plan).enumerate() {
        let (pool, url) = if faults.via_proxy {
            (&via_proxy, &proxy_base)
        } else {
            (&direct, &base)
        };
        let client = Client::from_reqwest(pool[i % pool.len()].clone(), url, t).with_token(token);
        let dev = sim::Device {
            index: i,
            id: sim::device_id(i),
            client,
            faults,
            wave: {
                let p = ota_server::rollout::percentile(&sim::device_id(i), &rollout.id);
                args.waves.iter().position(|&w| p < w).unwrap_or(0)
            },
        };
        tasks.spawn(sim::run_device(dev, shared.clone()));
    }

    // Sampler, progress, server restart, deadline.
    let mut samples = Vec::new();
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.devices as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} {bar:30} {pos}/{len} finished  {msg}",
        )
        .expect("valid template"),
    );
    let mut restarted = args.server_restart_at.is_zero();
    let mut restarts = 0u64;
    let mut max_server_leases = 0u64;
    let mut ticks = 0u64;
    let mut peak_cpu = (0.0f64, 0u64);
    let mut cpu_before_restart = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = tasks.join_next() => {
                match r {
                    None => break,
                    Some(Err(e)) => bail!("a device task panicked: {e}"),
                    Some(Ok(())) => continue,
                }
            }
        }
        let elapsed = run_started.elapsed();
        ticks += 1;
        if ticks % 4 == 0
            && let Ok(Ok(st)) =
                tokio::time::timeout(Duration::from_secs(2), admin.rollout(&rollout.id)).await
        {
            max_server_leases = max_server_leases.max(st.active_leases);
        }
        let s = shared.stats.sample(elapsed, args.waves.len(), &shared);
        bar.set_position(s.finished);
        bar.set_message(format!(
            "waiting {} downloading {} (max {}/{}) committed {} failed {} rolled back {}",
            s.waiting,
            s.downloading,
            shared.stats.max_downloading.load(Ordering::Relaxed),
            args.max_concurrent,
            s.committed,
            s.failed,
            s.rolled_back
        ));
        samples.push(s);
        if let Some(pid) = server.pid()
            && let Some((cpu, rss)) = proc_usage(pid)
        {
            peak_cpu.0 = cpu_before_restart + cpu;
            peak_cpu.1 = peak_cpu.1.max(rss);
        }
        if !restarted && elapsed >= args.server_restart_at {
            restarted = true;
            restarts += 1;
            cpu_before_restart = peak_cpu.0;
            bar.println(format!(
                "kill -9 of the server at {:.1} s",
                elapsed.as_secs_f64()
            ));
            let t = Instant::now();
            tokio::task::block_in_place(|| server.restart())?;
            bar.println(format!(
                "server back after {:.1} s",
                t.elapsed().as_secs_f64()
            ));
        }
        if elapsed > args.deadline {
            bar.println("deadline reached: stopping the fleet");
            shared.cancel.cancel();
        }
    }
    bar.finish_and_clear();
    let run_secs = run_started.elapsed().as_secs_f64();
    proxy_cancel.cancel();

    // What the server says.
    let status = admin.rollout(&rollout.id).await?;
    let stats = admin.stats().await?;
    let events_stored = stats["events_stored"].as_u64().unwrap_or(0);
    let r = report::build(report::Inputs {
        args: &args,
        seed,
        run_secs,
        enroll_secs,
        shared: &shared,
        status: &status,
        events_stored,
        server_cpu_secs: peak_cpu.0,
        server_peak_rss: peak_cpu.1,
        image_size: size as u64,
        delta_size,
        samples,
        proxy: proxy.stats(),
        max_server_leases,
        server_restarts: restarts,
    });
    drop(server);
    let ok = r.invariants_hold();
    Ok((r, ok))
}
