//! End to end, issue 15: maintenance windows with the real `ota-server` and
//! real `ota-agent` daemons (file slots, `file` boot back-end). Outside the
//! rollout's window three devices download and verify, report
//! `waiting-for-window` and hold no lease; one agent restarts while waiting
//! and keeps its verified slot; one device installs on its own
//! `ota-agent install-now`, one on the operator's `rollout install-now
//! --devices`, the last when the server's window clock (moved through the
//! test-build hook, not hours of sleep) enters the window. The window is
//! `local`: it opens on the devices' own wall clock, in the zone the agents
//! report (their `time_zone` setting).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ota_tests::fleet_e2e::*;
use ota_tests::{bin, images};

const HOUR_MS: i64 = 3_600_000;

/// A daily one-hour window in each device's own zone (`local`) opening six
/// hours from now for the devices here, which say they are in Asia/Dhaka
/// (UTC+06:00 all year): judged in UTC, as it would be if the agent did not
/// report its zone, it would open twelve hours from now instead.
fn local_window_six_hours_ahead() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = (now + 6 * 3600 + 6 * 3600) % 86_400;
    format!("daily {:02}:{:02}+1h local", at / 3600, at % 3600 / 60)
}

/// The agents' configured zone (`time_zone`), reported in their check-ins.
const ZONE: &str = "Asia/Dhaka";

fn set_window_clock(base: &str, offset_ms: i64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = rt.block_on(async {
        reqwest::Client::new()
            .put(format!("{base}/api/v1/admin/test/window-clock"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "offset_ms": offset_ms }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(st.is_success(), "window-clock hook: {st}");
}

fn stop(c: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(c.id().to_string())
        .status();
    let _ = c.wait();
}

/// Polls until `pred` holds for the `rollout status` text.
fn wait_rollout(base: &str, id: &str, what: &str, devs: &[&Dev], pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let st = cli(base, &["rollout", "status", id]);
        if pred(&st) {
            return;
        }
        if Instant::now() > deadline {
            let agents: Vec<String> = devs
                .iter()
                .map(|d| {
                    format!(
                        "{}\n{}",
                        status(d),
                        std::fs::read_to_string(agent_log(d)).unwrap_or_default()
                    )
                })
                .collect();
            panic!("{what}: not reached\n{st}\n{}", agents.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn runs(d: &Dev, version: &str) -> bool {
    status(d).contains(&format!("version:      {version}\n"))
}

fn wait_device(d: &Dev, version: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !runs(d, version) {
        assert!(
            Instant::now() < deadline,
            "{} never ran {version}:\n{}\n{}",
            d.dir.display(),
            status(d),
            std::fs::read_to_string(agent_log(d)).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn devices_download_outside_the_window_wait_without_leases_and_install_on_each_trigger() {
    let root = tempfile::tempdir().unwrap();
    let v1 = images::base(1 << 20, 11);
    let mut v2 = images::next_version(&v1);
    v2.resize(v1.len(), 0);
    std::fs::write(root.path().join("v1.img"), &v1).unwrap();
    std::fs::write(root.path().join("v2.img"), &v2).unwrap();
    let sdir = root.path().join("server");
    std::fs::create_dir_all(&sdir).unwrap();
    let (srv, base) = server(&sdir);
    let mut procs = Kill(vec![srv]);
    for (v, f) in [("1.0", "v1.img"), ("2.0", "v2.img")] {
        let img = root.path().join(f);
        cli(
            &base,
            &[
                "release",
                "add",
                "--version",
                v,
                "--device-type",
                "board",
                "--image",
                img.to_str().unwrap(),
                "--wait",
            ],
        );
    }
    let devs: Vec<Dev> = ["win-a", "win-b", "win-c"]
        .iter()
        .map(|n| {
            let d = device(root.path(), n, &base, &sdir, &v1, "true");
            let cfg = std::fs::read_to_string(&d.cfg).unwrap();
            let cfg = cfg.replace("[slots]", &format!("time_zone = \"{ZONE}\"\n[slots]"));
            std::fs::write(&d.cfg, cfg).unwrap();
            d
        })
        .collect();
    let window = local_window_six_hours_ahead();
    // Cap 1: three devices can only all get through if waiting ones give
    // their download slot back.
    let id = cli(
        &base,
        &[
            "rollout",
            "create",
            "--release",
            "2.0",
            "--device-type",
            "board",
            "--max-concurrent",
            "1",
            "--max-starts-per-min",
            "600",
            "--window",
            &window,
        ],
    )
    .trim()
    .to_string();
    let restart = ["--restart-after-reboot"];
    let mut agents: Vec<Child> = devs.iter().map(|d| run_agent(d, &restart)).collect();
    let refs: Vec<&Dev> = devs.iter().collect();
    wait_rollout(&base, &id, "all three waiting", &refs, |st| {
        st.contains("waiting-for-window: 3 ")
    });
    let st = cli(&base, &["rollout", "status", &id]);
    assert!(
        st.contains("leases 0/1"),
        "waiting devices hold no lease:\n{st}"
    );
    assert!(st.contains("install windows: daily"), "{st}");
    for d in &devs {
        let s = status(d);
        assert!(s.contains("(waiting-for-window)"), "{s}");
        assert!(runs(d, "1.0"), "nobody switched outside the window: {s}");
    }

    // An agent restarted while waiting keeps its verified update.
    stop(&mut agents[1]);
    agents[1] = run_agent(&devs[1], &restart);
    std::thread::sleep(Duration::from_secs(2));
    assert!(status(&devs[1]).contains("(waiting-for-window)"));

    // The device's own trigger.
    let o = Command::new(bin("ota-agent"))
        .args(["install-now", "--config"])
        .arg(&devs[2].cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_device(&devs[2], "2.0");
    assert!(runs(&devs[0], "1.0") && runs(&devs[1], "1.0"));

    // The operator's, for one device.
    let out = cli(
        &base,
        &["rollout", "install-now", &id, "--devices", "win-a"],
    );
    assert!(out.contains("win-a"), "{out}");
    wait_device(&devs[0], "2.0");
    assert!(runs(&devs[1], "1.0"), "win-b still waits for the window");

    // The window opens (by the server's window clock): the last one.
    set_window_clock(&base, 6 * HOUR_MS + 60_000);
    wait_device(&devs[1], "2.0");
    wait_rollout(&base, &id, "three committed", &refs, |st| {
        st.contains("waiting-for-window: 0 ")
            && st
                .lines()
                .find(|l| l.trim_start().starts_with("all"))
                .is_some_and(|l| l.split_whitespace().nth(8) == Some("3"))
    });
    for (d, c) in devs.iter().zip(agents.iter_mut()) {
        stop(c);
        let b = std::fs::read(d.dir.join("slot-b.img")).unwrap();
        assert_eq!(&b[..v2.len()], &v2[..], "{}", d.dir.display());
        assert!(status(d).contains("booted slot:  b"));
    }
    procs.0.extend(agents);
}
