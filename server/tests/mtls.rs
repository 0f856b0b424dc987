//! Device certificates (mTLS) against the real server over real TLS on
//! 127.0.0.1, with certificates made by the `openssl` CLI: valid, expired,
//! not yet valid, from another CA, revoked (state list and CRL), for another
//! device; CSR enrollment. `mtls_pg` runs the same suite on PostgreSQL.

#[path = "common/mod.rs"]
mod common;
#[path = "../../tests/src/pki.rs"]
mod pki;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use ota_format::api::*;
use pki::{CertFiles, Pki};
use tokio_util::sync::CancellationToken;

/// Everything the server logs in this test binary (tests assert on the
/// operator-facing lines).
fn server_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("ota_server=info")
            .with_writer(move || W(b.clone()))
            .try_init();
        buf
    })
    .clone()
}

fn log_text() -> String {
    String::from_utf8_lossy(&server_log().lock().unwrap()).into_owned()
}

struct Fixture {
    ts: TestServer,
    pki: Pki,
    _pki_dir: tempfile::TempDir,
    https: String,
}

fn tls_section(pki: &Pki, extra: &str) -> String {
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{extra}\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        pki.path("ca.pem").display(),
    )
}

/// A server with `[tls]` and the fleet CA, its key when `sign_csrs`.
async fn fixture_with(sign_csrs: bool, extra_tls: &str) -> Fixture {
    server_log();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let key = if sign_csrs {
        format!("client_ca_key = \"{}\"\n", pki.path("ca.key").display())
    } else {
        String::new()
    };
    let ts = TestServer::start(&tls_section(&pki, &format!("{key}{extra_tls}"))).await;
    let https = ts.base.replace("http://", "https://");
    Fixture {
        ts,
        pki,
        _pki_dir: dir,
        https,
    }
}

async fn fixture() -> Fixture {
    fixture_with(true, "").await
}

