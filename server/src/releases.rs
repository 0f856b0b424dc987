//! Releases and the delta pipeline.
//!
//! `release add` streams an image into `images/` (content-addressed; see
//! [`crate::ingest`]). The server then builds, in the background and one at
//! a time, the full payload and a delta from each of the previous
//! `delta_history` releases of the same device type, signs each manifest
//! with the server key and stores payload and envelope as content-addressed
//! artifacts.
//!
//! Each build uses every core, on threads at a low priority
//! ([`crate::builder::run_low_priority`], nice `build_nice`): request threads preempt them
//! whenever they need a core, so builds take only the CPU time check-ins
//! leave idle. A running build's phase and bytes processed are kept in
//! memory ([`BuildProgress`]) and shown by `release list`; a shutdown stops
//! it through the generator's cancel flag.
//!
//! Builds are recorded in sled as `pending` → `building` → `ready` (or
//! `failed`, with the reason). A build interrupted by a crash is found in
//! state `pending` or `building` at start-up and simply runs again: its
//! half-written output lives only in `tmp/`, which start-up empties, and an
//! artifact becomes visible only by an atomic rename once complete.

pub mod bundle;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ota_delta::generate::{
    DeltaSpec, GenerateError, GenerateOptions, Progress, generate_with_progress,
};

use crate::builder::{LiveBuild, run_low_priority};
use crate::config::CodecUse;
use ota_format::manifest::Codecs;
use ota_format::{Digest, Envelope, Manifest};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span};

use crate::artifacts::ArtifactStore;
use crate::store::{Store, StoreError, encode, key2, load_all};

/// The two files devices fetch for one update.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Artifacts {
    /// `None` for the full image.
    pub from_version: Option<String>,
    pub manifest_sha256: Digest,
    pub manifest_size: u64,
    pub payload_sha256: Digest,
    pub payload_size: u64,
    /// Codecs the payload needs beyond zstd and bzip2 (its manifest's
    /// `codecs`): only devices that advertise all of them are offered it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codecs: Vec<String>,
}

impl Artifacts {
    /// Bytes a device fetches for this update: manifest and payload.
    pub fn fetch_bytes(&self) -> u64 {
        self.manifest_size + self.payload_size
    }
}

/// Where a build is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    Pending,
    Building,
    Ready,
    Failed,
}

/// One payload of a release: the full image, or a delta from one version.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Build {
    pub from_version: Option<String>,
    pub status: BuildStatus,
    #[serde(default)]
    pub artifacts: Option<Artifacts>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub seconds: Option<f64>,
    /// Where a build in state `building` is, from the builder itself. Live
    /// only: never stored, and with PostgreSQL shown only by the replica
    /// running the build (others show the state alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<BuildProgress>,
}

/// What a running build is doing, as `release list` and `--wait` show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BuildProgress {
    /// `indexing source`, `matching blocks`, `diffing` (deltas),
    /// `compressing` (full images), then `signing` and `storing`.
    pub phase: String,
    /// Image bytes processed: the source once, the target twice (see
    /// [`ota_delta::generate::Progress`]).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Since this replica started the build.
    pub elapsed_secs: f64,
}

/// A release as stored.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReleaseRecord {
    pub device_type: String,
    pub version: String,
    pub image_sha256: Digest,
    pub image_size: u64,
    pub created_at_ms: u64,
    /// Order of creation within the device type.
    pub seq: u64,
    pub security_counter: u64,
    pub builds: Vec<Build>,
    /// Set for an opaque release ([`bundle`]): the client's own bundle,
    /// served to DDI targets as is; no deltas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<bundle::Bundle>,
}

/// Errors of release handling, mapped to 4xx/5xx by the API.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "release {version} of {device_type} already exists (with a different image); releases are immutable, add a new version"
    )]
    Exists {
        device_type: String,
        version: String,
    },
    /// The version would not move devices forward (see [`check_order`]).
    #[error("{0}")]
    Order(String),
    #[error("no release {version} of {device_type}; `ota-server release list` shows them")]
    NotFound {
        device_type: String,
        version: String,
    },
    /// The release is in use; the message says by what and what to do.
    #[error("{0}")]
    InUse(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("storing the image: {0}")]
    Artifact(#[from] crate::artifacts::StoreError),
}

/// Build settings taken from the config.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub delta_history: usize,
    pub chunk_size: u64,
    /// zstd level of deltas.
    pub zstd_level: i32,
    /// zstd level of full images.
    pub full_zstd_level: i32,
    /// Whether deltas may use xz ([`GenerateOptions::xz`]).
    pub delta_xz: CodecUse,
    /// Whether deltas that use xz may also zero-run code their diff streams
    /// ([`GenerateOptions::zero_runs`]).
    pub delta_zero_runs: CodecUse,
    /// Whether deltas that use xz may also arm64-transform new code
    /// ([`GenerateOptions::arm64`]); full images never do.
    pub delta_arm64: CodecUse,
    /// Whether deltas that use xz may also store `BSDIFF` data in
    /// compression frames ([`GenerateOptions::frames`]); full images never
    /// do.
    pub delta_frames: CodecUse,
    pub expiry_days: u64,
    /// Generator threads; 0 = one per core.
    pub threads: usize,
    /// Nice value of the build thread and of the generator's workers.
    pub nice: i32,
}

type Job = (String, String, Option<String>);

