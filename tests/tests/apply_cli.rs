//! The offline update path through the real binaries: `ota-server keygen`,
//! `ota-server delta`, `ota-agent apply`.

use ota_tests::{Update, images};

#[test]
fn delta_applies_to_exactly_the_new_image_and_leaves_the_source_alone() {
    let old = images::base(3 << 20, 11);
    let new = images::next_version(&old);
    let u = Update::build(Some(&old), &new, &[]);
    let out = u.path("applied.img");
    let r = u.apply(&out, |_| {});
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), new);
    assert_eq!(
        std::fs::read(u.path("old.img")).unwrap(),
        old,
        "source modified"
    );
    let summary = String::from_utf8_lossy(&r.stdout);
    assert!(summary.contains("verified"), "{summary}");
}

#[test]
fn full_image_applies_without_a_source() {
    let new = images::base(1 << 20, 5);
    let u = Update::build(None, &new, &[]);
    let out = u.path("applied.img");
    let r = u.apply(&out, |_| {});
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), new);
}

#[test]
fn delta_summary_names_operations_and_ratio() {
    let old = images::base(1 << 20, 2);
    let new = images::next_version(&old);
    let dir = tempfile::tempdir().unwrap();
    let key_dir = dir.path().join("k");
    ota_tests::run_ok(
        std::process::Command::new(ota_tests::bin("ota-server"))
            .args(["keygen", "--out"])
            .arg(&key_dir),
    );
    std::fs::write(dir.path().join("a"), &old).unwrap();
    std::fs::write(dir.path().join("b"), &new).unwrap();
    let out = ota_tests::run_ok(
        std::process::Command::new(ota_tests::bin("ota-server"))
            .current_dir(dir.path())
            .args([
                "delta",
                "--from",
                "a",
                "--from-version",
                "1",
                "--to",
                "b",
                "--to-version",
                "2",
            ])
            .args([
                "--key",
                "k/ota-signing.key",
                "--out",
                "u",
                "--device-type",
                "rpi4",
                "--no-progress",
            ]),
    );
    let s = String::from_utf8_lossy(&out.stdout);
    for want in ["BSDIFF", "payload", "ratio", "rpi4"] {
        assert!(s.contains(want), "summary lacks {want}: {s}");
    }
    assert!(
        dir.path().join("u/manifest.json").exists() && dir.path().join("u/payload.bin").exists()
    );
}
