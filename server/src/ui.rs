//! The dashboard at `/ui/` (issue 14, item 1): sign-in, cookie sessions
//! and the embedded pages.
//!
//! **Assets.** Plain HTML, JavaScript and CSS under `server/ui/`, compiled
//! into the binary with `include_str!`: no build step, no files to deploy,
//! and the pages always match the server that serves them. The pages call
//! the admin API (`/api/v1/admin/...`) like the CLI does; they have no
//! private endpoints, so the UI can do nothing the API would refuse.
//!
//! **Sessions.** `POST /ui/login` takes an admin token (a user's from
//! `ota-server user add`, or the bootstrap `admin_token`) and answers with a
//! random session id in a cookie: `HttpOnly` (scripts cannot read it),
//! `SameSite=Strict` (other sites' pages do not send it), `Path=/` (the
//! admin API is outside `/ui/`), `Max-Age` of [`SESSION_TTL`], and `Secure`
//! when the request came over TLS. The session table lives in this
//! replica's memory (so a restart signs everyone out, and behind a load
//! balancer a session needs sticky routing to its replica); the table keys
//! by the id's SHA-256, holds at most [`MAX_SESSIONS`], and drops expired
//! entries at every sign-in. A session does not copy the role: it keeps the
//! token's hash and looks the user up on every request, so deleting a user
//! (or changing its role) takes effect at once, as for bearer tokens.
//!
//! **CSRF.** Besides `SameSite=Strict`, every state-changing admin request
//! made with a session cookie must carry the session's CSRF token in the
//! `X-CSRF-Token` header ([`session_actor`]); the pages read it from `GET
//! /ui/session`, which other origins cannot read. A cross-site HTML form can
//! neither set that header nor send JSON, so a forged form post is refused
//! with `403` before the role check. Sign-in itself takes JSON only, so no
//! other site can sign a browser in to an identity of its choosing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::app::App;
use crate::audit::{Actor, AuditRecord, BOOTSTRAP, Role};
use crate::http::{ApiErr, read_json};

/// The session cookie's name.
pub const COOKIE: &str = "ota_session";
/// The header state-changing requests of a session carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts from sign-in (an operator's working day).
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions one replica keeps; sign-ins beyond it are refused (`503`)
/// rather than growing memory without bound.
pub const MAX_SESSIONS: usize = 10_000;

/// Whom a session stands for. The role is looked up per request.
#[derive(Clone, Debug)]
enum Principal {
    /// The bootstrap `admin_token`.
    Bootstrap,
    /// A named user, by its token's hex SHA-256.
    User { token_sha256: String },
}

#[derive(Clone, Debug)]
struct Session {
    who: Principal,
    csrf: String,
    expires_at_ms: u64,
}

/// The in-memory session table (see the module docs).
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    fn insert(&self, who: Principal, now_ms: u64) -> Result<(String, Session), ApiErr> {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let s = Session {
            who,
            csrf: hex::encode(rand::random::<[u8; 32]>()),
            expires_at_ms: now_ms + SESSION_TTL.as_millis() as u64,
        };
        let mut map = self.map.lock().unwrap();
        map.retain(|_, s| s.expires_at_ms > now_ms);
        if map.len() >= MAX_SESSIONS {
            return Err(ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_sessions",
                format!(
                    "this server holds {MAX_SESSIONS} dashboard sessions already; sign out elsewhere or wait for sessions to expire"
                ),
            ));
        }
        map.insert(key(&id), s.clone());
        Ok((id, s))
    }

    fn get(&self, id: &str, now_ms: u64) -> Option<Session> {
        let k = key(id);
        let mut map = self.map.lock().unwrap();
        let s = map.get(&k).cloned()?;
        if s.expires_at_ms > now_ms {
            return Some(s);
        }
        map.remove(&k);
        None
    }

    fn remove(&self, id: &str) {
        self.map.lock().unwrap().remove(&key(id));
    }

    /// Sessions held (expired ones included until the next sign-in).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id of the request's cookie, if any.
