//! Issue 15 items 4 and 5 over real HTTP on 127.0.0.1: a scheduled start,
//! waves held to a time offset from the start, the ramp's ceiling, and the
//! status saying in words what the next wave waits for. Included by
//! `rollout_pg` to run on PostgreSQL + Redis as well.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;

async fn fleet(ts: &TestServer, n: usize) -> Vec<Sim> {
    let http = http();
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Sim::enroll(&ts.base, &format!("dev-{i:05}"), "t", &http).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rollout_admits_nobody_before_its_start() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 3).await;
    let mut s = spec("2.0", "t");
    s.waves = vec![50, 100];
    s.soak_ms = 1500;
    s.start_at_ms = Some(ota_server::now_ms() + 2500);
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert!(
        r.reason.starts_with("scheduled: starts at "),
        "{}",
        r.reason
    );
    assert!(
        r.next_wave.as_deref().unwrap_or("").contains("starts at"),
        "{:?}",
        r.next_wave
    );
    for d in &devices {
        let a = d.checkin("1.0", AgentState::Idle, None).await;
        assert!(
            matches!(&a.action, Action::Wait { reason } if reason.contains("starts at")),
            "admitted before the start: {a:?}"
        );
    }
    let first = devices
        .iter()
        .find(|d| r.wave_of(&d.id) == 0)
        .expect("a device in wave 1");
    let started = Instant::now();
    let o = loop {
        match first.checkin("1.0", AgentState::Idle, None).await.action {
            Action::Update(o) => break o,
            Action::Wait { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never started");
    };
    assert!(
        ota_server::now_ms() >= s.start_at_ms.unwrap(),
        "admitted before start_at"
    );
    // The first wave's soak counts from the start, not from the creation.
    first.event(&o.update_id, EventKind::Committed).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.open_wave, 1, "wave 2 opened inside the soak");
    assert!(
        st.next_wave.as_deref().unwrap_or("").contains("the soak"),
        "{:?}",
        st.next_wave
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_opens_no_earlier_than_its_time_offset() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 20).await;
    let mut s = spec("2.0", "t");
    s.waves = vec![30, 100];
    s.success_threshold = 1.0;
    s.wave_offsets_ms = vec![0, 3000];
    let created = Instant::now();
    let r = ts.admin.rollout_create(&s).await.unwrap();
    for d in devices.iter().filter(|d| r.wave_of(&d.id) == 0) {
        let Action::Update(o) = d.checkin("1.0", AgentState::Idle, None).await.action else {
            panic!("wave 1 is open")
        };
        d.event(&o.update_id, EventKind::Committed).await;
    }
    // Wave 1 soaked (0) and succeeded (100 %): only the offset holds wave 2.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.open_wave, 1, "wave 2 opened before its offset");
    let why = st.next_wave.unwrap_or_default();
    assert!(
        why.contains("time offset") && !why.contains("soak") && !why.contains("to commit"),
        "{why}"
    );
    let late = devices.iter().find(|d| r.wave_of(&d.id) == 1).unwrap();
    assert!(matches!(
        late.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Wait { .. }
    ));
    loop {
        let st = ts.status(&r.id).await;
        if st.open_wave == 2 {
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(15),
            "wave 2 never opened: {:?}",
            st.next_wave
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created.elapsed() >= Duration::from_millis(3000));
    assert!(matches!(
        late.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));
}

/// AWS IoT Jobs' exponential rate: ×factor every N commits, up to a ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ramp_multiplies_per_commits_and_stops_at_its_ceiling() {
    let ts = TestServer::with_two_releases(5000).await;
    let devices = fleet(&ts, 3).await;
    let mut s = spec("2.0", "t");
    s.max_starts_per_min = 600.0;
    s.ramp_factor = 3.0;
    s.ramp_every = 1;
    s.ramp_max_per_min = Some(2000.0);
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.starts_per_min_now, 600.0);
    let mut rates = Vec::new();
    for d in &devices {
        let o = loop {
            match d.checkin("1.0", AgentState::Idle, None).await.action {
                Action::Update(o) => break o,
                Action::Wait { .. } => tokio::time::sleep(Duration::from_millis(120)).await,
                other => panic!("{other:?}"),
            }
        };
        d.event(&o.update_id, EventKind::Committed).await;
        rates.push(ts.status(&r.id).await.starts_per_min_now);
    }
    assert_eq!(
        rates,
        vec![1800.0, 2000.0, 2000.0],
        "600 × 3 per commit, ceiling 2000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_and_change_nothing() {
    let ts = TestServer::with_two_releases(5000).await;
    type Change = Box<dyn Fn(&mut ota_server::rollout::RolloutSpec)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|s| s.wave_offsets_ms = vec![0]), "one per wave"),
        (
            Box::new(|s| s.wave_offsets_ms = vec![1000, 2000]),
            "must be 0",
        ),
        (
            Box::new(|s| s.start_at_ms = Some(ota_server::now_ms() + 400 * 86_400_000)),
            "more than a year ahead",
        ),
        (
            Box::new(|s| s.ramp_max_per_min = Some(1.0)),
            "ramp_max_per_min",
        ),
    ];
    for (change, want) in cases {
        let mut s = spec("2.0", "t");
        s.waves = vec![10, 100];
        change(&mut s);
        let e = ts.admin.rollout_create(&s).await.unwrap_err().to_string();
        assert!(e.contains("400") && e.contains(want), "{want}: {e}");
    }
    assert!(ts.admin.rollouts().await.unwrap().is_empty());
}
