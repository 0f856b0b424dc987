//! HTTP routes: the device API, artifacts, the admin API, `/metrics` and
//! `/healthz`. `docs/api.md` describes them; the bodies are
//! `ota_format::api` types.
//!
//! Every handler reads its body through [`read_json`], which caps the size
//! and turns any parse error into a `400` with a message, so malformed input
//! never reaches the state and always gets a JSON error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::backend::{AuthedDevice, CertAuth};
use crate::tls::{ClientIdentity, PeerCert};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use futures_util::StreamExt;
use ota_format::api::{
    self, Action, ApiError, CheckinRequest, EnrollRequest, EnrollResponse, EventsRequest,
    EventsResponse,
};
use rand::Rng;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::app::App;
use crate::metrics::{ActionLabel, KindLabel, ReasonLabel};
use crate::rollout::{Decision, RolloutError, RolloutSpec, RolloutState};
use crate::store::StoreError;

/// An error answer: status, stable code, message for the operator.
pub struct ApiErr(pub StatusCode, pub &'static str, pub String);

/// Marks an answer refused because the state backend (PostgreSQL, Redis)
/// could not be reached. [`count_unavailable`] counts and logs these: the
/// conversion from [`StoreError`] has no access to the replica's metrics.
#[derive(Clone)]
pub(crate) struct BackendUnavailable(pub(crate) String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body = ApiError {
            code: self.1.into(),
            error: self.2,
        };
        let unavailable = (self.1 == "unavailable").then(|| BackendUnavailable(body.error.clone()));
        let mut r = (self.0, axum::Json(body)).into_response();
        if let Some(u) = unavailable {
            r.extensions_mut().insert(u);
        }
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            // Jittered, so a fleet turned away together does not return
            // together.
            let secs = rand::rng().random_range(1..=5u32);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

pub(crate) fn bad_request(m: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::BAD_REQUEST, "bad_request", m.into())
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiErr {
    warn!(error = %e, "internal error");
    ApiErr(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{e}; the server logs have details"),
    )
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ShuttingDown => ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; retry shortly".into(),
            ),
            StoreError::Unavailable(m) => ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{m}; retry shortly"),
            ),
            e => internal(e),
        }
    }
}

impl From<RolloutError> for ApiErr {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::Invalid(m) => bad_request(m),
            RolloutError::Conflict(m) => ApiErr(StatusCode::CONFLICT, "conflict", m),
            RolloutError::NotFound(id) => ApiErr(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no rollout {id}"),
            ),
            RolloutError::Store(e) => e.into(),
        }
    }
}

/// `408` when a body read failed on the listener's body deadline
/// ([`crate::listener::BodyTimeout`]), `None` for any other body error.
fn body_error(e: axum::Error) -> Option<ApiErr> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<crate::listener::BodyTimeout>() {
            return Some(ApiErr(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                t.to_string(),
            ));
        }
        cause = c.source();
    }
    None
}

/// Reads a JSON body of at most `MAX_REQUEST_BYTES`.
pub(crate) async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiErr> {
    let bytes = axum::body::to_bytes(body, api::MAX_REQUEST_BYTES)
        .await
        .map_err(|e| {
            body_error(e).unwrap_or_else(|| {
                ApiErr(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!(
                        "request bodies are limited to {} bytes",
                        api::MAX_REQUEST_BYTES
                    ),
                )
            })
        })?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("malformed JSON body: {e}")))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn unauthorized() -> ApiErr {
    ApiErr(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or unknown device token; enroll the device again (or provision it with `ota-server device add`)"
            .into(),
    )
}

/// The admin API's 401: about the admin token, not about devices.
pub(crate) fn admin_unauthorized() -> ApiErr {
    ApiErr(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong admin token; use `admin_token` from server.toml or a token from `ota-server user add` (--admin-token or OTA_ADMIN_TOKEN)"
            .into(),
    )
}

/// The connection's verified client certificate, if any (see
/// [`crate::tls`]).
type Identity = Option<Extension<ClientIdentity>>;

