//! The device API client (`docs/api.md`): enroll, check in, send events,
//! fetch manifests and payload ranges.
//!
//! One `reqwest` client (rustls, no content decoding: the bytes on the wire
//! are the bytes hashed) with connect and read timeouts, so a dead server
//! costs a timeout, never a hang. Nothing received is trusted for integrity:
//! manifests are signed, payload bytes are pinned by the manifest.

use std::time::Duration;

use ota_format::api::{
    API_PREFIX, ApiError, CheckinRequest, CheckinResponse, EnrollRequest, EnrollResponse, Event,
    EventsRequest, EventsResponse,
};
use ota_format::{Digest, limits::MAX_ENVELOPE_BYTES};

/// Why a call failed. [`ClientError::is_transient`] says whether trying
/// again later can help.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: server answered {status}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
        /// The server's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl ClientError {
    /// Network trouble, timeouts, 5xx, 408 and 429 may pass; other 4xx will not.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            ClientError::Invalid { .. } => false,
        }
    }
    /// The server does not know the device token (revoked or lost).
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, ClientError::Status { status: 401, .. })
    }
    /// The server's requested delay before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Parses `Retry-After` given in seconds (the only form the server sends).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// Timeouts of a [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Whole-request timeout for API calls (not for payload ranges).
    pub request: Duration,
    /// Longest gap between two reads of a response (stall detection).
    pub read: Duration,
}

/// TLS settings of a [`Client`] (PEM bytes).
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// The only CA(s) trusted for the server's certificate (else the
    /// system's roots).
    pub server_ca: Option<Vec<u8>>,
    /// Client certificate and key, presented in every handshake (mTLS).
    pub identity: Option<Vec<u8>>,
}

