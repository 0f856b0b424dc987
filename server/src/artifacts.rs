//! TEMPORARY stub, replaced by the artifacts branch.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use ota_format::Digest;

#[derive(Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<ArtifactStore> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactStore { dir })
    }
    pub fn path_of(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.to_string())
    }
    pub async fn put_file(&self, src: &Path) -> std::io::Result<(Digest, u64)> {
        let bytes = std::fs::read(src)?;
        let d = Digest::of(&bytes);
        std::fs::rename(src, self.path_of(&d))?;
        Ok((d, bytes.len() as u64))
    }
}

pub struct EgressLimiter;
impl EgressLimiter {
    pub fn new(_bps: u64) -> EgressLimiter {
        EgressLimiter
    }
}

#[allow(clippy::result_large_err)]
pub fn parse_digest(s: &str) -> Result<Digest, Response> {
    s.parse::<Digest>()
        .map_err(|_| (StatusCode::BAD_REQUEST, "bad digest").into_response())
}

pub async fn serve(
    store: &ArtifactStore,
    _l: Option<Arc<EgressLimiter>>,
    _n: Arc<AtomicU64>,
    _m: &Method,
    _h: &HeaderMap,
    d: &Digest,
) -> Response {
    match std::fs::read(store.path_of(d)) {
        Ok(b) => b.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