/// The calling device: the one its client certificate names, else the one
/// its bearer token belongs to. With both, they must be the same device: a
/// certificate for X never acts as Y.
async fn device_auth(
    app: &App,
    headers: &HeaderMap,
    ident: &Identity,
) -> Result<AuthedDevice, ApiErr> {
    let cert = match ident.as_ref().map(|Extension(i)| i) {
        None | Some(ClientIdentity::None) => {
            let Some(t) = bearer(headers) else {
                return Err(unauthorized());
            };
            return app.state.authenticate(t).await?.ok_or_else(unauthorized);
        }
        Some(ClientIdentity::Refused(reason)) => {
            return Err(ApiErr(
                StatusCode::FORBIDDEN,
                "certificate_refused",
                format!(
                    "the client certificate was refused: {reason}; the device needs a certificate from the fleet CA that is valid now (check its clock) and not revoked"
                ),
            ));
        }
        Some(ClientIdentity::Verified(c)) => c.clone(),
    };
    let dev = cert_device(app, &cert).await?;
    if let Some(t) = bearer(headers) {
        match app.state.authenticate(t).await? {
            Some(d) if d.id == dev.id => {}
            Some(d) => {
                warn!(certificate_device = %dev.id, token_device = %d.id, serial = %cert.serial,
                    "request refused: client certificate and bearer token name different devices");
                return Err(ApiErr(
                    StatusCode::FORBIDDEN,
                    "identity_mismatch",
                    format!(
                        "the client certificate is device {}'s but the bearer token is device {}'s; a device authenticates as itself only",
                        dev.id, d.id
                    ),
                ));
            }
            None => return Err(unauthorized()),
        }
    }
    Ok(dev)
}

/// The device a verified client certificate names, unless it is revoked.
async fn cert_device(app: &App, cert: &PeerCert) -> Result<AuthedDevice, ApiErr> {
    let Some(id) = &cert.device_id else {
        warn!(serial = %cert.serial, "client certificate without a device id in its subject CN refused");
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            "certificate_no_device",
            "the client certificate's subject CN is not a device id; the fleet CA must issue it with /CN=<device id>".into(),
        ));
    };
    match app.state.authenticate_cert(id, &cert.serial).await? {
        CertAuth::Device(d) => Ok(d),
        CertAuth::Revoked => {
            warn!(device = %id, serial = %cert.serial, "revoked client certificate refused");
            Err(ApiErr(
                StatusCode::FORBIDDEN,
                "certificate_revoked",
                format!(
                    "the client certificate of device {id} (serial {}) is revoked; the operator must issue the device a new one",
                    cert.serial
                ),
            ))
        }
        CertAuth::UnknownDevice => Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!(
                "the client certificate names device {id}, which is not enrolled; enroll it first"
            ),
        )),
    }
}

