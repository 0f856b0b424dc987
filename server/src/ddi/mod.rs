//! hawkBit's Direct Device Integration (DDI) API: the device protocol of
//! SWUpdate's suricatta, `rauc-hawkbit-updater`, Zephyr's hawkBit client
//! and others, served under `/{tenant}/controller/v1/{controllerId}` so
//! those devices join our rollouts without a change on the device.
//! `docs/ddi.md` says what is supported and how it maps onto rollouts.
//!
//! A DDI target is an enrolled device like any other (`device add` gives
//! it its token; it authenticates with `Authorization: TargetToken <t>`,
//! or a gateway token vouches for it). Nothing here decides who may
//! update: every poll is translated into the agent check-in the rollout
//! engine already decides ([`crate::backend::StateBackend::checkin`]), and
//! every feedback into its events ([`wire::events_for`]). So waves, the
//! fleet-wide cap with expiring download leases, the start rate and the
//! failure threshold hold across agents and DDI targets alike:
//!
//! - admitted → the poll links `deploymentBase/{actionId}`; polls, progress
//!   feedback and artifact requests renew the lease;
//! - throttled → no link ("nothing to do") and a sleep of the wait
//!   interval, a quarter of it near the head of the queue;
//! - the attempt ended by the server (rollout aborted, lease expired) →
//!   `cancelAction/{actionId}`; its `deploymentBase` says `skip`;
//! - `configData` attributes become the device's tags `ddi.<key>`, which
//!   rollout selectors match like any tag.
//!
//! A target downloads its bundle only while it holds a lease: the artifact
//! route refuses anyone else, so the cap is enforced where the bytes go,
//! not only where the link is handed out.

pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use ota_format::api::{
    self, Action, AgentState, CheckinRequest, Event, EventDetail, EventKind, Slot, UpdateInHand,
};
use tracing::{Instrument, info, info_span};

use crate::app::App;
use crate::backend::AuthedDevice;
use crate::http::ApiErr;
use crate::metrics::{ActionLabel, KindLabel};
use crate::releases::bundle::Bundle;
use crate::rollout::{Decision, Member, Phase, RolloutError, RolloutSpec, window};
use crate::store::StoreError;
use wire::{
    ArtifactRef, BasePoll, CancelAction, Chunk, Deployment, DeploymentBase, Feedback, Handling,
    Hashes, Link, MaintenanceWindow, PollConfig, Polling, StopId, action_id, module_id, sleep_hms,
};

/// The version a DDI target is taken to run until it has reported an
/// install (DDI polls carry none).
pub const UNKNOWN_VERSION: &str = "unknown";

/// Feedback and configData bodies are small; hawkBit caps them too.
const MAX_BODY: usize = 64 << 10;

/// The DDI routes (merged into [`crate::http::router`]).
pub fn routes() -> Router<Arc<App>> {
    const BASE: &str = "/{tenant}/controller/v1/{cid}";
    Router::new()
        .route(BASE, get(poll))
        .route(
            &format!("{BASE}/deploymentBase/{{action}}"),
            get(deployment_base),
        )
        .route(
            &format!("{BASE}/deploymentBase/{{action}}/feedback"),
            post(deployment_feedback),
        )
        .route(
            &format!("{BASE}/installedBase/{{action}}"),
            get(installed_base),
        )
        .route(
            &format!("{BASE}/cancelAction/{{action}}"),
            get(cancel_action),
        )
        .route(
            &format!("{BASE}/cancelAction/{{action}}/feedback"),
            post(cancel_feedback),
        )
        .route(&format!("{BASE}/configData"), put(config_data))
        .route(
            &format!("{BASE}/softwaremodules/{{module}}/artifacts/{{filename}}"),
            get(download),
        )
}

