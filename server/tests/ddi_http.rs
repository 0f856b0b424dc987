//! The hawkBit DDI device API over real sockets, with a plain HTTP client:
//! protocol details (links, hashes, Range, feedback, errors) and that DDI
//! targets live under the same rollout throttle as agents.

mod common;

use common::*;
use ota_format::api::{Action, AgentState};

const IMG_SWU: &str = "fw-2.0.0.swu";

fn bundle_bytes() -> Vec<u8> {
    image(25, 9)[..100_003].to_vec()
}

async fn server_with_bundle(lease_ms: u64) -> TestServer {
    let ts = TestServer::start(&fast_checkin(lease_ms)).await;
    bundle_release(&ts, "swt", "2.0.0", IMG_SWU, &bundle_bytes()).await;
    ts
}

/// Whether a base poll offers no action (it may still ask for configData).
fn no_action(p: &serde_json::Value) -> bool {
    p["_links"]["deploymentBase"].is_null() && p["_links"]["cancelAction"].is_null()
}

fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::Digest as _;
    hex::encode(sha1::Sha1::digest(bytes))
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest as _;
    hex::encode(md5::Md5::digest(bytes))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn ddi_target_is_admitted_downloads_verified_bytes_with_range_and_commits_by_feedback() {
    let ts = server_with_bundle(10_000).await;
    let h = http();
    let t = Ddi::enroll(&ts.base, "swu-1", "swt", &h).await;
    // Before any rollout: nothing to do, a paced sleep, no links.
    let p = t.poll().await;
    assert!(no_action(&p), "{p}");
    let sleep = p["config"]["polling"]["sleep"].as_str().unwrap();
    assert!(
        sleep.len() == 8 && sleep.as_bytes()[2] == b':',
        "HH:MM:SS: {sleep}"
    );
    let st = ts
        .admin
        .rollout_create(&spec("2.0.0", "swt"))
        .await
        .unwrap();

    let p = t.poll().await;
    let href = p["_links"]["deploymentBase"]["href"].as_str().unwrap();
    assert!(
        href.starts_with(&format!(
            "{}/DEFAULT/controller/v1/swu-1/deploymentBase/",
            ts.base
        )),
        "absolute link: {href}"
    );
    let action = href.rsplit('/').next().unwrap().to_string();
    let id: i64 = action.parse().unwrap();
    assert!(id > 0 && id <= i32::MAX as i64, "a C int: {id}");

    let db: serde_json::Value = t.deployment(&action).await;
    assert_eq!(db["id"], action);
    assert_eq!(db["deployment"]["download"], "forced");
    assert_eq!(db["deployment"]["update"], "forced");
    let chunk = &db["deployment"]["chunks"][0];
    assert_eq!(chunk["part"], "os");
    assert_eq!(chunk["version"], "2.0.0");
    let a = &chunk["artifacts"][0];
    let bytes = bundle_bytes();
    assert_eq!(a["filename"], IMG_SWU);
    assert_eq!(a["size"], bytes.len() as u64);
    assert_eq!(a["hashes"]["sha1"], sha1_hex(&bytes));
    assert_eq!(a["hashes"]["md5"], md5_hex(&bytes));
    assert_eq!(a["hashes"]["sha256"], sha256_hex(&bytes));
    let dl = a["_links"]["download-http"]["href"].as_str().unwrap();

    // A resumed download: a range, then the rest.
    let auth = format!("TargetToken {}", t.token);
    let r = h
        .get(dl)
        .header("Authorization", &auth)
        .header("Range", "bytes=0-999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let mut got = r.bytes().await.unwrap().to_vec();
    let r = h
        .get(dl)
        .header("Authorization", &auth)
        .header("Range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    got.extend_from_slice(&r.bytes().await.unwrap());
    assert_eq!(got, bytes);

    assert_eq!(
        t.feedback(&action, "proceeding", "none", &["installing"])
            .await,
        200
    );
    assert_eq!(ts.status(&st.id).await.waves[0].downloading, 1);
    assert_eq!(
        t.feedback(&action, "closed", "success", &["Update Installed."])
            .await,
        200
    );
    let s = ts.status(&st.id).await;
    assert_eq!((s.waves[0].installed, s.waves[0].committed), (1, 1));
    assert_eq!(s.active_leases, 0, "the lease is released at the close");
    let view = ts.admin.device_get("swu-1").await.unwrap();
    assert_eq!(view["version"], "2.0.0", "{view}");
    // Done: no more action, and the closed action takes no more feedback.
    assert!(no_action(&t.poll().await));
    assert_eq!(
        t.feedback(&action, "closed", "failure", &["late"]).await,
        410
    );
    // Nor is the bundle served once the lease is gone.
    let r = h
        .get(dl)
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test]
async fn ddi_auth_refuses_anonymous_wrong_tokens_other_targets_and_unknown_tenants() {
    let gw = "gw-0123456789abcdef";
    let ts = TestServer::start(&format!(
        "{}[ddi]\ngateway_token = \"{gw}\"\n",
        fast_checkin(10_000)
    ))
    .await;
    let h = http();
    let a = Ddi::enroll(&ts.base, "swu-a", "swt", &h).await;
    let b = Ddi::enroll(&ts.base, "swu-b", "swt", &h).await;
    let call = |url: String, auth: Option<String>| {
        let h = h.clone();
        async move {
            let mut r = h.get(url);
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            let r = r.send().await.unwrap();
            let code = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (code, body)
        }
    };
    let (code, body) = call(a.url(""), None).await;
    assert_eq!(code, 401);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("anonymous access is off"),
        "{body}"
    );
    assert!(
        body["errorCode"]
            .as_str()
            .unwrap()
            .starts_with("hawkbit.server.error.")
    );
    let (code, _) = call(a.url(""), Some("TargetToken nope".into())).await;
    assert_eq!(code, 401);
    let (code, body) = call(a.url(""), Some(format!("TargetToken {}", b.token))).await;
    assert_eq!(code, 403, "{body}");
    let (code, _) = call(
        format!("{}/other/controller/v1/swu-a", ts.base),
        Some(format!("TargetToken {}", a.token)),
    )
    .await;
    assert_eq!(code, 404);
    // Tenants compare without case, as hawkBit's do.
    let (code, _) = call(
        format!("{}/default/controller/v1/swu-a", ts.base),
        Some(format!("TargetToken {}", a.token)),
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = call(a.url(""), Some(format!("GatewayToken {gw}"))).await;
    assert_eq!(code, 200);
    let (code, _) = call(a.url(""), Some("GatewayToken wrong-but-long-enough".into())).await;
    assert_eq!(code, 401);
    let (code, body) = call(
        format!("{}/DEFAULT/controller/v1/never-added", ts.base),
        Some(format!("GatewayToken {gw}")),
    )
    .await;
    assert_eq!(code, 404);
    assert!(
        body["message"].as_str().unwrap().contains("device add"),
        "{body}"
    );
    // Malformed feedback: a clear 400 that names the accepted values.
    let r = h
        .post(a.url("/deploymentBase/1/feedback"))
        .header("Authorization", format!("TargetToken {}", a.token))
        .body(r#"{"status": {"execution": "finished", "result": {"finished": "success"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("proceeding"),
        "{body}"
    );
}

#[tokio::test]
async fn throttled_ddi_target_gets_no_deployment_and_cannot_download_and_closed_failure_pauses_the_rollout()
 {
    let ts = server_with_bundle(10_000).await;
    let h = http();
    let t1 = Ddi::enroll(&ts.base, "swu-1", "swt", &h).await;
    let t2 = Ddi::enroll(&ts.base, "swu-2", "swt", &h).await;
    let mut sp = spec("2.0.0", "swt");
    sp.max_concurrent = 1;
    sp.min_sample = 1;
    sp.failure_threshold = 0.5;
    let st = ts.admin.rollout_create(&sp).await.unwrap();
    let a1 = t1.action("deploymentBase").await.expect("t1 admitted");
    // The cap is taken: t2 is told nothing to do, and sooner than idle.
    let p2 = t2.poll().await;
    assert!(no_action(&p2), "throttled: {p2}");
    // t2 cannot fetch the bundle by guessing the link either.
    let db: serde_json::Value = t1.deployment(&a1).await;
    let dl = Ddi::download_link(&db).replace("/swu-1/", "/swu-2/");
    let r = h
        .get(&dl)
        .header("Authorization", format!("TargetToken {}", t2.token))
        .send()
        .await
        .unwrap();
    assert!(
        r.status() == 404 || r.status() == 409,
        "no lease, no bytes: {}",
        r.status()
    );
    // t1's install fails: counted, and the threshold pauses the rollout.
    assert_eq!(
        t1.feedback(&a1, "closed", "failure", &["ERROR : hash mismatch"])
            .await,
        200
    );
    let s = ts.status(&st.id).await;
    assert_eq!(s.waves[0].failed, 1);
    assert_eq!(
        s.state,
        ota_server::rollout::RolloutState::Paused,
        "{}",
        s.reason
    );
    assert!(
        s.failure_reasons
            .iter()
            .any(|r| r.reason.contains("hash mismatch")),
        "{:?}",
        s.failure_reasons
    );
    // Paused: t2 still gets nothing.
    assert!(no_action(&t2.poll().await));
}

#[tokio::test]
async fn aborted_rollout_cancels_a_downloading_ddi_target() {
    let ts = server_with_bundle(10_000).await;
    let h = http();
    let t = Ddi::enroll(&ts.base, "swu-1", "swt", &h).await;
    let st = ts
        .admin
        .rollout_create(&spec("2.0.0", "swt"))
        .await
        .unwrap();
    let a = t.action("deploymentBase").await.expect("admitted");
    ts.admin.rollout_action(&st.id, "abort").await.unwrap();
    let c = t.action("cancelAction").await.expect("cancel linked");
    assert_eq!(c, a, "the cancel names the action");
    let ca: serde_json::Value = t
        .get(&format!("/cancelAction/{c}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ca["cancelAction"]["stopId"], a);
    let r = h
        .post(t.url(&format!("/cancelAction/{c}/feedback")))
        .header("Authorization", format!("TargetToken {}", t.token))
        .json(&serde_json::json!({"id": c, "status": {"execution": "closed", "result": {"finished": "success"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let db: serde_json::Value = t.deployment(&a).await;
    assert_eq!(db["deployment"]["download"], "skip");
    assert_eq!(ts.status(&st.id).await.active_leases, 0);
}

#[tokio::test]
async fn agents_are_never_offered_a_ddi_bundle() {
    let ts = server_with_bundle(10_000).await;
    let h = http();
    let agent = Sim::enroll(&ts.base, "agent-1", "swt", &h).await;
    ts.admin
        .rollout_create(&spec("2.0.0", "swt"))
        .await
        .unwrap();
    let r = agent.checkin("1.0.0", AgentState::Idle, None).await;
    assert!(
        !matches!(r.action, Action::Update(_)),
        "an agent must not get a .swu as its payload: {:?}",
        r.action
    );
}

#[tokio::test]
async fn config_data_becomes_ddi_tags_that_rollout_selectors_match() {
    let ts = server_with_bundle(10_000).await;
    let h = http();
    let mut tags = std::collections::BTreeMap::new();
    tags.insert("site".to_string(), "lab".to_string());
    let a = Sim::enroll_tagged(&ts.base, "swu-a", "swt", tags.clone(), &h).await;
    let b = Sim::enroll_tagged(&ts.base, "swu-b", "swt", tags, &h).await;
    let ta = Ddi {
        id: a.id,
        token: a.token,
        base: ts.base.clone(),
        http: h.clone(),
    };
    let tb = Ddi {
        id: b.id,
        token: b.token,
        base: ts.base.clone(),
        http: h.clone(),
    };
    // No attributes yet: the poll asks for them, as hawkBit's does.
    let p = ta.poll().await;
    let cd = p["_links"]["configData"]["href"]
        .as_str()
        .expect("configData link")
        .to_string();
    let put = |t: &Ddi, url: String, body: serde_json::Value| {
        let r = t
            .http
            .put(url)
            .header("Authorization", format!("TargetToken {}", t.token));
        async move { r.json(&body).send().await.unwrap().status().as_u16() }
    };
    let body =
        serde_json::json!({"data": {"hwRevision": "2", "serial": "has spaces"}, "mode": "merge"});
    assert_eq!(put(&ta, cd.clone(), body).await, 200);
    let view = ts.admin.device_get("swu-a").await.unwrap();
    assert_eq!(view["tags"]["ddi.hwRevision"], "2", "{view}");
    assert_eq!(view["tags"]["site"], "lab", "operator tags stay");
    assert!(
        view["tags"].get("ddi.serial").is_none(),
        "a value no tag can hold is skipped"
    );
    // Stored: the poll no longer asks.
    assert!(ta.poll().await["_links"]["configData"].is_null());
    // replace drops the target's other attributes, never the operator's.
    let body = serde_json::json!({"data": {"board": "x1"}, "mode": "replace"});
    assert_eq!(put(&ta, cd.clone(), body).await, 200);
    let view = ts.admin.device_get("swu-a").await.unwrap();
    assert!(view["tags"].get("ddi.hwRevision").is_none(), "{view}");
    assert_eq!(
        (
            view["tags"]["ddi.board"].as_str(),
            view["tags"]["site"].as_str()
        ),
        (Some("x1"), Some("lab"))
    );
    let bad = serde_json::json!({"data": {}, "mode": "upsert"});
    assert_eq!(put(&ta, cd.clone(), bad).await, 400);
    // A rollout selecting on the attribute admits only the target that has it.
    let mut sp = spec("2.0.0", "swt");
    sp.selector.insert("ddi.board".into(), "x1".into());
    ts.admin.rollout_create(&sp).await.unwrap();
    assert!(
        ta.action("deploymentBase").await.is_some(),
        "selected by its attribute"
    );
    assert!(no_action(&tb.poll().await), "not selected");
}

#[tokio::test]
async fn closed_failure_within_retries_gets_a_new_action_on_the_next_poll() {
    let ts = server_with_bundle(10_000).await;
    let t = Ddi::enroll(&ts.base, "swu-r", "swt", &http()).await;
    let mut sp = spec("2.0.0", "swt");
    sp.max_retries = 1;
    let st = ts.admin.rollout_create(&sp).await.unwrap();
    let first = t.action("deploymentBase").await.expect("admitted");
    assert_eq!(
        t.feedback(&first, "closed", "failure", &["flash error"])
            .await,
        200
    );
    let second = t.action("deploymentBase").await.expect("retried");
    assert_ne!(first, second, "a retry is a new action");
    assert_eq!(t.feedback(&second, "closed", "success", &[]).await, 200);
    let s = ts.status(&st.id).await;
    assert_eq!((s.waves[0].committed, s.waves[0].failed), (1, 0));
    assert_eq!(s.leases_granted, 2);
}

#[tokio::test]
async fn a_quiet_ddi_target_loses_its_lease_to_the_next_in_line() {
    // 1 s leases: the shortest the config allows.
    let ts = server_with_bundle(1_000).await;
    let h = http();
    let quiet = Ddi::enroll(&ts.base, "swu-q", "swt", &h).await;
    let next = Ddi::enroll(&ts.base, "swu-n", "swt", &h).await;
    let mut sp = spec("2.0.0", "swt");
    sp.max_concurrent = 1;
    sp.max_retries = 0;
    let st = ts.admin.rollout_create(&sp).await.unwrap();
    let a = quiet.action("deploymentBase").await.expect("admitted");
    let db: serde_json::Value = quiet.deployment(&a).await;
    let dl = Ddi::download_link(&db);
    assert!(no_action(&next.poll().await), "the cap is taken");
    // The quiet target sends nothing; the other keeps polling.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if next.action("deploymentBase").await.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never moved: {:?}",
            ts.status(&st.id).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The expiry is counted (PostgreSQL: by the periodic reaper, so a
    // moment after the slot moved).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ts.status(&st.id).await.leases_expired != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "expiry not counted: {:?}",
            ts.status(&st.id).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The quiet one no longer gets bytes.
    let r = h
        .get(&dl)
        .header("Authorization", format!("TargetToken {}", quiet.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

/// `config.polling.sleep` as seconds.
fn sleep_secs(p: &serde_json::Value) -> u64 {
    let s = p["config"]["polling"]["sleep"].as_str().unwrap();
    let v: Vec<u64> = s.split(':').map(|x| x.parse().unwrap()).collect();
    v[0] * 3600 + v[1] * 60 + v[2]
}

#[tokio::test]
async fn a_throttled_target_near_the_head_of_the_queue_polls_sooner_than_a_held_back_one() {
    // A 40 s wait interval (±20 % jitter); near the head: a quarter.
    let ts = TestServer::start(
        "[checkin]\nidle_interval_ms = 60000\nwait_interval_ms = 40000\nlease_ms = 30000\njitter = 0.2\n",
    )
    .await;
    bundle_release(&ts, "swt", "2.0.0", IMG_SWU, &bundle_bytes()).await;
    let h = http();
    let holder = Ddi::enroll(&ts.base, "swu-h", "swt", &h).await;
    let queued = Ddi::enroll(&ts.base, "swu-q", "swt", &h).await;
    let mut sp = spec("2.0.0", "swt");
    sp.max_concurrent = 1;
    let st = ts.admin.rollout_create(&sp).await.unwrap();
    let p = holder.poll().await;
    assert!(!p["_links"]["deploymentBase"].is_null());
    let lease_renewal = sleep_secs(&p);
    assert!(
        lease_renewal <= 12,
        "a lease holder polls within lease/3 (+ jitter): {lease_renewal}"
    );
    let p = queued.poll().await;
    assert!(no_action(&p));
    let near = sleep_secs(&p);
    assert!((8..=12).contains(&near), "near the head: ~10 s, got {near}");
    ts.admin.rollout_action(&st.id, "pause").await.unwrap();
    let p = queued.poll().await;
    assert!(no_action(&p));
    let held = sleep_secs(&p);
    assert!((32..=48).contains(&held), "paused: ~40 s, got {held}");
}

#[tokio::test]
async fn ddi_targets_are_held_to_the_start_rate() {
    let ts = server_with_bundle(10_000).await;
    let h = http();
    let mut targets = Vec::new();
    for i in 0..3 {
        targets.push(Ddi::enroll(&ts.base, &format!("swu-{i}"), "swt", &h).await);
    }
    let mut sp = spec("2.0.0", "swt");
    sp.max_concurrent = 10;
    sp.max_starts_per_min = 6.0; // a burst of one, then one per 10 s
    let st = ts.admin.rollout_create(&sp).await.unwrap();
    let mut admitted = 0;
    for t in &targets {
        if t.action("deploymentBase").await.is_some() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 1, "the cap has room, the start rate has not");
    assert_eq!(ts.status(&st.id).await.active_leases, 1);
}

/// Issue 16 item 4: one release carries the agents' image (full and delta
/// builds) and a `.swu` attached to it; one rollout then serves both kinds
/// of device of one type, under one cap.
#[tokio::test]
async fn one_rollout_serves_agents_their_delta_and_ddi_targets_the_attached_bundle_under_one_cap() {
    let ts = TestServer::with_two_releases(10_000).await; // type "t": 1.0, 2.0
    let p = ts.dir.path().join("t-2.0.swu");
    let swu = bundle_bytes();
    std::fs::write(&p, &swu).unwrap();
    let rec = ts
        .admin
        .release_add_bundle(
            "t",
            "2.0",
            0,
            ota_server::releases::bundle::BundleFormat::Swu,
            Some("t-2.0.swu"),
            None,
            true,
            &p,
            false,
        )
        .await
        .unwrap();
    assert!(rec.bundle.is_some());
    assert!(
        rec.builds.len() >= 3,
        "image full + delta + bundle: {:?}",
        rec.builds
    );
    let h = http();
    let agent = Sim::enroll(&ts.base, "agent-1", "t", &h).await;
    let target = Ddi::enroll(&ts.base, "swu-1", "t", &h).await;
    let mut sp = spec("2.0", "t");
    sp.max_concurrent = 1;
    let st = ts.admin.rollout_create(&sp).await.unwrap();

    let r = agent.checkin("1.0", AgentState::Idle, None).await;
    let Action::Update(offer) = r.action else {
        panic!("agent not admitted: {:?}", r.action)
    };
    assert_eq!(
        offer.from_version.as_deref(),
        Some("1.0"),
        "the agent gets its delta"
    );
    assert_ne!(offer.payload_sha256.to_string(), sha256_hex(&swu));
    // One cap for both kinds: the DDI target waits for the agent's slot.
    assert!(no_action(&target.poll().await));
    agent
        .event(&offer.update_id, ota_format::api::EventKind::Committed)
        .await;
    let a = target
        .action("deploymentBase")
        .await
        .expect("the slot moved to the target");
    let db: serde_json::Value = target.deployment(&a).await;
    let art = &db["deployment"]["chunks"][0]["artifacts"][0];
    assert_eq!(art["hashes"]["sha256"], sha256_hex(&swu));
    assert_eq!(art["filename"], "t-2.0.swu");
    let s = ts.status(&st.id).await;
    assert_eq!((s.leases_granted, s.active_leases), (2, 1));
}

/// hawkBit links a target's last successful action as `installedBase`: the
/// poll names the action that installed what the target runs, and
/// `installedBase/{actionId}` shows its deployment; no other action.
#[tokio::test]
async fn installed_base_links_the_action_that_installed_the_running_version() {
    let ts = server_with_bundle(10_000).await;
    let t = Ddi::enroll(&ts.base, "swu-ib", "swt", &http()).await;
    assert!(
        t.poll().await["_links"]["installedBase"].is_null(),
        "nothing installed through us yet"
    );
    ts.admin
        .rollout_create(&spec("2.0.0", "swt"))
        .await
        .unwrap();
    let action = t.action("deploymentBase").await.expect("admitted");
    assert!(
        t.poll().await["_links"]["installedBase"].is_null(),
        "still downloading"
    );
    assert_eq!(
        t.feedback(&action, "closed", "success", &["done"]).await,
        200
    );
    let p = t.poll().await;
    let href = p["_links"]["installedBase"]["href"]
        .as_str()
        .unwrap_or_else(|| panic!("no installedBase link: {p}"));
    assert_eq!(href, t.url(&format!("/installedBase/{action}")));
    let r = t.get(&format!("/installedBase/{action}")).await;
    assert_eq!(r.status(), 200);
    let ib: serde_json::Value = r.json().await.unwrap();
    assert_eq!(ib["id"], action);
    assert_eq!(ib["deployment"]["chunks"][0]["version"], "2.0.0");
    assert_eq!(
        ib["deployment"]["chunks"][0]["artifacts"][0]["filename"],
        IMG_SWU
    );
    let other = (action.parse::<u32>().unwrap() ^ 1).to_string();
    assert_eq!(
        t.get(&format!("/installedBase/{other}")).await.status(),
        404
    );
}

/// Found by the 127k-device load test with DDI targets: a DDI client
/// downloads its bundle in one GET and says nothing until it is done, and
/// the lease was renewed only when the GET started. A transfer longer than
/// `lease_ms` lost its lease half-way: the slot went to the next target
/// while this one still downloaded (the cap, in reality, exceeded) and its
/// success was refused. Now the lease is renewed while the body streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_longer_than_the_lease_keeps_its_lease_while_it_streams() {
    let ts = TestServer::start(&fast_checkin(2000)).await;
    let bundle: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    bundle_release(&ts, "swt", "2.0.0", IMG_SWU, &bundle).await;
    let h = http();
    let slow = Ddi::enroll(&ts.base, "swu-slow", "swt", &h).await;
    let next = Ddi::enroll(&ts.base, "swu-next", "swt", &h).await;
    let mut s = spec("2.0.0", "swt");
    s.max_concurrent = 1;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let action = slow.action("deploymentBase").await.expect("admitted");
    let dl = Ddi::download_link(&slow.deployment(&action).await);
    let mut resp = h
        .get(&dl)
        .header("Authorization", format!("TargetToken {}", slow.token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Read at about 2 MiB/s: some 8 s, four lease terms.
    let started = std::time::Instant::now();
    let mut got = 0usize;
    let mut sha = <sha2::Sha256 as sha2::Digest>::new();
    let mut last_poll = std::time::Instant::now();
    while let Some(c) = resp.chunk().await.unwrap() {
        sha2::Digest::update(&mut sha, &c);
        got += c.len();
        let due = std::time::Duration::from_secs_f64(got as f64 / (2 << 20) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if last_poll.elapsed() > std::time::Duration::from_millis(300) {
            last_poll = std::time::Instant::now();
            let p = next.poll().await;
            if !p["_links"]["deploymentBase"].is_null() {
                let st = ts.status(&r.id).await;
                panic!(
                    "the slot was given away {:?} into a transfer that still runs ({got} bytes read): leases expired {}, failure reasons {:?}",
                    started.elapsed(),
                    st.leases_expired,
                    st.failure_reasons
                );
            }
        }
    }
    assert_eq!(got, bundle.len());
    assert!(started.elapsed() > std::time::Duration::from_secs(6));
    assert_eq!(
        hex::encode(sha2::Digest::finalize(sha)),
        sha256_hex(&bundle)
    );
    assert_eq!(
        slow.feedback(&action, "closed", "success", &["installed"])
            .await,
        200
    );
    let st = ts.status(&r.id).await;
    assert_eq!(st.waves[0].committed, 1, "{st:?}");
    assert_eq!(st.leases_expired, 0);
    // The keeper's renewals record nothing about the target: past them the
    // server still knows the version it installed (a first keeper renewed
    // by check-ins and put back the version of when the GET started).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let view = ts.admin.device_get("swu-slow").await.unwrap();
    assert_eq!(view["version"], "2.0.0", "{view}");
}

/// hawkBit's maintenance window toward DDI targets (`ddi.download_ahead`):
/// outside the window a target is admitted, told `download: forced`,
/// `update: skip`, `maintenanceWindow: unavailable`; its `downloaded`
/// feedback frees the lease for the next target (the cap is 1) and leaves
/// it waiting; polls offer nothing while the window is closed and the same
/// action with `update: forced`, `maintenanceWindow: available` once it
/// opens, when the target may fetch the bundle again and installs.
#[tokio::test]
async fn with_download_ahead_a_ddi_target_downloads_outside_its_window_and_installs_inside() {
    let ts = TestServer::start(&format!(
        "{}\n[ddi]\ndownload_ahead = true\n",
        fast_checkin(10_000)
    ))
    .await;
    bundle_release(&ts, "swt", "2.0.0", IMG_SWU, &bundle_bytes()).await;
    let h = http();
    let a = Ddi::enroll(&ts.base, "mw-a", "swt", &h).await;
    let b = Ddi::enroll(&ts.base, "mw-b", "swt", &h).await;
    let mut s = spec("2.0.0", "swt");
    s.windows = vec![window_from_now(6.0)];
    s.max_concurrent = 1;
    let r = ts.admin.rollout_create(&s).await.unwrap();

    let act = a
        .action("deploymentBase")
        .await
        .expect("admitted outside the window");
    let db = a.deployment(&act).await;
    assert_eq!(db["deployment"]["download"], "forced", "{db}");
    assert_eq!(db["deployment"]["update"], "skip", "{db}");
    assert_eq!(db["deployment"]["maintenanceWindow"], "unavailable", "{db}");
    let dl = Ddi::download_link(&db);
    let got = a.fetch(&dl).await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), bundle_bytes());
    assert!(b.action("deploymentBase").await.is_none(), "the cap is 1");
    assert_eq!(a.feedback(&act, "downloaded", "none", &[]).await, 200);
    let st = ts.status(&r.id).await;
    assert_eq!(
        (st.active_leases, st.totals().waiting_for_window),
        (0, 1),
        "waiting for the window, without the lease: {st:?}"
    );
    // The freed slot goes to the next target; the waiting one is offered
    // nothing while the window is closed, and cannot fetch the bundle.
    assert!(
        b.action("deploymentBase").await.is_some(),
        "the slot was freed"
    );
    assert!(no_action(&a.poll().await));
    let r2 = a.fetch(&dl).await;
    assert_eq!(r2.status(), 409, "no fetching outside the window");

    ts.app()
        .state
        .window_clock()
        .set_offset_ms(6 * HOUR_MS + 60_000);
    let again = a
        .action("deploymentBase")
        .await
        .expect("offered inside the window");
    assert_eq!(again, act, "the same action");
    let db = a.deployment(&act).await;
    assert_eq!(db["deployment"]["update"], "forced", "{db}");
    assert_eq!(db["deployment"]["maintenanceWindow"], "available", "{db}");
    let got = a.fetch(&dl).await;
    assert_eq!(got.status(), 200, "fetched again to install");
    assert_eq!(got.bytes().await.unwrap().len(), bundle_bytes().len());
    assert_eq!(a.feedback(&act, "closed", "success", &[]).await, 200);
    let st = ts.status(&r.id).await;
    assert_eq!(st.totals().committed, 1, "{st:?}");
    assert_eq!(
        ts.admin.device_get("mw-a").await.unwrap()["version"],
        "2.0.0"
    );
}

/// Without `ddi.download_ahead` a DDI target (which may ignore
/// `update: skip`) is admitted only inside a window, and its deployment
/// carries no `maintenanceWindow`.
#[tokio::test]
async fn without_download_ahead_a_ddi_target_is_admitted_only_inside_a_window() {
    let ts = server_with_bundle(10_000).await;
    let a = Ddi::enroll(&ts.base, "mw-off", "swt", &http()).await;
    let mut s = spec("2.0.0", "swt");
    s.windows = vec![window_from_now(6.0)];
    ts.admin.rollout_create(&s).await.unwrap();
    assert!(no_action(&a.poll().await), "outside the window");
    ts.app()
        .state
        .window_clock()
        .set_offset_ms(6 * HOUR_MS + 60_000);
    let act = a.action("deploymentBase").await.expect("inside the window");
    let db = a.deployment(&act).await;
    assert_eq!(db["deployment"]["update"], "forced", "{db}");
    assert!(db["deployment"]["maintenanceWindow"].is_null(), "{db}");
}