/// The release rule of `release add`: `version` must parse (semantic
/// versioning, [`ota_format::Version`]) and be greater than every release of
/// its device type, and `security_counter` must not be below any of theirs —
/// devices refuse both otherwise (a lower version as a downgrade, a lower
/// counter as a rollback), and a release every device refuses helps no one.
/// A lower or equal version is a deliberate rollback only with
/// `allow_downgrade` and a counter above every earlier one: devices accept it
/// because of that counter, which also locks out the release it replaces.
/// Earlier releases whose version does not parse (added before versions
/// were checked) take no part in the version comparison.
pub fn check_order<'a>(
    earlier: impl IntoIterator<Item = &'a ReleaseRecord>,
    version: &str,
    security_counter: u64,
    allow_downgrade: bool,
) -> Result<(), ReleaseError> {
    let new =
        ota_format::Version::parse(version).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
    let mut newest: Option<(ota_format::Version, &ReleaseRecord)> = None;
    let mut top_counter: Option<&ReleaseRecord> = None;
    for r in earlier {
        if top_counter.is_none_or(|t| r.security_counter > t.security_counter) {
            top_counter = Some(r);
        }
        if let Ok(v) = ota_format::Version::parse(&r.version)
            && newest.as_ref().is_none_or(|(n, _)| v > *n)
        {
            newest = Some((v, r));
        }
    }
    if let Some(t) = top_counter
        && security_counter < t.security_counter
    {
        return Err(ReleaseError::Order(format!(
            "security counter {security_counter} is below the {} of release {} of {}: devices that installed it would refuse this release as a rollback; pass --security-counter {} or higher",
            t.security_counter, t.version, t.device_type, t.security_counter
        )));
    }
    let Some((newest, n)) = newest else {
        return Ok(());
    };
    if new > newest {
        return Ok(());
    }
    let top = top_counter.map_or(0, |t| t.security_counter);
    if !allow_downgrade {
        return Err(ReleaseError::Order(format!(
            "version {version} is not greater than {}, the newest release of {} (semantic versioning: pre-releases come before their release; see docs/format.md); devices would refuse it as a downgrade. Add a higher version, or roll back on purpose with --allow-downgrade and a security counter above {top}",
            n.version, n.device_type
        )));
    }
    if security_counter <= top {
        return Err(ReleaseError::Order(format!(
            "--allow-downgrade to {version} (below {}) needs a security counter above {top}, the highest of the releases of {}: devices accept a lower version only with a higher counter",
            n.version, n.device_type
        )));
    }
    Ok(())
}

/// [`check_order`] for a release about to be uploaded, over every release
/// (`all`): an existing (device type, version) passes, since re-sending the
/// same image is an idempotent retry ([`Releases::add`] decides). The CLI
/// runs it on `GET /api/v1/admin/releases` before streaming an image, the
/// server before reading the upload and again when recording it.
pub fn check_new_release<'a>(
    all: impl IntoIterator<Item = &'a ReleaseRecord>,
    device_type: &str,
    version: &str,
    security_counter: u64,
    allow_downgrade: bool,
) -> Result<(), ReleaseError> {
    let same: Vec<&ReleaseRecord> = all
        .into_iter()
        .filter(|r| r.device_type == device_type)
        .collect();
    if same.iter().any(|r| r.version == version) {
        return Ok(());
    }
    check_order(same, version, security_counter, allow_downgrade)
}

/// Where release records are kept.
///
/// With PostgreSQL several replicas share the catalogue: each keeps a copy
/// in memory ([`Releases::refresh`] every few seconds), writes go to the
/// database first, and a build is run by the replica holding its advisory
/// lock, so it runs once however many replicas see it pending, and is taken
/// over when that replica dies (its session, and so its lock, ends).
pub enum ReleaseDb {
    Sled(Store),
    Postgres(deadpool_postgres::Pool),
}

impl ReleaseDb {
    async fn load_all(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        match self {
            ReleaseDb::Sled(store) => load_all(&store.releases),
            ReleaseDb::Postgres(pool) => {
                let c = crate::pg::conn(pool).await?;
                let rows = c
                    .query("SELECT record FROM releases", &[])
                    .await
                    .map_err(crate::pg::err)?;
                rows.iter()
                    .map(|r| {
                        let v: tokio_postgres::types::Json<ReleaseRecord> = r.get(0);
                        Ok(v.0)
                    })
                    .collect()
            }
        }
    }

    /// Deletes a record, durably.
    async fn remove(&self, device_type: &str, version: &str) -> Result<(), StoreError> {
        match self {
            ReleaseDb::Sled(store) => {
                store.releases.remove(key2(device_type, version))?;
                store.durable().await
            }
            ReleaseDb::Postgres(pool) => {
                crate::pg::conn(pool)
                    .await?
                    .execute(
                        "DELETE FROM releases WHERE device_type = $1 AND version = $2",
                        &[&device_type, &version],
                    )
                    .await
                    .map_err(crate::pg::err)?;
                Ok(())
            }
        }
    }

    /// Inserts `rec` unless a record exists; returns the existing one.
    async fn insert_new(&self, rec: &ReleaseRecord) -> Result<Option<ReleaseRecord>, StoreError> {
        match self {
            ReleaseDb::Sled(store) => {
                store
                    .releases
                    .insert(key2(&rec.device_type, &rec.version), encode(rec))?;
                store.durable().await?;
                Ok(None)
            }
            ReleaseDb::Postgres(pool) => {
                let c = crate::pg::conn(pool).await?;
                let n = c
                    .execute(
                        "INSERT INTO releases (device_type, version, record) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                        &[
                            &rec.device_type,
                            &rec.version,
                            &tokio_postgres::types::Json(rec),
                        ],
                    )
                    .await
                    .map_err(crate::pg::err)?;
                if n == 1 {
                    return Ok(None);
                }
                let row = c
                    .query_one(
                        "SELECT record FROM releases WHERE device_type = $1 AND version = $2",
                        &[&rec.device_type, &rec.version],
                    )
                    .await
                    .map_err(crate::pg::err)?;
                let v: tokio_postgres::types::Json<ReleaseRecord> = row.get(0);
                Ok(Some(v.0))
            }
        }
    }
}

/// The release catalogue and the build queue.
pub struct Releases {
    db: ReleaseDb,
    /// Jobs in the channel, so periodic re-queuing never duplicates one.
    queued: Mutex<HashSet<Job>>,
    images: ArtifactStore,
    artifacts: ArtifactStore,
    tmp: PathBuf,
    /// (device type, version) → record. Read by admissions, written by
    /// `add` and the builder.
    map: RwLock<HashMap<(String, String), ReleaseRecord>>,
    jobs: mpsc::Sender<Job>,
    /// Builds running on this replica, for their progress.
    live: Mutex<HashMap<Job, Arc<LiveBuild>>>,
    settings: BuildSettings,
    signers: crate::signing::SignerSlot,
    /// Bumped at every change of `map`, so readers can cache what they
    /// derive from it (the freshness statements).
    generation: std::sync::atomic::AtomicU64,
    /// What agents on each release listed ([`Releases::observe_agent`]).
    seen_codecs: RwLock<SeenCodecs>,
}

/// device type → version → the codecs every agent seen on that release
/// since start listed ([`Codecs::bits`]), or [`UNSEEN`]: what a
/// [`CodecUse::Auto`] delta from that version may use.
///
/// The entries are exactly the catalogue's releases, made anew from it
/// whenever its generation moved: so a check-in, on a release or not, never
/// allocates or reads the catalogue, and devices reporting made-up versions
/// cannot grow it.
struct SeenCodecs {
    /// The catalogue generation the entries were made from.
    generation: u64,
    by_type: HashMap<String, HashMap<String, AtomicU16>>,
}