/// The router.
pub fn router(app: Arc<App>) -> Router {
    // The admin API, behind one gate: authentication, the role each
    // request needs, and the audit log (crate::audit). A route layer, so
    // the device API's requests never pass through it.
    let admin = Router::new()
        .route(
            "/api/v1/admin/devices",
            post(admin_device_add).get(crate::admin::device_list),
        )
        .route(
            "/api/v1/admin/devices/{id}",
            get(admin_device_get).delete(crate::admin::device_retire),
        )
        .route(
            "/api/v1/admin/devices/{id}/revoke-cert",
            post(admin_device_revoke_cert),
        )
        .route("/api/v1/admin/releases", get(admin_releases))
        .route("/api/v1/admin/reload", post(admin_reload))
        .route("/api/v1/admin/stats", get(admin_stats))
        .route(
            "/api/v1/admin/releases/{device_type}/{version}",
            put(admin_release_add).delete(crate::admin::release_delete),
        )
        .route(
            "/api/v1/admin/rollouts",
            post(admin_rollout_create).get(crate::admin::rollout_list),
        )
        .route("/api/v1/admin/rollouts/{id}", get(admin_rollout_get))
        .route(
            "/api/v1/admin/groups",
            post(crate::admin::group_create).get(crate::admin::group_list),
        )
        .route(
            "/api/v1/admin/groups/{name}",
            get(crate::admin::group_get).delete(crate::admin::group_delete),
        )
        .route(
            "/api/v1/admin/rollouts/{id}/{verb}",
            post(admin_rollout_action),
        )
        .route("/api/v1/admin/audit", get(crate::admin::audit_list))
        .route(
            "/api/v1/admin/users",
            post(crate::admin::user_create).get(crate::admin::user_list),
        )
        .route(
            "/api/v1/admin/users/{name}",
            axum::routing::delete(crate::admin::user_delete),
        )
        .route(
            "/api/v1/admin/devices/{id}/history",
            get(crate::admin::device_history),
        )
        .merge(crate::windows_http::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::audit::layer,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/devices/enroll", post(enroll))
        .route("/api/v1/devices/checkin", post(checkin))
        .route("/api/v1/devices/events", post(events))
        .route("/api/v1/artifacts/{sha256}", get(artifact))
        .merge(admin)
        .merge(crate::ui::routes())
        .merge(crate::ddi::routes())
        .fallback(|| async {
            ApiErr(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see docs/api.md".into(),
            )
        })
        .layer(axum::middleware::map_response_with_state(
            app.clone(),
            count_unavailable,
        ))
        .with_state(app)
}

/// Counts answers refused because the backend was unreachable and logs them
/// at most once per second per replica: while PostgreSQL restarts a replica
/// refuses hundreds of requests a second, and one WARN each would bury the
/// journal (and cost more than the answers). The counter
/// (`ota_backend_unavailable_total`) keeps the exact figure.
async fn count_unavailable(State(app): State<Arc<App>>, r: Response) -> Response {
    if let Some(BackendUnavailable(error)) = r.extensions().get::<BackendUnavailable>() {
        app.metrics.backend_unavailable.inc();
        if let Some(suppressed) = app.unavailable_log.admit() {
            warn!(
                error = %error,
                similar_since_last_log = suppressed,
                "backend unavailable: answering 503 with Retry-After; check PostgreSQL/Redis"
            );
        }
    }
    r
}

/// `GET /metrics`: Prometheus text 0.0.4 unless the scraper asks for
/// OpenMetrics (see [`crate::metrics::Format::negotiate`]).
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let format = crate::metrics::Format::negotiate(
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    );
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        app.metrics.encode(format),
    )
        .into_response()
}

async fn enroll(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiErr> {
    let req: EnrollRequest = read_json(body).await?;
    if app.config.enrollment_key.is_empty() {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            "enrollment_disabled",
            "self-enrollment is disabled on this server; ask the operator to run `ota-server device add`".into(),
        ));
    }
    if !crate::app::ct_eq(
        req.enrollment_key.as_bytes(),
        app.config.enrollment_key.as_bytes(),
    ) {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            "bad_enrollment_key",
            "wrong enrollment key; check the device's configuration".into(),
        ));
    }
    check_device_fields(&req.device_id, &req.device_type, &req.tags)?;
    // Sign first: a bad CSR changes nothing.
    let issued = match &req.csr {
        None => None,
        Some(csr) => Some(sign_csr(&app, &req.device_id, csr)?),
    };
    let token = app
        .enroll(&req.device_id, &req.device_type, req.tags)
        .await?;
    let certificate = match issued {
        None => None,
        Some((pem, serial)) => {
            app.state.record_cert(&serial, &req.device_id).await?;
            info!(device = %req.device_id, %serial, "client certificate issued");
            Some(pem)
        }
    };
    Ok(axum::Json(EnrollResponse {
        device_id: req.device_id,
        token,
        certificate,
    })
    .into_response())
}

