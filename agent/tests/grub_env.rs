//! The `grub` back-end against the real `grub-editenv` (Debian
//! `grub-common`) on a real grubenv block, and the shipped GRUB fragment
//! (`deploy/grub/ota-ab.cfg`) through `grub-script-check`.
//!
//! Outside CI a machine without grub-common skips these loudly; in CI
//! (`CI=true`) a missing tool fails them.

use std::path::{Path, PathBuf};
use std::process::Command;

use ota_agent::bootctl::{BootControl, BootError};
use ota_agent::config::BootConfig;
use ota_format::api::Slot;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "{tool} is missing (apt-get install grub-common): CI must run this test"
        );
        eprintln!("SKIPPED: {tool} not installed (apt-get install grub-common)");
    }
    found
}

fn editenv(env: &Path, args: &[&str]) -> String {
    let out = Command::new("grub-editenv")
        .arg(env)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grub-editenv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Device {
    _dir: tempfile::TempDir,
    grubenv: PathBuf,
    cmdline: PathBuf,
    ctl: BootControl,
}

fn device() -> Device {
    let dir = tempfile::tempdir().unwrap();
    let grubenv = dir.path().join("grubenv");
    let cmdline = dir.path().join("cmdline");
    editenv(&grubenv, &["create"]);
    let cfg: BootConfig = toml::from_str(&format!(
        r#"backend = "grub"
env_file = "{}"
cmdline_markers = ["root=PARTLABEL=rootfs-a", "root=PARTLABEL=rootfs-b"]
cmdline_file = "{}"
"#,
        grubenv.display(),
        cmdline.display()
    ))
    .unwrap();
    let ctl =
        BootControl::from_config(&cfg, [Path::new("/dev/vda2"), Path::new("/dev/vda3")]).unwrap();
    Device {
        _dir: dir,
        grubenv,
        cmdline,
        ctl,
    }
}

fn boot(d: &Device, slot: &str) {
    std::fs::write(
        &d.cmdline,
        format!("BOOT_IMAGE=/boot/vmlinuz root=PARTLABEL=rootfs-{slot} ro panic=5\n"),
    )
    .unwrap();
}

#[test]
fn the_grub_back_end_round_trips_the_real_grub_editenv() {
    if !have("grub-editenv") {
        return;
    }
    let d = device();
    boot(&d, "a");
    let s = d.ctl.state().unwrap();
    assert_eq!(
        (s.booted, s.next, s.upgrade_available),
        (Slot::A, Slot::A, false)
    );

    d.ctl.switch_to(Slot::B).unwrap();
    let list = editenv(&d.grubenv, &["list"]);
    for want in ["boot_part=b", "upgrade_available=1", "bootcount=0"] {
        assert!(list.lines().any(|l| l == want), "{want} not in {list:?}");
    }
    // Still a GRUB environment block GRUB itself can load: 1 KiB, header.
    let raw = std::fs::read(&d.grubenv).unwrap();
    assert_eq!(raw.len(), 1024);
    assert!(raw.starts_with(b"# GRUB Environment Block\n"));
    // Restarted, not rebooted: the running slot is still A.
    let s = d.ctl.state().unwrap();
    assert_eq!(
        (s.booted, s.next, s.upgrade_available),
        (Slot::A, Slot::B, true)
    );

    // What ota-ab.cfg does on the first trial boot of B.
    editenv(&d.grubenv, &["set", "bootcount=1"]);
    boot(&d, "b");
    let s = d.ctl.state().unwrap();
    assert_eq!(
        (s.booted, s.next, s.upgrade_available, s.bootcount),
        (Slot::B, Slot::B, true, 1)
    );
    d.ctl.commit(Slot::B).unwrap();
    let list = editenv(&d.grubenv, &["list"]);
    for want in ["boot_part=b", "upgrade_available=0", "bootcount=0"] {
        assert!(list.lines().any(|l| l == want), "{want} not in {list:?}");
    }
    d.ctl.rollback_to(Slot::A).unwrap();
    assert!(
        editenv(&d.grubenv, &["list"])
            .lines()
            .any(|l| l == "boot_part=a")
    );
}

#[test]
fn a_command_line_naming_no_slot_is_refused_with_grub() {
    if !have("grub-editenv") {
        return;
    }
    let d = device();
    std::fs::write(&d.cmdline, "BOOT_IMAGE=/boot/vmlinuz root=/dev/sda1 ro\n").unwrap();
    d.ctl.switch_to(Slot::B).unwrap();
    let err = d.ctl.state().unwrap_err();
    assert!(matches!(err, BootError::UnknownBootedSlot(_)), "{err}");
    assert!(err.to_string().contains("names neither slot"), "{err}");
}

#[test]
fn the_shipped_grub_fragment_is_valid_grub_script() {
    if !have("grub-script-check") {
        return;
    }
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grub/ota-ab.cfg");
    let out = Command::new("grub-script-check")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grub-script-check {}: {}{}",
        cfg.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The fragment follows the agent's contract: it names the booted slot on
    // the kernel command line and leaves bootcount on a fallback.
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("root=${ota_root}"));
    assert!(text.contains("save_env boot_part upgrade_available bootcount"));
}
