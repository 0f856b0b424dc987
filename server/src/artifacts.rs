//! Content-addressed artifacts: the store on disk and `GET`/`HEAD
//! /api/v1/artifacts/{sha256}`.
//!
//! Manifests and payloads are immutable files named by the SHA-256 of their
//! bytes. Because a name can only ever mean one content, the server needs no
//! locking between writers and readers: a file appears under its name by an
//! atomic `rename(2)` once it is complete and on disk, and a reader that opened
//! it keeps reading the same bytes whatever happens to the name later. The
//! strong `ETag` is the digest itself, so caches, `If-Range` and
//! `If-None-Match` need no modification time.
//!
//! Devices fetch payloads as many parallel single ranges and resume after
//! interruptions, so range handling is the hot path; it follows RFC 9110 §14
//! with the choices documented on [`serve`]. Every body is streamed from the
//! file in bounded chunks (never read whole into memory) and paced by an
//! optional server-wide [`EgressLimiter`] so a fleet rollout cannot saturate
//! the site's uplink.

use std::fs::File;
use std::io::{self, Read, SeekFrom, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, IF_RANGE, RANGE,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ota_format::Digest;
use ota_format::api::ApiError;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, warn};

/// Prefix of the temporary files `put_file` writes inside the store. It starts
/// with a dot so it can never be mistaken for a digest name, and leftovers of
/// a crash are recognised and removed by [`ArtifactStore::open`].
const TMP_PREFIX: &str = ".incoming-";
/// Read size when copying a file into the store.
const COPY_CHUNK: usize = 256 << 10;
/// Body chunk size when no egress limiter is set: large enough to keep
/// syscalls and per-chunk overhead low, small enough to bound memory per
/// response.
const BODY_CHUNK: usize = 128 << 10;

/// Errors of the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The blocking copy task panicked or was shut down with the runtime.
    #[error("artifact copy task failed: {0}")]
    Task(String),
}

