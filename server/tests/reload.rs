//! Reloading `server.toml` without a restart (issue 17 item 7): under a
//! check-in storm no request fails and the new pacing takes effect; a broken
//! file changes nothing; a renewed TLS certificate is served to new
//! connections while the old one keeps serving established ones.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ota_format::api::*;

fn checkin_section(idle_ms: u64) -> String {
    format!(
        "[checkin]\nidle_interval_ms = {idle_ms}\nwait_interval_ms = 200\nlease_ms = 5000\njitter = 0.1\n"
    )
}

/// Rewrites the config with `tail` in place of everything from the first
/// section on (the top-level settings as the server started with them).
fn rewrite(ts: &TestServer, tail: &str) {
    rewrite_with(ts, tail, "", "");
}

/// Same, replacing `from` by `to` in the top-level settings.
fn rewrite_with(ts: &TestServer, tail: &str, from: &str, to: &str) {
    let cfg = ts.dir.path().join("server.toml");
    let orig = ts.dir.path().join("server.toml.orig");
    if !orig.exists() {
        std::fs::copy(&cfg, &orig).unwrap();
    }
    let mut text = std::fs::read_to_string(&orig).unwrap();
    if !from.is_empty() {
        assert!(text.contains(from), "{from} not in the config");
        text = text.replace(from, to);
    }
    let head: String = text
        .lines()
        .take_while(|l| !l.starts_with('['))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(cfg, format!("{head}{tail}")).unwrap();
}