/// A release no agent was seen on yet (above every [`Codecs::bits`]).
const UNSEEN: u16 = 0x100;

impl Releases {
    /// Loads the catalogue; returns it and the build queue's receiver.
    /// Interrupted builds are re-queued by [`Releases::requeue_unfinished`].
    pub async fn load(
        db: ReleaseDb,
        images: ArtifactStore,
        artifacts: ArtifactStore,
        tmp: PathBuf,
        settings: BuildSettings,
        signers: crate::signing::SignerSlot,
    ) -> Result<(Releases, mpsc::Receiver<Job>), StoreError> {
        let mut map = HashMap::new();
        for r in db.load_all().await? {
            map.insert((r.device_type.clone(), r.version.clone()), r);
        }
        // Builds wait in sled, not in the channel, so a full channel only
        // delays them; the bound keeps memory flat.
        let (tx, rx) = mpsc::channel(1024);
        Ok((
            Releases {
                db,
                queued: Mutex::new(HashSet::new()),
                images,
                artifacts,
                tmp,
                map: RwLock::new(map),
                jobs: tx,
                live: Mutex::new(HashMap::new()),
                settings,
                signers,
                generation: Default::default(),
                // No generation yet: the first check-in makes the entries.
                seen_codecs: RwLock::new(SeenCodecs {
                    generation: u64::MAX,
                    by_type: HashMap::new(),
                }),
            },
            rx,
        ))
    }

    /// Queues every build not yet ready (after a restart; with PostgreSQL
    /// also periodically, to take over builds of a replica that died).
    pub fn requeue_unfinished(&self) {
        let map = self.map.read().unwrap();
        for r in map.values() {
            for b in &r.builds {
                if matches!(b.status, BuildStatus::Pending | BuildStatus::Building) {
                    self.queue((
                        r.device_type.clone(),
                        r.version.clone(),
                        b.from_version.clone(),
                    ));
                }
            }
        }
    }

    fn queue(&self, job: Job) {
        let mut q = self.queued.lock().unwrap();
        if q.contains(&job) {
            return;
        }
        if self.jobs.try_send(job.clone()).is_ok() {
            q.insert(job);
        }
    }

