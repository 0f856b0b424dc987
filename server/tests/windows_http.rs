//! Issue 15, maintenance windows and "download now, install later", over
//! real HTTP on 127.0.0.1: a device admitted outside its rollout's windows
//! downloads and verifies, reports `waiting-for-window`, holds no download
//! lease, and is told to install when the (test-moved) window clock enters
//! a window or an operator says install-now. `rollout_pg` runs this suite
//! on PostgreSQL too.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;
use ota_server::rollout::window::Window;
use ota_server::rollout::{RolloutSpec, RolloutState};

fn windowed(w: Window) -> RolloutSpec {
    let mut s = spec("2.0", "t");
    s.windows = vec![w];
    s.max_concurrent = 1;
    s
}

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

/// The device downloaded and verified `o`: it says so in events, then checks
/// in holding it; returns the answer.
async fn downloaded_and_waiting(d: &Sim, o: &UpdateOffer) -> Action {
    d.event(&o.update_id, EventKind::Downloaded).await;
    d.event(&o.update_id, EventKind::WaitingForWindow).await;
    waiting_checkin(d, o).await
}

async fn waiting_checkin(d: &Sim, o: &UpdateOffer) -> Action {
    d.checkin("1.0", AgentState::WaitingForWindow, Some(&o.update_id))
        .await
        .action
}

fn install_of(o: &UpdateOffer) -> Action {
    Action::Install {
        update_id: o.update_id.clone(),
    }
}

