//! `ota-server`: the operator's side of edge-ota — releases, delta builds,
//! the device API and fleet-wide throttled rollouts.
//!
//! # Layout
//!
//! - [`config`]: `server.toml`, validated on load.
//! - [`backend`]: the state layer's trait ([`backend::StateBackend`]) and
//!   its single-process implementation over [`fleet`], [`rollout`] and
//!   [`store`].
//! - [`pg`]: the PostgreSQL implementation, for several replicas.
//! - [`store`]: sled trees and the group-commit flusher that makes
//!   acknowledged writes durable without an fsync per request.
//! - [`fleet`]: enrolled devices, token hashes, what devices last reported.
//! - [`certs`]: device certificates: the fleet CA that signs CSRs, the
//!   revocation list (sled side), which certificate field names a device.
//! - [`tls`]: the HTTPS listener's rustls configuration (optional client
//!   certificates) and the acceptor that hands the peer certificate to the
//!   handlers.
//! - [`releases`]: the release catalogue and the background delta builder.
//! - [`artifacts`]: content-addressed files served with HTTP Range and an
//!   optional egress cap.
//! - [`rollout`]: waves, failure thresholds and per-device progress;
//!   [`rollout::throttle`] holds the concurrency cap, download leases, the
//!   start-rate limiter and the fair waiting queue;
//!   [`rollout::shared`] the fleet-wide throttle trait (local or
//!   [`rollout::redis_throttle`]) the PostgreSQL backend uses.
//! - [`http`]: routes and handlers of the device and admin APIs.
//! - [`metrics`]: the Prometheus exposition.
//! - [`app`]: wiring, background tasks and orderly shutdown.
//! - [`client`]: the admin API client the CLI uses.

pub mod app;
pub mod artifacts;
pub mod backend;
pub mod certs;
pub mod client;
pub mod config;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod releases;
pub mod rollout;
pub mod store;
pub mod tls;

/// Milliseconds since the Unix epoch (wall clock: leases and soak times
/// are persisted, so they must survive a restart).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
