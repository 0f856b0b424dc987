//! kill -9 of the real `ota-server` binary mid-rollout, then restart: every
//! acknowledged admission, event and operator decision comes back.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use ota_format::api::*;
use ota_server::client::AdminClient;
use ota_server::rollout::RolloutState;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ota-server serve`; returns the process and its base URL.
fn spawn(cfg: &std::path::Path) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("ota-server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc(child), format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_rollout_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:0", &fast_checkin(30_000));
    let (mut proc, base) = spawn(&cfg);
    let admin = AdminClient::new(&base, ADMIN).unwrap();
    for (v, b) in [("1.0", 1u8), ("2.0", 2)] {
        let p = dir.path().join(format!("{v}.img"));
        std::fs::write(&p, image(16, b)).unwrap();
        admin.release_add("t", v, 0, &p, false).await.unwrap();
    }
    // Wait for the builds.
    for _ in 0..400 {
        let r = admin.releases().await.unwrap();
        if r.iter().all(|r| {
            r.builds
                .iter()
                .all(|b| b.status == ota_server::releases::BuildStatus::Ready)
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = http();
    let mut devices = Vec::new();
    for i in 0..10 {
        devices.push(Sim::enroll(&base, &format!("d{i}"), "t", &http).await);
    }
    let mut s = spec("2.0", "t");
    s.max_concurrent = 4;
    s.min_sample = 100;
    s.max_retries = 0;
    let id = admin.rollout_create(&s).await.unwrap().id;
    let mut offers = Vec::new();
    for d in &devices {
        if let Action::Update(o) = d.checkin("1.0", AgentState::Idle, None).await.action {
            offers.push((d.clone(), o));
        }
    }
    assert_eq!(offers.len(), 4, "cap of 4");
    // One commits, one fails, two keep downloading.
    let (d0, o0) = &offers[0];
    let batch: Vec<Event> = [EventKind::Installed, EventKind::Committed]
        .iter()
        .enumerate()
        .map(|(i, &kind)| Event {
            seq: i as u64 + 1,
            update_id: o0.update_id.clone(),
            kind,
            at: "t".into(),
            detail: Default::default(),
        })
        .collect();
    assert_eq!(d0.events(batch.clone()).await.accepted, 2);
    offers[1]
        .0
        .event(&offers[1].1.update_id, EventKind::Failed)
        .await;
    admin.rollout_action(&id, "pause").await.unwrap();
    let before = admin.rollout(&id).await.unwrap();

    // kill -9, no warning.
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    drop(proc);
    let (_proc, base) = spawn(&cfg);
    let admin = AdminClient::new(&base, ADMIN).unwrap();
    let after = admin.rollout(&id).await.unwrap();
    assert_eq!(
        after.state,
        RolloutState::Paused,
        "the operator's pause survives"
    );
    let (b, a) = (before.totals(), after.totals());
    assert_eq!(
        (a.committed, a.failed, a.admitted, a.installed),
        (b.committed, b.failed, b.admitted, b.installed)
    );
    assert_eq!(
        after.active_leases, 2,
        "the two downloading devices keep their leases"
    );
    // Tokens survive: devices reach the new process with the same token.
    let mut d2 = offers[2].0.clone();
    d2.base = base.clone();
    let r = d2
        .checkin("1.0", AgentState::Downloading, Some(&offers[2].1.update_id))
        .await;
    assert!(
        matches!(r.action, Action::Update(ref o) if o.update_id == offers[2].1.update_id),
        "{r:?}"
    );
    // A retried batch is still recognised.
    let mut d0 = d0.clone();
    d0.base = base.clone();
    assert_eq!(
        d0.events(batch).await,
        EventsResponse {
            accepted: 0,
            duplicates: 2
        }
    );
    // Resume: the cap still counts the restored leases (2 held, 2 free).
    admin.rollout_action(&id, "resume").await.unwrap();
    let mut admitted = 0;
    for d in &devices[4..] {
        let mut d = d.clone();
        d.base = base.clone();
        if matches!(
            d.checkin("1.0", AgentState::Idle, None).await.action,
            Action::Update(_)
        ) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2, "restored leases must count against the cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_interrupted_by_kill_9_reruns_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:0", "");
    let (mut proc, base) = spawn(&cfg);
    let admin = AdminClient::new(&base, ADMIN).unwrap();
    // Big enough (32 MiB of noise at zstd 3) that the kill lands mid-build.
    let p = dir.path().join("big.img");
    std::fs::write(&p, image(8192, 1)).unwrap();
    admin.release_add("t", "1.0", 0, &p, false).await.unwrap();
    // Kill once the builder has started writing (the build is queued when
    // release_add returns, but may not have begun on a loaded machine).
    let tmp = dir.path().join("data/tmp");
    let t = std::time::Instant::now();
    while std::fs::read_dir(&tmp).unwrap().next().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the build never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = admin.releases().await.unwrap();
    assert_ne!(
        r[0].builds[0].status,
        ota_server::releases::BuildStatus::Ready,
        "build finished before the kill; make the image bigger"
    );
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    drop(proc);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data/tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        !leftovers.is_empty(),
        "the kill should leave a half-written build"
    );
    let (_proc, base) = spawn(&cfg);
    for p in &leftovers {
        assert!(
            !p.exists(),
            "start-up must clear half-written {}",
            p.display()
        );
    }
    let admin = AdminClient::new(&base, ADMIN).unwrap();
    let mut ready = None;
    for _ in 0..1200 {
        let r = admin.releases().await.unwrap();
        if r[0].builds[0].status == ota_server::releases::BuildStatus::Ready {
            ready = r[0].builds[0].artifacts.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = ready.expect("the interrupted build never finished after the restart");
    // The artifacts are complete: their content matches their names.
    let http = http();
    for sha in [a.manifest_sha256, a.payload_sha256] {
        let body = http
            .get(format!("{base}/api/v1/artifacts/{sha}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(ota_format::Digest::of(&body), sha);
    }
}

/// Regression (issue 18): a shutdown waited for the running build to end,
/// minutes for a 2 GiB image. It now stops the generator within one batch
/// of chunks; the build stays `building` and runs again at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_interrupts_a_running_build_which_the_next_start_finishes() {
    const CFG: &str = "full_zstd_level = 19\n";
    let mut ts = TestServer::start_in(tempfile::tempdir().unwrap(), CFG).await;
    let p = ts.dir.path().join("big.img");
    std::fs::write(&p, slow_image(96 << 20)).unwrap();
    ts.admin
        .release_add("t", "1.0", 0, &p, false)
        .await
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        let b = ts.admin.releases().await.unwrap()[0].builds[0].clone();
        assert_ne!(
            b.status,
            ota_server::releases::BuildStatus::Ready,
            "the build finished before the shutdown; make the image bigger"
        );
        if b.progress.is_some_and(|p| p.phase == "compressing") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no build started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = std::time::Instant::now();
    ts.stop().await;
    let took = t.elapsed();
    eprintln!("shutdown took {took:?}");
    // 96 MiB at zstd level 19 takes far longer than this bound; stopping
    // within a batch takes well under a second alone, 3.7 s once in CI
    // beside the VM suites (the bound was 2 s then).
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?}: it waited for the build"
    );
    let TestServer { dir, .. } = ts;
    let ts = TestServer::start_in(dir, CFG).await;
    let t = std::time::Instant::now();
    loop {
        let b = ts.admin.releases().await.unwrap()[0].builds[0].clone();
        match b.status {
            ota_server::releases::BuildStatus::Ready => break,
            ota_server::releases::BuildStatus::Failed => panic!("{b:?}"),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the interrupted build never finished after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
