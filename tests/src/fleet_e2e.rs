//! The real `ota-server` and real `ota-agent` daemons for end-to-end tests
//! (`tests/e2e_rollout.rs`, `tests/windows_e2e.rs`): a server with a fresh
//! key and fast check-ins, devices with file slots and the `file` boot
//! back-end, the CLI, agent status and logs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::bin;

/// Child processes killed (and reaped) when dropped.
pub struct Kill(pub Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The admin token of [`server`].
pub const ADMIN: &str = "582431ebdbd27bb3df74a2d0a425592d";
/// The enrollment key of [`server`].
pub const ENROLL: &str = "5fccf83b952b091e02bba4731785a74a";

/// Starts the real `ota-server` with a fresh signing key in `dir` and fast
/// check-ins; returns it and its base URL.
pub fn server(dir: &Path) -> (Child, String) {
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

/// Runs the `ota-server` CLI against `base`; its stdout (panics on failure).
pub fn cli(base: &str, args: &[&str]) -> String {
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

/// A simulated device: its directory (slot files, boot environment, data)
/// and `agent.toml`.
pub struct Dev {
    pub dir: PathBuf,
    pub cfg: PathBuf,
}

/// Makes device `name` of type `board` running `v1` from slot A, with the
/// `file` boot back-end and `health` as its health check; powers it on.
pub fn device(root: &Path, name: &str, base: &str, keydir: &Path, v1: &[u8], health: &str) -> Dev {
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

/// The agent's log file (appended across restarts).
pub fn agent_log(d: &Dev) -> std::path::PathBuf {
    d.dir.join(format!("agent-{}.log", std::process::id()))
}

/// Starts the agent daemon; its log is appended to, across restarts.
pub fn run_agent(d: &Dev, extra: &[&str]) -> Child {
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

/// `ota-agent status` of `d`.
pub fn status(d: &Dev) -> String {
    let o = Command::new(bin("ota-agent"))
        .args(["status", "--config"])
        .arg(&d.cfg)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}
