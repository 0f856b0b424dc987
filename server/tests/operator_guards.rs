//! What stood in a new operator's way (issue 19), over real HTTP on
//! 127.0.0.1: the version order at `release add`, `device add` on an
//! existing id, and canary waves that held nobody. `rollout_pg` runs this
//! suite again on PostgreSQL + Redis, so both backends fill waves alike.

#[path = "common/mod.rs"]
mod common;

use common::*;
use ota_format::api::*;

/// Uploads `image` as `version` of `t`; the server's answer or its error.
async fn add(
    ts: &TestServer,
    version: &str,
    counter: u64,
    downgrade: bool,
    image: &[u8],
) -> Result<(), String> {
    let p = ts.dir.path().join(format!("up-{version}.img"));
    std::fs::write(&p, image).unwrap();
    ts.admin
        .release_add_opts("t", version, counter, downgrade, &p, false)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// The same upload straight to the server (no client-side check): status
/// and error body.
async fn put_raw(ts: &TestServer, version: &str, counter: u64, image: &[u8]) -> (u16, String) {
    let r = http()
        .put(format!(
            "{}/api/v1/admin/releases/t/{version}?security_counter={counter}",
            ts.base
        ))
        .bearer_auth(ADMIN)
        .body(image.to_vec())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_add_refuses_versions_devices_would_refuse() {
    let ts = TestServer::start("").await;
    let img = |b| image(4, b);
    // Not a version at all: devices could never order it.
    let e = add(&ts, "banana", 0, false, &img(1)).await.unwrap_err();
    assert!(e.contains("\"banana\" is not a version"), "{e}");
    add(&ts, "1.1", 0, false, &img(1)).await.unwrap();
    // A pre-release comes before its release: not newer than 1.1.
    let e = add(&ts, "1.1-rc1", 0, false, &img(2)).await.unwrap_err();
    assert!(e.contains("not greater than 1.1"), "{e}");
    // Lower: refused, and the message says how to roll back on purpose.
    let e = add(&ts, "0.5", 0, false, &img(3)).await.unwrap_err();
    assert!(e.contains("--allow-downgrade"), "{e}");
    // A downgrade needs a counter above every earlier release's.
    let e = add(&ts, "0.5", 0, true, &img(3)).await.unwrap_err();
    assert!(e.contains("needs a security counter above 0"), "{e}");
    add(&ts, "0.5", 1, true, &img(3)).await.unwrap();
    // Numbers compare as numbers; a lower counter than an earlier release is refused.
    let e = add(&ts, "1.10", 0, false, &img(4)).await.unwrap_err();
    assert!(e.contains("security counter 0 is below the 1"), "{e}");
    add(&ts, "1.10", 1, false, &img(4)).await.unwrap();
    // Re-sending the same release stays an idempotent retry.
    add(&ts, "1.10", 1, false, &img(4)).await.unwrap();
    // The server refuses on its own, before and without reading the upload.
    let (st, body) = put_raw(&ts, "banana", 1, &img(5)).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("not a version"), "{body}");
    let (st, body) = put_raw(&ts, "1.10.0-rc.1", 1, &img(5)).await;
    assert_eq!(st, 409, "{body}");
    assert!(body.contains("version_order"), "{body}");
    let (st, body) = put_raw(&ts, "1.11", 1, &img(5)).await;
    assert_eq!(st, 201, "{body}");
    let versions: Vec<String> = ts
        .admin
        .releases()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, ["1.1", "0.5", "1.10", "1.11"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_add_on_an_existing_id_needs_rotate() {
    let ts = TestServer::start("").await;
    let tags = Default::default();
    let first = ts.admin.device_add("d1", "t", &tags, false).await.unwrap();
    let e = ts
        .admin
        .device_add("d1", "t", &tags, false)
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("already provisioned") && e.contains("--rotate"),
        "{e}"
    );
    // The refused call changed nothing: the first token still works.
    let dev = |token: &str| Sim {
        id: "d1".into(),
        token: token.into(),
        base: ts.base.clone(),
        http: http(),
        seq: Default::default(),
        time_zone: None,
    };
    dev(&first.token)
        .checkin("1.0", AgentState::Idle, None)
        .await;
    // --rotate: a new token, and the old one stops working.
    let second = ts.admin.device_add("d1", "t", &tags, true).await.unwrap();
    assert_ne!(first.token, second.token);
    dev(&second.token)
        .checkin("1.0", AgentState::Idle, None)
        .await;
    let old = http()
        .post(format!("{}/api/v1/devices/checkin", ts.base))
        .bearer_auth(&first.token)
        .json(&idle_request("1.0", ota_format::manifest::codecs()))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
}

/// Waits until `d` is offered the update (its wave is open).
async fn offered(d: &Sim) -> bool {
    matches!(
        d.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_waves_of_a_small_fleet_are_never_empty() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let mut devices = Vec::new();
    for i in 0..4 {
        devices.push(Sim::enroll(&ts.base, &format!("demo-{i}"), "t", &http).await);
    }
    // The demo's rollout, and a finer one: every wave above 0 % holds a
    // device; shares are rounded up.
    for (waves, want) in [
        (vec![25, 100], vec![1, 3]),
        // Rounding up can leave the last wave empty; never a canary.
        (vec![1, 10, 50, 100], vec![1, 1, 2, 0]),
        (vec![10, 20, 100], vec![1, 1, 2]),
    ] {
        let mut s = spec("2.0", "t");
        s.waves = waves.clone();
        s.soak_ms = 60_000;
        let r = ts.admin.rollout_create(&s).await.unwrap();
        let got: Vec<u64> = r.waves.iter().map(|w| w.eligible).collect();
        assert_eq!(got, want, "waves {waves:?}");
        // Each device's wave is the one the status counts it in, and only
        // the first wave's device is offered the update.
        let mut per_wave = vec![0u64; waves.len()];
        for d in &devices {
            let w = r.wave_of(&d.id);
            per_wave[w] += 1;
            assert_eq!(offered(d).await, w == 0, "{} in wave {}", d.id, w + 1);
        }
        assert_eq!(per_wave, want);
        ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_devices_join_the_wave_their_rank_gives_them() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let mut devices = Vec::new();
    for i in 0..10 {
        devices.push(Sim::enroll(&ts.base, &format!("early-{i}"), "t", &http).await);
    }
    let mut s = spec("2.0", "t");
    s.waves = vec![10, 50, 100];
    s.soak_ms = 60_000;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let before: Vec<u64> = r.waves.iter().map(|w| w.eligible).collect();
    assert_eq!(before, [1, 4, 5]);
    let mut late = Vec::new();
    for i in 0..30 {
        late.push(Sim::enroll(&ts.base, &format!("late-{i}"), "t", &http).await);
    }
    let st = ts.status(&r.id).await;
    let mut want = before.clone();
    for d in &late {
        // The wave a late device gets is stable and the one it is treated as.
        let w = st.wave_of(&d.id);
        assert_eq!(w, r.wave_of(&d.id));
        want[w] += 1;
        assert_eq!(offered(d).await, w == 0, "{} in wave {}", d.id, w + 1);
    }
    let got: Vec<u64> = st.waves.iter().map(|w| w.eligible).collect();
    assert_eq!(got, want);
    // Early devices keep their waves.
    for d in &devices {
        assert_eq!(st.wave_of(&d.id), r.wave_of(&d.id));
    }
}
