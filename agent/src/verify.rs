//! Manifest checks made before a single payload byte is fetched.
//!
//! [`check_offer`] turns the envelope bytes an offer pointed at into a
//! manifest this device may install, or says precisely why not: signature
//! threshold against the configured keys, expiry, device type, a version
//! that parses and is newer than the running one (semantic versioning, the
//! order of [`ota_format::Version`], the same the server applies) unless a
//! higher security counter authorises a deliberate downgrade, no lower
//! security counter, the payload the offer names is
//! the one the manifest pins, and — for a delta — the booted slot holds
//! exactly the image the delta was built from. Checking all of this first
//! means a wrong update costs one manifest download, not a payload.

use std::time::SystemTime;

use ota_format::api::UpdateOffer;
use ota_format::{Digest, Envelope, Manifest, TrustedKeys, Version};

/// Why an update was refused. Every message names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("manifest refused: {0}")]
    Envelope(#[from] ota_format::EnvelopeError),
    #[error("manifest is for device type {found:?}, this device is {ours:?}")]
    DeviceType { found: String, ours: String },
    #[error(
        "manifest version {found} is not newer than the running {current} and its security counter {counter} is not above the running {current_counter}: refusing a downgrade"
    )]
    Downgrade {
        found: String,
        current: String,
        counter: u64,
        current_counter: u64,
    },
    #[error("manifest refused: its target version cannot be ordered: {0}")]
    BadVersion(ota_format::VersionError),
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
    let to = Version::parse(&m.to.version).map_err(VerifyError::BadVersion)?;
    match Version::parse(&running.version) {
        // A lower or equal version is accepted only with a higher security
        // counter: the server's `release add --allow-downgrade` (a rollback
        // to a known-good build that also locks out the bad one). Replaying
        // an old manifest cannot pass: its counter is not higher.
        Ok(current) => {
            if to <= current && m.security_counter <= running.security_counter {
                return Err(VerifyError::Downgrade {
                    found: m.to.version.clone(),
                    current: running.version.clone(),
                    counter: m.security_counter,
                    current_counter: running.security_counter,
                });
            }
        }
        // Written by an older agent that took any string: without a way
        // out the device would refuse every release for good. The security
        // counter below still forbids a rollback.
        Err(e) => tracing::warn!(
            running = %running.version,
            offered = %m.to.version,
            "the running version cannot be ordered ({e}); accepting a valid version to leave it"
        ),
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
    use ota_delta::generate::{DeltaSpec, GenerateOptions, generate};
    use ota_format::SigningKeyPair;

    /// A signed full-image manifest for `to_version` with `counter`.
    fn signed(to_version: &str, counter: u64) -> (Vec<u8>, TrustedKeys) {
        let key = SigningKeyPair::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        let spec = DeltaSpec {
            device_type: "board".into(),
            from_version: None,
            to_version: to_version.into(),
            security_counter: counter,
            expires_at: Manifest::expiry_in(1),
        };
        let m = generate(
            &spec,
            None,
            &std::fs::File::open(&img).unwrap(),
            Vec::new(),
            &GenerateOptions {
                chunk_size: 4096,
                zstd_level: 1,
                xz: true,
                zero_runs: true,
                arm64: true,
                frames: true,
                threads: 1,
                progress: false,
            },
        )
        .unwrap();
        let env = Envelope::sign(&m.to_json(), &[&key]).to_json();
        let trusted = TrustedKeys::try_new([key.verifying_key()], 1).unwrap();
        (env, trusted)
    }

    fn check(to: &str, counter: u64, running: &str, running_counter: u64) -> Result<(), String> {
        let (env, trusted) = signed(to, counter);
        let running = Running {
            device_type: "board".into(),
            version: running.into(),
            security_counter: running_counter,
        };
        check_manifest(&env, &trusted, &running, None, SystemTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn prerelease_is_not_newer_than_its_release() {
        // Used to be accepted: "rc1" compared as text after nothing.
        let e = check("1.1-rc1", 0, "1.1", 0).unwrap_err();
        assert!(e.contains("refusing a downgrade"), "{e}");
        check("1.1", 0, "1.1-rc1", 0).unwrap();
        check("1.10.0", 0, "1.9.3", 0).unwrap();
        let e = check("1.0", 0, "1.0.0", 0).unwrap_err();
        assert!(e.contains("not newer"), "{e}");
    }

    #[test]
    fn unparseable_target_version_is_refused_clearly() {
        let e = check("banana", 0, "1.0", 0).unwrap_err();
        assert!(e.contains("\"banana\" is not a version"), "{e}");
        assert!(e.contains("semantic version"), "{e}");
    }

    #[test]
    fn device_stuck_on_an_unparseable_version_can_leave_it() {
        check("2.0", 0, "banana", 0).unwrap();
        // ... but never to a lower security counter.
        let e = check("2.0", 0, "banana", 3).unwrap_err();
        assert!(e.contains("security counter"), "{e}");
    }

    #[test]
    fn downgrade_needs_a_higher_security_counter() {
        let e = check("1.0", 1, "1.1", 1).unwrap_err();
        assert!(e.contains("refusing a downgrade"), "{e}");
        check("1.0", 2, "1.1", 1).unwrap();
    }
}
