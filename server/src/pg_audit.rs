//! The PostgreSQL side of [`crate::audit`]: the audit log and admin users
//! (migration V5). Kept out of `pg.rs`, whose trait impl delegates here.

use deadpool_postgres::Pool;
use ota_format::api::Event;
use tokio_postgres::types::Json;

use crate::audit::{AuditPage, AuditRecord, User};
use crate::pg::{conn, err};
use crate::store::StoreError;

/// # Cancel safety
/// One statement: the entry is in the log afterwards or not.
pub async fn append(pool: &Pool, rec: AuditRecord) -> Result<u64, StoreError> {
    let c = conn(pool).await?;
    // The column is the sequence; the record's own `seq` is set on reading.
    let seq: i64 = c
        .query_one(
            "INSERT INTO audit (record) VALUES ($1) RETURNING seq",
            &[&Json(&rec)],
        )
        .await
        .map_err(err)?
        .get(0);
    Ok(seq as u64)
}

pub async fn list(pool: &Pool, before: Option<u64>, limit: usize) -> Result<AuditPage, StoreError> {
    let c = conn(pool).await?;
    let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
    let rows = c
        .query(
            "SELECT seq, record FROM audit WHERE seq < $1 ORDER BY seq DESC LIMIT $2",
            &[&before, &(limit as i64)],
        )
        .await
        .map_err(err)?;
    let entries: Vec<AuditRecord> = rows
        .iter()
        .map(|r| AuditRecord {
            seq: r.get::<_, i64>(0) as u64,
            ..r.get::<_, Json<AuditRecord>>(1).0
        })
        .collect();
    let next_before = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    Ok(AuditPage {
        entries,
        next_before,
    })
}

/// # Cancel safety
/// One statement.
pub async fn user_create(pool: &Pool, u: &User) -> Result<bool, StoreError> {
    let c = conn(pool).await?;
    let n = c
        .execute(
            "INSERT INTO users (name, token_sha256, record) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
            &[&u.name, &u.token_sha256, &Json(u)],
        )
        .await
        .map_err(err)?;
    Ok(n == 1)
}

pub async fn users(pool: &Pool) -> Result<Vec<User>, StoreError> {
    let c = conn(pool).await?;
    let rows = c
        .query("SELECT record FROM users ORDER BY name", &[])
        .await
        .map_err(err)?;
    Ok(rows.iter().map(|r| r.get::<_, Json<User>>(0).0).collect())
}

/// # Cancel safety
/// One statement.
pub async fn user_delete(pool: &Pool, name: &str) -> Result<bool, StoreError> {
    let c = conn(pool).await?;
    let n = c
        .execute("DELETE FROM users WHERE name = $1", &[&name])
        .await
        .map_err(err)?;
    Ok(n == 1)
}

pub async fn user_by_token(pool: &Pool, sha256: &str) -> Result<Option<User>, StoreError> {
    let c = conn(pool).await?;
    Ok(c.query_opt(
        "SELECT record FROM users WHERE token_sha256 = $1",
        &[&sha256],
    )
    .await
    .map_err(err)?
    .map(|r| r.get::<_, Json<User>>(0).0))
}

pub async fn device_events(
    pool: &Pool,
    id: &str,
    before: Option<u64>,
    limit: usize,
    progress: bool,
) -> Result<Vec<Event>, StoreError> {
    let c = conn(pool).await?;
    let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
    let rows = c
        .query(
            "SELECT event FROM events WHERE device = $1 AND seq < $2 \
             AND ($3 OR kind <> 'progress') ORDER BY seq DESC LIMIT $4",
            &[&id, &before, &progress, &(limit as i64)],
        )
        .await
        .map_err(err)?;
    Ok(rows.iter().map(|r| r.get::<_, Json<Event>>(0).0).collect())
}
