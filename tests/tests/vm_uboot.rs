//! The real ARM64 device: Debian's U-Boot (`qemu_arm64`) under
//! `qemu-system-aarch64 -M virt` (TCG), a GPT disk with slots A/B, the static
//! `ota-agent` in the guest with the `uboot` back-end, the real `ota-server`
//! on loopback. The VM is built from Debian packages and cached by
//! `tests/vm/build.sh`; each scenario is `tests/vm/scenario.sh` (see there).
//!
//! `vm_systemd_*` boots the same device with systemd as PID 1 (`build.sh
//! systemd`: the real `deploy/ota-agent.service` and a test drop-in) and an
//! agent built with `--features test-hooks` (`scripts/build-vm-agents.sh`).
//!
//! One VM at a time (the machine has two cores): the scenarios take a
//! process-wide lock. Without the tooling they skip with a loud message;
//! with `CI=true` they fail instead, so CI can never pass without them.

use std::path::{Path, PathBuf};

use ota_tests::bin;
use ota_tests::vm::{missing_tools, run_scenario, workspace};

fn arm_agent() -> PathBuf {
    std::env::var_os("ARM_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("target/aarch64-unknown-linux-musl/agent-dist/ota-agent")
        })
}

/// The agent with the test-only hang hook, for the systemd device.
fn arm_agent_hooks() -> PathBuf {
    std::env::var_os("ARM_AGENT_HOOKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("target/aarch64-unknown-linux-musl/agent-dist/ota-agent-test-hooks")
        })
}

/// What is missing to run the VM, if anything (`systemd`: the systemd
/// device, whose agent is the test-hooks build).
fn missing_tooling(systemd: bool) -> Vec<String> {
    let mut missing = missing_tools(&[
        ("qemu-system-aarch64", "qemu-system-arm"),
        ("mkimage", "u-boot-tools"),
        ("mkenvimage", "u-boot-tools"),
        ("fw_printenv", "libubootenv-tool"),
        ("sgdisk", "gdisk"),
        ("mkfs.ext4", "e2fsprogs"),
        ("cpio", "cpio"),
        ("depmod", "kmod"),
        ("socat", "socat"),
        ("bc", "bc"),
    ]);
    if !Path::new("/usr/lib/u-boot/qemu_arm64/u-boot.bin").exists() {
        missing.push("/usr/lib/u-boot/qemu_arm64/u-boot.bin (apt-get install u-boot-qemu)".into());
    }
    let agent = if systemd {
        arm_agent_hooks()
    } else {
        arm_agent()
    };
    if !agent.exists() {
        missing.push(format!(
            "{} (scripts/build-vm-agents.sh builds both ARM64 agents)",
            agent.display()
        ));
    }
    missing
}

/// Runs one scenario; `None` when skipped (tooling missing outside CI).
fn scenario(args: &[&str]) -> Option<String> {
    let missing = missing_tooling(args.first() == Some(&"systemd"));
    run_scenario(
        &workspace().join("tests/vm/scenario.sh"),
        args,
        &[
            ("OTA_SERVER_BIN", bin("ota-server")),
            ("ARM_AGENT", arm_agent()),
            ("ARM_AGENT_HOOKS", arm_agent_hooks()),
        ],
        missing,
    )
}

#[test]
fn vm_good_delta_update_commits_and_slot_b_is_v2() {
    scenario(&["good"]);
}

#[test]
fn vm_failed_health_check_rolls_back_to_a() {
    scenario(&["badhealth"]);
}

#[test]
fn vm_v2_that_does_not_boot_falls_back_by_bootcount() {
    scenario(&["noboot"]);
}

#[test]
fn vm_corrupted_boot_state_copy_still_boots() {
    scenario(&["corrupt-env"]);
}

#[test]
fn vm_power_cuts_during_the_update_end_on_v1_or_verified_v2() {
    // Three cuts in one update, at moments drawn from a fixed seed (replay
    // with `tests/vm/scenario.sh powercut 13 3`), plus a seed per CI run
    // when OTA_VM_SEED is set.
    let seed = std::env::var("OTA_VM_SEED").unwrap_or_else(|_| "13".into());
    scenario(&["powercut", &seed, "3"]);
}

#[test]
fn vm_systemd_type_notify_readiness_and_watchdog_restarts_a_hung_main_loop() {
    // systemd as PID 1: the unit stays activating until the agent could
    // enroll and sent READY=1; a main loop hung by the test hook stops the
    // watchdog pings and systemd restarts the agent (asserted on
    // `systemctl show` and the journal); the restarted agent then takes
    // the update v1 -> v2, rebooting through systemd.
    scenario(&["systemd"]);
}