impl Fixture {
    /// A client trusting the fleet CA, presenting `cert` if given.
    fn client(&self, cert: Option<&CertFiles>) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.pki.path("ca.pem")).unwrap())
            .unwrap();
        let mut b = reqwest::Client::builder().tls_certs_only([ca]);
        if let Some(c) = cert {
            b = b.identity(reqwest::Identity::from_pem(&c.identity_pem()).unwrap());
        }
        b.build().unwrap()
    }

    async fn enroll(&self, id: &str) -> Sim {
        Sim::enroll(&self.https, id, "t", &self.client(None)).await
    }

    /// A check-in with the certificate (and `token` when given).
    async fn checkin(
        &self,
        cert: &CertFiles,
        token: Option<&str>,
    ) -> Result<reqwest::Response, String> {
        let mut rb = self
            .client(Some(cert))
            .post(format!("{}/api/v1/devices/checkin", self.https))
            .json(&idle_request("1.0", ota_format::manifest::codecs()));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().await.map_err(|e| error_chain(&e))
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        self.client(None)
            .request(method, format!("{}{path}", self.https))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn last_seen(&self, id: &str) -> u64 {
        let v: serde_json::Value = self
            .admin(
                reqwest::Method::GET,
                &format!("/api/v1/admin/devices/{id}"),
                serde_json::json!({}),
            )
            .await
            .json()
            .await
            .unwrap();
        v["last_seen_ms"].as_u64().unwrap_or(0)
    }

    async fn revoke(&self, id: &str, serial: Option<&str>) -> reqwest::Response {
        self.admin(
            reqwest::Method::POST,
            &format!("/api/v1/admin/devices/{id}/revoke-cert"),
            serde_json::json!({ "serial": serial }),
        )
        .await
    }

    async fn enroll_csr(&self, id: &str, csr: &str) -> reqwest::Response {
        self.client(None)
            .post(format!("{}/api/v1/devices/enroll", self.https))
            .json(&EnrollRequest {
                enrollment_key: ENROLL.into(),
                device_id: id.into(),
                device_type: "t".into(),
                tags: Default::default(),
                csr: Some(csr.into()),
            })
            .send()
            .await
            .unwrap()
    }

    /// Stops the server and starts it again on the same configuration and
    /// state (a new port).
    async fn restart(&mut self) {
        self.ts.stop().await;
        let cfg = ota_server::config::ServerConfig::load(&self.ts.dir.path().join("server.toml"))
            .unwrap();
        // Connections the clients kept alive hold the old state open (sled's
        // lock) until they close: retry for a while.
        let mut tries = 0;
        let running = loop {
            match ota_server::app::start(cfg.clone(), CancellationToken::new()).await {
                Ok(r) => break r,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("restart: {e:#}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => panic!("restarting the server: {e:#}"),
            }
        };
        self.https = format!("https://{}", running.addr);
        self.ts.running = Some(running);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    (
        status,
        body["code"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_checks_in_by_certificate_and_bearer_devices_share_the_listener() {
    let f = fixture().await;
    let bearer = f.enroll("bearer-dev").await;
    f.enroll("cert-dev").await;
    let cert = f.pki.device("cert-dev", "cert-dev");
    let r = f.checkin(&cert, None).await.unwrap();
    assert_eq!(r.status(), 200, "a valid certificate alone authenticates");
    assert!(
        f.last_seen("cert-dev").await > 0,
        "the check-in was recorded for the certificate's device"
    );
    // A bearer-token device on the same listener, no certificate.
    bearer.checkin("1.0", AgentState::Idle, None).await;
    // Artifacts accept the certificate too (404: authenticated, no such artifact).
    let r = f
        .client(Some(&cert))
        .get(format!("{}/api/v1/artifacts/{}", f.https, "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = f
        .client(None)
        .get(format!("{}/api/v1/artifacts/{}", f.https, "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "without certificate or token");
    // A valid certificate of a device that never enrolled.
    let stranger = f.pki.device("stranger", "stranger");
    let (status, _) = code(f.checkin(&stranger, None).await.unwrap()).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_not_yet_valid_and_foreign_certificates_are_refused_with_the_reason() {
    let f = fixture().await;
    f.enroll("dev-e").await;
    let expired = f.pki.issue(
        "ca",
        "expired",
        "dev-e",
        Some(("20200101000000Z", "20200201000000Z")),
        "client_ext",
    );
    let future = f.pki.issue(
        "ca",
        "future",
        "dev-e",
        Some(("20990101000000Z", "20991231000000Z")),
        "client_ext",
    );
    f.pki.new_ca("rogue", "rogue CA");
    let foreign = f.pki.issue("rogue", "foreign", "dev-e", None, "client_ext");
    for (cert, says) in [
        (&expired, "certificate expired"),
        (&future, "certificate not valid yet"),
        (&foreign, "UnknownIssuer"),
    ] {
        let r = f.checkin(cert, None).await.unwrap();
        assert_eq!(r.status(), 403, "{}", cert.cert.display());
        let e: ApiError = r.json().await.unwrap();
        assert_eq!(e.code, "certificate_refused");
        assert!(
            e.error.contains(says),
            "the client is told why: {}",
            e.error
        );
        let log = log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("client certificate refused") && l.contains(says)),
            "the server log names the reason {says:?}:\n{log}"
        );
        // A valid bearer token does not rescue a refused certificate.
        let tok = f.enroll("dev-tok").await.token;
        assert_eq!(f.checkin(cert, Some(&tok)).await.unwrap().status(), 403);
    }
    assert_eq!(
        f.last_seen("dev-e").await,
        0,
        "no refused certificate got through"
    );
    let good = f.pki.device("good", "dev-e");
    assert_eq!(f.checkin(&good, None).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_and_stays_revoked_after_a_restart() {
    let mut f = fixture().await;
    f.enroll("dev-r").await;
    let a = f.pki.device("a", "dev-r");
    let b = f.pki.device("b", "dev-r");
    assert_eq!(f.checkin(&a, None).await.unwrap().status(), 200);
    let serial = f.pki.serial(&a.cert);
    let r = f.revoke("dev-r", Some(&format!("serial={serial}"))).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["revoked"][0].as_str().unwrap(),
        serial.to_lowercase().trim_start_matches('0')
    );
    assert_eq!(
        code(f.checkin(&a, None).await.unwrap()).await,
        (403, "certificate_revoked".into())
    );
    assert!(log_text().contains("revoked client certificate refused"));
    // Per certificate: the device's other certificate still works.
    assert_eq!(f.checkin(&b, None).await.unwrap().status(), 200);
    f.restart().await;
    assert_eq!(
        code(f.checkin(&a, None).await.unwrap()).await,
        (403, "certificate_revoked".into()),
        "the revocation list is durable"
    );
    assert_eq!(f.checkin(&b, None).await.unwrap().status(), 200);
    // Bad input changes nothing.
    let (status, _) = code(f.revoke("dev-r", Some("not-hex")).await).await;
    assert_eq!(status, 400);
    assert_eq!(f.checkin(&b, None).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_one_device_cannot_act_as_another() {
    let f = fixture().await;
    f.enroll("dev-x").await;
    let y = f.enroll("dev-y").await;
    let x_cert = f.pki.device("x", "dev-x");
    assert_eq!(
        code(f.checkin(&x_cert, Some(&y.token)).await.unwrap()).await,
        (403, "identity_mismatch".into())
    );
    assert_eq!(f.last_seen("dev-y").await, 0, "nothing was recorded for Y");
    assert_eq!(f.last_seen("dev-x").await, 0, "nor for X");
    // X's certificate speaks for X only.
    assert_eq!(f.checkin(&x_cert, None).await.unwrap().status(), 200);
    assert!(f.last_seen("dev-x").await > 0);
    assert_eq!(f.last_seen("dev-y").await, 0);
    // A CSR for X in an enrollment as Y is refused, and Y keeps its token.
    let csr = std::fs::read_to_string(f.pki.csr("x2", "dev-x")).unwrap();
    assert_eq!(
        code(f.enroll_csr("dev-y", &csr).await).await,
        (403, "csr_mismatch".into())
    );
    y.checkin("1.0", AgentState::Idle, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_enrollment_returns_a_certificate_of_the_fleet_ca_that_authenticates_and_revokes() {
    let f = fixture().await;
    let csr_path = f.pki.csr("c", "dev-c");
    let r = f
        .enroll_csr("dev-c", &std::fs::read_to_string(&csr_path).unwrap())
        .await;
    assert_eq!(r.status(), 200);
    let resp: EnrollResponse = r.json().await.unwrap();
    let pem = resp.certificate.expect("a certificate for the CSR");
    let cert = CertFiles {
        cert: f.pki.path("c.pem"),
        key: f.pki.path("c.key"),
    };
    std::fs::write(&cert.cert, &pem).unwrap();
    assert!(
        f.pki.verifies("ca", &cert.cert),
        "openssl verifies it against the fleet CA"
    );
    assert_eq!(f.pki.subject(&cert.cert), "subject=CN = dev-c");
    assert_eq!(f.checkin(&cert, None).await.unwrap().status(), 200);
    // `revoke-cert ID` without a serial revokes what the server issued.
    let v: serde_json::Value = f.revoke("dev-c", None).await.json().await.unwrap();
    assert_eq!(
        v["revoked"][0].as_str().unwrap(),
        f.pki
            .serial(&cert.cert)
            .to_lowercase()
            .trim_start_matches('0')
    );
    assert_eq!(
        code(f.checkin(&cert, None).await.unwrap()).await,
        (403, "certificate_revoked".into())
    );
    let (status, _) = code(f.revoke("dev-c", None).await).await;
    assert_eq!(status, 404, "nothing left to revoke");
    // A malformed CSR is refused and enrolls nothing.
    assert_eq!(code(f.enroll_csr("dev-bad", "garbage").await).await.0, 400);
    let r = f
        .admin(
            reqwest::Method::GET,
            "/api/v1/admin/devices/dev-bad",
            serde_json::json!({}),
        )
        .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_ca_key_refuses_csrs_clearly() {
    let f = fixture_with(false, "").await;
    let csr = std::fs::read_to_string(f.pki.csr("n", "dev-n")).unwrap();
    assert_eq!(
        code(f.enroll_csr("dev-n", &csr).await).await,
        (400, "csr_unsupported".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_on_the_crl_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let revoked = pki.device("on-crl", "dev-crl");
    let crl = pki.revoke_and_crl("ca", &revoked.cert);
    let ok = pki.device("fine", "dev-crl");
    server_log();
    let ts = TestServer::start(&tls_section(
        &pki,
        &format!("client_crls = [\"{}\"]\n", crl.display()),
    ))
    .await;
    let https = ts.base.replace("http://", "https://");
    let f = Fixture {
        ts,
        pki,
        _pki_dir: dir,
        https,
    };
    f.enroll("dev-crl").await;
    let (status, code_) = code(f.checkin(&revoked, None).await.unwrap()).await;
    assert_eq!((status, code_.as_str()), (403, "certificate_refused"));
    assert!(log_text().contains("Revoked"));
    assert_eq!(f.checkin(&ok, None).await.unwrap().status(), 200);
}

/// A reload rebuilds the client verifier (merge of `keys` and `mtls`): a
/// CRL file renewed in place refuses a newly revoked certificate from the
/// next handshake on, without a restart; before the reload the old list
/// still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_renewed_in_place_applies_at_reload() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let first = pki.device("first", "dev-rl");
    let later = pki.device("later", "dev-rl");
    let crl = pki.revoke_and_crl("ca", &first.cert);
    server_log();
    let ts = TestServer::start(&tls_section(
        &pki,
        &format!("client_crls = [\"{}\"]\n", crl.display()),
    ))
    .await;
    let https = ts.base.replace("http://", "https://");
    let f = Fixture {
        ts,
        pki,
        _pki_dir: dir,
        https,
    };
    f.enroll("dev-rl").await;
    assert_eq!(f.checkin(&later, None).await.unwrap().status(), 200);
    // The CA revokes `later`; the same CRL file now lists it.
    assert_eq!(f.pki.revoke_and_crl("ca", &later.cert), crl);
    assert_eq!(f.checkin(&later, None).await.unwrap().status(), 200);
    let r = f
        .client(None)
        .post(format!("{}/api/v1/admin/reload", f.https))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("client_crls"), "{body}");
    let (status, code_) = code(f.checkin(&later, None).await.unwrap()).await;
    assert_eq!((status, code_.as_str()), (403, "certificate_refused"));
}