/// Signs a device's CSR with the fleet CA: (certificate PEM, serial).
fn sign_csr(app: &App, device_id: &str, csr: &str) -> Result<(String, String), ApiErr> {
    let Some(ca) = &app.device_ca else {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            "csr_unsupported",
            "this server signs no CSRs (tls.client_ca_key is not set); enroll without a csr, or ask the operator to configure the fleet CA".into(),
        ));
    };
    if csr.len() > 16 << 10 {
        return Err(bad_request("the csr is longer than 16 KiB"));
    }
    ca.issue(device_id, csr).map_err(|e| match e {
        e @ crate::certs::CsrError::Mismatch { .. } => {
            warn!(device = %device_id, error = %e, "CSR for another device refused");
            ApiErr(StatusCode::FORBIDDEN, "csr_mismatch", e.to_string())
        }
        e => bad_request(e.to_string()),
    })
}

fn check_device_fields(id: &str, t: &str, tags: &BTreeMap<String, String>) -> Result<(), ApiErr> {
    api::check_name("device id", id).map_err(bad_request)?;
    api::check_name("device type", t).map_err(bad_request)?;
    if tags.len() > 32 {
        return Err(bad_request("at most 32 tags"));
    }
    for (k, v) in tags {
        api::check_name("tag key", k).map_err(bad_request)?;
        api::check_name("tag value", v).map_err(bad_request)?;
    }
    Ok(())
}

/// `base` milliseconds with ± `jitter` relative jitter.
pub(crate) fn jittered(base: u64, jitter: f64) -> u64 {
    let f = 1.0 + rand::rng().random_range(-jitter..=jitter);
    ((base as f64) * f).max(100.0) as u64
}

/// A check-in answer as it goes on the wire: the same JSON as
/// [`ota_format::api::CheckinResponse`] (agents parse it as that), but the freshness
/// statement is the cached, already serialised envelope, neither cloned
/// nor serialised again for every check-in.
#[derive(serde::Serialize)]
struct CheckinAnswer<'a> {
    next_checkin_ms: u64,
    #[serde(flatten)]
    action: &'a Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    freshness: Option<&'a serde_json::value::RawValue>,
}

/// `value` as a JSON response, serialised into a buffer of `capacity`
/// bytes (what `axum::Json` does, without its growing buffer).
fn json_response<T: serde::Serialize>(value: &T, capacity: usize) -> Response {
    use bytes::BufMut as _;
    // BytesMut freezes into the body without another allocation.
    let mut buf = bytes::BytesMut::with_capacity(capacity).writer();
    match serde_json::to_writer(&mut buf, value) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            buf.into_inner().freeze(),
        )
            .into_response(),
        Err(e) => internal(format!("serialising the answer: {e}")).into_response(),
    }
}

/// A check-in decision as an answer: the action, whether it promised
/// something durable (an admission), and the base of the interval until
/// the next check-in (before jitter). A throttled answer counts in the
/// metrics by reason, and one near the head of the queue comes back four
/// times sooner; an update comes back well within its lease, which each
/// check-in renews. Shared by the agents' check-in and the DDI base poll.
pub(crate) fn answer_of(
    app: &App,
    c: &crate::config::CheckinConfig,
    decision: Decision,
) -> (Action, bool, u64) {
    let (action, durable) = match decision {
        Decision::Answer(a) => (a, false),
        Decision::AnswerDurable(a) => (a, true),
        Decision::Wait {
            reason,
            class,
            near_head,
        } => {
            app.metrics
                .throttled
                .get_or_create(&ReasonLabel {
                    reason: class.into(),
                })
                .inc();
            let base = if near_head {
                c.wait_interval_ms / 4
            } else {
                c.wait_interval_ms
            };
            return (Action::Wait { reason }, false, base);
        }
    };
    let base = match &action {
        Action::Update(o) => c.idle_interval_ms.min(o.lease_ms / 3),
        Action::Cancel { .. } => 1000,
        _ => c.idle_interval_ms,
    };
    (action, durable, base)
}

