//! Shared fixtures of the agent's integration tests: a real update (images,
//! delta, signed manifest), a test server implementing the device API and
//! artifact serving of `docs/api.md` over real HTTP on 127.0.0.1 with fault
//! injection, and a device directory (slot files, boot environment, config)
//! for running the real `ota-agent` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, Response, StatusCode, header};
use axum::routing::{get, post};
use bytes::Bytes;
use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
use ota_format::api::*;
use ota_format::{Digest, Envelope, Manifest, SigningKeyPair};

/// One signed update: old and new images, the manifest and payload.
pub struct Fixture {
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    pub manifest: Manifest,
    pub envelope: Vec<u8>,
    pub payload: Vec<u8>,
    pub pubkey_pem: String,
    /// The key that signed the manifest (and signs freshness statements).
    pub key: SigningKeyPair,
}

/// An update's two slots on disk, in a directory of their own: the old
/// image as the source, and a destination of the new image's size holding
/// stale bytes, as a real inactive slot does.
pub struct Slots {
    /// Keeps the files' directory for as long as the slots are used.
    pub dir: tempfile::TempDir,
    pub source: std::sync::Arc<std::fs::File>,
    pub dest: std::sync::Arc<std::fs::File>,
}

impl Fixture {
    /// This update's [`Slots`].
    pub fn slots(&self) -> Slots {
        let dir = tempfile::tempdir().unwrap();
        let (src_path, dest_path) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&src_path, &self.old).unwrap();
        std::fs::write(&dest_path, vec![0x5au8; self.new.len()]).unwrap();
        let dest = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dest_path)
            .unwrap();
        let source = std::fs::File::open(&src_path).unwrap();
        Slots {
            dir,
            source: std::sync::Arc::new(source),
            dest: std::sync::Arc::new(dest),
        }
    }

    /// How many compression frames (groups of `BSDIFF` operations sharing
    /// one data range, codec `frames`) the manifest has.
    #[allow(dead_code)]
    pub fn frame_groups(&self) -> usize {
        ota_delta::apply::groups(&self.manifest)
            .iter()
            .filter(|g| ota_delta::apply::is_frame_group(&self.manifest, g))
            .count()
    }

    /// A delta `1.0.0` → `2.0.0` (or a full image when `full`), images of
    /// `len` bytes, operations of `chunk` bytes.
    pub fn new(len: usize, chunk: u64, full: bool) -> Fixture {
        Self::build(len, chunk, full, false)
    }

    /// Like [`Fixture::new`], but half of every image is incompressible, so
    /// the payload is large (many range requests).
    pub fn noisy(len: usize, chunk: u64, full: bool) -> Fixture {
        Self::build(len, chunk, full, true)
    }

    fn build(len: usize, chunk: u64, full: bool, noisy: bool) -> Fixture {
        let mut old = ota_tests::images::base(len, 7);
        if noisy {
            let mut x = 0x9e3779b97f4a7c15u64;
            for (i, b) in old.iter_mut().enumerate() {
                if (i >> 15) % 2 == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
        let new = ota_tests::images::next_version(&old);
        let dir = tempfile::tempdir().unwrap();
        let (op, np) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&op, &old).unwrap();
        std::fs::write(&np, &new).unwrap();
        let key = SigningKeyPair::generate().unwrap();
        let spec = DeltaSpec {
            device_type: "testboard".into(),
            from_version: (!full).then(|| "1.0.0".into()),
            to_version: "2.0.0".into(),
            security_counter: 2,
            expires_at: Manifest::expiry_in(30),
        };
        let src = std::fs::File::open(&op).unwrap();
        let mut payload = Vec::new();
        let manifest = generate(
            &spec,
            (!full).then_some(&src),
            &std::fs::File::open(&np).unwrap(),
            &mut payload,
            &GenerateOptions {
                chunk_size: chunk,
                zstd_level: 3,
                xz: true,
                zero_runs: true,
                arm64: true,
                frames: true,
                threads: 2,
                progress: false,
            },
        )
        .unwrap();
        let envelope = Envelope::sign(&manifest.to_json(), &[&key]).to_json();
        Fixture {
            old,
            new,
            manifest,
            envelope,
            payload,
            pubkey_pem: key.public_pem(),
            key,
        }
    }

    pub fn offer(&self, update_id: &str) -> UpdateOffer {
        let ms = Digest::of(&self.envelope);
        let ps = Digest::of(&self.payload);
        UpdateOffer {
            update_id: update_id.into(),
            rollout_id: "r1".into(),
            version: self.manifest.to.version.clone(),
            from_version: self.manifest.from.as_ref().map(|f| f.version.clone()),
            manifest_url: format!("/api/v1/artifacts/{ms}"),
            manifest_sha256: ms,
            payload_url: format!("/api/v1/artifacts/{ps}"),
            payload_sha256: ps,
            payload_size: self.payload.len() as u64,
            max_parallel_ranges: 4,
            lease_ms: 30_000,
            install_gated: false,
        }
    }
}

