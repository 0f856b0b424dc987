//! `ota-loadtest`: a simulated fleet against real `ota-server` processes:
//! one sled process (the default), or `--replicas N` behind nginx sharing
//! PostgreSQL and Redis (see [`crate::cluster`]).
//!
//! Each simulated device is a tokio task that speaks the device API with the
//! agent's own [`ota_agent::client::Client`], checks manifests with
//! [`ota_agent::verify::check_manifest`] and downloads with the agent's chunk
//! pool ([`ota_agent::pool::run`]), so what is measured is the real code.
//! Most devices write into a discarding sink (every operation's output is
//! still hashed by the apply engine before it would be written); a fraction
//! writes real slot files whose final hash is checked.
//!
//! With replicas the invariants are judged fleet-wide: the devices count
//! themselves downloading and their download starts (the authority on "the
//! cap and the start rate held across replicas"). A device counts while it
//! really fetches (manifest or payload), not while it merely holds an
//! update between attempts, and it stops by itself when its lease could not
//! be renewed in time, as the agent does ([`ota_agent::lease`]). The cap is
//! judged over devices whose lease is live by their own clock: with the
//! whole fleet in one process, a lapsed device's stop waits for the
//! runtime to run its task (seconds, when the machine stalls), and such
//! devices are reported apart (`max_lapsed_not_yet_stopped`). The
//! server's active leases
//! are polled through the balancer, and events acknowledged by devices must
//! equal events stored.
//!
//! # Layout
//! - this module: configuration, orchestration (servers, releases,
//!   enrollment, rollout, the fleet), invariant checks and exit status;
//! - [`faults`]: kill -9 of a replica, Redis and PostgreSQL restarts, and
//!   what the run looked like around each;
//! - [`sim`]: one simulated device and its faults;
//! - [`ddi`]: one simulated hawkBit DDI target (`--ddi-share`), in the same
//!   rollout and counted under the same cap and start rate;
//! - [`proxy`]: the fault-injecting TCP proxy (cuts and corrupted bytes);
//! - [`report`]: samples, the terminal table, JSON and the SVG chart.
//!
//! Every loop is bounded: devices stop at the run's deadline, the harness
//! kills the servers (and nginx) it started, and the run ends by itself.

pub mod ddi;
pub mod faults;
pub mod proxy;
pub mod report;
pub mod sim;
pub mod windows;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ota_agent::client::{Client, Timeouts};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterOpts};
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
    /// Devices that are hawkBit DDI targets instead of agents (as SWUpdate
    /// or RAUC would be): they poll the DDI API and fetch a bundle attached
    /// to the same release, in the same rollout, under the same cap and
    /// start rate (`loadtest::ddi`). Of the faults only --silent-rate
    /// applies to them.
    #[arg(long, default_value_t = 0.0)]
    pub ddi_share: f64,
    /// Maintenance windows (issue 15): agents report these IANA zones
    /// (round robin), the rollout has one device-local window, and the
    /// harness opens the zones' windows in turn through the server's test
    /// window clock (`loadtest::windows`). E.g.
    /// `Asia/Dhaka,Asia/Kathmandu,Asia/Kolkata` (15 minutes apart).
    #[arg(long, value_delimiter = ',')]
    pub window_zones: Vec<String>,
    /// How long each zone's window (and the closed spell before them) is
    /// held, in turn.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    pub window_hold: Duration,
    /// Share of the agents that enroll only after the rollout started,
    /// spread over --late-over (dynamic membership: they must join it).
    #[arg(long, default_value_t = 0.0)]
    pub late_share: f64,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub late_over: Duration,
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
    /// Restart the server (kill -9, then start at once) this far into the
    /// run (0 = never). With --replicas: replica 0.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub server_restart_at: Duration,
    /// Server replicas behind nginx (the devices and the admin client talk
    /// to nginx). 0 = one sled process and no balancer. One replica may use
    /// sled; more need --pg-url and --redis-url.
    #[arg(long, default_value_t = 0)]
    pub replicas: usize,
    /// PostgreSQL admin URL (e.g. $OTA_TEST_PG_URL): the harness creates a
    /// fresh database there for the replicas' state, and drops it at the end.
    #[arg(long)]
    pub pg_url: Option<String>,
    /// Redis URL (e.g. $OTA_TEST_REDIS_URL) for the fleet-wide throttle; the
    /// run's keys get a prefix of their own.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// kill -9 of replica 1 (replica 0 with a single one) this far into the
    /// run (0 = never); it comes back --replica-down-for later.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub kill_replica_at: Duration,
    /// How long the killed replica stays down.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub replica_down_for: Duration,
    /// Restart Redis losing its data (services.sh restart-redis) this far
    /// into the run (0 = never).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub restart_redis_at: Duration,
    /// Restart PostgreSQL (services.sh restart-postgres, fast mode) this far
    /// into the run (0 = never).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub restart_postgres_at: Duration,
    /// scripts/services.sh, for the Redis and PostgreSQL restarts.
    #[arg(long, env = "OTA_SERVICES_SCRIPT")]
    pub services_script: Option<PathBuf>,
    /// Keep the run's database (and print its URL) instead of dropping it.
    #[arg(long)]
    pub keep_database: bool,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Loopback source addresses to spread devices over (127.0.x.y).
    #[arg(long, default_value_t = 256)]
    pub source_addrs: u32,
    /// Most API requests in flight at once across the fleet (bounds sockets);
    /// devices holding an update (lease renewals, events) have a quarter as
    /// many slots of their own.
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

