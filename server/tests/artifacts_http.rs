//! `GET`/`HEAD /api/v1/artifacts/{sha256}` over real HTTP: a real axum server
//! on a loopback socket, real files in a temporary store, reqwest or raw TCP
//! (for requests reqwest would normalise) as the client.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ota_format::Digest;
use ota_server::artifacts::{ArtifactStore, EgressLimiter, parse_sha256_segment, serve};
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone)]
struct AppState {
    store: Arc<ArtifactStore>,
    limiter: Option<Arc<EgressLimiter>>,
    served: Arc<AtomicU64>,
}

async fn artifact(
    State(st): State<AppState>,
    method: Method,
    headers: HeaderMap,
    UrlPath(segment): UrlPath<String>,
) -> Response {
    match parse_sha256_segment(&segment) {
        Ok(d) => {
            serve(
                &st.store,
                st.limiter.clone(),
                st.served.clone(),
                &method,
                &headers,
                &d,
            )
            .await
        }
        Err(e) => e.into_response(),
    }
}

struct Server {
    base: String,
    addr: std::net::SocketAddr,
    store: Arc<ArtifactStore>,
    served: Arc<AtomicU64>,
    root: tempfile::TempDir,
}

impl Server {
    async fn start(rate: Option<u64>) -> Server {
        let root = tempfile::tempdir().unwrap();
        let store = Arc::new(ArtifactStore::open(root.path().join("store")).unwrap());
        let served = Arc::new(AtomicU64::new(0));
        let state = AppState {
            store: store.clone(),
            limiter: rate.map(|r| Arc::new(EgressLimiter::new(NonZeroU64::new(r).unwrap()))),
            served: served.clone(),
        };
        let app = Router::new()
            .route("/api/v1/artifacts/{sha256}", get(artifact))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server {
            base: format!("http://{addr}/api/v1/artifacts/"),
            addr,
            store,
            served,
            root,
        }
    }

    /// Stores `data` through `put_file` (a real file copied in) and returns its digest.
    async fn put(&self, data: &[u8]) -> Digest {
        let src = self.root.path().join("incoming");
        std::fs::write(&src, data).unwrap();
        let (d, len) = self.store.put_file(&src).await.unwrap();
        std::fs::remove_file(&src).unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(d, Digest::of(data));
        d
    }

    fn url(&self, d: &Digest) -> String {
        format!("{}{}", self.base, d.to_hex())
    }