/// What the artifact server does wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Send this many bytes of the range, then cut the connection.
    CutAfter(usize),
    /// Send this many bytes, then stall forever.
    StallAfter(usize),
    /// Answer 503 with `Retry-After: 1`.
    Unavailable,
    /// Answer 500.
    ServerError,
    /// Ignore Range: 200 with the whole file.
    IgnoreRange,
    /// 206 whose Content-Range (and body) start this many bytes later.
    WrongOffset(u64),
    /// Flip a byte in the body.
    Corrupt,
    /// Announce the full range but send one byte less, then end cleanly.
    Short,
}

/// The test server's state.
pub struct Srv {
    pub artifacts: Mutex<HashMap<String, Bytes>>,
    pub offer: Mutex<Option<UpdateOffer>>,
    /// `Some((update_id, reason))`: answer check-ins with `cancel`.
    pub cancel: Mutex<Option<(String, String)>>,
    pub events: Mutex<Vec<Event>>,
    seen: Mutex<std::collections::HashSet<(String, u64)>>,
    pub checkins: Mutex<Vec<CheckinRequest>>,
    pub fault: Mutex<Fault>,
    /// Apply the fault to every n-th range request (1: all).
    pub fault_every: AtomicU64,
    /// Faults left to inject (u64::MAX: unlimited).
    pub faults_left: AtomicU64,
    pub range_requests: AtomicU64,
    /// Payload bytes actually sent.
    pub bytes_sent: AtomicU64,
    /// Throttle: microseconds of sleep per 16 KiB chunk sent.
    pub throttle_us: AtomicU64,
    pub next_checkin_ms: AtomicU64,
    /// Answer check-ins with 503 (the server "unreachable" for the API).
    pub checkin_down: std::sync::atomic::AtomicBool,
    /// Hold every check-in this long before answering (a server that hangs).
    pub checkin_hang_ms: AtomicU64,
    /// A device waiting for its maintenance window is told `install`
    /// (true) or `wait` (false).
    pub install: std::sync::atomic::AtomicBool,
    pub enroll_key: String,
    /// The freshness statement check-in answers carry.
    pub freshness: Mutex<Option<Envelope>>,
}

pub struct Server {
    pub srv: Arc<Srv>,
    pub addr: SocketAddr,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// A device API client of this server, as the pool tests use it:
    /// authorised, requests time out after 5 s, reads after `read`.
    pub fn pool_client(&self, read: Duration) -> ota_agent::client::Client {
        ota_agent::client::Client::new(
            &self.url,
            ota_agent::client::Timeouts {
                request: Duration::from_secs(5),
                read,
            },
        )
        .unwrap()
        .with_token("tok-test")
    }

    pub async fn start(fixtures: &[&Fixture]) -> Server {
        let mut artifacts = HashMap::new();
        for f in fixtures {
            artifacts.insert(
                Digest::of(&f.envelope).to_hex(),
                Bytes::from(f.envelope.clone()),
            );
            artifacts.insert(
                Digest::of(&f.payload).to_hex(),
                Bytes::from(f.payload.clone()),
            );
        }
        let srv = Arc::new(Srv {
            artifacts: Mutex::new(artifacts),
            offer: Mutex::new(None),
            cancel: Mutex::new(None),
            events: Mutex::new(Vec::new()),
            seen: Mutex::new(Default::default()),
            checkins: Mutex::new(Vec::new()),
            fault: Mutex::new(Fault::None),
            fault_every: AtomicU64::new(1),
            faults_left: AtomicU64::new(0),
            range_requests: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            throttle_us: AtomicU64::new(0),
            next_checkin_ms: AtomicU64::new(200),
            checkin_down: Default::default(),
            checkin_hang_ms: AtomicU64::new(0),
            install: Default::default(),
            enroll_key: "fleet-key".into(),
            freshness: Mutex::new(None),
        });
        let app = Router::new()
            .route("/api/v1/devices/enroll", post(enroll))
            .route("/api/v1/devices/checkin", post(checkin))
            .route("/api/v1/devices/events", post(events))
            .route("/api/v1/artifacts/{sha}", get(artifact))
            .with_state(srv.clone());
        use axum::serve::ListenerExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // As a real server must: without TCP_NODELAY every Range response
        // ends with a ~40 ms delayed-ACK stall.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Server {
            srv,
            addr,
            url: format!("http://{addr}"),
            task,
        }
    }

    pub fn set_fault(&self, fault: Fault, every: u64, count: u64) {
        *self.srv.fault.lock().unwrap() = fault;
        self.srv.fault_every.store(every.max(1), Ordering::SeqCst);
        self.srv.faults_left.store(count, Ordering::SeqCst);
    }

    pub fn event_kinds(&self) -> Vec<EventKind> {
        self.srv
            .events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.kind)
            .collect()
    }

    pub fn has_event(&self, k: EventKind) -> bool {
        self.event_kinds().contains(&k)
    }

    /// Waits (polling) until `f` holds or the timeout passes.
    pub async fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Server) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(
                t.elapsed() < timeout,
                "timed out waiting for {what}; events so far: {:?}",
                self.event_kinds()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn api_err(status: StatusCode, code: &str, msg: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(&ApiError {
                code: code.into(),
                error: msg.into(),
            })
            .unwrap(),
        ))
        .unwrap()
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

