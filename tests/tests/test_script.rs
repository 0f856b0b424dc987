//! `scripts/test.sh` runs every test binary and reports every failure
//! (issue 19, defect 6): it used to stop at the first failing binary, so the
//! suites after it silently did not run. This builds a throw-away workspace
//! whose two test suites both fail and checks that `scripts/cargo-test-all.sh`
//! (the part of `scripts/test.sh` that runs cargo) runs both and names both.

use std::path::Path;
use std::process::Command;

#[test]
fn test_script_runs_every_suite_after_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::create_dir_all(ws.join("tests")).unwrap();
    std::fs::write(
        ws.join("Cargo.toml"),
        "[package]\nname = \"two-failing-suites\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(ws.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        ws.join("tests/a.rs"),
        "#[test]\nfn first_suite_fails() { panic!(\"first\"); }\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("tests/b.rs"),
        "#[test]\nfn second_suite_fails() { panic!(\"second\"); }\n#[test]\nfn second_suite_passes() {}\n",
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cargo-test-all.sh");
    let out = Command::new(&script)
        .arg("--manifest-path")
        .arg(ws.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .env("CARGO_TERM_COLOR", "never")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "failures must fail the run:\n{text}");
    let summary = text
        .split("==== test summary")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary at the end:\n{text}"));
    for name in ["first_suite_fails", "second_suite_fails"] {
        assert!(
            summary.contains(&format!("failed test: {name}")),
            "the summary must name {name}:\n{text}"
        );
    }
    assert!(
        text.contains("test second_suite_passes ... ok"),
        "the second suite must run after the first failed:\n{text}"
    );
}
