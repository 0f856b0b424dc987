//! Durable state in sled, with group commit.
//!
//! The server's hot state lives in memory (sharded maps, atomics); sled is
//! where every decision that must survive kill -9 is written *before* it is
//! acknowledged: enrollments, admissions, event ingestion, rollout state.
//! Writing is cheap (sled buffers it); making it durable is a flush. A flush
//! per request would turn a check-in storm into an fsync storm, so callers
//! write, then await [`Store::durable`], which joins the next flush: one
//! background task flushes as often as requests ask, and every request
//! waiting when a flush starts is covered by it (group commit).
//!
//! Trees: `devices` (id → [`crate::fleet::DeviceRecord`]), `releases`
//! (`type\0version` → release record), `rollouts` (id → rollout record),
//! `members` (`rollout\0device` → member), `events` (`device\0seq` → event),
//! `meta` (counters), `device_certs` (certificate serial →
//! [`crate::certs::CertRecord`]: issued and revoked client certificates).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Why the store failed. Every variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0} (check the data directory's disk space and permissions)")]
    Sled(#[from] sled::Error),
    #[error(
        "state database record {key}: {source} (the record is corrupt; restore the data directory from a backup)"
    )]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("state database transaction: {0}")]
    Transaction(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("state database (PostgreSQL): {0}")]
    Postgres(String),
    #[error(
        "another ota-server uses {}: its state database is locked; stop that server first, or give this one its own data_dir",
        .0.parent().unwrap_or(.0).display()
    )]
    Locked(std::path::PathBuf),
    /// A backend (PostgreSQL, Redis) cannot be reached right now: the
    /// request is answered 503 and the device retries.
    #[error("{0} (temporarily unavailable; devices retry)")]
    Unavailable(String),
}

/// The sled database and its group-commit flusher.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub devices: sled::Tree,
    pub releases: sled::Tree,
    pub rollouts: sled::Tree,
    pub members: sled::Tree,
    pub events: sled::Tree,
    pub meta: sled::Tree,
    /// Saved selectors ([`crate::groups`]), by name.
    pub groups: sled::Tree,
    /// An exclusive lock on `ota-server.lock` in the directory, held while
    /// any clone lives (released by the OS if the process dies).
    _lock: Arc<std::fs::File>,
    pub certs: sled::Tree,
    /// The admin audit log ([`crate::audit`]), keyed by big-endian sequence.
    pub audit: sled::Tree,
    /// Named admin users ([`crate::audit::User`]), by name.
    pub users: sled::Tree,
    flush: Arc<Flusher>,
}

struct Flusher {
    /// Highest ticket handed out: a write made before taking ticket `t` is
    /// covered by any flush that starts after `t` was taken.
    requested: AtomicU64,
    /// Highest ticket covered by a completed flush.
    done: watch::Sender<u64>,
    wake: Notify,
    /// Flushes performed, for metrics and tests.
    flushes: AtomicU64,
}

