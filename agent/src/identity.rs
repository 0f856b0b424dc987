//! The device's TLS identity (mTLS): its private key, created on the device
//! and never sent anywhere, the CSR that asks the server's fleet CA for a
//! certificate, and the certificate once issued.
//!
//! The flow (`docs/operations.md`, `deploy/agent.toml`):
//!
//! 1. First start with `client_cert`/`client_key` set and no certificate:
//!    the agent creates an ECDSA P-256 key in `client_key` (0600) unless one
//!    is there, and enrolls with a CSR whose subject is `CN=<device_id>`.
//! 2. The server signs it with the fleet CA and returns the certificate,
//!    which the agent writes to `client_cert` (atomically).
//! 3. From then on the agent presents the certificate in every TLS
//!    handshake and sends no bearer token: the certificate is its identity.
//!
//! A certificate placed in `client_cert` by other means (a factory, an
//! operator with `openssl ca`) is used as is.

use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::config::Config;

/// Why the identity could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("making the certificate signing request: {0}")]
    Csr(String),
}

fn file_err(path: &Path, reason: impl ToString) -> IdentityError {
    IdentityError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// What the agent has to authenticate with a certificate.
#[derive(Debug, Clone, PartialEq)]
pub enum Identity {
    /// `client_cert` is not configured.
    None,
    /// Certificate and key (PEM, concatenated) for the TLS client.
    Ready(Vec<u8>),
    /// The key exists, the certificate not yet: enroll with this CSR (PEM).
    NeedsCertificate { csr: String },
}

/// Loads the identity, creating the key when missing (see the module doc).
pub fn prepare(cfg: &Config) -> Result<Identity, IdentityError> {
    let (Some(cert), Some(key)) = (&cfg.client_cert, &cfg.client_key) else {
        return Ok(Identity::None);
    };
    let key_pem = match std::fs::read_to_string(key) {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = KeyPair::generate().map_err(|e| file_err(key, e))?;
            let pem = kp.serialize_pem();
            if let Some(dir) = key.parent() {
                std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
            }
            // 0600: the temporary file is created so, and renamed.
            crate::bootctl::write_atomic(key, pem.as_bytes()).map_err(|e| file_err(key, e))?;
            tracing::info!(key = %key.display(), "created the device's private key");
            pem
        }
        Err(e) => return Err(file_err(key, e)),
    };
    match std::fs::read(cert) {
        Ok(mut c) => {
            c.push(b'\n');
            c.extend_from_slice(key_pem.as_bytes());
            Ok(Identity::Ready(c))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Identity::NeedsCertificate {
            csr: csr(&cfg.device_id, &key_pem).map_err(|e| file_err(key, e))?,
        }),
        Err(e) => Err(file_err(cert, e)),
    }
}

/// A CSR (PEM) with subject `CN=<device_id>` signed by `key_pem`.
pub fn csr(device_id: &str, key_pem: &str) -> Result<String, IdentityError> {
    let kp = KeyPair::from_pem(key_pem).map_err(|e| IdentityError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_id);
    params.distinguished_name = dn;
    params
        .serialize_request(&kp)
        .and_then(|r| r.pem())
        .map_err(|e| IdentityError::Csr(e.to_string()))
}

/// Writes the certificate the server issued to `client_cert`, atomically.
pub fn store_certificate(cfg: &Config, pem: &str) -> Result<(), IdentityError> {
    let Some(path) = &cfg.client_cert else {
        return Ok(());
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    crate::bootctl::write_atomic(path, pem.as_bytes()).map_err(|e| file_err(path, e))
}
