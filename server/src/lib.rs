//! `ota-server` as a library: the pieces of the rollout service, so the
//! binary and the integration tests share them.

pub mod artifacts;
