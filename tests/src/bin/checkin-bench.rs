//! `checkin-bench`: check-ins per second and latency of real `ota-server`
//! processes with N enrolled devices, driven by `wrk` (C, one process, so the
//! load generator takes as little of this 2-core machine as possible).
//!
//! Setups, each measured in the same run:
//! - `sled`: one process, sled storage, local throttle (the default; always);
//! - `sled+nginx` (`--sled-behind-nginx`): the same process behind nginx,
//!   which prices the balancer hop;
//! - `pg+redis xN` (`--replicas 1,2,3`): N replicas sharing PostgreSQL and
//!   Redis behind nginx (see `ota_tests::cluster`);
//! - `sled (baseline)` (`--baseline-bin PATH`): `sled` again with another
//!   build of `ota-server` (e.g. the commit before a change), so a change's
//!   cost is measured side by side in one run.
//!
//! All setups of a fleet size are up at once and `--rounds N` alternates
//! between them (A B A B ...). Besides wrk's rate and latency, each run
//! reports the server's CPU time per check-in (user + system from
//! `/proc/PID/stat`): on a shared 2-core machine the rate moves with
//! whatever else runs, the CPU a request costs much less so. With
//! `--baseline-bin` a last table gives the medians against the baseline.
//!
//! Scenarios, each for `--seconds`:
//! - `idle`: no rollout; every answer is "nothing to do".
//! - `stampede`: a rollout to every device is active with a concurrency cap
//!   and a start rate; every device that checks in asks to update, so the
//!   answers are mostly "wait", with admissions (durable writes) mixed in.
//!
//! Usage: `checkin-bench --devices 10000,100000 [--seconds 10] [--connections 128]
//! [--replicas 1,2,3]` (release build: `cargo run --release -p ota-tests --bin
//! checkin-bench`).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ota_tests::cluster::{Cluster, ClusterOpts};

const NEEDS: &str = "\
Needs (nothing is installed by the bench):
  - wrk (apt-get install wrk);
  - with --sled-behind-nginx or --replicas: nginx (apt-get install nginx-light);
  - with --replicas: PostgreSQL and Redis, e.g. the private ones of
    scripts/services.sh (apt-get install postgresql redis-server):
      scripts/services.sh start && eval \"$(scripts/services.sh env)\"
    which sets OTA_TEST_PG_URL and OTA_TEST_REDIS_URL, read by --pg-url and
    --redis-url. Each setup gets a fresh database (dropped afterwards) and a
    Redis key prefix of its own. PostgreSQL needs max_connections of at least
    the replicas times --pool-size (services.sh sets 300).";

#[derive(Parser)]
#[command(
    name = "checkin-bench",
    about = "Check-ins per second and latency of ota-server: one sled process, and N replicas (PostgreSQL + Redis) behind nginx",
    after_help = NEEDS
)]
struct Args {
    /// Fleet sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    devices: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Devices do not name the freshness statement they hold (as agents
    /// before `freshness_held` did): every answer carries it.
    #[arg(long)]
    no_echo: bool,
    /// wrk connections.
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Also measure N replicas (PostgreSQL state, Redis throttle) behind
    /// nginx, for each N listed.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<usize>,
    /// Also measure the sled process behind nginx.
    #[arg(long)]
    sled_behind_nginx: bool,
    /// PostgreSQL admin URL (a database is created per setup).
    #[arg(long, env = "OTA_TEST_PG_URL")]
    pg_url: Option<String>,
    /// Redis URL.
    #[arg(long, env = "OTA_TEST_REDIS_URL")]
    redis_url: Option<String>,
    /// PostgreSQL connections per replica.
    #[arg(long, default_value_t = 32)]
    pool_size: usize,
    /// nginx worker processes.
    #[arg(long, default_value_t = 1)]
    nginx_workers: usize,
    /// Also measure this `ota-server` binary (an older build, e.g. of the
    /// commit before a change) as setup `sled (baseline)`, interleaved with
    /// `sled` in the same run, so the two are compared under the same load.
    #[arg(long)]
    baseline_bin: Option<std::path::PathBuf>,
    /// Runs of each scenario per setup, alternating between setups.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run the sled servers under valgrind's callgrind (instrumented only
    /// while wrk runs) and report instructions per check-in: a count that
    /// does not move with the machine's load, unlike the rate and CPU time
    /// (this VM has no hardware counters for `perf stat`). Slow (~50x):
    /// use few devices and connections, e.g. `--devices 2000
    /// --connections 8`. Needs valgrind.
    #[arg(long)]
    callgrind: bool,
}

