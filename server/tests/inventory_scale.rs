//! `GET /api/v1/admin/devices` at 100,000 devices on both backends: pages
//! stay fast (server-side filtering and keyset paging) and the totals are
//! right. The fleet is written straight into the backend's storage (sled
//! trees; a PostgreSQL `generate_series`), as enrolling 100,000 devices over
//! HTTP would take the test's whole budget; the server then loads it as it
//! would after a restart. The PostgreSQL test needs `scripts/services.sh`
//! (it fails, never skips, without it, like `rollout_pg`).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use ota_server::fleet::DeviceRecord;
use ota_server::inventory::DeviceQuery;

const N: u64 = 100_000;

fn id(i: u64) -> String {
    format!("dev-{i:06}")
}

/// Slowest of 3 runs of each query; every page must come back within
/// `budget` (generous: a debug build on a shared 2-core machine, where a
/// client-side filter or an offset scan per page would take far longer). `never` is how many
/// devices have never checked in.
async fn measure(ts: &TestServer, label: &str, never: u64, budget: Duration) {
    let cases: Vec<(&str, DeviceQuery, u64)> = vec![
        ("first page", DeviceQuery::default(), N),
        (
            "deep page",
            DeviceQuery {
                after: Some(id(90_000)),
                ..Default::default()
            },
            N,
        ),
        (
            "type + tag",
            DeviceQuery {
                device_type: Some("a".into()),
                tags: Some("site=s10".into()),
                ..Default::default()
            },
            N / 100,
        ),
        (
            "never seen, 1000 rows",
            DeviceQuery {
                state: Some("never".into()),
                limit: Some(1000),
                ..Default::default()
            },
            never,
        ),
    ];
    for (name, q, total) in cases {
        let mut worst = Duration::ZERO;
        for _ in 0..3 {
            let t = Instant::now();
            let p = ts.admin.device_list(&q).await.unwrap();
            worst = worst.max(t.elapsed());
            assert_eq!(p.total, total, "{label} {name}: total");
            assert!(!p.devices.is_empty(), "{label} {name}: empty page");
            assert!(
                p.devices.windows(2).all(|w| w[0].id < w[1].id),
                "{label} {name}: not sorted by id"
            );
        }
        eprintln!("{label}: {name}: {worst:?} (worst of 3) at {N} devices");
        assert!(
            worst < budget,
            "{label} {name}: {worst:?} at {N} devices (budget {budget:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_stays_fast_at_100k_devices_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ota_server::store::Store::open(&dir.path().join("data/db")).unwrap();
        let mut batch = sled::Batch::default();
        for i in 0..N {
            let rec = DeviceRecord {
                id: id(i),
                device_type: if i % 2 == 0 { "a" } else { "b" }.into(),
                tags: BTreeMap::from([("site".into(), format!("s{}", i % 100))]),
                token_sha256: hex::encode(sha2_of(i)),
                enrolled_at_ms: 1,
                version: Some("1.0".into()),
            };
            batch.insert(rec.id.as_bytes(), ota_server::store::encode(&rec));
        }
        store.devices.apply_batch(batch).unwrap();
        store.db.flush().unwrap();
    }
    let ts = TestServer::start_in(dir, &fast_checkin(5000)).await;
    // sled keeps check-in state in memory: no device has been seen since
    // the (re)start, so "never" matches all of them.
    measure(&ts, "sled", N, Duration::from_secs(2)).await;
}

fn sha2_of(i: u64) -> [u8; 32] {
    ota_server::fleet::hash_token(&format!("token-{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_stays_fast_at_100k_devices_on_postgres() {
    let sections = postgres_sections().await;
    let url = sections
        .lines()
        .find_map(|l| l.strip_prefix("url = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a url in the [storage] section")
        .to_string();
    let ts = TestServer::start_in(
        tempfile::tempdir().unwrap(),
        &format!("{}\n{sections}", fast_checkin(5000)),
    )
    .await;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Two devices in three have checked in a minute ago; every third never.
    client
        .execute(
            "INSERT INTO devices (id, device_type, tags, token_sha256, enrolled_at_ms, version, \
             booted_slot, state, last_seen_ms) \
             SELECT 'dev-' || lpad(i::text, 6, '0'), CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, \
             jsonb_build_object('site', 's' || (i % 100)), sha256(i::text::bytea), 1, '1.0', 'a', \
             CASE WHEN i % 3 = 0 THEN NULL ELSE 'idle' END, \
             CASE WHEN i % 3 = 0 THEN 0 ELSE $1::bigint END \
             FROM generate_series(0, $2::int) AS i",
            &[&(ota_server::now_ms() as i64 - 60_000), &(N as i32 - 1)],
        )
        .await
        .unwrap();
    client.execute("ANALYZE devices", &[]).await.unwrap();
    measure(&ts, "postgres", N.div_ceil(3), Duration::from_secs(2)).await;
}
