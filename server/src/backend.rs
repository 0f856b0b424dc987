//! The state layer's seam: [`StateBackend`], everything the HTTP handlers
//! and the periodic tick ask of devices and rollouts.
//!
//! Two implementations, chosen by `[storage] backend` in `server.toml`:
//!
//! - [`LocalState`] (`sled`, the default): one process; hot state in
//!   sharded in-memory maps and atomics, sled as the durable mirror with
//!   group commit. No services to run.
//! - [`crate::pg::PgState`] (`postgres`): several replicas share one
//!   PostgreSQL database; each decision is a short transaction there, and
//!   the throttle is a [`crate::rollout::shared::FleetThrottle`] (Redis for
//!   several replicas).
//!
//! The API, CLI and metrics are the same whichever is chosen: handlers only
//! see this trait and the types of [`crate::rollout`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use ota_format::api::{AgentState, CheckinRequest, Event, Slot};

use crate::fleet::Fleet;
use crate::inventory::{DeviceFilter, DevicePage, DeviceSummary, PageBuilder};
use crate::rollout::{Decision, RolloutError, RolloutSpec, RolloutState, RolloutStatus, Rollouts};
use crate::store::{Store, StoreError};

/// Events (progress excepted) `device_view` returns as the device's
/// history, newest last.
pub const DEVICE_HISTORY: usize = 20;

/// A device that presented a valid token.
#[derive(Debug, Clone)]
pub struct AuthedDevice {
    pub id: String,
    pub device_type: String,
    pub tags: BTreeMap<String, String>,
    /// What the state layer knew before this request (PostgreSQL uses it to
    /// write only what changed).
    pub version: Option<String>,
    pub booted_slot: Option<Slot>,
    pub state: Option<AgentState>,
    pub last_seen_ms: u64,
    /// SHA-256 of the token it presented (a cache key).
    pub token_sha256: [u8; 32],
    /// The sled backend's in-memory device, found while authenticating: the
    /// check-in records into it without looking it up again. `None` from
    /// PostgreSQL.
    pub(crate) local: Option<Arc<crate::fleet::Device>>,
}

/// What a verified client certificate speaks for.
#[derive(Debug, Clone)]
pub enum CertAuth {
    Device(AuthedDevice),
    /// Its serial is on the revocation list.
    Revoked,
    /// No device has the certificate's id (never enrolled).
    UnknownDevice,
}

/// The cache key of a certificate-authenticated device (in the place of a
/// token hash: distinct from every token's).
pub fn cert_key(serial: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(format!("x509-serial:{serial}").as_bytes()).into()
}