fn cookie_session(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The actor a session principal stands for now; `None` once its user was
/// deleted.
async fn resolve(app: &App, who: &Principal) -> Result<Option<Actor>, ApiErr> {
    Ok(match who {
        Principal::Bootstrap => Some(Actor {
            name: BOOTSTRAP.into(),
            role: Role::Admin,
        }),
        Principal::User { token_sha256 } => {
            app.state.user_by_token(token_sha256).await?.map(|u| Actor {
                name: u.name,
                role: u.role,
            })
        }
    })
}

/// The actor of an admin request made with a session cookie (the audit
/// layer calls this when there is no bearer token): `Ok(None)` without a
/// live session (the layer answers `401`); `Err(403)` for a state-changing
/// request whose `X-CSRF-Token` is missing or wrong.
pub async fn session_actor(
    app: &App,
    headers: &HeaderMap,
    method: &Method,
) -> Result<Option<Actor>, ApiErr> {
    let Some(id) = cookie_session(headers) else {
        return Ok(None);
    };
    let Some(s) = app.ui_sessions.get(id, crate::now_ms()) else {
        return Ok(None);
    };
    if !matches!(*method, Method::GET | Method::HEAD) {
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !crate::app::ct_eq(sent.as_bytes(), s.csrf.as_bytes()) {
            warn!(%method, "session request without its CSRF token refused (a cross-site request?)");
            return Err(ApiErr(
                StatusCode::FORBIDDEN,
                "csrf",
                "a request made with a dashboard session must carry the session's X-CSRF-Token header; reload the page".into(),
            ));
        }
    }
    let actor = resolve(app, &s.who).await?;
    if actor.is_none() {
        app.ui_sessions.remove(id);
    }
    Ok(actor)
}

/// The dashboard's routes (outside the admin API's gate: sign-in is how a
/// browser gets through it).
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { page(INDEX) }))
        .route("/ui/login", get(|| async { page(LOGIN) }).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session))
        .route("/ui/app.js", get(|| async { asset(APP_JS, JS) }))
        .route("/ui/login.js", get(|| async { asset(LOGIN_JS, JS) }))
        .route("/ui/app.css", get(|| async { asset(APP_CSS, CSS) }))
}

const INDEX: &str = include_str!("../ui/index.html");
const LOGIN: &str = include_str!("../ui/login.html");
const APP_JS: &str = include_str!("../ui/app.js");
const LOGIN_JS: &str = include_str!("../ui/login.js");
const APP_CSS: &str = include_str!("../ui/app.css");
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Headers of every dashboard answer: scripts and styles from this origin
/// only (no inline script an injected string could become), never framed
/// (no click-jacking of the pause button), no MIME sniffing.
fn hardened(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn page(html: &'static str) -> Response {
    hardened(
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            html,
        )
            .into_response(),
    )
}