pub(crate) fn io_err(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// A directory of immutable files, each named by the lower-case hex SHA-256
/// of its content (`<dir>/<sha256>`).
///
/// Only [`ArtifactStore::put_file`] should write into the directory: it is what
/// guarantees that a name always matches its content and that a file is
/// complete and durable before it becomes visible.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating it if needed) the store at `dir`, and removes temporary
    /// files left by a crash during [`put_file`](Self::put_file).
    ///
    /// Blocking; call it at start-up. One server process per directory: a
    /// second process opening the same directory would delete the first one's
    /// in-progress temporary files.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                warn!(path = %path.display(), "removing an unfinished artifact copy");
                std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(ArtifactStore { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact `digest` lives (whether or not it exists). The file
    /// name is the digest's 64 lower-case hex digits, so it can never leave
    /// the directory.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.to_hex())
    }

    /// Whether the artifact `digest` is in the store.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only reads metadata.
    pub async fn contains(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.path_of(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Copies the finished file `src` into the store under the SHA-256 of its
    /// content and returns that digest and the length. `src` is left in
    /// place; the caller removes it.
    ///
    /// The digest is computed over the very bytes written, so a name always
    /// matches its content even if `src` changes during the copy. The copy
    /// goes to a temporary file in the store directory, is fsynced, renamed to
    /// its final name (atomic: readers see nothing or the whole file) and the
    /// directory is fsynced, so after a crash the artifact is either absent
    /// or complete. Putting content that is already stored replaces the file
    /// with identical bytes.
    ///
    /// # Cancel safety
    /// The copy runs on a blocking thread. Dropping the future does not stop
    /// it: the artifact still lands (or, on error, the temporary file is
    /// removed); a partial file never appears under a digest name.
    pub async fn put_file(&self, src: &Path) -> Result<(Digest, u64), StoreError> {
        let dir = self.dir.clone();
        let src = src.to_path_buf();
        let span = tracing::info_span!("artifact_put", src = %src.display());
        tokio::task::spawn_blocking(move || span.in_scope(|| put_blocking(&dir, &src)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl ArtifactStore {
    /// Moves the finished file `src`, whose SHA-256 the caller computed over
    /// the very bytes it wrote and fsynced (a streamed upload, a build's
    /// payload), into the store under `digest`: a `rename(2)` and a
    /// directory fsync instead of [`put_file`](Self::put_file)'s copy, which
    /// at 2 GiB costs as much as the upload itself. When `src` is on another
    /// filesystem it falls back to `put_file` (which hashes what it copies)
    /// and leaves `src` to the caller.
    ///
    /// # Cancel safety
    /// Runs on a blocking thread that finishes even if the future is
    /// dropped; the file is then under its name or still at `src`.
    pub async fn adopt_file(
        &self,
        src: &Path,
        digest: &Digest,
    ) -> Result<(Digest, u64), StoreError> {
        let dir = self.dir.clone();
        let src = src.to_path_buf();
        let dest = self.path_of(digest);
        let digest = *digest;
        let span = tracing::info_span!("artifact_adopt", src = %src.display(), sha256 = %digest);
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                let len = std::fs::metadata(&src).map_err(io_err("stat", &src))?.len();
                match std::fs::rename(&src, &dest) {
                    Ok(()) => {
                        File::open(&dir)
                            .and_then(|d| d.sync_all())
                            .map_err(io_err("fsync directory", &dir))?;
                        debug!(sha256 = %digest, len, "artifact moved in");
                        Ok((digest, len))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EXDEV) => put_blocking(&dir, &src),
                    Err(e) => Err(io_err("move into the store", &src)(e)),
                }
            })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn put_blocking(dir: &Path, src: &Path) -> Result<(Digest, u64), StoreError> {
    let mut input = File::open(src).map_err(io_err("open", src))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(dir)
        .map_err(io_err("create a temporary file in", dir))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut len = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", src)(e)),
        };
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .map_err(io_err("write", tmp.path()))?;
        len += n as u64;
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_err("fsync", tmp.path()))?;
    let digest = Digest::from(hasher);
    let dest = dir.join(digest.to_hex());
    tmp.persist(&dest)
        .map_err(|e| io_err("rename a temporary file to", &dest)(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    debug!(sha256 = %digest, len, "artifact stored");
    Ok((digest, len))
}

/// The `{sha256}` path segment is not 64 lower-case hex digits.
///
/// Converts into a `400` response with an [`ApiError`] body (code
/// `bad_request`).
#[derive(Debug, thiserror::Error)]
#[error("artifact name must be 64 lower-case hex digits (a sha256)")]
pub struct InvalidDigest;

impl IntoResponse for InvalidDigest {
    fn into_response(self) -> Response {
        api_error(StatusCode::BAD_REQUEST, "bad_request", self.to_string())
    }
}

/// Parses the `{sha256}` path segment (already percent-decoded by the
/// router): exactly 64 characters of `[0-9a-f]`.
///
/// Stricter than `Digest::from_str` on purpose: upper-case hex would name the
/// same digest, but accepting it would give every artifact 2^64 URLs (and
/// cache keys). Since the accepted alphabet has no `/`, `.` or `%`, the
/// segment can never become a path traversal.
pub fn parse_sha256_segment(segment: &str) -> Result<Digest, InvalidDigest> {
    let b = segment.as_bytes();
    if b.len() != 64 || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(InvalidDigest);
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(b, &mut out).map_err(|_| InvalidDigest)?;
    Ok(Digest(out))
}

/// A server-wide egress cap: a token bucket shared by every artifact response.
///
/// Implemented as a GCRA (the "virtual scheduling" form of a token bucket) on
/// a single atomic, so taking tokens is one compare-and-swap and never a lock.
/// Responses take tokens one chunk at a time ([`Self::grain`], at most
/// 64 KiB) just before reading that chunk, and reservations are granted in
/// the order they are made: with N downloads in flight each gets about 1/N of
/// the rate, so one large download cannot starve small ones. After idleness
/// at most [`Self::burst_bytes`] (50 ms of the rate, at least one grain) may
/// go out at once.
#[derive(Debug)]
pub struct EgressLimiter {
    bytes_per_sec: u64,
    burst_ns: u64,
    grain: usize,
    origin: Instant,
    /// Theoretical arrival time: nanoseconds since `origin` at which the
    /// bucket would be empty again given everything reserved so far.
    tat_ns: AtomicU64,
}

impl EgressLimiter {
    /// A limiter pacing all responses together to `bytes_per_sec`.
    pub fn new(bytes_per_sec: NonZeroU64) -> Self {
        let rate = bytes_per_sec.get();
        let twentieth = rate / 20;
        let grain = twentieth.clamp(4 << 10, 64 << 10) as usize;
        let burst_bytes = twentieth.max(grain as u64);
        let mut l = EgressLimiter {
            bytes_per_sec: rate,
            burst_ns: 0,
            grain,
            origin: Instant::now(),
            tat_ns: AtomicU64::new(0),
        };
        l.burst_ns = l.cost_ns(burst_bytes);
        l
    }

    /// The configured rate.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// The most bytes that may go out at once after an idle period.
    pub fn burst_bytes(&self) -> u64 {
        (self.burst_ns as u128 * self.bytes_per_sec as u128 / 1_000_000_000) as u64
    }

    /// How many bytes a response takes at a time (and so the body chunk
    /// size): 50 ms of the rate, between 4 KiB and 64 KiB, so a slow cap
    /// still sends smoothly and a fast one does not cost a CAS per packet.
    pub fn grain(&self) -> usize {
        self.grain
    }

    fn cost_ns(&self, bytes: u64) -> u64 {
        let ns = (bytes as u128 * 1_000_000_000).div_ceil(self.bytes_per_sec as u128);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Waits until `bytes` may be sent, and counts them as sent.
    ///
    /// # Cancel safety
    /// The tokens are reserved when the call is made; dropping the future
    /// while it waits gives up sending but does not return them, so a dropped
    /// response wastes at most one grain of the budget and then takes
    /// nothing more.
    pub async fn acquire(&self, bytes: u64) {
        let now = self.now_ns();
        let cost = self.cost_ns(bytes);
        let mut cur = self.tat_ns.load(Ordering::Relaxed);
        let tat = loop {
            // An idle bucket does not accumulate credit beyond the burst.
            let new = cur.max(now).saturating_add(cost);
            match self
                .tat_ns
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break new,
                Err(actual) => cur = actual,
            }
        };
        let allowed_at = tat.saturating_sub(self.burst_ns);
        if allowed_at > now {
            tokio::time::sleep_until(self.origin + Duration::from_nanos(allowed_at)).await;
        }
    }
}

/// What a request's `Range` header asks for, resolved against the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeOutcome {
    /// No usable `Range`: send the whole file with `200`.
    Full,
    /// `206` with the inclusive byte range `start..=end`.
    Partial { start: u64, end: u64 },
    /// `416` with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// One syntactically valid `range-spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeSpec {
    /// `first-last` (`last` clamped later) or `first-`.
    From { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// A decimal `1*DIGIT`; values beyond `u64` saturate, which keeps their
/// meaning (a first position past any file, a last position clamped to the
/// end, a suffix covering the whole file).
fn parse_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |acc, c| {
        acc.saturating_mul(10).saturating_add(u64::from(c - b'0'))
    }))
}

/// Parses a `Range` value: `None` when it is malformed or not in bytes (to
/// be ignored), `Some(specs)` otherwise.
fn parse_range_header(value: &str) -> Option<Vec<RangeSpec>> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    // `1#range-spec`: empty list elements are allowed and ignored (RFC 9110 §5.6.1).
    for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (first, last) = spec.split_once('-')?;
        let spec = if first.is_empty() {
            RangeSpec::Suffix(parse_pos(last)?)
        } else {
            let first = parse_pos(first)?;
            let last = if last.is_empty() {
                None
            } else {
                Some(parse_pos(last)?)
            };
            if last.is_some_and(|l| l < first) {
                return None; // invalid range-spec: the whole header is invalid
            }
            RangeSpec::From { first, last }
        };
        specs.push(spec);
    }
    if specs.is_empty() { None } else { Some(specs) }
}

/// One range-spec resolved against a file of `size` bytes: the inclusive
/// byte range it selects, or `None` when it is unsatisfiable.
fn resolve_spec(spec: RangeSpec, size: u64) -> Option<(u64, u64)> {
    match spec {
        RangeSpec::From { first, .. } if first >= size => None,
        RangeSpec::From { first, last } => {
            Some((first, last.map_or(size - 1, |l| l.min(size - 1))))
        }
        RangeSpec::Suffix(0) => None,
        RangeSpec::Suffix(_) if size == 0 => None,
        RangeSpec::Suffix(n) => Some((size - n.min(size), size - 1)),
    }
}

/// Resolves a `Range` header value against a file of `size` bytes.
///
/// RFC 9110 §14.2 allows `416` only when *no* range is satisfiable; with
/// several satisfiable ranges the server may ignore the header. So: no
/// satisfiable range → `416`; exactly one → `206` for it (an unsatisfiable
/// companion is dropped, §14.1.1); two or more → `200` with the whole file
/// rather than `multipart/byteranges`, which no device client needs and
/// every client would have to parse (see docs/api.md).
fn resolve_range(value: &str, size: u64) -> RangeOutcome {
    let Some(specs) = parse_range_header(value) else {
        return RangeOutcome::Full;
    };
    let mut satisfiable = specs.into_iter().filter_map(|s| resolve_spec(s, size));
    match (satisfiable.next(), satisfiable.next()) {
        (None, _) => RangeOutcome::Unsatisfiable,
        (Some((start, end)), None) => RangeOutcome::Partial { start, end },
        (Some(_), Some(_)) => RangeOutcome::Full,
    }
}

/// `If-None-Match` (weak comparison, RFC 9110 §13.1.2): `*` or any listed tag
/// whose opaque part equals ours.
fn if_none_match_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// `If-Range` (strong comparison, RFC 9110 §13.1.5): the range is honoured
/// only if the header is absent or is exactly our strong ETag. A date never
/// matches since we send no `Last-Modified`; a weak tag never matches.
fn if_range_allows(headers: &HeaderMap, etag: &str) -> bool {
    match headers.get(IF_RANGE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| v.trim() == etag),
    }
}

fn api_error(status: StatusCode, code: &str, error: String) -> Response {
    let body = ApiError {
        code: code.to_string(),
        error,
    };
    (status, Json(body)).into_response()
}

fn header_u64(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

/// Answers `GET` or `HEAD /api/v1/artifacts/{sha256}` for `digest` (parse the
/// path segment with [`parse_sha256_segment`]). Body bytes sent are added to
/// `bytes_served` as they are handed to the connection (the server exports
/// it as `ota_bytes_served_total`).
///
/// HTTP semantics (RFC 9110):
/// - every answer about an existing file carries `Accept-Ranges: bytes` and
///   the strong `ETag: "<sha256>"`; content is `application/octet-stream`,
///   never with a `Content-Encoding`, and `Cache-Control: no-transform` asks
///   proxies not to add one (bytes on the wire are the bytes hashed, and
///   ranges index them);
/// - `If-None-Match` matching (weak comparison, or `*`) → `304`;
/// - one range (`bytes=a-b`, `bytes=a-`, `bytes=-n`) → `206` with
///   `Content-Range: bytes a-b/size`; an end beyond the file is clamped;
///   a start at or past the end, a zero suffix, or any range of an empty
///   file → `416` with `Content-Range: bytes */size`;
/// - several ranges: `416` only when none is satisfiable (RFC 9110 §14.2);
///   one satisfiable → `206` for it; two or more → `200` with the whole
///   file (the header may be ignored): multipart answers would complicate
///   every client for no gain, devices fetch ranges one per request;
/// - a malformed `Range` (bad syntax, `last < first`, a unit other than
///   bytes, several `Range` fields) is ignored and the whole file sent with
///   `200`, as RFC 9110 §14.2 permits: a confused client still gets correct
///   bytes, and it verifies the hash anyway;
/// - `If-Range` equal to the ETag honours the range, anything else (another
///   tag, a weak tag, a date) sends the whole file with `200`;
/// - `HEAD` answers like `GET` without a body; as RFC 9110 §14.2 requires,
///   `Range` is only acted on for `GET`, so `HEAD` always gives the full
///   length;
/// - unknown digest → `404` `{"code":"not_found",...}`; other methods →
///   `405`.
///
/// The body is streamed from the open file in chunks (the limiter's grain, or
/// 128 KiB without a limiter), each chunk paced by `limiter` before it is
/// read, so a waiting response holds no buffer.
///
/// # Cancel safety
/// Cancel-safe: before the response is returned only the file is opened and
/// positioned. Once returned, the body owns the file; dropping the response
/// (client gone) closes it and stops taking egress tokens.
#[tracing::instrument(name = "artifact", skip_all, fields(sha256 = %digest, method = %method))]
pub async fn serve(
    store: &ArtifactStore,
    limiter: Option<Arc<EgressLimiter>>,
    bytes_served: Arc<AtomicU64>,
    method: &Method,
    headers: &HeaderMap,
    digest: &Digest,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let mut r = api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not supported on artifacts; use GET or HEAD"),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = store.path_of(digest);
    let not_found = || {
        api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no artifact with sha256 {digest}"),
        )
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return not_found(),
        Err(e) => return internal_error(&path, "open", e),
    };
    // fstat the open file, not the path: the size is the size of what we read.
    let size = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return not_found(),
        Err(e) => return internal_error(&path, "stat", e),
    };
    let etag = format!("\"{}\"", digest.to_hex());
    let mut base = HeaderMap::new();
    base.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    base.insert(
        ETAG,
        HeaderValue::from_str(&etag).expect("a quoted hex string is a valid header value"),
    );
    base.insert(CACHE_CONTROL, HeaderValue::from_static("no-transform"));

    if if_none_match_matches(headers, &etag) {
        debug!("304 not modified");
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        *r.headers_mut() = base;
        return r;
    }

    let mut ranges = headers.get_all(RANGE).iter();
    let outcome = match (ranges.next(), ranges.next()) {
        (Some(v), None) if method == Method::GET && if_range_allows(headers, &etag) => v
            .to_str()
            .map_or(RangeOutcome::Full, |v| resolve_range(v, size)),
        _ => RangeOutcome::Full,
    };

    let (status, start, len) = match outcome {
        RangeOutcome::Unsatisfiable => {
            debug!(size, "416 range not satisfiable");
            let mut r = api_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!(
                    "the artifact is {size} bytes; no requested range starts \
                     before byte {size}: ask for bytes=first-last with first < {size}"
                ),
            );
            r.headers_mut().extend(base);
            r.headers_mut().insert(
                CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}"))
                    .expect("digits are a valid header value"),
            );
            return r;
        }
        RangeOutcome::Full => (StatusCode::OK, 0, size),
        RangeOutcome::Partial { start, end } => {
            base.insert(
                CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
                    .expect("digits are a valid header value"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    base.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    base.insert(CONTENT_LENGTH, header_u64(len));
    debug!(status = status.as_u16(), start, len, size, "serving");

    let body = if method == Method::HEAD || len == 0 {
        Body::empty()
    } else {
        if start > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(start)).await {
                return internal_error(&path, "seek", e);
            }
        }
        let chunk = limiter.as_ref().map_or(BODY_CHUNK, |l| l.grain());
        let state = BodyState {
            file,
            remaining: len,
            sent: 0,
            chunk,
            limiter,
            bytes_served,
        };
        let span = tracing::Span::current();
        Body::from_stream(futures_util::stream::unfold(state, move |mut st| {
            async move {
                let item = st.next_chunk().await?;
                Some((item, st))
            }
            .instrument(span.clone())
        }))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = base;
    r
}

fn internal_error(path: &Path, op: &str, e: io::Error) -> Response {
    error!(path = %path.display(), error = %e, "cannot {op} artifact");
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "cannot read the artifact; see the server log".to_string(),
    )
}

/// The streaming body of one response: reads `remaining` bytes from `file`'s
/// current position, one chunk at a time.
struct BodyState {
    file: tokio::fs::File,
    remaining: u64,
    sent: u64,
    chunk: usize,
    limiter: Option<Arc<EgressLimiter>>,
    bytes_served: Arc<AtomicU64>,
}

impl BodyState {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.remaining == 0 {
            return None;
        }
        let want = self.remaining.min(self.chunk as u64) as usize;
        if let Some(l) = &self.limiter {
            l.acquire(want as u64).await;
        }
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match self.file.read(&mut buf[filled..]).await {
                // The file shrank under us: someone wrote into the store
                // behind put_file's back. Abort rather than send short.
                Ok(0) => {
                    self.remaining = 0;
                    error!("artifact file is shorter than its size at open");
                    return Some(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.remaining = 0;
                    error!(error = %e, "artifact read failed");
                    return Some(Err(e));
                }
            }
        }
        self.remaining -= want as u64;
        self.sent += want as u64;
        self.bytes_served.fetch_add(want as u64, Ordering::Relaxed);
        Some(Ok(Bytes::from(buf)))
    }
}