const ADMIN: &str = "62eb41a3c1ea2bd3880bc41fe0f1c45d";
const ENROLL: &str = "03f45b658f8f3caec81cd20e2a4e98a4";

/// What serves the check-ins.
#[derive(Clone, Copy, Debug)]
enum Setup {
    Sled,
    SledBehindNginx,
    Replicas(usize),
    /// `--baseline-bin`: another build of the server, sled, direct.
    Baseline,
}

impl Setup {
    fn name(&self) -> String {
        match self {
            Setup::Sled => "sled".into(),
            Setup::SledBehindNginx => "sled+nginx".into(),
            Setup::Replicas(n) => format!("pg+redis x{n}"),
            Setup::Baseline => "sled (baseline)".into(),
        }
    }
}

/// Starts the setup's processes (a fresh database for replicas).
async fn start(setup: Setup, a: &Args) -> Result<Cluster> {
    let mut opts = ClusterOpts {
        admin_token: ADMIN.into(),
        enrollment_key: ENROLL.into(),
        top_level: "zstd_level = 3\n".into(),
        balancer: !matches!(setup, Setup::Sled | Setup::Baseline),
        server_bin: match setup {
            Setup::Baseline => a.baseline_bin.clone(),
            _ => None,
        },
        nginx_workers: a.nginx_workers,
        pool_size: a.pool_size,
        ..ClusterOpts::default()
    };
    let n = match setup {
        Setup::Sled | Setup::SledBehindNginx | Setup::Baseline => 1,
        Setup::Replicas(n) => {
            let (Some(pg), Some(redis)) = (&a.pg_url, &a.redis_url) else {
                bail!("--replicas needs --pg-url and --redis-url\n\n{NEEDS}");
            };
            opts.pg_url = Some(ota_tests::services::create_database(pg, "bench").await?);
            opts.drop_database_via = Some(pg.clone());
            opts.redis_url = Some(redis.clone());
            opts.key_prefix = ota_tests::services::unique_name("bench");
            n
        }
    };
    tokio::task::spawn_blocking(move || Cluster::start(n, opts)).await?
}

async fn enroll_all(base: &str, n: usize, out: &Path) -> Result<f64> {
    let http = reqwest::Client::builder().no_gzip().build()?;
    let started = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let http = http.clone();
        let url = format!("{base}/api/v1/devices/enroll");
        let permit = sem.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _p = permit;
            let r: ota_format::api::EnrollResponse = http
                .post(url)
                .json(&serde_json::json!({"enrollment_key": ENROLL, "device_id": format!("bench-{i:06}"), "device_type": "bench"}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(r.token)
        }));
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
    for t in tasks {
        writeln!(f, "{}", t.await??)?;
    }
    f.flush()?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

