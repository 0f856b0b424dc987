//! Admin API handlers for the inventory, the rollouts list the dashboard
//! polls, and for taking things out of service: `GET
//! /api/v1/admin/devices` (list), `GET /api/v1/admin/rollouts`, `DELETE
//! /api/v1/admin/devices/{id}` (retire) and `DELETE
//! /api/v1/admin/releases/{device_type}/{version}`.
//!
//! Deletions refuse what would strand a device or a rollout, and say what to
//! do instead: a release a live rollout offers (active, paused, or
//! completed and not superseded: it still takes newcomers), a release
//! devices still run (it is the base of their deltas: without it they could
//! only get full images of later releases), a device in the middle of an
//! update. The checks read the state just before the deletion; a rollout
//! created in between is caught by the rollout's own check that its
//! release exists only until then, which is accepted (operators do not race
//! themselves).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracing::info;

use crate::app::App;
use crate::groups::{Group, GroupError};
use crate::http::{ApiErr, bad_request, internal};
use crate::inventory::{DeviceFilter, DeviceQuery};
use crate::releases::ReleaseError;
use crate::render::DeviceView;
use crate::rollout::{Phase, RolloutState};

fn conflict(m: String) -> ApiErr {
    ApiErr(StatusCode::CONFLICT, "conflict", m)
}

/// `GET /api/v1/admin/devices?device_type=&version=&tags=&rollout=&state=&seen_within_s=&silent_for_s=&after=&limit=`
pub async fn device_list(
    State(app): State<Arc<App>>,
    q: Result<Query<DeviceQuery>, QueryRejection>,
) -> Result<Response, ApiErr> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let filter = q.parse(crate::now_ms()).map_err(bad_request)?;
    let page = app.state.device_list(&filter).await?;
    Ok(axum::Json(page).into_response())
}

/// `GET /api/v1/admin/rollouts?max_age_ms=`: every rollout's status.
///
/// Without `max_age_ms` (the CLI, scripts) the answer is computed for the
/// request. With it (the dashboard asks for 1000), an answer computed at
/// most that long ago on this replica is served as is: the sled engine's
/// status walks every member of every rollout, and twenty open rollouts
/// pages polling every 1.5 s walked a 100,000-member rollout thirteen times
/// a second, which cost check-ins about 16 % of their throughput
/// (docs/dashboard.md). However many pages poll, the walks are then at
/// most about one per `max_age_ms` (pollers arriving while one is computed
/// compute too: there is no lock across the await).
pub async fn rollout_list(
    State(app): State<Arc<App>>,
    q: Result<Query<RolloutListQuery>, QueryRejection>,
) -> Result<Response, ApiErr> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let max_age = q
        .max_age_ms
        .filter(|ms| *ms > 0)
        .map(|ms| ms.min(MAX_LIST_AGE_MS));
    if let Some(max_age) = max_age
        && let Some(body) = app.rollout_list_cache.fresh(max_age)
    {
        return Ok(json_bytes(body));
    }
    let all = app.state.rollout_statuses().await?;
    let body = bytes::Bytes::from(serde_json::to_vec(&all).map_err(internal)?);
    if max_age.is_some() {
        app.rollout_list_cache.put(body.clone());
    }
    Ok(json_bytes(body))
}

/// The longest `max_age_ms` honoured: a dashboard is never more than this
/// stale, whatever it asks.
const MAX_LIST_AGE_MS: u64 = 5_000;

#[derive(serde::Deserialize)]
pub struct RolloutListQuery {
    max_age_ms: Option<u64>,
}

fn json_bytes(body: bytes::Bytes) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The last `GET /api/v1/admin/rollouts` answer computed for a caller that
/// accepts an older one ([`rollout_list`]), and when.
#[derive(Default)]
pub struct RolloutListCache(std::sync::Mutex<Option<(std::time::Instant, bytes::Bytes)>>);

impl RolloutListCache {
    /// The cached answer if it is at most `max_age_ms` old.
    fn fresh(&self, max_age_ms: u64) -> Option<bytes::Bytes> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .filter(|(at, _)| at.elapsed().as_millis() <= u128::from(max_age_ms))
            .map(|(_, b)| b.clone())
    }

    fn put(&self, body: bytes::Bytes) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((std::time::Instant::now(), body));
    }
}

