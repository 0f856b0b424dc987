//! The fleet load test in a small configuration, faults on: the throttle
//! holds, no event is lost, no device ends on a wrong image. A fifth of the
//! fleet are hawkBit DDI targets in the same rollout (a mixed fleet under
//! one cap and start rate, through the server's kill -9). And issue 15's
//! scenario: maintenance windows in three zones and late enrollment.

use std::process::Command;

/// Runs `ota-loadtest` with `args` (and `--out` a new directory); asserts
/// it passed its own invariants. Its report, its table, and the directory.
fn run(args: &[&str]) -> (serde_json::Value, String, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(ota_tests::bin("ota-loadtest"))
        .args(args)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "ota-loadtest failed: {:?}", o.status);
    let r =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    (r, stdout, out)
}

#[test]
fn a_small_faulty_fleet_updates_within_every_limit() {
    let seed = std::env::var("OTA_LOADTEST_SEED").unwrap_or_else(|_| "20261126".into());
    eprintln!("ota-loadtest seed {seed} (set OTA_LOADTEST_SEED to reproduce)");
    let (r, stdout, out) = run(&[
        "--devices",
        "300",
        "--image-kib",
        "512",
        "--waves",
        "5,30,100",
        "--soak",
        "1s",
        "--max-concurrent",
        "15",
        "--max-starts-per-min",
        "900",
        "--idle-ms",
        "1000",
        "--wait-ms",
        "500",
        "--lease-ms",
        "2000",
        "--cut-rate",
        "0.05",
        "--corrupt-rate",
        "0.05",
        "--kill-rate",
        "0.1",
        "--silent-rate",
        "0.02",
        "--slow-rate",
        "0.03",
        "--slow-bps",
        "262144",
        "--health-fail-rate",
        "0.02",
        "--real-slot-rate",
        "0.05",
        "--ddi-share",
        "0.2",
        "--server-restart-at",
        "6s",
        "--deadline",
        "100s",
        "--quiet",
        "--seed",
        &seed,
    ]);
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing"));
    assert!(n("max_concurrent_observed_devices") <= 15);
    assert!(n("max_concurrent_observed_server_leases") <= 15);
    assert_eq!(n("start_rate_violations"), 0);
    assert_eq!(n("events_lost"), 0);
    assert_eq!(n("wrong_images"), 0);
    assert!(n("real_slots_verified") > 0, "no real slot was checked");
    assert!(n("resumes") > 0, "no device was killed mid-download");
    assert_eq!(n("server_restarts"), 1);
    // Everyone who could finish did: all but silent devices end committed or
    // rolled back (health-check failures).
    assert_eq!(
        n("committed") + n("rolled_back") + n("silent"),
        300,
        "{stdout}"
    );
    // The DDI targets were counted under the same cap above; nearly all of
    // them (the silent ones excepted) committed through the DDI API.
    assert!(n("ddi_targets") >= 30, "{stdout}");
    assert!(n("ddi_committed") + 5 >= n("ddi_targets"), "{stdout}");
    assert!(out.path().join("chart.svg").exists());
}

/// Issue 15's scenario, small: agents in three zones under one `local`
/// maintenance window, a fifth enrolling while the rollout runs, killed
/// mid-download some of them; every device ends committed (the late ones
/// joined the running rollout), most after waiting for their own zone's
/// window, and none was told to install outside it.
#[test]
fn a_fleet_in_three_zones_switches_only_inside_each_devices_window() {
    let (r, stdout, _out) = run(&[
        "--devices",
        "200",
        "--image-kib",
        "256",
        "--waves",
        "10,100",
        "--soak",
        "1s",
        "--max-concurrent",
        "10",
        "--idle-ms",
        "1000",
        "--wait-ms",
        "500",
        "--lease-ms",
        "2000",
        "--kill-rate",
        "0.05",
        "--window-zones",
        "Asia/Dhaka,Asia/Kathmandu,Asia/Kolkata",
        "--window-hold",
        "6s",
        "--late-share",
        "0.2",
        "--late-over",
        "10s",
        "--deadline",
        "150s",
        "--quiet",
        "--seed",
        "20261203",
    ]);
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(n("switched_outside_window"), 0, "{stdout}");
    assert!(n("max_concurrent_observed_server_leases") <= 10);
    assert_eq!(n("committed"), 200, "{stdout}");
    assert!(n("late_enrolled") >= 20, "{stdout}");
    assert!(
        n("installs_after_waiting_for_window") >= 100,
        "most devices waited for their window: {stdout}"
    );
    assert_eq!(n("events_lost"), 0);
    assert_eq!(n("wrong_images"), 0);
}
