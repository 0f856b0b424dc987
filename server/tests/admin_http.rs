//! The operator's admin API over real HTTP: the device inventory (filters,
//! paging, bad input), `device show`'s figures, failure reasons in a rollout
//! status, retiring devices and deleting releases. `rollout_pg` runs this
//! suite again on PostgreSQL + Redis, so both backends answer alike.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::*;
use ota_format::api::*;
use ota_format::manifest::Codecs;
use ota_server::inventory::{DevicePage, DeviceQuery};
use ota_server::render::DeviceView;

fn q(f: impl FnOnce(&mut DeviceQuery)) -> DeviceQuery {
    let mut q = DeviceQuery::default();
    f(&mut q);
    q
}

async fn ids(ts: &TestServer, q: DeviceQuery) -> Vec<String> {
    ts.admin
        .device_list(&q)
        .await
        .unwrap()
        .devices
        .into_iter()
        .map(|d| d.id)
        .collect()
}

async fn admitted(d: &Sim) -> UpdateOffer {
    match d.checkin("1.0", AgentState::Idle, None).await.action {
        Action::Update(o) => o,
        other => panic!("{} was not admitted: {other:?}", d.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_filters_and_pages_on_the_server() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let mut sims = Vec::new();
    for i in 0..7 {
        let site = if i % 2 == 0 { "lab" } else { "field" };
        let tags = BTreeMap::from([("site".to_string(), site.to_string())]);
        sims.push(Sim::enroll_tagged(&ts.base, &format!("d{i}"), "t", tags, &http).await);
    }
    Sim::enroll(&ts.base, "other-0", "u", &http).await;
    // d0..d3 check in on 1.0; d4..d6 never do.
    for d in &sims[..4] {
        d.checkin("1.0", AgentState::Idle, None).await;
    }

    assert_eq!(ts.admin.device_list(&q(|_| {})).await.unwrap().total, 8);
    assert_eq!(
        ids(&ts, q(|q| q.device_type = Some("t".into())))
            .await
            .len(),
        7
    );
    assert_eq!(
        ids(&ts, q(|q| q.tags = Some("site=lab".into()))).await,
        ["d0", "d2", "d4", "d6"]
    );
    assert_eq!(
        ids(&ts, q(|q| q.state = Some("never".into()))).await,
        ["d4", "d5", "d6", "other-0"]
    );
    assert_eq!(
        ids(&ts, q(|q| q.state = Some("idle".into()))).await,
        ["d0", "d1", "d2", "d3"]
    );
    assert_eq!(
        ids(&ts, q(|q| q.seen_within_s = Some(600))).await,
        ["d0", "d1", "d2", "d3"]
    );
    assert_eq!(
        ids(
            &ts,
            q(|q| {
                q.version = Some("1.0".into());
                q.tags = Some("site=field".into());
            })
        )
        .await,
        ["d1", "d3"]
    );

    // A rollout admits two devices: the rollout filter shows exactly those.
    let mut s = spec("2.0", "t");
    s.max_concurrent = 2;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    admitted(&sims[0]).await;
    admitted(&sims[1]).await;
    assert_eq!(
        ids(&ts, q(|q| q.rollout = Some(r.id.clone()))).await,
        ["d0", "d1"]
    );

    // Pages of 3 walk every device once, in id order.
    let mut seen = Vec::new();
    let mut query = q(|q| q.limit = Some(3));
    loop {
        let p: DevicePage = ts.admin.device_list(&query).await.unwrap();
        assert_eq!(p.total, 8);
        assert!(p.devices.len() <= 3);
        seen.extend(p.devices.into_iter().map(|d| d.id));
        match p.next {
            Some(n) => query.after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "other-0"]);

    // Bad input: a clear 4xx naming the parameter.
    let get = |qs: &'static str| {
        let http = http.clone();
        let url = format!("{}/api/v1/admin/devices?{qs}", ts.base);
        async move {
            let r = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
            let status = r.status().as_u16();
            let e: ApiError = r.json().await.expect("errors are JSON");
            (status, e.error)
        }
    };
    let (st, e) = get("state=sleeping").await;
    assert_eq!(st, 400);
    assert!(e.contains("expected idle"), "{e}");
    let (st, e) = get("limit=abc").await;
    assert_eq!(st, 400);
    assert!(e.contains("limit"), "{e}");
    let (st, e) = get("limit=100000").await;
    assert_eq!(st, 400);
    assert!(e.contains("1 to 1000"), "{e}");
    let (st, e) = get("rollout=r-nope").await;
    assert_eq!(st, 404);
    assert!(e.contains("r-nope"), "{e}");

    // The rows a dashboard shows, refreshed by id: only those, still
    // filtered, unknown ids left out, `total` counted within them, and as
    // of the last check-in.
    sims[0].checkin("1.0", AgentState::Downloading, None).await;
    let p = ts
        .admin
        .device_list(&q(|q| {
            q.ids = Some("d5,d0,nobody,d2".into());
            q.tags = Some("site=lab".into());
        }))
        .await
        .unwrap();
    let got: Vec<&str> = p.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(got, ["d0", "d2"]);
    assert_eq!((p.total, p.next), (2, None));
    assert_eq!(p.devices[0].state, Some(AgentState::Downloading));
    let (st, e) = get("ids=,,").await;
    assert_eq!(st, 400);
    assert!(e.contains("ids"), "{e}");
    let many = (0..1001)
        .map(|i| format!("x{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let url = format!("{}/api/v1/admin/devices?ids={many}", ts.base);
    let r = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_show_keeps_bytes_verified_after_commit_and_lists_history() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev", "t", &http()).await;
    d.checkin("1.0", AgentState::Idle, None).await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let o = admitted(&d).await;
    let total = 16 * 4096;
    let ev = |seq: u64, kind: EventKind, progress: Option<Progress>| Event {
        seq,
        update_id: o.update_id.clone(),
        kind,
        at: "2026-11-26T00:00:00Z".into(),
        detail: EventDetail {
            progress,
            ..Default::default()
        },
    };
    let done = Progress {
        bytes_verified: total,
        bytes_total: total,
        ops_done: 4,
        ops_total: 4,
    };
    d.events(vec![
        ev(1, EventKind::DownloadStarted, None),
        ev(2, EventKind::Downloaded, Some(done)),
        ev(3, EventKind::Installed, None),
        ev(4, EventKind::Rebooting, None),
        ev(5, EventKind::Committed, None),
    ])
    .await;
    let v: DeviceView = serde_json::from_value(ts.admin.device_get("dev").await.unwrap()).unwrap();
    let m = &v.rollouts[0];
    assert_eq!(m.bytes_verified, total, "bytes verified lost at commit");
    let kinds: Vec<EventKind> = v.history.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::DownloadStarted,
            EventKind::Downloaded,
            EventKind::Installed,
            EventKind::Rebooting,
            EventKind::Committed
        ]
    );
    // The human form counts waves as `rollout status` does.
    let st = ts.status(&r.id).await;
    let shown = ota_server::render::device(&v, ota_server::now_ms());
    assert!(
        shown.contains(&format!("wave {}", st.waves[m.wave].wave)),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("{total} bytes verified")),
        "{shown}"
    );
    assert!(!shown.contains("last_seen_ms"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_status_shows_the_top_failure_reasons() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let reasons = [
        "disk full",
        "disk full",
        "disk full",
        "bad signature",
        "health check failed",
    ];
    let mut devices = Vec::new();
    for i in 0..reasons.len() {
        devices.push(Sim::enroll(&ts.base, &format!("d{i}"), "t", &http).await);
    }
    let mut s = spec("2.0", "t");
    s.min_sample = 100;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    for (d, reason) in devices.iter().zip(reasons) {
        let o = admitted(d).await;
        d.events(vec![Event {
            seq: 1,
            update_id: o.update_id.clone(),
            kind: EventKind::Failed,
            at: "2026-11-26T00:00:00Z".into(),
            detail: EventDetail {
                reason: Some(reason.to_string()),
                ..Default::default()
            },
        }])
        .await;
    }
    let st = ts.status(&r.id).await;
    let got: Vec<(&str, u64)> = st
        .failure_reasons
        .iter()
        .map(|f| (f.reason.as_str(), f.devices))
        .collect();
    assert_eq!(
        got,
        [
            ("disk full", 3),
            ("bad signature", 1),
            ("health check failed", 1)
        ]
    );
    let shown = ota_server::client::render_status(&st);
    assert!(shown.contains("top failure reasons"), "{shown}");
    assert!(shown.contains("       3  disk full"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_admin_token_is_called_that_not_a_device_enrollment_problem() {
    let ts = TestServer::start(&fast_checkin(5000)).await;
    let bad = ota_server::client::AdminClient::new(&ts.base, "wrong-token").unwrap();
    let e = format!("{:#}", bad.releases().await.unwrap_err());
    assert!(e.contains("admin_token"), "{e}");
    assert!(!e.contains("enroll"), "{e}");
    let r = http()
        .get(format!("{}/api/v1/admin/devices", ts.base))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let e: ApiError = r.json().await.unwrap();
    assert!(e.error.contains("admin token"), "{}", e.error);
    assert!(!e.error.contains("enroll"), "{}", e.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_device_revokes_its_token_but_not_mid_update() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let busy = Sim::enroll(&ts.base, "busy", "t", &http).await;
    let idle = Sim::enroll(&ts.base, "idle", "t", &http).await;
    ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    admitted(&busy).await;
    let e = format!("{:#}", ts.admin.device_retire("busy").await.unwrap_err());
    assert!(
        e.contains("409") && e.contains("middle of an update"),
        "{e}"
    );
    assert!(
        ts.admin.device_get("busy").await.is_ok(),
        "refused, yet changed"
    );

    ts.admin.device_retire("idle").await.unwrap();
    let e = format!("{:#}", ts.admin.device_get("idle").await.unwrap_err());
    assert!(e.contains("404"), "{e}");
    let r = http
        .post(format!("{}/api/v1/devices/checkin", ts.base))
        .bearer_auth(&idle.token)
        .json(&idle_request("1.0", ota_format::manifest::codecs()))
        .send()
        .await
        .unwrap();
    // PostgreSQL replicas may honour a cached token for a few seconds; the
    // replica that retired it forgets it at once.
    assert_eq!(
        r.status().as_u16(),
        401,
        "a retired device's token still works"
    );
    let e = format!("{:#}", ts.admin.device_retire("idle").await.unwrap_err());
    assert!(e.contains("404") && e.contains("no device idle"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_release_is_refused_while_in_use_and_says_what_to_do() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev", "t", &http()).await;
    d.checkin("1.0", AgentState::Idle, None).await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();

    // 2.0: a live rollout offers it.
    let e = format!(
        "{:#}",
        ts.admin.release_delete("t", "2.0").await.unwrap_err()
    );
    assert!(
        e.contains("409") && e.contains(&format!("rollout abort {}", r.id)),
        "{e}"
    );
    // 1.0: a device runs it (the base of its delta).
    let e = format!(
        "{:#}",
        ts.admin.release_delete("t", "1.0").await.unwrap_err()
    );
    assert!(
        e.contains("409") && e.contains("still run 1.0") && e.contains("dev"),
        "{e}"
    );
    assert_eq!(
        ts.admin.releases().await.unwrap().len(),
        2,
        "refused, yet changed"
    );
    let e = format!(
        "{:#}",
        ts.admin.release_delete("t", "9.9").await.unwrap_err()
    );
    assert!(e.contains("404"), "{e}");

    // Once the rollout is aborted and the device is on 2.0, 1.0 can go.
    ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    d.checkin("2.0", AgentState::Idle, None).await;
    let img = ts
        .admin
        .releases()
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.version == "1.0")
        .unwrap()
        .image_sha256;
    ts.admin.release_delete("t", "1.0").await.unwrap();
    let left: Vec<String> = ts
        .admin
        .releases()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(left, ["2.0"]);
    let image_file = ts.dir.path().join("data/images").join(img.to_hex());
    assert!(
        !image_file.exists(),
        "the deleted release's image stayed at {}",
        image_file.display()
    );
}

/// Deleting the newest release changes the signed freshness statement (the
/// merge of `keys` and `cli`: `Releases::delete` did not bump the catalogue
/// generation the statement cache is keyed on, so devices kept being told
/// of a release that no longer exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_newest_release_updates_the_freshness_statement() {
    let ts = TestServer::with_two_releases(5000).await;
    let key = std::fs::read_to_string(ts.dir.path().join("signing.key")).unwrap();
    let key = ota_format::SigningKeyPair::from_pem(&key).unwrap();
    let trusted = ota_format::TrustedKeys::try_new([key.verifying_key()], 1).unwrap();
    let d = Sim::enroll(&ts.base, "dev", "t", &http()).await;
    let latest = |r: CheckinResponse| {
        ota_format::Freshness::open(r.freshness.as_ref().expect("a statement"), &trusted)
            .unwrap()
            .latest_version
    };
    let r = d.checkin("1.0", AgentState::Idle, None).await;
    assert_eq!(latest(r).as_deref(), Some("2.0"));
    ts.admin.release_delete("t", "2.0").await.unwrap();
    let r = d.checkin("1.0", AgentState::Idle, None).await;
    assert_eq!(
        latest(r).as_deref(),
        Some("1.0"),
        "the statement still names the deleted release"
    );
}

/// A device that echoes the statement it holds gets answers without it
/// (~420 of ~500 bytes per check-in); one that echoes an older statement,
/// or none, gets the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freshness_statement_the_device_holds_is_left_out_of_the_answer() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev", "t", &http()).await;
    let held = d
        .checkin("1.0", AgentState::Idle, None)
        .await
        .freshness
        .expect("a statement");
    let checkin = |echo: Option<ota_format::Digest>| {
        let req = CheckinRequest {
            freshness_held: echo,
            ..idle_request("1.0", Codecs::NONE)
        };
        let d = &d;
        async move {
            let body = d.checkin_raw(&req).await;
            let resp: CheckinResponse = serde_json::from_slice(&body).unwrap();
            (resp, body.len())
        }
    };
    let (with, full) = checkin(None).await;
    assert_eq!(with.freshness.as_ref(), Some(&held));
    let (without, short) = checkin(Some(held.payload_digest())).await;
    assert_eq!(without.freshness, None, "the held statement was sent again");
    assert!(short + 300 < full, "{short} vs {full} bytes");
    // Another statement held (an older one): the current one is sent.
    let (other, _) = checkin(Some(ota_format::Digest::of(b"an older statement"))).await;
    assert_eq!(other.freshness.as_ref(), Some(&held));
}
