//! The chunk pool against a lying, flaky artifact server (real HTTP on
//! 127.0.0.1, real files): every fault ends in the correct image or in a
//! clear error, never in wrong bytes recorded as applied. Plus cancellation:
//! prompt, and no task left behind.

mod common;

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use ota_agent::pool::{self, PoolConfig, PoolError, PoolStats};
use ota_delta::apply::{hash_range, verify_operation_output};
use tokio_util::sync::CancellationToken;

struct Outcome {
    result: Result<(), PoolError>,
    stats: Arc<PoolStats>,
    applied: Vec<usize>,
    dest: File,
    elapsed: Duration,
}

fn cfg() -> PoolConfig {
    PoolConfig {
        parallel: 4,
        range_size: 64 << 10,
        memory_budget: 20 << 20,
        stall_timeout: Duration::from_millis(400),
        attempts: 6,
        bandwidth_limit: 0,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(1200),
    }
}

async fn run_pool(
    fx: &Fixture,
    server: &Server,
    cfg: &PoolConfig,
    cancel: &CancellationToken,
) -> Outcome {
    let todo: Vec<usize> = (0..fx.manifest.operations.len()).collect();
    run_pool_todo(fx, server, cfg, cancel, &todo).await
}

async fn run_pool_todo(
    fx: &Fixture,
    server: &Server,
    cfg: &PoolConfig,
    cancel: &CancellationToken,
    todo: &[usize],
) -> Outcome {
    let Slots {
        dir: _dir,
        source,
        dest,
    } = fx.slots();
    let client = server.pool_client(cfg.stall_timeout);
    let offer = fx.offer("u");
    let manifest = Arc::new(fx.manifest.clone());
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let collect = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(i) = rx.recv().await {
            v.push(i);
        }
        v
    });
    let stats = Arc::new(PoolStats::default());
    let t = Instant::now();
    let result = pool::run(
        &client,
        &offer.payload_url,
        manifest,
        todo,
        dest.clone(),
        fx.manifest.from.as_ref().map(|_| source),
        cfg,
        cancel,
        tx,
        stats.clone(),
    )
    .await;
    let elapsed = t.elapsed();
    let applied = collect.await.unwrap();
    let dest = Arc::try_unwrap(dest).expect("the pool keeps no reference to the slot");
    Outcome {
        result,
        stats,
        applied,
        dest,
        elapsed,
    }
}