const LUA: &str = r#"
local tokens = {}
local body = 'BODY'
function init(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end
function request()
  local t = tokens[math.random(#tokens)]
  return wrk.format("POST", "/api/v1/devices/checkin",
    {["Authorization"] = "Bearer " .. t, ["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  io.stderr:write(string.format("RESULT %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"#;

#[derive(serde::Serialize, Debug)]
struct Row {
    setup: String,
    devices: usize,
    scenario: &'static str,
    /// Which of `--rounds` runs of this scenario.
    round: usize,
    checkins_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    non_2xx: u64,
    socket_errors: u64,
    /// Server CPU time (user + system, all its processes) per check-in.
    server_cpu_us_per_checkin: f64,
    /// `--callgrind`: instructions the server executed per check-in.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_instructions_per_checkin: Option<f64>,
}

/// wrk's figures: rate, p50, p99, max (ms), non-2xx, socket errors, requests.
type WrkResult = (f64, f64, f64, f64, u64, u64, f64);

fn run_wrk(base: &str, tokens: &Path, lua: &Path, a: &Args) -> Result<WrkResult> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{}", a.connections),
            &format!("-d{}s", a.seconds),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(lua)
        .arg(base)
        .arg("--")
        .arg(tokens)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("wrk printed no result: {err}"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    Ok((
        v[0] / (v[1] / 1e6),
        v[2] / 1000.0,
        v[3] / 1000.0,
        v[4] / 1000.0,
        v[5] as u64,
        v[6] as u64,
        v[0],
    ))
}

/// Writes the wrk script with the check-in body devices of `p` send now,
/// the agent's own request type as an idle agent fills it: the codecs it
/// decodes and, unless `--no-echo`, the freshness statement it holds (the
/// one a check-in just got); a server that knows the fields leaves the
/// statement out of its answers, an older one ignores them.
async fn write_lua(p: &Prepared, a: &Args) -> Result<()> {
    use ota_format::api::{AgentState, CheckinRequest, Slot};
    let mut body = CheckinRequest {
        install_gate: false,
        time_zone: None,
        current_version: "1.0".into(),
        booted_slot: Slot::A,
        state: AgentState::Idle,
        update: None,
        freshness_held: None,
        delta_codecs: ota_format::manifest::codecs(),
    };
    if !a.no_echo {
        let token = std::fs::read_to_string(&p.tokens)?;
        let token = token.lines().next().context("no device enrolled")?;
        let r: ota_format::api::CheckinResponse = reqwest::Client::new()
            .post(format!("{}/api/v1/devices/checkin", p.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if let Some(f) = r.freshness {
            body.freshness_held = Some(f.payload_digest());
        }
    }
    let body = serde_json::to_string(&body)?;
    std::fs::write(&p.lua, LUA.replace("BODY", &body))?;
    Ok(())
}

/// One setup with its fleet enrolled and its releases built.
struct Prepared {
    setup: Setup,
    cluster: Cluster,
    base: String,
    tokens: std::path::PathBuf,
    lua: std::path::PathBuf,
    admin: ota_server::client::AdminClient,
    _dir: tempfile::TempDir,
}

/// Starts a setup, enrolls `n` devices and adds two releases.
async fn prepare(setup: Setup, n: usize, a: &Args) -> Result<Prepared> {
    let dir = tempfile::tempdir()?;
    let cluster = start(setup, a).await?;
    let base = cluster.lb_url();
    let tokens = dir.path().join("tokens.txt");
    let rate = enroll_all(&base, n, &tokens).await?;
    eprintln!("[{}] {n} devices enrolled at {rate:.0}/s", setup.name());
    let lua = dir.path().join("checkin.lua");
    let admin = ota_server::client::AdminClient::new(&base, ADMIN)?;
    for (v, seed) in [("1.0", 1u64), ("2.0", 2)] {
        let p = dir.path().join(format!("{v}.img"));
        std::fs::write(&p, ota_tests::images::base(1 << 20, seed))?;
        admin.release_add("bench", v, 0, &p, false).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while admin.releases().await?.iter().any(|r| {
        r.builds
            .iter()
            .any(|b| b.status != ota_server::releases::BuildStatus::Ready)
    }) {
        if Instant::now() > deadline {
            bail!("release builds did not finish");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Prepared {
        setup,
        cluster,
        base,
        tokens,
        lua,
        admin,
        _dir: dir,
    })
}

/// CPU time (user + system) the server processes have used so far, in
/// seconds: the cost of a check-in as CPU per request is far less
/// sensitive to other load on the machine than the request rate is.
fn server_cpu_secs(c: &Cluster) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    c.pids()
        .into_iter()
        .flatten()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| {
            // Fields after the parenthesised command name: state is the
            // 3rd field, utime the 14th and stime the 15th.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / hz)
        })
        .sum()
}

/// One wrk run against a prepared setup.
fn measure(p: &Prepared, n: usize, scenario: &'static str, round: usize, a: &Args) -> Result<Row> {
    let pid = p.cluster.pids().into_iter().flatten().next();
    if a.callgrind {
        callgrind_control(pid, &["--zero"])?;
        callgrind_control(pid, &["--instr=on"])?;
    }
    let cpu0 = server_cpu_secs(&p.cluster);
    let (rps, p50, p99, max, non2xx, sock, requests) = run_wrk(&p.base, &p.tokens, &p.lua, a)?;
    let cpu = server_cpu_secs(&p.cluster) - cpu0;
    let instructions = if a.callgrind {
        let ir = callgrind_dump(pid, &cg_dir())?;
        callgrind_control(pid, &["--instr=off"])?;
        Some(ir / requests.max(1.0))
    } else {
        None
    };
    let row = Row {
        setup: p.setup.name(),
        devices: n,
        scenario,
        round,
        checkins_per_sec: rps,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
        non_2xx: non2xx,
        socket_errors: sock,
        server_cpu_us_per_checkin: cpu * 1e6 / requests.max(1.0),
        server_instructions_per_checkin: instructions,
    };
    eprintln!("{row:?}");
    Ok(row)
}

/// Where `--callgrind` servers write their dumps (`callgrind.PID.N`).
fn cg_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("checkin-bench-callgrind.{}", std::process::id()))
}

/// Runs `callgrind_control ARGS PID` against the server.
fn callgrind_control(pid: Option<u32>, args: &[&str]) -> Result<()> {
    let pid = pid.context("the server has no pid")?;
    let out = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control (apt-get install valgrind)")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {args:?} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Dumps the server's counts since the last `--zero` and returns the
/// instructions executed (the dump's `totals:` line).
fn callgrind_dump(pid: Option<u32>, dir: &Path) -> Result<f64> {
    let prefix = format!("callgrind.{}.", pid.unwrap_or_default());
    let newest = || -> Option<(std::time::SystemTime, std::path::PathBuf)> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max()
    };
    let before = newest();
    callgrind_control(pid, &["--dump"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(n) = newest()
            && Some(&n) != before.as_ref()
            && let Ok(text) = std::fs::read_to_string(&n.1)
            && let Some(t) = text.lines().find_map(|l| l.strip_prefix("totals:"))
        {
            return t
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .with_context(|| format!("bad totals line in {}", n.1.display()));
        }
        if Instant::now() > deadline {
            bail!("callgrind wrote no dump into {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    match Command::new("wrk").arg("-v").output() {
        Ok(_) => {}
        Err(e) => bail!("wrk not found ({e}): apt-get install wrk\n\n{NEEDS}"),
    }
    if a.callgrind {
        if a.sled_behind_nginx || !a.replicas.is_empty() {
            bail!(
                "--callgrind measures the sled setups only (drop --sled-behind-nginx and --replicas)"
            );
        }
        Command::new("callgrind_control")
            .arg("--version")
            .output()
            .context("--callgrind needs valgrind (apt-get install valgrind)")?;
        std::fs::create_dir_all(cg_dir())?;
        let wrap = format!(
            "valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={}/callgrind.%p",
            cg_dir().display()
        );
        // SAFETY: no other thread of this process reads or writes the
        // environment: the runtime's workers are idle until the first
        // `.await` below, and ota_tests reads OTA_SERVER_WRAP only when it
        // starts a server.
        unsafe { std::env::set_var("OTA_SERVER_WRAP", wrap) };
    }
    let mut setups = vec![Setup::Sled];
    if a.baseline_bin.is_some() {
        setups.push(Setup::Baseline);
    }
    if a.sled_behind_nginx {
        setups.push(Setup::SledBehindNginx);
    }
    for &r in &a.replicas {
        if r == 0 {
            bail!("--replicas takes counts of 1 or more");
        }
        setups.push(Setup::Replicas(r));
    }
    if (a.sled_behind_nginx || !a.replicas.is_empty()) && ota_tests::services::nginx_bin().is_none()
    {
        bail!("nginx not found: apt-get install nginx-light\n\n{NEEDS}");
    }
    if !a.replicas.is_empty() && (a.pg_url.is_none() || a.redis_url.is_none()) {
        bail!(
            "--replicas needs --pg-url and --redis-url (or OTA_TEST_PG_URL and OTA_TEST_REDIS_URL)\n\n{NEEDS}"
        );
    }
    let mut rows = Vec::new();
    for &n in &a.devices {
        // Every setup is up at once and the rounds alternate between them
        // (A B A B ...), so slow drifts in the machine's load hit all alike.
        let mut prepared = Vec::new();
        for &setup in &setups {
            prepared.push(
                prepare(setup, n, &a)
                    .await
                    .with_context(|| format!("{} with {n} devices", setup.name()))?,
            );
        }
        for scenario in ["idle", "stampede"] {
            if scenario == "stampede" {
                let mut s: ota_server::rollout::RolloutSpec =
                    serde_json::from_value(serde_json::json!({
                        "release": "2.0", "device_type": "bench", "max_concurrent": 500,
                        "max_starts_per_min": 6000.0, "waves": [10, 100], "min_sample": 1000000
                    }))?;
                s.soak_ms = 3_600_000;
                for p in &prepared {
                    p.admin.rollout_create(&s).await?;
                }
            }
            for round in 1..=a.rounds.max(1) {
                for p in &prepared {
                    write_lua(p, &a).await?;
                    let row = measure(p, n, scenario, round, &a)
                        .with_context(|| format!("{} with {n} devices", p.setup.name()))?;
                    rows.push(row);
                }
            }
        }
        drop(prepared);
    }
    println!(
        "| setup | devices | scenario | round | check-ins/s | p50 ms | p99 ms | max ms | non-2xx | socket errors | server CPU µs/check-in | instructions/check-in |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} | {:.1} | {} |",
            r.setup,
            r.devices,
            r.scenario,
            r.round,
            r.checkins_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.non_2xx,
            r.socket_errors,
            r.server_cpu_us_per_checkin,
            r.server_instructions_per_checkin
                .map_or_else(|| "-".into(), |i| format!("{i:.0}"))
        );
    }
    if a.baseline_bin.is_some() {
        // The change's cost: medians over the rounds, this build against
        // the baseline, as rate and as CPU per check-in.
        println!();
        println!(
            "| devices | scenario | check-ins/s (median) vs baseline | CPU µs/check-in (median) vs baseline | instructions/check-in (median) vs baseline |"
        );
        println!("|---:|---|---|---|---|");
        for &n in &a.devices {
            for scenario in ["idle", "stampede"] {
                let pick = |setup: &str, f: fn(&Row) -> f64| {
                    median(
                        rows.iter()
                            .filter(|r| {
                                r.devices == n && r.scenario == scenario && r.setup == setup
                            })
                            .map(f)
                            .collect(),
                    )
                };
                let (rate, rate0) = (
                    pick("sled", |r| r.checkins_per_sec),
                    pick("sled (baseline)", |r| r.checkins_per_sec),
                );
                let (cpu, cpu0) = (
                    pick("sled", |r| r.server_cpu_us_per_checkin),
                    pick("sled (baseline)", |r| r.server_cpu_us_per_checkin),
                );
                let ir = if a.callgrind {
                    let (ir, ir0) = (
                        pick("sled", |r| {
                            r.server_instructions_per_checkin.unwrap_or(f64::NAN)
                        }),
                        pick("sled (baseline)", |r| {
                            r.server_instructions_per_checkin.unwrap_or(f64::NAN)
                        }),
                    );
                    format!("{ir:.0} vs {ir0:.0} ({:+.1} %)", (ir / ir0 - 1.0) * 100.0)
                } else {
                    "-".into()
                };
                println!(
                    "| {n} | {scenario} | {rate:.0} vs {rate0:.0} ({:+.1} %) | {cpu:.1} vs {cpu0:.1} ({:+.1} %) | {ir} |",
                    (rate / rate0 - 1.0) * 100.0,
                    (cpu / cpu0 - 1.0) * 100.0
                );
            }
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}
