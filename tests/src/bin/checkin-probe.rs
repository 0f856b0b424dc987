//! `checkin-probe`: a small fleet checking in at a steady rate against a
//! running `ota-server`, reporting check-in latency (p50, p99, max).
//!
//! Unlike `checkin-bench` (wrk at full speed, which measures capacity and
//! takes every core), this offers a fixed, modest load — what a fleet does
//! while an operator adds a release — so the latency it reports is what a
//! device sees while the server does something else, e.g. builds a 2 GiB
//! release (`bench/release-bench.sh` runs it idle, then during a build).
//!
//! Requests are started on a fixed schedule (open loop: a slow answer does
//! not delay the next request), at most `--concurrency` at a time; a
//! request that could not start on time because all were busy is counted as
//! `late`, so saturation shows instead of hiding in the figures.
//!
//! Usage: `checkin-probe --server URL --enrollment-key KEY --devices 200
//! --rate 200 (--seconds 30 | --stop-file PATH)`; prints one line
//! `checkins=N errors=N late=N p50_ms=F p99_ms=F max_ms=F` on stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
#[command(
    name = "checkin-probe",
    about = "Check-in latency of a small fleet at a steady rate"
)]
struct Args {
    /// Base URL of the server.
    #[arg(long)]
    server: String,
    /// The server's enrollment key (devices enroll themselves).
    #[arg(long)]
    enrollment_key: String,
    /// Devices to enroll and check in round-robin.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Device type they enroll with.
    #[arg(long, default_value = "probe")]
    device_type: String,
    /// Prefix of their device ids (`PREFIX-00000`, ...): probes run one
    /// after the other enroll distinct devices.
    #[arg(long, default_value = "probe")]
    id_prefix: String,
    /// The version they report running.
    #[arg(long, default_value = "1.0")]
    current_version: String,
    /// The delta codecs they list: `all` (what this build's agent decodes,
    /// a current fleet), `none` (agents older than every codec) or names
    /// separated by commas. With the server's `"auto"` codec settings, a
    /// fleet on a release decides which codecs deltas from it use.
    #[arg(long, default_value = "none")]
    codecs: String,
    /// Check-ins per second, over the whole fleet.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Stop after this many seconds (0: only at --stop-file).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Stop once this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.seconds == 0 && a.stop_file.is_none() {
        bail!("give --seconds or --stop-file, or the probe never stops");
    }
    if a.rate.is_nan() || a.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let http = reqwest::Client::builder()
        .no_gzip()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut tokens = Vec::with_capacity(a.devices);
    for i in 0..a.devices {
        let r: ota_format::api::EnrollResponse = http
            .post(format!("{}/api/v1/devices/enroll", a.server))
            .json(&serde_json::json!({
                "enrollment_key": a.enrollment_key,
                "device_id": format!("{}-{i:05}", a.id_prefix),
                "device_type": a.device_type,
            }))
            .send()
            .await
            .with_context(|| format!("enrolling at {}: is the server running?", a.server))?
            .error_for_status()
            .context("enrolling (is --enrollment-key the server's?)")?
            .json()
            .await?;
        tokens.push(r.token);
    }
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(a.concurrency));
    let mut late = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let url = format!("{}/api/v1/devices/checkin", a.server);
    let codecs = match a.codecs.as_str() {
        "all" => ota_format::manifest::codecs(),
        "none" => ota_format::manifest::Codecs::NONE,
        list => serde_json::from_value(serde_json::json!(list.split(',').collect::<Vec<_>>()))
            .with_context(|| format!("--codecs {list}: not codec names"))?,
    };
    let mut body = serde_json::json!({
        "current_version": a.current_version,
        "booted_slot": "a",
        "state": "idle",
    });
    if codecs != ota_format::manifest::Codecs::NONE {
        body["delta_codecs"] = serde_json::to_value(codecs)?;
    }
    // One body for the whole run ('static, as every request borrows it).
    let body: &'static str = Box::leak(body.to_string().into_boxed_str());
    let mut n = 0usize;
    loop {
        tick.tick().await;
        if a.seconds > 0 && started.elapsed() >= Duration::from_secs(a.seconds) {
            break;
        }
        if n % 64 == 0
            && let Some(f) = &a.stop_file
            && f.exists()
        {
            break;
        }
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            late += 1;
            continue;
        };
        let token = tokens[n % tokens.len()].clone();
        n += 1;
        let (http, url, hist, errors) = (http.clone(), url.clone(), hist.clone(), errors.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let ok = match http
                .post(&url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            let us = t.elapsed().as_micros() as u64;
            if ok {
                hist.lock().await.saturating_record(us.max(1));
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let h = hist.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "checkins={} errors={} late={late} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} seconds={:.1}",
        h.len(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
