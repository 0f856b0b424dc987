//! What the agent remembers across restarts, crashes and power cuts.
//!
//! Two kinds of storage, for two kinds of facts:
//!
//! - **Decisions** — which update is in hand and in which phase, which
//!   version each slot holds — are small JSON files replaced atomically
//!   (temporary file, fsync, rename, fsync of the directory): after a crash
//!   they hold the old or the new decision, never a mix. `ota-agent status`
//!   reads them without opening the database.
//! - **Hints and queues** live in sled (`<data_dir>/db`): the operations
//!   believed applied (recorded only after the slot was fsynced, and
//!   re-verified against their `dst_sha256` on restart: sled is a hint, the
//!   slot is the truth), the events outbox (an event is stored before it is
//!   sent and deleted only when the server acknowledged it; progress events
//!   are coalesced to the latest), and the event sequence counter, which
//!   must never go back.

use std::path::{Path, PathBuf};

use ota_format::Digest;
use ota_format::api::{Event, EventDetail, EventKind, Slot, UpdateOffer};
use serde::{Deserialize, Serialize};

use crate::bootctl::write_atomic;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Db { path: PathBuf, source: sled::Error },
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where an update in hand stands. Stored in `update.json`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Fetching and applying operations into the target slot.
    Downloading,
    /// All operations applied; verifying the image, about to switch.
    Installing,
    /// The whole image verified in the target slot; the switch waits for
    /// the server's `install` (a maintenance window) or a local
    /// `ota-agent install-now`. Survives restarts and reboots; the slot is
    /// hashed again before the switch.
    WaitingForWindow,
    /// Boot switched to the target slot (on trial); reboot pending or done.
    Rebooting,
    /// Health check failed: boot switched back to the old slot, reboot pending.
    RollingBack,
}

/// The name `update.json` stores (and `ota-agent status` prints), which is
/// the phase's name in the device API too (`waiting-for-window`).
impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Downloading => "downloading",
            Phase::Installing => "installing",
            Phase::WaitingForWindow => "waiting-for-window",
            Phase::Rebooting => "rebooting",
            Phase::RollingBack => "rolling-back",
        })
    }
}

/// The update in hand.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UpdateRecord {
    pub offer: UpdateOffer,
    pub phase: Phase,
    /// The slot running when the update started (the fallback).
    pub from_slot: Slot,
    /// The slot being written.
    pub target: Slot,
    pub to_version: String,
    pub to_security_counter: u64,
    /// Why we are rolling back (phase `rolling-back`).
    #[serde(default)]
    pub reason: Option<String>,
    /// The boot id (`BootControl::boot_id`) of the boot in which the agent
    /// decided to switch to `target`; recorded before the switch. The same
    /// id after a restart means no reboot happened since.
    #[serde(default)]
    pub switched_in_boot: Option<String>,
    /// How many times a switch to `target` was found lost after a reboot
    /// (the old slot came up with an untouched environment) and redone.
    /// A power cut in the instant of the environment write explains one;
    /// the same thing every time means a boot script that resets the count
    /// when it falls back, and redoing it forever would loop.
    #[serde(default)]
    pub redone_switches: u32,
    /// The verified image (phase `waiting-for-window`): what the target
    /// slot must hash to when the switch finally comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifiedImage>,
    /// The update has ended with this event (`committed`, `rolled-back`,
    /// `failed`), noted before it is queued and before this record goes: a
    /// restart that still finds the record queues the same event (same
    /// sequence number) and clears the record, so the end is reported once
    /// whatever step a crash lands on (`daemon::finish_update`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_event: Option<Event>,
}

/// A whole image verified in the target slot.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct VerifiedImage {
    pub sha256: Digest,
    pub size: u64,
}

/// What each slot holds, as far as the agent knows.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct SlotsRecord {
    pub a: Option<SlotInfo>,
    pub b: Option<SlotInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SlotInfo {
    pub version: String,
    pub security_counter: u64,
}

