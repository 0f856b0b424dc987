//! Opaque releases: a client's own update bundle (a SWUpdate `.swu`, a RAUC
//! `.raucb`, any file) stored as the release's single artifact.
//!
//! Devices that speak hawkBit's DDI API ([`crate::ddi`]) install what their
//! own client understands; the server cannot build deltas of a signed
//! bundle, and must not try (a bundle is not a block image). So an opaque
//! release has exactly one build, ready at once, whose payload *is* the
//! bundle, kept in the artifact store and served with HTTP Range like every
//! artifact. The hashes DDI clients check are computed once here: `sha1`
//! (SWUpdate checks it), `md5` and `sha256` (RAUC's updater and the
//! `hawkbit` crate).
//!
//! The build's [`Artifacts::codecs`] names the bundle format
//! (`bundle:swu`, …). Only a DDI target advertises those, so the rollout
//! engine never offers a bundle to an `ota-agent` (it would try to parse it
//! as a manifest) and never offers an edge-ota payload to a DDI target; see
//! `docs/ddi.md` for mixed fleets.

use std::io::Read;
use std::path::Path;

use ota_format::Digest;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{
    Artifacts, Build, BuildStatus, ReleaseDb, ReleaseError, ReleaseRecord, Releases, check_order,
};
use crate::store::{encode, key2};

/// The client format of a bundle.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BundleFormat {
    /// SWUpdate's cpio archive (suricatta installs only `*.swu` files).
    Swu,
    /// A RAUC bundle (`rauc-hawkbit-updater`).
    Raucb,
    /// Anything else a DDI client installs itself.
    File,
}

impl BundleFormat {
    /// Parses the `--format` / `format=` value.
    pub fn parse(s: &str) -> Result<BundleFormat, String> {
        match s {
            "swu" => Ok(BundleFormat::Swu),
            "raucb" => Ok(BundleFormat::Raucb),
            "file" => Ok(BundleFormat::File),
            _ => Err(format!(
                "unknown bundle format {s:?}; use swu (SWUpdate), raucb (RAUC) or file"
            )),
        }
    }

    /// The codec name a device must advertise to be offered such a bundle.
    pub fn codec(self) -> &'static str {
        match self {
            BundleFormat::Swu => "bundle:swu",
            BundleFormat::Raucb => "bundle:raucb",
            BundleFormat::File => "bundle:file",
        }
    }

    /// The software-module type DDI reports when none is given
    /// (hawkBit's defaults are `os` and `application`).
    fn default_module_type(self) -> &'static str {
        match self {
            BundleFormat::Swu | BundleFormat::Raucb => "os",
            BundleFormat::File => "application",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            BundleFormat::Swu => "swu",
            BundleFormat::Raucb => "raucb",
            BundleFormat::File => "bin",
        }
    }
}

/// Whether `codec` names a bundle format.
pub fn is_bundle_codec(codec: &str) -> bool {
    codec.starts_with("bundle:")
}

/// Whether a build's artifacts are a bundle (not an edge-ota payload).
pub fn is_bundle_build(a: &Artifacts) -> bool {
    a.codecs.iter().any(|c| is_bundle_codec(c))
}

/// What DDI needs to describe an opaque release's artifact.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Bundle {
    pub format: BundleFormat,
    /// The artifact's file name as DDI clients see it (SWUpdate skips a
    /// file whose name does not end in `.swu`).
    pub filename: String,
    pub size: u64,
    pub sha256: Digest,
    /// Hex.
    pub sha1: String,
    /// Hex.
    pub md5: String,
    /// DDI software-module type (`os`, `application`, …).
    pub module_type: String,
}

/// How an operator describes a bundle upload.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub format: BundleFormat,
    /// Default `<device type>-<version>.<ext>`.
    pub filename: Option<String>,
    pub module_type: Option<String>,
}

/// A file name DDI clients can put in a path: 1–128 bytes of
/// `[A-Za-z0-9._+-]`, not starting with a dot.
fn check_filename(f: &str) -> Result<(), String> {
    let ok = !f.is_empty()
        && f.len() <= 128
        && !f.starts_with('.')
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad artifact file name {f:?}: 1-128 characters of A-Z a-z 0-9 . _ + -, not starting with a dot"
        ))
    }
}

/// SHA-1 and MD5 of a file, hex (a blocking read of the whole file).
pub fn sha1_md5(path: &Path) -> std::io::Result<(String, String)> {
    use md5::Digest as _;
    let mut f = std::fs::File::open(path)?;
    let mut s1 = sha1::Sha1::new();
    let mut m5 = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s1.update(&buf[..n]);
        m5.update(&buf[..n]);
    }
    Ok((hex::encode(s1.finalize()), hex::encode(m5.finalize())))
}

