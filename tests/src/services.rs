//! The external services of the scale-out tests: a private PostgreSQL and
//! Redis run by `scripts/services.sh`, found through the variables that
//! `scripts/services.sh env` prints:
//!
//! - `OTA_TEST_PG_URL`: an admin URL (superuser, database `postgres`);
//! - `OTA_TEST_REDIS_URL`: `redis://127.0.0.1:port/`;
//! - `OTA_SERVICES_SCRIPT`: the script itself, to restart a service mid-test.
//!
//! A test that needs them calls [`require_services`] first: without the
//! variables it skips (prints a SKIP line), unless `OTA_REQUIRE_SERVICES=1`
//! (CI), where a missing service is a failure, not a silent pass.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `OTA_TEST_PG_URL`: PostgreSQL admin URL, if the services are set up.
pub fn pg_admin_url() -> Option<String> {
    var("OTA_TEST_PG_URL")
}

/// `OTA_TEST_REDIS_URL`: Redis URL, if the services are set up.
pub fn redis_url() -> Option<String> {
    var("OTA_TEST_REDIS_URL")
}

/// The nginx binary the cluster runs as its load balancer.
pub fn nginx_bin() -> Option<std::path::PathBuf> {
    if let Some(p) = var("OTA_NGINX") {
        return Some(p.into());
    }
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

/// Whether the services (and nginx) are there. If not: panics when
/// `OTA_REQUIRE_SERVICES=1`, else prints a SKIP line and returns false.
pub fn require_services() -> bool {
    let mut missing = Vec::new();
    for v in [
        "OTA_TEST_PG_URL",
        "OTA_TEST_REDIS_URL",
        "OTA_SERVICES_SCRIPT",
    ] {
        if var(v).is_none() {
            missing.push(format!("{v} is not set"));
        }
    }
    if nginx_bin().is_none() {
        missing.push("nginx is not installed (apt-get install nginx-light)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{}: run `scripts/services.sh start && eval \"$(scripts/services.sh env)\"` \
         (needs the apt packages postgresql, redis-server, nginx-light)",
        missing.join(", ")
    );
    if var("OTA_REQUIRE_SERVICES").as_deref() == Some("1") {
        panic!("OTA_REQUIRE_SERVICES=1 but {why}");
    }
    eprintln!("SKIP: {why}");
    false
}

/// `url` with its database name replaced by `db` (query kept).
pub fn with_database(url: &str, db: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let rest = base
        .strip_prefix("postgres://")
        .or_else(|| base.strip_prefix("postgresql://"))
        .with_context(|| format!("{url:?} is not a postgres:// URL"))?;
    let scheme = &base[..base.len() - rest.len()];
    let host = rest.split_once('/').map_or(rest, |(h, _)| h);
    if host.is_empty() {
        bail!("{url:?} has no host");
    }
    let mut out = format!("{scheme}{host}/{db}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// A database name nobody else has: `prefix_pid_time_counter`, lower case,
/// at most 63 bytes (PostgreSQL's limit).
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    if !p.starts_with(|c: char| c.is_ascii_lowercase()) {
        p.insert_str(0, "t_");
    }
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{p}_{}_{}_{}",
        std::process::id(),
        t.as_millis() % 100_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn admin_connect(admin_url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_postgres::connect(admin_url, tokio_postgres::NoTls),
    )
    .await
    .with_context(|| format!("connecting to {admin_url}: timed out after 15 s"))?
    .with_context(|| {
        format!("connecting to {admin_url} (is PostgreSQL running? scripts/services.sh start)")
    })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Creates a new, empty database named after `prefix` through `admin_url`
/// and returns its URL.
pub async fn create_database(admin_url: &str, prefix: &str) -> Result<String> {
    let name = unique_name(prefix);
    let url = with_database(admin_url, &name)?;
    let c = admin_connect(admin_url).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        c.batch_execute(&format!("CREATE DATABASE \"{name}\"")),
    )
    .await
    .context("CREATE DATABASE timed out after 30 s")?
    .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
    Ok(url)
}

/// Drops the database `db_url` names (connections to it are closed).
pub async fn drop_database(admin_url: &str, db_url: &str) -> Result<()> {
    let name = database_name(db_url)?;
    let c = admin_connect(admin_url).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")),
    )
    .await
    .context("DROP DATABASE timed out after 30 s")?
    .with_context(|| format!("DROP DATABASE {name}"))?;
    Ok(())
}

/// How many tables outside PostgreSQL's own schemas `db_url`'s database has.
pub async fn user_tables(db_url: &str) -> Result<i64> {
    let c = admin_connect(db_url).await?;
    let row = tokio::time::timeout(
        Duration::from_secs(15),
        c.query_one(
            "SELECT count(*) FROM pg_catalog.pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        ),
    )
    .await
    .context("counting tables timed out after 15 s")??;
    Ok(row.get(0))
}

/// The database name in a postgres URL.
pub fn database_name(url: &str) -> Result<String> {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    let rest = base
        .strip_prefix("postgres://")
        .or_else(|| base.strip_prefix("postgresql://"))
        .with_context(|| format!("{url:?} is not a postgres:// URL"))?;
    let name = rest
        .split_once('/')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
        .with_context(|| format!("{url:?} names no database"))?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!("unexpected database name {name:?}");
    }
    Ok(name.to_string())
}

/// Runs `fut` to completion on a runtime of its own in another thread, so
/// synchronous callers (plain `#[test]`s, `Drop`) can use the async helpers,
/// even from inside a runtime.
pub fn block_on<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(fut)
    })
    .join()
    .expect("the helper thread panicked")
}

