//! Streaming an upload to disk near disk speed (`release add` of a 2 GiB
//! image).
//!
//! What held uploads at ~40 MB/s: each network chunk (a few KiB to a few
//! hundred KiB) went through `tokio::fs::File`, i.e. one blocking-pool
//! round trip per chunk, and the finished file was then copied into
//! `images/` while hashing it, writing every byte twice. Here one blocking
//! thread per upload hashes and writes through a large buffer, fed by a
//! bounded channel, and the finished file is moved into the store by
//! [`ArtifactStore::adopt_file`](crate::artifacts::ArtifactStore::adopt_file).

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use bytes::Bytes;
use ota_format::Digest;
use sha2::{Digest as _, Sha256};

use crate::artifacts::{StoreError, io_err};

/// A file streamed to disk as its bytes arrive (an image upload): a blocking
/// thread hashes (SHA-256) and writes them through a large buffer, fed by a
/// bounded channel, so the request's task never waits on the disk for each
/// network chunk and memory stays at the channel's few chunks.
///
/// [`Ingest::finish`] fsyncs once at the end and returns the digest and
/// length, ready for [`ArtifactStore::adopt_file`].
pub struct Ingest {
    tx: tokio::sync::mpsc::Sender<Option<Bytes>>,
    writer: tokio::task::JoinHandle<Result<(Digest, u64), StoreError>>,
}

/// Chunks in flight between the request and the writer thread.
const INGEST_QUEUE: usize = 32;
/// Write size of the ingest thread.
const INGEST_BUF: usize = 4 << 20;

impl Ingest {
    /// Starts writing into `file` (at `path`, named in errors).
    pub fn start(file: File, path: PathBuf) -> Ingest {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(INGEST_QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = io::BufWriter::with_capacity(INGEST_BUF, file);
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            loop {
                match rx.blocking_recv() {
                    Some(Some(b)) => {
                        hasher.update(&b);
                        out.write_all(&b).map_err(io_err("write", &path))?;
                        len += b.len() as u64;
                    }
                    Some(None) => break,
                    // The request went away: no fsync for an abandoned file.
                    None => {
                        return Err(StoreError::Task(
                            "the upload ended before its last byte".into(),
                        ));
                    }
                }
            }
            let file = out
                .into_inner()
                .map_err(|e| io_err("write", &path)(e.into_error()))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
            Ok((Digest::from(hasher), len))
        });
        Ingest { tx, writer }
    }

    /// Queues `chunk`; waits while the queue is full (back-pressure on the
    /// sender).
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped `write` queued its chunk or did not. Dropping
    /// the `Ingest` abandons the file unsynced.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if self.tx.send(Some(chunk)).await.is_err() {
            // The writer stopped on an error: report it.
            return Err(self.fail().await);
        }
        Ok(())
    }

    async fn fail(&mut self) -> StoreError {
        match (&mut self.writer).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => StoreError::Task("the upload writer ended early".into()),
            Err(e) => StoreError::Task(e.to_string()),
        }
    }

    /// Writes what is buffered, fsyncs, and returns (SHA-256, length).
    ///
    /// # Cancel safety
    /// Once called, the fsync runs to its end even if the future is dropped.
    pub async fn finish(mut self) -> Result<(Digest, u64), StoreError> {
        if self.tx.send(None).await.is_err() {
            return Err(self.fail().await);
        }
        self.writer
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}
