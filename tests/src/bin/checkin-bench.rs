//! `checkin-bench`: check-ins per second and latency of a real `ota-server`
//! process with N enrolled devices, driven by `wrk` (C, one process, so the
//! load generator takes as little of this 2-core machine as possible).
//!
//! Scenarios, each for `--seconds`:
//! - `idle`: no rollout; every answer is "nothing to do".
//! - `stampede`: a rollout to every device is active with a concurrency cap
//!   and a start rate; every device that checks in asks to update, so the
//!   answers are mostly "wait", with admissions (durable writes) mixed in.
//!
//! Usage: `checkin-bench --devices 10000,100000 [--seconds 10] [--connections 128]`
//! (release build: `cargo run --release -p ota-tests --bin checkin-bench`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Fleet sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    devices: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const ADMIN: &str = "bench-admin-token-0123456789";
const ENROLL: &str = "bench-enroll-key-0123456789";

struct Server(Child, String);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(dir: &Path) -> Result<Server> {
    let key = ota_format::SigningKeyPair::generate()?;
    std::fs::write(dir.join("k.pem"), key.to_pem()?)?;
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nadmin_token = \"{ADMIN}\"\nenrollment_key = \"{ENROLL}\"\nsigning_key = \"k.pem\"\nzstd_level = 3\n"
        ),
    )?;
    let mut child = Command::new(ota_tests::bin("ota-server"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("server.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("ota-server listening on ")
        .context("server did not start")?
        .to_string();
    Ok(Server(child, format!("http://{addr}")))
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
local body = '{"current_version":"1.0","booted_slot":"a","state":"idle"}'
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
    devices: usize,
    scenario: &'static str,
    checkins_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    non_2xx: u64,
    socket_errors: u64,
}

fn run_wrk(
    base: &str,
    tokens: &Path,
    lua: &Path,
    a: &Args,
) -> Result<(f64, f64, f64, f64, u64, u64)> {
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
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut rows = Vec::new();
    for &n in &a.devices {
        let dir = tempfile::tempdir()?;
        let server = start_server(dir.path())?;
        let base = server.1.clone();
        let tokens = dir.path().join("tokens.txt");
        let rate = enroll_all(&base, n, &tokens).await?;
        eprintln!("{n} devices enrolled at {rate:.0}/s");
        let lua = dir.path().join("checkin.lua");
        std::fs::write(&lua, LUA)?;
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
        for scenario in ["idle", "stampede"] {
            if scenario == "stampede" {
                let mut s: ota_server::rollout::RolloutSpec =
                    serde_json::from_value(serde_json::json!({
                        "release": "2.0", "device_type": "bench", "max_concurrent": 500,
                        "max_starts_per_min": 6000.0, "waves": [10, 100], "min_sample": 1000000
                    }))?;
                s.soak_ms = 3_600_000;
                admin.rollout_create(&s).await?;
            }
            let (rps, p50, p99, max, non2xx, sock) = run_wrk(&base, &tokens, &lua, &a)?;
            let row = Row {
                devices: n,
                scenario,
                checkins_per_sec: rps,
                p50_ms: p50,
                p99_ms: p99,
                max_ms: max,
                non_2xx: non2xx,
                socket_errors: sock,
            };
            eprintln!("{row:?}");
            rows.push(row);
        }
        drop(server);
    }
    println!(
        "| devices | scenario | check-ins/s | p50 ms | p99 ms | max ms | non-2xx | socket errors |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} |",
            r.devices,
            r.scenario,
            r.checkins_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.non_2xx,
            r.socket_errors
        );
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}