async fn enroll(State(s): State<Arc<Srv>>, body: Bytes) -> Response<Body> {
    let Ok(req) = serde_json::from_slice::<EnrollRequest>(&body) else {
        return api_err(StatusCode::BAD_REQUEST, "bad_request", "bad body");
    };
    if req.enrollment_key != s.enroll_key {
        return api_err(StatusCode::FORBIDDEN, "forbidden", "wrong enrollment key");
    }
    json(&EnrollResponse {
        device_id: req.device_id,
        token: format!("tok-{}", rand::random::<u64>()),
        certificate: None,
    })
}

fn authorized(h: &HeaderMap) -> bool {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer tok-"))
}

async fn checkin(State(s): State<Arc<Srv>>, h: HeaderMap, body: Bytes) -> Response<Body> {
    if !authorized(&h) {
        return api_err(StatusCode::UNAUTHORIZED, "unauthorized", "no token");
    }
    let Ok(req) = serde_json::from_slice::<CheckinRequest>(&body) else {
        return api_err(StatusCode::BAD_REQUEST, "bad_request", "bad body");
    };
    if s.checkin_down.load(Ordering::SeqCst) {
        return api_err(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "down");
    }
    let hang = s.checkin_hang_ms.load(Ordering::SeqCst);
    if hang > 0 {
        tokio::time::sleep(Duration::from_millis(hang)).await;
    }
    s.checkins.lock().unwrap().push(req.clone());
    let next = s.next_checkin_ms.load(Ordering::SeqCst);
    if let Some((id, reason)) = s.cancel.lock().unwrap().clone() {
        return json(&CheckinResponse {
            next_checkin_ms: next,
            action: Action::Cancel {
                update_id: id,
                reason,
            },
            freshness: s.freshness.lock().unwrap().clone(),
        });
    }
    let offer = s.offer.lock().unwrap().clone();
    let action = match offer {
        Some(o)
            if req.state == AgentState::WaitingForWindow
                && req
                    .update
                    .as_ref()
                    .is_some_and(|u| u.update_id == o.update_id) =>
        {
            if s.install.load(Ordering::SeqCst) {
                Action::Install {
                    update_id: o.update_id,
                }
            } else {
                Action::Wait {
                    reason: "outside the maintenance windows".into(),
                }
            }
        }
        Some(o)
            if req.current_version != o.version
                && !s.events.lock().unwrap().iter().any(|e| {
                    e.update_id == o.update_id
                        && (e.kind.is_terminal() || e.kind == EventKind::Installed)
                }) =>
        {
            Action::Update(o)
        }
        _ => Action::None,
    };
    json(&CheckinResponse {
        next_checkin_ms: next,
        action,
        freshness: s.freshness.lock().unwrap().clone(),
    })
}

async fn events(State(s): State<Arc<Srv>>, h: HeaderMap, body: Bytes) -> Response<Body> {
    if !authorized(&h) {
        return api_err(StatusCode::UNAUTHORIZED, "unauthorized", "no token");
    }
    let Ok(req) = serde_json::from_slice::<EventsRequest>(&body) else {
        return api_err(StatusCode::BAD_REQUEST, "bad_request", "bad body");
    };
    // Idempotent by (device, seq); the token stands for the device.
    let device = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut seen = s.seen.lock().unwrap();
    let mut ev = s.events.lock().unwrap();
    let (mut accepted, mut duplicates) = (0, 0);
    for e in req.events {
        if seen.insert((device.clone(), e.seq)) {
            accepted += 1;
            ev.push(e);
        } else {
            duplicates += 1;
        }
    }
    json(&EventsResponse {
        accepted,
        duplicates,
    })
}

