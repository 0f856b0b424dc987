//! Device certificates: the fleet CA that signs devices' CSRs, and the
//! revocation list kept in the server's state.
//!
//! # Identity
//!
//! A client certificate names its device by the **subject CN**, which must
//! be the device id exactly (SANs are ignored). The CN was chosen over a SAN
//! because every tool writes it (`openssl req -subj /CN=ID`) and because the
//! server, when it signs a CSR, writes a subject with that one CN and nothing
//! else, whatever the CSR asked for. The device id of a request is taken from
//! the certificate alone: a certificate for device X never acts as device Y
//! (a bearer token for Y presented alongside it is refused, see
//! [`crate::http`]).
//!
//! # Revocation
//!
//! Certificates are revoked by serial number (the fleet CA's serials are
//! unique): `ota-server device revoke-cert ID` revokes every certificate the
//! server issued to ID, `--serial HEX` one certificate, also one the server
//! did not issue (made with `openssl ca` by the operator). The list lives in
//! the state backend (sled tree `device_certs`, PostgreSQL table
//! `device_certs`), so it survives restarts and is shared by replicas; a CRL
//! file (`[tls] client_crls`) is checked in the handshake as well.

use std::sync::Arc;

use dashmap::DashSet;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, decode, encode};

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a valid PEM PKCS#10 request with a correct signature: {0}")]
    Invalid(String),
    #[error(
        "the CSR's subject CN is {found:?} but the device id is {expected:?}; make the CSR with /CN={expected}"
    )]
    Mismatch { expected: String, found: String },
}

/// Why the fleet CA could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: {reason} (tls.client_ca_key must be the fleet CA's PKCS#8 PEM key, tls.client_ca its certificate)"
    )]
    Invalid {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// A serial number as the server stores and compares it: lowercase hex
/// without leading zeros (what `openssl x509 -serial` prints, lowercased).
pub fn serial_hex(raw: &[u8]) -> String {
    let h = hex::encode(raw);
    let t = h.trim_start_matches('0');
    if t.is_empty() { "0".into() } else { t.into() }
}

/// Normalises an operator-typed serial (`serial=0A:1B`, `0x0a1b`, `A1B`).
pub fn normalize_serial(s: &str) -> Result<String, String> {
    let s = s.trim();
    let s = s.strip_prefix("serial=").unwrap_or(s);
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let h: String = s.chars().filter(|c| *c != ':').collect();
    if h.is_empty() || h.len() > 42 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "serial {s:?} is not a certificate serial number in hex (as `openssl x509 -noout -serial` prints it)"
        ));
    }
    let t = h.trim_start_matches('0').to_ascii_lowercase();
    Ok(if t.is_empty() { "0".into() } else { t })
}

/// The fleet CA, when the server holds its key (`[tls] client_ca_key`).
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    days: u32,
}

impl DeviceCa {
    /// Loads the CA certificate (the first in `cert`) and its key.
    pub fn load(cert: &std::path::Path, key: &std::path::Path, days: u32) -> Result<Self, CaError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.into(),
                source,
            })
        };
        let key_pem = read(key)?;
        let kp = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key.into(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&read(cert)?, kp).map_err(|e| CaError::Invalid {
            path: cert.into(),
            reason: e.to_string(),
        })?;
        Ok(DeviceCa { issuer, days })
    }

    /// Signs `csr_pem` for `device_id`; returns the certificate (PEM) and
    /// its serial. Only the CSR's public key is used: the subject is
    /// `CN=<device_id>`, the usage client authentication, the validity
    /// `client_cert_days` from an hour ago (devices' clocks drift).
    pub fn issue(&self, device_id: &str, csr_pem: &str) -> Result<(String, String), CsrError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        let cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .map(dn_value_text)
            .unwrap_or_default();
        if cn != device_id {
            return Err(CsrError::Mismatch {
                expected: device_id.into(),
                found: cn,
            });
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(self.days));
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
        serial[0] &= 0x7f; // positive
        serial[0] |= 0x10; // no leading zero byte to strip
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| CsrError::Invalid(format!("signing: {e}")))?;
        Ok((signed.pem(), serial_hex(&serial)))
    }
}

