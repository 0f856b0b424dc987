//! The bounded concurrent chunk pool: fetches operations' data with HTTP
//! Range requests, verifies each operation's bytes, and applies them straight
//! into the destination slot.
//!
//! # Units
//!
//! The operations still to do are grouped into **units**, the pool's unit of
//! work and of concurrency:
//!
//! - operations with data are grouped by their data range (operations that
//!   share one identical range form one group, fetched once and applied to
//!   each of them: a compression frame's members are decoded once and
//!   applied in turn, `ota_delta::apply::apply_group`; on resume only the
//!   pending members, the frame fetched whole); groups adjacent in the payload are coalesced into one
//!   unit up to `range_size` bytes, so tiny operations do not become tiny
//!   requests; a group larger than `range_size` is fetched as several
//!   sequential requests of at most `range_size`;
//! - operations without data (`COPY`, `ZERO`) are grouped into local units
//!   of up to `range_size` destination bytes.
//!
//! At most `parallel` units run at once (a semaphore; a unit task is only
//! spawned once it holds a permit, so the pool never has more than
//! `parallel` tasks). Every operation's data is buffered whole, checked
//! against its sha256, and only then applied at its destination extent: no
//! byte that failed a check is written, and nothing is staged on disk. A
//! byte budget counted with the engine's `group_work` (as the offline
//! `apply_image` counts it) bounds the memory of the
//! operations being buffered and applied at once; a frame's reservation is
//! cut to what its header declares (`group_work_of`) once its bytes are in,
//! before it is decoded. It is then applied by the fastest of the engine's
//! `frame_plans` (members while the frame decodes, two at a time, ...)
//! whose memory fits the reservation or what can be added without waiting
//! (`choose_frame_plan` with `try_acquire`): no task ever waits while
//! holding part of the budget.
//!
//! # Faults
//!
//! A `200` to a Range request, a `206` whose `Content-Range` does not start
//! where asked, a body longer or shorter than announced, a stalled
//! connection (`stall_timeout` without a byte), a wrong operation hash, a
//! `5xx` or `429`: each fails the current request of the unit, which is
//! retried from the first byte it still needs after an exponential backoff
//! with jitter (or the server's `Retry-After`), up to `attempts` times. A
//! wrong hash discards the whole operation's bytes. `4xx`, write errors
//! (disk full) and an operation whose output hash is wrong are fatal.
//!
//! # Cancellation
//!
//! The pool stops promptly when its token is cancelled: every network wait
//! selects on it. An operation already being applied finishes (disk writes
//! are outside the cancellable region), then its task returns. The pool
//! awaits all its tasks before returning, so none outlive it.
//!
//! Completion is reported per operation on a channel; the receiver (the
//! daemon's recorder) fsyncs the slot before recording progress.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ota_delta::apply::{
    ApplyError, FRAME_THREADS, FramePlan, apply_group, apply_operation, choose_frame_plan,
    frame_plans, group_work,
};
use ota_delta::io::{ReadAt, WriteAt};
use ota_format::Manifest;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::Client;

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Units in flight at once.
    pub parallel: usize,
    /// Target bytes of one range request.
    pub range_size: u64,
    /// Memory that buffered and applying operations may hold together.
    pub memory_budget: u64,
    /// A request with no byte for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// Attempts per unit before the pool fails.
    pub attempts: u32,
    /// Download cap in bytes per second (0: none).
    pub bandwidth_limit: u64,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff_base: Duration,
    /// Longest retry delay (also caps `Retry-After`).
    pub backoff_max: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            parallel: 4,
            range_size: 1 << 20,
            memory_budget: ota_delta::apply::APPLY_MEMORY_BUDGET,
            stall_timeout: Duration::from_secs(15),
            attempts: 8,
            bandwidth_limit: 0,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Why the pool stopped.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cancelled")]
    Cancelled,
    #[error(
        "payload bytes [{start}, {end}): gave up after {attempts} attempts; last error: {last}"
    )]
    GaveUp {
        start: u64,
        end: u64,
        attempts: u32,
        last: String,
    },
    #[error("payload bytes [{start}, {end}): {reason}")]
    Fatal {
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("applying: {0}")]
    Apply(#[from] ApplyError),
    #[error("a pool task failed: {0}")]
    Task(String),
}