pub const ADMIN: &str = "b5952ff26437e857808c12417ad6b99e";
pub const ENROLL: &str = "6f4b8f615ab795f278485966d0ac984b";

pub use crate::cluster::ServerProc;

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

/// What the run runs on: the cluster and how it is set up.
struct Deployment {
    cluster: Arc<Cluster>,
    storage: &'static str,
    throttle: &'static str,
    database: Option<String>,
}

/// Starts the server processes the options ask for.
async fn deploy(args: &Args, dir: &Path) -> Result<Deployment> {
    if args.replicas > 1 && (args.pg_url.is_none() || args.redis_url.is_none()) {
        bail!(
            "--replicas {} needs --pg-url and --redis-url: replicas share their state in PostgreSQL and the fleet-wide throttle in Redis (scripts/services.sh start; eval \"$(scripts/services.sh env)\"; then --pg-url \"$OTA_TEST_PG_URL\" --redis-url \"$OTA_TEST_REDIS_URL\")",
            args.replicas
        );
    }
    if args.replicas == 0 && (args.pg_url.is_some() || args.redis_url.is_some()) {
        bail!("--pg-url and --redis-url need --replicas 1 or more");
    }
    if args.redis_url.is_some() && args.pg_url.is_none() {
        bail!("--redis-url needs --pg-url: the server refuses a Redis throttle over sled");
    }
    if !args.restart_redis_at.is_zero() && args.redis_url.is_none() {
        bail!("--restart-redis-at needs --redis-url");
    }
    if !args.restart_postgres_at.is_zero() && args.pg_url.is_none() {
        bail!("--restart-postgres-at needs --pg-url");
    }
    if (!args.restart_redis_at.is_zero() || !args.restart_postgres_at.is_zero())
        && args.services_script.is_none()
    {
        bail!(
            "restarting Redis or PostgreSQL needs --services-script (or OTA_SERVICES_SCRIPT): scripts/services.sh"
        );
    }
    let database = match &args.pg_url {
        Some(admin) => Some(crate::services::create_database(admin, "loadtest").await?),
        None => None,
    };
    if let (Some(db), true) = (&database, args.keep_database) {
        eprintln!("database {db} (kept: --keep-database)");
    }
    let opts = ClusterOpts {
        pg_url: database.clone(),
        redis_url: args.redis_url.clone(),
        key_prefix: crate::services::unique_name("loadtest"),
        // Every device request may wait on the pool: keep it well stocked,
        // within PostgreSQL's max_connections (300 in services.sh).
        pool_size: (240 / args.replicas.max(1)).clamp(4, 32),
        admin_token: ADMIN.into(),
        enrollment_key: ENROLL.into(),
        signing_key: Some(dir.join("signing.key")),
        top_level: "zstd_level = 9\nchunk_size = 65536\n".into(),
        sections: format!(
            "[checkin]\nidle_interval_ms = {}\nwait_interval_ms = {}\nlease_ms = {}\njitter = 0.3\nmax_parallel_ranges = {}\n",
            args.idle_ms, args.wait_ms, args.lease_ms, args.parallel
        ),
        balancer: args.replicas > 0,
        nginx_workers: 1,
        rust_log: "warn".into(),
        forward_stderr: true,
        dir: Some(dir.join("cluster")),
        drop_database_via: if args.keep_database {
            None
        } else {
            args.pg_url.clone()
        },
        independent_sled: false,
        server_bin: None,
    };
    let n = args.replicas.max(1);
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(n, opts)).await??;
    Ok(Deployment {
        cluster: Arc::new(cluster),
        storage: if database.is_some() {
            "postgres"
        } else {
            "sled"
        },
        throttle: if args.redis_url.is_some() {
            "redis"
        } else {
            "local"
        },
        database,
    })
}

