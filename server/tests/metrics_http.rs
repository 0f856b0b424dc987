//! `GET /metrics` as consumers read it: content negotiation, a 0.0.4 text
//! exposition that `promtool check metrics` finds clean, OpenMetrics on
//! request, and the per-rollout state series an operator alerts on. The
//! alert rules shipped in `deploy/prometheus/alerts.yml` are checked with
//! `promtool check rules`. (`metrics_pg` runs this suite on PostgreSQL.)

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ota_format::api::*;

/// `/metrics` with `accept` (if any): content type and body.
async fn scrape(base: &str, accept: Option<&str>) -> (String, String) {
    let mut r = http().get(format!("{base}/metrics"));
    if let Some(a) = accept {
        r = r.header("accept", a);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (ct, r.text().await.unwrap())
}

/// Scrapes until every line in `want` is there (the tick refreshes rollout
/// series every 2 s).
async fn wait_for(base: &str, want: &[String]) -> String {
    let t = Instant::now();
    loop {
        let (_, m) = scrape(base, None).await;
        if want.iter().all(|w| m.lines().any(|l| l == w)) {
            return m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "missing some of {want:#?} in\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn promtool_check_metrics(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n--- exposition:\n{text}"
    );
}

/// Regression (issue 17): `/metrics` answered OpenMetrics whatever the
/// scraper asked, with counters that 0.0.4 readers saw as untyped, and no
/// series said whether a rollout was paused by its failure threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_negotiated_promtool_clean_and_show_rollout_state() {
    let ts = TestServer::with_two_releases(5000).await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(Sim::enroll(&ts.base, &format!("d{i}"), "t", &http()).await);
    }
    let mut s = spec("2.0", "t");
    s.max_concurrent = 2;
    s.min_sample = 1;
    s.failure_threshold = 0.5;
    let r = ts.admin.rollout_create(&s).await.unwrap();
    let id = r.id.clone();
    let Action::Update(o) = devices[0]
        .checkin("1.0", AgentState::Idle, None)
        .await
        .action
    else {
        panic!("no offer")
    };
    devices[0].event(&o.update_id, EventKind::Failed).await;
    // The rollout paused itself; the series say so, with the figures.
    let m = wait_for(
        &ts.base,
        &[
            format!("ota_rollout_state{{rollout=\"{id}\",state=\"paused\",reason=\"failure_threshold\"}} 1"),
            format!("ota_rollout_state{{rollout=\"{id}\",state=\"active\",reason=\"\"}} 0"),
            format!("ota_rollout_failure_ratio{{rollout=\"{id}\"}} 1.0"),
            format!("ota_rollout_failure_threshold{{rollout=\"{id}\"}} 0.5"),
            format!("ota_rollout_max_concurrent{{rollout=\"{id}\"}} 2"),
        ],
    )
    .await;
    assert!(
        m.contains("ota_rollout_last_progress_timestamp_seconds{"),
        "{m}"
    );

    // Default and explicit 0.0.4: the text format, counters declared by
    // their sample names, and promtool finds nothing to complain about.
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (ct, text) = scrape(&ts.base, accept).await;
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "{accept:?}: {ct}"
        );
        assert!(
            text.contains("# TYPE ota_checkins_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        if require_tool("promtool", "prometheus") {
            promtool_check_metrics(&text);
        }
    }
    // OpenMetrics when asked, as Prometheus does.
    let (ct, om) = scrape(
        &ts.base,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    assert!(om.contains("# TYPE ota_checkins counter\n"), "{om}");
    assert!(om.ends_with("# EOF\n"));

    // The operator aborts: the state moves, the stale paused series goes.
    ts.admin.rollout_action(&id, "abort").await.unwrap();
    let m = wait_for(
        &ts.base,
        &[
            format!(
                "ota_rollout_state{{rollout=\"{id}\",state=\"aborted\",reason=\"operator\"}} 1"
            ),
            format!("ota_rollout_state{{rollout=\"{id}\",state=\"paused\",reason=\"\"}} 0"),
        ],
    )
    .await;
    assert!(!m.contains("reason=\"failure_threshold\""), "{m}");
}

/// The shipped alert rules parse and their expressions are valid PromQL.
#[test]
fn alert_rules_pass_promtool_check_rules() {
    if !require_tool("promtool", "prometheus") {
        return;
    }
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/alerts.yml"
    );
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Grafana dashboard is valid JSON and only charts series the server
/// registers (read from `server/src/metrics.rs`: families without samples
/// yet are not in an exposition).
#[test]
fn grafana_dashboard_uses_registered_series() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/ota-server.json"
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let src = include_str!("../src/metrics.rs");
    let registered: Vec<String> = src
        .split("registry.register(")
        .skip(1)
        .filter_map(|r| r.split('"').nth(1))
        .map(|n| format!("ota_{n}"))
        .collect();
    assert!(registered.len() > 10, "{registered:?}");
    let mut n = 0;
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("ota_"))
            {
                n += 1;
                assert!(
                    registered
                        .iter()
                        .any(|r| name == r || name.strip_suffix("_total") == Some(r)),
                    "the dashboard charts {name}, which the server does not register"
                );
            }
        }
    }
    assert!(n > 5);
}
