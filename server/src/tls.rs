//! The HTTPS listener's TLS: the rustls configuration (a function of
//! `[tls]`, so a reload can rebuild it) with optional client-certificate
//! verification against the fleet CA, and the per-connection step that
//! hands the verified peer certificate to the handlers.
//!
//! # Refused certificates get an HTTP answer
//!
//! A certificate that fails verification (expired, not yet valid, unknown
//! CA, on a CRL) does not fail the handshake: in TLS 1.3 the client has
//! already sent its Finished when the server checks its certificate, so the
//! alert races the close and clients report only "connection closed". The
//! [`DeferredVerifier`] instead records the reason in [`Refusals`] and lets
//! the handshake finish (the client still proves possession of the key: the
//! CertificateVerify signature is checked as usual); every request of that
//! connection is then answered `403 certificate_refused` with the reason,
//! and the server logs a WARN. A refused certificate never authenticates
//! anything, and a bearer token sent along does not rescue it.
//!
//! # What the accept loop does per connection
//!
//! 1. Note `since = Instant::now()`, then the TLS handshake with the
//!    [`rustls::ServerConfig`] of [`server_config`]. A client certificate
//!    is *optional* (bearer-token devices share the listener).
//! 2. On failure, [`log_handshake_error`].
//! 3. On success, [`ClientIdentity::of`]`(conn, refusals, since)` — it also
//!    logs a refused certificate — kept in the connection's
//!    [`crate::listener::TlsInfo`] and added to every request of the
//!    connection as an `axum::Extension`; [`crate::http`] reads it.
//!
//! [`crate::listener::RustlsAcceptor`] does exactly this for the accept
//! loop of [`crate::listener`].
//!
//! # Reloads
//!
//! The server certificate comes from a resolver
//! ([`crate::reload::LiveCert`]), so a reload swaps it without rebuilding
//! anything; a reload also rebuilds this configuration (same resolver, same
//! [`Refusals`]) so a renewed fleet CA or CRL file applies to new
//! handshakes.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::config::TlsConfig;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn file_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.into(),
        reason: reason.to_string(),
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn read_crl(path: &Path) -> Result<CertificateRevocationListDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err("CRL", path, e))?;
    if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::from_pem_slice(&bytes).map_err(|e| file_err("CRL", path, e))
    } else {
        Ok(CertificateRevocationListDer::from(bytes))
    }
}

/// Client certificates the verifier refused, by SHA-256 of the leaf, with
/// when and why. Shared by the [`DeferredVerifier`] (writes) and the
/// acceptor (reads); keep one per listener across reloads.
#[derive(Debug, Default)]
pub struct Refusals {
    map: DashMap<[u8; 32], (Instant, String)>,
}

/// Entries kept before old ones are dropped (bounded memory under a flood
/// of bad certificates).
const MAX_REFUSALS: usize = 4096;

impl Refusals {
    fn record(&self, leaf: &[u8], reason: String) {
        if self.map.len() >= MAX_REFUSALS {
            self.map
                .retain(|_, v| v.0.elapsed() < Duration::from_secs(60));
        }
        self.map
            .insert(Sha256::digest(leaf).into(), (Instant::now(), reason));
    }

    /// Why `leaf` was refused, if it was at or after `since` (the start of
    /// the caller's handshake: an older verdict may no longer hold).
    pub fn reason(&self, leaf: &[u8], since: Instant) -> Option<String> {
        let key: [u8; 32] = Sha256::digest(leaf).into();
        self.map
            .get(&key)
            .filter(|e| e.0 >= since)
            .map(|e| e.1.clone())
    }
}

/// The WebPKI verifier, except that a certificate it refuses is recorded
/// in [`Refusals`] instead of failing the handshake (see the module doc).
#[derive(Debug)]
pub struct DeferredVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    refusals: Arc<Refusals>,
}

impl ClientCertVerifier for DeferredVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            self.refusals.record(end_entity, e.to_string());
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the listener's rustls configuration from `[tls]`: the server
/// certificate from `cert` (the live certificate of
/// [`crate::reload::LiveCert`], loaded from `tls.cert` and `tls.key`), and,
/// with `client_ca`, a client-certificate verifier that accepts
/// connections without one and records refused certificates in
/// `refusals`.
///
/// Pure function of the client-CA and CRL files named in `tls`: call it
/// again to reload (with the same `refusals` and `cert`).
pub fn server_config(
    tls: &TlsConfig,
    refusals: &Arc<Refusals>,
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("fleet CA (tls.client_ca)", ca)? {
                roots
                    .add(c)
                    .map_err(|e| file_err("fleet CA (tls.client_ca)", ca, e))?;
            }
            let crls = tls
                .client_crls
                .iter()
                .map(|p| read_crl(p))
                .collect::<Result<Vec<_>, _>>()?;
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated();
            if !crls.is_empty() {
                v = v.with_crls(crls).only_check_end_entity_revocation();
            }
            let inner = v.build().map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(Arc::new(DeferredVerifier {
                inner,
                refusals: refusals.clone(),
            }))
        }
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A verified client certificate, as the handlers need it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCert {
    /// The subject CN when it is a valid device id (see [`crate::certs`]).
    pub device_id: Option<String>,
    /// Serial, normalised by [`crate::certs::serial_hex`].
    pub serial: String,
}

impl PeerCert {
    /// Reads the leaf certificate rustls has already verified.
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let device_id = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| ota_format::api::check_name("device id", cn).is_ok())
            .map(String::from);
        Some(PeerCert {
            device_id,
            serial: crate::certs::serial_hex(cert.raw_serial()),
        })
    }
}

/// The request extension: the connection's client certificate, if any.
#[derive(Debug, Clone, Default)]
pub enum ClientIdentity {
    /// No client certificate (bearer token, or nothing).
    #[default]
    None,
    /// A certificate of the fleet CA, valid and not on a CRL.
    Verified(Arc<PeerCert>),
    /// A certificate that failed verification, and why.
    Refused(Arc<str>),
}

impl ClientIdentity {
    /// The identity of a TLS connection whose handshake began at `since`;
    /// logs a refused certificate.
    pub fn of(
        conn: &rustls::ServerConnection,
        refusals: &Refusals,
        since: Instant,
        peer: Option<SocketAddr>,
    ) -> ClientIdentity {
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            return ClientIdentity::None;
        };
        if let Some(reason) = refusals.reason(leaf, since) {
            warn!(
                peer = %peer.map(|p| p.to_string()).unwrap_or_default(),
                error = %reason,
                "client certificate refused: the device needs a certificate from the fleet CA \
                 (tls.client_ca) that is valid now (check its clock) and not revoked"
            );
            return ClientIdentity::Refused(reason.into());
        }
        match PeerCert::from_der(leaf) {
            Some(c) => ClientIdentity::Verified(Arc::new(c)),
            None => ClientIdentity::Refused("the certificate cannot be parsed".into()),
        }
    }
}

/// Logs a failed handshake: a refused client certificate as a WARN an
/// operator can act on, anything else (scanners, plain HTTP on the TLS
/// port, clients that hung up) at DEBUG.
pub fn log_handshake_error(peer: Option<SocketAddr>, e: &io::Error) {
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            err @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::InvalidCertRevocationList(_)),
        ) => warn!(
            %peer,
            error = %err,
            "client certificate refused in the TLS handshake: the device needs a certificate \
             from the fleet CA (tls.client_ca) that is valid now (check its clock) and not revoked"
        ),
        _ => debug!(%peer, error = %e, "TLS handshake failed"),
    }
}
