//! The whole life of an update, with the real `ota-agent` binary against a
//! test server over real HTTP: enroll, check in, download a real delta
//! through the pool, install, "reboot" (the agent exits; the file boot
//! environment records the boot), health check, commit or roll back, events
//! delivered in order.

mod common;

use std::time::Duration;

use common::*;
use ota_format::api::EventKind;

fn assert_seq_increasing(server: &Server) {
    let ev = server.srv.events.lock().unwrap();
    for w in ev.windows(2) {
        assert!(w[0].seq < w[1].seq, "event seqs not increasing: {ev:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_update_installs_reboots_and_commits() {
    let fx = Fixture::new(3 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-commit"));
    let dev = Device::new(&server.url, &fx, "true", "");

    // First run: download, install, switch, run the reboot command, exit.
    let mut agent = dev.spawn();
    let st = wait_exit(&mut agent, Duration::from_secs(60)).await;
    assert!(st.success(), "{st}");
    assert_eq!(
        dev.slot_prefix(&dev.slot_b, fx.new.len()),
        fx.new,
        "slot B holds the new image"
    );
    assert_eq!(
        std::fs::read(&dev.slot_a).unwrap(),
        fx.old,
        "slot A untouched"
    );
    let v = dev.boot_vars();
    assert_eq!(v["boot_part"], "b");
    assert_eq!(v["booted"], "b", "the simulated reboot booted B");
    assert_eq!(v["upgrade_available"], "1", "on trial until committed");
    let s = dev.status();
    assert!(s.contains("pending:      u-commit"), "{s}");

    // Second run: booted into B, healthy, commit.
    let mut agent = dev.spawn();
    server
        .wait_for("committed", Duration::from_secs(30), |s| {
            s.has_event(EventKind::Committed)
        })
        .await;
    // The next check-in reports the new version; then stop with SIGTERM.
    server
        .wait_for("check-in on 2.0.0", Duration::from_secs(10), |s| {
            s.srv
                .checkins
                .lock()
                .unwrap()
                .iter()
                .any(|c| c.current_version == "2.0.0")
        })
        .await;
    let t = std::time::Instant::now();
    sigterm(&agent);
    let st = wait_exit(&mut agent, Duration::from_secs(5)).await;
    assert!(st.success(), "{st}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    let v = dev.boot_vars();
    assert_eq!(
        (v["boot_part"].as_str(), v["upgrade_available"].as_str()),
        ("b", "0")
    );
    let kinds = server.event_kinds();
    let want = [
        EventKind::DownloadStarted,
        EventKind::Downloaded,
        EventKind::Installed,
        EventKind::Rebooting,
        EventKind::Committed,
    ];
    let mut it = kinds.iter();
    for w in want {
        assert!(
            it.any(|k| *k == w),
            "{w:?} missing or out of order in {kinds:?}"
        );
    }
    assert!(kinds.contains(&EventKind::Progress), "{kinds:?}");
    assert_seq_increasing(&server);
    let s = dev.status();
    assert!(
        s.contains("version:      2.0.0") && s.contains("pending:      none"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_rolls_back_to_the_old_slot() {
    let fx = Fixture::new(2 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-rollback"));
    let dev = Device::new(&server.url, &fx, "exit 3", "");
    let mut agent = dev.spawn();
    assert!(
        wait_exit(&mut agent, Duration::from_secs(60))
            .await
            .success()
    );
    assert_eq!(dev.boot_vars()["booted"], "b");
    // Booted B: health check fails → switch back to A, reboot, exit.
    let mut agent = dev.spawn();
    assert!(
        wait_exit(&mut agent, Duration::from_secs(30))
            .await
            .success()
    );
    let v = dev.boot_vars();
    assert_eq!((v["booted"].as_str(), v["boot_part"].as_str()), ("a", "a"));
    // Booted A again: report the rollback with its reason.
    let mut agent = dev.spawn();
    server
        .wait_for("rolled-back", Duration::from_secs(30), |s| {
            s.has_event(EventKind::RolledBack)
        })
        .await;
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    let ev = server.srv.events.lock().unwrap().clone();
    let rb = ev.iter().find(|e| e.kind == EventKind::RolledBack).unwrap();
    assert!(
        rb.detail
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("health check failed"),
        "{rb:?}"
    );
    assert_eq!(rb.detail.version.as_deref(), Some("1.0.0"));
    assert!(!ev.iter().any(|e| e.kind == EventKind::Committed));
    assert_eq!(
        std::fs::read(&dev.slot_a).unwrap(),
        fx.old,
        "slot A untouched"
    );
    assert_seq_increasing(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_count_exhausted_is_reported_as_rolled_back() {
    let fx = Fixture::new(1 << 20, 256 << 10, true);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-bootlimit"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    assert!(
        wait_exit(&mut agent, Duration::from_secs(60))
            .await
            .success()
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
    // The new slot keeps crashing before the agent can commit: the
    // bootloader counts the trial boots and falls back after bootlimit (3).
    for _ in 0..3 {
        ota_agent::bootctl::simulate_boot(&dev.boot_env, 3).unwrap();
    }
    assert_eq!(dev.boot_vars()["booted"], "a");
    let mut agent = dev.spawn();
    server
        .wait_for("rolled-back", Duration::from_secs(30), |s| {
            s.has_event(EventKind::RolledBack)
        })
        .await;
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    let ev = server.srv.events.lock().unwrap().clone();
    let rb = ev.iter().find(|e| e.kind == EventKind::RolledBack).unwrap();
    assert!(
        rb.detail
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("boot count exhausted"),
        "{rb:?}"
    );
    // The fallback is acknowledged: A is good and the count is cleared, so a
    // later switch lost to a power cut is not mistaken for a fallback.
    let v = dev.boot_vars();
    assert_eq!(
        (
            v["boot_part"].as_str(),
            v["upgrade_available"].as_str(),
            v["bootcount"].as_str()
        ),
        ("a", "0", "0"),
        "{v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_device_type_or_untrusted_key_fails_before_download() {
    let fx = Fixture::new(1 << 20, 256 << 10, true);
    let other = Fixture::new(1 << 20, 256 << 10, true); // signed by another key
    let server = Server::start(&[&fx, &other]).await;
    *server.srv.offer.lock().unwrap() = Some(other.offer("u-untrusted"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    server
        .wait_for("failed", Duration::from_secs(30), |s| {
            s.has_event(EventKind::Failed)
        })
        .await;
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    let ev = server.srv.events.lock().unwrap().clone();
    let f = ev.iter().find(|e| e.kind == EventKind::Failed).unwrap();
    assert!(
        f.detail
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("manifest refused"),
        "{f:?}"
    );
    assert_eq!(
        server
            .srv
            .range_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no payload byte fetched"
    );
    assert!(!ev.iter().any(|e| e.kind == EventKind::DownloadStarted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_for_another_base_image_fails_before_download() {
    let fx = Fixture::new(1 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-wrong-base"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // The running slot is not the image the delta was built from.
    let mut other = fx.old.clone();
    other[4096] ^= 1;
    std::fs::write(&dev.slot_a, &other).unwrap();
    let mut agent = dev.spawn();
    server
        .wait_for("failed", Duration::from_secs(30), |s| {
            s.has_event(EventKind::Failed)
        })
        .await;
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    let ev = server.srv.events.lock().unwrap().clone();
    let f = ev.iter().find(|e| e.kind == EventKind::Failed).unwrap();
    assert!(
        f.detail
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("wrong base image"),
        "{f:?}"
    );
    assert_eq!(
        server
            .srv
            .range_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no payload byte fetched"
    );
    assert_eq!(
        std::fs::read(&dev.slot_a).unwrap(),
        other,
        "slot A untouched"
    );
}
