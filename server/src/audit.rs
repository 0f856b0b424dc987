//! Who may do what on the admin API, and the record of what they did
//! (issue 14, items 2 and 3).
//!
//! **Roles.** Every admin request is made by an [`Actor`]: the bootstrap
//! `admin_token` of `server.toml` (actor `admin`, role admin), or a named
//! user with a token of its own (`ota-server user add NAME --role R`; the
//! server keeps only the token's SHA-256). Roles are ordered: a `viewer`
//! reads; an `operator` also creates groups and rollouts and pauses,
//! resumes and aborts them; an `admin` also adds releases and devices,
//! reloads the configuration and manages users. [`required_role`] is the
//! one table that says which request needs which role, and [`layer`]
//! enforces it for every path under `/api/v1/admin` before any handler
//! runs, so a new admin route is protected (at the admin level) without
//! being listed.
//!
//! **Audit log.** Every admin request that changes something (any method
//! but GET/HEAD), allowed or refused with `403`, is appended to the audit
//! log of the state backend (sled or PostgreSQL, so it survives restarts
//! and is shared by replicas): when, who (name and role), from which
//! address, what (method, path, a name for the action, the JSON body with
//! secrets redacted, or the size of an upload) and the answer's status.
//! Reads are not logged. The log is append-only through the API; it grows
//! with admin actions, not with the fleet.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::app::App;
use crate::http::ApiErr;

/// What an admin identity may do; ordered (`Viewer < Operator < Admin`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Also runs rollouts: groups, create, pause, resume, abort.
    Operator,
    /// Everything: releases, devices, configuration reloads, users.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role {s:?}: viewer, operator or admin")),
        }
    }
}

/// A named admin identity (`ota-server user add`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of its token: the token itself is shown once, at creation.
    #[serde(default)]
    pub token_sha256: String,
    #[serde(default)]
    pub created_at_ms: u64,
}

/// The name of the bootstrap identity (`admin_token` in server.toml).
pub const BOOTSTRAP: &str = "admin";

/// Who makes an admin request (a request extension handlers may read).
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

/// The connection's peer, which the listener attaches to admin requests
/// only (the device API's hot path does without the extension).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// One audit log entry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Position in the log (assigned when appended; increasing).
    #[serde(default)]
    pub seq: u64,
    pub at_ms: u64,
    pub actor: String,
    pub role: Role,
    /// Peer address of the connection (a proxy's, behind one).
    pub from: String,
    /// e.g. `rollout.create`, `rollout.pause`, `release.add` ([`action_name`]).
    pub action: String,
    pub method: String,
    pub path: String,
    /// The answer's status: `403` for a refused attempt.
    pub status: u16,
    /// The JSON body with secrets redacted, `{"bytes": N}` for an upload,
    /// or null.
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// A page of the audit log, newest first.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct AuditPage {
    pub entries: Vec<AuditRecord>,
    /// Pass as `before` for the next (older) page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

/// Most entries one page returns.
pub const MAX_PAGE: usize = 1000;

/// The role a request needs (one table for the whole admin API).
pub fn required_role(method: &Method, path: &str) -> Role {
    if method == Method::GET || method == Method::HEAD {
        return Role::Viewer;
    }
    let rest = path.strip_prefix("/api/v1/admin/").unwrap_or("");
    let mut seg = rest.split('/');
    match (seg.next(), method) {
        (Some("rollouts"), &Method::POST) => Role::Operator,
        (Some("groups"), &Method::POST | &Method::DELETE) => Role::Operator,
        _ => Role::Admin,
    }
}

