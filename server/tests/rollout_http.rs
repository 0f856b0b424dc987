//! The rollout throttle over real HTTP on 127.0.0.1: caps, rates, leases,
//! waves, failure thresholds, idempotent events and bad input.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;
use ota_server::rollout::{OnFailure, RolloutState, RolloutStatus};

async fn fleet(ts: &TestServer, n: usize, device_type: &str) -> Vec<Sim> {
    let http = http();
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Sim::enroll(&ts.base, &format!("dev-{i:05}"), device_type, &http).await);
    }
    v
}

/// Drives a device through a whole update: check in until admitted, hold the
/// download for `hold`, then report installed and committed.
async fn run_device(
    d: Sim,
    hold: Duration,
    in_flight: Arc<AtomicU64>,
    max_seen: Arc<AtomicU64>,
    starts: Arc<std::sync::Mutex<Vec<Instant>>>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{} never got its update", d.id);
        let r = d.checkin("1.0", AgentState::Idle, None).await;
        match r.action {
            Action::Update(o) => {
                starts.lock().unwrap().push(Instant::now());
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                // Stop counting before the server learns of it: the client's
                // count can only be lower than the server's.
                in_flight.fetch_sub(1, Ordering::SeqCst);
                d.event(&o.update_id, EventKind::Installed).await;
                d.event(&o.update_id, EventKind::Committed).await;
                return;
            }
            Action::Wait { .. } => {
                tokio::time::sleep(Duration::from_millis(r.next_checkin_ms.min(50))).await
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_cap_is_never_exceeded_under_a_checkin_storm() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 200, "t").await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 10;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    let max_seen = Arc::new(AtomicU64::new(0));
    let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|d| {
            tokio::spawn(run_device(
                d,
                Duration::from_millis(20),
                in_flight.clone(),
                max_seen.clone(),
                starts.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let max = max_seen.load(Ordering::SeqCst);
    assert!(max <= 10, "{max} concurrent downloads with a cap of 10");
    assert!(
        max >= 5,
        "the cap was barely used ({max}): the throttle is too strict"
    );
    let mut st = ts.status(&r.id).await;
    for _ in 0..20 {
        if st.state == RolloutState::Completed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = ts.status(&r.id).await;
    }
    let t = st.totals();
    assert_eq!(t.committed, 200);
    assert_eq!(st.active_leases, 0);
    assert_eq!(st.state, RolloutState::Completed, "{}", st.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_rate_holds_within_one_token() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 40, "t").await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 1000;
    s.max_starts_per_min = 120.0; // 2 per second, burst 2
    ts.admin.rollout_create(&s).await.unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    let max_seen = Arc::new(AtomicU64::new(0));
    let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let began = Instant::now();
    let tasks: Vec<_> = devices
        .into_iter()
        .take(12)
        .map(|d| {
            tokio::spawn(run_device(
                d,
                Duration::ZERO,
                in_flight.clone(),
                max_seen.clone(),
                starts.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut v = starts.lock().unwrap().clone();
    v.sort();
    // Any window [a, b] of starts holds at most rate × (b − a) + burst + 1
    // (the +1: client-side timestamps lag the server's decision).
    for i in 0..v.len() {
        for j in i..v.len() {
            let span = (v[j] - v[i]).as_secs_f64();
            let n = (j - i + 1) as f64;
            assert!(
                n <= 2.0 * span + 2.0 + 1.0,
                "{n} starts within {span:.2} s at 2/s"
            );
        }
    }
    // And the limiter does not starve: 12 starts at 2/s take about 5 s.
    let took = began.elapsed().as_secs_f64();
    assert!(took < 12.0, "12 starts took {took:.1} s at 2/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_loses_its_lease_and_the_slot_is_reused() {
    let ts = TestServer::with_two_releases(1000).await;
    let d = fleet(&ts, 2, "t").await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 1;
    s.max_retries = 0;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let a = d[0].checkin("1.0", AgentState::Idle, None).await;
    let Action::Update(offer) = a.action else {
        panic!("{a:?}")
    };
    assert!(matches!(
        d[1].checkin("1.0", AgentState::Idle, None).await.action,
        Action::Wait { .. }
    ));
    // d0 goes silent; within lease + a tick its slot is free again.
    let t0 = Instant::now();
    loop {
        let b = d[1].checkin("1.0", AgentState::Idle, None).await;
        if matches!(b.action, Action::Update(_)) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // The silent device comes back: it is told to stop.
    let back = d[0]
        .checkin("1.0", AgentState::Downloading, Some(&offer.update_id))
        .await;
    assert!(matches!(back.action, Action::Cancel { .. }), "{back:?}");
    let st = ts.status(&r.id).await;
    assert_eq!(st.leases_expired, 1);
    assert_eq!(
        st.totals().failed,
        1,
        "a lease expiry beyond retries is a failure"
    );
    assert_eq!(st.active_leases, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_renews_the_lease() {
    let ts = TestServer::with_two_releases(1000).await;
    let d = fleet(&ts, 1, "t").await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let Action::Update(o) = d[0].checkin("1.0", AgentState::Idle, None).await.action else {
        panic!()
    };
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        d[0].event(&o.update_id, EventKind::Progress).await;
    }
    let st = ts.status(&r.id).await;
    assert_eq!(
        st.leases_expired, 0,
        "progress every 300 ms must keep a 1 s lease"
    );
    assert!(matches!(
        d[0].checkin("1.0", AgentState::Downloading, Some(&o.update_id))
            .await
            .action,
        Action::Update(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_open_only_after_soak_and_success() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 60, "t").await;
    let mut s = spec("2.0", "t");
    s.waves = vec![20, 100];
    s.max_concurrent = 100;
    s.soak_ms = 2000;
    s.success_threshold = 1.0;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let (w1, w2): (Vec<_>, Vec<_>) = devices.iter().partition(|d| r.wave_of(&d.id) == 0);
    assert!(!w1.is_empty() && !w2.is_empty());
    let opened = Instant::now();
    // Wave 2 is closed; wave 1 is admitted.
    for d in &w2 {
        let a = d.checkin("1.0", AgentState::Idle, None).await;
        assert!(
            matches!(&a.action, Action::Wait { reason } if reason.contains("not open")),
            "{a:?}"
        );
    }
    let mut offers = Vec::new();
    for d in &w1 {
        let Action::Update(o) = d.checkin("1.0", AgentState::Idle, None).await.action else {
            panic!()
        };
        offers.push((d, o));
    }
    // All but one commit: success not reached, even after the soak.
    for (d, o) in &offers[1..] {
        d.event(&o.update_id, EventKind::Committed).await;
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(matches!(
        w2[0].checkin("1.0", AgentState::Idle, None).await.action,
        Action::Wait { .. }
    ));
    assert_eq!(ts.status(&r.id).await.open_wave, 1);
    // The last commits: the soak has passed, so wave 2 opens at the next tick.
    let (d, o) = &offers[0];
    d.event(&o.update_id, EventKind::Committed).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.open_wave, 2, "{}", st.reason);
    assert!(opened.elapsed() >= Duration::from_millis(2000));
    assert!(matches!(
        w2[0].checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_does_not_open_before_its_soak() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 30, "t").await;
    let mut s = spec("2.0", "t");
    s.waves = vec![30, 100];
    s.max_concurrent = 100;
    s.soak_ms = 60_000;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    for d in devices.iter().filter(|d| r.wave_of(&d.id) == 0) {
        let Action::Update(o) = d.checkin("1.0", AgentState::Idle, None).await.action else {
            panic!()
        };
        d.event(&o.update_id, EventKind::Committed).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.waves[0].committed, st.waves[0].eligible);
    assert_eq!(st.open_wave, 1, "wave 2 opened before the soak");
}

async fn failing_rollout(
    on_failure: OnFailure,
) -> (TestServer, Vec<Sim>, String, Vec<UpdateOffer>) {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 12, "t").await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 12;
    s.min_sample = 5;
    s.failure_threshold = 0.5;
    s.on_failure = on_failure;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let mut offers = Vec::new();
    for d in &devices {
        let Action::Update(o) = d.checkin("1.0", AgentState::Idle, None).await.action else {
            panic!()
        };
        offers.push(o);
    }
    // Three failures and a commit is below the sample; the fourth failure is 4/5.
    d_event(&devices[0], &offers[0], EventKind::Committed).await;
    for i in 1..4 {
        d_event(&devices[i], &offers[i], EventKind::RolledBack).await;
    }
    assert_eq!(ts.status(&r.id).await.state, RolloutState::Active);
    d_event(&devices[4], &offers[4], EventKind::Failed).await;
    (ts, devices, r.id, offers)
}

async fn d_event(d: &Sim, o: &UpdateOffer, k: EventKind) {
    d.event(&o.update_id, k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_threshold_pauses_the_rollout_and_in_flight_devices_finish() {
    let (ts, devices, id, offers) = failing_rollout(OnFailure::Pause).await;
    let st = ts.status(&id).await;
    assert_eq!(st.state, RolloutState::Paused);
    assert!(st.reason.contains("failure rate"), "{}", st.reason);
    // In flight: carry on. New devices: wait.
    let a = devices[5]
        .checkin("1.0", AgentState::Downloading, Some(&offers[5].update_id))
        .await;
    assert!(matches!(a.action, Action::Update(_)), "{a:?}");
    let late = Sim::enroll(&ts.base, "late", "t", &http()).await;
    assert!(
        matches!(&late.checkin("1.0", AgentState::Idle, None).await.action, Action::Wait { reason } if reason.contains("paused"))
    );
    // The operator resumes: admissions start again.
    ts.admin.rollout_action(&id, "resume").await.unwrap();
    assert!(matches!(
        late.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_threshold_aborts_and_downloading_devices_are_cancelled() {
    let (ts, devices, id, offers) = failing_rollout(OnFailure::Abort).await;
    assert_eq!(ts.status(&id).await.state, RolloutState::Aborted);
    let a = devices[5]
        .checkin("1.0", AgentState::Downloading, Some(&offers[5].update_id))
        .await;
    assert!(matches!(a.action, Action::Cancel { .. }), "{a:?}");
    // A device that already switched boot is left to finish.
    let b = devices[6]
        .checkin("1.0", AgentState::Rebooting, Some(&offers[6].update_id))
        .await;
    assert_eq!(b.action, Action::None);
    assert!(
        ts.admin.rollout_action(&id, "resume").await.is_err(),
        "an aborted rollout cannot resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_idempotent_by_device_and_seq() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = fleet(&ts, 1, "t").await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let Action::Update(o) = d[0].checkin("1.0", AgentState::Idle, None).await.action else {
        panic!()
    };
    let batch: Vec<Event> = [
        EventKind::DownloadStarted,
        EventKind::Downloaded,
        EventKind::Installed,
        EventKind::Rebooting,
        EventKind::Committed,
    ]
    .iter()
    .enumerate()
    .map(|(i, &kind)| Event {
        seq: i as u64 + 1,
        update_id: o.update_id.clone(),
        kind,
        at: "2026-11-26T00:00:00Z".into(),
        detail: Default::default(),
    })
    .collect();
    assert_eq!(
        d[0].events(batch.clone()).await,
        EventsResponse {
            accepted: 5,
            duplicates: 0
        }
    );
    // The agent did not see the answer and retries, with one new event.
    let mut retry = batch.clone();
    retry.push(Event {
        seq: 6,
        kind: EventKind::Progress,
        ..batch[0].clone()
    });
    assert_eq!(
        d[0].events(retry).await,
        EventsResponse {
            accepted: 1,
            duplicates: 5
        }
    );
    let st = ts.status(&r.id).await;
    assert_eq!(st.totals().committed, 1);
    assert_eq!(st.totals().installed, 1);
    assert_eq!(ts.events_accepted().await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_is_retried_up_to_max_retries() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = fleet(&ts, 1, "t").await;
    let mut s = spec("2.0", "t");
    s.max_retries = 1;
    s.min_sample = 100;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let Action::Update(o1) = d[0].checkin("1.0", AgentState::Idle, None).await.action else {
        panic!()
    };
    d[0].event(&o1.update_id, EventKind::Failed).await;
    let Action::Update(o2) = d[0].checkin("1.0", AgentState::Idle, None).await.action else {
        panic!("no retry")
    };
    assert_ne!(o1.update_id, o2.update_id, "a retry is a new attempt");
    d[0].event(&o2.update_id, EventKind::Failed).await;
    assert_eq!(
        d[0].checkin("1.0", AgentState::Idle, None).await.action,
        Action::None
    );
    assert_eq!(ts.status(&r.id).await.totals().failed, 1);
}

/// Issue 14's paused screenshot read "leases 3 / 4" beside "in progress
/// 0": the dashboard derived in progress from `admitted`, which counted
/// attempts while the server ran but only members not waiting to retry
/// after a restart. `in_progress` is counted from the members' phases, and
/// `admitted` counts attempts across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_counts_members_in_flight_and_admissions_survive_a_restart() {
    let mut ts = TestServer::with_two_releases(60_000).await;
    let d = fleet(&ts, 4, "t").await;
    let mut s = spec("2.0", "t");
    s.max_retries = 2;
    s.min_sample = 100;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let mut offers = Vec::new();
    for dev in &d {
        let Action::Update(o) = dev.checkin("1.0", AgentState::Idle, None).await.action else {
            panic!("{} was not admitted", dev.id)
        };
        offers.push(o);
    }
    // Two fail with retries left: back to waiting, leases released.
    for (dev, o) in d.iter().zip(&offers).take(2) {
        dev.event(&o.update_id, EventKind::Failed).await;
    }
    let check = |st: &RolloutStatus, when: &str| {
        let t = st.totals();
        assert_eq!(st.active_leases, 2, "{when}: leases");
        assert_eq!(t.in_progress, 2, "{when}: in progress {t:?}");
        assert_eq!(t.waiting, 2, "{when}: waiting to retry {t:?}");
        assert_eq!(t.admitted, 4, "{when}: attempts admitted {t:?}");
    };
    check(&ts.status(&r.id).await, "running");
    ts.restart().await;
    check(&ts.status(&r.id).await, "after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_a_version_without_a_delta_gets_the_full_image() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = fleet(&ts, 2, "t").await;
    ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let Action::Update(delta) = d[0].checkin("1.0", AgentState::Idle, None).await.action else {
        panic!()
    };
    let Action::Update(full) = d[1].checkin("0.9", AgentState::Idle, None).await.action else {
        panic!()
    };
    assert_eq!(delta.from_version.as_deref(), Some("1.0"));
    assert_eq!(full.from_version, None);
    assert!(delta.payload_size < full.payload_size);
    // Both artifacts are served, content-addressed, and verify.
    let mut served = 0;
    for o in [&delta, &full] {
        let body = d[0]
            .http
            .get(format!("{}{}", ts.base, o.manifest_url))
            .bearer_auth(&d[0].token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(ota_format::Digest::of(&body), o.manifest_sha256);
        served += body.len() as u64;
    }
    // The bytes a member fetched count for its rollout (on PostgreSQL they
    // are buffered per replica and attributed on the next tick).
    let t = std::time::Instant::now();
    let id = &delta.rollout_id;
    while ts.status(id).await.totals().bytes_served != served {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{} bytes counted, {served} served",
            ts.status(id).await.totals().bytes_served
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let ts = TestServer::start(&fast_checkin(5000)).await;
    let http = http();
    let d = Sim::enroll(&ts.base, "dev", "t", &http).await;
    let url = |p: &str| format!("{}{p}", ts.base);
    let check = |r: reqwest::Response, status: u16| async move {
        assert_eq!(r.status().as_u16(), status);
        let e: ApiError = r.json().await.expect("errors are JSON");
        assert!(!e.error.is_empty());
        e
    };
    // Unknown token.
    let r = http
        .post(url("/api/v1/devices/checkin"))
        .bearer_auth("nope")
        .body("{}")
        .send()
        .await
        .unwrap();
    check(r, 401).await;
    // Malformed JSON.
    let r = http
        .post(url("/api/v1/devices/checkin"))
        .bearer_auth(&d.token)
        .body("{\"current_version\": ")
        .send()
        .await
        .unwrap();
    let e = check(r, 400).await;
    assert!(e.error.contains("malformed JSON"), "{}", e.error);
    // Oversized body.
    let big = format!("{{\"events\": [], \"pad\": \"{}\"}}", "x".repeat(300 << 10));
    let r = http
        .post(url("/api/v1/devices/events"))
        .bearer_auth(&d.token)
        .body(big)
        .send()
        .await
        .unwrap();
    check(r, 413).await;
    // Bad names.
    let r = http
        .post(url("/api/v1/devices/enroll"))
        .json(
            &serde_json::json!({"enrollment_key": ENROLL, "device_id": "../x", "device_type": "t"}),
        )
        .send()
        .await
        .unwrap();
    check(r, 400).await;
    // Wrong enrollment key.
    let r = http
        .post(url("/api/v1/devices/enroll"))
        .json(&serde_json::json!({"enrollment_key": "wrong-key-0123456789", "device_id": "x", "device_type": "t"}))
        .send()
        .await
        .unwrap();
    check(r, 403).await;
    // Admin API with a device token.
    let r = http
        .get(url("/api/v1/admin/rollouts"))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    check(r, 401).await;
    // An invalid rollout spec.
    let mut s = spec("2.0", "t");
    s.waves = vec![50, 20];
    let e = ts.admin.rollout_create(&s).await.unwrap_err();
    assert!(
        format!("{e}").contains("release") || format!("{e}").contains("waves"),
        "{e}"
    );
    // Too many events in a batch.
    let many: Vec<Event> = (0..300)
        .map(|i| Event {
            seq: i,
            update_id: "r1.1".into(),
            kind: EventKind::Progress,
            at: "x".into(),
            detail: Default::default(),
        })
        .collect();
    let r = http
        .post(url("/api/v1/devices/events"))
        .bearer_auth(&d.token)
        .json(&EventsRequest { events: many })
        .send()
        .await
        .unwrap();
    check(r, 400).await;
    // Nothing changed: one device, no rollouts, no events counted.
    assert_eq!(ts.app().state.device_count().await.unwrap(), 1);
    assert!(ts.admin.rollouts().await.unwrap().is_empty());
    assert_eq!(ts.events_accepted().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_limits_the_rollout_to_matching_devices() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let tag = |site: &str| {
        [("site".to_string(), site.to_string())]
            .into_iter()
            .collect()
    };
    let lab = Sim::enroll_tagged(&ts.base, "lab-1", "t", tag("lab"), &http).await;
    let field = Sim::enroll_tagged(&ts.base, "field-1", "t", tag("field"), &http).await;
    let other_type = Sim::enroll_tagged(&ts.base, "x-1", "u", tag("lab"), &http).await;
    let mut s = spec("2.0", "t");
    s.selector = tag("lab");
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.totals().eligible, 1);
    assert!(matches!(
        lab.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));
    assert_eq!(
        field.checkin("1.0", AgentState::Idle, None).await.action,
        Action::None
    );
    assert_eq!(
        other_type
            .checkin("1.0", AgentState::Idle, None)
            .await
            .action,
        Action::None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_rate_ramps_with_commits() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = fleet(&ts, 4, "t").await;
    let mut s = spec("2.0", "t");
    s.max_starts_per_min = 10.0;
    s.ramp_factor = 2.0;
    s.ramp_every = 2;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.starts_per_min_now, 10.0);
    for dev in &d[..2] {
        let Action::Update(o) = dev.checkin("1.0", AgentState::Idle, None).await.action else {
            // The bucket holds one start; wait for the second.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let Action::Update(o) = dev.checkin("1.0", AgentState::Idle, None).await.action else {
                panic!()
            };
            dev.event(&o.update_id, EventKind::Committed).await;
            continue;
        };
        dev.event(&o.update_id, EventKind::Committed).await;
    }
    assert_eq!(
        ts.status(&r.id).await.starts_per_min_now,
        20.0,
        "two commits double the rate"
    );
}

/// Issue 18: `release list` and `release add --wait` show each running
/// build's phase and bytes done of its total, from the builder itself. A
/// full image of 24 MiB of text-like data at zstd level 19 keeps the build
/// busy for a few seconds, long enough to be seen through the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_shows_its_phase_and_bytes_in_the_release_list() {
    let ts = TestServer::start("full_zstd_level = 19\n").await;
    let img = slow_image(24 << 20);
    let p = ts.dir.path().join("big.img");
    std::fs::write(&p, &img).unwrap();
    ts.admin
        .release_add("t", "1.0", 0, &p, false)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let t = std::time::Instant::now();
    loop {
        let all = ts.admin.releases().await.unwrap();
        let b = all[0].builds[0].clone();
        match b.status {
            ota_server::releases::BuildStatus::Ready => {
                assert!(b.progress.is_none(), "a finished build shows no progress");
                break;
            }
            ota_server::releases::BuildStatus::Failed => panic!("build failed: {b:?}"),
            _ => {
                if let Some(p) = b.progress {
                    seen.push(p);
                }
            }
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(300));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !seen.is_empty(),
        "no progress was ever shown while building"
    );
    for w in seen.windows(2) {
        assert!(w[1].done_bytes >= w[0].done_bytes, "{seen:?}");
    }
    for p in &seen {
        assert!(
            [
                "starting",
                "matching blocks",
                "compressing",
                "done",
                "signing",
                "storing"
            ]
            .contains(&p.phase.as_str()),
            "{p:?}"
        );
        assert!(p.done_bytes <= p.total_bytes, "{p:?}");
        assert!(p.total_bytes == 0 || p.total_bytes == 2 * img.len() as u64);
    }
    assert!(
        seen.iter()
            .any(|p| p.phase == "compressing" && p.done_bytes > img.len() as u64),
        "the compression phase and its bytes were seen: {seen:?}"
    );
}
