//! Groups: named, saved device selectors (issue 15) —
//! `ota-server group create|list|show|delete`, `/api/v1/admin/groups`.
//!
//! A group is the same selector a rollout has (a device type and tags that
//! must all match), under a name, so operators target "lab-kiosks" instead
//! of retyping tags. No new filter language: what a group matches is
//! exactly what [`crate::rollout::spec_matches`] matches, evaluated at each
//! check-in, so group membership is dynamic by construction
//! ([`crate::rollout::membership`]).
//!
//! `rollout create --group NAME` copies the group's device type and tags
//! into the rollout's spec and keeps the name (`spec.group`). Groups cannot
//! be edited, only created and deleted, so the copy never goes stale; a
//! group stays undeletable while a rollout targeting it can still update
//! devices ([`in_use_by`]).
//!
//! Storage is each backend's (a sled tree, a PostgreSQL table); the rules
//! here are shared.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::{RolloutSpec, RolloutState, RolloutStatus};

/// A saved selector.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub device_type: String,
    /// Every tag here must match the device's.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Set by the server.
    #[serde(default)]
    pub created_at_ms: u64,
    /// Default maintenance windows of rollouts that target the group and
    /// give none of their own ([`apply`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<crate::rollout::window::Window>,
}

/// At most this many tags in a group's selector (a device has at most 32).
pub const MAX_SELECTOR_TAGS: usize = 32;

impl Group {
    /// Checks names and tags; the message says which and why.
    pub fn validate(&self) -> Result<(), String> {
        ota_format::api::check_name("group name", &self.name)?;
        ota_format::api::check_name("device type", &self.device_type)?;
        if self.selector.len() > MAX_SELECTOR_TAGS {
            return Err(format!(
                "a group selects on at most {MAX_SELECTOR_TAGS} tags"
            ));
        }
        for (k, v) in &self.selector {
            ota_format::api::check_name("selector key", k)?;
            ota_format::api::check_name("selector value", v)?;
        }
        crate::rollout::window::check_windows(&self.windows)
    }
}

/// Group errors the admin API maps to 4xx.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "group {0} exists already; pick another name, or delete it first (`ota-server group delete {0}`)"
    )]
    Exists(String),
    #[error("no group {0}; `ota-server group list` shows them")]
    NotFound(String),
    #[error(
        "group {group} is targeted by rollout {rollout} ({state:?}); abort that rollout first (`ota-server rollout abort {rollout}`)"
    )]
    InUse {
        group: String,
        rollout: String,
        state: RolloutState,
    },
}

/// `spec` targeting group `g`: its device type and tags come from the
/// group. Giving either as well is refused rather than silently merged.
/// The group's maintenance windows are a default: a rollout that gives
/// windows of its own keeps them (a one-off night for an urgent fix).
pub fn apply(spec: &mut RolloutSpec, g: &Group) -> Result<(), GroupError> {
    if !spec.device_type.is_empty() && spec.device_type != g.device_type {
        return Err(GroupError::Invalid(format!(
            "group {} is for device type {}, not {}; leave --device-type out with --group",
            g.name, g.device_type, spec.device_type
        )));
    }
    if !spec.selector.is_empty() {
        return Err(GroupError::Invalid(format!(
            "give either --group or --selector, not both (group {} selects {:?})",
            g.name, g.selector
        )));
    }
    spec.device_type = g.device_type.clone();
    spec.selector = g.selector.clone();
    if spec.windows.is_empty() {
        spec.windows = g.windows.clone();
    }
    Ok(())
}

/// The rollout (of `all`, in creation order) that keeps group `name` in
/// use: one targeting it that can still update devices — active, paused,
/// or completed and not superseded by a newer rollout of its device type
/// (a completed rollout still takes newcomers).
pub fn in_use_by<'a>(name: &str, all: &'a [RolloutStatus]) -> Option<&'a RolloutStatus> {
    all.iter().enumerate().find_map(|(i, r)| {
        (r.spec.group.as_deref() == Some(name) && crate::rollout::membership::still_updates(all, i))
            .then_some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Group {
        Group {
            name: "kiosks".into(),
            device_type: "t".into(),
            selector: [("site".to_string(), "lab".to_string())].into(),
            created_at_ms: 0,
            windows: Vec::new(),
        }
    }

    #[test]
    fn a_group_window_is_a_default_a_rollout_may_override() {
        use crate::rollout::window::Window;
        let mut grp = g();
        grp.windows = vec![Window::parse("mon-fri 02:00+3h Europe/Berlin").unwrap()];
        let mut spec: RolloutSpec = serde_json::from_value(serde_json::json!({
            "release": "2.0", "max_concurrent": 1, "max_starts_per_min": 1.0
        }))
        .unwrap();
        let mut own = spec.clone();
        apply(&mut spec, &grp).unwrap();
        assert_eq!(spec.windows, grp.windows);
        own.windows = vec![Window::parse("sun 01:00+1h UTC").unwrap()];
        apply(&mut own, &grp).unwrap();
        assert_eq!(own.windows[0].to_string(), "sun 01:00+1h UTC");
    }

    #[test]
    fn a_group_name_is_checked_like_any_name() {
        let mut x = g();
        x.name = "no spaces".into();
        assert!(x.validate().unwrap_err().contains("group name"));
        assert!(g().validate().is_ok());
    }
}