impl Drop for BodyState {
    fn drop(&mut self) {
        if self.remaining > 0 {
            debug!(
                sent = self.sent,
                remaining = self.remaining,
                "artifact body dropped before the end (client gone)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn range_forms() {
        use RangeOutcome::*;
        let p = |start, end| Partial { start, end };
        assert_eq!(resolve_range("bytes=0-0", 10), p(0, 0));
        assert_eq!(resolve_range("bytes=2-5", 10), p(2, 5));
        assert_eq!(resolve_range("bytes=2-99", 10), p(2, 9));
        assert_eq!(resolve_range("bytes=3-", 10), p(3, 9));
        assert_eq!(resolve_range("bytes=-3", 10), p(7, 9));
        assert_eq!(resolve_range("bytes=-30", 10), p(0, 9));
        assert_eq!(resolve_range("BYTES=1-2", 10), p(1, 2));
        assert_eq!(resolve_range("bytes=1-2, ", 10), p(1, 2));
        assert_eq!(
            resolve_range("bytes=1-99999999999999999999999", 10),
            p(1, 9)
        );
        assert_eq!(resolve_range("bytes=-99999999999999999999999", 10), p(0, 9));
        assert_eq!(resolve_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(resolve_range("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(
            resolve_range("bytes=99999999999999999999-", 10),
            Unsatisfiable
        );
        assert_eq!(resolve_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(resolve_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(resolve_range("bytes=-5", 0), Unsatisfiable);
        // RFC 9110 §14.2: 416 only when no range is satisfiable.
        assert_eq!(resolve_range("bytes=0-1,4-5", 10), Full);
        assert_eq!(resolve_range("bytes=0-9,20-29", 100), Full);
        assert_eq!(resolve_range("bytes=0-1,50-60", 10), p(0, 1));
        assert_eq!(resolve_range("bytes=50-60,-0,3-", 10), p(3, 9));
        assert_eq!(resolve_range("bytes=10-,20-29,-0", 10), Unsatisfiable);
        for bad in [
            "",
            "bytes",
            "bytes=",
            "bytes=,",
            "bytes=-",
            "bytes=5-2",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes= 1 - 2",
            "bytes=1-2-3",
            "items=0-1",
            "bytes=0x1-2",
            "bytes=1-2,x",
        ] {
            assert_eq!(resolve_range(bad, 10), Full, "{bad:?}");
        }
    }

    #[test]
    fn segment_parser_accepts_only_lower_hex_sha256() {
        let d = Digest::of(b"x");
        assert_eq!(parse_sha256_segment(&d.to_hex()).unwrap(), d);
        for bad in [
            d.to_hex().to_uppercase(),
            d.to_hex()[..63].to_string(),
            format!("{}0", d.to_hex()),
            format!("../{}", &d.to_hex()[3..]),
            format!("{}/", &d.to_hex()[..63]),
            "g".repeat(64),
            String::new(),
        ] {
            assert!(parse_sha256_segment(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limiter_sizes() {
        let l = EgressLimiter::new(NonZeroU64::new(4 << 20).unwrap());
        assert_eq!(l.grain(), 64 << 10);
        assert!(
            (200_000..=220_000).contains(&l.burst_bytes()),
            "{}",
            l.burst_bytes()
        );
        let slow = EgressLimiter::new(NonZeroU64::new(1000).unwrap());
        assert_eq!(slow.grain(), 4 << 10);
        assert!(slow.burst_bytes() >= 4 << 10);
    }

    #[tokio::test]
    async fn limiter_paces_a_single_taker() {
        let l = EgressLimiter::new(NonZeroU64::new(1 << 20).unwrap());
        let t = std::time::Instant::now();
        for _ in 0..8 {
            l.acquire(64 << 10).await; // 512 KiB at 1 MiB/s
        }
        let min = (512 << 10) as f64 - l.burst_bytes() as f64;
        assert!(t.elapsed().as_secs_f64() >= 0.95 * min / (1 << 20) as f64);
    }

    fn range_string() -> impl Strategy<Value = String> {
        let num = prop_oneof![0u64..200, any::<u64>()].prop_map(|n| n.to_string());
        let spec = prop_oneof![
            (num.clone(), num.clone()).prop_map(|(a, b)| format!("{a}-{b}")),
            num.clone().prop_map(|a| format!("{a}-")),
            num.clone().prop_map(|n| format!("-{n}")),
            "[ -~]{0,12}",
        ];
        (
            prop_oneof![Just("bytes="), Just("Bytes="), Just("x="), Just("")],
            proptest::collection::vec(spec, 1..3),
        )
            .prop_map(|(unit, specs)| format!("{unit}{}", specs.join(",")))
    }

    proptest! {
        #[test]
        fn parsed_range_is_always_within_the_file(value in range_string(), size in prop_oneof![0u64..300, any::<u64>()]) {
            if let RangeOutcome::Partial { start, end } = resolve_range(&value, size) {
                prop_assert!(start <= end, "{value:?} size {size}: {start}-{end}");
                prop_assert!(end < size, "{value:?} size {size}: {start}-{end}");
            }
        }

        #[test]
        fn an_explicit_range_inside_the_file_is_served_exactly(size in 1u64..1_000_000, a in any::<u64>(), b in any::<u64>()) {
            let (first, last) = (a % size, a % size + b % (size - a % size));
            prop_assert_eq!(
                resolve_range(&format!("bytes={first}-{last}"), size),
                RangeOutcome::Partial { start: first, end: last }
            );
        }
    }
}