/// Counters, shared with whoever wants to watch (tests, status, bench).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Payload bytes received from the network (including bytes discarded).
    pub bytes_received: AtomicU64,
    /// Payload bytes received then discarded (failed checks, cut requests).
    pub bytes_discarded: AtomicU64,
    /// Range requests sent.
    pub requests: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Unit tasks alive now (0 once the pool has returned).
    pub live_tasks: AtomicUsize,
    /// Most unit tasks ever alive at once.
    pub peak_tasks: AtomicUsize,
}

/// Decrements `live_tasks` however a task ends (return, error, panic).
struct LiveGuard(Arc<PoolStats>);
impl LiveGuard {
    fn new(stats: &Arc<PoolStats>) -> Self {
        let now = stats.live_tasks.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak_tasks.fetch_max(now, Ordering::SeqCst);
        LiveGuard(stats.clone())
    }
}
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live_tasks.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One data range and the pending operations that use it.
#[derive(Debug, Clone)]
struct Group {
    offset: u64,
    length: u64,
    ops: Vec<usize>,
    /// Every operation of the manifest that names the range, done or not
    /// (a compression frame's members: `ota_delta::apply::apply_group`).
    sharing: Arc<[usize]>,
}

#[derive(Debug, Clone)]
enum Unit {
    /// Operations without data.
    Local(Vec<usize>),
    /// Adjacent data groups: payload bytes `[groups[0].offset, end)`.
    Fetch(Vec<Group>),
}

/// Groups the pending operations into units (see the module doc).
fn plan(manifest: &Manifest, todo: &[usize], range_size: u64) -> Vec<Unit> {
    let mut sharing: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    for (i, op) in manifest.operations.iter().enumerate() {
        if let Some(d) = &op.data {
            sharing.entry(d.offset).or_default().push(i);
        }
    }
    let sharing: std::collections::HashMap<u64, Arc<[usize]>> =
        sharing.into_iter().map(|(k, v)| (k, v.into())).collect();
    let mut groups: std::collections::BTreeMap<u64, Group> = Default::default();
    let mut local: Vec<Unit> = Vec::new();
    let mut cur_local: Vec<usize> = Vec::new();
    let mut cur_local_bytes = 0u64;
    for &i in todo {
        let op = &manifest.operations[i];
        match &op.data {
            Some(d) => groups
                .entry(d.offset)
                .or_insert_with(|| Group {
                    offset: d.offset,
                    length: d.length,
                    ops: Vec::new(),
                    sharing: sharing[&d.offset].clone(),
                })
                .ops
                .push(i),
            None => {
                if !cur_local.is_empty() && cur_local_bytes + op.dst.length > range_size {
                    local.push(Unit::Local(std::mem::take(&mut cur_local)));
                    cur_local_bytes = 0;
                }
                cur_local.push(i);
                cur_local_bytes += op.dst.length;
            }
        }
    }
    if !cur_local.is_empty() {
        local.push(Unit::Local(cur_local));
    }
    let mut units = Vec::new();
    let mut cur: Vec<Group> = Vec::new();
    for g in groups.into_values() {
        let (start, end) = match (cur.first(), cur.last()) {
            (Some(f), Some(l)) => (f.offset, l.offset + l.length),
            _ => (g.offset, g.offset),
        };
        if !cur.is_empty() && (end != g.offset || g.offset + g.length - start > range_size) {
            units.push(Unit::Fetch(std::mem::take(&mut cur)));
        }
        cur.push(g);
    }
    if !cur.is_empty() {
        units.push(Unit::Fetch(cur));
    }
    // Fetches first (they wait on the network), local work interleaved.
    let mut out = Vec::with_capacity(units.len() + local.len());
    let mut local = local.into_iter();
    for (n, u) in units.into_iter().enumerate() {
        out.push(u);
        if n % 4 == 3 {
            out.extend(local.next());
        }
    }
    out.extend(local);
    out
}

