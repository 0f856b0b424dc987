//! A TCP proxy between faulty devices and the server that cuts connections
//! mid-stream and flips bytes on the way to the device.
//!
//! Every connection through it is at risk: with probability `cut` it is
//! closed after a random number of bytes towards the device, and with
//! probability `corrupt` one byte of that stream is flipped. The agent must
//! detect both (short bodies, hash mismatches, unparsable answers) and
//! never write a corrupted operation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Counters of what the proxy did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ProxyStats {
    pub connections: u64,
    pub cut: u64,
    pub corrupted: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    cut: AtomicU64,
    corrupted: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    counters: Arc<Counters>,
}

/// Chance that a connection is cut / has a byte flipped.
pub const CUT_PROB: f64 = 0.3;
pub const CORRUPT_PROB: f64 = 0.3;

impl FaultProxy {
    /// Listens on 127.0.0.1 and forwards to `upstream` until `cancel`.
    pub async fn start(
        upstream: SocketAddr,
        seed: u64,
        cancel: CancellationToken,
    ) -> Result<FaultProxy> {
        // The server's accept queue, not the standard library's 128: a
        // burst of simulated devices must reach the faults, not SYN drops.
        let l = ota_server::listener::bind(([127, 0, 0, 1], 0).into())?;
        let addr = l.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c2 = counters.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e37);
            loop {
                let (down, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                c2.connections.fetch_add(1, Ordering::Relaxed);
                let cut_at = rng
                    .random_bool(CUT_PROB)
                    .then(|| rng.random_range(1..256 << 10));
                let flip_at = rng
                    .random_bool(CORRUPT_PROB)
                    .then(|| rng.random_range(512..256 << 10));
                let c3 = c2.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = relay(down, upstream, cut_at, flip_at, c3) => {}
                    }
                });
            }
        });
        Ok(FaultProxy { addr, counters })
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.counters.connections.load(Ordering::Relaxed),
            cut: self.counters.cut.load(Ordering::Relaxed),
            corrupted: self.counters.corrupted.load(Ordering::Relaxed),
        }
    }
}

async fn relay(
    down: TcpStream,
    upstream: SocketAddr,
    cut_at: Option<u64>,
    flip_at: Option<u64>,
    c: Arc<Counters>,
) -> std::io::Result<()> {
    let up = TcpStream::connect(upstream).await?;
    let (mut dr, mut dw) = down.into_split();
    let (mut ur, mut uw) = up.into_split();
    let to_server = async {
        let _ = tokio::io::copy(&mut dr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let to_device = async {
        let mut buf = vec![0u8; 16 << 10];
        let mut sent = 0u64;
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            if let Some(f) = flip_at
                && f >= sent
                && f < sent + n as u64
            {
                chunk[(f - sent) as usize] ^= 0x5a;
                c.corrupted.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(cut) = cut_at
                && sent + n as u64 >= cut
            {
                let keep = (cut - sent) as usize;
                let _ = dw.write_all(&chunk[..keep]).await;
                c.cut.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if dw.write_all(chunk).await.is_err() {
                break;
            }
            sent += n as u64;
        }
        let _ = dw.shutdown().await;
    };
    tokio::select! {
        _ = to_device => {}
        _ = async { to_server.await; std::future::pending::<()>().await } => {}
    }
    Ok(())
}
