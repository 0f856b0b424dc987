//! Operations: TLS, metrics, health, graceful shutdown on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_served_when_a_certificate_is_configured() {
    let certs = tempfile::tempdir().unwrap();
    let p = |n: &str| certs.path().join(n);
    let (cert, key, ca) = (p("cert.pem"), p("key.pem"), p("ca.pem"));
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    let openssl = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(certs.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(ok.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
    ]);
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let ts = TestServer::start(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ))
    .await;
    let https = ts.base.replace("http://", "https://");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let r = client.get(format!("{https}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The device API works over it.
    let r = client
        .post(format!("{https}/api/v1/devices/enroll"))
        .json(&serde_json::json!({"enrollment_key": ENROLL, "device_id": "d", "device_type": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        http()
            .get(format!("{}/healthz", ts.base))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_checkins_admissions_and_leases() {
    let ts = TestServer::with_two_releases(5000).await;
    let d = Sim::enroll(&ts.base, "d", "t", &http()).await;
    let e = Sim::enroll(&ts.base, "e", "t", &http()).await;
    let mut s = spec("2.0", "t");
    s.max_concurrent = 1;
    ts.admin.rollout_create(&s).await.unwrap();
    assert!(matches!(
        d.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Update(_)
    ));
    assert!(matches!(
        e.checkin("1.0", AgentState::Idle, None).await.action,
        Action::Wait { .. }
    ));
    tokio::time::sleep(Duration::from_millis(2200)).await; // gauges refresh on the tick
    let m = http()
        .get(format!("{}/metrics", ts.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "ota_checkins_total{action=\"update\"} 1",
        "ota_checkins_total{action=\"wait\"} 1",
        "ota_throttled_total{reason=\"concurrency_cap\"} 1",
        "ota_admissions_total 1",
        "ota_active_leases 1",
        "ota_devices 2",
        "ota_rollout{rollout=\"r1\",wave=\"1\",what=\"admitted\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    assert_eq!(
        http()
            .get(format!("{}/healthz", ts.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:0", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("ota-server listening on"));
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success()
    );
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGTERM did not stop the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
