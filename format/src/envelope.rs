//! The signing envelope: ed25519 signatures over the exact manifest bytes.
//!
//! The envelope is [DSSE](https://github.com/secure-systems-lab/dsse): the
//! manifest travels as base64 of its exact bytes, and each signature covers the
//! DSSE pre-authentication encoding of (payload type, bytes). Signing exact
//! bytes instead of re-serialized JSON avoids canonicalisation bugs, and the
//! payload type binding stops a signature over some other document from being
//! replayed as a manifest.
//!
//! Verification takes a set of trusted keys and a threshold: rotating a key
//! means shipping agents that trust old and new keys with threshold 1, signing
//! with both for a while, then dropping the old one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::limits::{MAX_ENVELOPE_BYTES, MAX_SIGNATURES};
use crate::manifest::{Manifest, ManifestError};

/// DSSE payload type of a manifest. A signature made for another type never
/// verifies as a manifest.
pub const PAYLOAD_TYPE: &str = "application/vnd.edge-ota.manifest.v1+json";

/// DSSE payload type of a zstd-compressed manifest, what the generator
/// writes: hashes and extents compress well, and a device fetches the
/// manifest at every update. The signature covers the compressed bytes, so
/// nothing is decompressed before it verifies.
pub const PAYLOAD_TYPE_ZSTD: &str = "application/vnd.edge-ota.manifest.v1+json+zstd";

/// A signed manifest, as stored in `manifest.json` and served to agents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the exact manifest bytes that were signed.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

/// One signature in an envelope.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// [`key_id`] of the signing key.
    pub keyid: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// Why an envelope was refused. Each variant names what an operator checks.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("signed manifest is {size} bytes, over the {limit}-byte limit: refusing to parse it")]
    TooLarge { size: usize, limit: usize },
    #[error("signed manifest is not a valid envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "envelope payload type is {found:?}, expected {PAYLOAD_TYPE:?}: this is not an edge-ota manifest"
    )]
    WrongPayloadType { found: String },
    #[error("signed manifest does not decompress (or is over the size limit once decompressed)")]
    BadCompression,
    #[error("envelope {what} is not valid base64")]
    BadBase64 { what: &'static str },
    #[error("envelope has {count} signatures, over the limit of {MAX_SIGNATURES}")]
    TooManySignatures { count: usize },
    #[error(
        "signature by trusted key {keyid} does not match the manifest bytes: the manifest was altered after signing"
    )]
    BadSignature { keyid: String },
    #[error(
        "manifest is signed only by keys this device does not trust ({keyids:?}); add the server's public key to the trusted keys"
    )]
    UntrustedSigner { keyids: Vec<String> },
    #[error("only {valid} valid signature(s) by trusted keys, {threshold} required")]
    BelowThreshold { valid: usize, threshold: usize },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Errors reading or building keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an ed25519 private key in PKCS#8 PEM: {0}")]
    BadPrivateKey(String),
    #[error("not an ed25519 public key in SPKI PEM: {0}")]
    BadPublicKey(String),
    #[error("a threshold of {threshold} cannot be met with {keys} trusted key(s)")]
    BadThreshold { threshold: usize, keys: usize },
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// Something that makes ed25519 signatures with a key whose id it knows: a
/// key in memory ([`SigningKeyPair`]) or a key that never leaves a token
/// (the server's PKCS#11 signer). Signing can fail (a token unplugged, a
/// session logged out), so it returns a result.
pub trait ManifestSigner: Send + Sync {
    /// [`key_id`] of the public key.
    fn keyid(&self) -> &str;
    /// The 64-byte ed25519 signature of `msg` (RFC 8032, pure Ed25519).
    fn sign_message(&self, msg: &[u8]) -> Result<[u8; 64], SignError>;
}

/// A signer could not sign.
#[derive(Debug, thiserror::Error)]
#[error("signing with key {keyid}: {reason}")]
pub struct SignError {
    pub keyid: String,
    pub reason: String,
}

