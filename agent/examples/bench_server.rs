//! A minimal device-API server for `bench/agent-bench.sh`: offers one update
//! (a directory with `manifest.json` and `payload.bin` from `ota-server
//! delta`), serves artifacts with Range support from disk, and counts the
//! payload bytes it sends (`GET /stats`), so the benchmark can compare the
//! agent with curl and aria2c on the same server and measure re-downloads.
//! Not the product's server (that is `ota-server serve`).
//!
//! Usage: `bench_server DIR ADDR UPDATE_ID` (ADDR like 127.0.0.1:8089).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, Response, StatusCode, header};
use axum::routing::{get, post};
use bytes::Bytes;
use ota_format::api::*;
use ota_format::{Digest, Envelope, Manifest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

struct Srv {
    offer: UpdateOffer,
    files: Vec<(String, PathBuf, u64)>,
    bytes_sent: AtomicU64,
    range_requests: AtomicU64,
    events: Mutex<Vec<String>>,
    done: Mutex<bool>,
}

fn hash_file(p: &PathBuf) -> Digest {
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    ota_delta::apply::hash_range(&f, 0, len).unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, addr, update_id) = (PathBuf::from(&args[1]), args[2].clone(), args[3].clone());
    let mpath = dir.join("manifest.json");
    let ppath = dir.join("payload.bin");
    let env = std::fs::read(&mpath).unwrap();
    let m = Manifest::from_json(
        &Envelope::from_json(&env)
            .unwrap()
            .manifest_json_unverified()
            .unwrap(),
    )
    .unwrap();
    let ms = Digest::of(&env);
    let ps = hash_file(&ppath);
    let psize = std::fs::metadata(&ppath).unwrap().len();
    let offer = UpdateOffer {
        update_id,
        rollout_id: "bench".into(),
        version: m.to.version.clone(),
        from_version: m.from.as_ref().map(|f| f.version.clone()),
        manifest_url: format!("/api/v1/artifacts/{ms}"),
        manifest_sha256: ms,
        payload_url: format!("/api/v1/artifacts/{ps}"),
        payload_sha256: ps,
        payload_size: psize,
        max_parallel_ranges: 16,
        lease_ms: 60_000,
        install_gated: false,
    };
    let srv = Arc::new(Srv {
        files: vec![
            (ms.to_hex(), mpath, env.len() as u64),
            (ps.to_hex(), ppath, psize),
        ],
        offer,
        bytes_sent: AtomicU64::new(0),
        range_requests: AtomicU64::new(0),
        events: Mutex::new(Vec::new()),
        done: Mutex::new(false),
    });
    let app = Router::new()
        .route("/api/v1/devices/enroll", post(enroll))
        .route("/api/v1/devices/checkin", post(checkin))
        .route("/api/v1/devices/events", post(events))
        .route("/api/v1/artifacts/{sha}", get(artifact))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .with_state(srv.clone());
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY, the last segment of each response waits for the
    // client's delayed ACK (~40 ms): fatal for many Range requests.
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap()
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    println!("payload {} {} bytes", srv.offer.payload_url, psize);
    axum::serve(listener, app).await.unwrap();
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

async fn enroll(body: Bytes) -> Response<Body> {
    let req: EnrollRequest = serde_json::from_slice(&body).unwrap();
    json(&EnrollResponse {
        device_id: req.device_id,
        token: "bench-token".into(),
        certificate: None,
    })
}

async fn checkin(State(s): State<Arc<Srv>>, body: Bytes) -> Response<Body> {
    let req: CheckinRequest = serde_json::from_slice(&body).unwrap();
    let done = *s.done.lock().unwrap();
    let action = if !done && req.current_version != s.offer.version {
        Action::Update(s.offer.clone())
    } else {
        Action::None
    };
    json(&CheckinResponse {
        next_checkin_ms: 2000,
        action,
        freshness: None,
    })
}

async fn events(State(s): State<Arc<Srv>>, body: Bytes) -> Response<Body> {
    let req: EventsRequest = serde_json::from_slice(&body).unwrap();
    let n = req.events.len() as u32;
    for e in req.events {
        if matches!(e.kind, EventKind::Installed | EventKind::Failed) {
            *s.done.lock().unwrap() = true;
        }
        s.events
            .lock()
            .unwrap()
            .push(format!("{:?} {:?}", e.kind, e.detail.reason));
    }
    json(&EventsResponse {
        accepted: n,
        duplicates: 0,
    })
}

/// Offers the update again (for repeated measurements).
async fn reset(State(s): State<Arc<Srv>>) -> Response<Body> {
    *s.done.lock().unwrap() = false;
    s.bytes_sent.store(0, Ordering::SeqCst);
    json(&serde_json::json!({}))
}

async fn stats(State(s): State<Arc<Srv>>) -> Response<Body> {
    json(&serde_json::json!({
        "bytes_sent": s.bytes_sent.load(Ordering::SeqCst),
        "range_requests": s.range_requests.load(Ordering::SeqCst),
        "events": *s.events.lock().unwrap(),
    }))
}

async fn artifact(
    State(s): State<Arc<Srv>>,
    AxPath(sha): AxPath<String>,
    h: HeaderMap,
) -> Response<Body> {
    let Some((_, path, size)) = s.files.iter().find(|f| f.0 == sha).cloned() else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .unwrap();
    };
    let range = h
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let a: u64 = a.parse().ok()?;
            let b: u64 = if b.is_empty() {
                size - 1
            } else {
                b.parse().ok()?
            };
            Some((a, b.min(size - 1)))
        });
    let (a, b, status) = match range {
        Some((a, b)) if a <= b && a < size => (a, b, StatusCode::PARTIAL_CONTENT),
        Some(_) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(Body::empty())
                .unwrap();
        }
        None => (0, size - 1, StatusCode::OK),
    };
    s.range_requests.fetch_add(1, Ordering::SeqCst);
    let mut f = tokio::fs::File::open(&path).await.unwrap();
    f.seek(std::io::SeekFrom::Start(a)).await.unwrap();
    let left = b - a + 1;
    let s2 = s.clone();
    let stream = futures_util::stream::unfold((f, left), move |(mut f, left)| {
        let s = s2.clone();
        async move {
            if left == 0 {
                return None;
            }
            let mut buf = vec![0u8; (256 << 10).min(left as usize)];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    s.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(buf)),
                        (f, left - n as u64),
                    ))
                }
                Err(e) => Some((Err(e), (f, 0))),
            }
        }
    });
    let mut r = Response::builder()
        .status(status)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{sha}\""))
        .header(header::CONTENT_LENGTH, left.to_string());
    if status == StatusCode::PARTIAL_CONTENT {
        r = r.header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"));
    }
    r.body(Body::from_stream(stream)).unwrap()
}