/// A fresh, empty database on the test PostgreSQL (`OTA_TEST_PG_URL`); its
/// URL. Panics when the services are not set up or it cannot be created.
pub fn fresh_database(prefix: &str) -> String {
    let admin = pg_admin_url().expect("OTA_TEST_PG_URL is not set (run scripts/services.sh start)");
    let prefix = prefix.to_string();
    block_on(async move { create_database(&admin, &prefix).await })
        .unwrap_or_else(|e| panic!("creating a test database: {e:#}"))
}

/// Runs `scripts/services.sh <what>` (the path in `OTA_SERVICES_SCRIPT`).
pub fn services_script(what: &str) -> Result<()> {
    let script = var("OTA_SERVICES_SCRIPT").context(
        "OTA_SERVICES_SCRIPT is not set: eval \"$(scripts/services.sh env)\" after scripts/services.sh start",
    )?;
    run_script(Path::new(&script), what)
}

/// Runs `script <what>` (a services.sh), failing with its output.
pub fn run_script(script: &Path, what: &str) -> Result<()> {
    let out = Command::new(script)
        .arg(what)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {} {what}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {what} failed ({}): {}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Restarts Redis, losing its data (`services.sh restart-redis`).
pub fn restart_redis() -> Result<()> {
    services_script("restart-redis")
}

/// Restarts PostgreSQL, fast mode (`services.sh restart-postgres`).
pub fn restart_postgres() -> Result<()> {
    services_script("restart-postgres")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:55432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:55432/x"
        );
        assert_eq!(
            with_database("postgresql://u:p@h:1?sslmode=disable", "y_1").unwrap(),
            "postgresql://u:p@h:1/y_1?sslmode=disable"
        );
        assert!(with_database("mysql://h/x", "y").is_err());
        assert_eq!(
            database_name("postgres://u@h:1/abc_1?x=y").unwrap(),
            "abc_1"
        );
        assert!(database_name("postgres://u@h:1/").is_err());
        let a = unique_name("Scale-Out test");
        let b = unique_name("Scale-Out test");
        assert_ne!(a, b);
        assert!(a.starts_with("scale_out_test_"), "{a}");
        assert!(a.len() <= 63);
        assert!(unique_name("1x").starts_with("t_1x_"));
    }
}