fn parse_range(h: &HeaderMap, size: u64) -> Option<(u64, u64)> {
    let v = h.get(header::RANGE)?.to_str().ok()?;
    let r = v.strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = if b.is_empty() {
        size - 1
    } else {
        b.parse().ok()?
    };
    Some((a, b.min(size - 1)))
}

async fn artifact(
    State(s): State<Arc<Srv>>,
    AxPath(sha): AxPath<String>,
    h: HeaderMap,
) -> Response<Body> {
    if !authorized(&h) {
        return api_err(StatusCode::UNAUTHORIZED, "unauthorized", "no token");
    }
    let Some(data) = s.artifacts.lock().unwrap().get(&sha).cloned() else {
        return api_err(StatusCode::NOT_FOUND, "not_found", "no such artifact");
    };
    let size = data.len() as u64;
    let Some((a, b)) = parse_range(&h, size) else {
        return Response::builder()
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, format!("\"{sha}\""))
            .body(Body::from(data))
            .unwrap();
    };
    if a > b || a >= size {
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{size}"))
            .body(Body::empty())
            .unwrap();
    }
    let n = s.range_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let every = s.fault_every.load(Ordering::SeqCst);
    let mut fault = *s.fault.lock().unwrap();
    if fault != Fault::None && n % every == 0 {
        let left = s.faults_left.load(Ordering::SeqCst);
        if left == 0 {
            fault = Fault::None;
        } else if left != u64::MAX {
            s.faults_left.fetch_sub(1, Ordering::SeqCst);
        }
    } else {
        fault = Fault::None;
    }
    let (mut a, mut b) = (a, b);
    let mut body = data.slice(a as usize..=b as usize);
    match fault {
        Fault::Unavailable => {
            return Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::RETRY_AFTER, "1")
                .body(Body::from("busy"))
                .unwrap();
        }
        Fault::ServerError => {
            return api_err(StatusCode::INTERNAL_SERVER_ERROR, "internal", "oops");
        }
        Fault::IgnoreRange => {
            s.bytes_sent.fetch_add(size, Ordering::SeqCst);
            return Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(data))
                .unwrap();
        }
        Fault::WrongOffset(d) => {
            a = (a + d).min(size - 1);
            b = (b + d).min(size - 1);
            body = data.slice(a as usize..=b as usize);
        }
        Fault::Corrupt => {
            let mut v = body.to_vec();
            let i = v.len() / 2;
            v[i] ^= 0xff;
            body = Bytes::from(v);
        }
        _ => {}
    }
    let throttle = Duration::from_micros(s.throttle_us.load(Ordering::SeqCst));
    let s2 = s.clone();
    let stream = async_stream(body, fault, throttle, s2);
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{sha}\""))
        .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"))
        .header(header::CONTENT_LENGTH, (b - a + 1).to_string())
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The body as a stream of 16 KiB chunks, with the fault's misbehaviour.
fn async_stream(
    body: Bytes,
    fault: Fault,
    throttle: Duration,
    s: Arc<Srv>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let limit = match fault {
        Fault::CutAfter(n) | Fault::StallAfter(n) => n.min(body.len()),
        Fault::Short => body.len() - 1,
        _ => body.len(),
    };
    futures_util::stream::unfold(0usize, move |at| {
        let body = body.clone();
        let s = s.clone();
        async move {
            if at >= limit {
                match fault {
                    Fault::CutAfter(_) if at < body.len() => {
                        return Some((
                            Err(std::io::Error::other("connection cut by the test")),
                            usize::MAX,
                        ));
                    }
                    Fault::StallAfter(_) => {
                        // Hold the connection open without sending.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return None;
                    }
                    _ => return None,
                }
            }
            if at == usize::MAX {
                return None;
            }
            if !throttle.is_zero() {
                tokio::time::sleep(throttle).await;
            }
            let end = (at + (16 << 10)).min(limit);
            s.bytes_sent.fetch_add((end - at) as u64, Ordering::SeqCst);
            Some((Ok(body.slice(at..end)), end))
        }
    })
}

/// A device: slot files, boot environment, data dir and config.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    pub boot_env: PathBuf,
    pub data: PathBuf,
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ota-agent"))
}

impl Device {
    /// A device running `fx.old` in slot A (version 1.0.0); `health` is the
    /// health-check command; `extra` is appended to the config.
    pub fn new(server_url: &str, fx: &Fixture, health: &str, extra: &str) -> Device {
        Self::with_slot_b(server_url, fx, health, extra, None)
    }

