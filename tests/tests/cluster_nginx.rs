//! The balancer path without PostgreSQL: one sled replica behind the real
//! nginx the scale-out tests use. Requests reach the replica through nginx,
//! a release upload streams through it, and a replica killed with -9 and
//! started again is served again on the same address.

use ota_tests::cluster::{Cluster, ClusterOpts, http_get};

fn nginx_present() -> bool {
    if ota_tests::services::nginx_bin().is_some() {
        return true;
    }
    if std::env::var("OTA_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("OTA_REQUIRE_SERVICES=1 but nginx is not installed: apt-get install nginx-light");
    }
    eprintln!("SKIP: nginx is not installed (apt-get install nginx-light)");
    false
}

#[test]
fn one_sled_replica_behind_nginx() {
    if !nginx_present() {
        return;
    }
    let c = Cluster::start(1, ClusterOpts::default()).expect("cluster");
    let lb = c.lb_addr();
    assert_ne!(lb, c.replica_addr(0), "nginx is in front");
    let (st, body) = http_get(lb, "/healthz").unwrap();
    assert_eq!((st, body.trim()), (200, "ok"), "{}", c.nginx_error_log());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin =
        ota_server::client::AdminClient::new(&c.lb_url(), &ClusterOpts::default().admin_token)
            .unwrap();
    rt.block_on(async {
        // An upload through nginx (streamed, unbuffered), then the list.
        let img = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(img.path(), ota_tests::images::base(256 << 10, 7)).unwrap();
        admin
            .release_add("t", "1.0", 0, img.path(), false)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", c.nginx_error_log()));
        let r = admin
            .releases()
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", c.nginx_error_log()));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].version, "1.0");
    });

    // kill -9: nginx answers 502 while nothing is behind it, then the
    // replica comes back on the same address and serves again.
    let before = c.pids()[0].expect("running");
    c.kill9(0).unwrap();
    assert_eq!(c.pids(), vec![None]);
    let (st, _) = http_get(lb, "/healthz").unwrap();
    assert_eq!(st, 502);
    c.start_again(0).unwrap();
    let after = c.pids()[0].expect("running again");
    assert_ne!(before, after);
    let (st, _) = http_get(lb, "/healthz").unwrap();
    assert_eq!(st, 200);
    rt.block_on(async {
        // sled kept the release across the kill.
        assert_eq!(admin.releases().await.unwrap().len(), 1);
    });

    let nginx = c.nginx_pids();
    assert!(nginx.len() >= 2, "master and a worker: {nginx:?}");
    let dir = c.dir().to_path_buf();
    drop(c);
    for p in nginx {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "nginx process {p} outlived the cluster"
        );
    }
    assert!(
        !dir.exists(),
        "the cluster's temporary directory is removed"
    );
}

