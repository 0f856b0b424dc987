//! `ota-agent apply` argument errors are clear and write nothing.

use std::process::Command;

#[test]
fn missing_public_key_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ota-agent"))
        .args([
            "apply",
            "--manifest",
            "m.json",
            "--payload",
            "p.bin",
            "--pubkey",
            "nope.pub",
            "--out",
            "new.img",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.pub"), "{err}");
    assert!(!dir.path().join("new.img").exists());
}