/// A shared token bucket for the bandwidth cap. The lock is never held
/// across an await: [`Limiter::delay`] returns how long to sleep.
struct Limiter {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn delay(&self, n: usize) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let burst = self.rate as f64 / 4.0;
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate as f64).min(burst);
        s.1 = now;
        s.0 -= n as f64;
        (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / self.rate as f64))
    }
}

/// Everything a unit task needs.
struct Shared<D: ?Sized, S: ?Sized> {
    client: Client,
    url: String,
    manifest: Arc<Manifest>,
    dest: Arc<D>,
    source: Option<Arc<S>>,
    cfg: PoolConfig,
    memory: Arc<Semaphore>,
    memory_units: u32,
    limiter: Limiter,
    stats: Arc<PoolStats>,
    applied: mpsc::Sender<usize>,
    cancel: CancellationToken,
}

/// Runs the pool over the operations `todo` (indices into the manifest's
/// operations) and returns when all are applied, on the first fatal error,
/// or when `cancel` fires. Each applied operation's index is sent on
/// `applied` after its bytes were written (not yet synced).
///
/// # Cancel safety
/// Cancel with `cancel`, not by dropping the future: the pool then waits
/// for an operation being written to finish and returns within about the
/// time of one operation's apply. Dropping the future aborts the unit tasks
/// (the JoinSet is dropped), which may leave an extent half-written; that is
/// harmless because nothing reports it applied.
#[allow(clippy::too_many_arguments)]
pub async fn run<D, S>(
    client: &Client,
    payload_url: &str,
    manifest: Arc<Manifest>,
    todo: &[usize],
    dest: Arc<D>,
    source: Option<Arc<S>>,
    cfg: &PoolConfig,
    cancel: &CancellationToken,
    applied: mpsc::Sender<usize>,
    stats: Arc<PoolStats>,
) -> Result<(), PoolError>
where
    D: WriteAt + Send + Sync + ?Sized + 'static,
    S: ReadAt + Send + Sync + ?Sized + 'static,
{
    let units = plan(&manifest, todo, cfg.range_size);
    let span = tracing::info_span!("pool", units = units.len(), parallel = cfg.parallel);
    let cancel = cancel.child_token();
    let memory_units = (cfg.memory_budget >> 10).clamp(1, u32::MAX as u64 >> 4) as u32;
    let shared = Arc::new(Shared {
        client: client.clone(),
        url: client.url(payload_url),
        manifest,
        dest,
        source,
        cfg: cfg.clone(),
        memory: Arc::new(Semaphore::new(memory_units as usize)),
        memory_units,
        limiter: Limiter {
            rate: cfg.bandwidth_limit,
            state: Mutex::new((0.0, Instant::now())),
        },
        stats: stats.clone(),
        applied,
        cancel: cancel.clone(),
    });
    let slots = Arc::new(Semaphore::new(cfg.parallel.max(1)));
    let mut set: JoinSet<Result<(), PoolError>> = JoinSet::new();
    let mut first_err: Option<PoolError> = None;
    let note = |r: Result<Result<(), PoolError>, tokio::task::JoinError>,
                first_err: &mut Option<PoolError>| {
        let e = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(j) => PoolError::Task(j.to_string()),
        };
        cancel.cancel();
        // A real failure explains more than the cancellations it caused.
        if first_err
            .as_ref()
            .is_none_or(|f| matches!(f, PoolError::Cancelled))
        {
            *first_err = Some(e);
        }
    };
    async {
        for unit in units {
            let permit = loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break None,
                    Some(r) = set.join_next() => note(r, &mut first_err),
                    p = slots.clone().acquire_owned() => break Some(p.expect("semaphore never closed")),
                }
            };
            let Some(permit) = permit else { break };
            let shared = shared.clone();
            let guard = LiveGuard::new(&stats);
            set.spawn(
                async move {
                    // Declared first, dropped last: the slot is freed only
                    // after the task stopped counting itself alive.
                    let _permit = permit;
                    let _guard = guard;
                    match unit {
                        Unit::Local(ops) => run_local(&shared, ops).await,
                        Unit::Fetch(groups) => run_fetch(&shared, groups).await,
                    }
                }
                .in_current_span(),
            );
        }
        while let Some(r) = set.join_next().await {
            note(r, &mut first_err);
        }
    }
    .instrument(span)
    .await;
    match first_err {
        Some(e) => Err(e),
        None if cancel.is_cancelled() => Err(PoolError::Cancelled),
        None => Ok(()),
    }
}

