//! A real `ota-server` on 127.0.0.1:0 with a temporary data directory, and
//! simulated devices speaking the device API over real HTTP.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ota_format::api::*;
use ota_server::app::{Running, start};
use ota_server::client::AdminClient;
use ota_server::config::ServerConfig;
use ota_server::releases::BuildStatus;
use ota_server::rollout::{OnFailure, RolloutSpec, RolloutStatus};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "a05d73208a8416267c3fe14761805415";
pub const ENROLL: &str = "89a525ce23940afbc827a48ac9afd0e4";

pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub admin: AdminClient,
}

/// Writes a signing key and a config into `dir`; returns the config path.
pub fn write_config(dir: &Path, listen: &str, extra: &str) -> PathBuf {
    let key = ota_format::SigningKeyPair::generate().unwrap();
    let key_path = dir.join("signing.key");
    if !key_path.exists() {
        std::fs::write(&key_path, key.to_pem().unwrap()).unwrap();
    }
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "{listen}"
data_dir = "data"
admin_token = "{ADMIN}"
enrollment_key = "{ENROLL}"
signing_key = "signing.key"
zstd_level = 3
chunk_size = 65536
{extra}
"#
        ),
    )
    .unwrap();
    cfg
}

/// The check-in of an idle agent on `version` that lists `codecs`, with no
/// maintenance-window gate and no time zone (what agents older than those
/// fields send).
pub fn idle_request(version: &str, codecs: ota_format::manifest::Codecs) -> CheckinRequest {
    CheckinRequest {
        install_gate: false,
        time_zone: None,
        current_version: version.into(),
        booted_slot: Slot::A,
        state: AgentState::Idle,
        update: None,
        freshness_held: None,
        delta_codecs: codecs,
    }
}

pub fn fast_checkin(lease_ms: u64) -> String {
    format!(
        "[checkin]\nidle_interval_ms = 200\nwait_interval_ms = 200\nlease_ms = {lease_ms}\njitter = 0.2\n"
    )
}

/// Whether this test binary runs its suite on PostgreSQL + Redis: the
/// `rollout_pg` (`metrics_pg`, `mtls_pg`) binary includes the `rollout_http`
/// (`metrics_http`, `mtls`) suite unchanged, so one set of tests proves both
/// backends behave alike.
pub fn on_postgres() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .is_some_and(|f| {
            f.starts_with("rollout_pg")
                || f.starts_with("metrics_pg")
                || f.starts_with("mtls_pg")
                || f.starts_with("ddi_pg")
        })
}

