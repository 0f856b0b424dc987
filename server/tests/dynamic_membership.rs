//! Issue 15, dynamic membership, over real HTTP on 127.0.0.1: devices that
//! enroll late, change tags or come back online join a running (or
//! completed) rollout under its cap; a rollout done with the devices it has
//! reports "complete, awaiting new devices". `rollout_pg` runs this suite
//! on PostgreSQL too.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;
use ota_server::rollout::membership::AWAITING;
use ota_server::rollout::{RolloutState, RolloutStatus};

fn tags(site: &str) -> BTreeMap<String, String> {
    [("site".to_string(), site.to_string())]
        .into_iter()
        .collect()
}

/// Polls the rollout until `pred` holds (the server's tick decides
/// completion every 250 ms).
async fn wait_status(
    ts: &TestServer,
    id: &str,
    pred: impl Fn(&RolloutStatus) -> bool,
) -> RolloutStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = ts.status(id).await;
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "rollout {id} stuck: {:?} {}",
            st.state,
            st.reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks `d` in until it is offered the update; panics on anything but
/// an update or a wait.
async fn admitted(d: &Sim) -> UpdateOffer {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match d.checkin("1.0", AgentState::Idle, None).await.action {
            Action::Update(o) => return o,
            Action::Wait { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("{}: unexpected answer {other:?}", d.id),
        }
        assert!(Instant::now() < deadline, "{} never admitted", d.id);
    }
}

async fn commit(d: &Sim, o: &UpdateOffer) {
    d.event(&o.update_id, EventKind::Installed).await;
    d.event(&o.update_id, EventKind::Committed).await;
}