/// A name for what a request does, for the log: `rollout.create`,
/// `rollout.pause`, `release.add`, `device.retire`, ...
pub fn action_name(method: &Method, path: &str) -> String {
    let rest = path.strip_prefix("/api/v1/admin/").unwrap_or(path);
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let noun = segs
        .first()
        .map(|s| s.strip_suffix('s').unwrap_or(s))
        .unwrap_or("admin");
    let verb = match (method, segs.len()) {
        (&Method::POST, 1) => "create",
        (&Method::POST, 3) => segs[2],
        (&Method::PUT, _) => "add",
        (&Method::DELETE, _) => "delete",
        (&Method::POST, _) => "post",
        _ => "call",
    };
    let verb = match (noun, verb) {
        ("device", "create") => "add",
        ("device", "delete") => "retire",
        ("reload", _) => return "config.reload".into(),
        _ => verb,
    };
    format!("{noun}.{verb}")
}

/// Replaces secret-looking values (`token`, `key`, `secret`, `password` in
/// the field name) so the log never holds a credential.
pub fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let k = k.to_ascii_lowercase();
                if ["token", "key", "secret", "password"]
                    .iter()
                    .any(|s| k.contains(s))
                    && !x.is_null()
                {
                    *x = serde_json::Value::String("(redacted)".into());
                } else {
                    redact(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// A new random user token (32 bytes, hex) and its hex SHA-256.
pub fn new_token() -> (String, String) {
    let t = crate::fleet::new_token();
    let h = token_hash(&t);
    (t, h)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Bodies up to this size are kept (JSON) for the log; larger ones
/// (release uploads) are recorded by size.
const MAX_LOGGED_BODY: u64 = 64 << 10;

/// The admin API's gate: authenticates, checks the role, runs the handler
/// and appends the audit record. Applied to the whole router; paths outside
/// `/api/v1/admin` pass through untouched.
///
/// # Cancel safety
/// If the client goes away after the handler ran, the record is still
/// appended by this future only if it is polled to the end; the append is
/// one store write, so a dropped future loses at most that entry (the
/// action's own effects are the handler's).
pub async fn layer(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if !path.starts_with("/api/v1/admin/") && path != "/api/v1/admin" {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let from = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| p.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let actor = match token {
        Some(t) => match identify(&app, &t).await {
            Ok(a) => a,
            Err(e) => return e.into_response(),
        },
        // No bearer token: a dashboard session's cookie, if any (with its
        // CSRF check for changes: crate::ui).
        None => match crate::ui::session_actor(&app, req.headers(), &method).await {
            Ok(a) => a,
            Err(e) => return e.into_response(),
        },
    };
    let Some(actor) = actor else {
        warn!(%from, %method, %path, "admin request with a missing or unknown token");
        return crate::http::admin_unauthorized().into_response();
    };
    let need = required_role(&method, &path);
    let logged = method != Method::GET && method != Method::HEAD;
    let mut detail = serde_json::Value::Null;
    if logged {
        let len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        match len {
            Some(n) if json && n <= MAX_LOGGED_BODY => {
                let (parts, body) = req.into_parts();
                let bytes = match axum::body::to_bytes(body, MAX_LOGGED_BODY as usize).await {
                    Ok(b) => b,
                    Err(_) => {
                        return ApiErr(
                            StatusCode::BAD_REQUEST,
                            "bad_body",
                            "the request body could not be read".into(),
                        )
                        .into_response();
                    }
                };
                detail = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                redact(&mut detail);
                req = Request::from_parts(parts, Body::from(bytes));
            }
            Some(n) if n > 0 => detail = serde_json::json!({ "bytes": n }),
            _ => {}
        }
    }
    let resp = if actor.role < need {
        ApiErr(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} has role {}; {} {} needs {} (ota-server user add NAME --role {})",
                actor.name,
                actor.role.name(),
                method,
                path,
                need.name(),
                need.name()
            ),
        )
        .into_response()
    } else {
        req.extensions_mut().insert(actor.clone());
        next.run(req).await
    };
    if logged && resp.status() != StatusCode::UNAUTHORIZED {
        let rec = AuditRecord {
            seq: 0,
            at_ms: crate::now_ms(),
            actor: actor.name.clone(),
            role: actor.role,
            from,
            action: action_name(&method, &path),
            method: method.to_string(),
            path,
            status: resp.status().as_u16(),
            detail,
        };
        if let Err(e) = app.state.audit_append(rec.clone()).await {
            // The action happened; say loudly that its record did not.
            warn!(error = %e, ?rec, "the audit log could not be written");
        }
    }
    resp
}

/// The actor a bearer token stands for: the bootstrap admin or a user.
async fn identify(app: &App, token: &str) -> Result<Option<Actor>, ApiErr> {
    if app.is_admin(token) {
        return Ok(Some(Actor {
            name: BOOTSTRAP.into(),
            role: Role::Admin,
        }));
    }
    Ok(app
        .state
        .user_by_token(&token_hash(token))
        .await?
        .map(|u| Actor {
            name: u.name,
            role: u.role,
        }))
}

/// Checks a user before it is stored: name rules as device ids, not the
/// bootstrap name.
pub fn check_user_name(name: &str) -> Result<(), String> {
    ota_format::api::check_name("user name", name)?;
    if name == BOOTSTRAP {
        return Err(format!(
            "{BOOTSTRAP:?} is the bootstrap identity (admin_token in server.toml); pick another name"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_per_request() {
        let r = |m: Method, p: &str| required_role(&m, p);
        assert_eq!(r(Method::GET, "/api/v1/admin/rollouts"), Role::Viewer);
        assert_eq!(r(Method::GET, "/api/v1/admin/audit"), Role::Viewer);
        assert_eq!(r(Method::POST, "/api/v1/admin/rollouts"), Role::Operator);
        assert_eq!(
            r(Method::POST, "/api/v1/admin/rollouts/r1/pause"),
            Role::Operator
        );
        assert_eq!(r(Method::POST, "/api/v1/admin/groups"), Role::Operator);
        assert_eq!(r(Method::DELETE, "/api/v1/admin/groups/g"), Role::Operator);
        assert_eq!(r(Method::PUT, "/api/v1/admin/releases/t/1.0"), Role::Admin);
        assert_eq!(r(Method::POST, "/api/v1/admin/devices"), Role::Admin);
        assert_eq!(r(Method::POST, "/api/v1/admin/users"), Role::Admin);
        assert_eq!(r(Method::POST, "/api/v1/admin/reload"), Role::Admin);
        assert_eq!(r(Method::POST, "/api/v1/admin/something-new"), Role::Admin);
    }

    #[test]
    fn action_names() {
        let a = |m: Method, p: &str| action_name(&m, p);
        assert_eq!(a(Method::POST, "/api/v1/admin/rollouts"), "rollout.create");
        assert_eq!(
            a(Method::POST, "/api/v1/admin/rollouts/r1/pause"),
            "rollout.pause"
        );
        assert_eq!(
            a(Method::PUT, "/api/v1/admin/releases/t/1.0"),
            "release.add"
        );
        assert_eq!(
            a(Method::DELETE, "/api/v1/admin/releases/t/1.0"),
            "release.delete"
        );
        assert_eq!(a(Method::POST, "/api/v1/admin/devices"), "device.add");
        assert_eq!(
            a(Method::DELETE, "/api/v1/admin/devices/d"),
            "device.retire"
        );
        assert_eq!(
            a(Method::POST, "/api/v1/admin/devices/d/revoke-cert"),
            "device.revoke-cert"
        );
        assert_eq!(a(Method::POST, "/api/v1/admin/reload"), "config.reload");
        assert_eq!(a(Method::POST, "/api/v1/admin/users"), "user.create");
    }

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let mut v = serde_json::json!({
            "device_id": "d1", "token": "abc", "enrollment_key": "k",
            "nested": [{"admin_token": "x", "ok": 1}], "key_id": null
        });
        redact(&mut v);
        assert_eq!(v["device_id"], "d1");
        assert_eq!(v["token"], "(redacted)");
        assert_eq!(v["enrollment_key"], "(redacted)");
        assert_eq!(v["nested"][0]["admin_token"], "(redacted)");
        assert_eq!(v["nested"][0]["ok"], 1);
        assert!(v["key_id"].is_null());
    }
}
