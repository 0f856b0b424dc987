//! The `metrics_http` suite again on PostgreSQL + Redis: the per-rollout
//! series come from the backend's rollout status, so both must give them.
//! Needs `scripts/services.sh start`.

#[path = "metrics_http.rs"]
mod suite;
