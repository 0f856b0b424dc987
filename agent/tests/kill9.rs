//! kill -9 at random moments: the real agent binary is killed during
//! download, apply, install, reboot and commit, then started again, until
//! the update is committed. After every kill the device must be on its old
//! image or on the verified new one: slot A is never touched, and whenever
//! the boot environment points at (or runs) slot B, slot B holds exactly the
//! new image. Re-downloaded bytes stay within what was in flight.
//!
//! `OTA_KILL_TRIALS` (default 20) sets the number of trials and
//! `OTA_KILL_SEED` reproduces a run (the seed is printed);
//! `scripts/kill-trials.sh` runs hundreds.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::EventKind;
use rand::{Rng, SeedableRng};

/// Server pacing: one 16 KiB chunk per `THROTTLE_US` per connection.
const THROTTLE_US: u64 = 20_000;
const PARALLEL: u64 = 4;
const RANGE: u64 = 64 << 10;

fn check_invariants(dev: &Device, fx: &Fixture, when: &str) {
    assert_eq!(
        std::fs::read(&dev.slot_a).unwrap(),
        fx.old,
        "{when}: slot A (the running image) was modified"
    );
    let v = dev.boot_vars();
    let part = v.get("boot_part").map(String::as_str).unwrap_or("a");
    let booted = v.get("booted").map(String::as_str).unwrap_or("a");
    if part == "b" || booted == "b" {
        assert!(
            dev.slot_prefix(&dev.slot_b, fx.new.len()) == fx.new,
            "{when}: boot points at slot B (boot_part={part}, booted={booted}) but B is not the verified new image"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_leaves_a_wrong_image() {
    let trials: u64 = std::env::var("OTA_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("OTA_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill -9 trials: {trials}, seed {seed} (OTA_KILL_SEED={seed} to reproduce)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let delta = Fixture::noisy(2 << 20, 128 << 10, false);
    let full = Fixture::noisy(2 << 20, 128 << 10, true);
    let server = Server::start(&[&delta, &full]).await;
    server.srv.throttle_us.store(THROTTLE_US, Ordering::SeqCst);
    server.srv.next_checkin_ms.store(100, Ordering::SeqCst);
    // Bytes one connection can receive while the recorder waits to sync
    // (≤ 0.5 s between syncs, plus slack for the fsync and the kill).
    let per_conn_per_sec = (16u64 << 10) * 1_000_000 / THROTTLE_US;
    let unrecorded_bound = PARALLEL * (RANGE + per_conn_per_sec);
    let (mut total_kills, mut total_redownload) = (0u64, 0u64);
    for trial in 0..trials {
        let fx = if trial % 2 == 0 { &delta } else { &full };
        let id = format!("u-kill-{trial}");
        *server.srv.offer.lock().unwrap() = Some(fx.offer(&id));
        server.srv.bytes_sent.store(0, Ordering::SeqCst);
        let dev = Device::new(&server.url, fx, "true", "");
        let kills = rng.random_range(1..=5u32);
        let mut killed = 0;
        let mut round = 0;
        let committed = |s: &Server| {
            s.srv
                .events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.update_id == id && e.kind == EventKind::Committed)
        };
        loop {
            round += 1;
            assert!(
                round < 30,
                "trial {trial} (seed {seed}): no commit after 30 runs"
            );
            let mut child = dev.spawn();
            let t = Instant::now();
            if killed < kills {
                let delay = Duration::from_millis(rng.random_range(0..1500));
                while t.elapsed() < delay && child.try_wait().unwrap().is_none() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if child.try_wait().unwrap().is_none() {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    killed += 1;
                    check_invariants(
                        &dev,
                        fx,
                        &format!("trial {trial} (seed {seed}) after kill at {delay:?}"),
                    );
                    continue;
                }
                let st = child.wait().unwrap();
                assert!(st.success(), "trial {trial}: agent failed: {st}");
                check_invariants(&dev, fx, &format!("trial {trial} after an exit"));
                continue;
            }
            // No more kills: let it run to the reboot (exit) or the commit.
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    assert!(st.success(), "trial {trial}: agent failed: {st}");
                    break;
                }
                if committed(&server) {
                    sigterm(&child);
                    wait_exit(&mut child, Duration::from_secs(5)).await;
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "trial {trial} (seed {seed}): stuck; events {:?}; the agent's log:\n{}",
                    server.event_kinds(),
                    dev.log_tail(60)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            check_invariants(&dev, fx, &format!("trial {trial} after a clean run"));
            if committed(&server) {
                break;
            }
        }
        assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
        let v = dev.boot_vars();
        assert_eq!(
            (v["boot_part"].as_str(), v["upgrade_available"].as_str()),
            ("b", "0")
        );
        // Committed only after B really booted (issue 13: a restart after the
        // switch used to commit B without a reboot).
        assert_eq!(
            v["booted"], "b",
            "trial {trial} (seed {seed}): committed a slot that never booted"
        );
        let sent = server.srv.bytes_sent.load(Ordering::SeqCst);
        let redownload = sent.saturating_sub(fx.payload.len() as u64);
        assert!(
            redownload <= killed as u64 * unrecorded_bound,
            "trial {trial} (seed {seed}): {redownload} bytes fetched twice after {killed} kills, bound {}",
            killed as u64 * unrecorded_bound
        );
        total_kills += killed as u64;
        total_redownload += redownload;
    }
    eprintln!(
        "kill -9 trials passed: {trials} trials, {total_kills} kills, {total_redownload} bytes re-downloaded in all ({} per kill)",
        total_redownload / total_kills.max(1)
    );
}