/// Whatever happened: every operation reported applied holds exactly its
/// expected bytes, no task is alive, and on success the image is right.
fn check_never_wrong(fx: &Fixture, o: &Outcome, case: &str) {
    assert_eq!(
        o.stats.live_tasks.load(Ordering::SeqCst),
        0,
        "{case}: task leaked"
    );
    assert!(
        o.stats.peak_tasks.load(Ordering::SeqCst) <= 4,
        "{case}: more than N tasks"
    );
    for &i in &o.applied {
        let op = &fx.manifest.operations[i];
        assert!(
            verify_operation_output(op, &o.dest).unwrap(),
            "{case}: operation {i} reported applied but its extent is wrong"
        );
    }
    if o.result.is_ok() {
        assert_eq!(
            hash_range(&o.dest, 0, fx.new.len() as u64).unwrap(),
            fx.manifest.to.sha256,
            "{case}: pool succeeded but the image is wrong"
        );
        let mut all = o.applied.clone();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), fx.manifest.operations.len(), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_in_the_right_image_or_a_clear_error() {
    let fx = Fixture::noisy(2 << 20, 128 << 10, false);
    let full = Fixture::noisy(2 << 20, 128 << 10, true);
    let server = Server::start(&[&fx, &full]).await;
    let cancel = CancellationToken::new();

    // The delta's BSDIFF operations come in compression frames: the faults
    // below hit frames too.
    assert!(fx.frame_groups() > 0, "the fixture must exercise frames");

    // Clean run first: the baseline.
    let o = run_pool(&fx, &server, &cfg(), &cancel).await;
    assert!(o.result.is_ok(), "{:?}", o.result);
    check_never_wrong(&fx, &o, "clean");

    // Transient faults (a limited number): the pool must recover.
    let transient = [
        ("cut after 10 KiB", Fault::CutAfter(10_000), 2, 12),
        ("stall after 5 KiB", Fault::StallAfter(5_000), 3, 3),
        ("503 Retry-After", Fault::Unavailable, 2, 4),
        ("500", Fault::ServerError, 2, 6),
        ("200 to a Range request", Fault::IgnoreRange, 2, 4),
        ("206 at the wrong offset", Fault::WrongOffset(4096), 2, 4),
        ("corrupted bytes", Fault::Corrupt, 2, 6),
        ("short body", Fault::Short, 2, 4),
    ];
    for (case, fault, every, count) in transient {
        for f in [&fx, &full] {
            server.set_fault(fault, every, count);
            let o = run_pool(f, &server, &cfg(), &cancel).await;
            assert!(o.result.is_ok(), "{case}: {:?}", o.result);
            check_never_wrong(f, &o, case);
            if std::ptr::eq(f, &full) {
                assert!(
                    o.stats.retries.load(Ordering::SeqCst) > 0,
                    "{case}: fault not hit"
                );
            }
            if fault == Fault::Unavailable && std::ptr::eq(f, &full) {
                assert!(
                    o.elapsed >= Duration::from_millis(900),
                    "{case}: Retry-After ignored"
                );
            }
        }
    }

    // Persistent lies: a clear error naming the problem, nothing wrong written.
    let persistent = [
        ("200 to a Range request", Fault::IgnoreRange, "200"),
        (
            "206 at the wrong offset",
            Fault::WrongOffset(4096),
            "the 206 holds",
        ),
        ("corrupted bytes", Fault::Corrupt, "sha256"),
        (
            "cut connections",
            Fault::CutAfter(1000),
            "connection|request failed",
        ),
    ];
    for (case, fault, needle) in persistent {
        server.set_fault(fault, 1, u64::MAX);
        let o = run_pool(&full, &server, &cfg(), &cancel).await;
        let e = o
            .result
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            matches!(o.result, Err(PoolError::GaveUp { .. }))
                && needle.split('|').any(|n| e.contains(n)),
            "{case}: {e}"
        );
        check_never_wrong(&full, &o, case);
    }
    server.set_fault(Fault::None, 1, 0);

    // A 404 is not retried.
    let mut bad = fx.offer("u");
    bad.payload_url = "/api/v1/artifacts/00".into();
    let client = server.pool_client(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let dest = Arc::new(File::create(dir.path().join("d")).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let r = pool::run(
        &client,
        &bad.payload_url,
        Arc::new(full.manifest.clone()),
        &[0, 1, 2],
        dest,
        None::<Arc<File>>,
        &cfg(),
        &cancel,
        tx,
        Arc::new(PoolStats::default()),
    )
    .await;
    assert!(
        matches!(&r, Err(PoolError::Fatal { reason, .. }) if reason.contains("404")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_is_prompt_and_leaves_no_task() {
    let fx = Fixture::noisy(4 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    for (case, fault) in [
        ("slow server", Fault::None),
        ("stalled connections", Fault::StallAfter(1000)),
    ] {
        // ~0.3 MB/s per connection: the download takes seconds.
        server.srv.throttle_us.store(50_000, Ordering::SeqCst);
        server.set_fault(fault, 1, u64::MAX);
        let mut c = cfg();
        c.stall_timeout = Duration::from_secs(30);
        let cancel = CancellationToken::new();
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t = Instant::now();
                cancel.cancel();
                t
            })
        };
        let o = run_pool(&fx, &server, &c, &cancel).await;
        let cancelled_at = canceller.await.unwrap();
        let took = cancelled_at.elapsed();
        assert!(
            matches!(o.result, Err(PoolError::Cancelled)),
            "{case}: {:?}",
            o.result
        );
        assert!(
            took < Duration::from_secs(1),
            "{case}: cancel took {took:?}"
        );
        assert!(
            o.applied.len() < fx.manifest.operations.len(),
            "{case}: finished before cancel"
        );
        check_never_wrong(&fx, &o, case);
        eprintln!(
            "{case}: returned {took:?} after cancel, {} ops applied",
            o.applied.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_is_honoured() {
    let fx = Fixture::noisy(2 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    let mut c = cfg();
    let cap = 2u64 << 20; // 2 MiB/s
    c.bandwidth_limit = cap;
    let o = run_pool(&fx, &server, &c, &CancellationToken::new()).await;
    assert!(o.result.is_ok(), "{:?}", o.result);
    check_never_wrong(&fx, &o, "capped");
    let rate = fx.payload.len() as f64 / o.elapsed.as_secs_f64();
    eprintln!(
        "payload {} bytes in {:?}: {:.0} B/s under a cap of {cap} B/s",
        fx.payload.len(),
        o.elapsed,
        rate
    );
    // The bucket allows a burst of a quarter second.
    assert!(rate <= cap as f64 * 1.3, "{rate} B/s over the cap");
}

/// A resumed update whose frame is partly applied: the frame is fetched and
/// decoded again, and only its pending members are applied and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_partly_applied_resumes_with_its_pending_members_only() {
    let fx = Fixture::noisy(2 << 20, 128 << 10, false);
    let server = Server::start(&[&fx]).await;
    let cancel = CancellationToken::new();
    let frame = ota_delta::apply::groups(&fx.manifest)
        .into_iter()
        .find(|g| ota_delta::apply::is_frame_group(&fx.manifest, g))
        .expect("the fixture has a frame");
    // Its first member (and every other operation but the frame's) done.
    let todo: Vec<usize> = frame[1..].to_vec();
    let o = run_pool_todo(&fx, &server, &cfg(), &cancel, &todo).await;
    assert!(o.result.is_ok(), "{:?}", o.result);
    let mut applied = o.applied.clone();
    applied.sort();
    assert_eq!(applied, todo, "exactly the pending members are applied");
    for &i in &todo {
        assert!(
            verify_operation_output(&fx.manifest.operations[i], &o.dest).unwrap(),
            "member {i} holds the wrong bytes"
        );
    }
    let frame_len = fx.manifest.operations[frame[0]].data.unwrap().length;
    assert_eq!(
        o.stats.bytes_received.load(Ordering::SeqCst),
        frame_len,
        "the frame is fetched once for all its pending members"
    );
}