async fn checkin(
    State(app): State<Arc<App>>,
    ident: Identity,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiErr> {
    let dev = device_auth(&app, &headers, &ident).await?;
    let req: CheckinRequest = read_json(body).await?;
    api::check_name("current_version", &req.current_version).map_err(bad_request)?;
    if let Some(u) = &req.update
        && u.update_id.len() > 64
    {
        return Err(bad_request("update_id is too long"));
    }
    // One snapshot for the whole request: a reload meanwhile does not mix
    // old and new values in one answer.
    let live = app.live.config();
    let c = &live.checkin;
    app.releases
        .observe_agent(&dev.device_type, &req.current_version, req.delta_codecs);
    let decision = app.state.checkin(&dev, &req).await?;
    let (action, durable, base) = answer_of(&app, c, decision);
    let next = jittered(base, c.jitter);
    let label = match &action {
        Action::None => "none",
        Action::Update(_) => {
            if durable {
                app.metrics.admissions.inc();
            }
            "update"
        }
        Action::Wait { .. } => "wait",
        Action::Cancel { .. } => "cancel",
        Action::Install { .. } => "install",
    };
    app.metrics
        .checkins
        .get_or_create(&ActionLabel { action: label })
        .inc();
    let is_wait = matches!(action, Action::Wait { .. });
    let freshness = app
        .freshness
        .statement(
            &app.releases,
            &dev.device_type,
            Duration::from_secs(live.freshness_secs),
        )
        .await
        // The device holds it (it echoed its digest): left out.
        .filter(|s| req.freshness_held != Some(s.payload_sha256));
    let answer = CheckinAnswer {
        next_checkin_ms: next,
        action: &action,
        freshness: freshness.as_ref().map(|s| &*s.json),
    };
    // Sized once: the statement is most of the answer, and `axum::Json`
    // starts at 128 bytes and grows (three reallocations a check-in).
    let capacity = 256 + freshness.as_ref().map_or(0, |s| s.json.get().len());
    let mut resp = json_response(&answer, capacity);
    if is_wait {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(next.div_ceil(1000)));
    }
    Ok(resp)
}

async fn events(
    State(app): State<Arc<App>>,
    ident: Identity,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiErr> {
    let dev = device_auth(&app, &headers, &ident).await?;
    let req: EventsRequest = read_json(body).await?;
    if req.events.len() > api::MAX_EVENTS_PER_BATCH {
        return Err(bad_request(format!(
            "at most {} events per batch",
            api::MAX_EVENTS_PER_BATCH
        )));
    }
    for e in &req.events {
        if e.update_id.len() > 64 || e.at.len() > 64 {
            return Err(bad_request(format!(
                "event {}: update_id or at too long",
                e.seq
            )));
        }
        if e.detail
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > api::MAX_DETAIL_LEN)
        {
            return Err(bad_request(format!(
                "event {}: reason longer than {} bytes",
                e.seq,
                api::MAX_DETAIL_LEN
            )));
        }
    }
    let mut accepted = 0;
    let mut duplicates = 0;
    let new = app.state.apply_events(&dev.id, &req.events).await?;
    for (e, new) in req.events.iter().zip(new) {
        if new {
            accepted += 1;
            let kind = serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            app.metrics.events.get_or_create(&KindLabel { kind }).inc();
        } else {
            duplicates += 1;
            app.metrics.events_duplicate.inc();
        }
    }
    Ok(axum::Json(EventsResponse {
        accepted,
        duplicates,
    })
    .into_response())
}

async fn artifact(
    State(app): State<Arc<App>>,
    method: Method,
    ident: Identity,
    headers: HeaderMap,
    Path(sha): Path<String>,
) -> Result<Response, ApiErr> {
    let device = match bearer(&headers) {
        Some(t) if app.is_admin(t) => None,
        _ => Some(device_auth(&app, &headers, &ident).await?.id),
    };
    let digest = match crate::artifacts::parse_sha256_segment(&sha) {
        Ok(d) => d,
        Err(e) => return Ok(e.into_response()),
    };
    let resp = crate::artifacts::serve(
        &app.artifacts,
        app.egress.clone(),
        app.bytes_served.clone(),
        &method,
        &headers,
        &digest,
    )
    .await;
    if let Some(d) = device
        && method == Method::GET
        && let Some(n) = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        app.state.count_bytes(&d, n);
    }
    Ok(resp)
}

