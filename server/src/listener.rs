//! The accept loop: connection hygiene for a server that faces the open
//! internet.
//!
//! `axum::serve` builds hyper's connection builder without a timer, so
//! hyper's header-read timeout is off and a client can hold a socket (and a
//! file descriptor) forever by sending headers one byte a second, or nothing
//! at all. This loop serves the same router itself, with:
//!
//! - a **first-request deadline**: a connection that has not delivered a
//!   complete request head within `header_read_timeout` of being accepted
//!   (TLS handshake and HTTP/2 preface included) is closed — this catches
//!   silent connections, which hyper's own timer never sees because protocol
//!   detection reads before it starts;
//! - an **HTTP/1.1 header-read timeout**, measured from the moment a
//!   connection waits for a request head (its previous answer was sent), so
//!   it also bounds how long a kept-alive connection may sit between
//!   requests. The connection's watchdog enforces it, not hyper's own
//!   header-read timer: hyper arms that timer (a boxed sleep in the shared
//!   timer wheel) for every request, which cost a tenth of a check-in's CPU;
//!   the watchdog looks once per `header_read_timeout` at most;
//! - an **idle timeout**: no request in flight and no byte moving in either
//!   direction for `idle_timeout` closes the connection (HTTP/2 has no
//!   header-read timer, and a client that stops reading a response stalls
//!   writes);
//! - a **request-body timeout** ([`TimedBody`]): a body that stops for
//!   `body_read_timeout`, or trickles slower than `body_min_bytes_per_sec`
//!   once that grace has passed, fails the request and closes the connection;
//! - **connection caps**, global and per source address, checked before any
//!   byte is read: over the cap the socket is closed at once;
//! - **HTTP/2 limits**: concurrent streams and header-list size (hyper's
//!   rapid-reset defaults stay on);
//! - an **accept queue as long as the system allows** ([`bind`]): a fleet
//!   that reconnects at once must not have its SYNs dropped.
//!
//! The limits are read from a [`tokio::sync::watch`] channel for every new
//! connection, so a configuration reload can swap them without a restart
//! ([`Listener::limits`]).
//!
//! The loop is generic over how a TCP connection becomes a byte stream
//! ([`Acceptor`]: plain TCP or rustls), which also says who is on the other
//! end ([`ConnInfo`]: peer address, and for TLS the peer's certificate
//! chain, ALPN and SNI). Requests over TLS carry the client certificate's
//! verdict as an `Extension<ClientIdentity>`; nothing else is added per
//! request, since every extension is an allocation on the check-in path.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::app::LogGate;
use crate::config::ConnectionsConfig;
use crate::metrics::ConnMetrics;
use crate::tls::{ClientIdentity, Refusals};

/// How long connections get to finish their requests after shutdown starts
/// (SIGTERM) before they are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a connection closed for being idle gets to send its goodbye
/// (HTTP/2 `GOAWAY`) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Who is on the other end of a request's connection (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// `None` on plain HTTP.
    pub tls: Option<Arc<TlsInfo>>,
}

/// What the TLS handshake established.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The client's certificate chain, leaf first (empty without client
    /// authentication).
    pub peer_certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub alpn: Option<Vec<u8>>,
    pub sni: Option<String>,
    /// The client certificate as the handlers see it (verified, refused and
    /// why, or none); also added to every request as an
    /// `axum::Extension` (see [`crate::tls`]).
    pub identity: ClientIdentity,
}

/// Turns an accepted TCP connection into the byte stream HTTP is served on.
pub trait Acceptor: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Completes the handshake (if any). The caller bounds it with the
    /// first-request deadline.
    ///
    /// # Cancel safety
    /// Dropping the future drops the half-done handshake and the socket.
    fn accept(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> impl Future<Output = io::Result<(Self::Io, ConnInfo)>> + Send;
}

/// Plain HTTP.
pub struct PlainAcceptor;

