//! `RedisThrottle` against a real `redis-server`: every test starts its own
//! throwaway server (no persistence, temp dir, free port) and kills it when
//! done. Without the binary the tests print a skip line and pass, unless
//! `OTA_REQUIRE_SERVICES=1` (CI), where they fail.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ota_server::rollout::redis_throttle::{RedisThrottle, connect};
use ota_server::rollout::shared::{Bucket, FleetThrottle, HeldLease, ThrottleError};
use ota_server::rollout::throttle::{Admission, Limits, WaitReason};
use tokio::task::JoinSet;

const R: &str = "r1";

/// A `redis-server` of our own; killed on drop.
struct RedisServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_server(bin: &Path, dir: &Path, port: u16) -> Child {
    Command::new(bin)
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server")
}

/// Waits until *our* server answers on its port: `INFO server` must show
/// the child's pid, so a port grabbed by another test's server is noticed.
async fn ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("redis://127.0.0.1:{port}/");
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false; // could not bind, most likely
        }
        if let Ok(mut con) = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
        {
            let info: redis::RedisResult<String> =
                redis::cmd("INFO").arg("server").query_async(&mut con).await;
            if let Ok(info) = info {
                return info.contains(&format!("process_id:{}\r", child.id()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

impl RedisServer {
    /// Starts a server, or `None` (after a skip line) if there is no binary.
    async fn start(test: &str) -> Option<RedisServer> {
        let Some(bin) = find_redis_server() else {
            if std::env::var("OTA_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("redis-server not found and OTA_REQUIRE_SERVICES=1");
            }
            println!("SKIP {test}: redis-server not found (install redis-server to run it)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn_server(&bin, dir.path(), port);
            if ready(&mut child, port).await {
                return Some(RedisServer {
                    bin,
                    dir,
                    port,
                    child,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// kill -9, then a new empty server on the same port.
    async fn restart_empty(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = spawn_server(&self.bin, self.dir.path(), self.port);
            if ready(&mut self.child, self.port).await {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            assert!(Instant::now() < deadline, "redis-server did not restart");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn flushall(&self) {
        let mut con = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
    }
}

macro_rules! redis_or_skip {
    ($test:expr) => {
        match RedisServer::start($test).await {
            Some(s) => s,
            None => return,
        }
    };
}

fn limits(cap: u64, rate: f64, lease_ms: u64) -> Limits {
    Limits {
        max_concurrent: cap,
        starts_per_min: rate,
        lease_ms,
        stale_after_ms: 60_000,
    }
}

/// Two "replicas": separate connections to the same Redis.
async fn replicas(srv: &RedisServer) -> (RedisThrottle, RedisThrottle) {
    let a = connect(&srv.url(), "ota").await.unwrap();
    let b = connect(&srv.url(), "ota").await.unwrap();
    (a, b)
}

/// Creates a new rollout's state (its bucket holds one burst).
async fn create(t: &RedisThrottle, lease_ms: u64) {
    t.rebuild(R, &[], lease_ms, 0, Bucket::Full).await.unwrap();
}

fn granted(a: Admission) -> u64 {
    match a {
        Admission::Granted { fence } => fence,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn wait_reason(a: Admission) -> WaitReason {
    match a {
        Admission::Wait { reason, .. } => reason,
        other => panic!("expected a wait, got {other:?}"),
    }
}

fn is_lost<T: std::fmt::Debug>(r: Result<T, ThrottleError>) -> bool {
    match r {
        Err(ThrottleError::Lost(id)) => {
            assert_eq!(id, R);
            true
        }
        Err(ThrottleError::Backend(_)) => false,
        Ok(v) => panic!("expected Lost, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_is_never_exceeded_by_two_replicas_admitting_and_releasing_concurrently() {
    let srv = redis_or_skip!("cap_is_never_exceeded");
    let (a, b) = replicas(&srv).await;
    const CAP: u64 = 5;
    create(&a, 30_000).await;
    let l = limits(CAP, 1e9, 30_000);
    // Devices counted between their grant and their release: a lower bound
    // of the leases held, so it must stay under the cap too.
    let in_flight = Arc::new(AtomicU64::new(0));
    let max_in_flight = Arc::new(AtomicU64::new(0));
    let max_active = Arc::new(AtomicU64::new(0));
    let grants = Arc::new(AtomicU64::new(0));
    let cap_waits = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for task in 0..16usize {
        let reps = [a.clone(), b.clone()];
        let (in_flight, max_in_flight, max_active, grants, cap_waits) = (
            in_flight.clone(),
            max_in_flight.clone(),
            max_active.clone(),
            grants.clone(),
            cap_waits.clone(),
        );
        tasks.spawn(async move {
            for i in 0..120usize {
                let d = format!("d{task}-{}", i % 6);
                // Admit through one replica, check and release through the
                // other.
                let (x, y) = (&reps[(task + i) % 2], &reps[(task + i + 1) % 2]);
                match x.try_admit(R, &d, "u1", l).await.unwrap() {
                    Admission::Granted { fence } => {
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max_in_flight.fetch_max(n, Ordering::SeqCst);
                        grants.fetch_add(1, Ordering::SeqCst);
                        let s = y.stats(R).await.unwrap();
                        max_active.fetch_max(s.active, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        assert!(y.release(R, &d, fence).await.unwrap());
                    }
                    Admission::Wait { reason, .. } => {
                        if reason == WaitReason::ConcurrencyCap {
                            cap_waits.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let grants = grants.load(Ordering::SeqCst);
    println!(
        "grants {grants}, max active {}, max in flight {}, cap waits {}",
        max_active.load(Ordering::SeqCst),
        max_in_flight.load(Ordering::SeqCst),
        cap_waits.load(Ordering::SeqCst)
    );
    assert!(max_active.load(Ordering::SeqCst) <= CAP);
    assert!(max_in_flight.load(Ordering::SeqCst) <= CAP);
    // Not vacuous: the cap was actually reached and work got done.
    assert!(cap_waits.load(Ordering::SeqCst) > 0);
    assert!(grants >= 100, "only {grants} grants");
    let s = b.stats(R).await.unwrap();
    assert_eq!(s.active, 0);
    assert_eq!(s.granted, grants);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_rate_stays_within_one_token_over_any_window() {
    let srv = redis_or_skip!("start_rate_stays_within_one_token");
    let (a, b) = replicas(&srv).await;
    // 100 per minute: burst 1, one start every 0.6 s.
    const RATE: f64 = 100.0;
    const RUN: Duration = Duration::from_millis(3600);
    // Nobody asks for a while: the bucket fills, but only up to the burst,
    // which the first window after the pause must show.
    const PAUSE: (Duration, Duration) = (Duration::from_millis(1400), Duration::from_millis(2800));
    let l = limits(1000, RATE, 60_000);
    let t0 = Instant::now();
    // Empty, as after a loss, so the whole run is paced by the rate.
    a.rebuild(R, &[], 60_000, 0, Bucket::Empty).await.unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    for task in 0..6usize {
        let rep = if task % 2 == 0 { a.clone() } else { b.clone() };
        let starts = starts.clone();
        tasks.spawn(async move {
            // A device polls until admitted; then a new one takes its place.
            let mut n = 0;
            while t0.elapsed() < RUN {
                if (PAUSE.0..PAUSE.1).contains(&t0.elapsed()) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let d = format!("w{task}-{n}");
                if let Admission::Granted { .. } = rep.try_admit(R, &d, "u", l).await.unwrap() {
                    starts.lock().unwrap().push(t0.elapsed().as_secs_f64());
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let total = t0.elapsed().as_secs_f64();
    let mut starts = starts.lock().unwrap().clone();
    starts.sort_by(f64::total_cmp);
    let per_s = RATE / 60.0;
    println!("{} starts in {total:.2} s: {starts:.3?}", starts.len());
    // The bucket starts empty: over the run, at most rate × t (one token of
    // slack for the two clocks).
    assert!(starts.len() as f64 <= per_s * total + 1.0);
    // Any window [t_i, t_j] holds at most rate × (t_j - t_i) + burst (1)
    // starts; 50 ms of slack for when the answers were observed.
    for i in 0..starts.len() {
        for j in i..starts.len() {
            let n = (j - i + 1) as f64;
            let bound = per_s * (starts[j] - starts[i] + 0.05) + 1.0;
            assert!(
                n <= bound,
                "{n} starts between {:.3} s and {:.3} s",
                starts[i],
                starts[j]
            );
        }
    }
    // Nor is it starved: the tokens of the time spent asking, give or take
    // one (the pause adds at most one).
    let asking = total - (PAUSE.1 - PAUSE.0).as_secs_f64();
    assert!(
        starts.len() as f64 >= (per_s * asking).floor() - 1.0,
        "only {} starts",
        starts.len()
    );
    assert_eq!(a.stats(R).await.unwrap().granted, starts.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_fence_cannot_renew_or_release_a_newer_lease() {
    let srv = redis_or_skip!("an_old_fence_cannot_renew_or_release_a_newer_lease");
    let (a, b) = replicas(&srv).await;
    create(&a, 1000).await;
    let l = limits(1, 1e6, 1000);
    let f1 = granted(a.try_admit(R, "dev", "u1", l).await.unwrap());
    // Asking again (a replica retrying) returns the same lease, never a
    // second one; asking for another update while holding one waits.
    assert_eq!(granted(b.try_admit(R, "dev", "u1", l).await.unwrap()), f1);
    assert_eq!(
        wait_reason(b.try_admit(R, "dev", "u2", l).await.unwrap()),
        WaitReason::ConcurrencyCap
    );
    assert_eq!(a.stats(R).await.unwrap().active, 1);
    // Renewal only moves the deadline forward.
    assert!(b.renew(R, "dev", f1, 1000).await.unwrap());
    assert!(b.renew(R, "dev", f1, 1).await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        a.renew(R, "dev", f1, 1).await.unwrap(),
        "deadline moved back"
    );
    // Past the deadline: not renewable, no longer counted (another device
    // may take the slot), but the device cannot be granted again before the
    // reaper saw its old lease.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!a.renew(R, "dev", f1, 1000).await.unwrap());
    assert_eq!(a.stats(R).await.unwrap().active, 0);
    assert_eq!(
        wait_reason(a.try_admit(R, "dev", "u1", l).await.unwrap()),
        WaitReason::ConcurrencyCap
    );
    let other = granted(b.try_admit(R, "other", "u1", l).await.unwrap());
    assert!(other > f1);
    assert!(b.release(R, "other", other).await.unwrap());
    assert_eq!(
        b.reap(R).await.unwrap(),
        vec![HeldLease {
            device: "dev".into(),
            update_id: "u1".into(),
            fence: f1,
        }]
    );
    // The device's new lease: the old fence is powerless against it.
    let f2 = granted(a.try_admit(R, "dev", "u1", l).await.unwrap());
    assert!(f2 > other);
    assert!(!a.renew(R, "dev", f1, 1000).await.unwrap());
    assert!(!b.release(R, "dev", f1).await.unwrap());
    assert_eq!(a.stats(R).await.unwrap().active, 1);
    assert!(a.renew(R, "dev", f2, 1000).await.unwrap());
    assert!(b.release(R, "dev", f2).await.unwrap());
    assert!(!a.release(R, "dev", f2).await.unwrap());
    assert_eq!(a.stats(R).await.unwrap().active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reapers_get_each_expired_lease_exactly_once() {
    let srv = redis_or_skip!("concurrent_reapers_get_each_expired_lease_exactly_once");
    let (a, b) = replicas(&srv).await;
    create(&a, 1000).await;
    let mut short = HashMap::new();
    for i in 0..40 {
        let rep = if i % 2 == 0 { &a } else { &b };
        let d = format!("s{i}");
        let f = granted(
            rep.try_admit(R, &d, "u", limits(100, 1e9, 200))
                .await
                .unwrap(),
        );
        short.insert(d, f);
    }
    for i in 0..5 {
        let d = format!("long{i}");
        granted(
            a.try_admit(R, &d, "u", limits(100, 1e9, 60_000))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut tasks = JoinSet::new();
    for k in 0..8 {
        let rep = if k % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            let mut got = Vec::new();
            for _ in 0..5 {
                got.extend(rep.reap(R).await.unwrap());
            }
            got
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    assert_eq!(all.len(), 40, "{all:?}");
    let devices: HashSet<_> = all.iter().map(|l| l.device.clone()).collect();
    assert_eq!(devices.len(), 40);
    for l in &all {
        assert_eq!(short.get(&l.device), Some(&l.fence));
        assert_eq!(l.update_id, "u");
    }
    let s = a.stats(R).await.unwrap();
    assert_eq!((s.active, s.expired, s.granted), (5, 40, 45));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_state_is_loud_and_rebuild_admits_fewer_with_growing_fences() {
    let mut srv = redis_or_skip!("lost_state_is_loud_and_rebuild_admits_fewer");
    let t = connect(&srv.url(), "ota").await.unwrap();
    // Never rebuilt: lost.
    assert!(is_lost(t.stats(R).await));
    create(&t, 60_000).await;
    let fast = limits(3, 1e6, 60_000);
    // 120 per minute: one token every 0.5 s.
    let slow = limits(3, 120.0, 60_000);
    let fa = granted(t.try_admit(R, "a", "u", fast).await.unwrap());
    let fb = granted(t.try_admit(R, "b", "u", fast).await.unwrap());

    // FLUSHALL: every call for the rollout fails with Lost.
    srv.flushall().await;
    assert!(is_lost(t.try_admit(R, "c", "u", fast).await));
    assert!(is_lost(t.renew(R, "a", fa, 60_000).await));
    assert!(is_lost(t.release(R, "a", fa).await));
    assert!(is_lost(t.reap(R).await));
    assert!(is_lost(t.stats(R).await));
    let held = |d: &str, f: u64| HeldLease {
        device: d.into(),
        update_id: "u".into(),
        fence: f,
    };
    let known = [held("a", fa), held("b", fb)];
    t.rebuild(R, &known, 60_000, fa.max(fb), Bucket::Empty)
        .await
        .unwrap();
    // A second (concurrent) rebuild changes nothing, even one that would
    // start the bucket full.
    t.rebuild(R, &known, 60_000, fa.max(fb), Bucket::Full)
        .await
        .unwrap();
    let s = t.stats(R).await.unwrap();
    assert_eq!((s.active, s.waiting, s.granted), (2, 0, 0));
    // Fences kept: the holders renew as before.
    assert!(t.renew(R, "a", fa, 60_000).await.unwrap());
    // The bucket restarts empty.
    assert_eq!(
        wait_reason(t.try_admit(R, "c", "u", slow).await.unwrap()),
        WaitReason::StartRate
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fc = granted(t.try_admit(R, "c", "u", slow).await.unwrap());
    assert!(fc > fa.max(fb));
    // The restored leases count: a, b, c fill the cap.
    assert_eq!(
        wait_reason(t.try_admit(R, "d", "u", fast).await.unwrap()),
        WaitReason::ConcurrencyCap
    );

    // kill -9 and an empty restart on the same port: once the connection
    // manager reconnected, Lost again.
    srv.restart_empty().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_lost(t.stats(R).await) {
        assert!(
            Instant::now() < deadline,
            "never saw Lost after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(is_lost(t.try_admit(R, "d", "u", fast).await));
    // The database knows only a and b (c's grant was "lost") and no minimum
    // fence: the clock-seeded counter still moves past every old fence.
    t.rebuild(R, &known, 60_000, 0, Bucket::Empty)
        .await
        .unwrap();
    assert_eq!(t.stats(R).await.unwrap().active, 2);
    assert_eq!(
        wait_reason(t.try_admit(R, "d", "u", slow).await.unwrap()),
        WaitReason::StartRate
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let fd = granted(t.try_admit(R, "d", "u", slow).await.unwrap());
    assert!(fd > fc, "fence {fd} not above the lost {fc}");
    assert_eq!(
        wait_reason(t.try_admit(R, "e", "u", fast).await.unwrap()),
        WaitReason::ConcurrencyCap
    );

    // forget drops the state: the rollout is unknown again.
    t.forget(R).await.unwrap();
    assert!(is_lost(t.stats(R).await));
}

/// Both backends start a new rollout alike (one burst at once); only a
/// rebuild after a loss starts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rollout_gets_one_burst_and_a_rebuilt_one_none() {
    let srv = redis_or_skip!("a_new_rollout_gets_one_burst_and_a_rebuilt_one_none");
    let t = connect(&srv.url(), "ota").await.unwrap();
    create(&t, 60_000).await;
    // 120 per minute: a burst of 2, then one token every 0.5 s.
    let l = limits(100, 120.0, 60_000);
    granted(t.try_admit(R, "a", "u", l).await.unwrap());
    granted(t.try_admit(R, "b", "u", l).await.unwrap());
    assert_eq!(
        wait_reason(t.try_admit(R, "c", "u", l).await.unwrap()),
        WaitReason::StartRate
    );
    srv.flushall().await;
    assert!(is_lost(t.stats(R).await));
    t.rebuild(R, &[], 60_000, 0, Bucket::Empty).await.unwrap();
    assert_eq!(
        wait_reason(t.try_admit(R, "c", "u", l).await.unwrap()),
        WaitReason::StartRate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_arrival_cannot_pass_a_waiting_device() {
    let srv = redis_or_skip!("a_later_arrival_cannot_pass_a_waiting_device");
    let (a, b) = replicas(&srv).await;
    create(&a, 60_000).await;
    let l = limits(1, 1e6, 60_000);
    let holder = granted(a.try_admit(R, "holder", "u", l).await.unwrap());
    // "old" waits first, then 100 newcomers arrive (on the other replica).
    assert_eq!(
        wait_reason(a.try_admit(R, "old", "u", l).await.unwrap()),
        WaitReason::ConcurrencyCap
    );
    for i in 0..100 {
        let d = format!("new{i}");
        assert!(matches!(
            b.try_admit(R, &d, "u", l).await.unwrap(),
            Admission::Wait { .. }
        ));
    }
    assert_eq!(b.stats(R).await.unwrap().waiting, 101);
    assert!(a.release(R, "holder", holder).await.unwrap());
    // A newcomer asking first still may not take the freed slot.
    for i in 50..100 {
        let d = format!("new{i}");
        match b.try_admit(R, &d, "u", l).await.unwrap() {
            Admission::Wait {
                reason: WaitReason::Queued,
                near_head,
            } => assert!(!near_head, "new{i} is told it is near the head"),
            other => panic!("new{i} passed the waiting device: {other:?}"),
        }
    }
    granted(a.try_admit(R, "old", "u", l).await.unwrap());
    assert_eq!(b.stats(R).await.unwrap().waiting, 100);
}
