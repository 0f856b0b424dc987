//! The daemon at the edges: a full disk, a server that cancels the update,
//! SIGTERM in the middle of a download (then resume).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::EventKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_clearly_and_leaves_the_old_slot_alone() {
    let fx = Fixture::noisy(2 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-full"));
    let mnt = tempfile::tempdir().unwrap();
    // A 1 MiB filesystem for a 2 MiB image.
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Umount(mnt.path().into());
    let dev = Device::with_slot_b(
        &server.url,
        &fx,
        "true",
        "",
        Some(mnt.path().join("slot-b.img")),
    );
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
    let reason = f.detail.reason.clone().unwrap_or_default();
    assert!(reason.contains("No space left on device"), "{reason}");
    eprintln!("disk full reported as: {reason}");
    assert_eq!(
        std::fs::read(&dev.slot_a).unwrap(),
        fx.old,
        "slot A untouched"
    );
    let v = dev.boot_vars();
    assert_ne!(
        v.get("boot_part").map(String::as_str),
        Some("b"),
        "boot never switched"
    );
    assert!(!ev.iter().any(|e| e.kind == EventKind::Installed));
    let s = dev.status();
    assert!(s.contains("No space left"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cancel_stops_every_request_promptly() {
    let fx = Fixture::noisy(4 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    server.srv.throttle_us.store(50_000, Ordering::SeqCst); // slow: seconds
    server.srv.next_checkin_ms.store(100, Ordering::SeqCst);
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-cancel"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    server
        .wait_for("download", Duration::from_secs(20), |s| {
            s.srv.bytes_sent.load(Ordering::SeqCst) > 100_000
        })
        .await;
    let t = Instant::now();
    *server.srv.cancel.lock().unwrap() = Some(("u-cancel".into(), "rollout aborted".into()));
    // The next check-in (≤ 100 ms) gets the cancel; every request stops.
    let mut last = server.srv.bytes_sent.load(Ordering::SeqCst);
    let stopped_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = server.srv.bytes_sent.load(Ordering::SeqCst);
        if now == last {
            break t.elapsed();
        }
        last = now;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "download did not stop"
        );
    };
    eprintln!("download stopped {stopped_at:?} after the server said cancel");
    assert!(stopped_at < Duration::from_secs(1), "{stopped_at:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.srv.bytes_sent.load(Ordering::SeqCst),
        last,
        "a request survived"
    );
    let s = dev.status();
    assert!(s.contains("pending:      none"), "{s}");
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    assert_eq!(std::fs::read(&dev.slot_a).unwrap(), fx.old);
    assert!(!server.has_event(EventKind::Installed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_download_is_prompt_and_the_next_run_resumes() {
    let fx = Fixture::noisy(4 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    server.srv.throttle_us.store(10_000, Ordering::SeqCst);
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-term"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    let half = fx.payload.len() as u64 / 2;
    server
        .wait_for("half the payload", Duration::from_secs(30), |s| {
            s.srv.bytes_sent.load(Ordering::SeqCst) > half
        })
        .await;
    let t = Instant::now();
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    let took = t.elapsed();
    eprintln!("SIGTERM at 50 %: exited in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let before = server.srv.bytes_sent.load(Ordering::SeqCst);
    // Restart: resumes, finishes, reboots.
    server.srv.throttle_us.store(0, Ordering::SeqCst);
    let mut agent = dev.spawn();
    assert!(
        wait_exit(&mut agent, Duration::from_secs(60))
            .await
            .success()
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
    let total = server.srv.bytes_sent.load(Ordering::SeqCst);
    let refetched = total.saturating_sub(fx.payload.len() as u64);
    eprintln!(
        "payload {} bytes; sent before SIGTERM {before}, in all {total}: {refetched} bytes fetched twice",
        fx.payload.len()
    );
    // At most the 4 ranges in flight (64 KiB each) were fetched again.
    assert!(refetched <= 4 * (64 << 10), "{refetched}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_status_watchdog_and_stopping() {
    let fx = Fixture::new(1 << 20, 256 << 10, true);
    let server = Server::start(&[&fx]).await;
    let dev = Device::new(&server.url, &fx, "true", "");
    let (mut agent, sock) = spawn_under_systemd(&dev, Duration::from_millis(200), 200_000, &[]);
    let mut seen = Vec::new();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let has = |seen: &Vec<String>, p: &str| seen.iter().any(|m| m.contains(p));
    while !(has(&seen, "READY=1") && has(&seen, "STATUS=idle") && has(&seen, "WATCHDOG=1")) {
        assert!(t.elapsed() < Duration::from_secs(10), "got only {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(has(&seen, "STOPPING=1"), "{seen:?}");
    eprintln!("notify messages: {seen:?}");
}

/// Issue 13: the watchdog ping must come from the loop that does the work.
/// It used to come from a timer task beside the loop, which went on pinging
/// while the loop hung, so systemd never restarted a stuck agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_main_loop_stops_the_watchdog_pings() {
    let fx = Fixture::new(256 << 10, 64 << 10, true);
    let server = Server::start(&[&fx]).await;
    server
        .srv
        .next_checkin_ms
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let dev = Device::new(&server.url, &fx, "true", "");
    let (mut agent, sock) = spawn_under_systemd(
        &dev,
        Duration::from_millis(100),
        200_000,
        &[("OTA_AGENT_TEST_HANG_AFTER_CHECKINS", "5")],
    );
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    let mut last_ping = None;
    let mut pings = 0;
    // Pings while the loop runs; then the loop hangs (after 5 check-ins at
    // 100 ms, ~0.5 s) and the pings must stop although the process lives.
    while t.elapsed() < Duration::from_secs(4) {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1")
        {
            pings += 1;
            last_ping = Some(t.elapsed());
        }
    }
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent should hang, not exit"
    );
    assert!(pings >= 2, "no watchdog pings before the hang: {pings}");
    let last = last_ping.unwrap();
    assert!(
        last < Duration::from_secs(2),
        "watchdog pings went on while the main loop hung (last at {last:?}, {pings} pings)"
    );
    // A hung loop cannot answer SIGTERM either: systemd would SIGABRT it.
    agent.kill().unwrap();
    agent.wait().unwrap();
}

/// The systemd device under load: `WatchdogSec` runs from the start, not
/// from READY=1, and the agent's start-up (state, boot environment,
/// enrollment) pinged nothing, so systemd killed a slow start as a hung
/// agent — and would kill, every `WatchdogSec`, a device that retries
/// enrollment against a server it cannot reach yet. The enrollment loop
/// is live work: it must ping while it retries, before READY=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_retries_ping_the_watchdog_before_ready() {
    let fx = Fixture::new(64 << 10, 64 << 10, true);
    // A port nobody listens on: every enrollment attempt is refused.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dev = Device::new(&unreachable, &fx, "true", "");
    let (mut agent, sock) = spawn_under_systemd(&dev, Duration::from_millis(100), 1_000_000, &[]);
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    let mut pings = Vec::new();
    let mut ready = false;
    while t.elapsed() < Duration::from_secs(4) {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            ready |= m.contains("READY=1");
            if m.contains("WATCHDOG=1") {
                pings.push(t.elapsed());
            }
        }
    }
    assert!(!ready, "READY=1 without a device token");
    // Every 500 ms (half the interval): ~8 in 4 s; systemd's rule is that
    // no whole interval passes without one.
    assert!(pings.len() >= 4, "too few pings while enrolling: {pings:?}");
    let worst = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .chain(std::iter::once(t.elapsed() - *pings.last().unwrap()))
        .max()
        .unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "a gap of {worst:?} between pings"
    );
    sigterm(&agent);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(5))
            .await
            .success()
    );
}

/// Issue 19, defect 4: check-ins that hang (a replica waiting on a
/// restarting database) instead of failing. The agent judged its lease only
/// when a check-in failed, and from when an answer arrived: a check-in held
/// for 6 s kept a 1 s lease downloading for all of it, while the server
/// had long given the slot to another device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_checkin_does_not_keep_a_lost_lease_downloading() {
    let fx = Fixture::noisy(4 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    server.srv.throttle_us.store(50_000, Ordering::SeqCst);
    server.srv.next_checkin_ms.store(100, Ordering::SeqCst);
    let mut offer = fx.offer("u-hang");
    offer.lease_ms = 1000;
    *server.srv.offer.lock().unwrap() = Some(offer);
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    server
        .wait_for("download", Duration::from_secs(20), |s| {
            s.srv.bytes_sent.load(Ordering::SeqCst) > 50_000
        })
        .await;
    server.srv.checkin_hang_ms.store(6000, Ordering::SeqCst);
    let t = Instant::now();
    let mut last = server.srv.bytes_sent.load(Ordering::SeqCst);
    let stopped_at = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = server.srv.bytes_sent.load(Ordering::SeqCst);
        if now == last {
            break t.elapsed();
        }
        last = now;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "download went on for 5 s on a 1 s lease while check-ins hung"
        );
    };
    eprintln!("download stopped {stopped_at:?} after check-ins began to hang (lease 1 s)");
    assert!(stopped_at < Duration::from_secs(3), "{stopped_at:?}");
    // The server answers again: the renewed lease resumes the download.
    server.srv.checkin_hang_ms.store(0, Ordering::SeqCst);
    server.srv.throttle_us.store(0, Ordering::SeqCst);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(30))
            .await
            .success()
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_cannot_be_renewed_stops_the_download() {
    let fx = Fixture::noisy(4 << 20, 128 << 10, true);
    let server = Server::start(&[&fx]).await;
    server.srv.throttle_us.store(50_000, Ordering::SeqCst);
    server.srv.next_checkin_ms.store(100, Ordering::SeqCst);
    let mut offer = fx.offer("u-lease");
    offer.lease_ms = 1000;
    *server.srv.offer.lock().unwrap() = Some(offer);
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    server
        .wait_for("download", Duration::from_secs(20), |s| {
            s.srv.bytes_sent.load(Ordering::SeqCst) > 50_000
        })
        .await;
    // The API goes away (artifacts still flow): the lease cannot be renewed.
    server.srv.checkin_down.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let mut last = server.srv.bytes_sent.load(Ordering::SeqCst);
    let stopped_at = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = server.srv.bytes_sent.load(Ordering::SeqCst);
        if now == last {
            break t.elapsed();
        }
        last = now;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "download went on without a lease"
        );
    };
    eprintln!("download stopped {stopped_at:?} after the last renewal (lease 1 s)");
    assert!(stopped_at < Duration::from_secs(3), "{stopped_at:?}");
    // The server comes back and offers the same payload: resume, not restart.
    server.srv.checkin_down.store(false, Ordering::SeqCst);
    server.srv.throttle_us.store(0, Ordering::SeqCst);
    assert!(
        wait_exit(&mut agent, Duration::from_secs(30))
            .await
            .success()
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_leads_to_a_new_enrollment() {
    let fx = Fixture::new(1 << 20, 256 << 10, true);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-reenroll"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // A token the server no longer knows (401 on every call).
    std::fs::create_dir_all(&dev.data).unwrap();
    std::fs::write(dev.data.join("token"), "revoked-token").unwrap();
    let mut agent = dev.spawn();
    assert!(
        wait_exit(&mut agent, Duration::from_secs(30))
            .await
            .success()
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
    let token = std::fs::read_to_string(dev.data.join("token")).unwrap();
    assert!(token.starts_with("tok-"), "{token}");
}

/// Issue 19, defect 3: a device whose token was rotated (`ota-server device
/// add --rotate`) and that has no enrollment key looped on 401 without a
/// word, and never looked at its token file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_reread_from_the_token_file_and_reported() {
    let fx = Fixture::new(1 << 20, 256 << 10, true);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-rotated"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // Pre-provisioned: no enrollment key, a token the server refuses.
    let cfg = std::fs::read_to_string(&dev.config).unwrap();
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.starts_with("enrollment_key_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&dev.config, cfg).unwrap();
    std::fs::create_dir_all(&dev.data).unwrap();
    let token_file = dev.data.join("token");
    std::fs::write(&token_file, "revoked-token\n").unwrap();
    let log = dev.data.join("../agent.log");
    let mut agent = AgentProc(
        std::process::Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&dev.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let said = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("needs re-provisioning")
            .count()
    };
    let t = std::time::Instant::now();
    while said(&log) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no re-provisioning message:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several more refusals (max_backoff 2 s): said once, not per attempt.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(said(&log), 1, "{text}");
    assert!(text.contains("device add --rotate --id dev-1"), "{text}");
    assert!(
        server.srv.checkins.lock().unwrap().is_empty(),
        "no check-in can pass with a refused token"
    );
    // The operator rotates the token and puts the new one in the file: the
    // agent picks it up at its next attempt, without a restart.
    std::fs::write(&token_file, "tok-rotated\n").unwrap();
    assert!(
        wait_exit(&mut agent, Duration::from_secs(30))
            .await
            .success()
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the token file holds another one"), "{text}");
}

/// Issue 17 item 6 through the real daemon: an answer whose freshness
/// statement is older than one already seen (a replay, though validly signed
/// and not expired) is not acted on — its offer starts no download. An
/// answer without a statement stands on the one the agent holds (and echoed
/// in its check-in, as a server leaves out a statement the device already
/// has): while that is unexpired its offer is acted on, exactly as if the
/// server had repeated it (the expiry of a held statement is unit-tested in
/// `agent/src/freshness.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_freshness_statement_is_not_acted_on_and_the_held_one_is_echoed() {
    use ota_format::Freshness;
    use std::time::SystemTime;
    let fx = Fixture::new(1 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    let now = SystemTime::now();
    let statement = |age: u64| {
        Freshness::new(
            "testboard",
            Some("2.0.0".into()),
            0,
            now - Duration::from_secs(age),
            Duration::from_secs(3600),
        )
        .sign(&[&fx.key])
        .unwrap()
    };
    let (current, replayed) = (statement(0), statement(600));
    *server.srv.freshness.lock().unwrap() = Some(current.clone());
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    let floor = dev.dir.path().join("data").join("freshness.json");
    let t0 = Instant::now();
    while !floor.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no freshness floor recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent echoes the statement it holds.
    let digest = current.payload_digest();
    server
        .wait_for(
            "a check-in echoing the held statement",
            Duration::from_secs(20),
            |s| {
                s.srv
                    .checkins
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|c| c.freshness_held == Some(digest))
            },
        )
        .await;
    // The replayed statement, with an offer: no download starts.
    for answer in [Some(replayed)] {
        *server.srv.freshness.lock().unwrap() = answer;
        *server.srv.offer.lock().unwrap() = Some(fx.offer("u-fresh"));
        let before = server.srv.checkins.lock().unwrap().len();
        server
            .wait_for("several check-ins", Duration::from_secs(20), |s| {
                s.srv.checkins.lock().unwrap().len() >= before + 4
            })
            .await;
        assert_eq!(
            server.srv.range_requests.load(Ordering::SeqCst),
            0,
            "a stale answer started a download"
        );
        assert!(
            server.event_kinds().is_empty(),
            "{:?}",
            server.event_kinds()
        );
    }
    // No statement (the server leaves out the one the agent holds): the
    // offer is taken.
    *server.srv.freshness.lock().unwrap() = None;
    server
        .wait_for("the download", Duration::from_secs(30), |s| {
            s.srv.range_requests.load(Ordering::SeqCst) > 0
        })
        .await;
    sigterm(&agent);
    let _ = wait_exit(&mut agent, Duration::from_secs(30)).await;
}

/// Starts the agent of `dev` as systemd would with `Type=notify` and
/// `WatchdogSec`: `NOTIFY_SOCKET` bound here (read with `timeout`),
/// `WATCHDOG_USEC` and `WATCHDOG_PID` (the agent's own pid: `exec` keeps
/// the shell's), plus `env`.
fn spawn_under_systemd(
    dev: &Device,
    timeout: Duration,
    watchdog_usec: u64,
    env: &[(&str, &str)],
) -> (AgentProc, std::os::unix::net::UnixDatagram) {
    let sock_path = dev.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(timeout)).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec {} run --config {}",
            agent_bin().display(),
            dev.config.display()
        ))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (AgentProc(child), sock)
}
