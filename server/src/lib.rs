//! `ota-server`: the operator's side of edge-ota — releases, delta builds,
//! the device API and fleet-wide throttled rollouts.
//!
//! # Layout
//!
//! - [`config`]: `server.toml`, validated on load.
//! - [`secrets`]: the start-up refusal of placeholder and weak secrets
//!   (`serve` without `--insecure-dev`).
//! - [`backend`]: the state layer's trait ([`backend::StateBackend`]) and
//!   its single-process implementation over [`fleet`], [`rollout`] and
//!   [`store`].
//! - [`pg`]: the PostgreSQL implementation, for several replicas;
//!   [`pg_windows`] its SQL for maintenance windows (install-now, a waiting
//!   update cancelled).
//!   [`pg_audit`] its audit log, admin users and device history queries.
//! - [`store`]: sled trees and the group-commit flusher that makes
//!   acknowledged writes durable without an fsync per request.
//! - [`fleet`]: enrolled devices, token hashes, what devices last reported.
//! - [`inventory`]: device-list filters, keyset paging and summary rows
//!   (`GET /api/v1/admin/devices`), shared by both backends.
//! - [`certs`]: device certificates: the fleet CA that signs CSRs, the
//!   revocation list (sled side), which certificate field names a device.
//! - [`tls`]: the HTTPS listener's rustls configuration (optional client
//!   certificates) and the acceptor that hands the peer certificate to the
//!   handlers.
//! - [`releases`]: the release catalogue and the background delta builder;
//!   [`releases::bundle`] opaque releases (a DDI client's own bundle,
//!   stored as is, no deltas);
//!   [`builder`] runs one build on a low-priority thread of its own and
//!   keeps its live progress.
//! - [`artifacts`]: content-addressed files served with HTTP Range and an
//!   optional egress cap.
//! - [`ingest`]: an upload streamed to disk and hashed on a thread of its
//!   own (`release add`), then moved into `images/`.
//! - [`groups`]: named, saved selectors a rollout can target, and the
//!   rule that keeps one in use from being deleted.
//! - [`rollout`]: waves, failure thresholds and per-device progress;
//!   [`rollout::membership`] which devices join after creation and when a
//!   rollout counts as done ("complete, awaiting new devices");
//!   [`rollout::throttle`] holds the concurrency cap, download leases, the
//!   start-rate limiter and the fair waiting queue;
//!   [`rollout::window`] maintenance windows (recurring local times in
//!   IANA zones) and the clock they are judged by;
//!   [`rollout::shared`] the fleet-wide throttle trait (local or
//!   [`rollout::redis_throttle`]) the PostgreSQL backend uses.
//! - [`signing`]: the signing keys — a key file, keys in a PKCS#11 token,
//!   or both during a rotation.
//! - [`freshness`]: the signed, short-lived statement of the latest release
//!   per device type that every check-in answer carries.
//! - [`ddi`]: hawkBit's DDI device API (SWUpdate, RAUC and other hawkBit
//!   clients) translated onto the same check-in decisions and events as
//!   the agents', so they share rollouts and the throttle; [`ddi::wire`]
//!   its JSON and the feedback-to-event mapping.
//! - [`audit`]: admin identities with roles (viewer, operator, admin), the
//!   one table of which request needs which role, and the audit log every
//!   changing admin request is written to, enforced by one router layer.
//! - [`ui`]: the dashboard at `/ui/` — embedded pages on the admin API,
//!   sign-in with cookie sessions (in memory, following their user) and
//!   the CSRF check every change made with a session cookie passes.
//! - [`http`]: routes and handlers of the device and admin APIs;
//!   [`windows_http`] the maintenance-window routes (`install-now`, the
//!   test-build window-clock hook);
//!   [`admin`] the inventory list, the rollouts list (shared among
//!   dashboard pollers within `max_age_ms`) and the deletions (device
//!   retire, release delete) with the checks that keep them safe.
//! - [`listener`]: the accept loop (plain and TLS) with connection hygiene:
//!   header, idle and body timeouts, global and per-address connection
//!   caps, HTTP/2 limits; a TLS client's certificate verdict on each of
//!   its requests.
//! - [`metrics`]: the Prometheus exposition (text 0.0.4 or OpenMetrics,
//!   by `Accept`), per-rollout state and alerting figures.
//! - [`reload`]: `SIGHUP` / admin reload of `server.toml`, validated first
//!   and swapped atomically (pacing, log level, TLS certificate, signing keys).
//! - [`app`]: wiring, background tasks and orderly shutdown.
//! - [`client`]: the admin API client the CLI uses.
//! - [`render`]: the CLI's human output (device table, one device, rollout
//!   list, failure reasons).

pub mod admin;
pub mod app;
pub mod artifacts;
pub mod audit;
pub mod backend;
pub mod builder;
pub mod certs;
pub mod client;
pub mod config;
pub mod ddi;
pub mod fleet;
pub mod freshness;
pub mod groups;
pub mod http;
pub mod ingest;
pub mod inventory;
pub mod listener;
pub mod metrics;
pub mod pg;
pub mod pg_audit;
pub mod pg_windows;
pub mod releases;
pub mod reload;
pub mod render;
pub mod rollout;
pub mod secrets;
pub mod signing;
pub mod store;
pub mod tls;
pub mod ui;
pub mod windows_http;

/// Milliseconds since the Unix epoch (wall clock: leases and soak times
/// are persisted, so they must survive a restart).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