    /// Reloads the catalogue from the database (PostgreSQL: other replicas
    /// add releases and finish builds) and queues unfinished builds.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        if let ReleaseDb::Sled(_) = self.db {
            return Ok(());
        }
        let all = self.db.load_all().await?;
        {
            // Replaced whole: releases deleted by another replica go too.
            let mut map = self.map_mut();
            *map = all
                .into_iter()
                .map(|r| ((r.device_type.clone(), r.version.clone()), r))
                .collect();
        }
        self.requeue_unfinished();
        Ok(())
    }

    /// Deletes a release whose builds have finished: its record, then its
    /// image and artifacts unless another release shares them (they are
    /// content-addressed). The caller has checked that no live rollout uses
    /// it and no device runs it (see `DELETE /api/v1/admin/releases/...`).
    ///
    /// # Cancel safety
    /// The record goes first, in one durable write; files are removed after.
    /// Cancelled in between, files stay behind unreferenced (harmless).
    pub async fn delete(
        &self,
        device_type: &str,
        version: &str,
    ) -> Result<ReleaseRecord, ReleaseError> {
        let key = (device_type.to_string(), version.to_string());
        let rec =
            self.map
                .read()
                .unwrap()
                .get(&key)
                .cloned()
                .ok_or_else(|| ReleaseError::NotFound {
                    device_type: device_type.into(),
                    version: version.into(),
                })?;
        if rec
            .builds
            .iter()
            .any(|b| matches!(b.status, BuildStatus::Pending | BuildStatus::Building))
        {
            return Err(ReleaseError::InUse(format!(
                "release {version} of {device_type} is still building; wait for its builds (`ota-server release list`), then delete it"
            )));
        }
        self.db.remove(device_type, version).await?;
        {
            // The freshness statement names the latest release: a deleted
            // one must not stay in its cache.
            let mut map = self.map_mut();
            map.remove(&key);
        }
        let digests = |r: &ReleaseRecord| {
            let mut v = vec![r.image_sha256];
            for a in r.builds.iter().filter_map(|b| b.artifacts.as_ref()) {
                v.push(a.manifest_sha256);
                v.push(a.payload_sha256);
            }
            v
        };
        let kept: HashSet<Digest> = self
            .map
            .read()
            .unwrap()
            .values()
            .flat_map(digests)
            .collect();
        let mut files = vec![self.images.path_of(&rec.image_sha256)];
        files.extend(
            digests(&rec)
                .into_iter()
                .skip(1)
                .map(|d| self.artifacts.path_of(&d)),
        );
        for (d, path) in digests(&rec).into_iter().zip(files) {
            if kept.contains(&d) {
                continue;
            }
            if let Err(e) = tokio::fs::remove_file(&path).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a deleted release's file");
            }
        }
        info!(device_type, version, "release deleted");
        Ok(rec)
    }

    pub fn exists(&self, device_type: &str, version: &str) -> bool {
        self.map
            .read()
            .unwrap()
            .contains_key(&(device_type.to_string(), version.to_string()))
    }

    /// The catalogue for writing; bumps its generation, so every change is
    /// seen by what is derived from it (freshness statements, the codec
    /// observations). Every write goes through here: `add` and the
    /// PostgreSQL paths once wrote without a bump, and a new release stayed
    /// out of the freshness statement until a build's status changed.
    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<(String, String), ReleaseRecord>> {
        let map = self.map.write().unwrap();
        self.generation.fetch_add(1, Ordering::Release);
        map
    }

    /// Changes whenever the catalogue does.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The newest release of `device_type` (highest `seq`) and the highest
    /// security counter of any of its releases.
    pub fn latest(&self, device_type: &str) -> (Option<String>, u64) {
        let map = self.map.read().unwrap();
        let mine = map.values().filter(|r| r.device_type == device_type);
        let newest = mine
            .clone()
            .max_by_key(|r| r.seq)
            .map(|r| r.version.clone());
        (newest, mine.map(|r| r.security_counter).max().unwrap_or(0))
    }

    /// Every release, newest last per device type, with the progress of the
    /// builds this replica is running.
    pub fn list(&self) -> Vec<ReleaseRecord> {
        let mut v: Vec<_> = self.map.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| (&a.device_type, a.seq).cmp(&(&b.device_type, b.seq)));
        let live = self.live.lock().unwrap();
        if !live.is_empty() {
            for r in &mut v {
                for b in &mut r.builds {
                    let job = (
                        r.device_type.clone(),
                        r.version.clone(),
                        b.from_version.clone(),
                    );
                    if b.status == BuildStatus::Building
                        && let Some(l) = live.get(&job)
                    {
                        b.progress = Some(l.view());
                    }
                }
            }
        }
        v
    }

    /// Notes that an agent on `version` of `device_type` listed `codecs` in
    /// a check-in: a [`CodecUse::Auto`] delta from that version uses only
    /// codecs every such agent listed. DDI targets (bundle codecs) are no
    /// agents and are not counted. This runs on every check-in: a read lock
    /// and an atomic load once the version's entry is settled, the same
    /// without the atomic for a version that is no release; a write only
    /// when the set shrinks, and a resync only after the catalogue changed.
    pub fn observe_agent(&self, device_type: &str, version: &str, codecs: Codecs) {
        if codecs.names().any(bundle::is_bundle_codec) {
            return;
        }
        let bits = u16::from(codecs.bits());
        let note = |b: &AtomicU16| {
            // The first agent's set, then the intersection; no store when
            // nothing changes (the cache line stays shared).
            let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                let new = if cur & UNSEEN != 0 { bits } else { cur & bits };
                (new != cur).then_some(new)
            });
        };
        {
            let seen = self.seen_codecs.read().unwrap();
            if let Some(b) = seen.by_type.get(device_type).and_then(|m| m.get(version)) {
                return note(b);
            }
            if seen.generation == self.generation() {
                return; // not a release
            }
        }
        self.sync_seen_codecs();
        let seen = self.seen_codecs.read().unwrap();
        if let Some(b) = seen.by_type.get(device_type).and_then(|m| m.get(version)) {
            note(b);
        }
    }

    /// Makes the codec observations' entries those of the catalogue's
    /// releases again: new releases start [`UNSEEN`], deleted ones go,
    /// the others keep what was seen.
    fn sync_seen_codecs(&self) {
        // The catalogue first (the lock order), read with its generation:
        // its writers bump it while they hold the write lock.
        let map = self.map.read().unwrap();
        let generation = self.generation();
        let mut seen = self.seen_codecs.write().unwrap();
        if seen.generation == generation {
            return; // another check-in did it meanwhile
        }
        let mut old = std::mem::take(&mut seen.by_type);
        for (t, v) in map.keys() {
            let b = old
                .get_mut(t)
                .and_then(|m| m.remove(v))
                .unwrap_or_else(|| AtomicU16::new(UNSEEN));
            seen.by_type
                .entry(t.clone())
                .or_default()
                .insert(v.clone(), b);
        }
        seen.generation = generation;
    }

    /// The codecs every agent seen on `version` of `device_type` since
    /// start listed ([`Releases::observe_agent`]); `None` when none was
    /// seen. Syncs the entries first: check-ins that find their entry do
    /// not, so a deleted release's could otherwise linger.
    pub fn seen_codecs(&self, device_type: &str, version: &str) -> Option<Codecs> {
        if self.seen_codecs.read().unwrap().generation != self.generation() {
            self.sync_seen_codecs();
        }
        let seen = self.seen_codecs.read().unwrap();
        let b = seen
            .by_type
            .get(device_type)?
            .get(version)?
            .load(Ordering::Relaxed);
        (b & UNSEEN == 0).then(|| Codecs::from_bits(b as u8))
    }

    /// The artifacts a device on `from` that decodes `codecs` (its
    /// check-in's `delta_codecs`) gets for `version`: of the delta from its
    /// version and the full image, those built and needing no codec the
    /// device lacks, the one with fewer bytes to fetch (manifest + payload;
    /// the delta on a tie); `None` while neither is ready.
    ///
    /// An agent older than the xz codec advertises none and so gets the full
    /// image while the delta needs xz; a delta larger than the image (an
    /// image rebuilt from scratch) loses to the image.
    pub fn pick(
        &self,
        device_type: &str,
        version: &str,
        from: &str,
        codecs: Codecs,
    ) -> Option<Artifacts> {
        let map = self.map.read().unwrap();
        let r = map.get(&(device_type.to_string(), version.to_string()))?;
        // A DDI target (it advertises bundle codecs) gets the release's
        // bundle and nothing else; an agent never gets a bundle (see
        // [`bundle`]): one release can carry both, for a mixed fleet.
        if codecs.names().any(bundle::is_bundle_codec) {
            return r
                .builds
                .iter()
                .filter(|b| b.status == BuildStatus::Ready)
                .filter_map(|b| b.artifacts.as_ref())
                .find(|a| bundle::is_bundle_build(a) && a.codecs.iter().all(|c| codecs.contains(c)))
                .cloned();
        }
        let ready = |f: Option<&str>| {
            r.builds
                .iter()
                .filter(|b| {
                    b.artifacts
                        .as_ref()
                        .is_none_or(|a| !bundle::is_bundle_build(a))
                })
                .find(|b| b.status == BuildStatus::Ready && b.from_version.as_deref() == f)
                .and_then(|b| b.artifacts.as_ref())
        };
        let picked = choose(ready(Some(from)), ready(None), codecs);
        tracing::debug!(
            from,
            delta = picked.is_some_and(|a| a.from_version.is_some()),
            bytes = picked.map(Artifacts::fetch_bytes),
            "picked artifacts"
        );
        picked.cloned()
    }

    /// Checks `version` against the releases of `device_type` before an
    /// upload ([`check_new_release`]).
    pub async fn precheck(
        &self,
        device_type: &str,
        version: &str,
        security_counter: u64,
        allow_downgrade: bool,
    ) -> Result<(), ReleaseError> {
        self.refresh().await?;
        let map = self.map.read().unwrap();
        check_new_release(
            map.values(),
            device_type,
            version,
            security_counter,
            allow_downgrade,
        )
    }

    /// Registers a release whose image was streamed to `image_tmp` (hashed
    /// as it arrived: `image_sha256`, see [`crate::ingest::Ingest`]) and
    /// queues its builds; refuses a version that would not move devices
    /// forward ([`check_order`]). The image is moved into `images/`, not
    /// copied.
    ///
    /// # Cancel safety
    /// Not cancel safe between the image move and the record write: a
    /// cancelled call may leave an unreferenced image in `images/` (harmless;
    /// a retry reuses it).
    pub async fn add(
        &self,
        device_type: &str,
        version: &str,
        security_counter: u64,
        allow_downgrade: bool,
        image_tmp: &Path,
        image_sha256: &Digest,
    ) -> Result<ReleaseRecord, ReleaseError> {
        ota_format::api::check_name("device type", device_type).map_err(ReleaseError::Invalid)?;
        ota_format::api::check_name("version", version).map_err(ReleaseError::Invalid)?;
        ota_format::Version::parse(version).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
        let size = std::fs::metadata(image_tmp)
            .map_err(|e| ReleaseError::Invalid(format!("reading the upload: {e}")))?
            .len();
        if size == 0 || size % 4096 != 0 {
            return Err(ReleaseError::Invalid(format!(
                "the image is {size} bytes; images must be a non-empty multiple of 4096 bytes (a block device or filesystem image)"
            )));
        }
        let (sha, size) = self.images.adopt_file(image_tmp, image_sha256).await?;
        // Other replicas may have added releases of this type.
        self.refresh().await?;
        let rec = {
            let map = self.map.read().unwrap();
            let k = (device_type.to_string(), version.to_string());
            if let Some(old) = map.get(&k) {
                if old.image_sha256 == sha {
                    return Ok(old.clone());
                }
                return Err(ReleaseError::Exists {
                    device_type: device_type.into(),
                    version: version.into(),
                });
            }
            let mut earlier: Vec<&ReleaseRecord> = map
                .values()
                .filter(|r| r.device_type == device_type)
                .collect();
            check_order(
                earlier.iter().copied(),
                version,
                security_counter,
                allow_downgrade,
            )?;
            earlier.sort_by_key(|r| std::cmp::Reverse(r.seq));
            let seq = earlier.first().map_or(1, |r| r.seq + 1);
            let mut builds = vec![Build {
                from_version: None,
                status: BuildStatus::Pending,
                artifacts: None,
                error: None,
                seconds: None,
                progress: None,
            }];
            // No delta from an opaque release: its bundle is no block image.
            for e in earlier
                .iter()
                .filter(|e| e.bundle.is_none())
                .take(self.settings.delta_history)
            {
                builds.push(Build {
                    from_version: Some(e.version.clone()),
                    status: BuildStatus::Pending,
                    artifacts: None,
                    error: None,
                    seconds: None,
                    progress: None,
                });
            }
            ReleaseRecord {
                device_type: device_type.into(),
                version: version.into(),
                image_sha256: sha,
                image_size: size,
                created_at_ms: crate::now_ms(),
                seq,
                security_counter,
                builds,
                bundle: None,
            }
        };
        if let Some(old) = self.db.insert_new(&rec).await? {
            // Another replica added it meanwhile.
            if old.image_sha256 == sha {
                return Ok(old);
            }
            return Err(ReleaseError::Exists {
                device_type: device_type.into(),
                version: version.into(),
            });
        }
        self.map_mut()
            .insert((device_type.to_string(), version.to_string()), rec.clone());
        for b in &rec.builds {
            self.queue((
                device_type.to_string(),
                version.to_string(),
                b.from_version.clone(),
            ));
        }
        info!(
            device_type,
            version,
            size,
            builds = rec.builds.len(),
            "release added"
        );
        Ok(rec)
    }

    /// Changes one build of a release and persists the record (with
    /// PostgreSQL as a read-modify-write under the row lock, so replicas
    /// finishing different builds of one release do not overwrite each
    /// other).
    async fn set_build(
        &self,
        device_type: &str,
        version: &str,
        from: &Option<String>,
        f: impl FnOnce(&mut Build),
    ) -> Result<(), StoreError> {
        let pool = match &self.db {
            ReleaseDb::Sled(store) => {
                let mut map = self.map_mut();
                let Some(r) = map.get_mut(&(device_type.to_string(), version.to_string())) else {
                    return Ok(());
                };
                if let Some(b) = r.builds.iter_mut().find(|b| &b.from_version == from) {
                    f(b);
                }
                store
                    .releases
                    .insert(key2(device_type, version), encode(&*r))?;
                return Ok(());
            }
            ReleaseDb::Postgres(pool) => pool,
        };
        let mut c = crate::pg::conn(pool).await?;
        let tx = c.transaction().await.map_err(crate::pg::err)?;
        let Some(row) = tx
            .query_opt(
                "SELECT record FROM releases WHERE device_type = $1 AND version = $2 FOR UPDATE",
                &[&device_type, &version],
            )
            .await
            .map_err(crate::pg::err)?
        else {
            return Ok(());
        };
        let mut rec: tokio_postgres::types::Json<ReleaseRecord> = row.get(0);
        if let Some(b) = rec.0.builds.iter_mut().find(|b| &b.from_version == from) {
            f(b);
        }
        tx.execute(
            "UPDATE releases SET record = $3 WHERE device_type = $1 AND version = $2",
            &[&device_type, &version, &rec],
        )
        .await
        .map_err(crate::pg::err)?;
        tx.commit().await.map_err(crate::pg::err)?;
        self.map_mut()
            .insert((device_type.to_string(), version.to_string()), rec.0);
        Ok(())
    }

    /// With PostgreSQL: takes the build's advisory lock on a connection
    /// held for the build. `None`: another replica is building it.
    async fn claim(
        &self,
        job: &Job,
    ) -> Result<Option<Option<deadpool_postgres::Object>>, StoreError> {
        let ReleaseDb::Postgres(pool) = &self.db else {
            return Ok(Some(None));
        };
        let c = crate::pg::conn(pool).await?;
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&build_lock_key(job)])
            .await
            .map_err(crate::pg::err)?
            .get(0);
        if !got {
            return Ok(None);
        }
        // Someone may have finished it before we got the lock.
        self.refresh_one(&c, &job.0, &job.1).await?;
        Ok(Some(Some(c)))
    }

    async fn refresh_one(
        &self,
        c: &deadpool_postgres::Object,
        t: &str,
        v: &str,
    ) -> Result<(), StoreError> {
        if let Some(row) = c
            .query_opt(
                "SELECT record FROM releases WHERE device_type = $1 AND version = $2",
                &[&t, &v],
            )
            .await
            .map_err(crate::pg::err)?
        {
            let rec: tokio_postgres::types::Json<ReleaseRecord> = row.get(0);
            self.map_mut().insert((t.to_string(), v.to_string()), rec.0);
        }
        Ok(())
    }

    /// Runs the build queue until `cancel`. One build at a time, each on
    /// every core at a low priority (see the module documentation).
    ///
    /// # Cancel safety
    /// On `cancel` the running build is asked to stop and awaited (within
    /// one batch of chunks); its record stays `building`, so the next start
    /// runs it again. Dropping the future instead leaves the build thread
    /// running to its end, its result unrecorded.
    pub async fn run_builder(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Job>,
        cancel: CancellationToken,
    ) {
        loop {
            let job = tokio::select! {
                _ = cancel.cancelled() => return,
                j = rx.recv() => match j { Some(j) => j, None => return },
            };
            self.queued.lock().unwrap().remove(&job);
            let claim = match self.claim(&job).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    error!(error = %e, "claiming a build; will retry");
                    continue;
                }
            };
            let (t, v, from) = job;
            let span = info_span!("build", device_type = %t, version = %v, from = ?from);
            let this = self.clone();
            async {
                let status = {
                    let map = this.map.read().unwrap();
                    map.get(&(t.clone(), v.clone())).and_then(|r| {
                        r.builds
                            .iter()
                            .find(|b| b.from_version == from)
                            .map(|b| b.status)
                    })
                };
                if !matches!(status, Some(BuildStatus::Pending | BuildStatus::Building)) {
                    return;
                }
                if let Err(e) = this
                    .set_build(&t, &v, &from, |b| b.status = BuildStatus::Building)
                    .await
                {
                    error!(error = %e, "recording build start");
                }
                let started = std::time::Instant::now();
                let job = (t.clone(), v.clone(), from.clone());
                let live = Arc::new(LiveBuild {
                    gen_progress: Progress::default(),
                    step: Default::default(),
                    started,
                });
                this.live.lock().unwrap().insert(job.clone(), live.clone());
                let this2 = this.clone();
                let live2 = live.clone();
                let (t2, v2, f2) = (t.clone(), v.clone(), from.clone());
                let built = run_low_priority(this.settings.nice, move || {
                    this2.build_blocking(&t2, &v2, &f2, &live2)
                });
                tokio::pin!(built);
                // On shutdown the generator is asked to stop; the build
                // stays `building` and runs again at the next start.
                let res = tokio::select! {
                    r = &mut built => Some(r),
                    _ = cancel.cancelled() => {
                        live.gen_progress.cancel();
                        let _ = built.await;
                        info!("build interrupted by shutdown; it runs again at the next start");
                        None
                    }
                };
                let res = match res {
                    Some(Ok(Ok((mpath, ppath, payload_sha, codecs)))) => {
                        live.step.store(2, std::sync::atomic::Ordering::Relaxed);
                        Some(
                            this.store_artifacts(&from, &mpath, &ppath, &payload_sha, codecs)
                                .await,
                        )
                    }
                    Some(Ok(Err(e)) | Err(e)) => Some(Err(e)),
                    None => None,
                };
                this.live.lock().unwrap().remove(&job);
                let secs = started.elapsed().as_secs_f64();
                let r = match res {
                    Some(Ok(a)) => {
                        info!(payload = a.payload_size, secs, "build ready");
                        this.set_build(&t, &v, &from, |b| {
                            b.status = BuildStatus::Ready;
                            b.artifacts = Some(a);
                            b.seconds = Some(secs);
                        })
                        .await
                    }
                    Some(Err(e)) => {
                        error!(error = %e, "build failed");
                        this.set_build(&t, &v, &from, |b| {
                            b.status = BuildStatus::Failed;
                            b.error = Some(e);
                        })
                        .await
                    }
                    None => Ok(()),
                };
                if let Err(e) = r {
                    error!(error = %e, "recording build result");
                }
                if let ReleaseDb::Sled(store) = &this.db {
                    let _ = store.durable().await;
                }
                if let Some(c) = claim {
                    let key = build_lock_key(&(t.clone(), v.clone(), from.clone()));
                    let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&key]).await;
                }
            }
            .instrument(span)
            .await;
        }
    }

    async fn store_artifacts(
        &self,
        from: &Option<String>,
        manifest: &Path,
        payload: &Path,
        payload_sha: &Digest,
        codecs: Vec<String>,
    ) -> Result<Artifacts, String> {
        let stored = async {
            // The generator hashed the payload as it wrote it: moved in,
            // not copied (a full image's payload can be a GiB).
            let (ps, pn) = self
                .artifacts
                .adopt_file(payload, payload_sha)
                .await
                .map_err(|e| format!("storing payload: {e}"))?;
            let (ms, mn) = self
                .artifacts
                .put_file(manifest)
                .await
                .map_err(|e| format!("storing manifest: {e}"))?;
            Ok::<_, String>((ps, pn, ms, mn))
        }
        .await;
        // Whatever was not moved in is ours to remove.
        let _ = std::fs::remove_file(payload);
        let _ = std::fs::remove_file(manifest);
        let (ps, pn, ms, mn) = stored?;
        Ok(Artifacts {
            from_version: from.clone(),
            manifest_sha256: ms,
            manifest_size: mn,
            payload_sha256: ps,
            payload_size: pn,
            codecs,
        })
    }

    /// Generates and signs one update into `tmp/`; returns the manifest's
    /// and the payload's paths and the payload's digest.
    fn build_blocking(
        &self,
        t: &str,
        v: &str,
        from: &Option<String>,
        live: &LiveBuild,
    ) -> Result<(PathBuf, PathBuf, Digest, Vec<String>), String> {
        let (target_sha, counter, source_sha) = {
            let map = self.map.read().unwrap();
            let r = map
                .get(&(t.to_string(), v.to_string()))
                .ok_or("release vanished")?;
            let src = match from {
                Some(f) => Some(
                    map.get(&(t.to_string(), f.clone()))
                        .ok_or_else(|| format!("source release {f} is missing"))?
                        .image_sha256,
                ),
                None => None,
            };
            (r.image_sha256, r.security_counter, src)
        };
        let open = |d: &Digest| {
            std::fs::File::open(self.images.path_of(d))
                .map_err(|e| format!("opening image {d}: {e}"))
        };
        let target = open(&target_sha)?;
        let source = match &source_sha {
            Some(s) => Some(open(s)?),
            None => None,
        };
        let spec = DeltaSpec {
            device_type: t.into(),
            from_version: from.clone(),
            to_version: v.into(),
            security_counter: counter,
            expires_at: Manifest::expiry_in(self.settings.expiry_days),
        };
        // A full image needs no codec: it is what agents that decode none
        // get. A delta uses those the settings allow ([`CodecUse`]).
        let seen = from.as_deref().and_then(|f| self.seen_codecs(t, f));
        let set = &self.settings;
        let allows = |u: CodecUse, c: &str| from.is_some() && u.allows(c, seen);
        let (xz, zero_runs, arm64, frames) = (
            allows(set.delta_xz, ota_format::manifest::CODEC_XZ),
            allows(set.delta_zero_runs, ota_format::manifest::CODEC_ZERO_RUNS),
            allows(set.delta_arm64, ota_format::manifest::CODEC_ARM64),
            allows(set.delta_frames, ota_format::manifest::CODEC_FRAMES),
        );
        if from.is_some() {
            info!(
                agents_listed = ?seen,
                xz, zero_runs, arm64, frames, "codecs the delta may use"
            );
        }
        let opts = GenerateOptions {
            chunk_size: self.settings.chunk_size,
            zstd_level: if from.is_some() {
                self.settings.zstd_level
            } else {
                self.settings.full_zstd_level
            },
            xz,
            zero_runs,
            arm64,
            frames,
            threads: self.settings.threads,
            progress: false,
        };
        let mut payload = tempfile::Builder::new()
            .prefix("payload-")
            .tempfile_in(&self.tmp)
            .map_err(|e| format!("creating a temporary file in {}: {e}", self.tmp.display()))?;
        let manifest = generate_with_progress(
            &spec,
            source.as_ref(),
            &target,
            payload.as_file_mut(),
            &opts,
            Some(&live.gen_progress),
        )
        .map_err(|e| match e {
            GenerateError::Cancelled => "cancelled".to_string(),
            e => e.to_string(),
        })?;
        live.step.store(1, std::sync::atomic::Ordering::Relaxed);
        payload.as_file().sync_all().map_err(|e| e.to_string())?;
        let signers = self.signers.load();
        let env = Envelope::sign_compressed_with(&manifest.to_json(), &signers.refs())
            .map_err(|e| e.to_string())?
            .to_json();
        let mut mf = tempfile::Builder::new()
            .prefix("manifest-")
            .tempfile_in(&self.tmp)
            .map_err(|e| e.to_string())?;
        std::io::Write::write_all(mf.as_file_mut(), &env).map_err(|e| e.to_string())?;
        mf.as_file().sync_all().map_err(|e| e.to_string())?;
        let (_, ppath) = payload.keep().map_err(|e| e.to_string())?;
        let (_, mpath) = mf.keep().map_err(|e| e.to_string())?;
        Ok((mpath, ppath, manifest.payload.sha256, manifest.codecs))
    }
}

