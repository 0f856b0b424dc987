//! The PostgreSQL engine's SQL for maintenance windows (issue 15): an
//! operator's install-now, and a waiting update cancelled because its
//! rollout was aborted. Kept apart from [`crate::pg`] (large already); the
//! decisions themselves are [`crate::rollout::install_gate`]'s, shared with
//! the sled engine.

use deadpool_postgres::Pool;
use tokio_postgres::types::Json;

use crate::pg::{conn, err};
use crate::rollout::{Member, Phase, RolloutError, RolloutRecord, RolloutState};
use crate::store::StoreError;

/// Phases (as stored) of members that have not installed yet: what
/// install-now applies to ([`crate::rollout::window::before_install`]).
const BEFORE_INSTALL: &[&str] = &["waiting", "downloading", "downloaded", "waiting-for-window"];

/// Marks members of `rec` to install once verified, window or not: every
/// member not yet installed when `devices` is empty, else exactly those
/// (each must be such a member, or nothing changes and the error names
/// it). One transaction; returns the devices marked.
///
/// # Cancel safety
/// One transaction: dropped before commit, nothing changed.
pub async fn install_now(
    pool: &Pool,
    rec: &RolloutRecord,
    devices: &[String],
) -> Result<Vec<String>, RolloutError> {
    let id = rec.id.as_str();
    if rec.state == RolloutState::Aborted {
        return Err(RolloutError::Conflict(format!(
            "rollout {id} is aborted; nothing of it will be installed"
        )));
    }
    let phases: Vec<String> = BEFORE_INSTALL.iter().map(|s| s.to_string()).collect();
    let mut c = conn(pool).await?;
    let tx = c.transaction().await.map_err(err)?;
    if !devices.is_empty() {
        let rows = tx
            .query(
                "SELECT device, phase FROM members WHERE rollout = $1 AND device = ANY($2)",
                &[&id, &devices],
            )
            .await
            .map_err(err)?;
        for d in devices {
            match rows.iter().find(|r| r.get::<_, String>(0) == *d) {
                Some(r) if phases.contains(&r.get::<_, String>(1)) => {}
                Some(r) => {
                    return Err(RolloutError::Conflict(format!(
                        "device {d} is {} in rollout {id}: it has nothing left to install",
                        r.get::<_, String>(1)
                    )));
                }
                None => {
                    return Err(RolloutError::Invalid(format!(
                        "device {d} has not been admitted to rollout {id} yet; \
                         install-now applies to admitted devices (see `rollout status {id}`)"
                    )));
                }
            }
        }
    }
    let all = devices.is_empty();
    let rows = tx
        .query(
            "UPDATE members SET member = jsonb_set(member, '{install_now}', 'true') \
             WHERE rollout = $1 AND phase = ANY($2) AND ($3 OR device = ANY($4)) \
             RETURNING device",
            &[&id, &phases, &all, &devices],
        )
        .await
        .map_err(err)?;
    tx.commit().await.map_err(err)?;
    let marked: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    tracing::info!(rollout = %id, devices = marked.len(), "install now, by the operator");
    Ok(marked)
}

/// A device waiting to install an update of an aborted rollout: its member
/// becomes `cancelled` (the device is told to discard the update).
///
/// # Cancel safety
/// One statement.
pub async fn cancel_waiting(pool: &Pool, rollout: &str, m: &Member) -> Result<(), StoreError> {
    let mut nm = m.clone();
    nm.phase = Phase::Cancelled;
    nm.reason = Some("rollout aborted while the update waited to install".into());
    let c = conn(pool).await?;
    c.execute(
        "UPDATE members SET phase = 'cancelled', member = $3 \
         WHERE rollout = $1 AND device = $2 \
         AND phase IN ('downloading', 'downloaded', 'waiting-for-window')",
        &[&rollout, &m.device, &Json(&nm)],
    )
    .await
    .map_err(err)?;
    Ok(())
}