impl Releases {
    /// Registers an opaque release whose bundle was streamed to `tmp`
    /// (`sha256` hashed as it arrived): the bundle moves into the artifact
    /// store and the release's one build is ready at once. The same version
    /// rules as image releases apply ([`check_order`]): DDI clients and
    /// operators read versions the same way.
    ///
    /// # Cancel safety
    /// As [`Releases::add`]: cancelled between the move and the record
    /// write, an unreferenced artifact may stay (harmless; a retry reuses it).
    #[allow(clippy::too_many_arguments)]
    pub async fn add_bundle(
        &self,
        device_type: &str,
        version: &str,
        security_counter: u64,
        allow_downgrade: bool,
        tmp: &Path,
        sha256: &Digest,
        spec: &BundleSpec,
    ) -> Result<ReleaseRecord, ReleaseError> {
        ota_format::api::check_name("device type", device_type).map_err(ReleaseError::Invalid)?;
        ota_format::api::check_name("version", version).map_err(ReleaseError::Invalid)?;
        ota_format::Version::parse(version).map_err(|e| ReleaseError::Invalid(e.to_string()))?;
        let bundle = self
            .ingest_bundle(device_type, version, tmp, sha256, spec)
            .await?;
        let sha = bundle.sha256;
        let size = bundle.size;
        self.refresh().await?;
        let rec = {
            let map = self.map.read().unwrap();
            let k = (device_type.to_string(), version.to_string());
            if let Some(old) = map.get(&k) {
                if old.image_sha256 == sha && old.bundle.as_ref() == Some(&bundle) {
                    return Ok(old.clone());
                }
                return Err(ReleaseError::Exists {
                    device_type: device_type.into(),
                    version: version.into(),
                });
            }
            let earlier: Vec<&ReleaseRecord> = map
                .values()
                .filter(|r| r.device_type == device_type)
                .collect();
            check_order(
                earlier.iter().copied(),
                version,
                security_counter,
                allow_downgrade,
            )?;
            let seq = earlier.iter().map(|r| r.seq).max().map_or(1, |s| s + 1);
            ReleaseRecord {
                device_type: device_type.into(),
                version: version.into(),
                image_sha256: sha,
                image_size: size,
                created_at_ms: crate::now_ms(),
                seq,
                security_counter,
                builds: vec![bundle_build(&bundle)],
                bundle: Some(bundle),
            }
        };
        if let Some(old) = self.db.insert_new(&rec).await? {
            if old.image_sha256 == sha {
                return Ok(old);
            }
            return Err(ReleaseError::Exists {
                device_type: device_type.into(),
                version: version.into(),
            });
        }
        {
            let mut map = self.map.write().unwrap();
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
            map.insert((device_type.to_string(), version.to_string()), rec.clone());
        }
        info!(device_type, version, size, format = ?spec.format, "opaque release added");
        Ok(rec)
    }

    /// Checks a bundle upload's description, hashes it (sha1, md5) and
    /// moves it into the artifact store.
    async fn ingest_bundle(
        &self,
        device_type: &str,
        version: &str,
        tmp: &Path,
        sha256: &Digest,
        spec: &BundleSpec,
    ) -> Result<Bundle, ReleaseError> {
        let filename = spec
            .filename
            .clone()
            .unwrap_or_else(|| format!("{device_type}-{version}.{}", spec.format.extension()));
        check_filename(&filename).map_err(ReleaseError::Invalid)?;
        if spec.format == BundleFormat::Swu && !filename.ends_with(".swu") {
            return Err(ReleaseError::Invalid(format!(
                "artifact name {filename:?} must end in .swu: SWUpdate ignores any other file"
            )));
        }
        let module_type = spec
            .module_type
            .clone()
            .unwrap_or_else(|| spec.format.default_module_type().into());
        ota_format::api::check_name("software module type", &module_type)
            .map_err(ReleaseError::Invalid)?;
        let p = tmp.to_path_buf();
        let (sha1, md5) = tokio::task::spawn_blocking(move || sha1_md5(&p))
            .await
            .map_err(|e| ReleaseError::Invalid(format!("hashing the upload: {e}")))?
            .map_err(|e| ReleaseError::Invalid(format!("reading the upload: {e}")))?;
        let size = std::fs::metadata(tmp)
            .map_err(|e| ReleaseError::Invalid(format!("reading the upload: {e}")))?
            .len();
        if size == 0 {
            return Err(ReleaseError::Invalid("the bundle is empty".into()));
        }
        let (sha, size) = self.artifacts.adopt_file(tmp, sha256).await?;
        Ok(Bundle {
            format: spec.format,
            filename,
            size,
            sha256: sha,
            sha1,
            md5,
            module_type,
        })
    }

