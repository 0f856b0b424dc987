//! The PostgreSQL backend (`[storage] backend = "postgres"`): several
//! replicas share devices, releases, rollouts, members, counters and events
//! in one database, and the fleet-wide throttle through a
//! [`FleetThrottle`] (Redis for several replicas).
//!
//! # How decisions stay right with several replicas
//!
//! - Every state change is one transaction, committed (durable:
//!   `synchronous_commit` stays on) before the device or operator hears of
//!   it. Replicas keep only caches that are safe to be stale: the rollout
//!   list (refreshed every tick, re-checked inside every admission write)
//!   and the release catalogue.
//! - An admission is the throttle's atomic grant *then* a conditional write
//!   (`member` still waiting, rollout still active). If the write loses,
//!   the lease is released; if the replica dies between the two, the lease
//!   expires unused. Either way the cap errs on admitting fewer.
//! - Writes that act on a lease (expiry, cancel) name its **fence** in
//!   their `WHERE`, so a replica acting on an old grant changes nothing.
//! - Events are idempotent by the `(device, seq)` primary key; the member
//!   transition and its counters are written in the same transaction.
//! - Counters are sharded rows (`wave_counters.shard`), summed on read, so
//!   a wave's commits do not serialise on one row lock.
//! - When the throttle lost its state (Redis restarted empty, or a fresh
//!   process with the local throttle) it is rebuilt from the members in
//!   `downloading`: every one of them counts against the cap again.
//! - Periodic work (wave opening, thresholds) locks the rollout row with
//!   `FOR UPDATE SKIP LOCKED`: one replica does it at a time, the others
//!   skip rather than queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Object, Pool};
use ota_format::api::{Action, CheckinRequest, Event, EventKind};
use tokio_postgres::types::Json;
use tracing::{Instrument, info, info_span, warn};

use crate::backend::{AuthedDevice, CertAuth, StateBackend, cert_key};
use crate::fleet::{hash_token, new_token};
use crate::inventory::{DeviceFilter, DevicePage, DeviceSummary, StateFilter};
use crate::releases::Releases;
use crate::rollout::shared::{Bucket, FleetThrottle, HeldLease, ThrottleError};
use crate::rollout::throttle::{Admission, Limits};
use crate::rollout::{
    Decision, Effect, FailureReason, Member, Phase, RolloutError, RolloutRecord, RolloutSpec,
    RolloutState, RolloutStatus, TOP_FAILURE_REASONS, WaveStatus, advance_record,
    cancel_ended_attempt, failure_verdict, held_back, install_gate, lease_expired, membership,
    nothing_to_offer, offer_for, past_download, ramped_rate, rank_key, reports_waiting, schedule,
    spec_matches, transition_for, ungated_outside_window, wave_bounds,
};
use crate::store::StoreError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Counter rows per wave: spreads row-lock contention of concurrent
/// commits over this many rows.
const SHARDS: i32 = 8;

/// How long a replica trusts a token it looked up. Check-ins of idle
/// devices then need no query at all; the price is that a token revoked by
/// re-enrollment keeps working for up to this long on replicas that cached
/// it (a revoked token still only speaks for its own device).
const AUTH_CACHE_MS: u64 = 5_000;

/// Advisory lock key serialising migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x6f74_615f_6d69_6772; // "ota_migr"

/// Maps a PostgreSQL error: connection trouble is "unavailable" (503, the
/// device retries), anything else is internal.
pub fn err(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() || e.as_db_error().is_none() && e.code().is_none() {
        return StoreError::Unavailable(format!("PostgreSQL: {e}"));
    }
    if let Some(c) = e.code() {
        let c = c.code();
        // Class 08 (connection), 57P0x (shutting down / cannot connect now).
        if c.starts_with("08") || c.starts_with("57P") {
            return StoreError::Unavailable(format!("PostgreSQL: {e}"));
        }
    }
    StoreError::Postgres(e.to_string())
}

/// A pooled connection.
///
/// # Cancel safety
/// Cancel safe: a dropped wait takes no connection.
pub async fn conn(pool: &Pool) -> Result<Object, StoreError> {
    pool.get()
        .await
        .map_err(|e| StoreError::Unavailable(format!("PostgreSQL connection pool: {e}")))
}

fn throttle_err(e: ThrottleError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Connects, runs the migrations (one replica at a time), returns the pool.
///
/// # Cancel safety
/// Not cancel safe during migrations; they run in transactions, so an
/// interrupted start simply migrates again at the next start.
pub async fn connect(url: &str, pool_size: usize) -> Result<Pool, StoreError> {
    let cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Postgres(format!("storage.url: {e}")))?;
    {
        let (mut client, connection) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to PostgreSQL: {e}")))?;
        let task = tokio::spawn(connection);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(err)?;
        let report = embedded::migrations::runner()
            .run_async(&mut client)
            .await
            .map_err(|e| StoreError::Postgres(format!("migrating the database: {e}")))?;
        for m in report.applied_migrations() {
            info!(migration = %m, "database migrated");
        }
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        drop(client);
        let _ = task.await;
    }
    let mgr = deadpool_postgres::Manager::from_config(
        cfg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(pool_size)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Postgres(format!("building the connection pool: {e}")))
}

fn text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn parse_text<T: serde::de::DeserializeOwned>(s: Option<String>) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s?)).ok()
}

fn state_str(s: RolloutState) -> &'static str {
    match s {
        RolloutState::Active => "active",
        RolloutState::Paused => "paused",
        RolloutState::Aborted => "aborted",
        RolloutState::Completed => "completed",
    }
}

/// A counter column (a fixed set: the SQL is built from these names only).
#[derive(Clone, Copy)]
enum Col {
    Eligible,
    Admitted,
    Installed,
    Committed,
    Failed,
    RolledBack,
    BytesServed,
}

impl Col {
    fn name(self) -> &'static str {
        match self {
            Col::Eligible => "eligible",
            Col::Admitted => "admitted",
            Col::Installed => "installed",
            Col::Committed => "committed",
            Col::Failed => "failed",
            Col::RolledBack => "rolled_back",
            Col::BytesServed => "bytes_served",
        }
    }
}

/// The counter shard of a device. Fixed per device, so every transaction
/// touches counter rows of one shard only and two transactions can never
/// wait on each other's counter rows in opposite orders (no deadlocks).
fn shard_of(device: &str) -> i32 {
    let h = device.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    (h % SHARDS as u64) as i32
}

/// Adds `n` to a counter of (rollout, wave) in `device`'s shard.
async fn bump(
    c: &impl GenericClient,
    rollout: &str,
    wave: usize,
    device: &str,
    col: Col,
    n: i64,
) -> Result<(), StoreError> {
    let shard = shard_of(device);
    let sql = format!(
        "INSERT INTO wave_counters (rollout, wave, shard, {0}) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (rollout, wave, shard) DO UPDATE SET {0} = wave_counters.{0} + EXCLUDED.{0}",
        col.name()
    );
    c.execute(&sql, &[&rollout, &(wave as i32), &shard, &n])
        .await
        .map_err(err)?;
    Ok(())
}

/// Per-wave sums: eligible, current, admitted, installed, committed,
/// failed, rolled_back, bytes_served.
async fn counts(
    c: &impl GenericClient,
    rollout: &str,
    waves: usize,
) -> Result<Vec<[u64; 8]>, StoreError> {
    let rows = c
        .query(
            "SELECT wave, sum(eligible)::bigint, sum(current)::bigint, sum(admitted)::bigint, \
             sum(installed)::bigint, sum(committed)::bigint, sum(failed)::bigint, \
             sum(rolled_back)::bigint, sum(bytes_served)::bigint \
             FROM wave_counters WHERE rollout = $1 GROUP BY wave",
            &[&rollout],
        )
        .await
        .map_err(err)?;
    let mut out = vec![[0u64; 8]; waves];
    for r in rows {
        let w: i32 = r.get(0);
        if let Some(slot) = out.get_mut(w as usize) {
            for (i, v) in slot.iter_mut().enumerate() {
                *v = r.get::<_, i64>(i + 1).max(0) as u64;
            }
        }
    }
    Ok(out)
}

/// (ok, bad) outcomes over waves `..=upto`.
fn outcomes(c: &[[u64; 8]], upto: usize) -> (u64, u64) {
    c[..=upto.min(c.len() - 1)]
        .iter()
        .fold((0, 0), |(ok, bad), w| (ok + w[4], bad + w[5] + w[6]))
}