fn completed(st: &RolloutStatus) -> bool {
    st.state == RolloutState::Completed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolled_after_completion_is_updated_under_the_cap() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let first = Sim::enroll(&ts.base, "early-1", "t", &http).await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 1;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let o = admitted(&first).await;
    commit(&first, &o).await;
    let st = wait_status(&ts, &r.id, completed).await;
    assert!(st.reason.starts_with(AWAITING), "{}", st.reason);

    // Two devices enroll after completion: the rollout takes them, one at a
    // time (cap 1).
    let late_a = Sim::enroll(&ts.base, "late-a", "t", &http).await;
    let late_b = Sim::enroll(&ts.base, "late-b", "t", &http).await;
    let oa = admitted(&late_a).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.state, RolloutState::Active, "{}", st.reason);
    assert!(st.reason.contains("late-a"), "{}", st.reason);
    assert_eq!(st.active_leases, 1);
    match late_b.checkin("1.0", AgentState::Idle, None).await.action {
        Action::Wait { reason } => assert!(reason.contains("cap"), "{reason}"),
        other => panic!("the cap of 1 must hold late-b back, got {other:?}"),
    }
    commit(&late_a, &oa).await;
    let ob = admitted(&late_b).await;
    commit(&late_b, &ob).await;
    let st = wait_status(&ts, &r.id, completed).await;
    assert_eq!(st.totals().committed, 3, "{st:?}");
    assert_eq!(st.totals().eligible, 3, "{st:?}");
    assert!(
        st.reason.contains("every eligible device finished"),
        "{}",
        st.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolled_while_the_rollout_runs_joins_under_the_cap() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let first = Sim::enroll(&ts.base, "early-1", "t", &http).await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 1;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.totals().eligible, 1);
    let o = admitted(&first).await;
    // Enrolled while early-1 holds the only lease: counted, held back.
    let late = Sim::enroll(&ts.base, "late-1", "t", &http).await;
    assert_eq!(ts.status(&r.id).await.totals().eligible, 2);
    assert!(matches!(
        late.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Wait { .. }
    ));
    commit(&first, &o).await;
    let ol = admitted(&late).await;
    commit(&late, &ol).await;
    let st = wait_status(&ts, &r.id, completed).await;
    assert_eq!(st.totals().committed, 2, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_tags_change_to_match_joins() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let lab = Sim::enroll_tagged(&ts.base, "lab-1", "t", tags("lab"), &http).await;
    let field = Sim::enroll_tagged(&ts.base, "mover", "t", tags("field"), &http).await;
    let mut s = spec("2.0", "t");
    s.selector = tags("lab");
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.totals().eligible, 1);
    assert_eq!(
        field.checkin("1.0", AgentState::Idle, None).await.action,
        Action::None
    );
    let o = admitted(&lab).await;
    commit(&lab, &o).await;
    wait_status(&ts, &r.id, completed).await;

    // The device moves to the lab (re-enrolled with its new tags).
    let moved = Sim::enroll_tagged(&ts.base, "mover", "t", tags("lab"), &http).await;
    assert_eq!(ts.status(&r.id).await.totals().eligible, 2);
    let o = admitted(&moved).await;
    assert_eq!(o.version, "2.0");
    commit(&moved, &o).await;
    let st = wait_status(&ts, &r.id, completed).await;
    assert_eq!(st.totals().committed, 2, "{st:?}");

    // And leaving the selector takes it out of the count again.
    Sim::enroll_tagged(&ts.base, "lab-1", "t", tags("field"), &http).await;
    assert_eq!(ts.status(&r.id).await.totals().eligible, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_does_not_keep_the_rollout_open_and_joins_when_back() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let mut on = Vec::new();
    for i in 0..3 {
        on.push(Sim::enroll(&ts.base, &format!("on-{i}"), "t", &http).await);
    }
    let offline = Sim::enroll(&ts.base, "offline", "t", &http).await;
    let mut s = spec("2.0", "t");
    s.success_threshold = 0.75;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.totals().eligible, 4);
    for d in &on {
        let o = admitted(d).await;
        commit(d, &o).await;
    }
    let st = wait_status(&ts, &r.id, completed).await;
    assert!(
        st.reason.starts_with(AWAITING) && st.reason.contains("1 not checked in yet"),
        "{}",
        st.reason
    );
    // It comes back online: admitted, and the rollout completes for good.
    let o = admitted(&offline).await;
    assert_eq!(ts.status(&r.id).await.state, RolloutState::Active);
    commit(&offline, &o).await;
    let st = wait_status(&ts, &r.id, completed).await;
    assert!(
        st.reason.contains("every eligible device finished"),
        "{}",
        st.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_rollout_stops_taking_devices_when_aborted_or_superseded() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let d = Sim::enroll(&ts.base, "d-1", "t", &http).await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let o = admitted(&d).await;
    commit(&d, &o).await;
    wait_status(&ts, &r.id, completed).await;
    // A newer rollout of the type (here narrowed to another site)
    // supersedes the completed one for every device of the type.
    let mut s = spec("1.0", "t");
    s.selector = tags("elsewhere");
    let newer = ts.admin.rollout_create(&s).await.unwrap();
    let late = Sim::enroll(&ts.base, "late", "t", &http).await;
    assert_eq!(
        late.checkin("0.9", AgentState::Idle, None).await.action,
        Action::None
    );
    assert_eq!(ts.status(&r.id).await.state, RolloutState::Completed);
    // The operator aborts the newer one and the old one: nothing for late.
    ts.admin.rollout_action(&newer.id, "abort").await.unwrap();
    let st = ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    assert_eq!(st.state, RolloutState::Aborted);
    assert_eq!(
        late.checkin("1.0", AgentState::Idle, None).await.action,
        Action::None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_rollout_keeps_the_release_it_still_offers_from_deletion() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "d-1", "t", &http()).await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let o = admitted(&d).await;
    commit(&d, &o).await;
    wait_status(&ts, &r.id, completed).await;
    // No device runs 2.0 any more, but a newcomer would still be offered it.
    ts.admin.device_retire("d-1").await.unwrap();
    let e = ts
        .admin
        .release_delete("t", "2.0")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("rollout {}", r.id)), "{e}");
    ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    ts.admin.release_delete("t", "2.0").await.unwrap();
}
