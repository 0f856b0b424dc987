//! DDI's JSON, as hawkBit's DDI API reference and OpenAPI file describe it,
//! and the pure mappings between it and edge-ota's events: kept apart from
//! the handlers so the mapping is tested without a server.

use std::collections::BTreeMap;

use ota_format::api::EventKind;
use serde::{Deserialize, Serialize};

/// The numeric action id DDI clients see for an attempt (`rollout.attempt`).
///
/// SWUpdate parses ids as a C `int`, so ids are 31-bit: a hash of the
/// update id, never 0. An action is always looked up among the attempts of
/// the one target that asks, where a collision would need two of its own
/// attempts to collide (about 1 in 2^31 per pair).
pub fn action_id(update_id: &str) -> u32 {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(update_id.as_bytes());
    let v = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_ffff;
    v.max(1)
}

/// The numeric software-module id of release `version` of `device_type`
/// (31-bit, as [`action_id`]).
pub fn module_id(device_type: &str, version: &str) -> u32 {
    action_id(&format!("module\0{device_type}\0{version}"))
}

/// `config.polling.sleep`: `HH:MM:SS`, at least one second (SWUpdate reads
/// whole seconds; a zero would make it fall back to its own default).
pub fn sleep_hms(ms: u64) -> String {
    let s = ms.div_ceil(1000).max(1);
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// A hypermedia link.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Link {
    pub href: String,
}

/// `GET /{tenant}/controller/v1/{controllerId}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BasePoll {
    pub config: PollConfig,
    #[serde(rename = "_links", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, Link>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PollConfig {
    pub polling: Polling,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Polling {
    pub sleep: String,
}

/// `deployment.download` / `deployment.update`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Handling {
    Skip,
    Attempt,
    Forced,
}

/// `GET .../deploymentBase/{actionId}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeploymentBase {
    /// hawkBit sends the id as a string; clients parse either.
    pub id: String,
    pub deployment: Deployment,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Deployment {
    pub download: Handling,
    pub update: Handling,
    /// Whether the rollout's maintenance window is open now; present only
    /// for a rollout with windows (as hawkBit sends it only for actions
    /// with a window). `unavailable` comes with `update: skip`.
    #[serde(
        default,
        rename = "maintenanceWindow",
        skip_serializing_if = "Option::is_none"
    )]
    pub maintenance_window: Option<MaintenanceWindow>,
    pub chunks: Vec<Chunk>,
}

/// `deployment.maintenanceWindow`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceWindow {
    Available,
    Unavailable,
}