/// Durable state and rollout decisions.
///
/// # Cancel safety
/// Every method that writes makes its write atomic (one sled transaction or
/// one PostgreSQL transaction), and acknowledges only after it is durable:
/// a dropped future leaves the state as before or as after, never between.
#[async_trait]
pub trait StateBackend: Send + Sync + 'static {
    /// `"sled"` or `"postgres"` (logs, `/api/v1/admin/stats`).
    fn kind(&self) -> &'static str;

    /// Enrolls (or re-enrolls, revoking the old token) a device; returns its
    /// new token once durable, and whether the device is new.
    async fn enroll(
        &self,
        id: &str,
        device_type: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<(String, bool), StoreError>;

    /// The device a bearer token belongs to.
    async fn authenticate(&self, token: &str) -> Result<Option<AuthedDevice>, StoreError>;

    /// The device a verified client certificate names (its subject CN),
    /// unless the certificate's serial is revoked.
    async fn authenticate_cert(&self, id: &str, serial: &str) -> Result<CertAuth, StoreError>;

    /// Records a certificate issued to `device` (durable on return), so
    /// `revoke_certs` without a serial finds it.
    async fn record_cert(&self, serial: &str, device: &str) -> Result<(), StoreError>;

    /// Revokes `serial`, or every certificate issued to `device`; returns
    /// the serials newly revoked. Durable on return.
    async fn revoke_certs(
        &self,
        device: &str,
        serial: Option<&str>,
    ) -> Result<Vec<String>, StoreError>;

    /// Records what the device reported and decides its check-in. A
    /// decision that promised something (an admission) is durable on return.
    async fn checkin(
        &self,
        dev: &AuthedDevice,
        req: &CheckinRequest,
    ) -> Result<Decision, StoreError>;

    /// Ingests events, idempotent by (device, seq); `true` per new event.
    /// Durable on return.
    async fn apply_events(&self, device: &str, events: &[Event]) -> Result<Vec<bool>, StoreError>;

    /// The admin view of one device: what it reported, its rollout
    /// memberships and its last [`DEVICE_HISTORY`] events.
    async fn device_view(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError>;

    /// Replaces the tags of device `id` (its token stays); `false` if there
    /// is none. Rollout selectors see them from the device's next request.
    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<bool, StoreError>;

    /// The spec of rollout `id` (the release it offers, its windows),
    /// without the status counts [`StateBackend::rollout_status`] computes
    /// (a scan of its members): DDI asks it on every deploymentBase,
    /// feedback and download request.
    async fn rollout_spec(&self, id: &str) -> Result<Option<RolloutSpec>, StoreError>;

    /// The attempt (update id) through which `device` installed `release`:
    /// its newest committed membership in a rollout of that release. DDI
    /// links it as the target's `installedBase`. One indexed query on
    /// PostgreSQL, in-memory lookups on sled; asked on DDI base polls only,
    /// never on the agents' check-in.
    async fn installed_update(
        &self,
        device: &str,
        release: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Device `id` with no credential of its own: the DDI gateway token
    /// ([`crate::ddi`]) vouches for it. Looked up as a certificate whose
    /// "serial" can be on no revocation list (serials are hex), keyed per
    /// device so the PostgreSQL backend's auth cache keeps one entry each.
    async fn device_by_id(&self, id: &str) -> Result<Option<AuthedDevice>, StoreError> {
        Ok(
            match self
                .authenticate_cert(id, &format!("ddi-gateway:{id}"))
                .await?
            {
                CertAuth::Device(d) => Some(d),
                CertAuth::Revoked | CertAuth::UnknownDevice => None,
            },
        )
    }

    async fn device_count(&self) -> Result<u64, StoreError>;

    /// Renews `device`'s download lease of attempt `update_id` if it holds
    /// it (still downloading): whether it did. Records nothing else: a DDI
    /// transfer in progress ([`crate::ddi`]) keeps its lease with it.
    async fn renew_lease(&self, device: &str, update_id: &str) -> Result<bool, StoreError>;

    /// Appends to the admin audit log ([`crate::audit`]); returns the
    /// entry's sequence number.
    ///
    /// # Cancel safety
    /// One write: the entry is in the log afterwards or not.
    async fn audit_append(&self, rec: crate::audit::AuditRecord) -> Result<u64, StoreError>;

    /// The audit log, newest first: up to `limit` entries older than
    /// `before` (a `seq`), or the newest.
    async fn audit_list(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<crate::audit::AuditPage, StoreError>;

    /// Stores a new admin user; `false` if the name is taken.
    ///
    /// # Cancel safety
    /// One write, made durable before the answer.
    async fn user_create(&self, u: &crate::audit::User) -> Result<bool, StoreError>;

    async fn users(&self) -> Result<Vec<crate::audit::User>, StoreError>;

    /// Deletes a user (its token stops at once); `false` if unknown.
    ///
    /// # Cancel safety
    /// One write, made durable before the answer.
    async fn user_delete(&self, name: &str) -> Result<bool, StoreError>;

    /// The user whose token has this hex SHA-256 (admin requests only).
    async fn user_by_token(&self, sha256: &str) -> Result<Option<crate::audit::User>, StoreError>;

    /// A device's stored events, newest first: up to `limit` with a `seq`
    /// below `before`; `progress` events only when asked for.
    async fn device_events(
        &self,
        id: &str,
        before: Option<u64>,
        limit: usize,
        progress: bool,
    ) -> Result<Vec<Event>, StoreError>;

    /// Retires a device: its record and token are deleted (the token stops
    /// working; PostgreSQL replicas forget it within their auth cache's few
    /// seconds), its events and rollout records stay as history. `false` if
    /// there was no such device. Durable on return.
    async fn retire_device(&self, id: &str) -> Result<bool, StoreError>;

    /// One page of the inventory (`GET /api/v1/admin/devices`), filtered
    /// and paged here, not by the client. `NotFound` if `filter.rollout`
    /// names no rollout.
    async fn device_list(&self, filter: &DeviceFilter) -> Result<DevicePage, RolloutError>;

    async fn create_rollout(&self, spec: RolloutSpec) -> Result<RolloutStatus, RolloutError>;

    /// Saves `g` (validated by the caller); `false` if the name is taken.
    /// Durable on return.
    async fn create_group(&self, g: &crate::groups::Group) -> Result<bool, StoreError>;

    /// Every group, by name.
    async fn groups(&self) -> Result<Vec<crate::groups::Group>, StoreError>;

    /// Group `name`, if any.
    async fn group(&self, name: &str) -> Result<Option<crate::groups::Group>, StoreError>;

    /// Deletes group `name` (the caller checked it is not in use); `false`
    /// if there was none. Durable on return.
    async fn delete_group(&self, name: &str) -> Result<bool, StoreError>;

    /// Operator action: pause, resume or abort.
    async fn set_rollout_state(
        &self,
        id: &str,
        to: RolloutState,
        reason: String,
    ) -> Result<RolloutStatus, RolloutError>;

    async fn rollout_statuses(&self) -> Result<Vec<RolloutStatus>, RolloutError>;

    /// Operator action (`rollout install-now`): devices of rollout `id`
    /// switch once verified, whatever its maintenance windows say (all
    /// admitted devices not yet installed when `devices` is empty). Returns
    /// the devices marked; durable on return.
    async fn install_now(&self, id: &str, devices: &[String]) -> Result<Vec<String>, RolloutError>;

    /// The clock maintenance windows are judged by (tests move it).
    fn window_clock(&self) -> &crate::rollout::window::WindowClock;

    async fn rollout_status(&self, id: &str) -> Result<RolloutStatus, RolloutError>;

    /// Periodic work: lease expiry, waves, completion. Returns leases
    /// expired by this call.
    async fn tick(&self) -> Result<u64, StoreError>;

    /// Payload bytes served to `device` (per-wave `bytes_served`).
    fn count_bytes(&self, device: &str, bytes: u64);

    /// Fleet-wide figures for reports (`/api/v1/admin/stats`).
    async fn stats(&self) -> Result<serde_json::Value, StoreError>;

    /// Leases held across rollouts (the `ota_active_leases` gauge).
    async fn total_leases(&self) -> u64;
}

/// The single-process backend: [`Fleet`] and [`Rollouts`] over sled.
pub struct LocalState {
    pub store: Store,
    pub fleet: Fleet,
    pub rollouts: Rollouts,
}

#[async_trait]
impl StateBackend for LocalState {
    fn kind(&self) -> &'static str {
        "sled"
    }

    async fn enroll(
        &self,
        id: &str,
        device_type: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<(String, bool), StoreError> {
        let old = self.fleet.get(id).map(|d| {
            let r = d.record.lock().unwrap();
            (r.device_type.clone(), r.tags.clone())
        });
        let new = old.is_none();
        let token = self.fleet.enroll(id, device_type, tags.clone()).await?;
        self.rollouts.on_enroll(id, device_type, &tags, new);
        if let Some((t, old_tags)) = old {
            self.rollouts
                .on_tags_changed(id, (&t, &old_tags), (device_type, &tags));
        }
        Ok((token, new))
    }

    async fn authenticate(&self, token: &str) -> Result<Option<AuthedDevice>, StoreError> {
        let token_sha256 = crate::fleet::hash_token(token);
        Ok(self
            .fleet
            .authenticate(&token_sha256)
            .map(|dev| authed(&dev, token_sha256)))
    }

    async fn authenticate_cert(&self, id: &str, serial: &str) -> Result<CertAuth, StoreError> {
        if self.fleet.certs.is_revoked(serial) {
            return Ok(CertAuth::Revoked);
        }
        Ok(match self.fleet.get(id) {
            Some(dev) => CertAuth::Device(authed(&dev, cert_key(serial))),
            None => CertAuth::UnknownDevice,
        })
    }

    async fn record_cert(&self, serial: &str, device: &str) -> Result<(), StoreError> {
        self.fleet.certs.record_issued(serial, device).await
    }

    async fn revoke_certs(
        &self,
        device: &str,
        serial: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        self.fleet.certs.revoke(device, serial).await
    }

    async fn checkin(
        &self,
        dev: &AuthedDevice,
        req: &CheckinRequest,
    ) -> Result<Decision, StoreError> {
        if let Some(d) = dev.local.clone().or_else(|| self.fleet.get(&dev.id)) {
            self.fleet
                .record_checkin(&d, &req.current_version, req.booted_slot, req.state)?;
        }
        let d = self
            .rollouts
            .checkin(&dev.id, &dev.device_type, &dev.tags, req)?;
        if let Decision::AnswerDurable(_) = d {
            self.store.durable().await?;
        }
        Ok(d)
    }

    async fn apply_events(&self, device: &str, events: &[Event]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            out.push(self.rollouts.apply_event(device, e)?);
        }
        // Acknowledge only what is on disk.
        self.store.durable().await?;
        Ok(out)
    }

    async fn device_view(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let Some(dev) = self.fleet.get(id) else {
            return Ok(None);
        };
        let rec = dev.record.lock().unwrap().clone();
        let live = dev.live.lock().unwrap().clone();
        let rollouts: Vec<_> = self
            .rollouts
            .list()
            .iter()
            .filter_map(|r| self.rollouts.member(&r.id, id))
            .collect();
        // Events are keyed device NUL seq (big-endian): the newest are the
        // last of the device's prefix.
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        let mut history: Vec<Event> = Vec::new();
        for kv in self.store.events.scan_prefix(prefix).rev() {
            let (k, v) = kv?;
            let e: Event = crate::store::decode(&k, &v)?;
            if e.kind != ota_format::api::EventKind::Progress {
                history.push(e);
            }
            if history.len() == DEVICE_HISTORY {
                break;
            }
        }
        history.reverse();
        Ok(Some(serde_json::json!({
            "id": rec.id,
            "device_type": rec.device_type,
            "tags": rec.tags,
            "version": live.version,
            "booted_slot": live.booted_slot,
            "state": live.state,
            "last_seen_ms": live.last_seen_ms,
            "rollouts": rollouts,
            "history": history,
        })))
    }

    async fn device_count(&self) -> Result<u64, StoreError> {
        Ok(self.fleet.len() as u64)
    }

    async fn renew_lease(&self, device: &str, update_id: &str) -> Result<bool, StoreError> {
        Ok(self.rollouts.renew_lease(device, update_id))
    }

    async fn audit_append(&self, mut rec: crate::audit::AuditRecord) -> Result<u64, StoreError> {
        rec.seq = self.store.db.generate_id()? + 1;
        self.store
            .audit
            .insert(rec.seq.to_be_bytes(), crate::store::encode(&rec))?;
        self.store.durable().await?;
        Ok(rec.seq)
    }

    async fn audit_list(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<crate::audit::AuditPage, StoreError> {
        let end = before.unwrap_or(u64::MAX).to_be_bytes();
        let mut entries = Vec::new();
        for kv in self.store.audit.range(..end).rev().take(limit) {
            let (k, v) = kv?;
            entries.push(crate::store::decode::<crate::audit::AuditRecord>(&k, &v)?);
        }
        let next_before = (entries.len() == limit)
            .then(|| entries.last().map(|e| e.seq))
            .flatten();
        Ok(crate::audit::AuditPage {
            entries,
            next_before,
        })
    }

    async fn user_create(&self, u: &crate::audit::User) -> Result<bool, StoreError> {
        self.store.insert_new(&self.store.users, &u.name, u).await
    }

    async fn users(&self) -> Result<Vec<crate::audit::User>, StoreError> {
        crate::store::load_all(&self.store.users)
    }

    async fn user_delete(&self, name: &str) -> Result<bool, StoreError> {
        let had = self.store.users.remove(name.as_bytes())?.is_some();
        self.store.durable().await?;
        Ok(had)
    }

    async fn user_by_token(&self, sha256: &str) -> Result<Option<crate::audit::User>, StoreError> {
        // Users are few (people and tools, not devices): a scan.
        Ok(
            crate::store::load_all::<crate::audit::User>(&self.store.users)?
                .into_iter()
                .find(|u| crate::app::ct_eq(u.token_sha256.as_bytes(), sha256.as_bytes())),
        )
    }

    async fn device_events(
        &self,
        id: &str,
        before: Option<u64>,
        limit: usize,
        progress: bool,
    ) -> Result<Vec<Event>, StoreError> {
        // Keyed device NUL seq (big-endian), as in `device_view`.
        let mut lo = id.as_bytes().to_vec();
        lo.push(0);
        let mut hi = lo.clone();
        hi.extend_from_slice(&before.unwrap_or(u64::MAX).to_be_bytes());
        let mut out = Vec::new();
        for kv in self.store.events.range(lo..hi).rev() {
            let (k, v) = kv?;
            let e: Event = crate::store::decode(&k, &v)?;
            if progress || e.kind != ota_format::api::EventKind::Progress {
                out.push(e);
            }
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn rollout_spec(&self, id: &str) -> Result<Option<RolloutSpec>, StoreError> {
        Ok(self.rollouts.get(id).map(|r| r.record().spec))
    }

    async fn installed_update(
        &self,
        device: &str,
        release: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self.rollouts.installed_update(device, release))
    }

    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<bool, StoreError> {
        let Some(old) = self.fleet.get(id).map(|d| {
            let r = d.record.lock().unwrap();
            (r.device_type.clone(), r.tags.clone())
        }) else {
            return Ok(false);
        };
        let changed = self.fleet.set_tags(id, tags.clone()).await?;
        if changed {
            self.rollouts
                .on_tags_changed(id, (&old.0, &old.1), (&old.0, &tags));
        }
        Ok(changed)
    }

    async fn retire_device(&self, id: &str) -> Result<bool, StoreError> {
        self.fleet.remove(id).await
    }

    async fn device_list(&self, filter: &DeviceFilter) -> Result<DevicePage, RolloutError> {
        let rollout = match &filter.rollout {
            Some(id) => Some(
                self.rollouts
                    .get(id)
                    .ok_or_else(|| RolloutError::NotFound(id.clone()))?,
            ),
            None => None,
        };
        let scan = || {
            let mut page = PageBuilder::new(filter);
            self.scan_fleet(filter, rollout.as_deref(), &mut page);
            page.finish()
        };
        // A pass over 100,000 devices takes tens of milliseconds: off the
        // async workers, so check-ins on this worker are not held up behind
        // an operator's (or a dashboard's) listing.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        Ok(if multi_thread {
            tokio::task::block_in_place(scan)
        } else {
            scan()
        })
    }

    async fn create_rollout(&self, spec: RolloutSpec) -> Result<RolloutStatus, RolloutError> {
        let r = self.rollouts.create(spec, &self.fleet).await?;
        Ok(self.rollouts.status(&r))
    }

    /// # Cancel safety
    /// Cancelled before durability, the group may or may not exist after a
    /// crash; the operator, who saw no answer, lists groups.
    async fn create_group(&self, g: &crate::groups::Group) -> Result<bool, StoreError> {
        self.store.insert_new(&self.store.groups, &g.name, g).await
    }

    async fn groups(&self) -> Result<Vec<crate::groups::Group>, StoreError> {
        crate::store::load_all(&self.store.groups)
    }

    async fn group(&self, name: &str) -> Result<Option<crate::groups::Group>, StoreError> {
        match self.store.groups.get(name.as_bytes())? {
            Some(v) => Ok(Some(crate::store::decode(name.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// # Cancel safety
    /// As [`StateBackend::create_group`]: the deletion may or may not
    /// survive a crash if cancelled before durability.
    async fn delete_group(&self, name: &str) -> Result<bool, StoreError> {
        let had = self.store.groups.remove(name.as_bytes())?.is_some();
        self.store.durable().await?;
        Ok(had)
    }

    async fn set_rollout_state(
        &self,
        id: &str,
        to: RolloutState,
        reason: String,
    ) -> Result<RolloutStatus, RolloutError> {
        let r = self.rollouts.set_state(id, to, reason).await?;
        Ok(self.rollouts.status(&r))
    }

    async fn install_now(&self, id: &str, devices: &[String]) -> Result<Vec<String>, RolloutError> {
        self.rollouts.install_now(id, devices).await
    }

    fn window_clock(&self) -> &crate::rollout::window::WindowClock {
        self.rollouts.window_clock()
    }

    async fn rollout_statuses(&self) -> Result<Vec<RolloutStatus>, RolloutError> {
        Ok(self
            .rollouts
            .list()
            .iter()
            .map(|r| self.rollouts.status(r))
            .collect())
    }

    async fn rollout_status(&self, id: &str) -> Result<RolloutStatus, RolloutError> {
        let r = self
            .rollouts
            .get(id)
            .ok_or_else(|| RolloutError::NotFound(id.into()))?;
        Ok(self.rollouts.status(&r))
    }

    async fn tick(&self) -> Result<u64, StoreError> {
        self.rollouts.tick()
    }

    fn count_bytes(&self, device: &str, bytes: u64) {
        self.rollouts.count_bytes(device, bytes);
    }

    async fn stats(&self) -> Result<serde_json::Value, StoreError> {
        let events = self.store.events.clone();
        let events_stored = tokio::task::spawn_blocking(move || events.len())
            .await
            .map_err(|e| StoreError::Transaction(e.to_string()))?;
        Ok(serde_json::json!({
            "backend": "sled",
            "devices": self.fleet.len(),
            "events_stored": events_stored,
            "events_accepted_since_start": self.rollouts.events_accepted.load(Ordering::Relaxed),
            "events_duplicate_since_start": self.rollouts.events_duplicate.load(Ordering::Relaxed),
            "flushes_since_start": self.store.flush_count(),
        }))
    }

    async fn total_leases(&self) -> u64 {
        self.rollouts
            .list()
            .iter()
            .map(|r| r.throttle.active())
            .sum()
    }
}

impl LocalState {
    /// One pass over the in-memory fleet; each device's locks are held for a
    /// few field reads.
    fn scan_fleet(
        &self,
        filter: &DeviceFilter,
        rollout: Option<&crate::rollout::Rollout>,
        page: &mut PageBuilder<'_>,
    ) {
        let mut visit = |dev: &crate::fleet::Device| {
            let rec = dev.record.lock().unwrap();
            let live = dev.live.lock().unwrap();
            let state = (live.last_seen_ms > 0).then_some(live.state);
            if !filter.matches(
                &rec.device_type,
                live.version.as_deref(),
                &rec.tags,
                state,
                live.last_seen_ms,
            ) || rollout.is_some_and(|r| !r.has_member(&rec.id))
            {
                return;
            }
            page.offer(&rec.id, || DeviceSummary {
                id: rec.id.clone(),
                device_type: rec.device_type.clone(),
                version: live.version.clone(),
                state,
                booted_slot: live.booted_slot,
                last_seen_ms: live.last_seen_ms,
                tags: rec.tags.clone(),
            });
        };
        match &filter.ids {
            Some(ids) => ids
                .iter()
                .filter_map(|id| self.fleet.get(id))
                .for_each(|d| visit(&d)),
            None => self.fleet.for_each(visit),
        }
    }
}

fn authed(dev: &Arc<crate::fleet::Device>, token_sha256: [u8; 32]) -> AuthedDevice {
    let r = dev.record.lock().unwrap();
    AuthedDevice {
        id: r.id.clone(),
        device_type: r.device_type.clone(),
        tags: r.tags.clone(),
        version: r.version.clone(),
        booted_slot: None,
        state: None,
        last_seen_ms: 0,
        token_sha256,
        local: Some(dev.clone()),
    }
}

/// Shared handle.
pub type Backend = Arc<dyn StateBackend>;