/// The load-test harness through nginx to one sled replica, which is
/// killed with -9 mid-run and comes back: the balancer path of the
/// scale-out test, without PostgreSQL.
#[test]
fn the_harness_drives_a_rollout_through_nginx_across_a_replica_kill() {
    if !nginx_present() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(ota_tests::bin("ota-loadtest"))
        .args([
            "--replicas",
            "1",
            "--devices",
            "150",
            "--image-kib",
            "256",
            "--waves",
            "10,100",
            "--soak",
            "1s",
            "--max-concurrent",
            "10",
            "--max-starts-per-min",
            "1200",
            "--idle-ms",
            "1000",
            "--wait-ms",
            "500",
            "--lease-ms",
            "2000",
            "--slow-rate",
            "0.3",
            "--slow-bps",
            "131072",
            "--kill-replica-at",
            "3s",
            "--replica-down-for",
            "2s",
            "--deadline",
            "60s",
            "--quiet",
            "--seed",
            "7",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "ota-loadtest failed: {:?}", o.status);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!((n("replicas"), r["storage"].as_str()), (1, Some("sled")));
    assert!(n("max_concurrent_observed_devices") <= 10);
    assert!(n("max_concurrent_observed_server_leases") <= 10);
    assert_eq!(n("start_rate_violations"), 0);
    assert_eq!(n("events_acked"), n("events_stored_by_server"));
    assert_eq!(n("committed"), 150);
    assert_eq!(n("server_on_new_version"), 150);
    let faults = r["fault_timeline"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "the kill and the return");
    // While the only replica was down, nginx answered 502: devices saw it.
    assert!(faults[0]["checkin_errors_10s_after"].as_u64().unwrap() > 0);
    assert!(faults.iter().all(|f| f["error"].is_null()));
}

/// nginx's failover: with one of three replicas killed (-9), device POSTs
/// through the balancer still all succeed, on fresh connections and on
/// kept-alive ones: nginx resends the (buffered) body to the next replica.
/// The replicas are independent sled servers: enrollment needs no shared
/// state (each one enrolls the device in its own store).
#[test]
fn posts_fail_over_to_the_next_replica_when_one_is_killed() {
    if !nginx_present() {
        return;
    }
    let opts = ClusterOpts {
        independent_sled: true,
        ..ClusterOpts::default()
    };
    let key = opts.enrollment_key.clone();
    let c = Cluster::start(3, opts).expect("cluster");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("{}/api/v1/devices/enroll", c.lb_url());
    let enroll_many = |tag: &str, fresh_connections: bool| -> Vec<u16> {
        rt.block_on(async {
            let mut b = reqwest::Client::builder();
            if fresh_connections {
                b = b.pool_max_idle_per_host(0);
            }
            let http = b.build().unwrap();
            let mut codes = Vec::new();
            for i in 0..60 {
                let r = http
                    .post(&url)
                    .json(&serde_json::json!({
                        "enrollment_key": key,
                        "device_id": format!("{tag}-{i}"),
                        "device_type": "t",
                    }))
                    .send()
                    .await;
                codes.push(r.map_or(0, |r| r.status().as_u16()));
            }
            codes
        })
    };
    // Warm up: nginx now keeps connections to every replica.
    let codes = enroll_many("warm", false);
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    c.kill9(1).unwrap();
    for fresh in [false, true] {
        let codes = enroll_many(if fresh { "fresh" } else { "kept" }, fresh);
        assert!(
            codes.iter().all(|&c| c == 200),
            "fresh connections {fresh}: {codes:?}\n{}",
            c.nginx_error_log()
        );
    }
    // nginx saw the dead replica and went on.
    assert!(
        c.nginx_error_log().contains(&c.replica_addr(1).to_string()),
        "{}",
        c.nginx_error_log()
    );
}

/// A replica that dies after it read a request, before it answered (what a
/// kill -9 mid-request looks like to nginx): the POST is resent to the
/// next replica, so the device sees a success, not a 502. This holds
/// because of `non_idempotent` in `proxy_next_upstream` (without it the
/// first answer here is a 502) and because nginx still has the body.
#[test]
fn a_post_to_a_replica_dying_mid_request_is_resent() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    if !nginx_present() {
        return;
    }
    let opts = ClusterOpts {
        balancer: false,
        ..ClusterOpts::default()
    };
    let key = opts.enrollment_key.clone();
    let replica = Cluster::start(1, opts).expect("replica");
    // The dying replica: reads the request, then closes without a word.
    let dying = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dying_addr = dying.local_addr().unwrap();
    let swallowed = Arc::new(AtomicU64::new(0));
    let s2 = swallowed.clone();
    std::thread::spawn(move || {
        for conn in dying.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                // Headers and the small JSON body: all of it, then die.
                if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                    s2.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
    });
    let prefix = tempfile::tempdir().unwrap();
    let lb = ota_tests::cluster::Balancer::start(
        prefix.path(),
        &[dying_addr, replica.replica_addr(0)],
        1,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let codes: Vec<u16> = rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut codes = Vec::new();
        for i in 0..10 {
            let r = http
                .post(format!("http://{}/api/v1/devices/enroll", lb.addr()))
                .json(&serde_json::json!({
                    "enrollment_key": key, "device_id": format!("d-{i}"), "device_type": "t",
                }))
                .send()
                .await;
            codes.push(r.map_or(0, |r| r.status().as_u16()));
        }
        codes
    });
    assert!(
        swallowed.load(Ordering::SeqCst) >= 1,
        "no request reached the dying replica: the test proves nothing"
    );
    assert!(
        codes.iter().all(|&c| c == 200),
        "{codes:?}\n{}",
        lb.error_tail()
    );
}
