//! End to end: the real `ota-server` and real `ota-agent` daemons with file
//! slots and the `file` boot back-end. One device passes its health check
//! and commits 2.0; the other fails it and rolls back to 1.0, untouched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ota_tests::{bin, images};

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const ADMIN: &str = "582431ebdbd27bb3df74a2d0a425592d";
const ENROLL: &str = "5fccf83b952b091e02bba4731785a74a";

fn server(dir: &Path) -> (Child, String) {
    Command::new(bin("ota-server"))
        .args(["keygen", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nadmin_token = \"{ADMIN}\"\nenrollment_key = \"{ENROLL}\"\nsigning_key = \"ota-signing.key\"\nzstd_level = 3\nchunk_size = 65536\n[checkin]\nidle_interval_ms = 300\nwait_interval_ms = 300\nlease_ms = 10000\n"
        ),
    )
    .unwrap();
    let mut c = Command::new(bin("ota-server"))
        .args(["serve", "--config"])
        .arg(dir.join("server.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("ota-server listening on ")
        .expect("server started")
        .to_string();
    (c, format!("http://{addr}"))
}

fn cli(base: &str, args: &[&str]) -> String {
    let o = Command::new(bin("ota-server"))
        .args(args)
        .env("OTA_SERVER", base)
        .env("OTA_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ota-server {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Dev {
    dir: PathBuf,
    cfg: PathBuf,
}

fn device(root: &Path, name: &str, base: &str, keydir: &Path, v1: &[u8], health: &str) -> Dev {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("slot-a.img"), v1).unwrap();
    std::fs::write(d.join("slot-b.img"), b"").unwrap();
    std::fs::write(d.join("enroll.key"), ENROLL).unwrap();
    let agent = bin("ota-agent");
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"server_url = "{base}"
device_id = "{name}"
device_type = "board"
enrollment_key_file = "{d}/enroll.key"
data_dir = "{d}/data"
trusted_keys = ["{k}/ota-signing.pub"]
require_freshness = true
factory_version = "1.0"
checkin_interval = "300ms"
max_backoff = "1s"
range_size = 65536
health_check = "{health}"
health_timeout = "10s"
reboot_command = "{agent} simulate-boot --env-file {d}/boot.env --bootlimit 3"
log_format = "text"
[slots]
a = "{d}/slot-a.img"
b = "{d}/slot-b.img"
[boot]
backend = "file"
env_file = "{d}/boot.env"
bootlimit = 3
"#,
            d = d.display(),
            k = keydir.display(),
            agent = agent.display(),
        ),
    )
    .unwrap();
    // Power-on: the simulated bootloader records the running slot.
    let st = Command::new(&agent)
        .args(["simulate-boot", "--env-file"])
        .arg(d.join("boot.env"))
        .status()
        .unwrap();
    assert!(st.success(), "simulate-boot");
    Dev { dir: d, cfg }
}

fn agent_log(d: &Dev) -> std::path::PathBuf {
    d.dir.join(format!("agent-{}.log", std::process::id()))
}

/// Starts the agent daemon; its log is appended to, across restarts.
fn run_agent(d: &Dev, extra: &[&str]) -> Child {
    Command::new(bin("ota-agent"))
        .args(["run", "--config"])
        .arg(&d.cfg)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(agent_log(d))
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

fn status(d: &Dev) -> String {
    let o = Command::new(bin("ota-agent"))
        .args(["status", "--config"])
        .arg(&d.cfg)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