    /// Sends `request` verbatim on a new connection and returns the whole answer.
    async fn raw(&self, request: &str) -> String {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// A GET's status, headers and whole body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

async fn get_with(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    Answer {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

#[tokio::test]
async fn full_get_returns_the_file_with_its_headers() {
    let srv = Server::start(None).await;
    let data = random_bytes(300_001);
    let d = srv.put(&data).await;
    assert!(srv.store.contains(&d).await.unwrap());
    assert!(!srv.store.contains(&Digest::of(b"absent")).await.unwrap());
    let c = reqwest::Client::new();
    let r = get_with(&c, &srv.url(&d), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(Digest::of(&r.body), d);
    assert_eq!(r.header("content-length"), Some("300001"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("etag"), Some(format!("\"{d}\"").as_str()));
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(srv.served.load(Ordering::Relaxed), 300_001);
}

#[tokio::test]
async fn every_range_form() {
    let srv = Server::start(None).await;
    let data = random_bytes(1000);
    let d = srv.put(&data).await;
    let c = reqwest::Client::new();
    for (range, start, end) in [
        ("bytes=0-0", 0, 0),
        ("bytes=10-99", 10, 99),
        ("bytes=990-5000", 990, 999),
        ("bytes=500-", 500, 999),
        ("bytes=-1", 999, 999),
        ("bytes=-100", 900, 999),
        ("bytes=-5000", 0, 999),
    ] {
        let r = get_with(&c, &srv.url(&d), &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/1000").as_str()),
            "{range}"
        );
        let len = end - start + 1;
        assert_eq!(r.header("content-length"), Some(len.to_string().as_str()));
        assert_eq!(r.body, &data[start..=end], "{range}");
        assert_eq!(r.header("etag"), Some(format!("\"{d}\"").as_str()));
    }
    // Malformed: ignored, the whole file.
    for range in ["bytes=5-2", "bytes=abc", "items=0-1", "bytes="] {
        let r = get_with(&c, &srv.url(&d), &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::OK, "{range}");
        assert_eq!(r.body, data, "{range}");
    }
}

#[tokio::test]
async fn unsatisfiable_ranges_are_416() {
    let srv = Server::start(None).await;
    let data = random_bytes(1000);
    let d = srv.put(&data).await;
    let empty = srv.put(b"").await;
    let c = reqwest::Client::new();
    for (digest, range, size) in [
        (d, "bytes=1000-", 1000),
        (d, "bytes=1000-2000", 1000),
        (d, "bytes=-0", 1000),
        (d, "bytes=1000-,2000-2999", 1000),
        (empty, "bytes=0-", 0),
    ] {
        let r = get_with(&c, &srv.url(&digest), &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
        let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(e["code"], "range_not_satisfiable");
    }
    // The empty file itself is fine without a range.
    let r = get_with(&c, &srv.url(&empty), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
}

/// Regression (issue 17): `bytes=0-9,20-29` answered 416, which RFC 9110
/// §14.2 allows only when no range is satisfiable. Two satisfiable ranges
/// now get the whole file; one satisfiable among unsatisfiable ones gets
/// `206` for it.
#[tokio::test]
async fn several_ranges_are_416_only_when_none_is_satisfiable() {
    let srv = Server::start(None).await;
    let data = random_bytes(1000);
    let d = srv.put(&data).await;
    let c = reqwest::Client::new();
    for range in ["bytes=0-9,20-29", "bytes=0-1,5-9", "bytes=-5,0-0"] {
        let r = get_with(&c, &srv.url(&d), &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::OK, "{range}");
        assert_eq!(r.body, data, "{range}");
        assert_eq!(r.header("content-range"), None);
    }
    let r = get_with(&c, &srv.url(&d), &[("range", "bytes=5000-,10-19")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(r.body, &data[10..20]);
}

#[tokio::test]
async fn if_range_and_if_none_match() {
    let srv = Server::start(None).await;
    let data = random_bytes(5000);
    let d = srv.put(&data).await;
    let etag = format!("\"{d}\"");
    let c = reqwest::Client::new();

    let r = get_with(
        &c,
        &srv.url(&d),
        &[("range", "bytes=100-199"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &data[100..200]);
    let other = format!("\"{}\"", Digest::of(b"other"));
    let weak = format!("W/{etag}");
    for if_range in [
        other.as_str(),
        weak.as_str(),
        "Wed, 21 Oct 2015 07:28:00 GMT",
    ] {
        let r = get_with(
            &c,
            &srv.url(&d),
            &[("range", "bytes=100-199"), ("if-range", if_range)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{if_range}");
        assert_eq!(r.body, data, "{if_range}");
    }

    let list = format!("{other}, {etag}");
    for inm in [etag.as_str(), weak.as_str(), "*", list.as_str()] {
        let r = get_with(&c, &srv.url(&d), &[("if-none-match", inm)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
    }
    let r = get_with(&c, &srv.url(&d), &[("if-none-match", &other)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, data);
}

#[tokio::test]
async fn head_gives_headers_only() {
    let srv = Server::start(None).await;
    let data = random_bytes(70_000);
    let d = srv.put(&data).await;
    let c = reqwest::Client::new();
    for extra in [None, Some("bytes=0-9")] {
        let mut req = c.head(srv.url(&d));
        if let Some(r) = extra {
            req = req.header("range", r);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers().clone();
        assert_eq!(header(&h, "content-length"), Some("70000"));
        assert_eq!(header(&h, "accept-ranges"), Some("bytes"));
        assert_eq!(header(&h, "etag"), Some(format!("\"{d}\"").as_str()));
        assert!(r.bytes().await.unwrap().is_empty());
    }
    assert_eq!(srv.served.load(Ordering::Relaxed), 0);
    // On the wire: no body bytes after the headers.
    let answer = srv
        .raw(&format!(
            "HEAD /api/v1/artifacts/{d} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    let r = c.head(srv.url(&Digest::of(b"nope"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn missing_artifact_is_404_json() {
    let srv = Server::start(None).await;
    let c = reqwest::Client::new();
    let r = get_with(&c, &srv.url(&Digest::of(b"never stored")), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let e: ota_format::api::ApiError = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e.code, "not_found");
    assert!(!e.error.is_empty());
}

#[tokio::test]
async fn path_traversal_and_bad_names_never_read_outside_the_store() {
    let srv = Server::start(None).await;
    let d = srv.put(b"inside").await;
    // A secret next to the store, and one named like a digest one level up.
    let secret = b"SECRET-OUTSIDE-THE-STORE";
    std::fs::write(srv.root.path().join("secret"), secret).unwrap();
    let secret_digest = Digest::of(secret);
    std::fs::write(srv.root.path().join(secret_digest.to_hex()), secret).unwrap();

    let hex = d.to_hex();
    // Percent-encoded names reach the handler decoded and are refused as
    // names (400); literal `/` segments match no route (404).
    let cases = [
        ("..%2Fsecret".to_string(), 400),
        (format!("..%2F{secret_digest}"), 400),
        (format!("%2E%2E%2F{secret_digest}"), 400),
        ("..%2F..%2F..%2F..%2Fetc%2Fpasswd".to_string(), 400),
        (format!("..%5C{secret_digest}"), 400),
        (hex.to_uppercase(), 400),
        (hex[..63].to_string(), 400),
        (format!("{hex}0"), 400),
        (format!("{hex}%00"), 400),
        (format!("%2F{}", &hex[1..]), 400),
        ("../secret".to_string(), 404),
        (format!("../{secret_digest}"), 404),
        (format!("../store/{hex}"), 404),
        // Percent-encoded "f" × 64 decodes to a valid name that is not stored.
        ("%66".repeat(64), 404),
    ];
    for (path, expected) in cases {
        let answer = srv
            .raw(&format!(
                "GET /api/v1/artifacts/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            ))
            .await;
        let status: u16 = answer[9..12].parse().unwrap();
        assert_eq!(status, expected, "{path}: {answer}");
        assert!(!answer.contains("SECRET"), "{path}: {answer}");
        assert!(!answer.contains("root:"), "{path}: {answer}");
    }
    // The real name still works, so the refusals above are not an accident.
    let answer = srv
        .raw(&format!(
            "GET /api/v1/artifacts/{hex} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("inside"),
        "{answer}"
    );
    assert_eq!(srv.served.load(Ordering::Relaxed), 6);
}

#[tokio::test]
async fn egress_cap_is_respected() {
    let rate = 4u64 << 20;
    let srv = Server::start(Some(rate)).await;
    let data = random_bytes(2 << 20);
    let d = srv.put(&data).await;
    let burst = EgressLimiter::new(NonZeroU64::new(rate).unwrap()).burst_bytes();
    let t = Instant::now();
    let r = get_with(&reqwest::Client::new(), &srv.url(&d), &[]).await;
    let took = t.elapsed().as_secs_f64();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(Digest::of(&r.body), d);
    let min = (data.len() as u64 - burst) as f64 / rate as f64;
    assert!(min > 0.4);
    assert!(
        took >= 0.95 * min,
        "2 MiB at 4 MiB/s took {took:.3} s, expected ≥ {min:.3} s"
    );
}

#[tokio::test]
async fn a_big_download_does_not_starve_a_small_one() {
    let rate = 4u64 << 20;
    let srv = Arc::new(Server::start(Some(rate)).await);
    let big = srv.put(&random_bytes(8 << 20)).await;
    let small = srv.put(&random_bytes(256 << 10)).await;
    let c = reqwest::Client::new();
    let big_task = {
        let (c, url) = (c.clone(), srv.url(&big));
        tokio::spawn(async move {
            let body = c.get(url).send().await.unwrap().bytes().await.unwrap();
            (Instant::now(), Digest::of(&body))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = c
        .get(srv.url(&small))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let small_done = Instant::now();
    assert_eq!(Digest::of(&body), small);
    let (big_done, big_digest) = big_task.await.unwrap();
    assert_eq!(big_digest, big);
    // 8 MiB at 4 MiB/s takes ~2 s; the small one, sharing the cap, ~0.1 s.
    assert!(
        small_done < big_done,
        "the small download waited for the big one"
    );
}

/// How many of this process's file descriptors are open on `path`.
fn open_fds_on(path: &Path) -> usize {
    let target: PathBuf = path.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| *l == target)
        .count()
}

#[tokio::test]
async fn a_client_leaving_mid_body_ends_the_response() {
    let srv = Server::start(Some(1 << 20)).await;
    let size = 8usize << 20;
    let d = srv.put(&random_bytes(size)).await;
    let path = srv.store.path_of(&d);
    assert_eq!(open_fds_on(&path), 0);

    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(format!("GET /api/v1/artifacts/{d} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    while got < 200 << 10 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    assert_eq!(open_fds_on(&path), 1, "the response holds the file open");
    drop(s);

    // The server notices at its next write, drops the body and closes the file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds_on(&path) > 0 {
        assert!(
            Instant::now() < deadline,
            "the artifact is still open after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And it stops sending (and taking egress tokens).
    let after = srv.served.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(srv.served.load(Ordering::Relaxed), after);
    assert!(
        after < size as u64 / 2,
        "served {after} bytes to a client that left"
    );
}

#[tokio::test]
async fn concurrent_ranges_of_a_64_mib_file_reassemble() {
    let srv = Server::start(None).await;
    let size = 64usize << 20;
    let data = random_bytes(size);
    let d = srv.put(&data).await;
    drop(data);
    let c = reqwest::Client::new();
    let part = 3 << 20; // not a divisor of the size: the last range is short
    let mut tasks = Vec::new();
    for start in (0..size).step_by(part) {
        let end = (start + part).min(size) - 1;
        let (c, url) = (c.clone(), srv.url(&d));
        tasks.push(tokio::spawn(async move {
            let r = c
                .get(url)
                .header("range", format!("bytes={start}-{end}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
            let body = r.bytes().await.unwrap();
            assert_eq!(body.len(), end - start + 1);
            body
        }));
    }
    let mut h = Sha256::new();
    for t in tasks {
        h.update(t.await.unwrap());
    }
    assert_eq!(Digest::from(h), d);
    assert_eq!(srv.served.load(Ordering::Relaxed), size as u64);
}

#[tokio::test]
async fn put_file_is_atomic_and_open_cleans_leftovers() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let store = ArtifactStore::open(&dir).unwrap();
    let leftover = dir.join(".incoming-crashed");
    std::fs::write(&leftover, b"half").unwrap();
    let src = root.path().join("src");
    std::fs::write(&src, b"payload").unwrap();
    let (d, len) = store.put_file(&src).await.unwrap();
    assert_eq!((d, len), (Digest::of(b"payload"), 7));
    assert!(
        src.exists(),
        "put_file copies, the caller removes the source"
    );
    // Putting it again is idempotent.
    assert_eq!(store.put_file(&src).await.unwrap().0, d);
    drop(store);
    ArtifactStore::open(&dir).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![d.to_hex()]);
    assert_eq!(std::fs::read(dir.join(d.to_hex())).unwrap(), b"payload");
}
