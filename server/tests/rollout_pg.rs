//! The whole `rollout_http` suite again, on the scale-out backends:
//! PostgreSQL for state and Redis for the throttle (each test gets a fresh
//! database and key prefix). Needs `scripts/services.sh start`.
//!
//! Both included suites bring their own copy of `common` (each also builds
//! alone, as `rollout_http` and `admin_http`).
#![allow(clippy::duplicate_mod)]

#[path = "rollout_http.rs"]
mod suite;

// The admin API suite too: inventory, device show, failure reasons,
// deletions.
#[path = "admin_http.rs"]
mod admin;