impl Acceptor for PlainAcceptor {
    type Io = TcpStream;
    async fn accept(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> io::Result<(TcpStream, ConnInfo)> {
        Ok((tcp, ConnInfo { remote, tls: None }))
    }
}

/// HTTPS with rustls, and the client certificate's [`ClientIdentity`]
/// (see [`crate::tls`]). The server configuration is read for every
/// handshake, so `RustlsConfig::reload_from_config` takes effect for new
/// connections.
pub struct RustlsAcceptor {
    config: axum_server::tls_rustls::RustlsConfig,
    refusals: Arc<Refusals>,
}

impl RustlsAcceptor {
    /// `refusals` must be the one `config`'s client verifier records into
    /// ([`crate::tls::server_config`]).
    pub fn new(config: axum_server::tls_rustls::RustlsConfig, refusals: Arc<Refusals>) -> Self {
        RustlsAcceptor { config, refusals }
    }
}

impl Acceptor for RustlsAcceptor {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    async fn accept(&self, tcp: TcpStream, remote: SocketAddr) -> io::Result<(Self::Io, ConnInfo)> {
        // Verdicts recorded before this handshake began are not this
        // connection's (see `Refusals::reason`).
        let since = Instant::now();
        let tls = match tokio_rustls::TlsAcceptor::from(self.config.get_inner())
            .accept(tcp)
            .await
        {
            Ok(tls) => tls,
            Err(e) => {
                crate::tls::log_handshake_error(Some(remote), &e);
                return Err(e);
            }
        };
        let (_, session) = tls.get_ref();
        let identity = ClientIdentity::of(session, &self.refusals, since, Some(remote));
        let info = TlsInfo {
            peer_certificates: session
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
            alpn: session.alpn_protocol().map(<[u8]>::to_vec),
            sni: session.server_name().map(str::to_owned),
            identity,
        };
        Ok((
            tls,
            ConnInfo {
                remote,
                tls: Some(Arc::new(info)),
            },
        ))
    }
}

/// Listens on `addr` with the longest accept queue the system allows: the
/// backlog is `net.core.somaxconn` (4096 where it cannot be read; the
/// kernel caps it there anyway), as Go's net package does.
///
/// `tokio::net::TcpListener::bind` listens with a backlog of 128, the
/// standard library's. When more connections than that arrive at once
/// (devices reconnecting after an outage, a burst of check-ins at a wave's
/// start) the kernel drops the excess handshakes, and each such client
/// waits for its SYN to be retried after 1 s, then 3 s, 7 s and 15 s —
/// before the server has seen a byte. A test burst of 270 connections lost
/// 44 (`ListenOverflows`), and on a loaded CI machine one waited over 10 s.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted server can listen again at once
    // while the old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(listen_backlog())
}

/// `net.core.somaxconn`, or 4096 where it cannot be read.
pub fn listen_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(4096)
}

/// A listening socket with its limits.
pub struct Listener {
    tcp: TcpListener,
    limits: watch::Sender<Arc<ConnectionsConfig>>,
}

impl Listener {
    pub fn new(tcp: TcpListener, limits: ConnectionsConfig) -> Listener {
        Listener {
            tcp,
            limits: watch::Sender::new(Arc::new(limits)),
        }
    }

    /// The limits new connections get; send a new value to change them
    /// (connections already open keep theirs).
    pub fn limits(&self) -> watch::Sender<Arc<ConnectionsConfig>> {
        self.limits.clone()
    }