#[derive(Deserialize)]
struct DeviceAdd {
    id: String,
    device_type: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// Replace the token of an existing device (the old one stops working).
    #[serde(default)]
    rotate: bool,
}

async fn admin_device_add(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiErr> {
    let req: DeviceAdd = read_json(body).await?;
    check_device_fields(&req.id, &req.device_type, &req.tags)?;
    // Provisioning an id that exists would revoke the token its device
    // uses, which then loops on 401: only on purpose (`--rotate`). Two
    // operators adding one new id at the same instant can still race; the
    // later token wins, as with --rotate.
    if !req.rotate && app.state.device_view(&req.id).await?.is_some() {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            "device_exists",
            format!(
                "device {} is already provisioned; `device add --rotate` issues a new token and the old one stops working at once (the device needs the new token in its token file)",
                req.id
            ),
        ));
    }
    if req.rotate {
        warn!(device = %req.id, "rotating the device token: the old one is revoked");
    }
    let token = app.enroll(&req.id, &req.device_type, req.tags).await?;
    Ok(axum::Json(EnrollResponse {
        device_id: req.id,
        token,
        certificate: None,
    })
    .into_response())
}

async fn admin_device_get(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiErr> {
    let view = app.state.device_view(&id).await?.ok_or_else(|| {
        ApiErr(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {id}"),
        )
    })?;
    Ok(axum::Json(view).into_response())
}

/// `POST /api/v1/admin/reload`: re-reads `server.toml` (as `SIGHUP` does).
/// 200 with what changed, or 422 with why nothing did.
async fn admin_reload(State(app): State<Arc<App>>) -> Result<Response, ApiErr> {
    match app.live.reload().await {
        Ok(changed) => Ok(
            axum::Json(serde_json::json!({ "reloaded": true, "changed": changed })).into_response(),
        ),
        Err(e @ crate::reload::ReloadError::Busy) => {
            Err(ApiErr(StatusCode::CONFLICT, "busy", e.to_string()))
        }
        Err(e) => Err(ApiErr(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reload_refused",
            e.to_string(),
        )),
    }
}

#[derive(Deserialize)]
struct RevokeCert {
    #[serde(default)]
    serial: Option<String>,
}

/// Revokes one certificate (by serial) or every certificate issued to the
/// device; answers `{"device", "revoked": [serials]}`.
async fn admin_device_revoke_cert(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiErr> {
    api::check_name("device id", &id).map_err(bad_request)?;
    let req: RevokeCert = read_json(body).await?;
    let serial = req
        .serial
        .as_deref()
        .map(crate::certs::normalize_serial)
        .transpose()
        .map_err(bad_request)?;
    let revoked = app.state.revoke_certs(&id, serial.as_deref()).await?;
    if revoked.is_empty() && serial.is_none() {
        return Err(ApiErr(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no unrevoked certificate was issued to device {id} by this server; name one made elsewhere with --serial"
            ),
        ));
    }
    warn!(device = %id, ?revoked, "client certificates revoked by the operator");
    Ok(axum::Json(serde_json::json!({ "device": id, "revoked": revoked })).into_response())
}

async fn admin_releases(State(app): State<Arc<App>>) -> Result<Response, ApiErr> {
    // Other replicas add releases and finish builds: read the database.
    app.releases.refresh().await?;
    Ok(axum::Json(app.releases.list()).into_response())
}

#[derive(Deserialize)]
struct ReleaseQuery {
    #[serde(default)]
    security_counter: u64,
    /// A lower version on purpose (needs a higher security counter).
    #[serde(default)]
    allow_downgrade: bool,
    /// `swu`, `raucb` or `file`: an opaque release (the body is the
    /// client's bundle, stored as is; see [`crate::releases::bundle`]).
    #[serde(default)]
    format: Option<String>,
    /// The bundle's file name as DDI clients see it.
    #[serde(default)]
    filename: Option<String>,
    /// The DDI software-module type (default `os`).
    #[serde(default)]
    module_type: Option<String>,
    /// Attach the bundle to the existing image release of this version
    /// (one rollout for agents and DDI targets of one device type).
    #[serde(default)]
    attach: bool,
}

fn release_err(e: crate::releases::ReleaseError) -> ApiErr {
    match e {
        crate::releases::ReleaseError::Invalid(m) => bad_request(m),
        e @ crate::releases::ReleaseError::Exists { .. } => {
            ApiErr(StatusCode::CONFLICT, "conflict", e.to_string())
        }
        e @ crate::releases::ReleaseError::Order(_) => {
            ApiErr(StatusCode::CONFLICT, "version_order", e.to_string())
        }
        e => internal(e),
    }
}

async fn admin_release_add(
    State(app): State<Arc<App>>,
    Path((device_type, version)): Path<(String, String)>,
    Query(q): Query<ReleaseQuery>,
    body: Body,
) -> Result<Response, ApiErr> {
    api::check_name("device type", &device_type).map_err(bad_request)?;
    api::check_name("version", &version).map_err(bad_request)?;
    let bundle = match &q.format {
        None => None,
        Some(f) => Some(crate::releases::bundle::BundleSpec {
            format: crate::releases::bundle::BundleFormat::parse(f).map_err(bad_request)?,
            filename: q.filename.clone(),
            module_type: q.module_type.clone(),
        }),
    };
    if bundle.is_none() && (q.filename.is_some() || q.module_type.is_some() || q.attach) {
        return Err(bad_request(
            "filename, module_type and attach describe a bundle: give format=swu|raucb|file too",
        ));
    }
    if q.attach {
        // The release must exist: refused before the upload.
        app.releases.refresh().await?;
        if !app.releases.exists(&device_type, &version) {
            return Err(ApiErr(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no release {version} of {device_type} to attach a bundle to; add the image release first (or leave out attach for a bundle-only release)"
                ),
            ));
        }
    } else {
        // Refuse a version devices would refuse before the upload, not after.
        app.releases
            .precheck(
                &device_type,
                &version,
                q.security_counter,
                q.allow_downgrade,
            )
            .await
            .map_err(release_err)?;
    }
    // Stream the image to a temporary file; never hold it in memory.
    let tmp = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(app.tmp_dir())
        .map_err(internal)?;
    let (std_file, path) = tmp.keep().map_err(internal)?;
    let _cleanup = RemoveOnDrop(path.clone());
    let disk_err = |e: crate::artifacts::StoreError| {
        internal(format!(
            "writing the upload (is the data directory's disk full?): {e}"
        ))
    };
    let mut ingest = crate::ingest::Ingest::start(std_file, path.clone());
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            let msg = format!("upload interrupted: {e}");
            body_error(e).unwrap_or_else(|| bad_request(msg))
        })?;
        ingest.write(chunk).await.map_err(disk_err)?;
    }
    let (sha, _) = ingest.finish().await.map_err(disk_err)?;
    if let Some(spec) = &bundle
        && q.attach
    {
        let rec = app
            .releases
            .attach_bundle(&device_type, &version, &path, &sha, spec)
            .await
            .map_err(release_err)?;
        return Ok((StatusCode::OK, axum::Json(rec)).into_response());
    }
    if let Some(spec) = &bundle {
        let rec = app
            .releases
            .add_bundle(
                &device_type,
                &version,
                q.security_counter,
                q.allow_downgrade,
                &path,
                &sha,
                spec,
            )
            .await
            .map_err(release_err)?;
        return Ok((StatusCode::CREATED, axum::Json(rec)).into_response());
    }
    let rec = app
        .releases
        .add(
            &device_type,
            &version,
            q.security_counter,
            q.allow_downgrade,
            &path,
            &sha,
        )
        .await
        .map_err(release_err)?;
    Ok((StatusCode::CREATED, axum::Json(rec)).into_response())
}

