//! An update's end (`committed`, `rolled-back`) reaches the server exactly
//! once, whatever step of finishing a crash lands on. The real agent binary
//! against the fixture server, crashed at named points by its test hook
//! (`OTA_AGENT_TEST_CRASH_AT`, debug builds only), then started again.

mod common;

use std::time::Duration;

use common::*;
use ota_format::api::EventKind;

/// The steps of finishing an update at which the agent crashes: the end
/// noted in the update record, queued in the outbox, and the record gone.
const POINTS: &[&str] = &["finish:noted", "finish:queued", "finish:cleared"];

/// Runs the update with the crash hook set until the agent crashes (the
/// runs before it end in a simulated reboot), then once more without it
/// until the server has `kind`; returns how many `kind` events the server
/// has for `id` a moment later.
async fn crash_then_finish(
    server: &Server,
    dev: &Device,
    id: &str,
    point: &str,
    kind: EventKind,
) -> usize {
    let count = |s: &Server| {
        s.srv
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.update_id == id && e.kind == kind)
            .count()
    };
    let mut crashed = false;
    'runs: for _ in 0..6 {
        let mut agent = dev.spawn_with_env(&[("OTA_AGENT_TEST_CRASH_AT", point)]);
        let t = std::time::Instant::now();
        loop {
            if let Some(st) = agent.try_wait().unwrap() {
                if st.success() {
                    continue 'runs; // a simulated reboot
                }
                crashed = true;
                break 'runs;
            }
            // The event may reach the server before the crash (it is
            // queued at `finish:noted`'s next step, and the sender runs
            // beside the crash points); but the crash then follows within
            // moments, or the point was never passed.
            if count(server) > 0 {
                let seen = std::time::Instant::now();
                let st = loop {
                    if let Some(st) = agent.try_wait().unwrap() {
                        break st;
                    }
                    assert!(
                        seen.elapsed() < Duration::from_secs(10),
                        "{point}: the agent finished and runs on: it never passed the crash point"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                assert!(
                    !st.success(),
                    "{point}: the agent exited ({st}) instead of crashing"
                );
                crashed = true;
                break 'runs;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{point}: neither crashed nor rebooted in 60 s; events {:?}; the agent's log:\n{}",
                server.event_kinds(),
                dev.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(crashed, "{point}: the agent never reached the crash point");
    let mut agent = dev.spawn();
    server
        .wait_for(
            &format!("{kind:?} after a crash at {point}"),
            Duration::from_secs(30),
            |s| count(s) > 0,
        )
        .await;
    // Long enough for a second report to arrive, if one were coming.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(&agent);
    wait_exit(&mut agent, Duration::from_secs(5)).await;
    count(server)
}

/// Found by the kill -9 trials in CI: killed after a commit had cleared the
/// update record but before its `committed` event was recorded, the agent
/// came back idle on the new version and the server never heard of the
/// commit (the trial waited for it for 60 s). Now the event is recorded
/// before the record goes, under a sequence number fixed in the record, so
/// a crash at any step neither loses nor doubles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_finishing_a_commit_neither_loses_nor_doubles_its_report() {
    let fx = Fixture::noisy(1 << 20, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    for point in POINTS {
        let id = format!("u-commit-{point}");
        *server.srv.offer.lock().unwrap() = Some(fx.offer(&id));
        let dev = Device::new(&server.url, &fx, "true", "");
        let n = crash_then_finish(&server, &dev, &id, point, EventKind::Committed).await;
        assert_eq!(
            n, 1,
            "crash at {point}: {n} committed events for one commit"
        );
        let v = dev.boot_vars();
        assert_eq!(
            (
                v["booted"].as_str(),
                v["boot_part"].as_str(),
                v["upgrade_available"].as_str()
            ),
            ("b", "b", "0"),
            "crash at {point}"
        );
        assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
        let status = dev.status();
        assert!(
            !dev.data.join("update.json").exists(),
            "crash at {point}: the finished update's record stayed: {status}"
        );
    }
}

/// The same for a rollback: the health check fails on the new slot, the
/// agent switches back and reboots, and its `rolled-back` report must
/// survive a crash at each step of finishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_finishing_a_rollback_neither_loses_nor_doubles_its_report() {
    let fx = Fixture::noisy(1 << 20, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    for point in POINTS {
        let id = format!("u-rollback-{point}");
        *server.srv.offer.lock().unwrap() = Some(fx.offer(&id));
        let dev = Device::new(&server.url, &fx, "false", "");
        let n = crash_then_finish(&server, &dev, &id, point, EventKind::RolledBack).await;
        assert_eq!(
            n, 1,
            "crash at {point}: {n} rolled-back events for one rollback"
        );
        let v = dev.boot_vars();
        assert_eq!(v["booted"], "a", "crash at {point}");
        assert_eq!(std::fs::read(&dev.slot_a).unwrap(), fx.old);
        assert!(
            !dev.data.join("update.json").exists(),
            "crash at {point}: the finished update's record stayed"
        );
    }
}
