//! The real `ota-agent` against the real `ota-server` over mTLS: at first
//! start the agent makes its key, enrolls with a CSR, stores the certificate
//! the fleet CA issued and checks in with it (no bearer token); revoking the
//! certificate with `ota-server device revoke-cert` stops its check-ins.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ota_tests::bin;
// Secrets strong enough for `ota-server serve` without --insecure-dev.
use ota_tests::loadtest::{ADMIN, ENROLL};
use ota_tests::pki::Pki;

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn server(dir: &Path, pki: &Pki) -> (Child, String) {
    Command::new(bin("ota-server"))
        .args(["keygen", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nadmin_token = \"{ADMIN}\"\n\
             enrollment_key = \"{ENROLL}\"\nsigning_key = \"ota-signing.key\"\n\
             [checkin]\nidle_interval_ms = 300\nwait_interval_ms = 300\n\
             [tls]\ncert = \"{p}/server.pem\"\nkey = \"{p}/server.key\"\n\
             client_ca = \"{p}/ca.pem\"\nclient_ca_key = \"{p}/ca.key\"\nclient_cert_days = 30\n",
            p = pki.dir.display()
        ),
    )
    .unwrap();
    let mut c = Command::new(bin("ota-server"))
        .args(["serve", "--config"])
        .arg(dir.join("server.toml"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
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
    (c, format!("https://{addr}"))
}

/// The admin CLI over HTTPS, trusting the test CA (`SSL_CERT_FILE`).
fn cli_output(base: &str, pki: &Pki, args: &[&str]) -> std::process::Output {
    Command::new(bin("ota-server"))
        .args(args)
        .env("OTA_SERVER", base)
        .env("OTA_ADMIN_TOKEN", ADMIN)
        .env("SSL_CERT_FILE", pki.path("ca.pem"))
        .output()
        .unwrap()
}

/// Same, asserting success; its standard output.
fn cli(base: &str, pki: &Pki, args: &[&str]) -> String {
    let o = cli_output(base, pki, args);
    assert!(
        o.status.success(),
        "ota-server {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// When the server last heard from device `id`; 0 before it enrolled.
fn last_seen(base: &str, pki: &Pki, id: &str) -> u64 {
    let o = cli_output(base, pki, &["device", "show", "--json", id]);
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && err.contains("404") {
        return 0;
    }
    assert!(o.status.success(), "ota-server device show {id}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["last_seen_ms"].as_u64().unwrap_or(0)
}

#[test]
fn an_agent_enrolls_with_a_csr_and_then_checks_in_with_its_certificate() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(&root.path().join("pki"));
    let sdir = root.path().join("server");
    std::fs::create_dir_all(&sdir).unwrap();
    let (srv, base) = server(&sdir, &pki);
    let mut procs = Kill(vec![srv]);

    let d = root.path().join("dev-m");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("slot-a.img"), vec![1u8; 65536]).unwrap();
    std::fs::write(d.join("slot-b.img"), b"").unwrap();
    std::fs::write(d.join("enroll.key"), ENROLL).unwrap();
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"server_url = "{base}"
device_id = "dev-m"
device_type = "board"
enrollment_key_file = "{d}/enroll.key"
data_dir = "{d}/data"
trusted_keys = ["{s}/ota-signing.pub"]
server_ca = "{p}/ca.pem"
client_cert = "{d}/tls/client.pem"
client_key = "{d}/tls/client.key"
checkin_interval = "300ms"
max_backoff = "1s"
reboot_command = "true"
[slots]
a = "{d}/slot-a.img"
b = "{d}/slot-b.img"
[boot]
backend = "file"
env_file = "{d}/boot.env"
"#,
            d = d.display(),
            s = sdir.display(),
            p = pki.dir.display(),
        ),
    )
    .unwrap();
    // Power-on: the (simulated) bootloader records the booted slot.
    let st = Command::new(bin("ota-agent"))
        .args(["simulate-boot", "--env-file"])
        .arg(d.join("boot.env"))
        .status()
        .unwrap();
    assert!(st.success(), "simulate-boot");
    let log = d.join("agent.log");
    procs.0.push(
        Command::new(bin("ota-agent"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_seen(&base, &pki, "dev-m") == 0 {
        assert!(
            Instant::now() < deadline,
            "the agent never checked in; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (cert, key) = (d.join("tls/client.pem"), d.join("tls/client.key"));
    assert!(pki.verifies("ca", &cert), "the fleet CA issued it");
    assert_eq!(pki.subject(&cert), "subject=CN = dev-m");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "the device's private key is private"
    );
    // The certificate is the agent's identity: once revoked, its check-ins
    // are refused (a token-authenticated agent would carry on).
    let out = cli(&base, &pki, &["device", "revoke-cert", "dev-m"]);
    assert!(out.contains("revoked"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let seen = last_seen(&base, &pki, "dev-m");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        last_seen(&base, &pki, "dev-m"),
        seen,
        "no check-in after the revocation"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("certificate_revoked"),
        "the agent says why:\n{text}"
    );
    let slog = std::fs::read_to_string(sdir.join("server.log")).unwrap();
    assert!(
        slog.contains("revoked client certificate refused"),
        "{slog}"
    );
}