struct RemoveOnDrop(std::path::PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn admin_rollout_create(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiErr> {
    let mut spec: RolloutSpec = read_json(body).await?;
    if let Some(name) = spec.group.clone() {
        let g = app
            .state
            .group(&name)
            .await?
            .ok_or(crate::groups::GroupError::NotFound(name))?;
        crate::groups::apply(&mut spec, &g)?;
    }
    let st = app.state.create_rollout(spec).await?;
    Ok((StatusCode::CREATED, axum::Json(st)).into_response())
}

async fn admin_rollout_get(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiErr> {
    Ok(axum::Json(app.state.rollout_status(&id).await?).into_response())
}

async fn admin_rollout_action(
    State(app): State<Arc<App>>,
    Path((id, verb)): Path<(String, String)>,
    axum::Extension(actor): axum::Extension<crate::audit::Actor>,
    body: axum::body::Body,
) -> Result<Response, ApiErr> {
    /// Optional body: why (shown in the status and kept in the audit log).
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Why {
        reason: Option<String>,
    }
    let bytes = axum::body::to_bytes(body, 4096)
        .await
        .map_err(|_| bad_request("a rollout action body is at most 4 KiB"))?;
    let why: Why = if bytes.is_empty() {
        Why::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            bad_request(format!(
                "malformed JSON: {e}; expected {{\"reason\": \"...\"}}"
            ))
        })?
    };
    let (to, done) = match verb.as_str() {
        "pause" => (RolloutState::Paused, "paused"),
        "resume" => (RolloutState::Active, "resumed"),
        "abort" => (RolloutState::Aborted, "aborted"),
        _ => {
            return Err(ApiErr(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown rollout action {verb:?}; use pause, resume or abort"),
            ));
        }
    };
    let who = if actor.name == crate::audit::BOOTSTRAP {
        "the operator".to_string()
    } else {
        actor.name.clone()
    };
    let reason = match why
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        Some(r) => format!(
            "{done} by {who}: {}",
            r.chars().take(500).collect::<String>()
        ),
        None => format!("{done} by {who}"),
    };
    let st = app.state.set_rollout_state(&id, to, reason).await?;
    Ok(axum::Json(st).into_response())
}

