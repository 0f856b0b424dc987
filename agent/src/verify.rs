//! Manifest checks made before a single payload byte is fetched.
//!
//! [`check_offer`] turns the envelope bytes an offer pointed at into a
//! manifest this device may install, or says precisely why not: signature
//! threshold against the configured keys, expiry, device type, no downgrade
//! of the version or of the security counter, the payload the offer names is
//! the one the manifest pins, and — for a delta — the booted slot holds
//! exactly the image the delta was built from. Checking all of this first
//! means a wrong update costs one manifest download, not a payload.

use std::cmp::Ordering;
use std::time::SystemTime;

use ota_format::api::UpdateOffer;
use ota_format::{Digest, Envelope, Manifest, TrustedKeys};

/// Why an update was refused. Every message names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("manifest refused: {0}")]
    Envelope(#[from] ota_format::EnvelopeError),
    #[error("manifest is for device type {found:?}, this device is {ours:?}")]
    DeviceType { found: String, ours: String },
    #[error(
        "manifest version {found} is not newer than the running {current}: refusing a downgrade"
    )]
    Downgrade { found: String, current: String },
    #[error(
        "manifest security counter {found} is below the running image's {current}: refusing a rollback to a vulnerable version"
    )]
    SecurityCounter { found: u64, current: u64 },
    #[error("the offer does not match the signed manifest: {0}")]
    OfferMismatch(String),
    #[error(
        "this delta applies to version {from_version} (sha256 {expected}, {size} bytes) but the booted slot holds sha256 {actual}: wrong base image"
    )]
    SourceMismatch {
        from_version: String,
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("the target image is {need} bytes but slot {slot} holds only {have}")]
    SlotTooSmall { slot: String, need: u64, have: u64 },
    #[error("reading the booted slot: {0}")]
    Io(#[from] std::io::Error),
}

/// What the device runs now.
#[derive(Debug, Clone)]
pub struct Running {
    pub device_type: String,
    pub version: String,
    pub security_counter: u64,
}

/// Compares versions as dot/dash-separated components, numerically where
/// both are numbers (`1.10.0` > `1.9.3`), else as strings.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let split = |s: &str| {
        s.split(['.', '-', '+', '_', ':'])
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (split(a), split(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Opens the envelope and checks everything that does not need the slots.
pub fn check_manifest(
    envelope: &[u8],
    trusted: &TrustedKeys,
    running: &Running,
    offer: Option<&UpdateOffer>,
    now: SystemTime,
) -> Result<Manifest, VerifyError> {
    let m = Envelope::open(envelope, trusted, now)?;
    if m.device_type != running.device_type {
        return Err(VerifyError::DeviceType {
            found: m.device_type.clone(),
            ours: running.device_type.clone(),
        });
    }
    if compare_versions(&m.to.version, &running.version) != Ordering::Greater {
        return Err(VerifyError::Downgrade {
            found: m.to.version.clone(),
            current: running.version.clone(),
        });
    }
    if m.security_counter < running.security_counter {
        return Err(VerifyError::SecurityCounter {
            found: m.security_counter,
            current: running.security_counter,
        });
    }
    if let Some(o) = offer {
        if o.payload_sha256 != m.payload.sha256 || o.payload_size != m.payload.size {
            return Err(VerifyError::OfferMismatch(format!(
                "offer names payload {} ({} bytes), manifest pins {} ({} bytes)",
                o.payload_sha256, o.payload_size, m.payload.sha256, m.payload.size
            )));
        }
        if o.version != m.to.version {
            return Err(VerifyError::OfferMismatch(format!(
                "offer says version {}, manifest {}",
                o.version, m.to.version
            )));
        }
    }
    Ok(m)
}

/// Checks the slots: the booted one holds the delta's base (hashing
/// `from.size` bytes of it), the inactive one is large enough.
/// Blocking: run on a blocking thread.
pub fn check_slots(
    m: &Manifest,
    booted: &std::fs::File,
    target: &std::fs::File,
    target_name: &str,
) -> Result<(), VerifyError> {
    // A slot that is a regular file grows to fit (tests, demos); a block
    // device must be large enough.
    if !target.metadata()?.is_file() {
        let have = slot_len(target)?;
        if have < m.to.size {
            return Err(VerifyError::SlotTooSmall {
                slot: target_name.into(),
                need: m.to.size,
                have,
            });
        }
    }
    if let Some(from) = &m.from {
        let actual = if slot_len(booted)? < from.size {
            Digest::default()
        } else {
            ota_delta::apply::hash_range(booted, 0, from.size)?
        };
        if actual != from.sha256 {
            return Err(VerifyError::SourceMismatch {
                from_version: from.version.clone(),
                expected: from.sha256,
                actual,
                size: from.size,
            });
        }
    }
    Ok(())
}

/// Size of a slot: a regular file's length or a block device's size
/// (block devices report 0 in their metadata; seeking to the end works).
pub fn slot_len(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let md = f.metadata()?;
    if md.is_file() {
        return Ok(md.len());
    }
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("1.10.0", "1.9.3"), Ordering::Greater);
        assert_eq!(compare_versions("1.0.0", "1.0.0"), Ordering::Equal);
        assert_eq!(compare_versions("2", "10"), Ordering::Less);
        assert_eq!(compare_versions("1.0.1", "1.0"), Ordering::Greater);
    }
}