impl SlotsRecord {
    pub fn get(&self, s: Slot) -> Option<&SlotInfo> {
        match s {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }
    pub fn set(&mut self, s: Slot, info: Option<SlotInfo>) {
        match s {
            Slot::A => self.a = info,
            Slot::B => self.b = info,
        }
    }
}

/// Live status for `ota-agent status`, rewritten about once a second.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct StatusRecord {
    pub phase: String,
    pub version: String,
    pub booted_slot: String,
    #[serde(default)]
    pub update_id: Option<String>,
    #[serde(default)]
    pub to_version: Option<String>,
    #[serde(default)]
    pub progress: ota_format::api::Progress,
    #[serde(default)]
    pub last_error: Option<String>,
    pub updated_at: String,
}

/// The agent's persistent state.
pub struct State {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    outbox: sled::Tree,
}

fn db_err(path: &Path) -> impl FnOnce(sled::Error) -> StateError + '_ {
    move |source| StateError::Db {
        path: path.into(),
        source,
    }
}

const SEQ_KEY: &[u8] = b"next_seq";

impl State {
    /// Opens (creating) the state under `dir`.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.into(),
            source,
        })?;
        let path = dir.join("db");
        let config = sled::Config::new()
            .path(&path)
            // Small devices: a small page cache is plenty for these trees.
            .cache_capacity(1 << 20);
        // sled 0.34's `Drop` does not wait for its background threads, which
        // hold its lock a few milliseconds longer (spacejam/sled#1234): a
        // reopen in the same process (tests, CI: `freshness` restart test)
        // could find it taken. A lock held for longer (a second agent on
        // the same data directory) is still an error after the wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r.map_err(db_err(&path))?,
            }
        };
        let meta = db.open_tree("meta").map_err(db_err(&path))?;
        let outbox = db.open_tree("outbox").map_err(db_err(&path))?;
        Ok(State {
            dir: dir.into(),
            db,
            meta,
            outbox,
        })
    }

    fn err(&self) -> impl FnOnce(sled::Error) -> StateError + '_ {
        db_err(&self.dir)
    }

    /// Makes every change so far durable.
    ///
    /// sled's own `flush_async` is not used: in sled 0.34 futures of
    /// several near-simultaneous `flush_async` calls can stay pending
    /// forever (spacejam/sled#1241, #1308), and this agent flushes from its
    /// main path and its event loop at once. It hung a restarted agent
    /// after a reboot, silently, before its commit (the kill -9 test, under
    /// load). The blocking flush runs on tokio's blocking pool instead.
    ///
    /// # Cancel safety
    /// Cancelling stops the wait, not the flush, which completes on its
    /// blocking thread; a crash meanwhile makes sled recover to an earlier
    /// consistent point, which only loses hints (re-derived on restart).
    pub async fn flush(&self) -> Result<(), StateError> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(r) => {
                r.map_err(self.err())?;
            }
            Err(e) => {
                return Err(StateError::Io {
                    path: self.dir.clone(),
                    source: std::io::Error::other(format!("the flush task failed: {e}")),
                });
            }
        }
        Ok(())
    }

    /// Appends an event to the outbox with the next sequence number and
    /// makes it durable before returning. A new progress event replaces the
    /// unsent progress events of the same update (coalescing).
    ///
    /// # Cancel safety
    /// Not meant to be cancelled (the daemon never does): cancelled after
    /// the insert but before the flush, the event may or may not survive a
    /// crash; the sequence counter never goes back either way.
    pub async fn push_event(
        &self,
        update_id: &str,
        kind: EventKind,
        detail: EventDetail,
    ) -> Result<Event, StateError> {
        let ev = self.next_event(update_id, kind, detail)?;
        if kind == EventKind::Progress {
            for (k, v) in self.outbox.iter().flatten() {
                if let Ok(old) = serde_json::from_slice::<Event>(&v)
                    && old.kind == EventKind::Progress
                    && old.update_id == update_id
                {
                    self.outbox.remove(k).map_err(self.err())?;
                }
            }
        }
        self.put_event(&ev).await?;
        Ok(ev)
    }

    /// A new event under the next sequence number, not yet in the outbox;
    /// the number is synced before this returns, so no later event can take
    /// it after a crash. An event that must be reported exactly once across
    /// crashes is noted elsewhere first (the update record's `final_event`)
    /// and queued with [`State::put_event`], as often as a restart needs,
    /// always under this number.
    ///
    /// # Cancel safety
    /// Cancelled before the flush, the number may or may not survive a
    /// crash; nothing holds it yet, and the counter never goes back.
    pub async fn new_event(
        &self,
        update_id: &str,
        kind: EventKind,
        detail: EventDetail,
    ) -> Result<Event, StateError> {
        let ev = self.next_event(update_id, kind, detail)?;
        self.flush().await?;
        Ok(ev)
    }

    /// Takes the next sequence number (not yet synced) for a new event.
    fn next_event(
        &self,
        update_id: &str,
        kind: EventKind,
        detail: EventDetail,
    ) -> Result<Event, StateError> {
        let seq = self
            .meta
            .update_and_fetch(SEQ_KEY, |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(self.err())?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        Ok(Event {
            seq,
            update_id: update_id.into(),
            kind,
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            detail,
        })
    }

    /// Queues `ev` in the outbox under its own sequence number and makes it
    /// durable. Idempotent: queued again, the same event replaces itself
    /// (and if it was sent already, the server counts its sequence number
    /// once).
    ///
    /// # Cancel safety
    /// As [`State::push_event`].
    pub async fn put_event(&self, ev: &Event) -> Result<(), StateError> {
        self.outbox
            .insert(
                ev.seq.to_be_bytes(),
                serde_json::to_vec(ev).expect("event serializes"),
            )
            .map_err(self.err())?;
        self.flush().await
    }

    /// The oldest unsent events, at most `max`.
    pub fn pending_events(&self, max: usize) -> Vec<Event> {
        self.outbox
            .iter()
            .flatten()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .take(max)
            .collect()
    }

    /// Removes acknowledged events.
    ///
    /// # Cancel safety
    /// Cancel-safe: an event not yet removed is sent again, and the server
    /// counts it once (idempotent by seq).
    pub async fn ack_events(&self, seqs: &[u64]) -> Result<(), StateError> {
        for s in seqs {
            self.outbox.remove(s.to_be_bytes()).map_err(self.err())?;
        }
        self.flush().await
    }

    /// Events waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    fn done_tree(&self, payload: &Digest) -> Result<sled::Tree, StateError> {
        self.db
            .open_tree(format!("done-{payload}"))
            .map_err(self.err())
    }

    /// Operations believed applied (and synced) for this payload.
    pub fn done_ops(&self, payload: &Digest) -> Result<Vec<usize>, StateError> {
        Ok(self
            .done_tree(payload)?
            .iter()
            .keys()
            .flatten()
            .filter_map(|k| <[u8; 4]>::try_from(k.as_ref()).ok())
            .map(|b| u32::from_be_bytes(b) as usize)
            .collect())
    }

    /// Records operations as applied. Call only after the slot was fsynced.
    ///
    /// # Cancel safety
    /// Cancel-safe: a record that did not reach the disk only means the
    /// operation is verified or redone at the next start.
    pub async fn mark_done(&self, payload: &Digest, ops: &[usize]) -> Result<(), StateError> {
        let t = self.done_tree(payload)?;
        let mut batch = sled::Batch::default();
        for &i in ops {
            batch.insert(&(i as u32).to_be_bytes(), &[]);
        }
        t.apply_batch(batch).map_err(self.err())?;
        self.flush().await
    }

    /// Forgets operations whose extent did not verify.
    ///
    /// # Cancel safety
    /// Cancel-safe: an extent left marked is re-verified at the next start.
    pub async fn unmark(&self, payload: &Digest, ops: &[usize]) -> Result<(), StateError> {
        let t = self.done_tree(payload)?;
        for &i in ops {
            t.remove((i as u32).to_be_bytes()).map_err(self.err())?;
        }
        self.flush().await
    }

    /// Forgets all progress of every payload but `keep`.
    ///
    /// # Cancel safety
    /// Cancel-safe: progress left behind is only a hint, re-verified or
    /// dropped later.
    pub async fn drop_progress_except(&self, keep: Option<&Digest>) -> Result<(), StateError> {
        let keep = keep.map(|d| format!("done-{d}"));
        for name in self.db.tree_names() {
            let n = String::from_utf8_lossy(&name).to_string();
            if n.starts_with("done-") && Some(&n) != keep.as_ref() {
                self.db.drop_tree(&name).map_err(self.err())?;
            }
        }
        self.flush().await
    }

    // ----- decision files -----

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StateError> {
        read_json(&self.dir.join(name))
    }

    fn write_json<T: Serialize>(&self, name: &str, v: &T) -> Result<(), StateError> {
        let path = self.dir.join(name);
        write_atomic(&path, &serde_json::to_vec_pretty(v).expect("serializes"))
            .map_err(|source| StateError::Io { path, source })
    }

    pub fn update(&self) -> Result<Option<UpdateRecord>, StateError> {
        self.read_json("update.json")
    }

    pub fn set_update(&self, u: Option<&UpdateRecord>) -> Result<(), StateError> {
        match u {
            Some(u) => self.write_json("update.json", u),
            None => {
                // The manifests of finished updates go with them.
                if let Ok(entries) = std::fs::read_dir(&self.dir) {
                    for e in entries.flatten() {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        if name.starts_with("manifest-") && name.ends_with(".json") {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
                let path = self.dir.join("update.json");
                match std::fs::remove_file(&path) {
                    Ok(()) => std::fs::File::open(&self.dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|source| StateError::Io { path, source }),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(StateError::Io { path, source }),
                }
            }
        }
    }

    pub fn slots(&self) -> Result<SlotsRecord, StateError> {
        Ok(self.read_json("slots.json")?.unwrap_or_default())
    }

    pub fn set_slots(&self, s: &SlotsRecord) -> Result<(), StateError> {
        self.write_json("slots.json", s)
    }

    /// The freshness floor ([`crate::freshness`]).
    pub fn freshness(&self) -> Result<Option<ota_format::FreshnessFloor>, StateError> {
        self.read_json("freshness.json")
    }

    pub fn set_freshness(&self, f: &ota_format::FreshnessFloor) -> Result<(), StateError> {
        self.write_json("freshness.json", f)
    }

    pub fn set_status(&self, s: &StatusRecord) -> Result<(), StateError> {
        self.write_json("status.json", s)
    }

    /// Where the manifest of the update in hand is kept.
    pub fn manifest_path(&self, sha: &Digest) -> PathBuf {
        self.dir.join(format!("manifest-{sha}.json"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads a JSON decision file; `None` if it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| StateError::Corrupt {
                path: path.into(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ota-agent status` printed `(WaitingForWindow)`, the Rust name; it
    /// prints the name update.json and the device API use.
    #[test]
    fn status_prints_each_phase_by_its_stored_name() {
        for p in [
            Phase::Downloading,
            Phase::Installing,
            Phase::WaitingForWindow,
            Phase::Rebooting,
            Phase::RollingBack,
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
    }

    /// CI: `freshness::tests::the_floor_survives_a_restart_so_a_replay_stays_refused`
    /// reopened the state in one process while sled's threads of the
    /// dropped database still held its lock.
    #[test]
    fn reopening_waits_for_the_lock_of_a_just_dropped_database() {
        let d = tempfile::tempdir().unwrap();
        // Stands in for the lingering threads: sled's lock on `db`.
        let lingering = sled::Config::new()
            .path(d.path().join("db"))
            .open()
            .unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(lingering);
        });
        State::open(d.path()).expect("waits for the lock instead of failing");
        release.join().unwrap();
    }

    /// sled 0.34's `flush_async` futures can stay pending forever when
    /// several are polled at once (spacejam/sled#1241): an agent hung
    /// silently before its commit. Many tasks marking operations done and
    /// flushing at once, as the chunk pool and the event loop do, must all
    /// finish.
    #[test]
    fn concurrent_flushes_all_complete() {
        let d = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(State::open(d.path()).unwrap());
        // The work runs on a runtime of its own, on a thread of its own: a
        // lock-up may block that runtime's workers, and this thread still
        // notices and fails instead of hanging the test run.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            let r = rt.block_on(async move {
                let digest = |i: u8| Digest::of(&[i]);
                let mut tasks = Vec::new();
                for t in 0..16u8 {
                    let s = s.clone();
                    tasks.push(tokio::spawn(async move {
                        for i in 0..40usize {
                            s.mark_done(&digest(t), &[i]).await?;
                            s.flush().await?;
                        }
                        Ok::<_, StateError>(())
                    }));
                }
                for t in futures_util::future::join_all(tasks).await {
                    t.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            });
            let _ = tx.send(r);
            // A runtime with stuck tasks is leaked, not dropped (dropping
            // would wait for them).
            std::mem::forget(rt);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(r) => r.unwrap(),
            Err(_) => {
                panic!("concurrent state flushes never completed (sled flush_async lock-up)")
            }
        }
    }

    /// The terminal event of an update is queued as often as restarts need
    /// under one sequence number; its number is never handed out again.
    #[tokio::test]
    async fn a_final_event_queued_again_is_one_event_and_keeps_its_number() {
        let d = tempfile::tempdir().unwrap();
        let ev = {
            let s = State::open(d.path()).unwrap();
            let ev = s
                .new_event("u", EventKind::Committed, Default::default())
                .await
                .unwrap();
            s.put_event(&ev).await.unwrap();
            s.put_event(&ev).await.unwrap();
            ev
        };
        let s = State::open(d.path()).unwrap();
        s.put_event(&ev).await.unwrap();
        let p = s.pending_events(10);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].seq, p[0].kind, p[0].at.as_str()),
            (ev.seq, ev.kind, ev.at.as_str())
        );
        let next = s
            .push_event("u2", EventKind::DownloadStarted, Default::default())
            .await
            .unwrap();
        assert!(next.seq > ev.seq, "{} reused after {}", next.seq, ev.seq);
    }

    #[tokio::test]
    async fn seq_survives_reopen_and_progress_coalesces() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = State::open(d.path()).unwrap();
            let e1 = s
                .push_event("u", EventKind::DownloadStarted, Default::default())
                .await
                .unwrap();
            s.push_event("u", EventKind::Progress, Default::default())
                .await
                .unwrap();
            let e3 = s
                .push_event("u", EventKind::Progress, Default::default())
                .await
                .unwrap();
            assert_eq!((e1.seq, e3.seq), (1, 3));
            let p = s.pending_events(10);
            assert_eq!(p.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3]);
            s.ack_events(&[1, 3]).await.unwrap();
            assert_eq!(s.outbox_len(), 0);
        }
        let s = State::open(d.path()).unwrap();
        let e = s
            .push_event("u", EventKind::Downloaded, Default::default())
            .await
            .unwrap();
        assert_eq!(e.seq, 4, "the counter never goes back");
    }

    #[tokio::test]
    async fn done_ops_are_per_payload() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let p1 = Digest::of(b"1");
        let p2 = Digest::of(b"2");
        s.mark_done(&p1, &[3, 1, 2]).await.unwrap();
        s.mark_done(&p2, &[7]).await.unwrap();
        assert_eq!(s.done_ops(&p1).unwrap(), vec![1, 2, 3]);
        s.unmark(&p1, &[2]).await.unwrap();
        assert_eq!(s.done_ops(&p1).unwrap(), vec![1, 3]);
        s.drop_progress_except(Some(&p2)).await.unwrap();
        assert!(s.done_ops(&p1).unwrap().is_empty());
        assert_eq!(s.done_ops(&p2).unwrap(), vec![7]);
    }
}
