//! `ota-agent`: the device side of edge-ota, as a library (the daemon, and
//! the pieces a fleet load test reuses) and a binary (`src/main.rs`).
//!
//! The agent's promise: whatever happens — network loss, kill -9, power cut,
//! a full disk, a lying server — the device ends on its old version or on
//! the verified new one, never in between, and it says why.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, every option with its default,
//!   validated once at load.
//! - [`client`]: the device API client (enroll, check-in, events, manifest),
//!   reqwest with rustls, no content decoding, timeouts.
//! - [`identity`]: the device's TLS client certificate (mTLS): its key made
//!   on the device, the CSR sent at enrollment, the issued certificate.
//! - [`verify`]: manifest checks before any download — signatures against
//!   the threshold, device type, expiry, no downgrade of version or security
//!   counter, the booted slot is the delta's base.
//! - [`freshness`]: the server's signed freshness statements checked
//!   against a persisted time floor (freeze and replay attacks, devices
//!   without a real-time clock).
//! - [`pool`]: the bounded concurrent chunk pool — coalesced/split Range
//!   requests, at most N in flight, stall detection, retries with backoff and
//!   jitter, every operation verified before it is written into any
//!   [`ota_delta::io::WriteAt`] destination, within a memory budget.
//! - [`lease`]: the device's copy of its download lease — it stops
//!   downloading before the server's deadline, so a lease that could not be
//!   renewed is never re-granted while it still downloads (the daemon and
//!   the load test's simulated devices share it).
//! - [`state`]: what survives a crash — atomic decision files, and sled for
//!   progress hints (re-verified on restart), the events outbox and the
//!   event counter.
//! - [`bootctl`]: A/B boot control with U-Boot bootcount semantics; back-ends
//!   `file` (tests, demos), `uboot`, `grub`.
//! - [`daemon`]: `ota-agent run` — check-in loop, download, install, reboot,
//!   health check, commit or rollback, one cancellation tree, systemd notify.
//! - [`reload`]: `SIGHUP` re-reads `agent.toml` (trusted keys, bandwidth
//!   cap, log level), validated first and swapped atomically.
//! - [`status`]: `ota-agent status`.
//! - [`install_now`]: `ota-agent install-now`, the device's own trigger
//!   for an update that waits for its maintenance window (a flag file the
//!   daemon takes).

pub mod bootctl;
pub mod client;
pub mod config;
pub mod daemon;
pub mod freshness;
pub mod identity;
pub mod install_now;
pub mod lease;
pub mod pool;
pub mod reload;
pub mod state;
pub mod status;
pub mod verify;