fn asset(body: &'static str, ctype: &'static str) -> Response {
    hardened(
        (
            [
                (header::CONTENT_TYPE, ctype),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
    )
}

/// Whether the browser reached us over TLS: our own listener's, or a
/// proxy's that says so.
fn over_tls(app: &App, headers: &HeaderMap) -> bool {
    app.config.tls.is_some()
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn set_cookie(value: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
    ))
    .expect("a hex id is a valid header value")
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Appends a sign-in or sign-out to the audit log (who, from where).
///
/// # Cancel safety
/// One store write: a dropped future loses at most this entry.
async fn audit(app: &App, req_from: String, actor: &Actor, action: &str, path: &str) {
    let rec = AuditRecord {
        seq: 0,
        at_ms: crate::now_ms(),
        actor: actor.name.clone(),
        role: actor.role,
        from: req_from,
        action: action.into(),
        method: "POST".into(),
        path: path.into(),
        status: 200,
        detail: serde_json::Value::Null,
    };
    if let Err(e) = app.state.audit_append(rec.clone()).await {
        warn!(error = %e, ?rec, "the audit log could not be written");
    }
}

fn peer(req: &Request) -> String {
    req.extensions()
        .get::<crate::audit::PeerAddr>()
        .map(|p| p.0.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// `POST /ui/login` `{"token": "..."}` → `200 {"name", "role"}` and the
/// session cookie; `401` for an unknown token; `415` for anything but JSON.
///
/// # Cancel safety
/// The session is inserted before the answer is built; a dropped request
/// leaves an unused session that expires with [`SESSION_TTL`].
async fn login(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiErr> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Login {
        token: String,
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !json {
        return Err(ApiErr(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "json_only",
            "sign in with a JSON body {\"token\": \"...\"} (the sign-in page sends one)".into(),
        ));
    }
    let secure = over_tls(&app, req.headers());
    let from = peer(&req);
    let l: Login = read_json(req.into_body()).await?;
    let token = l.token.trim();
    let who = if app.is_admin(token) {
        Principal::Bootstrap
    } else {
        Principal::User {
            token_sha256: crate::audit::token_hash(token),
        }
    };
    let Some(actor) = resolve(&app, &who).await? else {
        warn!(%from, "dashboard sign-in with an unknown token");
        return Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown token: sign in with a token from `ota-server user add NAME --role ROLE` or the admin_token of server.toml".into(),
        ));
    };
    let (id, s) = app.ui_sessions.insert(who, crate::now_ms())?;
    info!(user = %actor.name, role = actor.role.name(), %from, "dashboard sign-in");
    audit(&app, from, &actor, "session.login", "/ui/login").await;
    let mut r = axum::Json(serde_json::json!({
        "name": actor.name, "role": actor.role, "expires_at_ms": s.expires_at_ms,
    }))
    .into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&id, SESSION_TTL.as_secs(), secure),
    );
    Ok(no_store(r))
}

/// `POST /ui/logout` (with the CSRF header): ends the session and clears
/// the cookie. Without a live session it only clears the cookie.
///
/// # Cancel safety
/// The session is dropped before the audit append; a request dropped in
/// between has signed out, and its log entry is lost.
async fn logout(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiErr> {
    let secure = over_tls(&app, req.headers());
    let from = peer(&req);
    if let Some(actor) = session_actor(&app, req.headers(), &Method::POST).await? {
        if let Some(id) = cookie_session(req.headers()) {
            app.ui_sessions.remove(id);
        }
        audit(&app, from, &actor, "session.logout", "/ui/logout").await;
    }
    let mut r = axum::Json(serde_json::json!({ "signed_out": true })).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie("", 0, secure));
    Ok(no_store(r))
}

/// `GET /ui/session` → `{"name", "role", "csrf", "expires_at_ms"}`, or `401`
/// (the pages then go to the sign-in page). Only same-origin pages can
/// read the answer (no CORS), so the CSRF token stays with them.
async fn session(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiErr> {
    let unauth = || {
        ApiErr(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "not signed in (or the session expired): sign in at /ui/login".into(),
        )
    };
    let id = cookie_session(&headers).ok_or_else(unauth)?;
    let s = app
        .ui_sessions
        .get(id, crate::now_ms())
        .ok_or_else(unauth)?;
    let Some(actor) = resolve(&app, &s.who).await? else {
        app.ui_sessions.remove(id);
        return Err(unauth());
    };
    Ok(no_store(
        axum::Json(serde_json::json!({
            "name": actor.name, "role": actor.role, "csrf": s.csrf,
            "expires_at_ms": s.expires_at_ms,
        }))
        .into_response(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ota_session=abc ; b=2"),
        );
        assert_eq!(cookie_session(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("ota_sessionx=1"));
        assert_eq!(cookie_session(&h), None);
    }

    #[test]
    fn sessions_expire_and_are_pruned_at_sign_in() {
        let s = Sessions::default();
        let (id, _) = s.insert(Principal::Bootstrap, 1000).ok().unwrap();
        assert!(s.get(&id, 1001).is_some());
        let end = 1000 + SESSION_TTL.as_millis() as u64;
        assert!(s.get(&id, end).is_none(), "expired at its end");
        assert!(s.is_empty(), "and dropped");
        let (a, _) = s.insert(Principal::Bootstrap, 0).ok().unwrap();
        let _ = s.insert(Principal::Bootstrap, end + 5).ok().unwrap();
        assert_eq!(s.len(), 1, "the expired one went at the next sign-in");
        assert!(s.get(&a, end + 5).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_tls() {
        let c = set_cookie("ab", 60, true);
        let c = c.to_str().unwrap();
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=60",
            "Secure",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(
            !set_cookie("ab", 60, false)
                .to_str()
                .unwrap()
                .contains("Secure")
        );
    }
}