/// How long [`Store::open`] waits for the sled lock of a database this
/// process has just closed.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens sled, waiting up to `wait` while its own lock is still held.
///
/// Called with `ota-server.lock` held, so no other process has the
/// database: a sled lock that is still taken belongs to the background
/// threads of a `sled::Db` this process dropped a moment ago (a restart
/// in one process, as the tests and a config reload do). sled 0.34's
/// `Drop` does not wait for them (spacejam/sled#1234, #1289); its flock is
/// released when they exit, a few milliseconds later. Any other error, or
/// a lock still held after `wait`, is returned as is.
fn open_after_lingering_threads(
    config: &sled::Config,
    wait: std::time::Duration,
) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match config.open() {
            // sled reports `flock`'s EWOULDBLOCK as `ErrorKind::Other`
            // with this text (sled 0.34 `config.rs`).
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`. Refuses, naming the cause,
    /// when another process has it open (sled allows one process; its own
    /// lock error does not say which directory or why).
    pub fn open(dir: &std::path::Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Sled(e.into()))?;
        let lock_path = dir.join("ota-server.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Sled(e.into()))?;
        match fs2::FileExt::try_lock_exclusive(&lock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(StoreError::Locked(dir.to_path_buf()));
            }
            Err(e) => return Err(StoreError::Sled(e.into())),
        }
        let config = sled::Config::new()
            .path(dir)
            // sled's own periodic flush stays on as a backstop; durability
            // of acknowledged writes comes from `durable()`.
            .flush_every_ms(Some(1000))
            .cache_capacity(64 << 20);
        let db = open_after_lingering_threads(&config, SLED_LOCK_WAIT)?;
        let (done, _) = watch::channel(0);
        Ok(Store {
            devices: db.open_tree("devices")?,
            releases: db.open_tree("releases")?,
            rollouts: db.open_tree("rollouts")?,
            members: db.open_tree("members")?,
            events: db.open_tree("events")?,
            meta: db.open_tree("meta")?,
            groups: db.open_tree("groups")?,
            certs: db.open_tree("device_certs")?,
            audit: db.open_tree("audit")?,
            users: db.open_tree("users")?,
            db,
            _lock: Arc::new(lock),
            flush: Arc::new(Flusher {
                requested: AtomicU64::new(0),
                done,
                wake: Notify::new(),
                flushes: AtomicU64::new(0),
            }),
        })
    }

    /// Runs the group-commit flusher until `cancel`, then flushes once more.
    pub async fn run_flusher(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.flush.wake.notified() => {}
            }
            let upto = self.flush.requested.load(Ordering::SeqCst);
            if upto <= *self.flush.done.borrow() {
                continue;
            }
            // Not sled's `flush_async`: its futures can stay pending
            // forever (spacejam/sled#1241); the blocking flush cannot.
            let db = self.db.clone();
            let flushed = tokio::task::spawn_blocking(move || db.flush())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e).into()));
            if let Err(e) = flushed {
                tracing::error!(error = %e, "state database flush failed; acknowledged writes may be lost on a crash");
                continue;
            }
            self.flush.flushes.fetch_add(1, Ordering::Relaxed);
            self.flush.done.send_replace(upto);
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final state database flush failed");
        }
        self.flush
            .done
            .send_replace(self.flush.requested.load(Ordering::SeqCst));
    }

    /// Waits until every write this task made before the call is on disk.
    ///
    /// Stores `value` under `key` in `tree` unless the key is taken;
    /// whether it did. Durable before it returns (groups, users).
    ///
    /// # Cancel safety
    /// Cancelled before durability, the record may or may not exist after
    /// a crash; the caller, who saw no answer, lists them.
    pub async fn insert_new<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &str,
        value: &T,
    ) -> Result<bool, StoreError> {
        let created = tree
            .compare_and_swap(key.as_bytes(), None::<&[u8]>, Some(encode(value)))?
            .is_ok();
        self.durable().await?;
        Ok(created)
    }

    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting; the flush still
    /// happens for other waiters.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let ticket = self.flush.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.flush.done.subscribe();
        self.flush.wake.notify_one();
        rx.wait_for(|d| *d >= ticket)
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        Ok(())
    }

    /// Flushes performed so far.
    pub fn flush_count(&self) -> u64 {
        self.flush.flushes.load(Ordering::Relaxed)
    }

    /// A fresh id from a persistent counter (`name` picks the counter).
    pub fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        let v = self.meta.update_and_fetch(name, |old| {
            let n = old.map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(u64::from_be_bytes(
            v.as_deref()
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        ))
    }
}

/// Serializes a record for a tree.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

/// Deserializes a record, naming the key when it is corrupt.
pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// Every record of a tree, decoded.
pub fn load_all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        out.push(decode(&k, &v)?);
    }
    Ok(out)
}

/// Key joining two parts with a NUL (ids never contain one).
pub fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn durable_waits_for_a_flush_and_flushes_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cancel = CancellationToken::new();
        let flusher = tokio::spawn(store.clone().run_flusher(cancel.clone()));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.devices.insert(i.to_be_bytes(), b"x".to_vec()).unwrap();
                s.durable().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = store.flush_count();
        assert!(n >= 1, "no flush happened");
        assert!(n < 200, "every write flushed on its own ({n} flushes)");
        cancel.cancel();
        flusher.await.unwrap();
        // The store is reopened from disk with every acknowledged write.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.devices.len(), 200);
    }

    /// The CI failure of `audit_http::the_audit_log_and_users_survive_a_restart`:
    /// a restart in one process found sled's lock still held by the
    /// background threads of the database it had just dropped.
    #[test]
    fn reopening_waits_for_the_lock_of_a_just_dropped_database() {
        let dir = tempfile::tempdir().unwrap();
        // Stands in for the lingering threads: sled's lock, without ours.
        let lingering = sled::Config::new().path(dir.path()).open().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(lingering);
        });
        let s = Store::open(dir.path()).expect("waits for the lock instead of failing");
        release.join().unwrap();
        assert_eq!(s.next_id("rollout").unwrap(), 1);
    }

    #[test]
    fn a_database_locked_for_longer_than_the_wait_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = sled::Config::new().path(dir.path()).open().unwrap();
        let config = sled::Config::new().path(dir.path());
        let t = std::time::Instant::now();
        let e = open_after_lingering_threads(&config, std::time::Duration::from_millis(200))
            .expect_err("still locked");
        assert!(e.to_string().contains("lock"), "{e}");
        assert!(t.elapsed() >= std::time::Duration::from_millis(200));
    }

    #[test]
    fn ids_count_up_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.next_id("rollout").unwrap(), 1);
            assert_eq!(s.next_id("rollout").unwrap(), 2);
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.next_id("rollout").unwrap(), 3);
    }
}
