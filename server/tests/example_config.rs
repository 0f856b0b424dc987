//! The example configuration in deploy/ parses and validates.

mod common;

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

/// deploy/server.toml documents the `[connections]` defaults: it must say
/// what the code does.
#[test]
fn deploy_server_toml_states_the_connection_defaults() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
    let c = ota_server::config::ServerConfig::load(&p).unwrap();
    assert_eq!(
        c.connections,
        ota_server::config::ConnectionsConfig::default()
    );
}

/// A connection limit that would disable a protection (or cannot work) is
/// refused at load, with the option's name.
#[test]
fn bad_connection_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    for (line, says) in [
        ("header_read_timeout_ms = 0", "header_read_timeout_ms"),
        ("idle_timeout_ms = 99", "idle_timeout_ms"),
        ("body_read_timeout_ms = 0", "body_read_timeout_ms"),
        ("body_min_bytes_per_sec = 0", "body_min_bytes_per_sec"),
        ("max_connections = 0", "max_connections"),
        (
            "max_connections = 10\nmax_connections_per_address = 11",
            "max_connections_per_address",
        ),
        ("max_header_bytes = 100", "max_header_bytes"),
        ("h2_max_concurrent_streams = 0", "h2_max_concurrent_streams"),
        ("header_timeout = 5", "unknown field"),
    ] {
        std::fs::write(
            &p,
            format!(
                "data_dir = \"d\"\nadmin_token = \"0123456789abcdef\"\nsigning_key = \"k\"\n\
                 [connections]\n{line}\n"
            ),
        )
        .unwrap();
        let e = ota_server::config::ServerConfig::load(&p).unwrap_err();
        assert!(e.to_string().contains(says), "{line}: {e}");
    }
}

/// A gateway token is handed to clients on their command line (SWUpdate:
/// `-g <token>`); one beginning with `-` is read there as options, and a
/// `d` among them disables polling without an error. Refused at load.
#[test]
fn a_gateway_token_a_command_line_would_read_as_options_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    let load = |gw: &str| {
        std::fs::write(
            &p,
            format!(
                "data_dir = \"d\"\nadmin_token = \"0123456789abcdef\"\nsigning_key = \"k\"\n\
                 [ddi]\ngateway_token = \"{gw}\"\n"
            ),
        )
        .unwrap();
        ota_server::config::ServerConfig::load(&p)
    };
    for bad in ["-d0123456789abcdef", "0123456789 abcdef"] {
        let e = load(bad).unwrap_err();
        assert!(e.to_string().contains("ddi.gateway_token"), "{bad}: {e}");
    }
    load("0123456789abcdef-_").unwrap();
}

/// The nginx example (deploy/examples/nginx.conf) is accepted by `nginx -t`
/// (its certificate, pid and log paths pointed at a temporary directory).
#[test]
fn nginx_example_passes_nginx_t() {
    if !common::require_tool("nginx", "nginx-light") || !common::require_tool("openssl", "openssl")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::self_signed_cert(d, "ota.example.com");
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/nginx.conf");
    let conf = std::fs::read_to_string(p)
        .unwrap()
        .replace("/etc/ota-server/tls/", &format!("{}/", d.display()))
        .replace("/run/", &format!("{}/", d.display()))
        .replace("/var/log/nginx/", &format!("{}/", d.display()));
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let nginx = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|n| std::path::Path::new(n).exists())
        .unwrap_or("nginx");
    let out = std::process::Command::new(nginx)
        .arg("-t")
        .arg("-p")
        .arg(d)
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `delta_xz`, `delta_zero_runs`, `delta_arm64` and `delta_frames` take
/// `true`, `false` or `"auto"` (the default); anything else is refused with
/// the choices named.
#[test]
fn codec_settings_take_true_false_or_auto() {
    use ota_server::config::{CodecUse, ServerConfig};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    let base = "data_dir = \"d\"\nadmin_token = \"0123456789abcdef\"\nsigning_key = \"k\"\n";
    std::fs::write(&p, base).unwrap();
    let c = ServerConfig::load(&p).unwrap();
    assert_eq!(
        [c.delta_xz, c.delta_zero_runs, c.delta_arm64, c.delta_frames],
        [CodecUse::Auto; 4]
    );
    std::fs::write(
        &p,
        format!(
            "{base}delta_xz = true\ndelta_zero_runs = false\ndelta_arm64 = \"auto\"\n\
             delta_frames = false\n"
        ),
    )
    .unwrap();
    let c = ServerConfig::load(&p).unwrap();
    assert_eq!(
        (c.delta_xz, c.delta_zero_runs, c.delta_arm64, c.delta_frames),
        (CodecUse::On, CodecUse::Off, CodecUse::Auto, CodecUse::Off)
    );
    std::fs::write(&p, format!("{base}delta_arm64 = \"yes\"\n")).unwrap();
    let e = ServerConfig::load(&p).unwrap_err().to_string();
    assert!(
        e.contains(r#"expected true, false or "auto", found "yes""#),
        "{e}"
    );
}