/// The device API client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// Shared by clones, replaceable after a re-enrollment. The lock is
    /// only held to clone or swap the string, never across an await.
    token: std::sync::Arc<std::sync::RwLock<Option<String>>>,
    timeouts: Timeouts,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://10.0.0.1:8080`).
    pub fn new(base: &str, timeouts: Timeouts) -> Result<Client, ClientError> {
        Client::with_tls(base, timeouts, &TlsSettings::default())
    }

    /// A client with a pinned server CA and/or a client certificate.
    pub fn with_tls(
        base: &str,
        timeouts: Timeouts,
        tls: &TlsSettings,
    ) -> Result<Client, ClientError> {
        // ring is the TLS crypto provider (see Cargo.toml); installing it
        // again, or after another, is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let err = |what: &str| {
            let what = what.to_string();
            move |source| ClientError::Transport { what, source }
        };
        let mut b = reqwest::Client::builder()
            .connect_timeout(timeouts.request.min(Duration::from_secs(10)))
            .read_timeout(timeouts.read)
            .pool_max_idle_per_host(64)
            // ota-server closes a kept-alive connection that carries no
            // request for `connections.header_read_timeout_ms` (10 s by
            // default): a connection reused just as the server closes it
            // fails its request ("IncompleteMessage"). Idle ones are
            // dropped here first.
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .user_agent(concat!("ota-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &tls.server_ca {
            let roots = reqwest::Certificate::from_pem_bundle(ca)
                .map_err(err("reading server_ca (PEM certificates)"))?;
            b = b.tls_certs_only(roots);
        }
        if let Some(id) = &tls.identity {
            let id = reqwest::Identity::from_pem(id)
                .map_err(err("reading client_cert and client_key (PEM)"))?;
            b = b.identity(id);
        }
        let http = b.build().map_err(err("building the HTTP client"))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: Default::default(),
            timeouts,
        })
    }

    /// A client over an HTTP client built elsewhere (the load test binds
    /// each simulated device to its own loopback source address). The HTTP
    /// connection pool is shared with other users of `http`; the token is
    /// this client's own (and its clones').
    pub fn from_reqwest(http: reqwest::Client, base: &str, timeouts: Timeouts) -> Client {
        Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: Default::default(),
            timeouts,
        }
    }

    /// The same client, authenticated with a device token.
    pub fn with_token(self, token: impl Into<String>) -> Client {
        self.set_token(token);
        self
    }

    /// Replaces the token of this client and all its clones (after the
    /// server revoked the old one and the device enrolled again).
    pub fn set_token(&self, token: impl Into<String>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = Some(token.into());
    }

    /// The token requests carry now.
    pub fn token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The underlying HTTP client (for the chunk pool).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Absolute URL of a server path (`/api/v1/...`) or an absolute URL as is.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else {
            format!("{}/{path}", self.base)
        }
    }

    /// Adds the bearer token to a request.
    pub fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let token = self.token.read().unwrap_or_else(|e| e.into_inner()).clone();
        match token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn post<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &Req,
    ) -> Result<(Resp, Option<Duration>), ClientError> {
        let rb = self
            .http
            .post(self.url(&format!("{API_PREFIX}{path}")))
            .timeout(self.timeouts.request)
            .json(body);
        let resp = self
            .authorize(rb)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                what: what.into(),
                source,
            })?;
        let resp = check_status(what, resp).await?;
        let ra = retry_after(resp.headers());
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                what: what.into(),
                source,
            })?;
        let v = serde_json::from_slice(&bytes).map_err(|e| ClientError::Invalid {
            what: what.into(),
            reason: format!("unexpected answer: {e}"),
        })?;
        Ok((v, ra))
    }

    /// `POST /devices/enroll`.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future abandons the request; enrolling again
    /// issues a fresh token and revokes any issued meanwhile.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, ClientError> {
        Ok(self.post("enrolling", "/devices/enroll", req).await?.0)
    }

    /// `POST /devices/checkin`. Returns the answer and its `Retry-After`.
    ///
    /// # Cancel safety
    /// Cancel-safe: a check-in changes nothing the agent relies on.
    pub async fn checkin(
        &self,
        req: &CheckinRequest,
    ) -> Result<(CheckinResponse, Option<Duration>), ClientError> {
        self.post("checking in", "/devices/checkin", req).await
    }

    /// `POST /devices/events`.
    ///
    /// # Cancel safety
    /// Cancel-safe: ingestion is idempotent by sequence number, so a batch
    /// whose answer was lost is simply sent again.
    pub async fn events(&self, events: &[Event]) -> Result<EventsResponse, ClientError> {
        let req = EventsRequest {
            events: events.to_vec(),
        };
        Ok(self
            .post("sending events", "/devices/events", &req)
            .await?
            .0)
    }

    /// Fetches a signed manifest envelope and checks it against the hash the
    /// offer named. At most [`MAX_ENVELOPE_BYTES`] are read.
    ///
    /// # Cancel safety
    /// Cancel-safe: nothing is written.
    pub async fn fetch_manifest(&self, url: &str, sha256: &Digest) -> Result<Vec<u8>, ClientError> {
        use futures_util::StreamExt;
        let what = "fetching the manifest";
        let rb = self.http.get(self.url(url)).timeout(self.timeouts.request);
        let resp = self
            .authorize(rb)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                what: what.into(),
                source,
            })?;
        let resp = check_status(what, resp).await?;
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ClientError::Transport {
                what: what.into(),
                source,
            })?;
            if body.len() + chunk.len() > MAX_ENVELOPE_BYTES {
                return Err(ClientError::Invalid {
                    what: what.into(),
                    reason: format!("manifest over the {MAX_ENVELOPE_BYTES}-byte limit"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let actual = Digest::of(&body);
        if actual != *sha256 {
            return Err(ClientError::Invalid {
                what: what.into(),
                reason: format!("sha256 is {actual}, the offer says {sha256}"),
            });
        }
        Ok(body)
    }
}

/// Turns a non-2xx answer into an error carrying the server's message.
///
/// # Cancel safety
/// Cancel-safe: it only reads the error body, for at most two seconds.
pub async fn check_status(
    what: &str,
    resp: reqwest::Response,
) -> Result<reqwest::Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let ra = retry_after(resp.headers());
    // Bounded read of the error body: it is only for the message.
    let text = tokio::time::timeout(Duration::from_secs(2), resp.bytes())
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|b| b.slice(..b.len().min(4096)))
        .unwrap_or_default();
    let message = serde_json::from_slice::<ApiError>(&text)
        .map(|e| format!("{} ({})", e.error, e.code))
        .unwrap_or_else(|_| String::from_utf8_lossy(&text).trim().to_string());
    Err(ClientError::Status {
        what: what.into(),
        status: status.as_u16(),
        message,
        retry_after: ra,
    })
}