/// Applies a group's pending operations on a blocking thread (one after
/// another; a compression frame decoded once, up to `threads` members at
/// once) and reports each one applied,
/// also those applied before an error. Not cancellable: once started, the
/// writes complete.
///
/// # Cancel safety
/// Do not cancel: it awaits blocking writes that run to completion
/// anyway; the pool never selects on it.
async fn apply_group_blocking<D, S>(
    sh: &Arc<Shared<D, S>>,
    g: &Group,
    data: Arc<Vec<u8>>,
    plan: FramePlan,
) -> Result<(), PoolError>
where
    D: WriteAt + Send + Sync + ?Sized + 'static,
    S: ReadAt + Send + Sync + ?Sized + 'static,
{
    let sh2 = sh.clone();
    let (sharing, todo) = (g.sharing.clone(), g.ops.clone());
    let (r, done) = tokio::task::spawn_blocking(move || {
        let mut done = Vec::with_capacity(todo.len());
        let r = apply_group(
            &sh2.manifest,
            &sharing,
            &todo,
            &data,
            sh2.source.as_deref(),
            &*sh2.dest,
            plan,
            |i| done.push(i),
        );
        (r, done)
    })
    .await
    .map_err(|e| PoolError::Task(e.to_string()))?;
    for i in done {
        // The receiver only goes away when the whole update is abandoned.
        let _ = sh.applied.send(i).await;
    }
    Ok(r?)
}

/// Applies one operation without data on a blocking thread and reports
/// it. Not cancellable: once started, the write completes.
///
/// # Cancel safety
/// Do not cancel: it awaits a blocking write that runs to completion
/// anyway; the pool never selects on it.
async fn apply_one<D, S>(sh: &Arc<Shared<D, S>>, i: usize) -> Result<(), PoolError>
where
    D: WriteAt + Send + Sync + ?Sized + 'static,
    S: ReadAt + Send + Sync + ?Sized + 'static,
{
    let sh2 = sh.clone();
    let r = tokio::task::spawn_blocking(move || {
        let op = &sh2.manifest.operations[i];
        apply_operation(i, op, &[], sh2.source.as_deref(), &*sh2.dest)
    })
    .await
    .map_err(|e| PoolError::Task(e.to_string()))?;
    r?;
    // The receiver only goes away when the whole update is abandoned.
    let _ = sh.applied.send(i).await;
    Ok(())
}

/// Applies a unit of operations without data (`COPY`, `ZERO`).
///
/// # Cancel safety
/// Checks the pool's token between operations; an operation started is
/// finished.
async fn run_local<D, S>(sh: &Arc<Shared<D, S>>, ops: Vec<usize>) -> Result<(), PoolError>
where
    D: WriteAt + Send + Sync + ?Sized + 'static,
    S: ReadAt + Send + Sync + ?Sized + 'static,
{
    for i in ops {
        if sh.cancel.is_cancelled() {
            return Err(PoolError::Cancelled);
        }
        apply_one(sh, i).await?;
    }
    Ok(())
}

/// One attempt's failure: whether to retry, and after how long at least.
struct AttemptError {
    reason: String,
    fatal: bool,
    retry_after: Option<Duration>,
}

fn transient(reason: impl Into<String>) -> AttemptError {
    AttemptError {
        reason: reason.into(),
        fatal: false,
        retry_after: None,
    }
}

/// Backoff before attempt `n` (1-based count of failures): exponential from
/// `base`, capped, with full jitter in its upper half so a fleet that failed
/// together does not retry together.
pub fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << n.min(16).saturating_sub(1))
        .min(max);
    let half = exp / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Fetches and applies one unit, retrying failed requests.
