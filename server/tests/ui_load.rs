//! The dashboard at 100,000 devices (issue 14's figures; a benchmark, not a
//! timed test: `cargo test -p ota-server --test ui_load -- --ignored
//! --nocapture`). On sled, with 100,000 devices written straight into the
//! store (as `inventory_scale` does) and a rollout over half of them:
//!
//! - a page load as the browser makes it: the HTML, then script and
//!   stylesheet, then `/ui/session`, then the page's first API call
//!   (rollouts, or one page of devices); worst of 5;
//! - check-in latency and rate from 64 concurrent devices, without and then
//!   with 20 open dashboard pages of one kind, each polling as the page does.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;
use ota_server::fleet::DeviceRecord;

const N: u64 = 100_000;

fn id(i: u64) -> String {
    format!("dev-{i:06}")
}

async fn fleet_server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ota_server::store::Store::open(&dir.path().join("data/db")).unwrap();
        let mut batch = sled::Batch::default();
        for i in 0..N {
            let rec = DeviceRecord {
                id: id(i),
                device_type: if i % 2 == 0 { "t" } else { "u" }.into(),
                tags: BTreeMap::from([("site".into(), format!("s{}", i % 100))]),
                token_sha256: hex::encode(ota_server::fleet::hash_token(&format!("token-{i}"))),
                enrolled_at_ms: 1,
                version: Some("1.0".into()),
            };
            batch.insert(rec.id.as_bytes(), ota_server::store::encode(&rec));
        }
        store.devices.apply_batch(batch).unwrap();
        store.db.flush().unwrap();
    }
    let ts = TestServer::start_in(dir, &fast_checkin(5000)).await;
    ts.release("t", "1.0", &image(16, 1)).await;
    ts.release("t", "2.0", &image(16, 2)).await;
    ts
}