/// A DDI error answer, shaped like hawkBit's (`errorCode`, `message`), so
/// DDI clients log something readable.
pub struct DdiErr(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for DdiErr {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "exceptionClass": "edge-ota",
            "errorCode": format!("hawkbit.server.error.{}", self.1),
            "message": self.2,
        });
        let mut r = (self.0, axum::Json(body)).into_response();
        if self.1 == "unavailable" {
            // Counted and logged like the agent API's (`count_unavailable`).
            r.extensions_mut()
                .insert(crate::http::BackendUnavailable(self.2.clone()));
        }
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            // Jittered, as the agent API's: a fleet turned away together
            // does not return together.
            use rand::Rng as _;
            let secs = rand::rng().random_range(1..=5u32);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

impl From<ApiErr> for DdiErr {
    fn from(e: ApiErr) -> Self {
        DdiErr(e.0, e.1, e.2)
    }
}

impl From<StoreError> for DdiErr {
    fn from(e: StoreError) -> Self {
        ApiErr::from(e).into()
    }
}

impl From<RolloutError> for DdiErr {
    fn from(e: RolloutError) -> Self {
        ApiErr::from(e).into()
    }
}

fn bad(m: impl Into<String>) -> DdiErr {
    DdiErr(StatusCode::BAD_REQUEST, "rest.body.notreadable", m.into())
}

fn not_found(m: impl Into<String>) -> DdiErr {
    DdiErr(StatusCode::NOT_FOUND, "repo.entitiyNotFound", m.into())
}

/// Authenticates the caller as target `cid` of `tenant`.
async fn target(
    app: &App,
    headers: &HeaderMap,
    tenant: &str,
    cid: &str,
) -> Result<AuthedDevice, DdiErr> {
    if !tenant.eq_ignore_ascii_case(&app.config.ddi.tenant) {
        return Err(not_found(format!(
            "unknown tenant {tenant:?}; this server serves tenant {:?} (ddi.tenant in server.toml)",
            app.config.ddi.tenant
        )));
    }
    api::check_name("controller id", cid).map_err(bad)?;
    let unauthorized = |m: String| DdiErr(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (scheme, token) = auth.split_once(' ').unwrap_or((auth, ""));
    let token = token.trim();
    match scheme {
        "TargetToken" => {
            let dev = app.state.authenticate(token).await?.ok_or_else(|| {
                unauthorized(format!(
                    "unknown target token for {cid}; provision the target with `ota-server device add --id {cid} --type T` and give it that token"
                ))
            })?;
            if dev.id != cid {
                return Err(DdiErr(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "the target token is {}'s, not {cid}'s; a target authenticates as itself only",
                        dev.id
                    ),
                ));
            }
            Ok(dev)
        }
        "GatewayToken" => {
            let gw = &app.config.ddi.gateway_token;
            if gw.is_empty() || !crate::app::ct_eq(token.as_bytes(), gw.as_bytes()) {
                return Err(unauthorized(
                    "wrong gateway token, or gateway tokens are off (ddi.gateway_token in server.toml)".into(),
                ));
            }
            app.state.device_by_id(cid).await?.ok_or_else(|| {
                not_found(format!(
                    "target {cid} is not provisioned; targets are not created by polling: run `ota-server device add --id {cid} --type T`"
                ))
            })
        }
        _ => Err(unauthorized(
            "DDI needs `Authorization: TargetToken <device token>` (or GatewayToken); anonymous access is off".into(),
        )),
    }
}

/// The check-in a DDI poll stands for: an idle device on its last
/// installed version, decoding only bundles.
fn idle_request(dev: &AuthedDevice, version: Option<&str>) -> CheckinRequest {
    CheckinRequest {
        install_gate: false,
        time_zone: None,
        current_version: version
            .or(dev.version.as_deref())
            .unwrap_or(UNKNOWN_VERSION)
            .into(),
        booted_slot: dev.booted_slot.unwrap_or(Slot::A),
        state: AgentState::Idle,
        update: None,
        freshness_held: None,
        delta_codecs: ota_format::manifest::Codecs::bundles(),
    }
}