/// One rollout as this replica last read it.
#[derive(Clone)]
struct Cached {
    rec: RolloutRecord,
}

/// The PostgreSQL-backed state of one replica.
pub struct PgState {
    pool: Pool,
    throttle: Arc<dyn FleetThrottle>,
    releases: Arc<Releases>,
    pacing: crate::rollout::SharedPacing,
    /// Rollouts in creation order (a cache: refreshed each tick and after
    /// this replica's own writes; admissions re-check state in SQL).
    rollouts: RwLock<Vec<Cached>>,
    /// Bytes served per device since the last tick, attributed to waves in
    /// the tick (one query per tick, not per Range request). Sharded: every
    /// Range response adds to it.
    bytes: dashmap::DashMap<String, u64>,
    events_accepted: AtomicU64,
    events_duplicate: AtomicU64,
    /// Token hash → (device, valid until ms); see [`AUTH_CACHE_MS`].
    auth: dashmap::DashMap<[u8; 32], (AuthedDevice, u64)>,
    /// The clock maintenance windows are judged by.
    window_clock: crate::rollout::window::WindowClock,
}

impl PgState {
    /// # Cancel safety
    /// Reads only.
    pub async fn open(
        pool: Pool,
        throttle: Arc<dyn FleetThrottle>,
        releases: Arc<Releases>,
        pacing: crate::rollout::SharedPacing,
    ) -> Result<PgState, StoreError> {
        let s = PgState {
            pool,
            throttle,
            releases,
            pacing,
            rollouts: RwLock::new(Vec::new()),
            bytes: dashmap::DashMap::new(),
            events_accepted: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            auth: dashmap::DashMap::new(),
            window_clock: Default::default(),
        };
        s.refresh().await?;
        Ok(s)
    }

    /// Re-reads the rollout list.
    ///
    /// # Cancel safety
    /// Reads only.
    async fn refresh(&self) -> Result<(), StoreError> {
        let c = conn(&self.pool).await?;
        let rows = c
            .query(
                "SELECT record FROM rollouts ORDER BY created_at_ms, id",
                &[],
            )
            .await
            .map_err(err)?;
        let all: Vec<Cached> = rows
            .iter()
            .map(|r| Cached {
                rec: r.get::<_, Json<RolloutRecord>>(0).0,
            })
            .collect();
        *self.rollouts.write().unwrap() = all;
        Ok(())
    }

    fn cached(&self, id: &str) -> Option<Cached> {
        self.rollouts
            .read()
            .unwrap()
            .iter()
            .find(|r| r.rec.id == id)
            .cloned()
    }

    fn active_for(&self, device_type: &str, tags: &BTreeMap<String, String>) -> Option<Cached> {
        let all = self.rollouts.read().unwrap();
        let mut superseded = false;
        for r in all.iter().rev() {
            if r.rec.spec.device_type != device_type {
                continue;
            }
            if membership::takes_devices(r.rec.state, superseded)
                && spec_matches(&r.rec.spec, device_type, tags)
            {
                return Some(r.clone());
            }
            superseded = true;
        }
        None
    }

    /// A completed rollout reopened by `device`, a newcomer that needs its
    /// release ([`membership`]); returns the state now.
    ///
    /// # Cancel safety
    /// One transaction: cancelled, the rollout is reopened or not, and the
    /// device's next check-in does it again.
    async fn reopen(&self, id: &str, device: &str) -> Result<RolloutState, StoreError> {
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let Some(row) = tx
            .query_opt(
                "SELECT record FROM rollouts WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(err)?
        else {
            return Ok(RolloutState::Aborted);
        };
        let mut rec: RolloutRecord = row.get::<_, Json<RolloutRecord>>(0).0;
        if rec.state != RolloutState::Completed {
            return Ok(rec.state);
        }
        rec.state = RolloutState::Active;
        rec.reason = membership::reopened_reason(device);
        write_rollout(&tx, &rec).await?;
        tx.commit().await.map_err(err)?;
        info!(rollout = %id, device, "completed rollout reopened by a new device");
        self.refresh().await?;
        Ok(RolloutState::Active)
    }

    /// A device's type or tags changed from `old` to `new` in `tx`: the
    /// eligible counts of the rollouts it left or joined follow
    /// ([`membership`]).
    async fn tags_changed(
        &self,
        tx: &impl GenericClient,
        device: &str,
        old: (&str, &BTreeMap<String, String>),
        new: (&str, &BTreeMap<String, String>),
    ) -> Result<(), StoreError> {
        let live: Vec<Cached> = self.rollouts.read().unwrap().clone();
        for r in live {
            let spec = &r.rec.spec;
            let delta = match (
                spec_matches(spec, old.0, old.1),
                spec_matches(spec, new.0, new.1),
            ) {
                (false, true) => 1,
                (true, false) => -1,
                _ => continue,
            };
            bump(
                tx,
                &r.rec.id,
                r.rec.wave_of(device),
                device,
                Col::Eligible,
                delta,
            )
            .await?;
        }
        Ok(())
    }

    /// Recreates the throttle's state of `rollout` from the members in
    /// `downloading` (after [`ThrottleError::Lost`]).
    async fn rebuild(&self, rollout: &str) -> Result<(), StoreError> {
        let c = conn(&self.pool).await?;
        let rows = c
            .query(
                "SELECT device, member->>'update_id', fence FROM members \
                 WHERE rollout = $1 AND phase = 'downloading'",
                &[&rollout],
            )
            .await
            .map_err(err)?;
        let leases: Vec<HeldLease> = rows
            .iter()
            .map(|r| HeldLease {
                device: r.get(0),
                update_id: r.get::<_, Option<String>>(1).unwrap_or_default(),
                fence: r.get::<_, i64>(2).max(0) as u64,
            })
            .collect();
        let max_fence: i64 = c
            .query_one("SELECT coalesce(max(fence), 0) FROM members", &[])
            .await
            .map_err(err)?
            .get(0);
        warn!(
            rollout,
            leases = leases.len(),
            "throttle state lost; rebuilt from the database (admitting fewer until leases settle)"
        );
        self.throttle
            .rebuild(
                rollout,
                &leases,
                self.pacing.load().lease_ms,
                max_fence.max(0) as u64,
                Bucket::Empty,
            )
            .await
            .map_err(throttle_err)
    }
}

/// Runs a throttle call; on [`ThrottleError::Lost`] rebuilds and retries once.
macro_rules! throttled {
    ($self:ident, $rollout:expr, $call:expr) => {{
        match $call.await {
            Err(ThrottleError::Lost(_)) => {
                $self.rebuild($rollout).await?;
                $call.await.map_err(throttle_err)
            }
            r => r.map_err(throttle_err),
        }
    }};
}

impl PgState {
    /// Turns an expired or lost lease `fence` of `device` into a retry or a
    /// failure (only if the member still holds that fence).
    async fn expire_member(
        &self,
        r: &RolloutRecord,
        device: &str,
        fence: u64,
    ) -> Result<bool, StoreError> {
        let span = info_span!("lease_expiry", rollout = %r.id, device);
        self.expire_member_inner(r, device, fence)
            .instrument(span)
            .await
    }

    async fn expire_member_inner(
        &self,
        r: &RolloutRecord,
        device: &str,
        fence: u64,
    ) -> Result<bool, StoreError> {
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let Some(row) = tx
            .query_opt(
                "SELECT member FROM members WHERE rollout = $1 AND device = $2 \
                 AND phase = 'downloading' AND fence = $3 FOR UPDATE",
                &[&r.id, &device, &(fence as i64)],
            )
            .await
            .map_err(err)?
        else {
            return Ok(false);
        };
        let mut m: Member = row.get::<_, Json<Member>>(0).0;
        let failed = m.attempt > r.spec.max_retries;
        if failed {
            m.phase = Phase::Failed;
            m.reason = Some(format!("lease expired after {} attempts", m.attempt));
        } else {
            m.phase = Phase::Waiting;
            m.reason = Some("lease expired; will retry".into());
        }
        tx.execute(
            "UPDATE members SET phase = $3, member = $4 WHERE rollout = $1 AND device = $2",
            &[&r.id, &device, &text(&m.phase), &Json(&m)],
        )
        .await
        .map_err(err)?;
        if failed {
            bump(&tx, &r.id, m.wave, device, Col::Failed, 1).await?;
        }
        tx.commit().await.map_err(err)?;
        info!(phase = ?m.phase, "download lease expired");
        if failed {
            self.check_failures(&r.id).await?;
        }
        Ok(true)
    }