    /// Attaches a bundle to an existing image release, so that one release
    /// — and so one rollout, under one cap — serves agents its edge-ota
    /// payloads and DDI targets the bundle (a mixed fleet of one device
    /// type). The same bundle again is a no-op; another one is refused
    /// (releases are immutable).
    ///
    /// # Cancel safety
    /// The record changes in one write (sled: under the catalogue's lock,
    /// then made durable; PostgreSQL: one transaction); cancelled before,
    /// an unreferenced artifact may stay.
    pub async fn attach_bundle(
        &self,
        device_type: &str,
        version: &str,
        tmp: &Path,
        sha256: &Digest,
        spec: &BundleSpec,
    ) -> Result<ReleaseRecord, ReleaseError> {
        self.refresh().await?;
        let k = (device_type.to_string(), version.to_string());
        let not_found = || ReleaseError::NotFound {
            device_type: device_type.into(),
            version: version.into(),
        };
        let existing = self
            .map
            .read()
            .unwrap()
            .get(&k)
            .cloned()
            .ok_or_else(not_found)?;
        if let Some(b) = &existing.bundle {
            if b.sha256 == *sha256 {
                return Ok(existing);
            }
            return Err(ReleaseError::Invalid(format!(
                "release {version} of {device_type} already carries a bundle ({}); releases are immutable, add a new version",
                b.filename
            )));
        }
        let bundle = self
            .ingest_bundle(device_type, version, tmp, sha256, spec)
            .await?;
        let attach = |r: &mut ReleaseRecord| {
            if r.bundle.is_none() {
                r.builds.push(bundle_build(&bundle));
                r.bundle = Some(bundle.clone());
            }
        };
        let rec = match &self.db {
            ReleaseDb::Sled(store) => {
                let rec = {
                    // Under the lock the builder also takes (`set_build`),
                    // so neither write loses the other's change.
                    let mut map = self.map.write().unwrap();
                    let r = map.get_mut(&k).ok_or_else(not_found)?;
                    attach(r);
                    store
                        .releases
                        .insert(key2(device_type, version), encode(&*r))?;
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                    r.clone()
                };
                store.durable().await?;
                rec
            }
            ReleaseDb::Postgres(pool) => {
                let mut c = crate::pg::conn(pool).await?;
                let tx = c.transaction().await.map_err(crate::pg::err)?;
                let row = tx
                    .query_opt(
                        "SELECT record FROM releases WHERE device_type = $1 AND version = $2 FOR UPDATE",
                        &[&device_type, &version],
                    )
                    .await
                    .map_err(crate::pg::err)?
                    .ok_or_else(not_found)?;
                let mut rec: tokio_postgres::types::Json<ReleaseRecord> = row.get(0);
                attach(&mut rec.0);
                tx.execute(
                    "UPDATE releases SET record = $3 WHERE device_type = $1 AND version = $2",
                    &[&device_type, &version, &rec],
                )
                .await
                .map_err(crate::pg::err)?;
                tx.commit().await.map_err(crate::pg::err)?;
                let mut map = self.map.write().unwrap();
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::Release);
                map.insert(k, rec.0.clone());
                rec.0
            }
        };
        info!(device_type, version, "bundle attached to the release");
        Ok(rec)
    }

    /// The bundle of release `version` of `device_type`, if it is opaque.
    pub fn bundle(&self, device_type: &str, version: &str) -> Option<Bundle> {
        self.map
            .read()
            .unwrap()
            .get(&(device_type.to_string(), version.to_string()))
            .and_then(|r| r.bundle.clone())
    }
}

/// The one build of a bundle: ready at once, the bundle both "manifest"
/// and payload (nothing of edge-ota's format is involved), its codec
/// keeping agents from being offered it.
fn bundle_build(b: &Bundle) -> Build {
    Build {
        from_version: None,
        status: BuildStatus::Ready,
        artifacts: Some(Artifacts {
            from_version: None,
            manifest_sha256: b.sha256,
            manifest_size: 0,
            payload_sha256: b.sha256,
            payload_size: b.size,
            codecs: vec![b.format.codec().into()],
        }),
        error: None,
        seconds: Some(0.0),
        progress: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundle_format_is_a_codec_a_ddi_check_in_carries() {
        let ddi = ota_format::manifest::Codecs::bundles();
        for f in [BundleFormat::Swu, BundleFormat::Raucb, BundleFormat::File] {
            assert!(
                is_bundle_codec(f.codec()) && ddi.contains(f.codec()),
                "{f:?}"
            );
        }
        assert!(!ota_format::manifest::codecs().names().any(is_bundle_codec));
    }

    #[test]
    fn sha1_and_md5_match_known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let (s1, m5) = sha1_md5(&p).unwrap();
        assert_eq!(s1, "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(m5, "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn bundle_file_names_are_checked() {
        assert!(check_filename("fw-2.0.0.swu").is_ok());
        for bad in ["", ".hidden", "a/b.swu", "a b", &"x".repeat(129)] {
            assert!(check_filename(bad).is_err(), "{bad:?}");
        }
        assert!(BundleFormat::parse("zip").is_err());
    }
}