/// Stable identifier of a public key: hex SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    Digest::of(key.as_bytes()).to_hex()
}

/// DSSE pre-authentication encoding.
fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + payload_type.len() + 32);
    out.extend_from_slice(
        format!(
            "DSSEv1 {} {} {} ",
            payload_type.len(),
            payload_type,
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// A signing key and its id.
pub struct SigningKeyPair {
    key: SigningKey,
    keyid: String,
}

impl SigningKeyPair {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_signing_key(SigningKey::from_bytes(&seed)))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let keyid = key_id(&key.verifying_key());
        SigningKeyPair { key, keyid }
    }

    /// Reads a PKCS#8 PEM private key (as written by [`Self::to_pem`], or
    /// `openssl genpkey -algorithm ed25519`).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key =
            SigningKey::from_pkcs8_pem(pem).map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        Ok(Self::from_signing_key(key))
    }

    /// PKCS#8 PEM of the private key. Zeroized on drop.
    pub fn to_pem(&self) -> Result<zeroize::Zeroizing<String>, KeyError> {
        self.key
            .to_pkcs8_pem(Default::default())
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))
    }

    /// SPKI PEM of the public key.
    pub fn public_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("encoding a valid public key cannot fail")
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn keyid(&self) -> &str {
        &self.keyid
    }
}

impl ManifestSigner for SigningKeyPair {
    fn keyid(&self) -> &str {
        &self.keyid
    }
    fn sign_message(&self, msg: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(self.key.sign(msg).to_bytes())
    }
}

/// Reads an SPKI PEM public key.
pub fn public_key_from_pem(pem: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError::BadPublicKey(e.to_string()))
}

/// The keys a device trusts and how many of them must sign. Constructed only
/// through [`TrustedKeys::try_new`], so an unsatisfiable policy cannot exist.
#[derive(Clone, Debug)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
    threshold: usize,
}

impl TrustedKeys {
    pub fn try_new(
        keys: impl IntoIterator<Item = VerifyingKey>,
        threshold: usize,
    ) -> Result<Self, KeyError> {
        let keys: BTreeMap<_, _> = keys.into_iter().map(|k| (key_id(&k), k)).collect();
        if threshold == 0 || threshold > keys.len() {
            return Err(KeyError::BadThreshold {
                threshold,
                keys: keys.len(),
            });
        }
        Ok(TrustedKeys { keys, threshold })
    }
}

impl Envelope {
    /// SHA-256 of the payload as carried (its base64 text): names what was
    /// signed, whoever signed it. A device echoes it for the freshness
    /// statement it holds (`CheckinRequest::freshness_held`).
    pub fn payload_digest(&self) -> Digest {
        Digest::of(self.payload.as_bytes())
    }

    /// Signs the exact `manifest_bytes` with every key given.
    pub fn sign(manifest_bytes: &[u8], keys: &[&SigningKeyPair]) -> Envelope {
        Self::sign_as(PAYLOAD_TYPE, manifest_bytes, keys)
    }

    /// Compresses the manifest (zstd) and signs the compressed bytes.
    pub fn sign_compressed(manifest_json: &[u8], keys: &[&SigningKeyPair]) -> Envelope {
        let z =
            zstd::bulk::compress(manifest_json, 19).expect("compressing into memory cannot fail");
        Self::sign_as(PAYLOAD_TYPE_ZSTD, &z, keys)
    }

    fn sign_as(payload_type: &str, manifest_bytes: &[u8], keys: &[&SigningKeyPair]) -> Envelope {
        let signers: Vec<&dyn ManifestSigner> = keys.iter().map(|k| *k as _).collect();
        Self::sign_with(payload_type, manifest_bytes, &signers)
            .expect("a key in memory always signs")
    }

