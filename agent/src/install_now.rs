//! `ota-agent install-now`: the device's own trigger (a kiosk's "update
//! now" button, a technician on site) for an update whose rollout has
//! maintenance windows. The update downloads and verifies at once but
//! waits for its window ([`crate::state::Phase::WaitingForWindow`]); this
//! lets it switch now.
//!
//! The trigger is a file, `<data_dir>/install-now`, holding the update id
//! it applies to, replaced atomically: the command needs no socket to the
//! daemon and works while the daemon restarts. The daemon takes (reads and
//! deletes) it when the update is verified, and while waiting checks it
//! every second. A flag for another update than the one in hand is
//! discarded, so a stale press never installs a later update.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::state::{Phase, UpdateRecord, read_json};

const FLAG: &str = "install-now";

fn flag_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FLAG)
}

/// Asks the daemon to install the update in hand as soon as it is
/// verified (now, if it is waiting). Refused when there is no update in
/// hand or it is already past the switch. Returns what will happen.
pub fn request(cfg: &Config) -> Result<String, String> {
    let dir = &cfg.data_dir;
    let update: Option<UpdateRecord> =
        read_json(&dir.join("update.json")).map_err(|e| e.to_string())?;
    let Some(u) = update else {
        return Err(
            "no update in hand: nothing to install (`ota-agent status` shows what the agent does)"
                .into(),
        );
    };
    let when = match u.phase {
        Phase::WaitingForWindow => "now",
        Phase::Downloading | Phase::Installing => "as soon as it is verified",
        Phase::Rebooting | Phase::RollingBack => {
            return Err(format!(
                "update {} is already {:?}: nothing left to trigger",
                u.offer.update_id, u.phase
            ));
        }
    };
    crate::bootctl::write_atomic(&flag_path(dir), u.offer.update_id.as_bytes())
        .map_err(|e| format!("writing {}: {e}", flag_path(dir).display()))?;
    Ok(format!(
        "update {} (version {}) will be installed {when}; the device reboots then",
        u.offer.update_id, u.to_version
    ))
}

/// Takes the trigger for `update_id`: true (and the flag is gone) when one
/// was set for it. A flag for another update is removed and ignored.
pub fn take(data_dir: &Path, update_id: &str) -> bool {
    let path = flag_path(data_dir);
    let Ok(held) = std::fs::read_to_string(&path) else {
        return false;
    };
    let _ = std::fs::remove_file(&path);
    if held.trim() == update_id {
        tracing::info!(update = update_id, "install-now requested on the device");
        true
    } else {
        tracing::warn!(
            flagged = held.trim(),
            update = update_id,
            "ignoring an install-now request for another update"
        );
        false
    }
}

/// Whether a trigger is pending (cheap: one stat).
pub fn pending(data_dir: &Path) -> bool {
    flag_path(data_dir).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_for_another_update_is_discarded() {
        let d = tempfile::tempdir().unwrap();
        assert!(!take(d.path(), "r1.1"));
        std::fs::write(flag_path(d.path()), "r1.1").unwrap();
        assert!(pending(d.path()));
        assert!(!take(d.path(), "r1.2"));
        assert!(!pending(d.path()), "a stale flag is removed");
        std::fs::write(flag_path(d.path()), "r1.2\n").unwrap();
        assert!(take(d.path(), "r1.2"));
        assert!(!take(d.path(), "r1.2"), "taken once");
    }
}