/// `[storage]` and `[throttle]` sections for a fresh PostgreSQL database and
/// a fresh Redis key prefix (from `OTA_TEST_PG_URL` / `OTA_TEST_REDIS_URL`,
/// which `scripts/services.sh env` prints).
pub async fn postgres_sections() -> String {
    let (Ok(pg), Ok(redis)) = (
        std::env::var("OTA_TEST_PG_URL"),
        std::env::var("OTA_TEST_REDIS_URL"),
    ) else {
        panic!(
            "this suite runs on PostgreSQL and Redis: run `scripts/services.sh start` and \
             `eval \"$(scripts/services.sh env)\"` first (or use scripts/test.sh)"
        );
    };
    let name = format!("ota_t_{:016x}", rand::random::<u64>());
    let (client, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
        .await
        .expect("connecting to OTA_TEST_PG_URL");
    let task = tokio::spawn(conn);
    client
        .execute(&format!("CREATE DATABASE {name}"), &[])
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    let url = match pg.rfind('/') {
        Some(i) if pg[..i].contains('@') || pg[..i].contains("//") => {
            format!("{}/{name}", &pg[..i])
        }
        _ => panic!("OTA_TEST_PG_URL must end in /database"),
    };
    let storage = format!("[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 8\n");
    // OTA_TEST_REDIS_URL=local: PostgreSQL with the in-process throttle.
    if redis == "local" {
        return storage;
    }
    format!(
        "{storage}[throttle]\nbackend = \"redis\"\nurl = \"{redis}\"\nkey_prefix = \"{name}\"\n"
    )
}

impl TestServer {
    pub async fn start(extra: &str) -> TestServer {
        let extra = if on_postgres() {
            format!("{extra}\n{}", postgres_sections().await)
        } else {
            extra.to_string()
        };
        TestServer::start_in(tempfile::tempdir().unwrap(), &extra).await
    }

    /// A server with the config `extra` in `dir` (replicas of one fleet
    /// share the data directory's contents through `dir`'s symlink).
    pub async fn start_in(dir: tempfile::TempDir, extra: &str) -> TestServer {
        let cfg = write_config(dir.path(), "127.0.0.1:0", extra);
        let running = start(ServerConfig::load(&cfg).unwrap(), CancellationToken::new())
            .await
            .unwrap();
        let base = format!("http://{}", running.addr);
        let admin = AdminClient::new(&base, ADMIN).unwrap();
        TestServer {
            running: Some(running),
            base,
            dir,
            admin,
        }
    }

    /// A server with fast check-ins (`lease_ms` leases) and releases 1.0
    /// and 2.0 of device type `t`, built.
    pub async fn with_two_releases(lease_ms: u64) -> TestServer {
        let ts = TestServer::start(&fast_checkin(lease_ms)).await;
        ts.release("t", "1.0", &image(16, 1)).await;
        ts.release("t", "2.0", &image(16, 2)).await;
        ts
    }

    /// Events the server counted as new since it started.
    pub async fn events_accepted(&self) -> u64 {
        self.app().state.stats().await.unwrap()["events_accepted_since_start"]
            .as_u64()
            .unwrap()
    }

    pub fn app(&self) -> &ota_server::app::App {
        &self.running.as_ref().unwrap().app
    }

    /// Stops the server and starts it again on the same directory and
    /// configuration (a clean restart; state must come back from storage).
    pub async fn restart(&mut self) {
        self.stop().await;
        let cfg = self.dir.path().join("server.toml");
        let running = start(ServerConfig::load(&cfg).unwrap(), CancellationToken::new())
            .await
            .unwrap();
        self.base = format!("http://{}", running.addr);
        self.admin = AdminClient::new(&self.base, ADMIN).unwrap();
        self.running = Some(running);
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Adds a release from `image` and waits for its builds.
    pub async fn release(&self, device_type: &str, version: &str, image: &[u8]) {
        let p = self.dir.path().join(format!("{device_type}-{version}.img"));
        std::fs::write(&p, image).unwrap();
        self.admin
            .release_add(device_type, version, 0, &p, false)
            .await
            .unwrap();
        for _ in 0..600 {
            let all = self.admin.releases().await.unwrap();
            let r = all
                .iter()
                .find(|r| r.device_type == device_type && r.version == version)
                .unwrap();
            if r.builds.iter().all(|b| b.status == BuildStatus::Ready) {
                return;
            }
            assert!(
                r.builds.iter().all(|b| b.status != BuildStatus::Failed),
                "build failed: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("builds did not finish");
    }

    pub async fn status(&self, id: &str) -> RolloutStatus {
        self.admin.rollout(id).await.unwrap()
    }
}

/// A deterministic image of `blocks` 4 KiB blocks; `version` changes a few.
pub fn image(blocks: usize, version: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(blocks * 4096);
    let mut x: u32 = 12345;
    for _ in 0..blocks * 4096 {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        v.push((x >> 16) as u8);
    }
    for b in 0..blocks {
        if b % 7 == 0 {
            v[b * 4096] = version;
        }
    }
    v
}

/// An hour of the window clock (`StateBackend::window_clock`), in ms.
pub const HOUR_MS: i64 = 3_600_000;

/// A daily one-hour maintenance window in UTC opening `hours_ahead` hours
/// from now (negative: it opened that long ago), to the minute.
pub fn window_from_now(hours_ahead: f64) -> ota_server::rollout::window::Window {
    let at = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs_f64(hours_ahead * 3600.0))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    ota_server::rollout::window::Window::parse(&format!(
        "daily {:02}:{:02}+1h UTC",
        at.hour(),
        at.minute()
    ))
    .unwrap()
}

pub fn spec(release: &str, device_type: &str) -> RolloutSpec {
    RolloutSpec {
        release: release.into(),
        device_type: device_type.into(),
        group: None,
        selector: BTreeMap::new(),
        waves: vec![100],
        soak_ms: 0,
        max_concurrent: 10,
        max_starts_per_min: 1e6,
        ramp_factor: 1.0,
        ramp_every: 0,
        ramp_max_per_min: None,
        start_at_ms: None,
        wave_offsets_ms: Vec::new(),
        failure_threshold: 0.5,
        success_threshold: 0.9,
        min_sample: 5,
        on_failure: OnFailure::Pause,
        max_retries: 0,
        windows: Vec::new(),
    }
}

/// A simulated device over real HTTP.
#[derive(Clone)]
pub struct Sim {
    pub id: String,
    pub token: String,
    pub base: String,
    pub http: reqwest::Client,
    pub seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Reported in check-ins (`local` maintenance windows).
    pub time_zone: Option<String>,
}

impl Sim {
    pub async fn enroll(base: &str, id: &str, device_type: &str, http: &reqwest::Client) -> Sim {
        Self::enroll_tagged(base, id, device_type, BTreeMap::new(), http).await
    }

    pub async fn enroll_tagged(
        base: &str,
        id: &str,
        device_type: &str,
        tags: BTreeMap<String, String>,
        http: &reqwest::Client,
    ) -> Sim {
        let r: EnrollResponse = http
            .post(format!("{base}/api/v1/devices/enroll"))
            .json(&EnrollRequest {
                enrollment_key: ENROLL.into(),
                device_id: id.into(),
                device_type: device_type.into(),
                tags,
                csr: None,
            })
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        Sim {
            id: id.into(),
            token: r.token,
            base: base.into(),
            http: http.clone(),
            seq: Default::default(),
            time_zone: None,
        }
    }

    pub async fn checkin(
        &self,
        version: &str,
        state: AgentState,
        update: Option<&str>,
    ) -> CheckinResponse {
        let body = self
            .checkin_raw(&CheckinRequest {
                install_gate: true,
                time_zone: self.time_zone.clone(),
                current_version: version.into(),
                booted_slot: Slot::A,
                state,
                update: update.map(|u| UpdateInHand {
                    update_id: u.into(),
                    progress: Progress::default(),
                }),
                freshness_held: None,
                delta_codecs: ota_format::manifest::codecs(),
            })
            .await;
        serde_json::from_slice(&body).unwrap()
    }

    /// Sends `req` as this device's check-in; the answer's exact bytes
    /// (for tests about what is, or is not, in it).
    pub async fn checkin_raw(&self, req: &CheckinRequest) -> Vec<u8> {
        let r = self
            .http
            .post(format!("{}/api/v1/devices/checkin", self.base))
            .bearer_auth(&self.token)
            .json(req)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "checkin: {}", r.status());
        r.bytes().await.unwrap().to_vec()
    }

    pub async fn event(&self, update_id: &str, kind: EventKind) -> EventsResponse {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.events(vec![Event {
            seq,
            update_id: update_id.into(),
            kind,
            at: "2026-11-26T00:00:00Z".into(),
            detail: EventDetail {
                reason: (kind == EventKind::Failed || kind == EventKind::RolledBack)
                    .then(|| "test failure".into()),
                ..Default::default()
            },
        }])
        .await
    }

    pub async fn events(&self, events: Vec<Event>) -> EventsResponse {
        self.http
            .post(format!("{}/api/v1/devices/events", self.base))
            .bearer_auth(&self.token)
            .json(&EventsRequest { events })
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_gzip()
        .pool_max_idle_per_host(64)
        // Below the server's 10 s between requests on a kept-alive
        // connection: a pooled connection reused as the server closed it
        // failed a check-in with "IncompleteMessage" (CI, `ui_browser`).
        .pool_idle_timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Whether the external tool `name` can run. Missing: a test that needs it
/// panics in CI (`CI=true`: it must never skip silently there) and is
/// skipped with a note elsewhere.
pub fn require_tool(name: &str, package: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{name} is missing (apt-get install {package}); CI must run this test");
    }
    eprintln!("SKIPPED: {name} is missing (apt-get install {package})");
    false
}

/// A self-signed certificate (`cert.pem`, `key.pem` in `dir`) for
/// 127.0.0.1 and `cn`, made by `openssl`.
pub fn self_signed_cert(dir: &Path, cn: &str) {
    let ok = std::process::Command::new("openssl")
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
            &format!("/CN={cn}"),
            "-addext",
            &format!("subjectAltName=IP:127.0.0.1,DNS:{cn}"),
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl)");
    assert!(ok.success(), "openssl req -x509 failed");
}

/// `bytes` of text-like data that zstd compresses slowly at level 19
/// (noise is faster): keeps a build busy long enough to be watched.
pub fn slow_image(bytes: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"kernel ",
        b"module ",
        b"library ",
        b"0x7f3a ",
        b"config\n",
        b"usr/lib/",
        b"= ",
        b"42 ",
    ];
    let mut x: u32 = 7;
    let mut img = Vec::with_capacity(bytes + 16);
    while img.len() < bytes {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        img.extend_from_slice(words[(x >> 16) as usize % 8]);
        img.push((x >> 8) as u8);
    }
    img.truncate(bytes);
    img
}

/// Adds an opaque release (a DDI client's bundle, `release add --format`)
/// of `bytes`, stored as `filename`.
pub async fn bundle_release(
    ts: &TestServer,
    device_type: &str,
    version: &str,
    filename: &str,
    bytes: &[u8],
) -> ota_server::releases::ReleaseRecord {
    let p = ts.dir.path().join(filename);
    std::fs::write(&p, bytes).unwrap();
    ts.admin
        .release_add_bundle(
            device_type,
            version,
            0,
            ota_server::releases::bundle::BundleFormat::Swu,
            Some(filename),
            None,
            false,
            &p,
            false,
        )
        .await
        .unwrap()
}

/// A hawkBit DDI target speaking plain HTTP (as SWUpdate or RAUC would),
/// authenticated with its device token as `TargetToken`.
#[derive(Clone)]
pub struct Ddi {
    pub id: String,
    pub token: String,
    pub base: String,
    pub http: reqwest::Client,
}

impl Ddi {
    pub async fn enroll(base: &str, id: &str, device_type: &str, http: &reqwest::Client) -> Ddi {
        let s = Sim::enroll(base, id, device_type, http).await;
        Ddi {
            id: s.id,
            token: s.token,
            base: s.base,
            http: http.clone(),
        }
    }

    /// `path` under this target's controller resource (`""` is the base).
    pub fn url(&self, path: &str) -> String {
        format!("{}/DEFAULT/controller/v1/{}{path}", self.base, self.id)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .header("Authorization", format!("TargetToken {}", self.token))
            .send()
            .await
            .unwrap()
    }

    /// GET of an absolute `url` (an artifact's `download-http` link) as
    /// this target.
    pub async fn fetch(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .header("Authorization", format!("TargetToken {}", self.token))
            .send()
            .await
            .unwrap()
    }

    /// The base poll's JSON (asserting 200).
    pub async fn poll(&self) -> serde_json::Value {
        let r = self.get("").await;
        assert_eq!(r.status(), 200, "poll of {}", self.id);
        r.json().await.unwrap()
    }

    /// The action id the poll links under `rel` (`deploymentBase`,
    /// `cancelAction`), if any.
    pub async fn action(&self, rel: &str) -> Option<String> {
        let p = self.poll().await;
        p["_links"][rel]["href"]
            .as_str()
            .map(|h| h.rsplit('/').next().unwrap().to_string())
    }

    /// The deployment of `action` (`deploymentBase/{action}`'s JSON).
    pub async fn deployment(&self, action: &str) -> serde_json::Value {
        self.get(&format!("/deploymentBase/{action}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// The `download-http` link of a deployment's first artifact.
    pub fn download_link(deployment: &serde_json::Value) -> String {
        deployment["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]["href"]
            .as_str()
            .unwrap_or_else(|| panic!("no download-http link in {deployment}"))
            .to_string()
    }

    /// Posts deployment feedback; returns the status code.
    pub async fn feedback(
        &self,
        action: &str,
        execution: &str,
        finished: &str,
        details: &[&str],
    ) -> u16 {
        self.http
            .post(self.url(&format!("/deploymentBase/{action}/feedback")))
            .header("Authorization", format!("TargetToken {}", self.token))
            .json(&serde_json::json!({
                "id": action,
                "time": "20261202T120000",
                "status": {"execution": execution, "result": {"finished": finished}, "details": details}
            }))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}
