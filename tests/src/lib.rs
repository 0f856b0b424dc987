//! Helpers for edge-ota's cross-crate integration tests: locating the real
//! binaries, making image pairs, and running the offline command line.
//!
//! # Layout
//!
//! - [`bin`]: path of a workspace binary, built on first use if needed.
//! - [`images`]: deterministic image pairs with the edits real updates make.
//! - [`Update`]: keygen + delta through the real `ota-server` CLI, and a
//!   way to run `ota-agent apply` on the result.
//! - [`fleet_e2e`]: the real server and agent daemons with file-slot
//!   devices, for end-to-end tests.
//! - [`services`]: the test PostgreSQL and Redis (`scripts/services.sh`).
//! - [`cluster`]: N `ota-server` replicas behind a real nginx.
//! - [`pki`]: CAs, server and device certificates, CRLs made by `openssl`.
//! - [`counting_alloc`]: a counting global allocator for the memory-bound
//!   tests (`tests/apply_memory.rs`, `agent/tests/pool_memory.rs`).
//! - [`vm`]: running the VM scenario scripts (`tests/vm/`): tooling check,
//!   skip outside CI / fail under `CI=true`, one VM at a time.

pub mod cluster;
pub mod counting_alloc;
pub mod fleet_e2e;
pub mod loadtest;
pub mod pki;
pub mod services;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of a workspace binary (`ota-server`, `ota-agent`) in the same
/// profile as the running test. `cargo test --workspace` has built them; when
/// a single package's tests run, they are built here once, unless
/// `OTA_BINS_BUILT=1` says the caller built them (`scripts/test.sh` runs the
/// VM suites' test binaries directly, beside a `cargo test` that holds
/// cargo's artifact-directory lock until it ends: a `cargo build` here would
/// wait for it).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("test binary path");
    // Test binaries live in target/<profile>/deps, bench binaries in
    // target/<profile>.
    let mut profile_dir = exe.parent().expect("target/<profile>").to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let path = profile_dir.join(name);
    BUILT.get_or_init(|| {
        if std::env::var("OTA_BINS_BUILT").is_ok_and(|v| v == "1") {
            return;
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "ota-server",
            "-p",
            "ota-agent",
            "-p",
            "ota-tests",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    });
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Deterministic test images.
pub mod images {
    /// `len` bytes of compressible, binary-like content.
    pub fn base(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 16 {
                0 => out.extend(std::iter::repeat_n(0u8, (x >> 8) as usize % 9000)),
                1..=8 => out.extend_from_slice(&x.to_le_bytes()[..(x >> 60) as usize % 8 + 1]),
                _ => out.extend_from_slice(b"edge-ota\x00\x01fn main() { update(); }\n"),
            }
        }
        out.truncate(len);
        out
    }

    /// A "new version" of `old`: an insert, a deletion, moved blocks, a zero
    /// run and scattered byte changes.
    pub fn next_version(old: &[u8]) -> Vec<u8> {
        let mut new = old.to_vec();
        let n = new.len();
        new.splice(n / 3..n / 3, (0..5000u32).map(|i| (i * 7) as u8));
        new.drain(n / 2..n / 2 + 3000);
        let moved = new[4096..4096 * 5].to_vec();
        let to = (new.len() - 4096 * 6) / 4096 * 4096;
        new[to..to + moved.len()].copy_from_slice(&moved);
        let z = new.len() * 2 / 3;
        new[z..z + 20_000].fill(0);
        for i in (100..new.len()).step_by(9973) {
            new[i] ^= 0x5a;
        }
        new
    }
}

/// A signed update built by the real `ota-server` CLI in a temporary
/// directory: keys in `dir/keys`, images `dir/old.img` and `dir/new.img`,
/// the update in `dir/update`.
pub struct Update {
    pub dir: tempfile::TempDir,
}

impl Update {
    /// Builds a delta from `old` to `new` (or a full image when `old` is None).
    pub fn build(old: Option<&[u8]>, new: &[u8], extra_args: &[&str]) -> Update {
        let dir = tempfile::tempdir().unwrap();
        let u = Update { dir };
        run_ok(
            Command::new(bin("ota-server"))
                .args(["keygen", "--out"])
                .arg(u.path("keys")),
        );
        std::fs::write(u.path("new.img"), new).unwrap();
        let mut cmd = Command::new(bin("ota-server"));
        cmd.args([
            "delta",
            "--to-version",
            "2",
            "--no-progress",
            "--chunk-size",
            "65536",
            "--zstd-level",
            "3",
        ])
        .arg("--to")
        .arg(u.path("new.img"))
        .arg("--key")
        .arg(u.path("keys/ota-signing.key"))
        .arg("--out")
        .arg(u.path("update"))
        .args(extra_args);
        if let Some(old) = old {
            std::fs::write(u.path("old.img"), old).unwrap();
            cmd.args(["--from-version", "1", "--from"])
                .arg(u.path("old.img"));
        }
        run_ok(&mut cmd);
        u
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `ota-agent apply` with the update's own key and files; `tweak` may
    /// change any argument before it runs.
    pub fn apply(&self, out: &Path, tweak: impl FnOnce(&mut Vec<std::ffi::OsString>)) -> Output {
        let mut args: Vec<std::ffi::OsString> = vec![
            "apply".into(),
            "--no-progress".into(),
            "--manifest".into(),
            self.path("update/manifest.json").into(),
            "--payload".into(),
            self.path("update/payload.bin").into(),
            "--pubkey".into(),
            self.path("keys/ota-signing.pub").into(),
            "--out".into(),
            out.into(),
        ];
        if self.path("old.img").exists() {
            args.push("--source".into());
            args.push(self.path("old.img").into());
        }
        tweak(&mut args);
        Command::new(bin("ota-agent")).args(&args).output().unwrap()
    }
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawning");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Replaces the value following `flag` in an argument list.
pub fn set_arg(args: &mut [std::ffi::OsString], flag: &str, value: impl Into<std::ffi::OsString>) {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag}"));
    args[i + 1] = value.into();
}