    /// Accepts and serves connections until `cancel`; then every open
    /// connection is asked to finish (HTTP/1.1: after its current response;
    /// HTTP/2: `GOAWAY`) and dropped after a grace period. Connection tasks
    /// are spawned on `tracker`, so waiting for it waits for them.
    ///
    /// # Cancel safety
    /// Meant to be spawned and stopped through `cancel`; dropping the future
    /// stops accepting but leaves connection tasks to their own deadlines.
    pub async fn serve<A: Acceptor>(
        self,
        acceptor: A,
        router: Router,
        metrics: ConnMetrics,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) {
        let acceptor = Arc::new(acceptor);
        let metrics = Arc::new(metrics);
        let per_address: Arc<DashMap<IpAddr, usize>> = Arc::new(DashMap::new());
        let mut global: Option<(usize, Arc<Semaphore>)> = None;
        let accept_log = LogGate::new(Duration::from_secs(1));
        let refuse_log = LogGate::new(Duration::from_secs(1));
        loop {
            let (tcp, remote) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.tcp.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        if let Some(n) = accept_log.admit() {
                            warn!(error = %e, failed_since_last_log = n, "accepting a connection failed (raise LimitNOFILE or lower connections.max_connections)");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let limits = self.limits.borrow().clone();
            let sem = match &global {
                Some((n, s)) if *n == limits.max_connections => s.clone(),
                _ => {
                    let s = Arc::new(Semaphore::new(limits.max_connections));
                    global = Some((limits.max_connections, s.clone()));
                    s
                }
            };
            let Ok(permit) = sem.try_acquire_owned() else {
                metrics.refused("max_connections");
                if let Some(n) = refuse_log.admit() {
                    warn!(%remote, refused_since_last_log = n, max = limits.max_connections, "connection refused: connections.max_connections reached");
                }
                continue;
            };
            let Some(slot) = AddressSlot::take(
                &per_address,
                remote.ip(),
                limits.max_connections_per_address,
            ) else {
                metrics.refused("max_connections_per_address");
                if let Some(n) = refuse_log.admit() {
                    warn!(%remote, refused_since_last_log = n, max = limits.max_connections_per_address, "connection refused: connections.max_connections_per_address reached");
                }
                continue;
            };
            // TCP_NODELAY: without it every Range response ends with a
            // delayed-ACK stall (~40 ms), which cut an agent's download rate
            // from ~400 to 100 MiB/s.
            let _ = tcp.set_nodelay(true);
            let conn = Connection {
                acceptor: acceptor.clone(),
                router: router.clone(),
                metrics: metrics.clone(),
                limits,
                cancel: cancel.clone(),
            };
            tracker.spawn(async move {
                conn.run(tcp, remote).await;
                drop((permit, slot));
            });
        }
    }
}

/// One connection counted against its source address.
struct AddressSlot {
    map: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl AddressSlot {
    /// `None` when `ip` already has `max` connections (0 = no limit).
    fn take(map: &Arc<DashMap<IpAddr, usize>>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut n = map.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// What a connection's watchdog reads: requests started and in flight, and
/// when a byte last moved; and what its request bodies share.
///
/// Everything a request touches here is an atomic in one allocation per
/// connection: a check-in is a few microseconds of server CPU, and each
/// allocation or fine clock read per request is a measurable share of it
/// (see `checkin-bench`).
struct Activity {
    start: Instant,
    /// [`coarse_ms`] at `start`.
    start_coarse_ms: u64,
    /// [`coarse_ms`] (relative to `start_coarse_ms`) when a byte was last
    /// read or written.
    last_ms: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// HTTP/1.1: the current request's body has not been read to its end.
    /// (HTTP/1.1 has one request at a time per connection; HTTP/2 does not
    /// use it.)
    body_pending: AtomicBool,
    /// The connection waits for a request head: from the start until the
    /// first request, and (HTTP/1.1) from each answer's end to the next
    /// request. Set after `head_wait_ms` (release/acquire pair).
    awaiting_head: AtomicBool,
    /// [`coarse_ms`] (relative to `start_coarse_ms`) when the connection
    /// began to wait for the current request head.
    head_wait_ms: AtomicU64,
    /// [`RUN`], [`GRACEFUL`] or [`CLOSE`], set by the watchdog, which then
    /// wakes the connection's task through `waker`.
    signal: AtomicU8,
    waker: futures_util::task::AtomicWaker,
    body: BodyLimits,
}

impl Activity {
    fn new(body: BodyLimits) -> Activity {
        Activity {
            start: Instant::now(),
            start_coarse_ms: coarse_ms(),
            last_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            body_pending: AtomicBool::new(false),
            awaiting_head: AtomicBool::new(true),
            head_wait_ms: AtomicU64::new(0),
            signal: AtomicU8::new(RUN),
            waker: futures_util::task::AtomicWaker::new(),
            body,
        }
    }
    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.start_coarse_ms)
    }
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    /// An HTTP/1.1 answer was sent (or abandoned): the header-read clock
    /// for the next request starts.
    fn answered(&self) {
        self.head_wait_ms.store(self.now_ms(), Ordering::Relaxed);
        self.awaiting_head.store(true, Ordering::Release);
    }
    /// When the request head the connection waits for is due, if it waits
    /// for one.
    fn head_due(&self, timeout: Duration) -> Option<Instant> {
        self.awaiting_head.load(Ordering::Acquire).then(|| {
            self.start + Duration::from_millis(self.head_wait_ms.load(Ordering::Relaxed)) + timeout
        })
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Milliseconds on the coarse monotonic clock: the same clock as
/// `Instant` (CLOCK_MONOTONIC), read at the kernel tick's resolution
/// (1–10 ms) for a fraction of the cost. Every read and write of every
/// connection records the time, so the fine clock showed in profiles; idle
/// timeouts are seconds.
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE
    // exists on every Linux since 2.6.32 (and cannot fail with a valid
    // pointer).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Decrements the in-flight count when a request's response is ready (or
/// its handler is dropped).
struct InFlight(Option<Arc<Activity>>);

impl InFlight {
    /// The handler answered: no longer in flight; the connection's activity
    /// is handed on (to the answer's [`AnswerBody`]).
    fn done(mut self) -> Arc<Activity> {
        let a = self.0.take().expect("InFlight is done once");
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
        a
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// An answer's body that, on HTTP/1.1, starts the header-read clock for the
/// next request once it has been sent (hyper drops it then) or abandoned.
/// Streaming a large artifact therefore never counts as waiting for a head
/// (the idle timeout covers a client that stops reading).
struct AnswerBody {
    inner: Body,
    /// `None` on HTTP/2, where streams have no header-read clock.
    conn: Option<Arc<Activity>>,
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.answered();
        }
    }
}

impl HttpBody for AnswerBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct Connection<A> {
    acceptor: Arc<A>,
    router: Router,
    metrics: Arc<ConnMetrics>,
    limits: Arc<ConnectionsConfig>,
    cancel: CancellationToken,
}

impl<A: Acceptor> Connection<A> {
    /// Handshake, then HTTP until the peer leaves, a deadline passes or
    /// shutdown ends it.
    ///
    /// # Cancel safety
    /// Dropping it drops the socket; requests in flight are abandoned.
    async fn run(self, tcp: TcpStream, remote: SocketAddr) {
        let l = &self.limits;
        let _open = self.metrics.open();
        let header_timeout = Duration::from_millis(l.header_read_timeout_ms);
        let idle_timeout = Duration::from_millis(l.idle_timeout_ms);
        let accepted = tokio::time::Instant::now();
        let first_deadline = accepted + header_timeout;
        let handshake = tokio::select! {
            _ = self.cancel.cancelled() => return,
            r = tokio::time::timeout_at(first_deadline, self.acceptor.accept(tcp, remote)) => r,
        };
        let (io, info) = match handshake {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                debug!(%remote, error = %e, "handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.closed("handshake_timeout");
                debug!(%remote, "handshake not finished within connections.header_read_timeout_ms");
                return;
            }
        };
        let activity = Arc::new(Activity::new(BodyLimits {
            idle: Duration::from_millis(l.body_read_timeout_ms),
            min_rate: l.body_min_bytes_per_sec,
            metrics: self.metrics.clone(),
        }));
        let io = TokioIo::new(Tracked {
            inner: io,
            activity: activity.clone(),
        });

        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        // No timer for HTTP/1.1: the watchdog below enforces the
        // header-read timeout (see the module docs).
        builder
            .http1()
            .header_read_timeout(None)
            .max_buf_size(l.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(l.h2_max_concurrent_streams)
            .max_header_list_size(l.max_header_bytes as u32);

        let svc = {
            let activity = activity.clone();
            let router = self.router.clone();
            let info = info.clone();
            hyper::service::service_fn(move |req: http::Request<Incoming>| {
                activity.requests.fetch_add(1, Ordering::Relaxed);
                activity.in_flight.fetch_add(1, Ordering::Relaxed);
                activity.awaiting_head.store(false, Ordering::Relaxed);
                let guard = InFlight(Some(activity.clone()));
                let (mut parts, body) = req.into_parts();
                let http1 = parts.version < http::Version::HTTP_2;
                if http1 {
                    activity
                        .body_pending
                        .store(!body.is_end_stream(), Ordering::Relaxed);
                }
                let body = TimedBody::new(body, activity.clone());
                if let Some(tls) = &info.tls {
                    // Read by handlers as `Extension<ClientIdentity>`.
                    parts.extensions.insert(tls.identity.clone());
                }
                if parts.uri.path().starts_with("/api/v1/admin")
                    || parts.uri.path().starts_with("/ui/log")
                {
                    // The audit log's "from where"; device requests go
                    // without the extension (an allocation per request).
                    parts.extensions.insert(crate::audit::PeerAddr(info.remote));
                }
                let req = http::Request::from_parts(parts, Body::new(body));
                let mut router = router.clone();
                async move {
                    let mut r = tower_service::Service::call(&mut router, req).await;
                    let activity = guard.done();
                    // Answered before the request body was read to its end
                    // (a 413, or a 401 before a large body): hyper will not
                    // read the rest and closes the connection after the
                    // answer. Saying so in the answer keeps an HTTP/1.1
                    // client from putting the connection back in its pool
                    // and sending its next request into a closing socket
                    // (reqwest: "IncompleteMessage"). HTTP/2 resets only
                    // the stream, and forbids the header.
                    if http1 && activity.body_pending.load(Ordering::Relaxed) {
                        if let Ok(resp) = &mut r {
                            resp.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                    }
                    let conn = http1.then_some(activity);
                    r.map(|resp| resp.map(|inner| AnswerBody { inner, conn }))
                }
            })
        };
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);

        // The deadlines are watched by a task of their own, which sleeps
        // until the next one that could apply. This task only polls the
        // connection (and reads one atomic): a `select!` here would poll a
        // timer and the shutdown token on every wake-up of every
        // connection, which showed in the check-in's profile.
        let watchdog = tokio::spawn(
            Watchdog {
                activity: activity.clone(),
                metrics: self.metrics.clone(),
                cancel: self.cancel.clone(),
                remote,
                first_deadline,
                header_timeout,
                idle_timeout,
            }
            .run(),
        );
        let _stop_watchdog = AbortOnDrop(watchdog);
        let mut graceful = false;
        let mut registered: Option<std::task::Waker> = None;
        let ended = std::future::poll_fn(|cx| {
            if registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                activity.waker.register(cx.waker());
                registered = Some(cx.waker().clone());
            }
            match activity.signal.load(Ordering::Acquire) {
                CLOSE => return Poll::Ready(None),
                GRACEFUL if !graceful => {
                    graceful = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ => {}
            }
            conn.as_mut().poll(cx).map(Some)
        })
        .await;
        if let Some(Err(e)) = ended {
            debug!(%remote, error = %e, "connection ended with an error");
        }
    }
}

/// What a connection's watchdog asks of it ([`Activity::signal`]).
const RUN: u8 = 0;
/// Finish the request in flight, then close (HTTP/2: `GOAWAY`).
const GRACEFUL: u8 = 1;
/// Close now.
const CLOSE: u8 = 2;

/// Aborts a task when dropped: a connection's watchdog ends with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The deadlines of one connection, enforced from a task of their own.
struct Watchdog {
    activity: Arc<Activity>,
    metrics: Arc<ConnMetrics>,
    cancel: CancellationToken,
    remote: SocketAddr,
    /// The first request head is due by then (measured from the accept,
    /// so the TLS handshake counts).
    first_deadline: tokio::time::Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Watchdog {
    fn signal(&self, what: u8) {
        self.activity.signal.store(what, Ordering::Release);
        self.activity.waker.wake();
    }

    /// Sleeps until the next deadline that could apply and decides there;
    /// asks the connection to close gracefully on shutdown or when idle,
    /// at once when a request head is overdue.
    ///
    /// # Cancel safety
    /// Aborted when its connection ends; holds nothing but counters.
    async fn run(self) {
        let activity = &self.activity;
        let remote = self.remote;
        let (header_timeout, idle_timeout) = (self.header_timeout, self.idle_timeout);
        let mut closing: Option<tokio::time::Instant> = None;
        let mut shutting_down = false;
        loop {
            let now = tokio::time::Instant::now();
            let next = if let Some(until) = closing {
                until
            } else {
                // With a request in flight the connection is not idle
                // (a handler may take a while): look again later.
                let idle_at = if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    now + idle_timeout
                } else {
                    tokio::time::Instant::from_std(activity.last()) + idle_timeout
                };
                if activity.requests.load(Ordering::Relaxed) == 0 {
                    self.first_deadline.min(idle_at)
                } else if let Some(due) = activity.head_due(header_timeout) {
                    tokio::time::Instant::from_std(due).min(idle_at)
                } else {
                    // Answering: a wait for the next head can only begin
                    // after now, so it cannot be due before `now +
                    // header_timeout`; looking again then keeps the
                    // deadline exact without a timer per request.
                    (now + header_timeout).min(idle_at)
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.signal(GRACEFUL);
                    closing = Some(closing.map_or(now + SHUTDOWN_GRACE, |c| c.min(now + SHUTDOWN_GRACE)));
                }
                _ = tokio::time::sleep_until(next) => {
                    let now = tokio::time::Instant::now();
                    if closing.is_some_and(|c| now >= c) {
                        self.signal(CLOSE);
                        return;
                    }
                    if closing.is_some() {
                        continue;
                    }
                    if activity.requests.load(Ordering::Relaxed) == 0 {
                        if now >= self.first_deadline {
                            self.metrics.closed("first_request_timeout");
                            debug!(%remote, "no request within connections.header_read_timeout_ms");
                            self.signal(CLOSE);
                            return;
                        }
                    } else if activity
                        .head_due(header_timeout)
                        .is_some_and(|due| now.into_std() >= due)
                    {
                        self.metrics.closed("header_timeout");
                        debug!(%remote, "request head not received within connections.header_read_timeout_ms");
                        self.signal(CLOSE);
                        return;
                    }
                    let idle_for = now.into_std().saturating_duration_since(activity.last());
                    if activity.in_flight.load(Ordering::Relaxed) == 0 && idle_for >= idle_timeout {
                        self.metrics.closed("idle_timeout");
                        debug!(%remote, "idle for connections.idle_timeout_ms");
                        self.signal(GRACEFUL);
                        closing = Some(now + CLOSE_GRACE);
                    }
                }
            }
        }
    }
}

/// A byte stream that records when bytes last moved.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request-body deadlines of one connection.
struct BodyLimits {
    /// Longest wait for the next piece of body; also the grace before the
    /// minimum rate applies.
    idle: Duration,
    /// Bytes per second a body must average once `idle` has passed.
    min_rate: u64,
    metrics: Arc<ConnMetrics>,
}

/// Why a request body was cut off (the handler sees it as a body error).
#[derive(Debug, thiserror::Error)]
#[error(
    "request body too slow: {received} bytes in {elapsed:?} (connections.body_read_timeout_ms / body_min_bytes_per_sec)"
)]
pub struct BodyTimeout {
    received: u64,
    elapsed: Duration,
}

/// A request body with a read deadline: the next frame must come within
/// `idle` of the previous one, and by `start + idle + received / min_rate`,
/// so a body that trickles a byte a second fails as surely as one that stops.
///
/// The clock starts the first time the body is not already there, and the
/// timer is only armed then: a check-in's small body usually arrives with
/// its head and costs neither a clock read nor a timer.
struct TimedBody {
    inner: Incoming,
    /// The connection's: its body limits, and where the end of an HTTP/1.1
    /// body is recorded.
    conn: Arc<Activity>,
    /// When the body first had to be waited for, and when a piece of it
    /// last arrived since; `None` while it never had to be.
    clock: Option<(tokio::time::Instant, tokio::time::Instant)>,
    received: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, conn: Arc<Activity>) -> TimedBody {
        TimedBody {
            inner,
            conn,
            clock: None,
            received: 0,
            sleep: None,
        }
    }

    fn deadline(
        &self,
        start: tokio::time::Instant,
        last: tokio::time::Instant,
    ) -> tokio::time::Instant {
        let limits = &self.conn.body;
        let by_rate = start
            + limits.idle
            + Duration::from_secs_f64(self.received as f64 / limits.min_rate.max(1) as f64);
        (last + limits.idle).min(by_rate)
    }

    /// Read to its end: an answer now leaves the connection reusable.
    fn finished(&self) {
        self.conn.body_pending.store(false, Ordering::Relaxed);
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.received += d.len() as u64;
                    if let Some((start, last)) = &mut this.clock {
                        *last = tokio::time::Instant::now();
                        let (start, last) = (*start, *last);
                        let deadline = this.deadline(start, last);
                        if let Some(s) = &mut this.sleep {
                            s.as_mut().reset(deadline);
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    this.finished();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finished();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => {
                let (start, last) = *this.clock.get_or_insert_with(|| {
                    let now = tokio::time::Instant::now();
                    (now, now)
                });
                let deadline = this.deadline(start, last);
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(sleep.as_mut().poll(cx));
                this.conn.body.metrics.closed("body_timeout");
                Poll::Ready(Some(Err(Box::new(BodyTimeout {
                    received: this.received,
                    elapsed: start.elapsed(),
                }))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