/// Retries an admin call a few times (a replica may be restarting).
async fn admin_retry<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut last = None;
    for attempt in 0..10u32 {
        match tokio::time::timeout(Duration::from_secs(10), f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("timed out after 10 s")),
        }
        tokio::time::sleep(Duration::from_millis(300 * (attempt as u64 + 1))).await;
    }
    Err(last
        .expect("tried")
        .context(format!("{what}: 10 attempts failed")))
}

/// Runs the whole load test; returns the report and whether every
/// invariant held.
pub async fn run(args: Args) -> Result<(report::Report, bool)> {
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("ota-loadtest: {} devices, seed {seed}", args.devices);
    let dir = tempfile::tempdir()?;
    let key = ota_format::SigningKeyPair::generate()?;
    std::fs::write(dir.path().join("signing.key"), key.to_pem()?)?;
    let trusted = ota_format::TrustedKeys::try_new(vec![key.verifying_key()], 1)?;
    let dep = deploy(&args, dir.path()).await?;
    let cluster = dep.cluster.clone();
    let lb = cluster.lb_addr();
    let base = cluster.lb_url();
    if args.replicas > 0 {
        eprintln!(
            "{} replica(s) ({} storage, {} throttle) behind nginx at {base}",
            cluster.len(),
            dep.storage,
            dep.throttle
        );
    }
    let admin = Arc::new(ota_server::client::AdminClient::new(&base, ADMIN)?);

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
    if !(0.0..=1.0).contains(&args.ddi_share) {
        bail!("--ddi-share is a fraction of the fleet (0..1)");
    }
    if !(0.0..=1.0).contains(&args.late_share) {
        bail!("--late-share is a fraction of the fleet (0..1)");
    }
    if !args.window_zones.is_empty() && args.ddi_share > 0.0 {
        // DDI targets report no zone (their `local` windows are UTC) and,
        // unable to hold a verified update, are admitted only inside one.
        bail!("--window-zones and --ddi-share do not mix: run them apart");
    }
    if args.ddi_share > 0.0 {
        // DDI targets get a bundle of their own format attached to the same
        // release (here the new image itself, as a `file` bundle).
        admin
            .release_add_bundle(
                "sim",
                "2.0",
                0,
                ota_server::releases::bundle::BundleFormat::File,
                Some("sim-2.0.img"),
                None,
                true,
                &dir.path().join("2.0.img"),
                false,
            )
            .await
            .context("attaching the DDI targets' bundle to release 2.0")?;
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

    // The fault proxy, for devices on bad links (in front of the balancer).
    let proxy_cancel = CancellationToken::new();
    let proxy = proxy::FaultProxy::start(lb, seed, proxy_cancel.clone()).await?;
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
    let is_ddi = ddi_targets(&args, seed);
    let late = late_devices(&args, seed, &is_ddi);
    let now: Vec<usize> = (0..args.devices).filter(|&i| late[i].is_none()).collect();
    let early_tokens = sim::enroll_all(&enrollers, &now, ENROLL).await?;
    let tokens: Vec<std::sync::OnceLock<String>> = (0..args.devices)
        .map(|_| std::sync::OnceLock::new())
        .collect();
    for (&i, tok) in now.iter().zip(early_tokens) {
        let _ = tokens[i].set(tok);
    }
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    eprintln!(
        "enrolled {} devices in {enroll_secs:.1} s ({} more enroll during the rollout)",
        now.len(),
        args.devices - now.len()
    );
    let window_plan = if args.window_zones.is_empty() {
        None
    } else {
        Some(Arc::new(windows::Plan::new(&args.window_zones)?))
    };

    let spec: ota_server::rollout::RolloutSpec = serde_json::from_value(serde_json::json!({
        "release": "2.0", "device_type": "sim", "waves": args.waves,
        "soak_ms": args.soak.as_millis() as u64, "max_concurrent": args.max_concurrent,
        "max_starts_per_min": args.max_starts_per_min, "failure_threshold": args.failure_threshold,
        "success_threshold": args.success_threshold, "min_sample": 50, "on_failure": "pause",
        "max_retries": 3,
        "windows": if window_plan.is_some() { vec![windows::window_spec()] } else { Vec::new() },
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
        is_ddi,
        args: args.clone(),
        started: Instant::now(),
        slots_dir,
        in_flight: tokio::sync::Semaphore::new(args.max_requests),
        holders: tokio::sync::Semaphore::new(holder_slots(args.max_requests)),
        windows: window_plan.clone(),
        tokens,
        late,
    });
    drop(v2);

    let run_started = shared.started;
    let mut tasks = tokio::task::JoinSet::new();
    let plan = sim::assign_faults(&args, seed);
    let is_ddi = shared.is_ddi.clone();
    for (i, faults) in plan.into_iter().enumerate() {
        let token = shared.tokens[i].get().cloned();
        if is_ddi[i] {
            let token = token.context("DDI targets enroll before the rollout")?;
            let dev = sim::Device {
                index: i,
                id: sim::device_id(i),
                client: Client::from_reqwest(direct[i % direct.len()].clone(), &base, t),
                faults: sim::Faults {
                    silent: faults.silent,
                    ..Default::default()
                },
                wave: rollout.wave_of(&sim::device_id(i)),
            };
            tasks.spawn(ddi::run_target(
                ddi::Target {
                    device: dev,
                    http: direct[i % direct.len()].clone(),
                    base: base.clone(),
                    token,
                },
                shared.clone(),
            ));
            continue;
        }
        let (pool, url) = if faults.via_proxy {
            (&via_proxy, &proxy_base)
        } else {
            (&direct, &base)
        };
        let client = Client::from_reqwest(pool[i % pool.len()].clone(), url, t);
        // A late device enrolls (and sets its token) during the run.
        if let Some(token) = token {
            client.set_token(token);
        }
        let dev = sim::Device {
            index: i,
            id: sim::device_id(i),
            client,
            faults,
            wave: rollout.wave_of(&sim::device_id(i)),
        };
        tasks.spawn(sim::run_device(dev, shared.clone()));
    }

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

    // Server-side leases, through the balancer, once a second.
    let aux_cancel = CancellationToken::new();
    let leases = Arc::new(LeaseWatch::default());
    let lease_task = tokio::spawn(watch_leases(
        admin.clone(),
        rollout.id.clone(),
        leases.clone(),
        aux_cancel.clone(),
    ));
    // The window clock, when the rollout has windows.
    let window_task = window_plan.clone().map(|plan| {
        tokio::spawn(windows::drive(
            plan,
            (0..cluster.len()).map(|i| cluster.replica_url(i)).collect(),
            ADMIN.to_string(),
            args.window_hold,
            aux_cancel.clone(),
        ))
    });
    // Infrastructure faults.
    let fault_plan = faults::plan(&args, cluster.len());
    let fault_log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fault_task = tokio::spawn(faults::drive(
        fault_plan.clone(),
        cluster.clone(),
        args.services_script.clone(),
        run_started,
        aux_cancel.clone(),
        fault_log.clone(),
        bar.clone(),
    ));

    // Sampler, progress, deadline.
    let mut samples = Vec::new();
    let mut cpu_by_pid = std::collections::HashMap::<u32, f64>::new();
    let mut lb_cpu_by_pid = std::collections::HashMap::<u32, f64>::new();
    let mut peak_rss = 0u64;
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
        let mut s = shared.stats.sample(elapsed, args.waves.len(), &shared);
        s.server_leases = leases.last.load(Ordering::Relaxed);
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
        for pid in cluster.pids().into_iter().flatten() {
            if let Some((cpu, rss)) = proc_usage(pid) {
                cpu_by_pid.insert(pid, cpu);
                peak_rss = peak_rss.max(rss);
            }
        }
        for pid in cluster.nginx_pids() {
            if let Some((cpu, _)) = proc_usage(pid) {
                lb_cpu_by_pid.insert(pid, cpu);
            }
        }
        if elapsed > args.deadline {
            bar.println("deadline reached: stopping the fleet");
            shared.cancel.cancel();
        }
    }
    bar.finish_and_clear();
    let run_secs = run_started.elapsed().as_secs_f64();
    proxy_cancel.cancel();
    aux_cancel.cancel();
    let _ = lease_task.await;
    let _ = fault_task.await;
    if let Some(w) = window_task {
        w.await?.context("moving the window clock")?;
    }
    // Faults planned after the fleet finished did not happen; a replica
    // still down comes back so the final figures see every replica.
    for i in 0..cluster.len() {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.start_again(i)).await??;
    }

    // What the server says (through the balancer).
    let status = admin_retry("rollout status", || admin.rollout(&rollout.id)).await?;
    // Every committed device reports in on its new version, as an agent
    // does after the reboot into the new slot; then the server (any
    // replica) must know it runs the new version.
    let committed: Vec<usize> = (0..args.devices)
        .filter(|&i| {
            shared.stats.state[i].load(Ordering::Relaxed) == sim::DevState::Committed as u8
        })
        .collect();
    let all_tokens: Vec<String> = shared
        .tokens
        .iter()
        .map(|t| t.get().cloned().unwrap_or_default())
        .collect();
    let report_in = report_in(&direct, &base, t, &admin, &all_tokens, &committed, &is_ddi).await;
    let stats = admin_retry("admin stats", || admin.stats()).await?;
    let events_stored = stats["events_stored"]
        .as_u64()
        .context("the admin stats have no events_stored")?;
    let mut starts = shared.stats.starts.lock().unwrap().clone();
    starts.sort_unstable();
    let mut fault_records = std::mem::take(&mut *fault_log.lock().unwrap());
    faults::annotate(&mut fault_records, &samples, &starts);
    let redis = args.redis_url.is_some();
    let throttle_resets = fault_records
        .iter()
        .filter(|f| f.error.is_none() && f.action.is_some_and(|a| a.resets_throttle(redis)))
        .count() as u64;
    let server_restarts = fault_records
        .iter()
        .filter(|f| {
            f.error.is_none()
                && matches!(
                    f.action,
                    Some(faults::Action::RestartReplica(_) | faults::Action::KillReplica(_))
                )
        })
        .count() as u64;
    let r = report::build(report::Inputs {
        args: &args,
        seed,
        run_secs,
        enroll_secs,
        shared: &shared,
        status: &status,
        events_stored,
        server_on_new_version: report_in.0,
        not_on_new_version: report_in.1,
        server_cpu_secs: cpu_by_pid.values().sum(),
        balancer_cpu_secs: lb_cpu_by_pid.values().sum(),
        server_peak_rss: peak_rss,
        image_size: size as u64,
        delta_size,
        samples,
        proxy: proxy.stats(),
        max_server_leases: leases.max.load(Ordering::Relaxed),
        lease_polls: leases.polls.load(Ordering::Relaxed),
        server_restarts,
        throttle_resets,
        replicas: args.replicas,
        storage: dep.storage,
        throttle: dep.throttle,
        faults: fault_records,
    });
    if let Some(db) = &dep.database
        && args.keep_database
    {
        eprintln!("database kept: {db}");
    }
    drop(dep);
    // The last reference: stops nginx and the replicas, drops the database.
    drop(cluster);
    let ok = r.invariants_hold();
    Ok((r, ok))
}

