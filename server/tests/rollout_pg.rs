//! The whole `rollout_http` suite again, on the scale-out backends:
//! PostgreSQL for state and Redis for the throttle (each test gets a fresh
//! database and key prefix). Needs `scripts/services.sh start`.
//! Each included suite brings its own copy of `common` (they also run alone).
#![allow(clippy::duplicate_mod)]

#[path = "rollout_http.rs"]
mod suite;

// Issue 15: late enrolment, tag changes, completion awaiting new devices.
#[path = "dynamic_membership.rs"]
mod membership;

// Issue 15: groups.
#[path = "groups_http.rs"]
mod groups;

// Issue 15: maintenance windows, download now / install later.
#[path = "windows_http.rs"]
mod windows;

#[path = "operator_guards.rs"]
mod guards;
// The admin API suite too: inventory, device show, failure reasons,
// deletions.
#[path = "admin_http.rs"]
mod admin;

// Issue 15: scheduled start, wave time offsets, the ramp's ceiling.
#[path = "schedule_http.rs"]
mod schedule;

// Issue 14: roles, the audit log, device history.
#[path = "audit_http.rs"]
mod audit;

// Issue 14: the dashboard's sessions, CSRF, soak end and shared rollouts list.
#[path = "ui_http.rs"]
mod ui;
