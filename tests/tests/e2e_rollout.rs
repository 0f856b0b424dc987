//! End to end: the real `ota-server` and real `ota-agent` daemons with file
//! slots and the `file` boot back-end. One device passes its health check
//! and commits 2.0; the other fails it and rolls back to 1.0, untouched.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ota_tests::fleet_e2e::*;
use ota_tests::images;

#[test]
fn a_rollout_commits_on_a_healthy_device_and_rolls_back_a_sick_one() {
    let root = tempfile::tempdir().unwrap();
    let v1 = images::base(4 << 20, 7);
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
    let good = device(root.path(), "good", &base, &sdir, &v1, "true");
    let sick = device(root.path(), "sick", &base, &sdir, &v1, "false");
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
            "--min-sample",
            "10",
        ],
    );
    let id = id.trim().to_string();
    // The sick device "boots" its agent; after the agent switches slots and
    // exits (the reboot), it is started again, until it is done. The good
    // one restarts itself (--restart-after-reboot), so its process never
    // exits.
    let deadline = Instant::now() + Duration::from_secs(120);
    let restart = ["--restart-after-reboot"];
    let mut running: Vec<Option<Child>> = vec![
        Some(run_agent(&good, &restart)),
        Some(run_agent(&sick, &[])),
    ];
    let mut good_exits = 0;
    loop {
        for (i, d) in [&good, &sick].into_iter().enumerate() {
            if let Some(c) = running[i].as_mut()
                && let Some(_st) = c.try_wait().unwrap()
            {
                if i == 0 {
                    good_exits += 1;
                    running[i] = Some(run_agent(d, &restart));
                } else {
                    running[i] = Some(run_agent(d, &[]));
                }
            }
        }
        let st = cli(&base, &["rollout", "status", &id]);
        let all = st
            .lines()
            .find(|l| l.trim_start().starts_with("all"))
            .unwrap_or("")
            .to_string();
        let f: Vec<&str> = all.split_whitespace().collect();
        if f.len() > 10 && f[8] == "1" && f[10] == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rollout did not finish:\n{st}\n{}\n{}",
            status(&good),
            status(&sick)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for c in running.iter_mut().flatten() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let _ = c.wait();
    }
    procs.0.extend(running.into_iter().flatten());
    assert_eq!(
        good_exits,
        0,
        "--restart-after-reboot exited: {}",
        std::fs::read_to_string(agent_log(&good)).unwrap_or_default()
    );
    // Without it, the agent says why it exits at the "reboot".
    let log = std::fs::read_to_string(agent_log(&sick)).unwrap();
    assert!(log.contains("no real reboot"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colours in a redirected log: {log:?}"
    );

    // The healthy device runs 2.0 from slot B, byte for byte.
    let s = status(&good);
    assert!(s.contains("version:      2.0"), "{s}");
    assert!(s.contains("booted slot:  b"), "{s}");
    let b = std::fs::read(good.dir.join("slot-b.img")).unwrap();
    assert_eq!(&b[..v2.len()], &v2[..]);
    // The sick one is back on 1.0 in slot A, which was never touched.
    let s = status(&sick);
    assert!(s.contains("version:      1.0"), "{s}");
    assert!(s.contains("booted slot:  a"), "{s}");
    assert_eq!(std::fs::read(sick.dir.join("slot-a.img")).unwrap(), v1);
    // Both agents required and accepted the server's signed freshness
    // statements, and kept the floor on disk.
    for d in [&good, &sick] {
        let f: ota_format::FreshnessFloor = serde_json::from_slice(
            &std::fs::read(d.dir.join("data/freshness.json")).expect("freshness.json"),
        )
        .unwrap();
        assert!(f.seen && f.newest_issued_at > 1_700_000_000, "{f:?}");
    }
    // The server counted both outcomes.
    let st = cli(&base, &["rollout", "status", &id]);
    assert!(
        st.lines().any(|l| l.trim_start().starts_with("all")),
        "{st}"
    );
}
