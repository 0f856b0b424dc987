//! Issue 15, groups (named, saved selectors) over real HTTP on 127.0.0.1:
//! creation and its errors, a rollout targeting a group, and the refusal to
//! delete a group a live rollout targets. `rollout_pg` runs this suite on
//! PostgreSQL too.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::*;
use ota_format::api::*;
use ota_server::groups::Group;

fn tags(site: &str) -> BTreeMap<String, String> {
    [("site".to_string(), site.to_string())]
        .into_iter()
        .collect()
}

fn group(name: &str, device_type: &str, site: &str) -> Group {
    Group {
        name: name.into(),
        device_type: device_type.into(),
        selector: tags(site),
        created_at_ms: 0,
        windows: Vec::new(),
    }
}

/// The status and error code of a raw admin request.
async fn raw(
    ts: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http()
        .request(method, format!("{}{path}", ts.base))
        .bearer_auth(ADMIN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_crud_errors_are_clear_and_change_nothing() {
    let ts = TestServer::with_two_releases(5000).await;
    let g = ts
        .admin
        .group_create(&group("lab", "t", "lab"))
        .await
        .unwrap();
    assert!(g.created_at_ms > 0);
    assert_eq!(ts.admin.group("lab").await.unwrap().selector, tags("lab"));

    let dup = ts
        .admin
        .group_create(&group("lab", "u", "other"))
        .await
        .unwrap_err()
        .to_string();
    assert!(dup.contains("group lab exists already"), "{dup}");
    assert_eq!(
        ts.admin.group("lab").await.unwrap().device_type,
        "t",
        "unchanged"
    );

    let (status, body) = raw(
        &ts,
        reqwest::Method::POST,
        "/api/v1/admin/groups",
        Some(serde_json::json!({"name": "no spaces", "device_type": "t"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("group name"), "{body}");
    let (status, body) = raw(
        &ts,
        reqwest::Method::POST,
        "/api/v1/admin/groups",
        Some(serde_json::json!({"name": "x", "device_type": "t", "colour": "red"})),
    )
    .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");

    let (status, _) = raw(&ts, reqwest::Method::GET, "/api/v1/admin/groups/nope", None).await;
    assert_eq!(status, 404);
    let (status, body) = raw(
        &ts,
        reqwest::Method::DELETE,
        "/api/v1/admin/groups/nope",
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.to_string().contains("no group nope"), "{body}");

    let mut s = spec("2.0", "");
    s.group = Some("nope".into());
    let e = ts.admin.rollout_create(&s).await.unwrap_err().to_string();
    assert!(e.contains("no group nope"), "{e}");
    // A group and a selector, or a group and another device type: refused.
    s.group = Some("lab".into());
    s.selector = tags("field");
    let e = ts.admin.rollout_create(&s).await.unwrap_err().to_string();
    assert!(e.contains("either --group or --selector"), "{e}");
    s.selector.clear();
    s.device_type = "u".into();
    let e = ts.admin.rollout_create(&s).await.unwrap_err().to_string();
    assert!(e.contains("is for device type t"), "{e}");
    assert!(
        ts.admin.rollouts().await.unwrap().is_empty(),
        "nothing created"
    );

    let all = ts.admin.groups().await.unwrap();
    assert_eq!(all.len(), 1);
    ts.admin.group_delete("lab").await.unwrap();
    assert!(ts.admin.groups().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_targets_a_group_which_cannot_be_deleted_while_in_use() {
    let ts = TestServer::with_two_releases(5000).await;
    let http = http();
    let lab = Sim::enroll_tagged(&ts.base, "lab-1", "t", tags("lab"), &http).await;
    let field = Sim::enroll_tagged(&ts.base, "field-1", "t", tags("field"), &http).await;
    ts.admin
        .group_create(&group("lab", "t", "lab"))
        .await
        .unwrap();
    let mut s = spec("2.0", "");
    s.group = Some("lab".into());
    let r = ts.admin.rollout_create(&s).await.unwrap();
    assert_eq!(r.spec.group.as_deref(), Some("lab"));
    assert_eq!(r.spec.device_type, "t");
    assert_eq!(r.totals().eligible, 1);
    assert!(matches!(
        lab.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));
    assert_eq!(
        field.checkin("1.0", AgentState::Idle, None).await.action,
        Action::None
    );

    let e = ts.admin.group_delete("lab").await.unwrap_err().to_string();
    assert!(e.contains(&format!("targeted by rollout {}", r.id)), "{e}");
    assert!(ts.admin.group("lab").await.is_ok(), "still there");

    // The group is dynamic: a device that moves to the lab joins.
    let moved = Sim::enroll_tagged(&ts.base, "field-1", "t", tags("lab"), &http).await;
    assert!(matches!(
        moved.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));

    ts.admin.rollout_action(&r.id, "abort").await.unwrap();
    ts.admin.group_delete("lab").await.unwrap();
}
