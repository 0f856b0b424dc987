//! The dashboard's sessions over real HTTP, without a browser (issue 14,
//! item 1): sign-in sets an `HttpOnly`, `SameSite=Strict` cookie that the
//! admin API accepts with the token's role; a change made with the cookie
//! needs the session's CSRF token, so a cross-site form post fails; sign-out
//! and deleting the user end the session; the pages are embedded and sent
//! with a content security policy. `ui_browser` drives the same pages in
//! Chromium.

#[path = "common/mod.rs"]
mod common;

use common::*;
use ota_server::audit::Role;
use ota_server::rollout::RolloutState;
use reqwest::StatusCode;

/// A signed-in browser, as far as the server can tell: its cookie and the
/// CSRF token its pages read from `/ui/session`.
struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: String,
    csrf: String,
}

async fn sign_in(ts: &TestServer, token: &str) -> (reqwest::Response, Option<Browser>) {
    let http = http();
    let r = http
        .post(format!("{}/ui/login", ts.base))
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await
        .unwrap();
    let Some(set) = r.headers().get("set-cookie") else {
        return (r, None);
    };
    let set = set.to_str().unwrap().to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    let s: serde_json::Value = http
        .get(format!("{}/ui/session", ts.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = Browser {
        base: ts.base.clone(),
        http,
        cookie,
        csrf: s["csrf"].as_str().unwrap().to_string(),
    };
    (r, Some(b))
}

async fn user_token(ts: &TestServer, name: &str, role: Role) -> String {
    let u = ts.admin.user_create(name, role).await.unwrap();
    u["token"].as_str().unwrap().to_string()
}

impl Browser {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }

    /// A POST as the dashboard makes it: cookie, JSON, CSRF header.
    async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("x-csrf-token", &self.csrf)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

async fn error_of(r: reqwest::Response) -> (StatusCode, String, String) {
    let s = r.status();
    let j: serde_json::Value = r.json().await.unwrap();
    (
        s,
        j["code"].as_str().unwrap_or_default().to_string(),
        j["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_carries_the_tokens_role_and_the_api_enforces_it() {
    let ts = TestServer::with_two_releases(5000).await;
    let rollout = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let vera = user_token(&ts, "vera", Role::Viewer).await;
    let otto = user_token(&ts, "otto", Role::Operator).await;

    let (r, viewer) = sign_in(&ts, &vera).await;
    assert_eq!(r.status(), StatusCode::OK);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "ota_session=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=28800",
    ] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag: {set}");
    let me: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (me["name"].as_str(), me["role"].as_str()),
        (Some("vera"), Some("viewer"))
    );
    let viewer = viewer.unwrap();
    assert_eq!(viewer.csrf.len(), 64);

    // The viewer's cookie reads the admin API...
    let r = viewer.get("/api/v1/admin/rollouts").await;
    assert_eq!(r.status(), StatusCode::OK);
    // ...and cannot pause, even with the right CSRF token.
    let r = viewer
        .post(
            &format!("/api/v1/admin/rollouts/{}/pause", rollout.id),
            serde_json::json!({"reason": "forged"}),
        )
        .await;
    let (s, _, e) = error_of(r).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(e.contains("vera has role viewer"), "{e}");
    assert_eq!(ts.status(&rollout.id).await.state, RolloutState::Active);

    // An operator's session pauses, with its name in the reason.
    let (_, operator) = sign_in(&ts, &otto).await;
    let operator = operator.unwrap();
    let r = operator
        .post(
            &format!("/api/v1/admin/rollouts/{}/pause", rollout.id),
            serde_json::json!({"reason": "canary logs look odd"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let st = ts.status(&rollout.id).await;
    assert_eq!(st.state, RolloutState::Paused);
    assert_eq!(st.reason, "paused by otto: canary logs look odd");

    // The bootstrap admin_token signs in as the admin.
    let (r, _) = sign_in(&ts, ADMIN).await;
    let me: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (me["name"].as_str(), me["role"].as_str()),
        (Some("admin"), Some("admin"))
    );

    // Sign-ins and the session's actions are in the audit log, by name.
    let log = ts.admin.audit(None, 100).await.unwrap().entries;
    let seen: Vec<(&str, &str, u16)> = log
        .iter()
        .filter(|e| e.action != "release.add" && e.action != "user.create")
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("admin", "session.login", 200),
            ("otto", "rollout.pause", 200),
            ("otto", "session.login", 200),
            ("vera", "rollout.pause", 403),
            ("vera", "session.login", 200),
            ("admin", "rollout.create", 201),
        ],
        "{log:#?}"
    );
    assert!(log[0].from.starts_with("127.0.0.1:"), "{:?}", log[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_form_post_with_the_session_cookie_is_refused() {
    let ts = TestServer::with_two_releases(5000).await;
    let rollout = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let (_, b) = sign_in(&ts, ADMIN).await;
    let b = b.unwrap();
    let pause = format!("{}/api/v1/admin/rollouts/{}/pause", ts.base, rollout.id);
    // What another site's <form method=post> sends: the cookie (were it
    // not SameSite=Strict), a form body, no custom header.
    let r = b
        .http
        .post(&pause)
        .header("cookie", &b.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "https://evil.example")
        .body("reason=gotcha")
        .send()
        .await
        .unwrap();
    let (s, code, e) = error_of(r).await;
    assert_eq!((s, code.as_str()), (StatusCode::FORBIDDEN, "csrf"), "{e}");
    assert!(e.contains("X-CSRF-Token"), "{e}");
    // A wrong token is no better than none.
    let r = b
        .http
        .post(&pause)
        .header("cookie", &b.cookie)
        .header("x-csrf-token", "0".repeat(64))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(ts.status(&rollout.id).await.state, RolloutState::Active);
    assert!(
        ts.admin
            .audit(None, 100)
            .await
            .unwrap()
            .entries
            .iter()
            .all(|e| e.action != "rollout.pause"),
        "a refused forgery changes nothing"
    );
    // Sign-in takes JSON only: no other site's form can sign a browser in.
    let r = http()
        .post(format!("{}/ui/login", ts.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(r.headers().get("set-cookie").is_none());
    // A bearer token needs no CSRF token (browsers never add one by themselves).
    ts.admin
        .rollout_action_why(&rollout.id, "pause", Some("by CLI"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_and_deleting_the_user_end_the_session() {
    let ts = TestServer::with_two_releases(5000).await;
    let otto = user_token(&ts, "otto", Role::Operator).await;
    let (_, b) = sign_in(&ts, &otto).await;
    let b = b.unwrap();
    assert_eq!(b.get("/ui/session").await.status(), StatusCode::OK);
    let r = b.post("/ui/logout", serde_json::json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(set.contains("Max-Age=0"), "the cookie is cleared: {set}");
    assert_eq!(
        b.get("/ui/session").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (s, _, e) = error_of(b.get("/api/v1/admin/rollouts").await).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");

    // A session follows its user: deleted, it stops at once.
    let (_, b) = sign_in(&ts, &otto).await;
    let b = b.unwrap();
    assert_eq!(
        b.get("/api/v1/admin/rollouts").await.status(),
        StatusCode::OK
    );
    ts.admin.user_delete("otto").await.unwrap();
    assert_eq!(
        b.get("/api/v1/admin/rollouts").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        b.get("/ui/session").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        ts.app().ui_sessions.len(),
        0,
        "the dead session was dropped"
    );

    // An unknown token does not sign in, and says what would.
    let (r, none) = sign_in(&ts, &"ab".repeat(32)).await;
    assert!(none.is_none());
    let (s, _, e) = error_of(r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(e.contains("ota-server user add"), "{e}");
    // A made-up cookie is no session.
    let r = http()
        .get(format!("{}/api/v1/admin/rollouts", ts.base))
        .header("cookie", format!("ota_session={}", "cd".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_are_embedded_and_sent_with_a_content_security_policy() {
    let ts = TestServer::start("").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(format!("{}/ui", ts.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/ui/");
    for (path, ctype, needle) in [
        ("/ui/", "text/html", "/ui/app.js"),
        ("/ui/login", "text/html", "/ui/login.js"),
        ("/ui/app.js", "text/javascript", "X-CSRF-Token"),
        ("/ui/login.js", "text/javascript", "/ui/login"),
        ("/ui/app.css", "text/css", ".bar"),
    ] {
        let r = http.get(format!("{}{path}", ts.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ctype),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(h["x-frame-options"], "DENY");
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    // Not signed in: the session endpoint says so (the pages go to sign-in).
    let r = http
        .get(format!("{}/ui/session", ts.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_says_when_the_soak_ends() {
    let ts = TestServer::with_two_releases(5000).await;
    let _d = Sim::enroll(&ts.base, "d1", "t", &http()).await;
    let mut s = spec("2.0", "t");
    s.waves = vec![50, 100];
    s.soak_ms = 600_000;
    let before = ota_server::now_ms();
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let st = ts.status(&r.id).await;
    let end = st.soak_ends_at_ms.expect("a pending wave after a soak");
    assert!(
        (before + 600_000..=ota_server::now_ms() + 600_000).contains(&end),
        "{end} vs {before}"
    );
    assert!(st.next_wave.unwrap().contains("the soak"));
    // Paused: nothing counts down.
    ts.admin.rollout_action(&r.id, "pause").await.unwrap();
    assert_eq!(ts.status(&r.id).await.soak_ends_at_ms, None);
}

/// Twenty open rollouts pages cost check-ins ~16 % of their throughput:
/// every poll walked every member of every rollout. The dashboard asks for
/// a list at most 1 s old and shares one computation; the CLI's list (no
/// `max_age_ms`) is always computed for the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_polls_share_one_rollouts_list_within_max_age() {
    let ts = TestServer::with_two_releases(5000).await;
    let _d = Sim::enroll(&ts.base, "d1", "t", &http()).await;
    let r = ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let (_, browser) = sign_in(&ts, ADMIN).await;
    let browser = browser.expect("signed in");
    async fn list(b: &Browser, q: &str) -> String {
        let r = b.get(q).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: serde_json::Value = r.json().await.unwrap();
        v[0]["state"].as_str().unwrap().to_string()
    }
    const SHARED: &str = "/api/v1/admin/rollouts?max_age_ms=5000";
    assert_eq!(list(&browser, SHARED).await, "active");
    ts.admin.rollout_action(&r.id, "pause").await.unwrap();
    // Within 5 s a dashboard may see the list computed before the pause...
    assert_eq!(list(&browser, SHARED).await, "active");
    // ...the API without max_age_ms (the CLI), or with 0, never does.
    assert_eq!(list(&browser, "/api/v1/admin/rollouts").await, "paused");
    assert_eq!(
        list(&browser, "/api/v1/admin/rollouts?max_age_ms=0").await,
        "paused"
    );
    let cli = ts.admin.rollouts().await.unwrap();
    assert_eq!(cli[0].state, RolloutState::Paused);
    // A bad value is a clear 400, not a stale answer.
    let bad = browser.get("/api/v1/admin/rollouts?max_age_ms=soon").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_is_secure_behind_a_tls_proxy() {
    let ts = TestServer::start("").await;
    let r = http()
        .post(format!("{}/ui/login", ts.base))
        .header("x-forwarded-proto", "https")
        .json(&serde_json::json!({ "token": ADMIN }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    assert!(set.ends_with("; Secure"), "{set}");
    assert_eq!(r.headers()["cache-control"], "no-store");
}
