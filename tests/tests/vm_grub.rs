//! The real x86-64 device that boots with GRUB: Debian's OVMF (UEFI) under
//! `qemu-system-x86_64 -M q35` (KVM when it can run the firmware, TCG
//! otherwise), GRUB built from Debian's `grub-efi-amd64-bin` with
//! `deploy/grub/ota-ab.cfg` as its A/B logic, grubenv on the FAT ESP, the
//! agent's `grub` back-end in the guest writing it with Debian's
//! `grub-editenv`, the real `ota-server` on loopback. Built and cached by
//! `tests/vm/grub/build.sh`; each scenario is `tests/vm/grub/scenario.sh`.
//!
//! The agent in the guest is this workspace's x86-64 debug build (with
//! Debian's libc6 in the slot). Without the tooling the scenarios skip
//! loudly; with `CI=true` they fail instead.

use std::path::PathBuf;

use ota_tests::bin;
use ota_tests::vm::{missing_tools, run_scenario, workspace};

fn missing() -> Vec<String> {
    let mut missing = missing_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("grub-mkimage", "grub-common"),
        ("grub-editenv", "grub-common"),
        ("mformat", "mtools"),
        ("mcopy", "mtools"),
        ("sgdisk", "gdisk"),
        ("mkfs.ext4", "e2fsprogs"),
        ("cpio", "cpio"),
        ("depmod", "kmod"),
        ("strip", "binutils"),
        ("socat", "socat"),
        ("bc", "bc"),
    ]);
    for (file, package) in [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
        ("/usr/lib/grub/x86_64-efi/linux.mod", "grub-efi-amd64-bin"),
    ] {
        if !std::path::Path::new(file).exists() {
            missing.push(format!("{file} (apt-get install {package})"));
        }
    }
    missing
}

fn scenario(name: &str) -> Option<String> {
    scenario_args(&[name])
}

fn scenario_args(args: &[&str]) -> Option<String> {
    let missing = missing();
    let envs: [(&str, PathBuf); 2] = [
        ("OTA_SERVER_BIN", bin("ota-server")),
        ("X86_AGENT", bin("ota-agent")),
    ];
    run_scenario(
        &workspace().join("tests/vm/grub/scenario.sh"),
        args,
        &envs,
        missing,
    )
}

#[test]
fn vm_grub_good_update_boots_b_commits_and_slot_b_is_v2() {
    scenario("good");
}

#[test]
fn vm_grub_failed_health_check_rolls_back_and_grub_boots_a() {
    scenario("badhealth");
}

#[test]
fn vm_grub_v2_that_does_not_boot_falls_back_by_grub_bootcount() {
    scenario("noboot");
}

#[test]
fn vm_grub_trial_slot_that_does_not_load_reboots_and_falls_back() {
    // ota-ab.cfg's fallback entry: GRUB cannot load B (no file system), so
    // it reboots instead of waiting at "Press any key"; every boot counts.
    scenario("noload");
}

#[test]
fn vm_grub_power_cuts_during_the_update_end_on_v1_or_verified_v2() {
    // tests/vm/lib.sh's trial, as on the U-Boot device: three cuts in one
    // update at moments drawn from a fixed seed (replay with
    // `tests/vm/grub/scenario.sh powercut 13 3`), or OTA_VM_SEED's.
    let seed = std::env::var("OTA_VM_SEED").unwrap_or_else(|_| "13".into());
    scenario_args(&["powercut", &seed, "3"]);
}
