//! Issue 13: the running slot is read from what booted, never inferred from
//! what should boot next, and "rebooted since the switch?" is read from the
//! boot id. The real agent binary against the fixture server, with the
//! `file` back-end (whose `simulate-boot` plays the bootloader's power-on).

mod common;

use std::time::Duration;

use common::*;
use ota_format::api::EventKind;

/// Rewrites the device's `reboot_command` (the template sets one).
fn set_reboot_command(dev: &Device, cmd: &str) {
    let text = std::fs::read_to_string(&dev.config).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("reboot_command") {
                format!("reboot_command = {cmd:?}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&dev.config, text).unwrap();
}

/// Runs the agent until it exits by itself (the reboot command kills it or
/// it exits to reboot), within `timeout`.
async fn run_to_exit(dev: &Device, timeout: Duration) -> std::process::ExitStatus {
    let mut agent = dev.spawn();
    wait_exit(&mut agent, timeout).await
}

/// The defect as reported: killed after switching the boot to B but before
/// the reboot, then started again without a reboot, the agent committed B
/// (never booted). Now it must finish the reboot instead, and commit only
/// once B really booted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_switch_and_restarted_without_reboot_does_not_commit() {
    let fx = Fixture::noisy(1 << 20, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-switch-kill"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // The "reboot" kills the agent itself: the kill lands after the switch.
    set_reboot_command(&dev, "kill -9 $PPID; sleep 10");
    let st = run_to_exit(&dev, Duration::from_secs(60)).await;
    assert!(!st.success(), "the agent should have been killed: {st}");
    let v = dev.boot_vars();
    assert_eq!(
        (v["boot_part"].as_str(), v["upgrade_available"].as_str()),
        ("b", "1"),
        "the switch happened before the kill"
    );
    assert_eq!(v["booted"], "a", "no power-on happened");

    // Restarted without a reboot: it must ask for the reboot again.
    let marker = dev.dir.path().join("reboot-requested");
    set_reboot_command(&dev, &format!("touch {}", marker.display()));
    let st = run_to_exit(&dev, Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
    assert!(marker.exists(), "the agent did not re-run the reboot");
    assert!(
        !server.has_event(EventKind::Committed),
        "committed a slot that never booted: {:?}",
        server.event_kinds()
    );
    let v = dev.boot_vars();
    assert_eq!(v["booted"], "a");
    let status = dev.status();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["booted", "slot:", "a"]),
        "status: {status}"
    );

    // The real reboot: the bootloader boots B on trial, the agent commits.
    ota_agent::bootctl::simulate_boot(&dev.boot_env, 3).unwrap();
    let mut agent = dev.spawn();
    server
        .wait_for("the commit", Duration::from_secs(30), |s| {
            s.has_event(EventKind::Committed)
        })
        .await;
    sigterm(&agent);
    wait_exit(&mut agent, Duration::from_secs(5)).await;
    let v = dev.boot_vars();
    assert_eq!(
        (
            v["booted"].as_str(),
            v["boot_part"].as_str(),
            v["upgrade_available"].as_str()
        ),
        ("b", "b", "0")
    );
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
}

/// Found under systemd in the ARM64 VM (`tests/vm/scenario.sh systemd`):
/// `systemctl reboot` makes systemd stop the agent's cgroup, the
/// `systemctl` the agent waits for included, so the reboot command "fails"
/// (SIGTERM) after the agent itself got SIGTERM. That is the reboot under
/// way: the agent must stop cleanly (exit 0), not report the reboot command
/// failed (the unit ended `failed` on every update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_command_stopped_by_the_shutdown_it_started_is_not_an_error() {
    let fx = Fixture::noisy(1 << 20, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-reboot-term"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // As systemd does on `systemctl reboot`: SIGTERM to the agent, then to
    // the command it is waiting for.
    set_reboot_command(&dev, "kill -TERM $PPID; sleep 1; kill -TERM $$");
    let st = run_to_exit(&dev, Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "the agent treated the shutdown its reboot started as a failed reboot: {st}"
    );
    let v = dev.boot_vars();
    assert_eq!(
        (v["boot_part"].as_str(), v["upgrade_available"].as_str()),
        ("b", "1"),
        "the switch happened before the reboot"
    );

    // Not stopped by a shutdown: a failing reboot command is still an error.
    // (Checked last: it leaves the device still rebooting.)
    set_reboot_command(&dev, "exit 3");
    let st = run_to_exit(&dev, Duration::from_secs(30)).await;
    assert!(
        !st.success(),
        "a reboot command that failed on its own: {st}"
    );
}

/// CI's systemd VM (`vm_systemd_type_notify_…`): systemd signals the
/// agent and its `systemctl reboot` together, and the agent saw the
/// command killed *before* its own SIGTERM was handled, so it called the
/// reboot failed and exited 1 (the unit ended `failed`). The stop request
/// that follows the command's death within a moment is the same shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_command_killed_just_before_the_agents_own_stop_is_not_an_error() {
    let fx = Fixture::noisy(1 << 20, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-reboot-term-first"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // The command dies first; the agent's SIGTERM comes 300 ms later
    // (`$PPID` is the agent in the background subshell too).
    set_reboot_command(&dev, "(sleep 0.3; kill -TERM $PPID) & kill -TERM $$");
    let st = run_to_exit(&dev, Duration::from_secs(60)).await;
    assert!(
        st.success(),
        "the agent called its reboot failed when the shutdown's SIGTERM reached it after the command's: {st}"
    );
    let v = dev.boot_vars();
    assert_eq!(
        (v["boot_part"].as_str(), v["upgrade_available"].as_str()),
        ("b", "1"),
        "the switch happened before the reboot"
    );
}

/// A power cut that loses the environment write: the device powers on
/// again on A with an untouched environment. The agent must verify the
/// slot again, switch again and complete (not report a rollback, not give
/// up, not commit A's neighbour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_lost_to_a_power_cut_is_verified_and_redone() {
    let fx = Fixture::noisy(1 << 20, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-switch-lost"));
    let dev = Device::new(&server.url, &fx, "true", "");
    set_reboot_command(&dev, "kill -9 $PPID; sleep 10");
    let st = run_to_exit(&dev, Duration::from_secs(60)).await;
    assert!(!st.success(), "{st}");
    // The environment as it was before the switch (the write never reached
    // the disk), then a power-on.
    let v = dev.boot_vars();
    let old: String = v
        .iter()
        .map(|(k, val)| match k.as_str() {
            "boot_part" => "boot_part=a\n".to_string(),
            "upgrade_available" | "bootcount" => format!("{k}=0\n"),
            _ => format!("{k}={val}\n"),
        })
        .collect();
    std::fs::write(&dev.boot_env, old).unwrap();
    ota_agent::bootctl::simulate_boot(&dev.boot_env, 3).unwrap();
    // Now a normal device: the reboot is the simulated bootloader.
    set_reboot_command(
        &dev,
        &format!(
            "{} simulate-boot --env-file {} --bootlimit 3",
            agent_bin().display(),
            dev.boot_env.display()
        ),
    );
    let st = run_to_exit(&dev, Duration::from_secs(60)).await;
    assert!(st.success(), "{st}");
    assert!(!server.has_event(EventKind::RolledBack));
    assert_eq!(dev.boot_vars()["booted"], "b", "switched and rebooted");
    let mut agent = dev.spawn();
    server
        .wait_for("the commit", Duration::from_secs(30), |s| {
            s.has_event(EventKind::Committed)
        })
        .await;
    sigterm(&agent);
    wait_exit(&mut agent, Duration::from_secs(5)).await;
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
    assert!(!server.has_event(EventKind::RolledBack));
}

/// Without any record of the booted slot the agent refuses to run, saying
/// why, instead of taking the next slot for the running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_running_slot_is_refused_with_a_reason() {
    let fx = Fixture::noisy(256 << 10, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-unknown"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // The environment a switch leaves, with no power-on record.
    std::fs::write(
        &dev.boot_env,
        "boot_part=b\nupgrade_available=1\nbootcount=0\n",
    )
    .unwrap();
    let log = dev.dir.path().join("agent.err");
    let mut agent = AgentProc(
        std::process::Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&dev.config)
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Before the fix the agent went on (and committed B): it must stop.
    let st = wait_exit(&mut agent, Duration::from_secs(20)).await;
    assert!(!st.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("cannot tell which slot is running"),
        "stderr: {err}"
    );
    assert!(server.event_kinds().is_empty());
    assert!(!server.has_event(EventKind::Committed));
}

/// A boot script that resets `bootcount` when it falls back (against the
/// contract of deploy/uboot/boot.cmd and deploy/grub/ota-ab.cfg) makes every
/// fallback look like a switch lost to a power cut. Before the cap the agent
/// verified the broken slot and switched to it again after every fallback,
/// forever; now it redoes a lost switch at most three times for one update,
/// then reports a rollback that names the boot script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_script_that_resets_the_count_on_fallback_does_not_loop_forever() {
    let fx = Fixture::noisy(256 << 10, 64 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(fx.offer("u-reset-count"));
    let dev = Device::new(&server.url, &fx, "true", "");
    // The first switch and three redone ones: each time the new slot never
    // comes up, the bootloader falls back after bootlimit (3) failed boots and
    // the non-conforming script clears the count.
    for round in 0..4 {
        let st = run_to_exit(&dev, Duration::from_secs(60)).await;
        assert!(st.success(), "round {round}: {st}");
        let v = dev.boot_vars();
        assert_eq!(
            (v["boot_part"].as_str(), v["upgrade_available"].as_str()),
            ("b", "1"),
            "round {round}: the agent switched to b"
        );
        for _ in 0..4 {
            ota_agent::bootctl::simulate_boot(&dev.boot_env, 3).unwrap();
        }
        assert_eq!(dev.boot_vars()["booted"], "a", "round {round}: fell back");
        dev.set_boot_var("bootcount", "0");
        assert!(
            !server.has_event(EventKind::RolledBack),
            "round {round}: gave up too early: {:?}",
            server.event_kinds()
        );
    }
    let mut agent = dev.spawn();
    server
        .wait_for("the rollback", Duration::from_secs(30), |s| {
            s.has_event(EventKind::RolledBack)
        })
        .await;
    sigterm(&agent);
    wait_exit(&mut agent, Duration::from_secs(5)).await;
    let ev = server.srv.events.lock().unwrap().clone();
    let rb = ev.iter().find(|e| e.kind == EventKind::RolledBack).unwrap();
    let reason = rb.detail.reason.as_deref().unwrap_or("");
    assert!(
        reason.contains("lost 4 times") && reason.contains("bootcount above zero"),
        "{rb:?}"
    );
    assert!(!server.has_event(EventKind::Committed));
    let v = dev.boot_vars();
    assert_eq!(
        (v["booted"].as_str(), v["boot_part"].as_str()),
        ("a", "a"),
        "{v:?}"
    );
}