async fn reload(base: &str) -> reqwest::Response {
    // The test certificates are self-signed: what is served is checked by
    // comparing bytes, not by a chain.
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
        .post(format!("{base}/api/v1/admin/reload"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_a_checkin_storm_fails_no_request() {
    let ts = TestServer::start(&checkin_section(200)).await;
    let client = http();
    let mut devices = Vec::new();
    for i in 0..32 {
        devices.push(Sim::enroll(&ts.base, &format!("d{i}"), "t", &client).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut storm = Vec::new();
    for d in devices.clone() {
        let (stop, done) = (stop.clone(), done.clone());
        // Sim::checkin asserts a 2xx answer: a failed request fails the test.
        storm.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                d.checkin("1.0", AgentState::Idle, None).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for round in 0..10u64 {
        let idle = if round % 2 == 0 { 40_000 } else { 200 };
        rewrite(&ts, &checkin_section(idle));
        let r = reload(&ts.base).await;
        assert!(
            r.status().is_success(),
            "reload {round}: {}",
            r.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    rewrite(&ts, &checkin_section(40_000));
    assert!(reload(&ts.base).await.status().is_success());
    stop.store(true, Ordering::Relaxed);
    for t in storm {
        t.await.expect("no check-in failed during the reloads");
    }
    let n = done.load(Ordering::Relaxed);
    assert!(n > 200, "only {n} check-ins during the storm");
    // The last reload's pacing is what devices are told now (±10 % jitter).
    let r = devices[0].checkin("1.0", AgentState::Idle, None).await;
    assert!(
        (36_000..=44_000).contains(&r.next_checkin_ms),
        "next_checkin_ms {} after reloading idle_interval_ms = 40000",
        r.next_checkin_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_reload_file_changes_nothing() {
    let ts = TestServer::start(&checkin_section(3000)).await;
    let dev = Sim::enroll(&ts.base, "d1", "t", &http()).await;
    let before = ts.app().live.config();
    for (tail, from, to, expect) in [
        ("[checkin\nidle_interval_ms = 1\n", "", "", "server.toml"),
        (
            "[checkin]\nidle_interval_ms = 0\n",
            "",
            "",
            "checkin intervals must be positive",
        ),
        ("[checkin]\njitter = 7.0\n", "", "", "jitter"),
        (
            "",
            "zstd_level",
            "log_level = \"info,[[\"\nzstd_level",
            "log_level",
        ),
        (
            "",
            "\"signing.key\"",
            "\"missing.key\"",
            "reading signing key",
        ),
        ("", "\"127.0.0.1:0\"", "\"127.0.0.1:1\"", "listen changed"),
    ] {
        rewrite_with(&ts, tail, from, to);
        let r = reload(&ts.base).await;
        assert_eq!(r.status(), 422, "{tail}");
        let body = r.text().await.unwrap();
        assert!(body.contains(expect), "{tail}: {body}");
        let after = ts.app().live.config();
        assert!(
            Arc::ptr_eq(&before, &after),
            "a refused reload swapped the config"
        );
        let a = dev.checkin("1.0", AgentState::Idle, None).await;
        assert!(
            (2400..=3600).contains(&a.next_checkin_ms),
            "the old pacing stays: {}",
            a.next_checkin_ms
        );
    }
    // Only the admin may reload.
    let r = http()
        .post(format!("{}/api/v1/admin/reload", ts.base))
        .bearer_auth(&dev.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

fn self_signed(dir: &std::path::Path, name: &str) {
    let ok = Command::new("openssl")
        .args([
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
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl)");
    assert!(ok.success());
}

/// The DER of the certificate a fresh connection is served.
async fn served_cert(base: &str) -> Vec<u8> {
    let c = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .unwrap();
    let r = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert!(r.status().is_success());
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("a TLS peer certificate")
        .to_vec()
}

fn der_of(pem: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificate_is_served_to_new_connections() {
    let certs = tempfile::tempdir().unwrap();
    self_signed(certs.path(), "old");
    self_signed(certs.path(), "renewed");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::copy(certs.path().join("old.pem"), &cert).unwrap();
    std::fs::copy(certs.path().join("old.key"), &key).unwrap();
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let ts = TestServer::start(&tls).await;
    let base = ts.base.replace("http://", "https://");
    assert_eq!(
        served_cert(&base).await,
        der_of(&certs.path().join("old.pem"))
    );
    // An established keep-alive connection, opened on the old certificate.
    let kept = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    assert!(
        kept.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );

    // A certificate and a key that do not match are refused: old one stays.
    std::fs::copy(certs.path().join("renewed.pem"), &cert).unwrap();
    let r = reload(&base).await;
    assert_eq!(r.status(), 422);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("do not make a usable pair")
    );
    assert_eq!(
        served_cert(&base).await,
        der_of(&certs.path().join("old.pem"))
    );

    // The renewed pair: new connections get it.
    std::fs::copy(certs.path().join("renewed.key"), &key).unwrap();
    let r = reload(&base).await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    assert_eq!(
        served_cert(&base).await,
        der_of(&certs.path().join("renewed.pem"))
    );
    // The established connection still works.
    assert!(
        kept.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
}

/// `[connections]` is reloadable and reaches the accept loop (merge of
/// `keys` and `net`): after a reload to one connection per address, a
/// second connection from 127.0.0.1 is closed while the first is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_connection_limits_to_new_connections() {
    let ts = TestServer::start(&checkin_section(3000)).await;
    let health = format!("{}/healthz", ts.base);
    // One idle connection held open: under the default limits a second one
    // is served.
    let held = tokio::net::TcpStream::connect(ts.base.trim_start_matches("http://"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        http()
            .get(&health)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    rewrite(
        &ts,
        &format!(
            "{}[connections]\nmax_connections_per_address = 1\n",
            checkin_section(3000)
        ),
    );
    let r = reload(&ts.base).await;
    assert!(r.status().is_success());
    let body = r.text().await.unwrap();
    assert!(body.contains("[connections]"), "{body}");
    // `held` was accepted under the old limits and still counts; a new
    // connection is over the new cap and closed before any byte is read.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert!(
        fresh.get(&health).send().await.is_err(),
        "a second connection from one address was served after the reload to max_connections_per_address = 1"
    );
    drop(held);
}
