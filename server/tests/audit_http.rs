//! Issue 14 items 2 and 3 over real HTTP: named admin users with roles the
//! API enforces, the audit log of every changing admin request (who, what,
//! when, from where; refused attempts too), device history with paging,
//! all surviving a restart. Included by `rollout_pg` for PostgreSQL.

#[path = "common/mod.rs"]
mod common;

use common::*;
use ota_format::api::*;
use ota_server::audit::Role;
use ota_server::client::AdminClient;
use ota_server::rollout::RolloutState;

async fn user(ts: &TestServer, name: &str, role: Role) -> AdminClient {
    let u = ts.admin.user_create(name, role).await.unwrap();
    let token = u["token"].as_str().unwrap();
    assert_eq!(token.len(), 64);
    AdminClient::new(&ts.base, token).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_by_the_api_and_every_change_is_audited() {
    let ts = TestServer::with_two_releases(5000).await;
    let viewer = user(&ts, "vera", Role::Viewer).await;
    let operator = user(&ts, "otto", Role::Operator).await;

    // A viewer reads, and cannot change anything.
    assert!(viewer.rollouts().await.unwrap().is_empty());
    let e = viewer
        .rollout_create(&spec("2.0", "t"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("403") && e.contains("vera has role viewer"),
        "{e}"
    );
    assert!(
        ts.admin.rollouts().await.unwrap().is_empty(),
        "nothing changed"
    );

    // An operator runs rollouts, with a reason that reaches the status...
    let r = operator.rollout_create(&spec("2.0", "t")).await.unwrap();
    let st = operator
        .rollout_action_why(&r.id, "pause", Some("canary logs look odd"))
        .await
        .unwrap();
    assert_eq!(st.state, RolloutState::Paused);
    assert_eq!(st.reason, "paused by otto: canary logs look odd");
    let e = viewer
        .rollout_action(&r.id, "resume")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403"), "a viewer cannot resume: {e}");
    // ... but cannot add devices or users (admin only).
    let e = operator
        .device_add("x1", "t", &Default::default(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") && e.contains("needs admin"), "{e}");
    assert!(operator.user_create("eve", Role::Admin).await.is_err());
    // An unknown token is a 401 and is not an identity.
    let nobody = AdminClient::new(&ts.base, "f00d".repeat(16).as_str()).unwrap();
    assert!(
        nobody
            .rollouts()
            .await
            .unwrap_err()
            .to_string()
            .contains("401")
    );

    // The log, newest first: who, what, from where, the answer.
    // (Without the two `release.add` entries of the set-up.)
    let log: Vec<_> = ts
        .admin
        .audit(None, 100)
        .await
        .unwrap()
        .entries
        .into_iter()
        .filter(|e| e.action != "release.add")
        .collect();
    let seen: Vec<(&str, &str, u16)> = log
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("otto", "user.create", 403),
            ("otto", "device.add", 403),
            ("vera", "rollout.resume", 403),
            ("otto", "rollout.pause", 200),
            ("otto", "rollout.create", 201),
            ("vera", "rollout.create", 403),
            ("admin", "user.create", 201),
            ("admin", "user.create", 201),
        ],
        "{log:#?}"
    );
    let pause = &log[3];
    assert_eq!(pause.role, Role::Operator);
    assert_eq!(pause.detail["reason"], "canary logs look odd");
    assert!(pause.from.starts_with("127.0.0.1:"), "{}", pause.from);
    assert_eq!(log[4].detail["release"], "2.0", "the rollout spec is kept");
    assert!(log.windows(2).all(|w| w[0].seq > w[1].seq));
    // Paging.
    let page = ts.admin.audit(None, 3).await.unwrap();
    assert_eq!(page.entries.len(), 3);
    let rest = ts.admin.audit(page.next_before, 100).await.unwrap();
    assert_eq!(
        rest.entries.len(),
        log.len() - 3 + 2,
        "and the set-up's two"
    );
    assert_eq!(rest.entries[0].seq, log[3].seq);

    // A deleted user's token stops at once.
    ts.admin.user_delete("otto").await.unwrap();
    assert!(
        operator
            .rollouts()
            .await
            .unwrap_err()
            .to_string()
            .contains("401")
    );
    let users = ts.admin.users().await.unwrap();
    assert_eq!(users.len(), 1);
    assert!(users[0].get("token").is_none() && users[0].get("token_sha256").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tokens_are_shown_once_and_secrets_never_reach_the_log() {
    let ts = TestServer::with_two_releases(5000).await;
    let u = ts.admin.user_create("ann", Role::Admin).await.unwrap();
    let token = u["token"].as_str().unwrap().to_string();
    let e = ts
        .admin
        .user_create("ann", Role::Viewer)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("409") && e.contains("exists already"), "{e}");
    let e = ts
        .admin
        .user_create("admin", Role::Viewer)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("bootstrap identity"), "{e}");
    // device add answers with the device's token: the log keeps the
    // request (no secret in it), never an answer.
    let ann = AdminClient::new(&ts.base, &token).unwrap();
    ann.device_add("d1", "t", &Default::default(), false)
        .await
        .unwrap();
    let log = ts.admin.audit(None, 100).await.unwrap();
    let text = serde_json::to_string(&log).unwrap();
    assert!(!text.contains(&token), "a user token in the audit log");
    assert_eq!(log.entries[0].action, "device.add");
    assert_eq!(log.entries[0].actor, "ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_history_pages_every_stored_event_and_lists_the_attempts() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "dev-h", "t", &http()).await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let Action::Update(o) = d.checkin("1.0", AgentState::Idle, None).await.action else {
        panic!("admitted")
    };
    for k in [
        EventKind::DownloadStarted,
        EventKind::Progress,
        EventKind::Downloaded,
        EventKind::Installed,
        EventKind::Rebooting,
        EventKind::Committed,
    ] {
        d.event(&o.update_id, k).await;
    }
    let h = ts
        .admin
        .device_history("dev-h", None, 3, false)
        .await
        .unwrap();
    let kinds: Vec<&str> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["committed", "rebooting", "installed"]);
    assert_eq!(h["attempts"][0]["update_id"], o.update_id);
    assert_eq!(h["attempts"][0]["phase"], "committed");
    let older = ts
        .admin
        .device_history("dev-h", h["next_before"].as_u64(), 10, false)
        .await
        .unwrap();
    let kinds: Vec<&str> = older["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["downloaded", "download-started"],
        "progress left out"
    );
    let all = ts
        .admin
        .device_history("dev-h", None, 10, true)
        .await
        .unwrap();
    assert_eq!(all["events"].as_array().unwrap().len(), 6);
    assert!(
        ts.admin
            .device_history("nope", None, 10, false)
            .await
            .is_err()
    );
    let _ = r;
}

/// The audit log and users survive a restart (sled here; PostgreSQL in
/// `rollout_pg`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_and_users_survive_a_restart() {
    let mut ts = TestServer::with_two_releases(5000).await;
    let u = ts.admin.user_create("sam", Role::Operator).await.unwrap();
    let token = u["token"].as_str().unwrap().to_string();
    ts.restart().await;
    let sam = AdminClient::new(&ts.base, &token).unwrap();
    sam.rollout_create(&spec("2.0", "t")).await.unwrap();
    let log = ts.admin.audit(None, 10).await.unwrap().entries;
    let seen: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("sam", "rollout.create"),
            ("admin", "user.create"),
            ("admin", "release.add"),
            ("admin", "release.add")
        ]
    );
}