impl From<sled::Error> for ReleaseError {
    fn from(e: sled::Error) -> Self {
        ReleaseError::Store(e.into())
    }
}

/// [`Releases::pick`]'s choice between a ready delta and a ready full
/// image: of those whose codecs the device decodes, the one with fewer bytes
/// to fetch, the delta on a tie.
fn choose<'a>(
    delta: Option<&'a Artifacts>,
    full: Option<&'a Artifacts>,
    codecs: Codecs,
) -> Option<&'a Artifacts> {
    let usable = |a: &&Artifacts| a.codecs.iter().all(|c| codecs.contains(c));
    match (delta.filter(usable), full.filter(usable)) {
        (Some(d), Some(f)) if f.fetch_bytes() < d.fetch_bytes() => Some(f),
        (Some(d), _) => Some(d),
        (None, f) => f,
    }
}

/// The advisory-lock key of a build: 64 bits of a hash of (type, version,
/// from).
fn build_lock_key(job: &Job) -> i64 {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"ota-build\0");
    h.update(job.0.as_bytes());
    h.update([0]);
    h.update(job.1.as_bytes());
    h.update([0]);
    if let Some(f) = &job.2 {
        h.update(f.as_bytes());
    }
    i64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(from: Option<&str>, manifest: u64, payload: u64, codecs: &[&str]) -> Artifacts {
        Artifacts {
            from_version: from.map(str::to_string),
            manifest_sha256: Digest::of(b"m"),
            manifest_size: manifest,
            payload_sha256: Digest::of(b"p"),
            payload_size: payload,
            codecs: codecs.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn pick_offers_the_smaller_of_delta_and_full_counting_the_manifest() {
        let all = ota_format::manifest::codecs();
        let full = art(None, 1_000, 100_000, &[]);
        // A delta smaller than the image wins.
        let small = art(Some("1"), 5_000, 20_000, &["xz"]);
        assert_eq!(choose(Some(&small), Some(&full), all), Some(&small));
        // A delta larger than the image (a rebuilt image) loses to it, and
        // its manifest counts: payload alone is smaller, payload + manifest
        // is not.
        let big = art(Some("1"), 5_000, 98_000, &[]);
        assert_eq!(choose(Some(&big), Some(&full), all), Some(&full));
        // A tie goes to the delta (less to write on the device: COPY ops).
        let tie = art(Some("1"), 1_000, 100_000, &[]);
        assert_eq!(choose(Some(&tie), Some(&full), all), Some(&tie));
        // Only one built: that one, whatever its size.
        assert_eq!(choose(Some(&big), None, all), Some(&big));
        assert_eq!(choose(None, Some(&full), all), Some(&full));
        assert_eq!(choose(None, None, all), None);
    }

    #[test]
    fn pick_never_offers_a_payload_whose_codec_the_device_lacks() {
        let full = art(None, 1_000, 100_000, &[]);
        let xz = art(Some("1"), 5_000, 20_000, &["xz"]);
        // An agent older than the xz codec advertises none: the full image.
        assert_eq!(choose(Some(&xz), Some(&full), Codecs::NONE), Some(&full));
        // And nothing while only the xz delta is ready.
        assert_eq!(choose(Some(&xz), None, Codecs::NONE), None);
        assert_eq!(
            choose(Some(&xz), Some(&full), ota_format::manifest::codecs()),
            Some(&xz)
        );
        // A delta with zero-run-coded streams: not for an agent that
        // decodes xz but is older than the zero-runs codec.
        let zr = art(Some("1"), 5_000, 18_000, &["xz", "zero-runs"]);
        let xz_only: Codecs = serde_json::from_str(r#"["xz"]"#).unwrap();
        assert_eq!(choose(Some(&zr), Some(&full), xz_only), Some(&full));
        assert_eq!(choose(Some(&zr), None, xz_only), None);
        assert_eq!(
            choose(Some(&zr), Some(&full), ota_format::manifest::codecs()),
            Some(&zr)
        );
        // A delta with arm64-transformed new code: not for an agent that
        // decodes xz and zero runs but is older than the arm64 codec.
        let a64 = art(Some("1"), 5_000, 18_000, &["xz", "zero-runs", "arm64"]);
        let before_arm64: Codecs = serde_json::from_str(r#"["xz","zero-runs"]"#).unwrap();
        assert_eq!(choose(Some(&a64), Some(&full), before_arm64), Some(&full));
        assert_eq!(choose(Some(&a64), None, before_arm64), None);
        assert_eq!(choose(Some(&a64), Some(&full), xz_only), Some(&full));
        assert_eq!(
            choose(Some(&a64), Some(&full), ota_format::manifest::codecs()),
            Some(&a64)
        );
        // A delta with framed BSDIFF data: not for an agent that decodes
        // xz, zero runs and arm64 but is older than the frames codec.
        let fr = art(
            Some("1"),
            5_000,
            17_000,
            &["xz", "zero-runs", "arm64", "frames"],
        );
        let before_frames: Codecs = serde_json::from_str(r#"["xz","zero-runs","arm64"]"#).unwrap();
        assert_eq!(choose(Some(&fr), Some(&full), before_frames), Some(&full));
        assert_eq!(choose(Some(&fr), None, before_frames), None);
        assert_eq!(choose(Some(&fr), Some(&full), before_arm64), Some(&full));
        assert_eq!(
            choose(Some(&fr), Some(&full), ota_format::manifest::codecs()),
            Some(&fr)
        );
    }

    /// A catalogue on sled in `dir`, with no builder running: nothing but
    /// the calls a test makes changes it.
    async fn catalogue(dir: &Path) -> Releases {
        let store = Store::open(&dir.join("db")).unwrap();
        // Durable writes wait for the group commit.
        tokio::spawn(store.clone().run_flusher(CancellationToken::new()));
        let signers = crate::signing::Signers::from_keys(vec![
            ota_format::SigningKeyPair::generate().unwrap(),
        ]);
        let settings = BuildSettings {
            delta_history: 1,
            chunk_size: 1 << 20,
            zstd_level: 3,
            full_zstd_level: 3,
            delta_xz: CodecUse::Auto,
            delta_zero_runs: CodecUse::Auto,
            delta_arm64: CodecUse::Auto,
            delta_frames: CodecUse::Auto,
            expiry_days: 30,
            threads: 1,
            nice: 0,
        };
        let (r, _jobs) = Releases::load(
            ReleaseDb::Sled(store),
            ArtifactStore::open(dir.join("images")).unwrap(),
            ArtifactStore::open(dir.join("artifacts")).unwrap(),
            dir.join("tmp"),
            settings,
            Arc::new(arc_swap::ArcSwap::from_pointee(signers)),
        )
        .await
        .unwrap();
        r
    }

    async fn add(r: &Releases, dir: &Path, version: &str) {
        let image = dir.join(format!("{version}.img"));
        let bytes = vec![version.len() as u8; 8192];
        std::fs::write(&image, &bytes).unwrap();
        r.add("t", version, 0, false, &image, &Digest::of(&bytes))
            .await
            .unwrap();
    }

    /// `add` wrote the catalogue without bumping its generation, so the
    /// cached freshness statement kept naming the previous latest release
    /// (until a build's status changed, which waits for the builds ahead).
    #[tokio::test]
    async fn adding_a_release_moves_the_catalogue_generation() {
        let dir = tempfile::tempdir().unwrap();
        let r = catalogue(dir.path()).await;
        add(&r, dir.path(), "1.0").await;
        let before = r.generation();
        add(&r, dir.path(), "2.0").await;
        assert!(
            r.generation() > before,
            "the statement cache would not see 2.0"
        );
        assert_eq!(r.latest("t").0.as_deref(), Some("2.0"));
    }

    #[tokio::test]
    async fn codecs_are_observed_per_release_and_only_for_releases() {
        let dir = tempfile::tempdir().unwrap();
        let r = catalogue(dir.path()).await;
        let all = ota_format::manifest::codecs();
        let xz: Codecs = serde_json::from_str(r#"["xz"]"#).unwrap();
        // A version that is no release leaves no entry behind, before or
        // after it becomes one.
        r.observe_agent("t", "1.0", all);
        assert_eq!(r.seen_codecs("t", "1.0"), None);
        add(&r, dir.path(), "1.0").await;
        assert_eq!(r.seen_codecs("t", "1.0"), None, "nothing seen on it yet");
        r.observe_agent("t", "9.9", all);
        assert_eq!(r.seen_codecs("t", "9.9"), None);
        assert!(r.seen_codecs.read().unwrap().by_type["t"].len() == 1);
        // The first agent's set, then the intersection.
        r.observe_agent("t", "1.0", all);
        assert_eq!(r.seen_codecs("t", "1.0"), Some(all));
        r.observe_agent("t", "1.0", xz);
        r.observe_agent("t", "1.0", all);
        assert_eq!(r.seen_codecs("t", "1.0"), Some(xz));
        r.observe_agent("t", "1.0", Codecs::NONE);
        assert_eq!(r.seen_codecs("t", "1.0"), Some(Codecs::NONE));
        // A new release starts unseen; the others keep what was seen.
        add(&r, dir.path(), "2.0").await;
        r.observe_agent("t", "2.0", xz);
        assert_eq!(r.seen_codecs("t", "2.0"), Some(xz));
        assert_eq!(r.seen_codecs("t", "1.0"), Some(Codecs::NONE));
        // A deleted release's entry goes.
        r.set_build("t", "1.0", &None, |b| b.status = BuildStatus::Failed)
            .await
            .unwrap();
        r.delete("t", "1.0").await.unwrap();
        r.observe_agent("t", "2.0", xz);
        r.observe_agent("t", "1.0", all);
        assert_eq!(r.seen_codecs("t", "1.0"), None);
    }
}
