//! Download now, install later (issue 15), with the real `ota-agent` binary
//! against the test server: a gated offer is downloaded and verified, then
//! the agent reports `waiting-for-window` and does not switch; the verified
//! slot survives a restart; an `install` answer switches it, after hashing
//! the slot again — a slot changed while waiting fails instead of booting.

mod common;

use std::time::Duration;

use common::*;
use ota_format::api::{AgentState, EventKind};

/// Whether boot was switched to slot B.
fn switched(dev: &Device) -> bool {
    dev.boot_vars().get("boot_part").is_some_and(|p| p == "b")
}

fn gated(fx: &Fixture, id: &str) -> ota_format::api::UpdateOffer {
    let mut o = fx.offer(id);
    o.install_gated = true;
    o
}

async fn wait_waiting_checkins(server: &Server, at_least: usize) {
    server
        .wait_for(
            "check-ins as waiting-for-window",
            Duration::from_secs(60),
            |s| {
                s.srv
                    .checkins
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.state == AgentState::WaitingForWindow)
                    .count()
                    >= at_least
            },
        )
        .await;
}

fn waiting_checkins(server: &Server) -> usize {
    server
        .srv
        .checkins
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.state == AgentState::WaitingForWindow)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_update_waits_verified_survives_a_restart_and_switches_on_install() {
    let fx = Fixture::new(1 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(gated(&fx, "u-gated"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    wait_waiting_checkins(&server, 2).await;
    let kinds = server.event_kinds();
    assert!(kinds.contains(&EventKind::Downloaded), "{kinds:?}");
    assert!(kinds.contains(&EventKind::WaitingForWindow), "{kinds:?}");
    assert!(!kinds.contains(&EventKind::Installed), "{kinds:?}");
    assert!(!switched(&dev), "no switch while waiting");
    assert_eq!(dev.slot_prefix(&dev.slot_b, fx.new.len()), fx.new);
    assert!(
        dev.status().contains("(waiting-for-window)"),
        "{}",
        dev.status()
    );

    // A restart while waiting: it waits again, without downloading again.
    let ranges = server
        .srv
        .range_requests
        .load(std::sync::atomic::Ordering::SeqCst);
    sigterm(&agent.0);
    let st = wait_exit(&mut agent.0, Duration::from_secs(5)).await;
    assert!(st.success(), "{st}");
    let before = waiting_checkins(&server);
    let mut agent = dev.spawn();
    wait_waiting_checkins(&server, before + 1).await;
    assert_eq!(
        server
            .srv
            .range_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        ranges,
        "the verified slot is kept, not fetched again"
    );

    // The window opens: install, switch, "reboot" (the agent exits).
    server
        .srv
        .install
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let st = wait_exit(&mut agent.0, Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
    assert!(switched(&dev));
    server
        .wait_for("installed", Duration::from_secs(10), |s| {
            s.has_event(EventKind::Installed)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_changed_while_waiting_fails_the_install_instead_of_booting_it() {
    let fx = Fixture::new(1 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(gated(&fx, "u-tampered"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let _agent = dev.spawn();
    wait_waiting_checkins(&server, 1).await;
    // Something writes to the inactive slot while the update waits.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev.slot_b)
            .unwrap();
        f.write_all_at(b"\xff\xfe", 4096).unwrap();
    }
    server
        .srv
        .install
        .store(true, std::sync::atomic::Ordering::SeqCst);
    server
        .wait_for("failed", Duration::from_secs(30), |s| {
            s.has_event(EventKind::Failed)
        })
        .await;
    let reason = server
        .srv
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.kind == EventKind::Failed)
        .and_then(|e| e.detail.reason.clone())
        .unwrap();
    assert!(
        reason.contains("changed while the update waited"),
        "{reason}"
    );
    assert!(!switched(&dev), "never switched");
    assert!(!server.has_event(EventKind::Installed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_install_now_switches_a_waiting_update_without_the_server() {
    let fx = Fixture::new(1 << 20, 256 << 10, false);
    let server = Server::start(&[&fx]).await;
    *server.srv.offer.lock().unwrap() = Some(gated(&fx, "u-local"));
    let dev = Device::new(&server.url, &fx, "true", "");
    let mut agent = dev.spawn();
    wait_waiting_checkins(&server, 1).await;
    let o = std::process::Command::new(agent_bin())
        .args(["install-now", "--config"])
        .arg(&dev.config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("will be installed now"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let st = wait_exit(&mut agent.0, Duration::from_secs(30)).await;
    assert!(st.success(), "{st}");
    assert!(switched(&dev));
    // Without an update in hand the command says so and fails.
    let o = std::process::Command::new(agent_bin())
        .args(["install-now", "--config"])
        .arg(&dev.config)
        .output()
        .unwrap();
    assert!(!o.status.success());
}