/// The check-in a base poll stands for. With `ddi.download_ahead` the
/// target is taken to honor `maintenanceWindow` (it can hold a downloaded
/// update): it is admitted outside windows too, and a target whose attempt
/// waits for its window asks the install gate, as an agent in
/// `waiting-for-window` does; the poll then links the action again when
/// the window opens or an operator said install now.
///
/// # Cancel safety
/// Reads only.
async fn poll_request(app: &App, dev: &AuthedDevice) -> Result<CheckinRequest, DdiErr> {
    let mut req = idle_request(dev, None);
    if !app.config.ddi.download_ahead {
        return Ok(req);
    }
    req.install_gate = true;
    if let Some(m) = memberships(app, dev)
        .await?
        .into_iter()
        .find(|m| m.phase == Phase::WaitingForWindow)
    {
        req.state = AgentState::WaitingForWindow;
        req.update = Some(UpdateInHand {
            update_id: m.update_id,
            progress: Default::default(),
        });
    }
    Ok(req)
}

/// Whether attempt `m` of a rollout with `spec` may install now, when
/// `ddi.download_ahead` makes maintenance windows visible to DDI targets:
/// `None` when they are not (the option is off, or the rollout has no
/// windows).
fn window_state(app: &App, spec: &RolloutSpec, m: &Member) -> Option<MaintenanceWindow> {
    if !app.config.ddi.download_ahead || spec.windows.is_empty() {
        return None;
    }
    // A DDI target reports no time zone: its `local` windows are UTC
    // (docs/ddi.md).
    let open = m.install_now
        || window::install_allowed(
            &spec.windows,
            app.state.window_clock().now(),
            &window::DeviceZone::utc(),
        );
    Some(if open {
        MaintenanceWindow::Available
    } else {
        MaintenanceWindow::Unavailable
    })
}

/// `scheme://host` for absolute links (DDI clients fetch `href`s as they
/// are): the request's `Host`, else the listen address.
fn origin(app: &App, headers: &HeaderMap) -> String {
    let scheme = if app.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        })
        .unwrap_or(&app.config.listen);
    format!("{scheme}://{host}")
}

fn link(href: String) -> Link {
    Link { href }
}