    pub fn with_slot_b(
        server_url: &str,
        fx: &Fixture,
        health: &str,
        extra: &str,
        slot_b: Option<PathBuf>,
    ) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let slot_a = p.join("slot-a.img");
        let slot_b = slot_b.unwrap_or_else(|| p.join("slot-b.img"));
        std::fs::write(&slot_a, &fx.old).unwrap();
        // Slot B starts with stale garbage, as a real inactive slot does.
        std::fs::write(&slot_b, vec![0xa5u8; 4096]).unwrap();
        std::fs::write(p.join("key.pub"), &fx.pubkey_pem).unwrap();
        std::fs::write(p.join("enroll.key"), "fleet-key\n").unwrap();
        let boot_env = p.join("boot.env");
        let data = p.join("data");
        let config = p.join("agent.toml");
        let agent = agent_bin();
        let cfg = format!(
            r#"server_url = "{server_url}"
device_id = "dev-1"
device_type = "testboard"
enrollment_key_file = "{p}/enroll.key"
data_dir = "{data}"
trusted_keys = ["{p}/key.pub"]
factory_version = "1.0.0"
factory_security_counter = 1
range_size = 65536
stall_timeout = "2s"
request_timeout = "5s"
max_backoff = "2s"
checkin_interval = "200ms"
health_check = "{health}"
health_timeout = "10s"
reboot_command = "{agent} simulate-boot --env-file {boot} --bootlimit 3"
{extra}
[slots]
a = "{a}"
b = "{b}"
[boot]
backend = "file"
env_file = "{boot}"
bootlimit = 3
"#,
            p = p.display(),
            data = data.display(),
            agent = agent.display(),
            boot = boot_env.display(),
            a = slot_a.display(),
            b = slot_b.display(),
        );
        std::fs::write(&config, cfg).unwrap();
        // Power-on: the simulated bootloader records the running slot.
        ota_agent::bootctl::simulate_boot(&boot_env, 3).unwrap();
        Device {
            dir,
            config,
            slot_a,
            slot_b,
            boot_env,
            data,
        }
    }

    /// Starts `ota-agent run` (killed when dropped, so a failing test
    /// leaves no agent behind).
    pub fn spawn(&self) -> AgentProc {
        self.spawn_with_env(&[])
    }

    /// [`Device::spawn`] with extra environment variables (test hooks).
    pub fn spawn_with_env(&self, vars: &[(&str, &str)]) -> AgentProc {
        AgentProc(
            Command::new(agent_bin())
                .envs(vars.iter().copied())
                .args(["run", "--config"])
                .arg(&self.config)
                .env(
                    "RUST_LOG",
                    std::env::var("AGENT_LOG").unwrap_or("info".into()),
                )
                .stdout(Stdio::null())
                .stderr(if std::env::var("AGENT_LOG").is_ok() {
                    Stdio::inherit()
                } else {
                    // Appended across restarts, so a failing test can show
                    // what every run of the agent did (`log_tail`).
                    Stdio::from(
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(self.dir.path().join("agent.log"))
                            .unwrap(),
                    )
                })
                .spawn()
                .unwrap(),
        )
    }

    /// The last `n` lines the agent logged (every run of it on this
    /// device), for a failing assertion's message.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Boot environment variables.
    pub fn boot_vars(&self) -> HashMap<String, String> {
        std::fs::read_to_string(&self.boot_env)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Sets one boot environment variable, as a boot script would.
    pub fn set_boot_var(&self, name: &str, value: &str) {
        let text = std::fs::read_to_string(&self.boot_env).unwrap_or_default();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.split_once('=').map(|(k, _)| k) != Some(name))
            .map(str::to_string)
            .collect();
        lines.push(format!("{name}={value}"));
        std::fs::write(&self.boot_env, lines.join("\n") + "\n").unwrap();
    }

    pub fn slot_prefix(&self, path: &Path, len: usize) -> Vec<u8> {
        let mut v = std::fs::read(path).unwrap();
        v.truncate(len);
        v
    }

    pub fn status(&self) -> String {
        let out = Command::new(agent_bin())
            .args(["status", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A running agent process, SIGKILLed on drop if still running.
pub struct AgentProc(pub Child);

impl std::ops::Deref for AgentProc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}
impl std::ops::DerefMut for AgentProc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}
impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for a child to exit, killing it after `timeout`.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            panic!("agent did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM.
pub fn sigterm(child: &Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
}

/// A counter shared by tests that want unique ids.
pub static UNIQUE: AtomicU64 = AtomicU64::new(0);