fn assert_told_to_wait_for_window(a: &Action) {
    match a {
        Action::Wait { reason } => assert!(
            reason.contains("outside the maintenance windows") && reason.contains("next opens"),
            "{reason}"
        ),
        other => panic!("expected a wait for the window, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_window_devices_download_wait_without_a_lease_and_install_when_it_opens() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let a = Sim::enroll(&ts.base, "dev-a", "t", &http).await;
    let b = Sim::enroll(&ts.base, "dev-b", "t", &http).await;
    // Cap 1: a waiting device must free the only download slot.
    let r = ts
        .admin
        .rollout_create(&windowed(window_from_now(6.0)))
        .await
        .unwrap();
    let oa = admitted(&a).await;
    assert!(oa.install_gated, "a windowed rollout's offer is gated");
    assert_told_to_wait_for_window(&downloaded_and_waiting(&a, &oa).await);
    let st = ts.status(&r.id).await;
    assert_eq!(st.active_leases, 0, "a waiting device holds no lease");
    assert_eq!(st.totals().waiting_for_window, 1, "{st:?}");
    assert!(st.next_window.is_some());
    // The slot it freed goes to the next device at once.
    let ob = admitted(&b).await;
    assert_told_to_wait_for_window(&downloaded_and_waiting(&b, &ob).await);
    let st = ts.status(&r.id).await;
    assert_eq!((st.active_leases, st.totals().waiting_for_window), (0, 2));
    // The same figure in the metrics (refreshed every few ticks).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = http
            .get(format!("{}/metrics", ts.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.lines().any(|l| {
            l.contains("what=\"waiting_for_window\"")
                && l.contains(&format!("rollout=\"{}\"", r.id))
                && l.ends_with(" 2")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Waiting is not success: the rollout does not complete.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.state, RolloutState::Active, "{}", st.reason);
    assert_eq!(st.totals().committed, 0);

    // Six hours later (by the window clock) the window is open.
    ts.app()
        .state
        .window_clock()
        .set_offset_ms(6 * HOUR_MS + 60_000);
    assert_eq!(waiting_checkin(&a, &oa).await, install_of(&oa));
    a.event(&oa.update_id, EventKind::Installed).await;
    a.event(&oa.update_id, EventKind::Committed).await;
    assert_eq!(waiting_checkin(&b, &ob).await, install_of(&ob));
    b.event(&ob.update_id, EventKind::Installed).await;
    b.event(&ob.update_id, EventKind::Committed).await;
    let st = ts.status(&r.id).await;
    assert_eq!(st.totals().committed, 2, "{st:?}");
    assert_eq!(st.totals().waiting_for_window, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_closes_mid_download_leaves_the_device_verified_and_waiting() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let d = Sim::enroll(&ts.base, "dev-1", "t", &http).await;
    // Opened half an hour ago; closes in half an hour.
    let r = ts
        .admin
        .rollout_create(&windowed(window_from_now(-0.5)))
        .await
        .unwrap();
    assert!(ts.status(&r.id).await.next_window.is_some());
    let o = admitted(&d).await;
    assert!(o.install_gated, "gated even inside a window: it may close");
    // Still downloading: the offer is repeated (lease renewed).
    match d
        .checkin("1.0", AgentState::Downloading, Some(&o.update_id))
        .await
        .action
    {
        Action::Update(again) => assert_eq!(again.update_id, o.update_id),
        other => panic!("{other:?}"),
    }
    // The window closes before the download ends.
    ts.app().state.window_clock().set_offset_ms(HOUR_MS);
    assert_told_to_wait_for_window(&downloaded_and_waiting(&d, &o).await);
    let st = ts.status(&r.id).await;
    assert_eq!(st.active_leases, 0);
    assert_eq!(st.totals().waiting_for_window, 1);
    // Back inside (tomorrow's window, by the clock): install.
    ts.app().state.window_clock().set_offset_ms(24 * HOUR_MS);
    assert_eq!(waiting_checkin(&d, &o).await, install_of(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reporting_waiting_before_its_events_arrive_is_still_gated() {
    // Events travel apart from check-ins: the member may still show
    // `downloading` when the device first checks in as waiting.
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev-1", "t", &http()).await;
    ts.admin
        .rollout_create(&windowed(window_from_now(6.0)))
        .await
        .unwrap();
    let o = admitted(&d).await;
    assert_told_to_wait_for_window(&waiting_checkin(&d, &o).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_now_lets_named_devices_then_all_switch_outside_the_window() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let a = Sim::enroll(&ts.base, "dev-a", "t", &http).await;
    let b = Sim::enroll(&ts.base, "dev-b", "t", &http).await;
    let mut s = windowed(window_from_now(6.0));
    s.max_concurrent = 10;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let oa = admitted(&a).await;
    let ob = admitted(&b).await;
    assert_told_to_wait_for_window(&downloaded_and_waiting(&a, &oa).await);
    assert_told_to_wait_for_window(&downloaded_and_waiting(&b, &ob).await);

    // A device not in the rollout: refused, naming it; nothing changes.
    let e = ts
        .admin
        .rollout_install_now(&r.id, &["dev-a".into(), "ghost".into()])
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("ghost"), "{e:#}");
    assert_told_to_wait_for_window(&waiting_checkin(&a, &oa).await);

    let marked = ts
        .admin
        .rollout_install_now(&r.id, &["dev-a".into()])
        .await
        .unwrap();
    assert_eq!(marked.devices, vec!["dev-a".to_string()]);
    assert_eq!(waiting_checkin(&a, &oa).await, install_of(&oa));
    assert_told_to_wait_for_window(&waiting_checkin(&b, &ob).await);
    a.event(&oa.update_id, EventKind::Installed).await;
    a.event(&oa.update_id, EventKind::Committed).await;

    // A committed device has nothing left to install: 409, naming it.
    let e = ts
        .admin
        .rollout_install_now(&r.id, &["dev-a".into()])
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("dev-a"), "{e:#}");

    // Without devices: every admitted device not yet installed.
    let marked = ts.admin.rollout_install_now(&r.id, &[]).await.unwrap();
    assert_eq!(marked.devices, vec!["dev-b".to_string()]);
    assert_eq!(waiting_checkin(&b, &ob).await, install_of(&ob));
    assert!(ts.admin.rollout_install_now("r999", &[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_a_rollout_cancels_an_update_waiting_for_its_window() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev-1", "t", &http()).await;
    let r = ts
        .admin
        .rollout_create(&windowed(window_from_now(6.0)))
        .await
        .unwrap();
    let o = admitted(&d).await;
    assert_told_to_wait_for_window(&downloaded_and_waiting(&d, &o).await);
    ts.admin.rollout_action(&r.id, "pause").await.unwrap();
    // Paused: even inside the window, the waiting update stays put.
    ts.app()
        .state
        .window_clock()
        .set_offset_ms(6 * HOUR_MS + 60_000);
    match waiting_checkin(&d, &o).await {
        Action::Wait { reason } => assert!(reason.contains("paused"), "{reason}"),
        other => panic!("{other:?}"),
    }
    ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    match waiting_checkin(&d, &o).await {
        Action::Cancel { update_id, .. } => assert_eq!(update_id, o.update_id),
        other => panic!("{other:?}"),
    }
    let st = ts.status(&r.id).await;
    assert_eq!(st.totals().waiting_for_window, 0);
    assert_eq!(st.totals().cancelled, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_window_is_refused_naming_the_field_and_nothing_is_created() {
    let ts = TestServer::with_two_releases(5000).await;
    let mut body = serde_json::to_value(spec("2.0", "t")).unwrap();
    body["windows"] = serde_json::json!(["mon-fri 25:00+3h Europe/Berlin"]);
    let r = http()
        .post(format!("{}/api/v1/admin/rollouts", ts.base))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("window start"), "{text}");
    body["windows"] = serde_json::json!(["mon 02:00+3h Atlantis/Capital"]);
    let r = http()
        .post(format!("{}/api/v1/admin/rollouts", ts.base))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("window zone"));
    assert!(ts.admin.rollouts().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_default_window_gates_its_rollouts_unless_they_give_their_own() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev-1", "t", &http()).await;
    let night = window_from_now(6.0);
    ts.admin
        .group_create(&ota_server::groups::Group {
            name: "night-shift".into(),
            device_type: "t".into(),
            selector: Default::default(),
            created_at_ms: 0,
            windows: vec![night.clone()],
        })
        .await
        .unwrap();
    let mut s = spec("2.0", "");
    s.device_type = String::new();
    s.group = Some("night-shift".into());
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.spec.windows, vec![night]);
    let o = admitted(&d).await;
    assert!(o.install_gated);
    assert_told_to_wait_for_window(&downloaded_and_waiting(&d, &o).await);
    // Aborted, a new rollout of the group with a window of its own, open
    // now: that one applies.
    ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    let own = window_from_now(-0.5);
    s.windows = vec![own.clone()];
    let r2 = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r2.spec.windows, vec![own]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_device_survives_a_server_restart_without_a_lease() {
    let extra = if on_postgres() {
        format!("{}\n{}", fast_checkin(5000), postgres_sections().await)
    } else {
        fast_checkin(5000)
    };
    let mut ts = TestServer::start_in(tempfile::tempdir().unwrap(), &extra).await;
    ts.release("t", "1.0", &image(16, 1)).await;
    ts.release("t", "2.0", &image(16, 2)).await;
    let d = Sim::enroll(&ts.base, "dev-1", "t", &http()).await;
    let r = ts
        .admin
        .rollout_create(&windowed(window_from_now(6.0)))
        .await
        .unwrap();
    let o = admitted(&d).await;
    assert_told_to_wait_for_window(&downloaded_and_waiting(&d, &o).await);
    ts.stop().await;
    let TestServer { dir, .. } = ts;
    let ts = TestServer::start_in(dir, &extra).await;
    let d = Sim {
        base: ts.base.clone(),
        ..d
    };
    let st = ts.status(&r.id).await;
    assert_eq!(
        st.active_leases, 0,
        "no lease restored for a waiting device"
    );
    assert_eq!(st.totals().waiting_for_window, 1);
    assert_told_to_wait_for_window(&waiting_checkin(&d, &o).await);
    ts.app()
        .state
        .window_clock()
        .set_offset_ms(6 * HOUR_MS + 60_000);
    assert_eq!(waiting_checkin(&d, &o).await, install_of(&o));
}

/// A client that cannot hold a verified update (no `install_gate` in its
/// check-in: an agent older than windows, a DDI target) would install the
/// moment it downloaded: outside every window it is not admitted (and
/// takes no lease); inside one it is. Before this it was admitted at once
/// and rebooted outside the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_wait_is_admitted_only_inside_a_window() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "legacy", "t", &http()).await;
    let r = ts
        .admin
        .rollout_create(&windowed(window_from_now(6.0)))
        .await
        .unwrap();
    let legacy = |d: &Sim| {
        let d = d.clone();
        async move {
            let body = d
                .checkin_raw(&idle_request("1.0", ota_format::manifest::codecs()))
                .await;
            serde_json::from_slice::<CheckinResponse>(&body)
                .unwrap()
                .action
        }
    };
    match legacy(&d).await {
        Action::Wait { reason } => assert!(
            reason.contains("cannot wait with a verified update") && reason.contains("next opens"),
            "{reason}"
        ),
        other => panic!("a client that cannot wait was admitted outside the window: {other:?}"),
    }
    assert_eq!(ts.status(&r.id).await.active_leases, 0);
    ts.app()
        .state
        .window_clock()
        .set_offset_ms(6 * HOUR_MS + 60_000);
    assert!(
        matches!(legacy(&d).await, Action::Update(_)),
        "inside the window it is admitted"
    );
}

/// Issue 15, "or device-local time reported by the agent": one rollout
/// whose window is `local` opens on each device's own wall clock, from the
/// zone its check-ins report; a device reporting none is judged in UTC,
/// and told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_window_opens_on_each_devices_reported_zone() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let mut dhaka = Sim::enroll(&ts.base, "dev-dhaka", "t", &http).await;
    dhaka.time_zone = Some("Asia/Dhaka".into()); // UTC+06:00, no DST
    let mut kolkata = Sim::enroll(&ts.base, "dev-kolkata", "t", &http).await;
    kolkata.time_zone = Some("Asia/Kolkata".into()); // UTC+05:30, no DST
    let nowhere = Sim::enroll(&ts.base, "dev-nowhere", "t", &http).await;
    // Opened 10 minutes ago on Dhaka's wall clock, for 20 minutes: Kolkata's
    // clock is 30 minutes behind, so its window opens in 20 minutes.
    let start = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_mins(10))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::get("Asia/Dhaka").unwrap());
    let w = Window::parse(&format!(
        "daily {:02}:{:02}+20m local",
        start.hour(),
        start.minute()
    ))
    .unwrap();
    let mut s = spec("2.0", "t");
    s.windows = vec![w];
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert!(
        ts.status(&r.id)
            .await
            .next_window
            .unwrap()
            .contains("each device's own zone")
    );
    let (od, ok, on) = (
        admitted(&dhaka).await,
        admitted(&kolkata).await,
        admitted(&nowhere).await,
    );
    assert_eq!(downloaded_and_waiting(&dhaka, &od).await, install_of(&od));
    let wait = downloaded_and_waiting(&kolkata, &ok).await;
    assert_told_to_wait_for_window(&wait);
    assert!(format!("{wait:?}").contains("Asia/Kolkata"), "{wait:?}");
    let wait = downloaded_and_waiting(&nowhere, &on).await;
    assert_told_to_wait_for_window(&wait);
    assert!(format!("{wait:?}").contains("UTC"), "{wait:?}");
    // 25 minutes on: Kolkata's window is open, Dhaka's has closed.
    ts.app().state.window_clock().set_offset_ms(25 * 60_000);
    assert_eq!(waiting_checkin(&kolkata, &ok).await, install_of(&ok));
    assert_told_to_wait_for_window(&waiting_checkin(&nowhere, &on).await);
}