/// `GET /{tenant}/controller/v1/{controllerId}`: the base poll.
async fn poll(
    State(app): State<Arc<App>>,
    Path((tenant, cid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let span = info_span!("ddi_poll", target = %dev.id);
    let live = app.live.config();
    let c = &live.checkin;
    let req = poll_request(&app, &dev).await?;
    let decision = app.state.checkin(&dev, &req).instrument(span).await?;
    let (action, durable, base) = crate::http::answer_of(&app, c, decision);
    let sleep = crate::http::jittered(base, c.jitter);
    let prefix = format!("{}/{tenant}/controller/v1/{cid}", origin(&app, &headers));
    let mut links = std::collections::BTreeMap::new();
    // As hawkBit: ask for attributes while none are stored.
    if !dev.tags.keys().any(|k| k.starts_with(ATTR_PREFIX)) {
        links.insert("configData".into(), link(format!("{prefix}/configData")));
    }
    // The attempt that installed what the target runs (hawkBit links its
    // last successful action as `installedBase`).
    if let Some(v) = dev.version.as_deref().filter(|v| *v != UNKNOWN_VERSION)
        && let Some(u) = app.state.installed_update(&dev.id, v).await?
    {
        links.insert(
            "installedBase".into(),
            link(format!("{prefix}/installedBase/{}", action_id(&u))),
        );
    }
    let label = match &action {
        Action::Update(o) => {
            if durable {
                app.metrics.admissions.inc();
            }
            links.insert(
                "deploymentBase".into(),
                link(format!(
                    "{prefix}/deploymentBase/{}",
                    action_id(&o.update_id)
                )),
            );
            "update"
        }
        Action::Cancel { update_id, .. } => {
            links.insert(
                "cancelAction".into(),
                link(format!("{prefix}/cancelAction/{}", action_id(update_id))),
            );
            "cancel"
        }
        Action::Wait { .. } => "wait",
        Action::None => "none",
        // A target waiting for its window (`ddi.download_ahead`) may
        // install now: the action again, now with `update: forced`.
        Action::Install { update_id } => {
            links.insert(
                "deploymentBase".into(),
                link(format!("{prefix}/deploymentBase/{}", action_id(update_id))),
            );
            "install"
        }
    };
    app.metrics
        .checkins
        .get_or_create(&ActionLabel { action: label })
        .inc();
    Ok(axum::Json(BasePoll {
        config: PollConfig {
            polling: Polling {
                sleep: sleep_hms(sleep),
            },
        },
        links,
    })
    .into_response())
}

/// The target's rollout memberships (its attempts), as its device view
/// holds them.
async fn memberships(app: &App, dev: &AuthedDevice) -> Result<Vec<Member>, DdiErr> {
    let view = app
        .state
        .device_view(&dev.id)
        .await?
        .ok_or_else(|| not_found(format!("target {} was retired", dev.id)))?;
    serde_json::from_value(view["rollouts"].clone()).map_err(|e| crate::http::internal(e).into())
}

/// The target's attempt (rollout member) whose action id is `id`, and the
/// spec of its rollout.
async fn find_action(
    app: &App,
    dev: &AuthedDevice,
    id: &str,
) -> Result<(Member, RolloutSpec), DdiErr> {
    let n: u32 = id
        .parse()
        .map_err(|_| bad(format!("action id {id:?} is not a number")))?;
    let members = memberships(app, dev).await?;
    let m = members
        .into_iter()
        .find(|m| !m.update_id.is_empty() && action_id(&m.update_id) == n)
        .ok_or_else(|| {
            not_found(format!(
                "target {} has no action {n}; poll the base resource for its current action",
                dev.id
            ))
        })?;
    let spec = spec_of(app, &m).await?;
    Ok((m, spec))
}

/// The spec of the rollout of attempt `m` (the release it offers, its
/// windows).
async fn spec_of(app: &App, m: &Member) -> Result<RolloutSpec, DdiErr> {
    let rollout = m.update_id.split('.').next().unwrap_or("");
    app.state
        .rollout_spec(rollout)
        .await?
        .ok_or_else(|| not_found(format!("rollout {rollout} was deleted")))
}

/// The bundle of `release` for `dev`'s type, or why there is none.
fn bundle_of(app: &App, dev: &AuthedDevice, release: &str) -> Result<Bundle, DdiErr> {
    app.releases.bundle(&dev.device_type, release).ok_or_else(|| {
        DdiErr(
            StatusCode::CONFLICT,
            "action.notBundle",
            format!(
                "release {release} of {} is not an opaque release; DDI targets install bundles added with `release add --format swu|raucb|file`",
                dev.device_type
            ),
        )
    })
}

/// `GET .../deploymentBase/{actionId}`.
async fn deployment_base(
    State(app): State<Arc<App>>,
    Path((tenant, cid, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let (m, spec) = find_action(&app, &dev, &action).await?;
    deployment_answer(&app, &headers, &tenant, &dev, &m, &spec)
}

/// `GET .../installedBase/{actionId}`: the deployment of the attempt that
/// installed the version the target runs (the base poll links it), as
/// `deploymentBase` shows it; any other action is `404`.
async fn installed_base(
    State(app): State<Arc<App>>,
    Path((tenant, cid, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let (m, spec) = find_action(&app, &dev, &action).await?;
    if m.phase != Phase::Committed || dev.version.as_deref() != Some(spec.release.as_str()) {
        return Err(not_found(format!(
            "action {action} is not the installed base of {cid} (it runs {}); the base poll links the installed base",
            dev.version.as_deref().unwrap_or(UNKNOWN_VERSION)
        )));
    }
    deployment_answer(&app, &headers, &tenant, &dev, &m, &spec)
}

/// The `deploymentBase` JSON of attempt `m` (of rollout `spec`) for `dev`.
fn deployment_answer(
    app: &App,
    headers: &HeaderMap,
    tenant: &str,
    dev: &AuthedDevice,
    m: &Member,
    spec: &RolloutSpec,
) -> Result<Response, DdiErr> {
    let cid = &dev.id;
    let release = spec.release.as_str();
    let b = bundle_of(app, dev, release)?;
    // The holder of a lease (or a target past its download) goes ahead; an
    // attempt the server ended is skipped (SWUpdate stops downloading on
    // `skip`). Outside its maintenance window (`ddi.download_ahead`) a
    // target downloads but does not install, as hawkBit says it.
    let window = window_state(app, spec, m);
    let (download, update) = match m.phase {
        Phase::Downloading | Phase::Downloaded | Phase::WaitingForWindow => {
            let update = if window == Some(MaintenanceWindow::Unavailable) {
                Handling::Skip
            } else {
                Handling::Forced
            };
            (Handling::Forced, update)
        }
        Phase::Installed | Phase::Rebooting | Phase::Committed => {
            (Handling::Forced, Handling::Forced)
        }
        Phase::Waiting | Phase::Failed | Phase::RolledBack | Phase::Cancelled => {
            (Handling::Skip, Handling::Skip)
        }
    };
    let module = module_id(&dev.device_type, release);
    let href = format!(
        "{}/{tenant}/controller/v1/{cid}/softwaremodules/{module}/artifacts/{}",
        origin(app, headers),
        b.filename
    );
    let mut links = std::collections::BTreeMap::new();
    let key = if app.config.tls.is_some() {
        "download"
    } else {
        "download-http"
    };
    links.insert(key.to_string(), link(href));
    Ok(axum::Json(DeploymentBase {
        id: action_id(&m.update_id).to_string(),
        deployment: Deployment {
            download,
            update,
            maintenance_window: window,
            chunks: vec![Chunk {
                part: b.module_type.clone(),
                version: release.to_string(),
                name: format!("{}-{release}", dev.device_type),
                artifacts: vec![ArtifactRef {
                    filename: b.filename.clone(),
                    hashes: Hashes {
                        sha1: b.sha1.clone(),
                        md5: b.md5.clone(),
                        sha256: b.sha256.to_string(),
                    },
                    size: b.size,
                    links,
                }],
            }],
        },
    })
    .into_response())
}

async fn read_feedback(body: Body) -> Result<Feedback, DdiErr> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        DdiErr(
            StatusCode::PAYLOAD_TOO_LARGE,
            "rest.body.tooLarge",
            format!("feedback bodies are limited to {MAX_BODY} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "malformed feedback: {e}; expected {{\"status\": {{\"execution\": closed|proceeding|canceled|scheduled|rejected|resumed|downloaded|download, \"result\": {{\"finished\": success|failure|none}}, \"details\": [..]}}}}"
        ))
    })
}

/// A per-target event sequence for DDI feedback (DDI has none): the wall
/// clock in microseconds, made strictly increasing within this process.
fn next_seq() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::now_ms() * 1000;
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `POST .../deploymentBase/{actionId}/feedback`: mapped onto events
/// ([`wire::events_for`]).
async fn deployment_feedback(
    State(app): State<Arc<App>>,
    Path((tenant, cid, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let f = read_feedback(body).await?;
    let (m, spec) = find_action(&app, &dev, &action).await?;
    let release = spec.release.clone();
    let (mut kinds, reason) = wire::events_for(&f.status);
    // Downloaded outside its window (`ddi.download_ahead`): the target waits
    // with the update, and its lease goes to the next one.
    if kinds == [EventKind::Downloaded]
        && window_state(&app, &spec, &m) == Some(MaintenanceWindow::Unavailable)
    {
        kinds.push(EventKind::WaitingForWindow);
    }
    let closed = matches!(
        m.phase,
        Phase::Committed | Phase::Failed | Phase::RolledBack | Phase::Cancelled
    );
    if closed {
        return Err(DdiErr(
            StatusCode::GONE,
            "action.closed",
            format!(
                "action {action} of target {cid} is closed ({:?}); poll the base resource for the current one",
                m.phase
            ),
        ));
    }
    let span = info_span!("ddi_feedback", target = %dev.id, update_id = %m.update_id,
        execution = ?f.status.execution, finished = ?f.status.result.finished);
    let events: Vec<Event> = kinds
        .iter()
        .map(|&kind| Event {
            seq: next_seq(),
            update_id: m.update_id.clone(),
            kind,
            at: now_rfc3339(),
            detail: EventDetail {
                progress: None,
                reason: (kind == EventKind::Failed)
                    .then(|| reason.clone().map(|r| truncate(r, api::MAX_DETAIL_LEN)))
                    .flatten(),
                version: (kind == EventKind::Committed).then(|| release.clone()),
            },
        })
        .collect();
    let new = app
        .state
        .apply_events(&dev.id, &events)
        .instrument(span.clone())
        .await?;
    for (e, new) in events.iter().zip(new) {
        if new {
            let kind = serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            app.metrics.events.get_or_create(&KindLabel { kind }).inc();
        }
    }
    if kinds.contains(&EventKind::Committed) {
        // The target runs the release now: record it as the version it
        // reports, as an agent's next check-in would.
        app.state
            .checkin(&dev, &idle_request(&dev, Some(&release)))
            .instrument(span.clone())
            .await?;
    }
    span.in_scope(|| info!(events = events.len(), "DDI feedback applied"));
    Ok(StatusCode::OK.into_response())
}

/// `GET .../cancelAction/{actionId}`: the attempt the server ended.
async fn cancel_action(
    State(app): State<Arc<App>>,
    Path((tenant, cid, action)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let (m, _) = find_action(&app, &dev, &action).await?;
    let id = action_id(&m.update_id).to_string();
    Ok(axum::Json(CancelAction {
        id: id.clone(),
        cancel_action: StopId { stop_id: id },
    })
    .into_response())
}

/// `POST .../cancelAction/{actionId}/feedback`: acknowledged. The engine
/// ended the attempt when it said so (the lease is already free), so a
/// target's confirmation changes nothing; it is logged.
async fn cancel_feedback(
    State(app): State<Arc<App>>,
    Path((tenant, cid, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let f = read_feedback(body).await?;
    let (m, _) = find_action(&app, &dev, &action).await?;
    info!(target = %dev.id, update_id = %m.update_id, execution = ?f.status.execution,
        finished = ?f.status.result.finished, "DDI cancel feedback");
    Ok(StatusCode::OK.into_response())
}

/// Tag-key prefix of DDI attributes (`configData`): kept apart from the
/// operator's tags, which a target can neither change nor remove, and
/// usable in rollout selectors (`ddi.hwRevision=2`).
pub const ATTR_PREFIX: &str = "ddi.";

/// `PUT .../configData`: the target's attributes, stored as its tags
/// `ddi.<key>` (`mode` `merge`, the default, `replace` — all `ddi.` tags —
/// or `remove`). An attribute that cannot be a tag (tags are 1–128 bytes of
/// `[A-Za-z0-9._:+-]`) is skipped with a warning rather than refused: a
/// client whose configData is refused sends it again before anything else
/// (SWUpdate does) and would never install.
async fn config_data(
    State(app): State<Arc<App>>,
    Path((tenant, cid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| bad(format!("configData bodies are limited to {MAX_BODY} bytes")))?;
    let c: wire::ConfigData = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "malformed configData: {e}; expected {{\"data\": {{\"key\": \"value\"}}, \"mode\": \"merge\"}}"
        ))
    })?;
    let tags = merge_attributes(&dev.tags, &c).map_err(bad)?;
    let skipped: Vec<&String> = c
        .data
        .keys()
        .filter(|k| !tags.contains_key(&format!("{ATTR_PREFIX}{k}")))
        .collect();
    if !skipped.is_empty() && c.mode.as_deref() != Some("remove") {
        tracing::warn!(target = %dev.id, ?skipped,
            "DDI configData attributes skipped: keys and values must be 1-128 bytes of [A-Za-z0-9._:+-]");
    }
    if tags != dev.tags {
        app.state.set_tags(&dev.id, tags).await?;
    }
    info!(target = %dev.id, attributes = c.data.len(), mode = c.mode.as_deref().unwrap_or("merge"),
        "DDI configData stored as ddi.* tags");
    Ok(StatusCode::OK.into_response())
}

/// The target's tags after `c` (see [`config_data`]); an error for a bad
/// mode or too many tags.
pub fn merge_attributes(
    tags: &std::collections::BTreeMap<String, String>,
    c: &wire::ConfigData,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = tags.clone();
    let valid = |k: &str, v: &str| {
        api::check_name("attribute", &format!("{ATTR_PREFIX}{k}")).is_ok()
            && api::check_name("attribute value", v).is_ok()
    };
    match c.mode.as_deref().unwrap_or("merge") {
        "merge" => {}
        "replace" => out.retain(|k, _| !k.starts_with(ATTR_PREFIX)),
        "remove" => {
            for k in c.data.keys() {
                out.remove(&format!("{ATTR_PREFIX}{k}"));
            }
            return Ok(out);
        }
        m => {
            return Err(format!(
                "unknown configData mode {m:?}; use merge, replace or remove"
            ));
        }
    }
    for (k, v) in &c.data {
        if valid(k, v) {
            out.insert(format!("{ATTR_PREFIX}{k}"), v.clone());
        }
    }
    if out.len() > 32 {
        return Err(format!(
            "a device has at most 32 tags; these attributes would make {}",
            out.len()
        ));
    }
    Ok(out)
}

/// `GET|HEAD .../softwaremodules/{module}/artifacts/{filename}`: the bundle,
/// with HTTP Range, to a target holding the download lease of an action
/// for that module. Each request renews the lease, and the transfer keeps
/// renewing it ([`keep_lease_while_streaming`]).
async fn download(
    State(app): State<Arc<App>>,
    Path((tenant, cid, module, filename)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, DdiErr> {
    let dev = target(&app, &headers, &tenant, &cid).await?;
    let module: u32 = module
        .parse()
        .map_err(|_| bad(format!("software module id {module:?} is not a number")))?;
    let members = memberships(&app, &dev).await?;
    let mut found = None;
    for m in members.into_iter().filter(|m| !m.update_id.is_empty()) {
        let spec = spec_of(&app, &m).await?;
        if module_id(&dev.device_type, &spec.release) == module {
            found = Some((m, spec));
            break;
        }
    }
    let Some((m, spec)) = found else {
        return Err(not_found(format!(
            "target {cid} has no action for software module {module}"
        )));
    };
    let release = spec.release.clone();
    let b = bundle_of(&app, &dev, &release)?;
    if b.filename != filename {
        return Err(not_found(format!(
            "software module {module} has no artifact {filename:?} (it has {:?})",
            b.filename
        )));
    }
    let no_lease = || {
        DdiErr(
            StatusCode::CONFLICT,
            "action.noLease",
            format!(
                "target {cid} holds no download lease for {release}; poll the base resource and download when it links deploymentBase"
            ),
        )
    };
    // A target that downloaded ahead of its window and may install now
    // fetches again if it did not keep the bundle (SWUpdate streams it into
    // the install): its first download was made under the cap, and this
    // one is part of installing, as a reboot is.
    let installing = matches!(m.phase, Phase::Downloaded | Phase::WaitingForWindow)
        && window_state(&app, &spec, &m) == Some(MaintenanceWindow::Available);
    if !installing {
        if m.phase != Phase::Downloading {
            return Err(no_lease());
        }
        // The same decision as a poll: renews the lease, or says it is gone.
        match app.state.checkin(&dev, &idle_request(&dev, None)).await? {
            Decision::Answer(Action::Update(o)) | Decision::AnswerDurable(Action::Update(o))
                if o.update_id == m.update_id => {}
            _ => return Err(no_lease()),
        }
    }
    let resp = crate::artifacts::serve(
        &app.artifacts,
        app.egress.clone(),
        app.bytes_served.clone(),
        &method,
        &headers,
        &b.sha256,
    )
    .instrument(info_span!("ddi_download", target = %dev.id, update_id = %m.update_id))
    .await;
    if method == Method::GET
        && let Some(n) = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        app.state.count_bytes(&dev.id, n);
    }
    if method != Method::GET || !resp.status().is_success() {
        return Ok(resp);
    }
    if installing {
        return Ok(resp);
    }
    Ok(keep_lease_while_streaming(&app, dev, m.update_id, resp))
}

/// A DDI client downloads its bundle in one long GET and says nothing
/// until it is done: without renewals during the transfer, a download
/// longer than `lease_ms` (a large bundle, a slow link) lost its lease
/// half-way, the slot went to the next target while this one still
/// downloaded, and its success was then refused as an expired attempt.
/// So while the body streams, a keeper renews the lease every third of its
/// term, as an agent's progress events do. When the server has written the
/// last byte, the sockets' buffers may still hold seconds (on a slow link,
/// minutes) of it: the keeper goes on for up to [`AFTER_BODY_TERMS`] lease
/// terms, until the target's feedback ends the download. A client that
/// goes away mid-body (the body is dropped) gets one last renewal. The
/// keeper stops when the lease is no longer held (feedback ended the
/// download, or it expired).
///
/// # Cancel safety
/// The keeper is a task owned by the body: dropping the response (client
/// gone, server shutdown) ends it after at most one more renewal; a
/// renewal is one check-in decision.
fn keep_lease_while_streaming(
    app: &Arc<App>,
    dev: AuthedDevice,
    update_id: String,
    resp: Response,
) -> Response {
    use futures_util::StreamExt as _;
    let lease_ms = app.live.config().checkin.lease_ms;
    let every = std::time::Duration::from_millis((lease_ms / 3).max(100));
    // `stop`: the body is gone (done or dropped); `done`: it was written whole.
    let (stop, done) = (
        tokio_util::sync::CancellationToken::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let (app2, stopped, written) = (app.clone(), stop.clone(), done.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut grace_until = None;
        loop {
            tokio::select! {
                _ = stopped.cancelled(), if grace_until.is_none() => {
                    if !written.is_cancelled() {
                        // Gone mid-body: one last renewal, below.
                        grace_until = Some(tokio::time::Instant::now());
                    } else {
                        grace_until = Some(
                            tokio::time::Instant::now()
                                + std::time::Duration::from_millis(lease_ms * AFTER_BODY_TERMS),
                        );
                    }
                }
                _ = tick.tick() => {}
            }
            // Only the lease: a check-in would also record the version the
            // target ran when the GET started (after its `closed` feedback,
            // undoing the version it installed); an event would be history
            // the target never sent.
            match app2.state.renew_lease(&dev.id, &update_id).await {
                Ok(true) => {}
                // Done (its feedback came) or expired: nothing to keep.
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(target = %dev.id, error = %e, "renewing a DDI download lease")
                }
            }
            if grace_until.is_some_and(|t| tokio::time::Instant::now() >= t) {
                return;
            }
        }
    });
    let guard = stop.drop_guard();
    let (parts, body) = resp.into_parts();
    // hyper stops polling a body once it has sent `Content-Length` bytes
    // (it may never see the end of the stream): count them.
    let len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut sent = 0u64;
    let body = body.into_data_stream().map(move |chunk| {
        let _keeper = &guard;
        if let Ok(c) = &chunk {
            sent += c.len() as u64;
            if len.is_none_or(|n| sent >= n) {
                done.cancel();
            }
        }
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Lease terms the keeper renews for after the last byte was written.
const AFTER_BODY_TERMS: u64 = 4;
