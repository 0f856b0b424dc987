//! `ota-server keygen`: the signing key is private, the public key readable,
//! and an existing key is never silently replaced.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn keygen(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["keygen", "--out"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn keygen_writes_a_private_key_and_a_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = keygen(&dir.path().join("keys"), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = dir.path().join("keys/ota-signing.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "signing key mode {mode:o}");
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let public = std::fs::read_to_string(dir.path().join("keys/ota-signing.pub")).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    let pair = ota_format::SigningKeyPair::from_pem(&pem).unwrap();
    assert_eq!(
        ota_format::envelope::public_key_from_pem(&public).unwrap(),
        pair.verifying_key()
    );
}

#[test]
fn keygen_refuses_to_replace_a_key_without_force() {
    let dir = tempfile::tempdir().unwrap();
    assert!(keygen(dir.path(), &[]).status.success());
    let before = std::fs::read(dir.path().join("ota-signing.key")).unwrap();
    let again = keygen(dir.path(), &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(dir.path().join("ota-signing.key")).unwrap(),
        before
    );
    assert!(keygen(dir.path(), &["--force"]).status.success());
    assert_ne!(
        std::fs::read(dir.path().join("ota-signing.key")).unwrap(),
        before
    );
}
