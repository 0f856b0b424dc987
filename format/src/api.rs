//! The device API: the JSON bodies exchanged between `ota-agent` and
//! `ota-server`. `docs/api.md` is the prose description; these types are the
//! only definition, used by both sides so they cannot drift apart.
//!
//! Every body a server receives is untrusted: the server caps body sizes
//! ([`MAX_REQUEST_BYTES`]) and length-checks strings with [`check_name`].
//! Every body an agent receives is untrusted too, but nothing in a check-in
//! answer is trusted for integrity: the manifest it points at is signed and
//! the payload is pinned by the manifest.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::limits::MAX_NAME_LEN;

/// Path prefix of every API route.
pub const API_PREFIX: &str = "/api/v1";
/// Largest request body the server reads (events batches are the largest).
pub const MAX_REQUEST_BYTES: usize = 256 << 10;
/// Most events in one `POST /events` batch.
pub const MAX_EVENTS_PER_BATCH: usize = 256;
/// Longest free-text detail (failure reasons) kept from an event.
pub const MAX_DETAIL_LEN: usize = 1024;

/// Which A/B slot. Serialized as `"a"` / `"b"`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// The other slot: where an update is written.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// `POST /api/v1/devices/enroll` (no bearer token: the fleet enrollment key
/// authenticates). Enrolling an already enrolled id with the right key issues
/// a new token and revokes the old one, so a re-flashed device can re-enroll.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EnrollRequest {
    pub enrollment_key: String,
    pub device_id: String,
    pub device_type: String,
    /// Labels used by rollout selectors (`--selector tag=value`).
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// A PKCS#10 certificate signing request (PEM) whose subject CN is
    /// `device_id`: the server answers with a client certificate signed by
    /// the fleet CA, so the device's private key never leaves it. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EnrollResponse {
    pub device_id: String,
    /// Bearer token for every later call. Shown once: the server keeps only
    /// its SHA-256.
    pub token: String,
    /// The client certificate (PEM) issued for the request's `csr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// What the agent is doing, as it tells the server at check-in.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    /// No update in hand.
    Idle,
    /// Fetching, verifying and applying operations into the inactive slot.
    Downloading,
    /// All operations applied: verifying the whole image, switching boot.
    Installing,
    /// Boot switched; waiting for the reboot.
    Rebooting,
    /// Booted into the new slot, health check not yet passed.
    Testing,
    /// The update in hand is downloaded and verified in the inactive slot;
    /// the agent holds it until an [`Action::Install`] (its rollout's
    /// maintenance window opened, or an operator said install now). Holds
    /// no download lease.
    WaitingForWindow,
}

/// Progress of the update the agent has in hand.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    pub bytes_verified: u64,
    pub bytes_total: u64,
    pub ops_done: u64,
    pub ops_total: u64,
}

/// The update the agent is working on, if any.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UpdateInHand {
    pub update_id: String,
    #[serde(default)]
    pub progress: Progress,
}

/// `POST /api/v1/devices/checkin`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CheckinRequest {
    /// The version the device runs now (the booted slot's).
    pub current_version: String,
    pub booted_slot: Slot,
    pub state: AgentState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateInHand>,
    /// [`crate::Envelope::payload_digest`] of the freshness statement the
    /// device holds, verified. When it is the server's current one, the
    /// answer leaves the statement out (about 420 of a check-in answer's
    /// ~500 bytes, on every check-in of every device) and the device keeps
    /// using the one it holds — which is all a man in the middle who strips
    /// statements can make it do: replaying the held statement was always
    /// possible, and it still expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness_held: Option<crate::Digest>,
    /// Payload codecs beyond zstd and bzip2 this agent decodes
    /// ([`crate::manifest::CODECS`]); empty from agents older than the
    /// field, which the server then offers only payloads without such
    /// codecs.
    #[serde(default, skip_serializing_if = "crate::manifest::Codecs::is_empty")]
    pub delta_codecs: crate::manifest::Codecs,
    /// The client can hold a verified update until it is told to install
    /// ([`UpdateOffer::install_gated`], [`Action::Install`]). Absent (false)
    /// from agents older than maintenance windows and from DDI targets: a
    /// rollout with windows admits such a client only while a window is
    /// open, since it would install as soon as it had downloaded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub install_gate: bool,
    /// The device's time zone, an IANA name (`Europe/Berlin`): what a
    /// rollout's `local` maintenance windows are judged in for this device.
    /// Absent from older agents and DDI targets (then UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// The server's answer to a check-in. Every variant carries the time until the
/// next check-in, already jittered by the server so a fleet that booted
/// together spreads out. Throttled answers also carry a `Retry-After` header
/// (whole seconds, rounded up).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CheckinResponse {
    /// Milliseconds until the next check-in. The agent may check in earlier
    /// only to report a state change (an event flush does not need one).
    pub next_checkin_ms: u64,
    #[serde(flatten)]
    pub action: Action,
    /// The server's signed freshness statement for the device's type
    /// ([`crate::freshness`]); absent from servers that do not sign one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<crate::Envelope>,
}