///
/// # Cancel safety
/// Stops at the pool's token (network waits and backoff sleeps select on
/// it); buffered bytes of an unfinished operation are discarded, never
/// written.
async fn run_fetch<D, S>(sh: &Arc<Shared<D, S>>, groups: Vec<Group>) -> Result<(), PoolError>
where
    D: WriteAt + Send + Sync + ?Sized + 'static,
    S: ReadAt + Send + Sync + ?Sized + 'static,
{
    let start = groups[0].offset;
    let end = groups.last().map(|g| g.offset + g.length).unwrap_or(start);
    let mut st = FetchState {
        next_group: 0,
        buf: Vec::new(),
        permit: None,
    };
    let mut failures = 0u32;
    while st.next_group < groups.len() {
        let r = fetch_attempt(sh, &groups, end, &mut st).await;
        match r {
            Ok(()) => {}
            Err(Step::Cancelled) => return Err(PoolError::Cancelled),
            Err(Step::Fatal(e)) => return Err(e),
            Err(Step::Attempt(e)) => {
                failures += 1;
                if e.fatal {
                    return Err(PoolError::Fatal {
                        start,
                        end,
                        reason: e.reason,
                    });
                }
                if failures >= sh.cfg.attempts {
                    return Err(PoolError::GaveUp {
                        start,
                        end,
                        attempts: failures,
                        last: e.reason,
                    });
                }
                sh.stats.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff(sh.cfg.backoff_base, sh.cfg.backoff_max, failures)
                    .max(e.retry_after.unwrap_or_default().min(sh.cfg.backoff_max));
                tracing::warn!(
                    start,
                    end,
                    attempt = failures,
                    wait_ms = wait.as_millis() as u64,
                    "range failed, retrying: {}",
                    e.reason
                );
                tokio::select! {
                    _ = sh.cancel.cancelled() => return Err(PoolError::Cancelled),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    Ok(())
}

/// Progress of a unit across attempts: groups done, and the bytes of the
/// current group received so far (kept across a cut connection, discarded
/// on a hash mismatch).
struct FetchState {
    next_group: usize,
    buf: Vec<u8>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum Step {
    Cancelled,
    Fatal(PoolError),
    Attempt(AttemptError),
}

impl From<AttemptError> for Step {
    fn from(e: AttemptError) -> Self {
        Step::Attempt(e)
    }
}

/// Parses `Content-Range: bytes a-b/total`.
fn content_range(h: &reqwest::header::HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = h.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok(),
    ))
}

/// One Range request for the unit, from the first byte it still needs.
///
/// # Cancel safety
/// Selects on the pool's token at every network wait; applies (disk
/// writes) are awaited to completion.
async fn fetch_attempt<D, S>(
    sh: &Arc<Shared<D, S>>,
    groups: &[Group],
    end: u64,
    st: &mut FetchState,
) -> Result<(), Step>
where
    D: WriteAt + Send + Sync + ?Sized + 'static,
    S: ReadAt + Send + Sync + ?Sized + 'static,
{
    let pos = groups[st.next_group].offset + st.buf.len() as u64;
    let req_end = end.min(pos + sh.cfg.range_size);
    sh.stats.requests.fetch_add(1, Ordering::Relaxed);
    let rb = sh
        .client
        .http()
        .get(&sh.url)
        .header(
            reqwest::header::RANGE,
            format!("bytes={pos}-{}", req_end - 1),
        )
        .header(reqwest::header::ACCEPT_ENCODING, "identity");
    let send = sh.client.authorize(rb).send();
    let resp = tokio::select! {
        _ = sh.cancel.cancelled() => return Err(Step::Cancelled),
        r = tokio::time::timeout(sh.cfg.stall_timeout, send) => match r {
            Err(_) => return Err(transient(format!("no answer within {:?}", sh.cfg.stall_timeout)).into()),
            Ok(Err(e)) => return Err(transient(format!("request failed: {}", chain(&e))).into()),
            Ok(Ok(r)) => r,
        },
    };
    let status = resp.status().as_u16();
    match status {
        206 => {}
        200 => {
            return Err(transient(
                "server answered 200 (whole file) to a Range request: ignored, never written",
            )
            .into());
        }
        408 | 429 | 500..=599 => {
            return Err(AttemptError {
                reason: format!("server answered {status}"),
                fatal: false,
                retry_after: crate::client::retry_after(resp.headers()),
            }
            .into());
        }
        _ => {
            return Err(AttemptError {
                reason: format!("server answered {status} to bytes={pos}-{}", req_end - 1),
                fatal: true,
                retry_after: None,
            }
            .into());
        }
    }
    let Some((a, b, total)) = content_range(resp.headers()) else {
        return Err(transient("206 without a valid Content-Range: ignored").into());
    };
    if a != pos || b < a || b >= req_end {
        return Err(transient(format!(
            "asked for bytes {pos}-{}, the 206 holds {a}-{b}: ignored, never written",
            req_end - 1
        ))
        .into());
    }
    if total.is_some_and(|t| t != sh.manifest.payload.size) {
        return Err(AttemptError {
            reason: format!(
                "the server's payload is {} bytes, the manifest says {}",
                total.unwrap_or(0),
                sh.manifest.payload.size
            ),
            fatal: true,
            retry_after: None,
        }
        .into());
    }
    let resp_end = b + 1;
    let mut at = pos;
    let mut resp = resp;
    while at < resp_end {
        let chunk = tokio::select! {
            _ = sh.cancel.cancelled() => {
                discard(sh, st);
                return Err(Step::Cancelled);
            }
            r = tokio::time::timeout(sh.cfg.stall_timeout, resp.chunk()) => match r {
                Err(_) => return Err(transient(format!("stalled: no byte for {:?} at offset {at}", sh.cfg.stall_timeout)).into()),
                Ok(Err(e)) => return Err(transient(format!("connection failed at offset {at}: {}", chain(&e))).into()),
                Ok(Ok(None)) => return Err(transient(format!("short body: ended at offset {at}, expected {resp_end}")).into()),
                Ok(Ok(Some(c))) => c,
            },
        };
        sh.stats
            .bytes_received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if at + chunk.len() as u64 > resp_end {
            sh.stats
                .bytes_discarded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            return Err(transient("body longer than its Content-Range: ignored").into());
        }
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            let g = &groups[st.next_group];
            if st.permit.is_none() {
                // Memory for this range's data and its apply work, as the
                // engine bounds it (`group_work`): the group's operations
                // are applied one after another (a frame decoded once).
                let work = group_work(&sh.manifest, &g.sharing);
                let need = (((g.length + work) >> 10) as u32 + 1).min(sh.memory_units);
                let p = tokio::select! {
                    _ = sh.cancel.cancelled() => return Err(Step::Cancelled),
                    p = sh.memory.clone().acquire_many_owned(need) => p.expect("semaphore never closed"),
                };
                st.permit = Some(p);
                st.buf.reserve_exact(g.length as usize);
            }
            let take = ((g.length - st.buf.len() as u64) as usize).min(rest.len());
            st.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            at += take as u64;
            if st.buf.len() as u64 == g.length {
                // `apply_operation` checks the data's sha256 before it
                // writes anything, so hashing here too would only cost a
                // pass over every byte.
                // A frame's header says what it needs: the fastest plan
                // (streamed, members two at a time, ...) that fits what is
                // held or can be added without waiting (no hold-and-wait);
                // the rest of the reservation goes back before applying.
                let units = |work: u64| (((g.length + work) >> 10) as u32 + 1).min(sh.memory_units);
                let plans: Vec<_> = frame_plans(&sh.manifest, &g.sharing, &st.buf, FRAME_THREADS)
                    .into_iter()
                    .map(|(p, w)| (p, u64::from(units(w))))
                    .collect();
                let mut plan = FramePlan::ONE;
                if let Some(p) = &mut st.permit {
                    let held = p.num_permits() as u64;
                    let keep;
                    (plan, keep) = choose_frame_plan(
                        &plans,
                        held,
                        u64::from(sh.memory_units),
                        |more| match sh.memory.clone().try_acquire_many_owned(more as u32) {
                            Ok(more) => {
                                p.merge(more);
                                true
                            }
                            Err(_) => false,
                        },
                    );
                    if plans.len() > 1 {
                        tracing::debug!(
                            offset = g.offset,
                            members = g.sharing.len(),
                            threads = plan.threads,
                            streamed = plan.streamed,
                            kib = keep,
                            "frame plan"
                        );
                    }
                    if (p.num_permits() as u64) > keep {
                        drop(p.split(p.num_permits() - keep as usize));
                    }
                }
                let data = Arc::new(std::mem::take(&mut st.buf));
                {
                    match apply_group_blocking(sh, g, data.clone(), plan).await {
                        Ok(()) => {}
                        Err(PoolError::Apply(ApplyError::DataHash {
                            expected, actual, ..
                        })) => {
                            sh.stats
                                .bytes_discarded
                                .fetch_add(g.length, Ordering::Relaxed);
                            st.permit = None;
                            return Err(transient(format!(
                                "data at payload offset {} has sha256 {actual}, the manifest says {expected}: discarded, never written",
                                g.offset
                            ))
                            .into());
                        }
                        Err(e) => return Err(Step::Fatal(e)),
                    }
                }
                drop(data);
                st.permit = None;
                st.next_group += 1;
            }
        }
        if let Some(d) = sh.limiter.delay(chunk.len()) {
            tokio::select! {
                _ = sh.cancel.cancelled() => return Err(Step::Cancelled),
                _ = tokio::time::sleep(d) => {}
            }
        }
    }
    Ok(())
}

/// An error and its causes on one line (reqwest's Display shows only the top).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn discard<D: ?Sized, S: ?Sized>(sh: &Shared<D, S>, st: &mut FetchState) {
    sh.stats
        .bytes_discarded
        .fetch_add(st.buf.len() as u64, Ordering::Relaxed);
    st.buf = Vec::new();
    st.permit = None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use ota_format::{DataRange, Digest, Extent, ImageRef, OpKind, Operation, PayloadInfo};

    fn op(dst: u64, data: Option<(u64, u64)>) -> Operation {
        Operation {
            kind: if data.is_some() {
                OpKind::Replace
            } else {
                OpKind::Zero
            },
            dst: Extent::new(dst, 10),
            src: vec![],
            src_sha256: None,
            data: data.map(|(offset, length)| DataRange {
                offset,
                length,
                sha256: Digest::of(&offset.to_le_bytes()),
            }),
            dst_sha256: Digest::default(),
        }
    }

    fn manifest(ops: Vec<Operation>) -> Manifest {
        let d = Digest::default();
        Manifest {
            format_version: 1,
            device_type: "t".into(),
            from: None,
            to: ImageRef {
                version: "1".into(),
                size: 10 * ops.len() as u64,
                sha256: d,
            },
            security_counter: 0,
            expires_at: "2099-01-01T00:00:00Z".into(),
            payload: PayloadInfo { size: 0, sha256: d },
            codecs: vec![],
            operations: ops,
        }
    }

    #[test]
    fn adjacent_data_is_coalesced_shared_data_fetched_once() {
        let m = manifest(vec![
            op(0, Some((0, 100))),
            op(10, Some((100, 100))),
            op(20, None),
            op(30, Some((200, 500))),
            op(40, Some((100, 100))), // shares op 1's data
            op(50, Some((700, 100))),
        ]);
        let units = plan(&m, &[0, 1, 2, 3, 4, 5], 300);
        let fetches: Vec<Vec<(u64, Vec<usize>)>> = units
            .iter()
            .filter_map(|u| match u {
                Unit::Fetch(g) => Some(g.iter().map(|g| (g.offset, g.ops.clone())).collect()),
                _ => None,
            })
            .collect();
        assert_eq!(
            fetches,
            vec![
                vec![(0, vec![0]), (100, vec![1, 4])],
                vec![(200, vec![3])],
                vec![(700, vec![5])]
            ]
        );
        assert!(
            units
                .iter()
                .any(|u| matches!(u, Unit::Local(v) if v == &vec![2]))
        );
        // Resume: op 1 done but op 4 (same data) not: the range is still fetched.
        let units = plan(&m, &[4], 300);
        assert!(matches!(&units[..], [Unit::Fetch(g)] if g[0].ops == vec![4]));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(2);
        for n in 1..20 {
            let d = backoff(b, m, n);
            assert!(d <= m, "{d:?}");
        }
        assert!(backoff(b, m, 1) <= b);
        assert!(backoff(b, m, 5) >= Duration::from_millis(800));
    }
}
