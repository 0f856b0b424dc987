//! The example configuration in deploy/ parses and validates.

#[test]
fn deploy_server_toml_is_valid() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
    let c = ota_server::config::ServerConfig::load(&p).unwrap();
    assert_eq!(c.checkin.lease_ms, 120_000);
    assert!(c.tls.is_none());
}

#[test]
fn deploy_replica_example_is_valid() {
    use ota_server::config::{StorageBackend, ThrottleBackend};
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/server-replica.toml");
    let c = ota_server::config::ServerConfig::load(&p).unwrap();
    assert_eq!(c.storage.backend, StorageBackend::Postgres);
    assert_eq!(c.throttle.backend, ThrottleBackend::Redis);
}

#[test]
fn a_shared_throttle_without_shared_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(
        &p,
        "data_dir = \"d\"\nadmin_token = \"0123456789abcdef\"\nsigning_key = \"k\"\n\
         [throttle]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1/\"\n",
    )
    .unwrap();
    let e = ota_server::config::ServerConfig::load(&p).unwrap_err();
    assert!(e.to_string().contains("needs storage.backend"), "{e}");
}

/// Issue 19, defect 5: `serve` started with `deploy/server.toml`'s
/// placeholder secrets without a word.
#[test]
fn serve_refuses_placeholder_secrets_unless_insecure_dev() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let key = ota_format::SigningKeyPair::generate().unwrap();
    std::fs::write(dir.path().join("k"), key.to_pem().unwrap()).unwrap();
    // The shipped file with only what a test cannot use changed.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml"),
    )
    .unwrap();
    let text: String = shipped
        .lines()
        .map(|l| {
            if l.starts_with("listen =") {
                "listen = \"127.0.0.1:0\"".to_string()
            } else if l.starts_with("data_dir =") {
                "data_dir = \"data\"".to_string()
            } else if l.starts_with("signing_key =") {
                "signing_key = \"k\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("change-me-admin-token"));
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with placeholders: {err}");
    assert!(err.contains("admin_token is weak"), "{err}");
    assert!(err.contains("enrollment_key is weak"), "{err}");
    assert!(err.contains("openssl rand -hex 32"), "{err}");
    assert!(err.contains("--insecure-dev"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "a refused start must change nothing"
    );

    // A short secret is refused the same way.
    let short = text.replace("change-me-admin-token", "Xq3vB9tLm2Zp7Rk4");
    std::fs::write(&cfg, &short).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("16 bytes long; at least 32"), "{err}");

    // --insecure-dev starts, and says why it should not have.
    std::fs::write(&cfg, &text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["serve", "--insecure-dev", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(line.starts_with("ota-server listening on"), "{line:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-dev: starting anyway"), "{err}");
}