    /// Compresses the manifest (zstd) and signs the compressed bytes with
    /// every signer given (keys in memory or in a token).
    pub fn sign_compressed_with(
        manifest_json: &[u8],
        signers: &[&dyn ManifestSigner],
    ) -> Result<Envelope, SignError> {
        let z =
            zstd::bulk::compress(manifest_json, 19).expect("compressing into memory cannot fail");
        Self::sign_with(PAYLOAD_TYPE_ZSTD, &z, signers)
    }

    /// Signs `body` as a DSSE envelope of `payload_type` with every signer.
    pub fn sign_with(
        payload_type: &str,
        body: &[u8],
        signers: &[&dyn ManifestSigner],
    ) -> Result<Envelope, SignError> {
        let msg = pae(payload_type, body);
        let mut signatures = Vec::with_capacity(signers.len());
        for k in signers {
            signatures.push(Signature {
                keyid: k.keyid().to_string(),
                sig: B64.encode(k.sign_message(&msg)?),
            });
        }
        Ok(Envelope {
            payload_type: payload_type.into(),
            payload: B64.encode(body),
            signatures,
        })
    }

    /// Serialized form, as written to `manifest.json`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("envelope serialization cannot fail");
        v.push(b'\n');
        v
    }

    /// Parses untrusted bytes under the size limit. Never panics.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The manifest JSON **without checking any signature**: for inspection
    /// tools and tests only, never for deciding to install.
    pub fn manifest_json_unverified(&self) -> Result<Vec<u8>, EnvelopeError> {
        let body = B64
            .decode(&self.payload)
            .map_err(|_| EnvelopeError::BadBase64 { what: "payload" })?;
        self.decode_body(body)
    }

    fn decode_body(&self, body: Vec<u8>) -> Result<Vec<u8>, EnvelopeError> {
        match self.payload_type.as_str() {
            PAYLOAD_TYPE => Ok(body),
            PAYLOAD_TYPE_ZSTD => zstd::bulk::decompress(&body, MAX_ENVELOPE_BYTES)
                .map_err(|_| EnvelopeError::BadCompression),
            other => Err(EnvelopeError::WrongPayloadType {
                found: other.chars().take(100).collect(),
            }),
        }
    }

    /// Checks signatures against `trusted` and returns the manifest JSON
    /// (decompressed, when the envelope carries it compressed, only after the
    /// signatures verified).
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<Vec<u8>, EnvelopeError> {
        if self.payload_type != PAYLOAD_TYPE && self.payload_type != PAYLOAD_TYPE_ZSTD {
            return Err(EnvelopeError::WrongPayloadType {
                found: self.payload_type.chars().take(100).collect(),
            });
        }
        let body = self.verify_signatures(trusted)?;
        self.decode_body(body)
    }

    /// Checks the signatures (whatever the payload type: the caller checks
    /// it first) and returns the signed bytes.
    pub(crate) fn verify_signatures(
        &self,
        trusted: &TrustedKeys,
    ) -> Result<Vec<u8>, EnvelopeError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(EnvelopeError::TooManySignatures {
                count: self.signatures.len(),
            });
        }
        let body = B64
            .decode(&self.payload)
            .map_err(|_| EnvelopeError::BadBase64 { what: "payload" })?;
        let msg = pae(&self.payload_type, &body);
        let mut valid = BTreeSet::new();
        let mut bad = None;
        let mut unknown = Vec::new();
        for s in &self.signatures {
            let Some(key) = trusted.keys.get(&s.keyid) else {
                unknown.push(s.keyid.chars().take(64).collect::<String>());
                continue;
            };
            let ok = B64
                .decode(&s.sig)
                .ok()
                .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
                .map(|b| {
                    key.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&b))
                        .is_ok()
                })
                .unwrap_or(false);
            if ok {
                valid.insert(s.keyid.as_str());
            } else {
                bad.get_or_insert_with(|| s.keyid.clone());
            }
        }
        if valid.len() >= trusted.threshold {
            return Ok(body);
        }
        if let Some(keyid) = bad {
            return Err(EnvelopeError::BadSignature { keyid });
        }
        if valid.is_empty() {
            return Err(EnvelopeError::UntrustedSigner { keyids: unknown });
        }
        Err(EnvelopeError::BelowThreshold {
            valid: valid.len(),
            threshold: trusted.threshold,
        })
    }

    /// Parse, verify, parse the manifest, validate it and check its expiry:
    /// the whole path from untrusted bytes to a manifest the engine may use.
    pub fn open(
        bytes: &[u8],
        trusted: &TrustedKeys,
        now: SystemTime,
    ) -> Result<Manifest, EnvelopeError> {
        let env = Envelope::from_json(bytes)?;
        let body = env.verify(trusted)?;
        let m = Manifest::from_json(&body)?;
        m.check_expiry(now)?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_threshold() {
        let a = SigningKeyPair::generate().unwrap();
        let b = SigningKeyPair::generate().unwrap();
        let c = SigningKeyPair::generate().unwrap();
        let env = Envelope::sign(b"{}", &[&a, &b]);
        let both = TrustedKeys::try_new([a.verifying_key(), b.verifying_key()], 2).unwrap();
        assert_eq!(env.verify(&both).unwrap(), b"{}");
        let only_a = Envelope::sign(b"{}", &[&a]);
        assert!(matches!(
            only_a.verify(&both),
            Err(EnvelopeError::BelowThreshold {
                valid: 1,
                threshold: 2
            })
        ));
        let by_c = Envelope::sign(b"{}", &[&c]);
        assert!(matches!(
            by_c.verify(&both),
            Err(EnvelopeError::UntrustedSigner { .. })
        ));
        let mut tampered = env.clone();
        tampered.payload = B64.encode(b"{ }");
        assert!(matches!(
            tampered.verify(&both),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    #[test]
    fn compressed_manifests_verify_and_decompress() {
        let a = SigningKeyPair::generate().unwrap();
        let trusted = TrustedKeys::try_new([a.verifying_key()], 1).unwrap();
        let body = br#"{"hello":"world","hello2":"world"}"#;
        let env = Envelope::sign_compressed(body, &[&a]);
        assert_eq!(env.payload_type, PAYLOAD_TYPE_ZSTD);
        assert_eq!(env.verify(&trusted).unwrap(), body);
        assert_eq!(env.manifest_json_unverified().unwrap(), body);
        // A signed payload that is not zstd is refused after verification.
        let bogus = Envelope::sign_as(PAYLOAD_TYPE_ZSTD, b"not zstd", &[&a]);
        assert!(matches!(
            bogus.verify(&trusted),
            Err(EnvelopeError::BadCompression)
        ));
    }

    #[test]
    fn duplicate_signatures_count_once() {
        let a = SigningKeyPair::generate().unwrap();
        let b = SigningKeyPair::generate().unwrap();
        let env = Envelope::sign(b"{}", &[&a, &a]);
        let both = TrustedKeys::try_new([a.verifying_key(), b.verifying_key()], 2).unwrap();
        assert!(matches!(
            env.verify(&both),
            Err(EnvelopeError::BelowThreshold { valid: 1, .. })
        ));
    }

    #[test]
    fn pem_round_trip() {
        let a = SigningKeyPair::generate().unwrap();
        let b = SigningKeyPair::from_pem(&a.to_pem().unwrap()).unwrap();
        assert_eq!(a.keyid(), b.keyid());
        assert_eq!(
            public_key_from_pem(&a.public_pem()).unwrap(),
            a.verifying_key()
        );
    }

    #[test]
    fn impossible_threshold_is_refused() {
        let a = SigningKeyPair::generate().unwrap();
        assert!(TrustedKeys::try_new([a.verifying_key()], 2).is_err());
        assert!(TrustedKeys::try_new([a.verifying_key()], 0).is_err());
    }
}