fn dn_value_text(v: &rcgen::DnValue) -> String {
    use rcgen::DnValue::*;
    match v {
        Utf8String(s) => s.clone(),
        PrintableString(s) => s.as_str().to_string(),
        Ia5String(s) => s.as_str().to_string(),
        TeletexString(s) => s.as_str().to_string(),
        _ => String::from("(unsupported string type)"),
    }
}

/// A client certificate the server issued or was told to revoke.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CertRecord {
    pub serial: String,
    pub device: String,
    /// 0 for a certificate the server did not issue (revoked by serial).
    pub issued_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

/// The sled backend's certificate list: every record in the
/// `device_certs` tree, the revoked serials also in memory (checked on
/// every certificate-authenticated request).
pub struct CertList {
    store: Store,
    revoked: DashSet<String>,
}

impl CertList {
    pub fn load(store: Store) -> Result<CertList, StoreError> {
        let revoked = DashSet::new();
        for kv in store.certs.iter() {
            let (k, v) = kv?;
            let r: CertRecord = decode(&k, &v)?;
            if r.revoked_at_ms.is_some() {
                revoked.insert(r.serial);
            }
        }
        Ok(CertList { store, revoked })
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains(serial)
    }

    /// Records an issued certificate, durable on return.
    ///
    /// # Cancel safety
    /// A dropped future may leave the record written but not yet flushed;
    /// the caller has not handed out the certificate then.
    pub async fn record_issued(&self, serial: &str, device: &str) -> Result<(), StoreError> {
        let r = CertRecord {
            serial: serial.into(),
            device: device.into(),
            issued_at_ms: crate::now_ms(),
            revoked_at_ms: None,
        };
        self.store.certs.insert(serial.as_bytes(), encode(&r))?;
        self.store.durable().await
    }

    /// Revokes `serial`, or every certificate issued to `device`; returns
    /// the serials newly revoked, durable on return.
    ///
    /// # Cancel safety
    /// A dropped future may leave some serials revoked in memory and in
    /// sled's buffers; running the command again completes it.
    pub async fn revoke(
        &self,
        device: &str,
        serial: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let now = crate::now_ms();
        let mut targets: Vec<CertRecord> = Vec::new();
        match serial {
            Some(s) => {
                let r = match self.store.certs.get(s.as_bytes())? {
                    Some(v) => decode(s.as_bytes(), &v)?,
                    None => CertRecord {
                        serial: s.into(),
                        device: device.into(),
                        issued_at_ms: 0,
                        revoked_at_ms: None,
                    },
                };
                targets.push(r);
            }
            None => {
                for kv in self.store.certs.iter() {
                    let (k, v) = kv?;
                    let r: CertRecord = decode(&k, &v)?;
                    if r.device == device {
                        targets.push(r);
                    }
                }
            }
        }
        let mut out = Vec::new();
        for mut r in targets {
            if r.revoked_at_ms.is_some() {
                continue;
            }
            r.revoked_at_ms = Some(now);
            self.store.certs.insert(r.serial.as_bytes(), encode(&r))?;
            self.revoked.insert(r.serial.clone());
            out.push(r.serial);
        }
        self.store.durable().await?;
        Ok(out)
    }
}

/// Shared handle to the CA (none when the server holds no CA key).
pub type SharedCa = Option<Arc<DeviceCa>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalised_the_way_openssl_prints_them() {
        assert_eq!(normalize_serial("serial=0A1B").unwrap(), "a1b");
        assert_eq!(normalize_serial("0a:1b").unwrap(), "a1b");
        assert_eq!(normalize_serial("0x00").unwrap(), "0");
        assert_eq!(serial_hex(&[0x00, 0x0a, 0x1b]), "a1b");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
    }
}