    /// Undoes the record of admission `fence` of member `m` whose lease
    /// the throttle no longer holds (lost between grant and record, see
    /// the admission in [`PgState::checkin`]): the member waits again with
    /// its attempt not spent, and the admission is not counted. The device
    /// was never told, so nothing else changes.
    async fn withdraw_admission(
        &self,
        r: &RolloutRecord,
        m: &Member,
        fence: u64,
    ) -> Result<(), StoreError> {
        let mut w = m.clone();
        w.phase = Phase::Waiting;
        w.attempt = m.attempt.saturating_sub(1);
        w.artifacts = None;
        w.reason = Some("admission withdrawn: its lease was lost in a throttle rebuild".into());
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let n = tx
            .execute(
                "UPDATE members SET phase = 'waiting', member = $4 \
                 WHERE rollout = $1 AND device = $2 AND fence = $3 AND phase = 'downloading'",
                &[&r.id, &m.device, &(fence as i64), &Json(&w)],
            )
            .await
            .map_err(err)?;
        if n == 1 {
            bump(&tx, &r.id, m.wave, &m.device, Col::Admitted, -1).await?;
        }
        tx.commit().await.map_err(err)?;
        warn!(rollout = %r.id, device = %m.device, fence, "admission withdrawn: its lease was lost in a throttle rebuild before the device was told");
        Ok(())
    }