/// What the device should do.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Nothing to do.
    None,
    /// Download and install this update (or continue it: the same offer is
    /// repeated at every check-in while the device holds the update, and
    /// each such check-in renews its lease).
    Update(UpdateOffer),
    /// Eligible but throttled (wave closed, start rate, concurrency cap or
    /// paused rollout). Try again at `next_checkin_ms`.
    Wait { reason: String },
    /// Stop the update `update_id`: its rollout was aborted, or the device's
    /// lease expired and its slot was given away. Discard progress.
    Cancel { update_id: String, reason: String },
    /// Switch to the update `update_id`, downloaded and verified while
    /// waiting ([`AgentState::WaitingForWindow`]), and reboot: its
    /// maintenance window is open, or an operator said install now.
    Install { update_id: String },
}

/// An admitted update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UpdateOffer {
    /// Identifies this device's attempt at this rollout; events name it.
    pub update_id: String,
    pub rollout_id: String,
    pub version: String,
    /// `None` for a full image; else the version the delta starts from.
    pub from_version: Option<String>,
    /// Content-addressed URL (path relative to the server base URL) of the
    /// signed envelope; `manifest_sha256` is the envelope file's hash.
    pub manifest_url: String,
    pub manifest_sha256: Digest,
    /// Content-addressed URL of the payload; pinned again by the manifest.
    pub payload_url: String,
    pub payload_sha256: Digest,
    pub payload_size: u64,
    /// Most parallel Range requests the server allows this device.
    pub max_parallel_ranges: u32,
    /// Lease lifetime: without a check-in or progress event within this many
    /// milliseconds, the server gives the download slot away.
    pub lease_ms: u64,
    /// Download and verify, then do not switch: report
    /// [`EventKind::WaitingForWindow`], check in as
    /// [`AgentState::WaitingForWindow`] and switch only on an
    /// [`Action::Install`] (the rollout has maintenance windows). Absent
    /// (false): install as soon as verified.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub install_gated: bool,
}

/// Event kinds reported by the agent.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    DownloadStarted,
    /// Coalesced progress; renews the lease.
    Progress,
    /// Every operation verified and applied.
    Downloaded,
    /// The whole image verified in the inactive slot; the agent waits for
    /// its install permission (maintenance window) and holds no lease.
    WaitingForWindow,
    /// Whole image verified, boot switched.
    Installed,
    Rebooting,
    /// Healthy after reboot: the slot is marked good. The only success.
    Committed,
    /// Health check failed or boot count exhausted; back on the old slot.
    RolledBack,
    /// Gave up on this update; `detail.reason` says why.
    Failed,
}

impl EventKind {
    /// Whether the event ends the device's attempt.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Committed | EventKind::RolledBack | EventKind::Failed
        )
    }
}

/// Event detail; every field optional.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct EventDetail {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version the device runs after this event (committed, rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// One event. `seq` is per device, strictly increasing across restarts (the
/// agent persists its counter), which is what makes ingestion idempotent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub update_id: String,
    pub kind: EventKind,
    /// RFC 3339 time on the device (informational: device clocks lie).
    pub at: String,
    #[serde(default)]
    pub detail: EventDetail,
}

/// `POST /api/v1/devices/events`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EventsRequest {
    pub events: Vec<Event>,
}

/// Answer to an events batch. A `200` acknowledges the whole batch: the agent
/// deletes every event in it from its outbox.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EventsResponse {
    /// Events counted for the first time.
    pub accepted: u32,
    /// Events already seen (same device and seq): ignored.
    pub duplicates: u32,
}

/// Body of every 4xx/5xx answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ApiError {
    /// Stable machine-readable code (`unauthorized`, `bad_request`, ...).
    pub code: String,
    /// What went wrong and what to do about it.
    pub error: String,
}

/// Checks an identifier received from the network (device id, device type,
/// version, tag): 1..=128 bytes of `[A-Za-z0-9._:+-]`. Returns what is wrong.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("{what} must be 1 to {MAX_NAME_LEN} bytes long"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '+' | '-')))
    {
        return Err(format!(
            "{what} contains {c:?}; allowed are letters, digits and . _ : + -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkin_answers_are_tagged_flat_json() {
        let r = CheckinResponse {
            next_checkin_ms: 1500,
            action: Action::Wait {
                reason: "concurrency cap".into(),
            },
            freshness: None,
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["action"], "wait");
        assert_eq!(j["next_checkin_ms"], 1500);
        assert_eq!(j["reason"], "concurrency cap");
        let back: CheckinResponse = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
        let none: CheckinResponse =
            serde_json::from_str(r#"{"action":"none","next_checkin_ms":5}"#).unwrap();
        assert_eq!(none.action, Action::None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("version", "1.2.3+build-7").is_ok());
        assert!(check_name("version", "").is_err());
        assert!(check_name("version", "../etc").is_err());
        assert!(check_name("device id", &"x".repeat(129)).is_err());
    }
}
