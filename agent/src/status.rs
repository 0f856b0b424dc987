//! `ota-agent status`: what the device runs and what the agent is doing.
//!
//! Reads only the atomically replaced decision files and the boot
//! environment — never the sled database, which the running daemon holds
//! locked — so it works while the daemon runs, and after it crashed.

use std::fmt::Write as _;

use crate::bootctl::BootControl;
use crate::config::Config;
use crate::state::{SlotsRecord, StatusRecord, UpdateRecord, read_json};

/// Renders the status report.
pub fn report(cfg: &Config) -> Result<String, String> {
    let dir = &cfg.data_dir;
    let slots: SlotsRecord = read_json(&dir.join("slots.json"))
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let update: Option<UpdateRecord> =
        read_json(&dir.join("update.json")).map_err(|e| e.to_string())?;
    let status: Option<StatusRecord> =
        read_json(&dir.join("status.json")).map_err(|e| e.to_string())?;
    let boot = BootControl::from_config(&cfg.boot, [&cfg.slots.a, &cfg.slots.b])
        .and_then(|b| b.state())
        .map_err(|e| e.to_string())?;
    let version = slots
        .get(boot.booted)
        .map(|s| s.version.clone())
        .unwrap_or_else(|| cfg.factory_version.clone());
    let mut out = String::new();
    let _ = writeln!(out, "agent:        ota-agent {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "device:       {} ({})", cfg.device_id, cfg.device_type);
    let _ = writeln!(out, "version:      {version}");
    let _ = writeln!(
        out,
        "booted slot:  {} ({}), next boot {}{}",
        boot.booted.name(),
        cfg.slot_path(boot.booted).display(),
        boot.next.name(),
        if boot.upgrade_available {
            format!(" on trial, boot count {}", boot.bootcount)
        } else {
            String::new()
        }
    );
    match &update {
        Some(u) => {
            let _ = writeln!(
                out,
                "pending:      {} -> version {} into slot {} ({})",
                u.offer.update_id,
                u.to_version,
                u.target.name(),
                u.phase
            );
            if u.phase == crate::state::Phase::WaitingForWindow {
                let _ = writeln!(
                    out,
                    "              verified; installs when its rollout's maintenance window opens, or now with `ota-agent install-now`"
                );
            }
        }
        None => {
            let _ = writeln!(out, "pending:      none");
        }
    }
    if let Some(s) = &status {
        let p = &s.progress;
        let pct = (p.bytes_verified * 100)
            .checked_div(p.bytes_total)
            .unwrap_or(0);
        let _ = writeln!(out, "phase:        {} (as of {})", s.phase, s.updated_at);
        if update.is_some() {
            let _ = writeln!(
                out,
                "progress:     {pct}% ({} of {} bytes, {} of {} operations)",
                p.bytes_verified, p.bytes_total, p.ops_done, p.ops_total
            );
        }
        if let Some(e) = &s.last_error {
            let _ = writeln!(out, "last error:   {e}");
        }
    } else {
        let _ = writeln!(out, "phase:        (daemon has not run)");
    }
    Ok(out)
}
