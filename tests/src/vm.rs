//! Running the VM scenario scripts (`tests/vm/`) from tests: the tooling
//! check that skips loudly outside CI and fails under `CI=true`, one VM at a
//! time, and the scenario's `RESULT` line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// One VM at a time in a test binary (the machine has two cores).
static ONE_VM: Mutex<()> = Mutex::new(());

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Which of `(tool, Debian package)` are not on `PATH`, as
/// "tool (apt-get install package)".
pub fn missing_tools(tools: &[(&str, &str)]) -> Vec<String> {
    tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(tool, package)| format!("{tool} (apt-get install {package})"))
        .collect()
}

/// Runs `script args` (a scenario printing one `RESULT` line) with `envs`,
/// after checking `missing` is empty: outside CI a missing tool skips with a
/// loud message (`None`); with `CI=true` it fails, so CI never passes
/// without the VM. Panics with the script's output when it fails.
pub fn run_scenario(
    script: &Path,
    args: &[&str],
    envs: &[(&str, PathBuf)],
    missing: Vec<String>,
) -> Option<String> {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    if !missing.is_empty() {
        let msg = format!(
            "VM scenario {} {args:?} needs: {}",
            script.display(),
            missing.join(", ")
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg} — CI=true: the VM tests must run in CI");
        }
        eprintln!("\n!!!! SKIPPED (not in CI): {msg}\n");
        return None;
    }
    let t0 = Instant::now();
    let mut cmd = Command::new(script);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "VM scenario {args:?} failed ({}):\n{stdout}",
        out.status
    );
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("no RESULT line from {args:?}: {stdout}"))
        .to_string();
    eprintln!("{result} ({:.0} s)", t0.elapsed().as_secs_f64());
    Some(result)
}