/// Which devices are DDI targets (`--ddi-share`), reproducibly from `seed`.
/// When each agent of `--late-share` enrolls, spread evenly over
/// `--late-over` after the fleet starts (`None`: before the rollout).
/// Request slots kept for devices holding an update beside
/// `--max-requests` (see [`sim::Shared::holders`]): a quarter more, at
/// least 16.
fn holder_slots(max_requests: usize) -> usize {
    (max_requests / 4).max(16)
}

fn late_devices(a: &Args, seed: u64, is_ddi: &[bool]) -> Vec<Option<Duration>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x1a7e);
    (0..a.devices)
        .map(|i| {
            let late = rng.random::<f64>() < a.late_share && !is_ddi[i];
            late.then(|| a.late_over.mul_f64(rng.random::<f64>()))
        })
        .collect()
}

fn ddi_targets(a: &Args, seed: u64) -> Vec<bool> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xdd1);
    (0..a.devices)
        .map(|_| rng.random::<f64>() < a.ddi_share)
        .collect()
}

/// Checks in every agent of `committed` on version 2.0 (booted from slot
/// B) and asks the server, through the balancer, which version each runs
/// (DDI targets are only asked).
/// Returns how many it knows on 2.0 and a few of the others, with why.
async fn report_in(
    http: &[reqwest::Client],
    base: &str,
    t: Timeouts,
    admin: &ota_server::client::AdminClient,
    tokens: &[String],
    committed: &[usize],
    is_ddi: &[bool],
) -> (u64, Vec<String>) {
    use futures_util::StreamExt;
    use ota_format::api::{AgentState, CheckinRequest, Slot};
    let results: Vec<Result<(), String>> = futures_util::stream::iter(committed)
        .map(|&i| async move {
            let c = Client::from_reqwest(http[i % http.len()].clone(), base, t)
                .with_token(tokens[i].clone());
            let req = CheckinRequest {
                install_gate: false,
                time_zone: None,
                current_version: "2.0".into(),
                booted_slot: Slot::B,
                state: AgentState::Idle,
                update: None,
                freshness_held: None,
                delta_codecs: ota_format::manifest::codecs(),
            };
            let id = sim::device_id(i);
            let mut last = String::new();
            for attempt in 0..5u64 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                // A DDI target reported `closed/success`: the server must
                // know its version from that alone.
                if !is_ddi[i]
                    && let Err(e) = c.checkin(&req).await
                {
                    last = format!("{id}: check-in on 2.0: {e}");
                    continue;
                }
                match admin.device_get(&id).await {
                    Ok(v) if v["version"] == "2.0" => return Ok(()),
                    Ok(v) => last = format!("{id}: the server says version {}", v["version"]),
                    Err(e) => last = format!("{id}: {e:#}"),
                }
            }
            Err(last)
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
    let bad = results
        .into_iter()
        .filter_map(|r| r.err())
        .take(5)
        .collect();
    (ok, bad)
}

/// The server's active leases as polled through the balancer.
#[derive(Default)]
struct LeaseWatch {
    last: AtomicU64,
    max: AtomicU64,
    polls: AtomicU64,
}

async fn watch_leases(
    admin: Arc<ota_server::client::AdminClient>,
    id: String,
    w: Arc<LeaseWatch>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(2), admin.rollout(&id)).await {
            w.last.store(st.active_leases, Ordering::Relaxed);
            w.max.fetch_max(st.active_leases, Ordering::Relaxed);
            w.polls.fetch_add(1, Ordering::Relaxed);
        }
    }
}