/// `DELETE /api/v1/admin/devices/{id}`: refused while the device is mid-update.
pub async fn device_retire(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiErr> {
    let not_found = || {
        ApiErr(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {id}; `ota-server device list` shows them"),
        )
    };
    let view = app.state.device_view(&id).await?.ok_or_else(not_found)?;
    let view: DeviceView = serde_json::from_value(view).map_err(internal)?;
    let live: Vec<String> = app
        .state
        .rollout_statuses()
        .await?
        .into_iter()
        .filter(|s| matches!(s.state, RolloutState::Active | RolloutState::Paused))
        .map(|s| s.id)
        .collect();
    for m in &view.rollouts {
        let rollout = m.update_id.split('.').next().unwrap_or_default();
        if live.iter().any(|r| r == rollout)
            && matches!(
                m.phase,
                Phase::Downloading
                    | Phase::Downloaded
                    | Phase::WaitingForWindow
                    | Phase::Installed
                    | Phase::Rebooting
            )
        {
            return Err(conflict(format!(
                "device {id} is in the middle of an update in rollout {rollout}; wait until it commits or \
                 rolls back (`ota-server device show {id}`), or abort the rollout, then retire it"
            )));
        }
    }
    if !app.state.retire_device(&id).await? {
        return Err(not_found());
    }
    info!(device = %id, "device retired");
    Ok(axum::Json(serde_json::json!({ "retired": id })).into_response())
}

/// `DELETE /api/v1/admin/releases/{device_type}/{version}`.
pub async fn release_delete(
    State(app): State<Arc<App>>,
    Path((device_type, version)): Path<(String, String)>,
) -> Result<Response, ApiErr> {
    // A completed rollout still offers its release to newcomers
    // (rollout::membership) until superseded or aborted.
    let all = app.state.rollout_statuses().await?;
    if let Some(r) = all.iter().enumerate().find_map(|(i, s)| {
        (s.spec.device_type == device_type
            && s.spec.release == version
            && crate::rollout::membership::still_updates(&all, i))
        .then_some(s)
    }) {
        return Err(conflict(format!(
            "rollout {} ({:?}) offers release {version} of {device_type}; abort it first (`ota-server rollout abort {}`)",
            r.id, r.state, r.id
        )));
    }
    let running = app
        .state
        .device_list(&DeviceFilter {
            device_type: Some(device_type.clone()),
            version: Some(version.clone()),
            limit: 3,
            ..Default::default()
        })
        .await?;
    if running.total > 0 {
        let ids: Vec<&str> = running.devices.iter().map(|d| d.id.as_str()).collect();
        return Err(conflict(format!(
            "{} device(s) of {device_type} still run {version} ({}{}): it is the base of their deltas; \
             update them to a later release first, or retire them (`ota-server device list --type {device_type} --version {version}`)",
            running.total,
            ids.join(", "),
            if running.total > ids.len() as u64 {
                ", ..."
            } else {
                ""
            }
        )));
    }
    let rec = app
        .releases
        .delete(&device_type, &version)
        .await
        .map_err(|e| match e {
            e @ ReleaseError::NotFound { .. } => {
                ApiErr(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ReleaseError::InUse(m) => conflict(m),
            e => internal(e),
        })?;
    Ok(axum::Json(rec).into_response())
}

impl From<GroupError> for ApiErr {
    fn from(e: GroupError) -> Self {
        let m = e.to_string();
        match e {
            GroupError::Invalid(_) => bad_request(m),
            GroupError::Exists(_) => ApiErr(StatusCode::CONFLICT, "group_exists", m),
            GroupError::InUse { .. } => ApiErr(StatusCode::CONFLICT, "group_in_use", m),
            GroupError::NotFound(_) => ApiErr(StatusCode::NOT_FOUND, "not_found", m),
        }
    }
}

/// `POST /api/v1/admin/groups`: a [`Group`] → `201` with the stored group.
pub async fn group_create(
    State(app): State<Arc<App>>,
    body: axum::body::Body,
) -> Result<Response, ApiErr> {
    let mut g: Group = crate::http::read_json(body).await?;
    g.validate().map_err(GroupError::Invalid)?;
    g.created_at_ms = crate::now_ms();
    if !app.state.create_group(&g).await? {
        return Err(GroupError::Exists(g.name).into());
    }
    info!(group = %g.name, device_type = %g.device_type, "group created");
    Ok((StatusCode::CREATED, axum::Json(g)).into_response())
}

/// `GET /api/v1/admin/groups`.
pub async fn group_list(State(app): State<Arc<App>>) -> Result<Response, ApiErr> {
    Ok(axum::Json(app.state.groups().await?).into_response())
}

/// `GET /api/v1/admin/groups/{name}`.
pub async fn group_get(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Response, ApiErr> {
    let g = app
        .state
        .group(&name)
        .await?
        .ok_or(GroupError::NotFound(name))?;
    Ok(axum::Json(g).into_response())
}

/// `DELETE /api/v1/admin/groups/{name}`: refused while a rollout that can
/// still update devices targets it ([`crate::groups::in_use_by`]).
pub async fn group_delete(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Response, ApiErr> {
    let all = app.state.rollout_statuses().await?;
    if let Some(r) = crate::groups::in_use_by(&name, &all) {
        return Err(GroupError::InUse {
            group: name,
            rollout: r.id.clone(),
            state: r.state,
        }
        .into());
    }
    if !app.state.delete_group(&name).await? {
        return Err(GroupError::NotFound(name).into());
    }
    info!(group = %name, "group deleted");
    Ok(axum::Json(serde_json::json!({ "deleted": name })).into_response())
}

/// `GET /api/v1/admin/audit?before=SEQ&limit=N`: the audit log, newest
/// first ([`crate::audit`]).
pub async fn audit_list(
    State(app): State<Arc<App>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiErr> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let limit = q.limit()?;
    Ok(axum::Json(app.state.audit_list(q.before, limit).await?).into_response())
}

/// `before` / `limit` of a page that runs newest first.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub before: Option<u64>,
    pub limit: Option<usize>,
    /// Device history: include `progress` events.
    #[serde(default)]
    pub progress: bool,
}

impl PageQuery {
    fn limit(&self) -> Result<usize, ApiErr> {
        match self.limit.unwrap_or(100) {
            n @ 1..=crate::audit::MAX_PAGE => Ok(n),
            n => Err(bad_request(format!(
                "limit {n} is out of range: 1 to {}",
                crate::audit::MAX_PAGE
            ))),
        }
    }
}

/// `GET /api/v1/admin/devices/{id}/history?before=SEQ&limit=N&progress=true`:
/// the device's stored events newest first, and its update attempts
/// (rollout memberships), which `device show` only samples.
pub async fn device_history(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiErr> {
    let Query(q) = q.map_err(|e| bad_request(e.body_text()))?;
    let limit = q.limit()?;
    let view = app.state.device_view(&id).await?.ok_or_else(|| {
        ApiErr(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {id}; `ota-server device list` shows them"),
        )
    })?;
    let events = app
        .state
        .device_events(&id, q.before, limit, q.progress)
        .await?;
    let next_before = (events.len() == limit)
        .then(|| events.last().map(|e| e.seq))
        .flatten();
    Ok(axum::Json(serde_json::json!({
        "id": id,
        "version": view["version"],
        "attempts": view["rollouts"],
        "events": events,
        "next_before": next_before,
    }))
    .into_response())
}

/// `POST /api/v1/admin/users` `{"name", "role"}` → `201` with the user and
/// its token (shown this once; the server keeps its SHA-256).
pub async fn user_create(
    State(app): State<Arc<App>>,
    body: axum::body::Body,
) -> Result<Response, ApiErr> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewUser {
        name: String,
        role: crate::audit::Role,
    }
    let n: NewUser = crate::http::read_json(body).await?;
    crate::audit::check_user_name(&n.name).map_err(bad_request)?;
    let (token, token_sha256) = crate::audit::new_token();
    let u = crate::audit::User {
        name: n.name,
        role: n.role,
        token_sha256,
        created_at_ms: crate::now_ms(),
    };
    if !app.state.user_create(&u).await? {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            "user_exists",
            format!(
                "user {} exists already; delete it first (`ota-server user delete {}`) to issue a new token",
                u.name, u.name
            ),
        ));
    }
    info!(user = %u.name, role = u.role.name(), "admin user created");
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "name": u.name, "role": u.role, "created_at_ms": u.created_at_ms, "token": token
        })),
    )
        .into_response())
}

/// `GET /api/v1/admin/users`: names, roles, creation times (no tokens).
pub async fn user_list(State(app): State<Arc<App>>) -> Result<Response, ApiErr> {
    let users: Vec<serde_json::Value> = app
        .state
        .users()
        .await?
        .into_iter()
        .map(|u| serde_json::json!({"name": u.name, "role": u.role, "created_at_ms": u.created_at_ms}))
        .collect();
    Ok(axum::Json(users).into_response())
}

/// `DELETE /api/v1/admin/users/{name}`: its token stops working at once.
pub async fn user_delete(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Response, ApiErr> {
    if !app.state.user_delete(&name).await? {
        return Err(ApiErr(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no user {name}; `ota-server user list` shows them"),
        ));
    }
    info!(user = %name, "admin user deleted");
    Ok(axum::Json(serde_json::json!({ "deleted": name })).into_response())
}
