//! Admin routes of maintenance windows (issue 15), merged into the admin
//! part of [`crate::http::router`] (behind its role and audit layer):
//!
//! - `POST /api/v1/admin/rollouts/{id}/install-now` with an optional body
//!   `{"devices": ["id", ...]}`: those devices (all admitted devices not yet
//!   installed when the list is absent or empty) switch as soon as their
//!   update is verified, window or not (`ota-server rollout install-now`).
//! - `PUT /api/v1/admin/test/window-clock` with `{"offset_ms": N}`: moves
//!   the clock windows are judged by. Compiled only into test builds (debug
//!   assertions or the `test-hooks` feature), never into a release build:
//!   tests move into a window instead of sleeping for hours.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::http::{ApiErr, bad_request, read_json};

/// Body of `install-now`.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct InstallNowRequest {
    /// Empty: every admitted device not yet installed.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// Answer of `install-now`.
#[derive(Serialize, Deserialize, Debug)]
pub struct InstallNowResponse {
    pub rollout: String,
    /// The devices that will install once verified.
    pub devices: Vec<String>,
}

/// Body of the test-build window-clock hook.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct WindowClockRequest {
    pub offset_ms: i64,
}

pub fn routes() -> Router<Arc<App>> {
    let r = Router::new().route("/api/v1/admin/rollouts/{id}/install-now", post(install_now));
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    let r = r.route(
        "/api/v1/admin/test/window-clock",
        axum::routing::put(set_window_clock),
    );
    r
}

async fn install_now(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiErr> {
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|e| bad_request(format!("reading the body: {e}")))?;
    let req: InstallNowRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        InstallNowRequest::default()
    } else {
        read_json(Body::from(bytes)).await?
    };
    for d in &req.devices {
        ota_format::api::check_name("device id", d).map_err(bad_request)?;
    }
    let devices = app.state.install_now(&id, &req.devices).await?;
    Ok(axum::Json(InstallNowResponse {
        rollout: id,
        devices,
    })
    .into_response())
}

#[cfg(any(debug_assertions, feature = "test-hooks"))]
async fn set_window_clock(State(app): State<Arc<App>>, body: Body) -> Result<Response, ApiErr> {
    let req: WindowClockRequest = read_json(body).await?;
    app.state.window_clock().set_offset_ms(req.offset_ms);
    tracing::warn!(
        offset_ms = req.offset_ms,
        "test hook: the window clock moved"
    );
    Ok(axum::Json(serde_json::json!({"offset_ms": req.offset_ms})).into_response())
}