/// Fleet-wide figures: devices, events stored (a full count: for reports
/// and load tests, not for dashboards), this replica's counters.
async fn admin_stats(State(app): State<Arc<App>>) -> Result<Response, ApiErr> {
    let mut v = app.state.stats().await?;
    v["replica"] = app.replica_id.clone().into();
    v["bytes_served_since_start"] = app.bytes_served.load(Ordering::Relaxed).into();
    Ok(axum::Json(v).into_response())
}

#[cfg(test)]
mod checkin_answer_tests {
    use super::*;
    use ota_format::api::CheckinResponse;

    /// The borrowed answer must stay byte-compatible with the
    /// `CheckinResponse` agents parse, with and without a statement.
    #[test]
    fn checkin_answer_is_a_checkin_response_on_the_wire() {
        let env = ota_format::Envelope {
            payload_type: "application/vnd.edge-ota.freshness+json".into(),
            payload: "eyJhIjoxfQ==".into(),
            signatures: vec![ota_format::envelope::Signature {
                keyid: "k1".into(),
                sig: "c2ln".into(),
            }],
        };
        let raw = serde_json::value::to_raw_value(&env).unwrap();
        for action in [
            Action::None,
            Action::Wait {
                reason: "wave 2 opens after the soak \"quoted\"".into(),
            },
        ] {
            for with in [false, true] {
                let answer = CheckinAnswer {
                    next_checkin_ms: 1234,
                    action: &action,
                    freshness: with.then_some(&*raw),
                };
                let json = serde_json::to_string(&answer).unwrap();
                let expected = CheckinResponse {
                    next_checkin_ms: 1234,
                    action: action.clone(),
                    freshness: with.then(|| env.clone()),
                };
                assert_eq!(json, serde_json::to_string(&expected).unwrap());
                let parsed: CheckinResponse = serde_json::from_str(&json).unwrap();
                assert_eq!(parsed, expected);
            }
        }
    }
}