/// One page load: html; js and css together; session; the first API call.
async fn page_load(http: &reqwest::Client, base: &str, cookie: &str, api: &str) -> Duration {
    let get = |p: String| {
        let http = http.clone();
        let cookie = cookie.to_string();
        async move {
            let r = http.get(p).header("cookie", cookie).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
    };
    let t = Instant::now();
    get(format!("{base}/ui/")).await;
    tokio::join!(
        get(format!("{base}/ui/app.js")),
        get(format!("{base}/ui/app.css"))
    );
    get(format!("{base}/ui/session")).await;
    get(format!("{base}{api}")).await;
    t.elapsed()
}

async fn checkins(ts: &TestServer, secs: u64) -> (f64, Duration, Duration) {
    let http = http();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..64u64 {
        // Devices of type u: in no rollout, so every answer is "nothing".
        let i = 2 * (w * 97 % (N / 2)) + 1;
        let d = Sim {
            id: id(i),
            token: format!("token-{i}"),
            base: ts.base.clone(),
            http: http.clone(),
            seq: Default::default(),
            time_zone: None,
        };
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                d.checkin("1.0", AgentState::Idle, None).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (all.len() as f64 / secs as f64, p(0.5), p(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn dashboard_page_loads_and_polling_at_100k_devices() {
    let ts = fleet_server().await;
    let mut s = spec("2.0", "t");
    s.waves = vec![1, 10, 100];
    s.soak_ms = 3_600_000;
    s.max_concurrent = 100;
    let t = Instant::now();
    let r = ts.admin.rollout_create(&s).await.unwrap();
    eprintln!(
        "rollout {} over {} devices created in {:?}",
        r.id,
        r.waves.iter().map(|w| w.eligible).sum::<u64>(),
        t.elapsed()
    );
    let http = http();
    let login = http
        .post(format!("{}/ui/login", ts.base))
        .json(&serde_json::json!({ "token": ADMIN }))
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    for (page, api) in [
        ("rollouts", "/api/v1/admin/rollouts".to_string()),
        ("devices", "/api/v1/admin/devices?limit=50".to_string()),
        (
            "devices, type+tag filter",
            "/api/v1/admin/devices?device_type=t&tags=site%3Ds10&limit=50".to_string(),
        ),
        (
            "device history",
            format!("/api/v1/admin/devices/{}/history?limit=200", id(0)),
        ),
        ("releases", "/api/v1/admin/releases".to_string()),
    ] {
        let mut worst = Duration::ZERO;
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let d = page_load(&http, &ts.base, &cookie, &api).await;
            worst = worst.max(d);
            best = best.min(d);
        }
        eprintln!("page load, {page}: best {best:?}, worst {worst:?} of 5 at {N} devices");
    }

    let (rate0, p50_0, p99_0) = checkins(&ts, 10).await;
    eprintln!("check-ins without dashboards: {rate0:.0}/s, p50 {p50_0:?}, p99 {p99_0:?}");
    // Intervals as server/ui/app.js polls: rollouts and a device's page
    // every 1.5 s, the device list every 15 s (and the 1.5 s that made it
    // 15 s) and its rows by id every 1.5 s.
    for (label, api, every) in [
        // As the page asks since the shared list (admin::rollout_list)...
        (
            "rollouts",
            "/api/v1/admin/rollouts?max_age_ms=1000".to_string(),
            1500,
        ),
        // ...and as it asked before: every poll computed.
        (
            "rollouts (each poll computed)",
            "/api/v1/admin/rollouts".to_string(),
            1500,
        ),
        (
            "device",
            format!("/api/v1/admin/devices/{}/history?limit=200", id(0)),
            1500,
        ),
        (
            "device list",
            "/api/v1/admin/devices?limit=50".to_string(),
            15000,
        ),
        (
            "device list",
            "/api/v1/admin/devices?limit=50".to_string(),
            1500,
        ),
        // What the list page does every 1.5 s since: its 50 rows by id.
        (
            "device list rows (by id)",
            format!(
                "/api/v1/admin/devices?limit=50&ids={}",
                (0..50).map(id).collect::<Vec<_>>().join(",")
            ),
            1500,
        ),
    ] {
        let (polls, worst, (rate, p50, p99)) = with_pollers(&ts, &cookie, &api, every).await;
        eprintln!(
            "check-ins with 20 {label} pages polling every {every} ms ({polls} polls, slowest {worst:?}): \
             {rate:.0}/s, p50 {p50:?}, p99 {p99:?}"
        );
    }
    // The machine's drift over the run, to judge the differences by.
    let (rate1, p50_1, p99_1) = checkins(&ts, 10).await;
    eprintln!("check-ins without dashboards, again: {rate1:.0}/s, p50 {p50_1:?}, p99 {p99_1:?}");
}

/// Check-ins while 20 pages poll `api` every `every_ms`, as the dashboard
/// does (staggered over the interval).
async fn with_pollers(
    ts: &TestServer,
    cookie: &str,
    api: &str,
    every_ms: u64,
) -> (u64, Duration, (f64, Duration, Duration)) {
    let http = http();
    let stop = Arc::new(AtomicBool::new(false));
    let mut pollers = Vec::new();
    for k in 0..20 {
        let (http, base, cookie, stop, api) = (
            http.clone(),
            ts.base.clone(),
            cookie.to_string(),
            stop.clone(),
            api.to_string(),
        );
        pollers.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut worst = Duration::ZERO;
            tokio::time::sleep(Duration::from_millis(every_ms / 20 * k)).await;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = http
                    .get(format!("{base}{api}"))
                    .header("cookie", &cookie)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(every_ms)).await;
            }
            (n, worst)
        }));
    }
    let c = checkins(ts, 10).await;
    stop.store(true, Ordering::Relaxed);
    let mut polls = 0;
    let mut worst = Duration::ZERO;
    for p in pollers {
        let (n, w) = p.await.unwrap();
        polls += n;
        worst = worst.max(w);
    }
    (polls, worst, c)
}