    /// Reaps expired leases of `r` and turns each into a retry or failure;
    /// returns how many were settled.
    async fn reap_and_settle(&self, r: &RolloutRecord) -> Result<u64, StoreError> {
        let expired = throttled!(self, &r.id, self.throttle.reap(&r.id))?;
        let mut n = 0;
        for l in expired {
            if self.expire_member(r, &l.device, l.fence).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Pauses or aborts the rollout if its failure rate reached the
    /// threshold (under the rollout's row lock).
    async fn check_failures(&self, id: &str) -> Result<(), StoreError> {
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let Some(row) = tx
            .query_opt(
                "SELECT record FROM rollouts WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(err)?
        else {
            return Ok(());
        };
        let mut rec: RolloutRecord = row.get::<_, Json<RolloutRecord>>(0).0;
        let cs = counts(&tx, id, rec.spec.waves.len()).await?;
        let (ok, bad) = outcomes(&cs, rec.wave);
        let Some((state, reason)) = failure_verdict(&rec.spec, &rec, ok, bad) else {
            return Ok(());
        };
        rec.state = state;
        rec.reason = reason;
        warn!(rollout = %id, state = ?rec.state, reason = %rec.reason, "failure threshold reached");
        write_rollout(&tx, &rec).await?;
        tx.commit().await.map_err(err)?;
        self.refresh().await
    }

    /// Opens waves and completes the rollout (one replica at a time).
    async fn advance(&self, id: &str) -> Result<(), StoreError> {
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let Some(row) = tx
            .query_opt(
                "SELECT record FROM rollouts WHERE id = $1 AND state = 'active' \
                 FOR UPDATE SKIP LOCKED",
                &[&id],
            )
            .await
            .map_err(err)?
        else {
            return Ok(());
        };
        let mut rec: RolloutRecord = row.get::<_, Json<RolloutRecord>>(0).0;
        let cs = counts(&tx, id, rec.spec.waves.len()).await?;
        let waves: Vec<(u64, u64, u64)> = cs
            .iter()
            .map(|w| (w[0], w[4] + w[1], w[5] + w[6]))
            .collect();
        let spec = rec.spec.clone();
        let now = crate::now_ms();
        let in_flight = if membership::needs_in_flight(&spec, &rec, &waves, now) {
            let n: i64 = tx
                .query_one(
                    "SELECT count(*) FROM members WHERE rollout = $1 \
                     AND phase IN ('waiting', 'downloading', 'downloaded', 'waiting-for-window', 'installed', 'rebooting')",
                    &[&id],
                )
                .await
                .map_err(err)?
                .get(0);
            Some(n as u64)
        } else {
            None
        };
        if !advance_record(&spec, &mut rec, &waves, now, in_flight) {
            return Ok(());
        }
        info!(rollout = %id, state = ?rec.state, wave = rec.wave + 1, reason = %rec.reason, "rollout advanced");
        write_rollout(&tx, &rec).await?;
        tx.commit().await.map_err(err)?;
        self.refresh().await
    }

    async fn status_of(&self, rec: &RolloutRecord) -> Result<RolloutStatus, StoreError> {
        let c = conn(&self.pool).await?;
        let n = rec.spec.waves.len();
        let cs = counts(&c, &rec.id, n).await?;
        let rows = c
            .query(
                "SELECT wave, phase, count(*) FROM members WHERE rollout = $1 GROUP BY wave, phase",
                &[&rec.id],
            )
            .await
            .map_err(err)?;
        let mut per_phase: Vec<HashMap<String, u64>> = vec![HashMap::new(); n];
        for r in rows {
            let w: i32 = r.get(0);
            let p: String = r.get(1);
            let k: i64 = r.get(2);
            if let Some(m) = per_phase.get_mut(w as usize) {
                m.insert(p, k as u64);
            }
        }
        let ts = match self.throttle.stats(&rec.id).await {
            Ok(s) => s,
            Err(ThrottleError::Lost(_)) => Default::default(),
            Err(e) => return Err(throttle_err(e)),
        };
        let waves = (0..n)
            .map(|w| {
                let c = &cs[w];
                let ph = |p: &str| per_phase[w].get(p).copied().unwrap_or(0);
                WaveStatus {
                    wave: w + 1,
                    percent: rec.spec.waves[w],
                    open: w <= rec.wave,
                    eligible: c[0],
                    already_current: c[1],
                    admitted: c[2],
                    waiting: ph("waiting"),
                    downloading: ph("downloading"),
                    installed: c[3],
                    committed: c[4],
                    failed: c[5],
                    rolled_back: c[6],
                    cancelled: ph("cancelled"),
                    waiting_for_window: ph("waiting-for-window"),
                    in_progress: Phase::ALL
                        .iter()
                        .filter(|p| p.is_in_progress())
                        .map(|p| ph(p.name()))
                        .sum(),
                    bytes_served: c[7],
                }
            })
            .collect();
        let committed: u64 = cs.iter().map(|w| w[4]).sum();
        // Same definition as the sled engine's FailureTally: the reason of
        // each member whose last attempt failed.
        let failure_reasons = c
            .query(
                "SELECT member->>'reason', count(*) FROM members WHERE rollout = $1 \
                 AND phase IN ('failed', 'rolled-back', 'waiting') AND member->>'reason' IS NOT NULL \
                 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $2",
                &[&rec.id, &(TOP_FAILURE_REASONS as i64)],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| FailureReason {
                reason: r.get(0),
                devices: r.get::<_, i64>(1) as u64,
            })
            .collect();
        let outcomes: Vec<(u64, u64, u64)> = cs
            .iter()
            .map(|w| (w[0], w[4] + w[1], w[5] + w[6]))
            .collect();
        Ok(RolloutStatus {
            next_wave: schedule::next_wave_wait(&rec.spec, rec, &outcomes, crate::now_ms()),
            soak_ends_at_ms: schedule::soak_ends_at(&rec.spec, rec, rec.spec.waves.len()),
            id: rec.id.clone(),
            state: rec.state,
            reason: rec.reason.clone(),
            open_wave: rec.wave + 1,
            created_at_ms: rec.created_at_ms,
            active_leases: ts.active,
            queued: ts.waiting,
            starts_per_min_now: ramped_rate(&rec.spec, committed),
            leases_granted: ts.granted,
            leases_expired: ts.expired,
            spec: rec.spec.clone(),
            waves,
            wave_bounds: rec.wave_bounds.clone(),
            failure_reasons,
            next_window: crate::rollout::window::status_next_opening(
                &rec.spec.windows,
                self.window_clock.now(),
            ),
        })
    }

    /// Attributes buffered payload bytes to (rollout, wave) counters.
    async fn flush_bytes(&self) -> Result<(), StoreError> {
        // Each entry is taken out whole; bytes added meanwhile start a new one.
        let keys: Vec<String> = self.bytes.iter().map(|e| e.key().clone()).collect();
        let pending: HashMap<String, u64> = keys
            .into_iter()
            .filter_map(|k| self.bytes.remove(&k))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let devices: Vec<&str> = pending.keys().map(String::as_str).collect();
        let c = conn(&self.pool).await?;
        let rows = c
            .query(
                "SELECT DISTINCT ON (m.device) m.device, m.rollout, m.wave FROM members m \
                 JOIN rollouts r ON r.id = m.rollout WHERE m.device = ANY($1) \
                 ORDER BY m.device, r.created_at_ms DESC",
                &[&devices],
            )
            .await
            .map_err(err)?;
        let mut per: HashMap<(String, i32), i64> = HashMap::new();
        for r in rows {
            let d: String = r.get(0);
            *per.entry((r.get(1), r.get(2))).or_default() += pending[&d] as i64;
        }
        for ((rollout, wave), n) in per {
            bump(&c, &rollout, wave as usize, "", Col::BytesServed, n).await?;
        }
        Ok(())
    }
}

async fn write_rollout(c: &impl GenericClient, rec: &RolloutRecord) -> Result<(), StoreError> {
    c.execute(
        "UPDATE rollouts SET state = $2, record = $3 WHERE id = $1",
        &[&rec.id, &state_str(rec.state), &Json(rec)],
    )
    .await
    .map_err(err)?;
    Ok(())
}

#[async_trait]
impl StateBackend for PgState {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn enroll(
        &self,
        id: &str,
        device_type: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<(String, bool), StoreError> {
        let token = new_token();
        let hash = hash_token(&token);
        self.refresh().await?;
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        // The token being revoked: this replica forgets it at once (others
        // within AUTH_CACHE_MS).
        let before: Option<(Vec<u8>, String, Json<BTreeMap<String, String>>)> = tx
            .query_opt(
                "SELECT token_sha256, device_type, tags FROM devices WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(err)?
            .map(|r| (r.get(0), r.get(1), r.get(2)));
        let old = before.as_ref().map(|b| b.0.clone());
        let new: bool = tx
            .query_one(
                "INSERT INTO devices (id, device_type, tags, token_sha256, enrolled_at_ms) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (id) DO UPDATE SET device_type = EXCLUDED.device_type, \
                 tags = EXCLUDED.tags, token_sha256 = EXCLUDED.token_sha256, \
                 enrolled_at_ms = EXCLUDED.enrolled_at_ms \
                 RETURNING (xmax = 0)",
                &[
                    &id,
                    &device_type,
                    &Json(&tags),
                    &hash.as_slice(),
                    &(crate::now_ms() as i64),
                ],
            )
            .await
            .map_err(err)?
            .get(0);
        if new {
            let live: Vec<Cached> = self
                .rollouts
                .read()
                .unwrap()
                .iter()
                .filter(|r| {
                    r.rec.state != RolloutState::Aborted
                        && spec_matches(&r.rec.spec, device_type, &tags)
                })
                .cloned()
                .collect();
            for r in live {
                let w = r.rec.wave_of(id);
                bump(&tx, &r.rec.id, w, id, Col::Eligible, 1).await?;
            }
        } else if let Some((_, t, Json(old_tags))) = &before {
            self.tags_changed(&tx, id, (t, old_tags), (device_type, &tags))
                .await?;
        }
        tx.commit().await.map_err(err)?;
        if let Some(old) = old.and_then(|o| <[u8; 32]>::try_from(o.as_slice()).ok()) {
            self.auth.remove(&old);
        }
        Ok((token, new))
    }

    async fn authenticate(&self, token: &str) -> Result<Option<AuthedDevice>, StoreError> {
        let hash = hash_token(token);
        let now = crate::now_ms();
        if let Some(e) = self.auth.get(&hash)
            && e.1 > now
        {
            return Ok(Some(e.0.clone()));
        }
        let c = conn(&self.pool).await?;
        let Some(r) = c
            .query_opt(
                "SELECT id, device_type, tags, version, booted_slot, state, last_seen_ms \
                 FROM devices WHERE token_sha256 = $1",
                &[&hash.as_slice()],
            )
            .await
            .map_err(err)?
        else {
            return Ok(None);
        };
        let dev = AuthedDevice {
            id: r.get(0),
            device_type: r.get(1),
            tags: r.get::<_, Json<BTreeMap<String, String>>>(2).0,
            version: r.get(3),
            booted_slot: parse_text(r.get(4)),
            state: parse_text(r.get(5)),
            last_seen_ms: r.get::<_, i64>(6).max(0) as u64,
            token_sha256: hash,
            local: None,
        };
        self.auth.insert(hash, (dev.clone(), now + AUTH_CACHE_MS));
        Ok(Some(dev))
    }

    async fn authenticate_cert(&self, id: &str, serial: &str) -> Result<CertAuth, StoreError> {
        let key = cert_key(serial);
        let now = crate::now_ms();
        if let Some(e) = self.auth.get(&key)
            && e.1 > now
            && e.0.id == id
        {
            return Ok(CertAuth::Device(e.0.clone()));
        }
        let c = conn(&self.pool).await?;
        let r = c
            .query_one(
                "SELECT d.id, d.device_type, d.tags, d.version, d.booted_slot, d.state, \
                 d.last_seen_ms, EXISTS (SELECT 1 FROM device_certs \
                 WHERE serial = $2 AND revoked_at_ms IS NOT NULL) \
                 FROM (SELECT 1) AS one LEFT JOIN devices d ON d.id = $1",
                &[&id, &serial],
            )
            .await
            .map_err(err)?;
        if r.get::<_, bool>(7) {
            return Ok(CertAuth::Revoked);
        }
        if r.get::<_, Option<String>>(0).is_none() {
            return Ok(CertAuth::UnknownDevice);
        }
        let dev = AuthedDevice {
            id: r.get(0),
            device_type: r.get(1),
            tags: r.get::<_, Json<BTreeMap<String, String>>>(2).0,
            version: r.get(3),
            booted_slot: parse_text(r.get(4)),
            state: parse_text(r.get(5)),
            last_seen_ms: r.get::<_, i64>(6).max(0) as u64,
            token_sha256: key,
            local: None,
        };
        self.auth.insert(key, (dev.clone(), now + AUTH_CACHE_MS));
        Ok(CertAuth::Device(dev))
    }

    async fn record_cert(&self, serial: &str, device: &str) -> Result<(), StoreError> {
        let c = conn(&self.pool).await?;
        c.execute(
            "INSERT INTO device_certs (serial, device, issued_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (serial) DO NOTHING",
            &[&serial, &device, &(crate::now_ms() as i64)],
        )
        .await
        .map_err(err)?;
        Ok(())
    }

    async fn revoke_certs(
        &self,
        device: &str,
        serial: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let now = crate::now_ms() as i64;
        let c = conn(&self.pool).await?;
        let rows = match serial {
            Some(s) => c
                .query(
                    "INSERT INTO device_certs (serial, device, issued_at_ms, revoked_at_ms) \
                     VALUES ($1, $2, 0, $3) ON CONFLICT (serial) DO UPDATE \
                     SET revoked_at_ms = EXCLUDED.revoked_at_ms \
                     WHERE device_certs.revoked_at_ms IS NULL RETURNING serial",
                    &[&s, &device, &now],
                )
                .await
                .map_err(err)?,
            None => c
                .query(
                    "UPDATE device_certs SET revoked_at_ms = $2 \
                     WHERE device = $1 AND revoked_at_ms IS NULL RETURNING serial",
                    &[&device, &now],
                )
                .await
                .map_err(err)?,
        };
        let out: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        // This replica forgets them at once; others within AUTH_CACHE_MS.
        for s in &out {
            self.auth.remove(&cert_key(s));
        }
        Ok(out)
    }

    async fn checkin(
        &self,
        dev: &AuthedDevice,
        req: &CheckinRequest,
    ) -> Result<Decision, StoreError> {
        let now = crate::now_ms();
        let p = **self.pacing.load();
        // What the device reports is written only when it changed (and
        // last-seen every few minutes): idle check-ins stay read-only.
        if dev.version.as_deref() != Some(&req.current_version)
            || dev.booted_slot != Some(req.booted_slot)
            || dev.state != Some(req.state)
            || now.saturating_sub(dev.last_seen_ms) > 5 * p.idle_ms
        {
            let c = conn(&self.pool).await?;
            c.execute(
                "UPDATE devices SET version = $2, booted_slot = $3, state = $4, last_seen_ms = $5 \
                 WHERE id = $1",
                &[
                    &dev.id,
                    &req.current_version,
                    &text(&req.booted_slot),
                    &text(&req.state),
                    &(now as i64),
                ],
            )
            .await
            .map_err(err)?;
            // The cached copy says what was just written.
            if let Some(mut e) = self.auth.get_mut(&dev.token_sha256) {
                e.0.version = Some(req.current_version.clone());
                e.0.booted_slot = Some(req.booted_slot);
                e.0.state = Some(req.state);
                e.0.last_seen_ms = now;
            }
        }
        let Some(r) = self.active_for(&dev.device_type, &dev.tags) else {
            return Ok(Decision::Answer(Action::None));
        };
        let rec = &r.rec;
        let device = dev.id.as_str();
        let row = {
            let c = conn(&self.pool).await?;
            c.query_opt(
                "SELECT member, fence FROM members WHERE rollout = $1 AND device = $2",
                &[&rec.id, &device],
            )
            .await
            .map_err(err)?
        };
        let member: Option<(Member, u64)> = row.map(|row| {
            (
                row.get::<_, Json<Member>>(0).0,
                row.get::<_, i64>(1).max(0) as u64,
            )
        });
        if let Some((m, fence)) = &member {
            if reports_waiting(req, m) {
                let d = install_gate(
                    &rec.id,
                    &rec.spec,
                    rec.state,
                    m,
                    self.window_clock.now(),
                    &crate::rollout::window::DeviceZone::reported(req.time_zone.as_deref()),
                );
                if let Decision::Answer(Action::Cancel { .. }) = &d {
                    crate::pg_windows::cancel_waiting(&self.pool, &rec.id, m).await?;
                    let _ = throttled!(
                        self,
                        &rec.id,
                        self.throttle.release(&rec.id, device, *fence)
                    )?;
                    return Ok(Decision::AnswerDurable(Action::Cancel {
                        update_id: m.update_id.clone(),
                        reason: format!("rollout {} was aborted", rec.id),
                    }));
                }
                return Ok(d);
            }
            match m.phase {
                Phase::Downloading => {
                    if past_download(req, m) {
                        return Ok(Decision::Answer(Action::None));
                    }
                    if rec.state == RolloutState::Aborted {
                        let mut nm = m.clone();
                        nm.phase = Phase::Cancelled;
                        nm.reason = Some("rollout aborted".into());
                        let c = conn(&self.pool).await?;
                        c.execute(
                            "UPDATE members SET phase = 'cancelled', member = $4 \
                             WHERE rollout = $1 AND device = $2 AND fence = $3 \
                             AND phase = 'downloading'",
                            &[&rec.id, &device, &(*fence as i64), &Json(&nm)],
                        )
                        .await
                        .map_err(err)?;
                        let _ = throttled!(
                            self,
                            &rec.id,
                            self.throttle.release(&rec.id, device, *fence)
                        )?;
                        return Ok(Decision::AnswerDurable(Action::Cancel {
                            update_id: m.update_id.clone(),
                            reason: format!("rollout {} was aborted", rec.id),
                        }));
                    }
                    let renewed = throttled!(
                        self,
                        &rec.id,
                        self.throttle.renew(&rec.id, device, *fence, p.lease_ms)
                    )?;
                    if renewed {
                        let a = m
                            .artifacts
                            .clone()
                            .expect("downloading members have artifacts");
                        return Ok(Decision::Answer(Action::Update(offer_for(
                            &rec.id,
                            &rec.spec,
                            m,
                            &a,
                            p.max_parallel_ranges,
                            p.lease_ms,
                        ))));
                    }
                    // The lease is gone: reap now (so the throttle counts
                    // the expiry at once), then settle this member even if
                    // its lease was reaped by a replica that died before
                    // recording it.
                    self.reap_and_settle(rec).await?;
                    self.expire_member(rec, device, *fence).await?;
                    return Ok(Decision::Answer(lease_expired(m)));
                }
                Phase::Waiting | Phase::Cancelled | Phase::Failed => {
                    if let Some(cancel) = cancel_ended_attempt(&rec.id, m, req) {
                        return Ok(Decision::Answer(cancel));
                    }
                    if m.phase != Phase::Waiting {
                        return Ok(Decision::Answer(Action::None));
                    }
                }
                _ => return Ok(Decision::Answer(Action::None)),
            }
        }
        if nothing_to_offer(&rec.spec.release, rec.state, req) {
            return Ok(Decision::Answer(Action::None));
        }
        let state = if rec.state == RolloutState::Completed {
            self.reopen(&rec.id, device).await?
        } else {
            rec.state
        };
        if state == RolloutState::Aborted {
            return Ok(Decision::Answer(Action::None));
        }
        let wave = rec.wave_of(device);
        let starts_at = schedule::start_ms(&rec.spec, rec.created_at_ms);
        if let Some(wait) = held_back(&rec.id, starts_at, state, wave, rec.wave, crate::now_ms()) {
            return Ok(wait);
        }
        if let Some(wait) = ungated_outside_window(&rec.id, &rec.spec, req, self.window_clock.now())
        {
            return Ok(wait);
        }
        let Some(artifacts) = self.releases.pick(
            &dev.device_type,
            &rec.spec.release,
            &req.current_version,
            req.delta_codecs,
        ) else {
            return Ok(Decision::Wait {
                reason: format!("release {} is still being built", rec.spec.release),
                class: "building",
                near_head: false,
            });
        };
        let attempt = member.as_ref().map_or(0, |(m, _)| m.attempt) + 1;
        let update_id = format!("{}.{attempt}", rec.id);
        // Ramping needs the committed count: one small query per admission
        // attempt, only when the rollout ramps.
        let starts_per_min = if rec.spec.ramp_factor > 1.0 {
            let c = conn(&self.pool).await?;
            let cs = counts(&c, &rec.id, rec.spec.waves.len()).await?;
            ramped_rate(&rec.spec, cs.iter().map(|w| w[4]).sum())
        } else {
            rec.spec.max_starts_per_min
        };
        let limits = Limits {
            max_concurrent: rec.spec.max_concurrent,
            starts_per_min,
            lease_ms: p.lease_ms,
            stale_after_ms: 3 * p.idle_ms,
        };
        let span = info_span!("admission", rollout = %rec.id, device, wave = wave + 1);
        let admission = throttled!(
            self,
            &rec.id,
            self.throttle.try_admit(&rec.id, device, &update_id, limits)
        )?;
        match admission {
            Admission::Granted { fence } => {
                let m = Member {
                    device: device.to_string(),
                    wave,
                    phase: Phase::Downloading,
                    attempt,
                    update_id,
                    artifacts: Some(artifacts.clone()),
                    reason: None,
                    bytes_verified: 0,
                    // An operator's install-now outlives a retry.
                    install_now: member.as_ref().is_some_and(|(m, _)| m.install_now),
                };
                let written = async {
                    let mut c = conn(&self.pool).await?;
                    let tx = c.transaction().await.map_err(err)?;
                    // Written only if the rollout is still active and the
                    // member still waiting (or new): a pause or another
                    // replica's admission in between wins.
                    let n = tx
                        .execute(
                            "INSERT INTO members (rollout, device, wave, phase, fence, member) \
                             SELECT $1, $2, $3, 'downloading', $4, $5 \
                             WHERE EXISTS (SELECT 1 FROM rollouts WHERE id = $1 AND state = 'active') \
                             ON CONFLICT (rollout, device) DO UPDATE \
                             SET phase = 'downloading', fence = EXCLUDED.fence, member = EXCLUDED.member \
                             WHERE members.phase = 'waiting' \
                             AND (members.member->>'attempt')::int = $6",
                            &[
                                &rec.id,
                                &device,
                                &(wave as i32),
                                &(fence as i64),
                                &Json(&m),
                                &((attempt - 1) as i32),
                            ],
                        )
                        .await
                        .map_err(err)?;
                    if n == 1 {
                        bump(&tx, &rec.id, wave, device, Col::Admitted, 1).await?;
                        tx.commit().await.map_err(err)?;
                    }
                    Ok::<bool, StoreError>(n == 1)
                }
                .await;
                match written {
                    Ok(true) => {
                        // The grant was made in the throttle before it was
                        // recorded here. Had the throttle lost its state in
                        // between, a rebuild (which reads only recorded
                        // leases) would not count this one and could give
                        // its slot away: confirm the lease still stands
                        // before the device is told to download.
                        let held = throttled!(
                            self,
                            &rec.id,
                            self.throttle.renew(&rec.id, device, fence, p.lease_ms)
                        )?;
                        if !held {
                            self.withdraw_admission(rec, &m, fence).await?;
                            return Ok(Decision::Wait {
                                reason: "the download lease was lost while the throttle was \
                                         rebuilt; retry shortly"
                                    .into(),
                                class: "queued",
                                near_head: true,
                            });
                        }
                        let _g = span.enter();
                        info!(fence, update_id = %m.update_id, delta_from = ?artifacts.from_version, "admitted");
                        Ok(Decision::AnswerDurable(Action::Update(offer_for(
                            &rec.id,
                            &rec.spec,
                            &m,
                            &artifacts,
                            p.max_parallel_ranges,
                            p.lease_ms,
                        ))))
                    }
                    other => {
                        // Give the slot back (the grant was not recorded).
                        if let Err(e) = self.throttle.release(&rec.id, device, fence).await {
                            warn!(error = %e, "releasing an unrecorded lease; it will expire");
                        }
                        other?;
                        Ok(Decision::Wait {
                            reason: "admission lost a race; retry shortly".into(),
                            class: "queued",
                            near_head: true,
                        })
                    }
                }
            }
            Admission::Wait { reason, near_head } => Ok(Decision::Wait {
                reason: reason.as_str().into(),
                class: reason.label(),
                near_head,
            }),
        }
    }

    async fn apply_events(&self, device: &str, events: &[Event]) -> Result<Vec<bool>, StoreError> {
        // Rollouts created by another replica since the last tick.
        if events.iter().any(|e| {
            let rid = e.update_id.split('.').next().unwrap_or("");
            !rid.is_empty() && self.cached(rid).is_none()
        }) {
            self.refresh().await?;
        }
        let now = crate::now_ms() as i64;
        let mut out = Vec::with_capacity(events.len());
        // Throttle effects run after the commit: (rollout, fence, renew?).
        let mut after: Vec<(String, u64, bool)> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        for ev in events {
            let n = tx
                .execute(
                    "INSERT INTO events (device, seq, update_id, kind, event, received_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[
                        &device,
                        &(ev.seq as i64),
                        &ev.update_id,
                        &text(&ev.kind),
                        &Json(ev),
                        &now,
                    ],
                )
                .await
                .map_err(err)?;
            if n == 0 {
                out.push(false);
                continue;
            }
            out.push(true);
            let rid = ev.update_id.split('.').next().unwrap_or("");
            let Some(r) = self.cached(rid) else {
                continue;
            };
            let Some(row) = tx
                .query_opt(
                    "SELECT member, fence FROM members WHERE rollout = $1 AND device = $2 FOR UPDATE",
                    &[&rid, &device],
                )
                .await
                .map_err(err)?
            else {
                continue;
            };
            let m: Member = row.get::<_, Json<Member>>(0).0;
            let fence = row.get::<_, i64>(1).max(0) as u64;
            if m.update_id != ev.update_id {
                continue;
            }
            if matches!(ev.kind, EventKind::Progress | EventKind::DownloadStarted)
                && m.phase == Phase::Downloading
            {
                after.push((rid.to_string(), fence, true));
            }
            let Some((nm, effect)) = transition_for(r.rec.spec.max_retries, &m, ev) else {
                continue;
            };
            tx.execute(
                "UPDATE members SET phase = $3, member = $4 WHERE rollout = $1 AND device = $2",
                &[&rid, &device, &text(&nm.phase), &Json(&nm)],
            )
            .await
            .map_err(err)?;
            let col = match effect {
                Effect::None | Effect::ReleaseLease => None,
                Effect::Installed => Some(Col::Installed),
                Effect::Committed => Some(Col::Committed),
                Effect::Failed => Some(Col::Failed),
                Effect::RolledBack => Some(Col::RolledBack),
            };
            if let Some(col) = col {
                bump(&tx, rid, nm.wave, device, col, 1).await?;
            }
            if effect != Effect::None {
                after.push((rid.to_string(), fence, false));
            }
            if matches!(effect, Effect::Failed | Effect::RolledBack) {
                failures.push(rid.to_string());
            }
        }
        tx.commit().await.map_err(err)?;
        let accepted = out.iter().filter(|&&n| n).count() as u64;
        self.events_accepted.fetch_add(accepted, Ordering::Relaxed);
        self.events_duplicate
            .fetch_add(out.len() as u64 - accepted, Ordering::Relaxed);
        // The events are durable; lease effects are best effort (a lease
        // not released expires; one not renewed is renewed by the next
        // check-in or progress report).
        for (rid, fence, renew) in after {
            let res = if renew {
                self.throttle
                    .renew(&rid, device, fence, self.pacing.load().lease_ms)
                    .await
                    .map(|_| ())
            } else {
                self.throttle.release(&rid, device, fence).await.map(|_| ())
            };
            if let Err(e) = res
                && !matches!(e, ThrottleError::Lost(_))
            {
                warn!(error = %e, rollout = %rid, device, "lease update after an event");
            }
        }
        failures.dedup();
        for rid in failures {
            if let Err(e) = self.check_failures(&rid).await {
                warn!(rollout = %rid, error = %e, "could not evaluate the failure threshold");
            }
        }
        Ok(out)
    }

    async fn device_view(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let c = conn(&self.pool).await?;
        let Some(r) = c
            .query_opt(
                "SELECT id, device_type, tags, version, booted_slot, state, last_seen_ms \
                 FROM devices WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(err)?
        else {
            return Ok(None);
        };
        let members: Vec<serde_json::Value> = c
            .query(
                "SELECT m.member FROM members m JOIN rollouts r ON r.id = m.rollout \
                 WHERE m.device = $1 ORDER BY r.created_at_ms",
                &[&id],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get::<_, Json<serde_json::Value>>(0).0)
            .collect();
        let mut history: Vec<serde_json::Value> = c
            .query(
                "SELECT event FROM events WHERE device = $1 AND kind <> 'progress' \
                 ORDER BY seq DESC LIMIT $2",
                &[&id, &(crate::backend::DEVICE_HISTORY as i64)],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get::<_, Json<serde_json::Value>>(0).0)
            .collect();
        history.reverse();
        Ok(Some(serde_json::json!({
            "id": r.get::<_, String>(0),
            "device_type": r.get::<_, String>(1),
            "tags": r.get::<_, Json<serde_json::Value>>(2).0,
            "version": r.get::<_, Option<String>>(3),
            "booted_slot": r.get::<_, Option<String>>(4),
            "state": r.get::<_, Option<String>>(5),
            "last_seen_ms": r.get::<_, i64>(6),
            "rollouts": members,
            "history": history,
        })))
    }

    async fn device_count(&self) -> Result<u64, StoreError> {
        let c = conn(&self.pool).await?;
        let n: i64 = c
            .query_one("SELECT count(*) FROM devices", &[])
            .await
            .map_err(err)?
            .get(0);
        Ok(n as u64)
    }

    async fn set_tags(&self, id: &str, tags: BTreeMap<String, String>) -> Result<bool, StoreError> {
        self.refresh().await?;
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let Some(before) = tx
            .query_opt(
                "SELECT device_type, tags FROM devices WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(err)?
        else {
            return Ok(false);
        };
        let (t, Json(old_tags)): (String, Json<BTreeMap<String, String>>) =
            (before.get(0), before.get(1));
        let n = tx
            .execute(
                "UPDATE devices SET tags = $2 WHERE id = $1",
                &[&id, &Json(&tags)],
            )
            .await
            .map_err(err)?;
        self.tags_changed(&tx, id, (&t, &old_tags), (&t, &tags))
            .await?;
        tx.commit().await.map_err(err)?;
        // This replica sees the new tags at once; others within AUTH_CACHE_MS.
        self.auth.retain(|_, (d, _)| d.id != id);
        Ok(n == 1)
    }

    async fn rollout_spec(&self, id: &str) -> Result<Option<RolloutSpec>, StoreError> {
        if let Some(r) = self.cached(id) {
            return Ok(Some(r.rec.spec.clone()));
        }
        // Created on another replica since the last refresh.
        self.refresh().await?;
        Ok(self.cached(id).map(|r| r.rec.spec.clone()))
    }

    async fn renew_lease(&self, device: &str, update_id: &str) -> Result<bool, StoreError> {
        let rid = update_id.split('.').next().unwrap_or("");
        let c = conn(&self.pool).await?;
        let Some(row) = c
            .query_opt(
                "SELECT fence FROM members WHERE rollout = $1 AND device = $2 \
                 AND phase = 'downloading' AND member->>'update_id' = $3",
                &[&rid, &device, &update_id],
            )
            .await
            .map_err(err)?
        else {
            return Ok(false);
        };
        let fence: i64 = row.get(0);
        match self
            .throttle
            .renew(rid, device, fence as u64, self.pacing.load().lease_ms)
            .await
        {
            Ok(renewed) => Ok(renewed),
            Err(ThrottleError::Lost(_)) => Ok(false),
            Err(e) => Err(throttle_err(e)),
        }
    }

    async fn audit_append(&self, rec: crate::audit::AuditRecord) -> Result<u64, StoreError> {
        crate::pg_audit::append(&self.pool, rec).await
    }

    async fn audit_list(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<crate::audit::AuditPage, StoreError> {
        crate::pg_audit::list(&self.pool, before, limit).await
    }

    async fn user_create(&self, u: &crate::audit::User) -> Result<bool, StoreError> {
        crate::pg_audit::user_create(&self.pool, u).await
    }

    async fn users(&self) -> Result<Vec<crate::audit::User>, StoreError> {
        crate::pg_audit::users(&self.pool).await
    }

    async fn user_delete(&self, name: &str) -> Result<bool, StoreError> {
        crate::pg_audit::user_delete(&self.pool, name).await
    }

    async fn user_by_token(&self, sha256: &str) -> Result<Option<crate::audit::User>, StoreError> {
        crate::pg_audit::user_by_token(&self.pool, sha256).await
    }

    async fn device_events(
        &self,
        id: &str,
        before: Option<u64>,
        limit: usize,
        progress: bool,
    ) -> Result<Vec<Event>, StoreError> {
        crate::pg_audit::device_events(&self.pool, id, before, limit, progress).await
    }

    async fn installed_update(
        &self,
        device: &str,
        release: &str,
    ) -> Result<Option<String>, StoreError> {
        let c = conn(&self.pool).await?;
        let row = c
            .query_opt(
                "SELECT m.member->>'update_id' FROM members m JOIN rollouts r ON r.id = m.rollout \
                 WHERE m.device = $1 AND m.phase = 'committed' \
                 AND r.record->'spec'->>'release' = $2 \
                 ORDER BY r.created_at_ms DESC LIMIT 1",
                &[&device, &release],
            )
            .await
            .map_err(err)?;
        Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
    }

    async fn retire_device(&self, id: &str) -> Result<bool, StoreError> {
        let c = conn(&self.pool).await?;
        let n = c
            .execute("DELETE FROM devices WHERE id = $1", &[&id])
            .await
            .map_err(err)?;
        // This replica forgets the token at once; others within AUTH_CACHE_MS.
        self.auth.retain(|_, (d, _)| d.id != id);
        Ok(n == 1)
    }

    async fn device_list(&self, f: &DeviceFilter) -> Result<DevicePage, RolloutError> {
        let c = conn(&self.pool).await?;
        if let Some(r) = &f.rollout {
            let found = c
                .query_opt("SELECT 1 FROM rollouts WHERE id = $1", &[r])
                .await
                .map_err(err)?;
            if found.is_none() {
                return Err(RolloutError::NotFound(r.clone()));
            }
        }
        // The WHERE clause is built from fixed fragments; every value is a
        // bound parameter. Paging walks the primary key (`id > $after ORDER
        // BY id LIMIT n`), so any page is an index range scan.
        type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;
        let mut conds: Vec<String> = Vec::new();
        let mut params: Vec<Param> = Vec::new();
        let mut push = |conds: &mut Vec<String>, cond: &str, v: Param| {
            params.push(v);
            conds.push(cond.replace('?', &format!("${}", params.len())));
        };
        if let Some(t) = &f.device_type {
            push(&mut conds, "device_type = ?", Box::new(t.clone()));
        }
        if let Some(v) = &f.version {
            push(&mut conds, "version = ?", Box::new(v.clone()));
        }
        if !f.tags.is_empty() {
            push(
                &mut conds,
                "tags @> ?",
                Box::new(Json(serde_json::to_value(&f.tags).unwrap_or_default())),
            );
        }
        if let Some(r) = &f.rollout {
            push(
                &mut conds,
                "EXISTS (SELECT 1 FROM members m WHERE m.rollout = ? AND m.device = devices.id)",
                Box::new(r.clone()),
            );
        }
        match f.state {
            // Every condition binds exactly one parameter, so the first
            // `filtered` parameters are the count query's.
            Some(StateFilter::Never) => push(&mut conds, "last_seen_ms = ?", Box::new(0i64)),
            Some(StateFilter::Is(s)) => {
                push(
                    &mut conds,
                    "last_seen_ms > 0 AND state = ?",
                    Box::new(text(&s)),
                );
            }
            None => {}
        }
        if let Some(t) = f.seen_since_ms {
            push(&mut conds, "last_seen_ms >= ?", Box::new(t as i64));
        }
        if let Some(t) = f.silent_since_ms {
            push(&mut conds, "last_seen_ms < ?", Box::new(t as i64));
        }
        if let Some(ids) = &f.ids {
            push(
                &mut conds,
                "id = ANY(?)",
                Box::new(ids.iter().cloned().collect::<Vec<String>>()),
            );
        }
        let filtered = conds.len();
        if let Some(a) = &f.after {
            push(&mut conds, "id > ?", Box::new(a.clone()));
        }
        let where_of = |n: usize| {
            if n == 0 {
                String::new()
            } else {
                format!("WHERE {}", conds[..n].join(" AND "))
            }
        };
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = c
            .query(
                &format!(
                    "SELECT id, device_type, tags, version, booted_slot, state, last_seen_ms                      FROM devices {} ORDER BY id LIMIT {}",
                    where_of(conds.len()),
                    f.limit + 1
                ),
                &refs,
            )
            .await
            .map_err(err)?;
        let total: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM devices {}", where_of(filtered)),
                &refs[..filtered],
            )
            .await
            .map_err(err)?
            .get(0);
        let mut devices: Vec<DeviceSummary> = rows
            .iter()
            .map(|r| {
                let last_seen_ms = r.get::<_, i64>(6) as u64;
                DeviceSummary {
                    id: r.get(0),
                    device_type: r.get(1),
                    tags: serde_json::from_value(r.get::<_, Json<serde_json::Value>>(2).0)
                        .unwrap_or_default(),
                    version: r.get(3),
                    booted_slot: parse_text(r.get(4)),
                    state: parse_text(r.get(5)).filter(|_| last_seen_ms > 0),
                    last_seen_ms,
                }
            })
            .collect();
        let next = if devices.len() > f.limit {
            devices.truncate(f.limit);
            devices.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(DevicePage {
            devices,
            total: total as u64,
            next,
        })
    }

    /// # Cancel safety
    /// One statement: the group exists afterwards or not.
    async fn create_group(&self, g: &crate::groups::Group) -> Result<bool, StoreError> {
        let c = conn(&self.pool).await?;
        let n = c
            .execute(
                "INSERT INTO groups (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&g.name, &Json(g)],
            )
            .await
            .map_err(err)?;
        Ok(n == 1)
    }

    async fn groups(&self) -> Result<Vec<crate::groups::Group>, StoreError> {
        let c = conn(&self.pool).await?;
        let rows = c
            .query("SELECT record FROM groups ORDER BY name", &[])
            .await
            .map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, Json<crate::groups::Group>>(0).0)
            .collect())
    }

    async fn group(&self, name: &str) -> Result<Option<crate::groups::Group>, StoreError> {
        let c = conn(&self.pool).await?;
        Ok(
            c.query_opt("SELECT record FROM groups WHERE name = $1", &[&name])
                .await
                .map_err(err)?
                .map(|r| r.get::<_, Json<crate::groups::Group>>(0).0),
        )
    }

    /// # Cancel safety
    /// One statement: the group is gone afterwards or not.
    async fn delete_group(&self, name: &str) -> Result<bool, StoreError> {
        let c = conn(&self.pool).await?;
        let n = c
            .execute("DELETE FROM groups WHERE name = $1", &[&name])
            .await
            .map_err(err)?;
        Ok(n == 1)
    }

    async fn create_rollout(&self, spec: RolloutSpec) -> Result<RolloutStatus, RolloutError> {
        spec.validate().map_err(RolloutError::Invalid)?;
        self.releases.refresh().await?;
        if !self.releases.exists(&spec.device_type, &spec.release) {
            return Err(RolloutError::Invalid(format!(
                "no release {} for device type {}; add it with `ota-server release add`",
                spec.release, spec.device_type
            )));
        }
        let now = crate::now_ms();
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let n: i64 = tx
            .query_one("SELECT nextval('rollout_ids')", &[])
            .await
            .map_err(err)?
            .get(0);
        let id = format!("r{n}");
        // The devices to update, ranked into waves (the same rule as the
        // single-process backend: rollout::wave_bounds). Read in this
        // transaction, so the bounds and the counters below agree.
        let rows = tx
            .query(
                "SELECT id, tags, version FROM devices WHERE device_type = $1",
                &[&spec.device_type],
            )
            .await
            .map_err(err)?;
        let mut matching = Vec::new();
        for r in rows {
            let dev: String = r.get(0);
            let tags = r.get::<_, Json<BTreeMap<String, String>>>(1).0;
            if spec_matches(&spec, &spec.device_type, &tags) {
                let current =
                    r.get::<_, Option<String>>(2).as_deref() == Some(spec.release.as_str());
                matching.push((dev, current));
            }
        }
        let wave_bounds = wave_bounds(
            &spec,
            matching
                .iter()
                .filter(|(_, current)| !current)
                .map(|(dev, _)| rank_key(dev, &id))
                .collect(),
        );
        let rec = RolloutRecord::new(id, spec, now, wave_bounds);
        let ins = tx
            .execute(
                "INSERT INTO rollouts (id, device_type, state, created_at_ms, record) \
                 VALUES ($1, $2, 'active', $3, $4)",
                &[&rec.id, &rec.spec.device_type, &(now as i64), &Json(&rec)],
            )
            .await;
        if let Err(e) = ins {
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                let other: Option<String> = c_other(&self.pool, &rec.spec.device_type).await;
                return Err(RolloutError::Conflict(format!(
                    "rollout {} for device type {} is still active or paused; abort it first",
                    other.unwrap_or_else(|| "?".into()),
                    rec.spec.device_type
                )));
            }
            return Err(err(e).into());
        }
        // Eligible and already-current devices per wave.
        let waves = rec.spec.waves.len();
        let mut eligible = vec![0i64; waves];
        let mut current = vec![0i64; waves];
        for (dev, is_current) in &matching {
            let w = rec.wave_of(dev);
            eligible[w] += 1;
            if *is_current {
                current[w] += 1;
            }
        }
        for w in 0..waves {
            tx.execute(
                "INSERT INTO wave_counters (rollout, wave, shard, eligible, current) \
                 VALUES ($1, $2, 0, $3, $4)",
                &[&rec.id, &(w as i32), &eligible[w], &current[w]],
            )
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)?;
        // A fresh throttle state: one burst, as the in-process throttle
        // starts a rollout.
        self.throttle
            .rebuild(&rec.id, &[], self.pacing.load().lease_ms, 0, Bucket::Full)
            .await
            .map_err(|e| RolloutError::Store(throttle_err(e)))?;
        info!(rollout = %rec.id, release = %rec.spec.release, device_type = %rec.spec.device_type, "rollout created");
        self.refresh().await?;
        Ok(self.status_of(&rec).await?)
    }

    async fn set_rollout_state(
        &self,
        id: &str,
        to: RolloutState,
        reason: String,
    ) -> Result<RolloutStatus, RolloutError> {
        let mut c = conn(&self.pool).await?;
        let tx = c.transaction().await.map_err(err)?;
        let row = tx
            .query_opt(
                "SELECT record FROM rollouts WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(err)?
            .ok_or_else(|| RolloutError::NotFound(id.into()))?;
        let mut rec: RolloutRecord = row.get::<_, Json<RolloutRecord>>(0).0;
        match (rec.state, to) {
            (RolloutState::Aborted, _) => {
                return Err(RolloutError::Conflict(format!(
                    "rollout {id} is {:?}; it cannot change any more",
                    rec.state
                )));
            }
            // A completed rollout still takes newcomers ([`membership`]).
            (RolloutState::Active | RolloutState::Completed, RolloutState::Active) => {
                drop(tx);
                return Ok(self.status_of(&rec).await?);
            }
            _ => {}
        }
        if to == RolloutState::Active {
            let cs = counts(&tx, id, rec.spec.waves.len()).await?;
            let (ok, bad) = outcomes(&cs, rec.wave);
            rec.baseline = (bad, ok);
        }
        rec.state = to;
        rec.reason = reason;
        write_rollout(&tx, &rec).await?;
        tx.commit().await.map_err(err)?;
        info!(rollout = %id, state = ?to, "rollout state changed by operator");
        self.refresh().await?;
        Ok(self.status_of(&rec).await?)
    }

    async fn install_now(&self, id: &str, devices: &[String]) -> Result<Vec<String>, RolloutError> {
        self.refresh().await?;
        let rec = self
            .cached(id)
            .map(|r| r.rec)
            .ok_or_else(|| RolloutError::NotFound(id.into()))?;
        crate::pg_windows::install_now(&self.pool, &rec, devices).await
    }

    fn window_clock(&self) -> &crate::rollout::window::WindowClock {
        &self.window_clock
    }

    async fn rollout_statuses(&self) -> Result<Vec<RolloutStatus>, RolloutError> {
        self.refresh().await?;
        let all: Vec<Cached> = self.rollouts.read().unwrap().clone();
        let mut out = Vec::with_capacity(all.len());
        for r in all {
            out.push(self.status_of(&r.rec).await?);
        }
        Ok(out)
    }

    async fn rollout_status(&self, id: &str) -> Result<RolloutStatus, RolloutError> {
        self.refresh().await?;
        let r = self
            .cached(id)
            .ok_or_else(|| RolloutError::NotFound(id.into()))?;
        Ok(self.status_of(&r.rec).await?)
    }

    async fn tick(&self) -> Result<u64, StoreError> {
        let now = crate::now_ms();
        self.auth.retain(|_, e| e.1 > now);
        self.refresh().await?;
        self.flush_bytes().await?;
        let all: Vec<Cached> = self.rollouts.read().unwrap().clone();
        let mut expired_total = 0;
        for r in all {
            if r.rec.state == RolloutState::Completed {
                continue;
            }
            expired_total += self.reap_and_settle(&r.rec).await?;
            if r.rec.state == RolloutState::Active {
                self.advance(&r.rec.id).await?;
            }
        }
        Ok(expired_total)
    }

    fn count_bytes(&self, device: &str, bytes: u64) {
        if let Some(mut n) = self.bytes.get_mut(device) {
            *n += bytes;
            return;
        }
        // The shard guard above is gone: `len` locks every shard in turn.
        if self.bytes.len() < 1_000_000 {
            *self.bytes.entry(device.to_string()).or_default() += bytes;
        }
    }

    async fn stats(&self) -> Result<serde_json::Value, StoreError> {
        let c = conn(&self.pool).await?;
        let devices: i64 = c
            .query_one("SELECT count(*) FROM devices", &[])
            .await
            .map_err(err)?
            .get(0);
        let events: i64 = c
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .map_err(err)?
            .get(0);
        Ok(serde_json::json!({
            "backend": "postgres",
            "devices": devices,
            "events_stored": events,
            "events_accepted_since_start": self.events_accepted.load(Ordering::Relaxed),
            "events_duplicate_since_start": self.events_duplicate.load(Ordering::Relaxed),
        }))
    }

    async fn total_leases(&self) -> u64 {
        let all: Vec<Cached> = self.rollouts.read().unwrap().clone();
        let mut n = 0;
        for r in all {
            if r.rec.state == RolloutState::Completed {
                continue;
            }
            if let Ok(s) = self.throttle.stats(&r.rec.id).await {
                n += s.active;
            }
        }
        n
    }
}

/// The live rollout of a device type (for the conflict message).
async fn c_other(pool: &Pool, device_type: &str) -> Option<String> {
    let c = conn(pool).await.ok()?;
    c.query_opt(
        "SELECT id FROM rollouts WHERE device_type = $1 AND state IN ('active', 'paused')",
        &[&device_type],
    )
    .await
    .ok()?
    .map(|r| r.get(0))
}