/// One software module.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The module type (`os`, `application`, …).
    pub part: String,
    pub version: String,
    pub name: String,
    pub artifacts: Vec<ArtifactRef>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ArtifactRef {
    pub filename: String,
    pub hashes: Hashes,
    pub size: u64,
    #[serde(rename = "_links")]
    pub links: BTreeMap<String, Link>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hashes {
    pub sha1: String,
    pub md5: String,
    pub sha256: String,
}

/// `GET .../cancelAction/{actionId}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CancelAction {
    pub id: String,
    #[serde(rename = "cancelAction")]
    pub cancel_action: StopId,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StopId {
    #[serde(rename = "stopId")]
    pub stop_id: String,
}

/// `POST .../feedback` (deployment or cancel). `id` and `time` are
/// informational (SWUpdate sends its own time format) and not checked.
#[derive(Deserialize, Debug, Clone)]
pub struct Feedback {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub time: Option<String>,
    pub status: FeedbackStatus,
}

#[derive(Deserialize, Debug, Clone)]
pub struct FeedbackStatus {
    pub execution: Execution,
    pub result: FeedbackResult,
    #[serde(default)]
    pub details: Vec<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct FeedbackResult {
    pub finished: Finished,
    #[serde(default)]
    pub progress: Option<FeedbackProgress>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
pub struct FeedbackProgress {
    pub cnt: u64,
    pub of: u64,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    Closed,
    Proceeding,
    Canceled,
    Scheduled,
    Rejected,
    Resumed,
    Downloaded,
    Download,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Finished {
    Success,
    Failure,
    None,
}

/// `PUT .../configData`.
#[derive(Deserialize, Debug, Clone)]
pub struct ConfigData {
    pub data: BTreeMap<String, String>,
    /// `merge` (default), `replace` or `remove`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// The edge-ota events one deployment feedback stands for (in order), and
/// the reason they carry. Empty: nothing changes but the lease is renewed.
///
/// - `proceeding`, `scheduled`, `resumed`, `download`: the target works on
///   it — progress, which renews its download lease.
/// - `downloaded`: the download is done — the lease is released.
/// - `closed` + `success` (or `none`, which hawkBit also counts as
///   finished): installed and committed. DDI has no separate health report
///   after a reboot; a client that reboots into the update reports
///   `closed` only once it runs it (SWUpdate's `-c` confirm).
/// - `closed` + `failure`, `canceled`, `rejected`: failed, with the
///   details as the reason: counted toward the failure threshold after the
///   rollout's retries, like an agent's `failed`.
pub fn events_for(f: &FeedbackStatus) -> (Vec<EventKind>, Option<String>) {
    let details = || {
        let d = f.details.join("; ");
        let d = d.trim();
        (!d.is_empty()).then(|| d.to_string())
    };
    match (f.execution, f.result.finished) {
        (Execution::Closed, Finished::Failure) => (
            vec![EventKind::Failed],
            Some(details().unwrap_or_else(|| "the target reported closed/failure".into())),
        ),
        (Execution::Closed, _) => (vec![EventKind::Installed, EventKind::Committed], None),
        (Execution::Canceled, _) => (
            vec![EventKind::Failed],
            Some(format!(
                "canceled by the target{}",
                details().map(|d| format!(": {d}")).unwrap_or_default()
            )),
        ),
        (Execution::Rejected, _) => (
            vec![EventKind::Failed],
            Some(format!(
                "rejected by the target{}",
                details().map(|d| format!(": {d}")).unwrap_or_default()
            )),
        ),
        (Execution::Downloaded, _) => (vec![EventKind::Downloaded], None),
        (
            Execution::Proceeding | Execution::Scheduled | Execution::Resumed | Execution::Download,
            _,
        ) => (vec![EventKind::Progress], None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(json: &str) -> FeedbackStatus {
        serde_json::from_str::<Feedback>(json).unwrap().status
    }

    #[test]
    fn polling_sleep_is_hh_mm_ss_of_at_least_one_second() {
        assert_eq!(sleep_hms(0), "00:00:01");
        assert_eq!(sleep_hms(1500), "00:00:02");
        assert_eq!(sleep_hms(3_723_000), "01:02:03");
    }

    #[test]
    fn action_ids_fit_a_c_int_and_are_never_zero() {
        for u in ["r1.1", "r1.2", "rollout-x.17", ""] {
            let id = action_id(u);
            assert!(id > 0 && id <= i32::MAX as u32, "{u}: {id}");
        }
        assert_ne!(action_id("r1.1"), action_id("r1.2"));
    }

    #[test]
    fn swupdate_feedback_maps_onto_events() {
        // What SWUpdate sends (its time format, progress, details).
        let ok = status(
            r#"{"id": 12, "time": "20261202T120000", "status": {"result": {"progress": {"cnt": 0, "of": 0}, "finished": "success"}, "execution": "closed", "details": ["Update Installed."]}}"#,
        );
        assert_eq!(
            events_for(&ok),
            (vec![EventKind::Installed, EventKind::Committed], None)
        );
        let bad = status(
            r#"{"id": 12, "time": "x", "status": {"result": {"finished": "failure"}, "execution": "closed", "details": ["ERROR : hash mismatch", "Update Failed."]}}"#,
        );
        assert_eq!(
            events_for(&bad),
            (
                vec![EventKind::Failed],
                Some("ERROR : hash mismatch; Update Failed.".into())
            )
        );
        let prog = status(
            r#"{"status": {"result": {"finished": "none"}, "execution": "proceeding", "details": []}}"#,
        );
        assert_eq!(events_for(&prog), (vec![EventKind::Progress], None));
        let rej =
            status(r#"{"status": {"result": {"finished": "none"}, "execution": "rejected"}}"#);
        assert_eq!(events_for(&rej).0, vec![EventKind::Failed]);
    }

    #[test]
    fn unknown_execution_values_are_refused() {
        let e = serde_json::from_str::<Feedback>(
            r#"{"status": {"result": {"finished": "success"}, "execution": "done"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }
}
