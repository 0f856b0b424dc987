//! Simulated hawkBit DDI targets (`--ddi-share`): devices that speak the DDI
//! device API as SWUpdate's suricatta or RAUC's updater do, in the same
//! rollout as the agents, under the same cap and start rate.
//!
//! A target polls `/{tenant}/controller/v1/{id}` with its `TargetToken`,
//! sleeps what `config.polling.sleep` says, and when the poll links a
//! `deploymentBase` it reads the deployment, reports `proceeding`, fetches
//! the artifact from its `download-http` link while hashing it, checks the
//! size and SHA-256 the deployment named, and reports `closed` with
//! `success` (or `failure` with the reason). It parses the JSON itself
//! (`serde_json::Value`), not through the server's types, as an independent
//! client would. Of the fleet's faults only `silent` applies: a silent
//! target stops after reading its deployment, and the server must expire
//! its lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::sim::{DevState, Device, Shared, Transferring, nap};

/// hawkBit's default tenant, which `ota-server` serves unless `ddi.tenant`
/// says otherwise.
const TENANT: &str = "DEFAULT";

/// One DDI target: its device (id, wave, faults) and its token.
pub struct Target {
    pub device: Device,
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

/// Why one attempt ended.
enum Attempt {
    /// Nothing to do yet: poll again after this long.
    Sleep(Duration),
    /// Installed and reported `closed/success`.
    Committed,
    /// Went quiet on purpose (the `silent` fault).
    Silent,
    /// The artifact was not what the deployment named; reported
    /// `closed/failure`. A wrong image is final, as for an agent.
    WrongArtifact,
}

/// Runs one target until it committed, went silent or the run is over.
pub async fn run_target(t: Target, sh: Arc<Shared>) {
    let st = &sh.stats;
    let i = t.device.index;
    st.wave[i].store(t.device.wave as u8, Ordering::Relaxed);
    st.set(i, DevState::Idle);
    let mut errors = 0u32;
    loop {
        if sh.cancel.is_cancelled() {
            st.set(i, DevState::TimedOut);
            return;
        }
        match attempt(&t, &sh).await {
            Ok(Attempt::Sleep(d)) => {
                errors = 0;
                if !nap(&sh, d).await {
                    st.set(i, DevState::TimedOut);
                    return;
                }
            }
            Ok(Attempt::Committed) => {
                st.set(i, DevState::Committed);
                return;
            }
            Ok(Attempt::Silent) => {
                st.set(i, DevState::Silent);
                return;
            }
            Ok(Attempt::WrongArtifact) => {
                st.set(i, DevState::Failed);
                return;
            }
            Err(e) => {
                errors += 1;
                st.checkin_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target = %t.device.id, error = %e, "DDI poll failed");
                let wait = ota_agent::pool::backoff(
                    Duration::from_millis(200),
                    Duration::from_secs(5),
                    errors,
                );
                if !nap(&sh, wait).await {
                    st.set(i, DevState::TimedOut);
                    return;
                }
            }
        }
    }
}

/// `HH:MM:SS` of `config.polling.sleep`.
fn parse_sleep(s: &str) -> Option<Duration> {
    let mut secs = 0u64;
    let mut parts = 0;
    for p in s.split(':') {
        secs = secs * 60 + p.parse::<u64>().ok()?;
        parts += 1;
    }
    (parts == 3).then(|| Duration::from_secs(secs))
}

/// Whether a request waits for one of the harness's request slots.
///
/// A target's polls do, as agents' check-ins do: they bound the fleet's
/// connections. The requests of an admitted target (reading its deployment,
/// its feedback) do not: the server's cap already bounds how many targets
/// are admitted, and each of them holds a lease that expires while it waits.
/// At 127k devices with 20 % DDI targets, admitted targets queued behind
/// 4,096 slots for their `proceeding` and `closed` feedback longer than
/// their 10 s leases: 10,226 leases expired and the rollout paused at its
/// failure threshold (`an_admitted_target_reports_without_a_request_slot`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Take,
    Admitted,
}

/// A slot when `slot` says so; `None` for an admitted target's request.
async fn slot(sh: &Shared, slot: Slot) -> Result<Option<tokio::sync::SemaphorePermit<'_>>, String> {
    match slot {
        Slot::Take => Ok(Some(
            sh.in_flight.acquire().await.map_err(|e| e.to_string())?,
        )),
        Slot::Admitted => Ok(None),
    }
}

async fn get_json(
    t: &Target,
    sh: &Shared,
    url: &str,
    s: Slot,
) -> Result<serde_json::Value, String> {
    let _slot = slot(sh, s).await?;
    let sent = tokio::time::Instant::now();
    let r = t
        .http
        .get(url)
        .header("Authorization", format!("TargetToken {}", t.token))
        .header("Accept", "application/hal+json")
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = r.status();
    let body = r.text().await.map_err(|e| format!("GET {url}: {e}"))?;
    sh.stats.record_latency(t.device.index, sent.elapsed());
    if !status.is_success() {
        return Err(format!("GET {url}: {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {url}: not JSON ({e}): {body}"))
}

/// Sends one feedback. Only an admitted target sends any: no request slot
/// ([`Slot`]).
async fn feedback(
    t: &Target,
    sh: &Shared,
    action: &str,
    execution: &str,
    finished: &str,
    details: &[String],
) -> Result<(), String> {
    let url = format!(
        "{}/{TENANT}/controller/v1/{}/deploymentBase/{action}/feedback",
        t.base, t.device.id
    );
    let body = serde_json::json!({
        "id": action,
        "status": {
            "execution": execution,
            "result": {"finished": finished},
            "details": details,
        }
    });
    // The server stores `installed` + `committed` for `closed/success` and
    // one event for every other feedback (docs/ddi.md's mapping): the load
    // test's accounting of events sent against events stored counts those.
    let events = if (execution, finished) == ("closed", "success") {
        2
    } else {
        1
    };
    let r = match t
        .http
        .post(&url)
        .header("Authorization", format!("TargetToken {}", t.token))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            // Sent, perhaps stored, never answered (the 127k run's server
            // kill -9 stored one such feedback): not a double count.
            sh.stats
                .ddi_feedback_unanswered
                .fetch_add(events, Ordering::Relaxed);
            return Err(format!("POST {url}: {e}"));
        }
    };
    if !r.status().is_success() {
        let s = r.status();
        return Err(format!(
            "POST {url}: {s}: {}",
            r.text().await.unwrap_or_default()
        ));
    }
    sh.stats.events_acked.fetch_add(events, Ordering::Relaxed);
    Ok(())
}

/// One poll, and the deployment if the poll offers one.
async fn attempt(t: &Target, sh: &Shared) -> Result<Attempt, String> {
    let st = &sh.stats;
    let i = t.device.index;
    let base = format!("{}/{TENANT}/controller/v1/{}", t.base, t.device.id);
    let poll = get_json(t, sh, &base, Slot::Take).await?;
    st.checkins.fetch_add(1, Ordering::Relaxed);
    let sleep = poll["config"]["polling"]["sleep"]
        .as_str()
        .and_then(parse_sleep)
        .ok_or_else(|| format!("the poll has no config.polling.sleep: {poll}"))?
        // As SWUpdate does, the target sleeps what the server says: whole
        // seconds, so a sub-second pace (small test fleets) reads
        // `00:00:00`, taken as 200 ms. Capping it at 1 s (before) made the
        // 25,400 DDI targets of a 127k run poll 25,400 times a second, 20 ×
        // an agent's pace, and starved both processes.
        .max(Duration::from_millis(200));
    let Some(href) = poll["_links"]["deploymentBase"]["href"].as_str() else {
        // Not admitted (yet): its wave is closed or it is throttled; DDI
        // does not say which.
        st.set(i, DevState::Waiting);
        return Ok(Attempt::Sleep(sleep));
    };
    let dep = get_json(t, sh, href, Slot::Admitted).await?;
    let action = match &dep["id"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => return Err(format!("deploymentBase has no id: {other}")),
    };
    if t.device.faults.silent {
        return Ok(Attempt::Silent);
    }
    let art = &dep["deployment"]["chunks"][0]["artifacts"][0];
    let url = art["_links"]["download-http"]["href"]
        .as_str()
        .or_else(|| art["_links"]["download"]["href"].as_str())
        .ok_or_else(|| format!("the deployment names no artifact link: {dep}"))?;
    let size = art["size"].as_u64().ok_or("the artifact has no size")?;
    let want = art["hashes"]["sha256"]
        .as_str()
        .ok_or("the artifact has no sha256")?
        .to_string();
    feedback(t, sh, &action, "proceeding", "none", &[]).await?;
    st.starts
        .lock()
        .unwrap()
        .push(sh.started.elapsed().as_millis() as u64);
    st.set(i, DevState::Downloading);
    let got = {
        let _transferring = Transferring::ddi(sh);
        download(t, sh, url).await
    };
    match got {
        Ok((n, sha)) if n == size && sha == want => {
            feedback(t, sh, &action, "closed", "success", &[]).await?;
            Ok(Attempt::Committed)
        }
        Ok((n, sha)) => {
            st.wrong_images.fetch_add(1, Ordering::Relaxed);
            let why =
                format!("artifact is {n} bytes, sha256 {sha}; the deployment said {size}, {want}");
            tracing::warn!(target = %t.device.id, %why, "wrong artifact");
            feedback(t, sh, &action, "closed", "failure", &[why]).await?;
            Ok(Attempt::WrongArtifact)
        }
        Err(e) => {
            st.download_failures.fetch_add(1, Ordering::Relaxed);
            feedback(
                t,
                sh,
                &action,
                "closed",
                "failure",
                std::slice::from_ref(&e),
            )
            .await?;
            st.set(i, DevState::Waiting);
            Err(e)
        }
    }
}

/// Fetches the artifact, hashing as it streams: its length and SHA-256.
///
/// The transfer takes none of the harness's request slots (`in_flight`),
/// as an agent's chunk downloads take none: the server's cap already bounds
/// how many run at once, and a real target that was admitted starts at
/// once. Queueing admitted targets behind the fleet's polls was a harness
/// artefact that cost them their leases at 127k devices; keeping them alive
/// with `proceeding` feedback while they queued (the first fix) made them
/// leave and re-join the semaphore's queue every second, and with 2,000
/// lease holders doing that the run livelocked: leases renewed forever,
/// nobody reached the front
/// (`an_admitted_target_downloads_without_a_request_slot`).
///
/// # Cancel safety
/// Dropping the future drops the connection; nothing is written but counters.
async fn download(t: &Target, sh: &Shared, url: &str) -> Result<(u64, String), String> {
    let r = t
        .http
        .get(url)
        .header("Authorization", format!("TargetToken {}", t.token))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("GET {url}: {}", r.status()));
    }
    let mut r = r;
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        n += chunk.len() as u64;
        sh.stats
            .bytes_received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        h.update(&chunk);
    }
    Ok((n, ota_format::Digest::from(h).to_hex()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use clap::Parser as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A `Shared` for one target, with `slots` request slots.
    pub(in crate::loadtest) fn shared(slots: usize) -> Arc<Shared> {
        let key = ota_format::SigningKeyPair::generate().unwrap();
        Arc::new(Shared {
            source: Arc::new(Vec::new()),
            source_path: "/nonexistent".into(),
            target_sha: ota_format::Digest::of(b""),
            target_len: 0,
            trusted: ota_format::TrustedKeys::try_new(vec![key.verifying_key()], 1).unwrap(),
            cancel: tokio_util::sync::CancellationToken::new(),
            stats: super::super::sim::FleetStats::new(1),
            is_ddi: vec![true],
            args: super::super::Args::parse_from(["ota-loadtest"]),
            started: std::time::Instant::now(),
            slots_dir: "/nonexistent".into(),
            in_flight: tokio::sync::Semaphore::new(slots),
            holders: tokio::sync::Semaphore::new(slots),
            windows: None,
            tokens: vec![std::sync::OnceLock::new()],
            late: vec![None],
        })
    }

    /// Serves `body` once over HTTP/1.1 on a loopback port.
    async fn serve_once(body: Vec<u8>) -> String {
        serve(1, body).await
    }

    /// Answers `n` connections (one request each) with `body`.
    pub(in crate::loadtest) async fn serve(n: usize, body: Vec<u8>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..n {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req).await.unwrap();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(&body).await.unwrap();
            }
        });
        format!("http://{addr}")
    }

    /// A target named `d0` of the server at `base`.
    pub(in crate::loadtest) fn target(base: &str) -> Target {
        Target {
            device: Device {
                index: 0,
                id: "d0".into(),
                client: ota_agent::client::Client::new(
                    base,
                    ota_agent::client::Timeouts {
                        request: Duration::from_secs(5),
                        read: Duration::from_secs(5),
                    },
                )
                .unwrap(),
                faults: Default::default(),
                wave: 0,
            },
            http: reqwest::Client::new(),
            base: base.to_string(),
            token: "t".into(),
        }
    }

    /// At 127k devices the fleet's polls kept every request slot busy; an
    /// admitted target that waited for one (and, while waiting, sent
    /// keep-alive feedback that needed one too) never started, and 2,000 of
    /// them held the cap forever. A download must not wait for a slot.
    #[tokio::test]
    async fn an_admitted_target_downloads_without_a_request_slot() {
        let sh = shared(1);
        let _every_slot_busy = sh.in_flight.acquire().await.unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let want = ota_format::Digest::of(&body).to_hex();
        let base = serve_once(body).await;
        let t = target(&base);
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            download(&t, &sh, &format!("{base}/artifact")),
        )
        .await
        .expect("the download waited for a request slot the fleet's polls held");
        assert_eq!(got.unwrap(), (100_000, want));
    }

    /// At 127k devices with 20 % DDI targets, admitted targets waited
    /// behind the fleet's polls for a slot to read their deployment and to
    /// send `proceeding` and `closed`, longer than their leases: 10,226
    /// leases expired and the rollout paused at its failure threshold. An
    /// admitted target's requests must not wait for a slot; its polls still
    /// do.
    #[tokio::test]
    async fn an_admitted_target_reports_without_a_request_slot() {
        let sh = shared(1);
        let _every_slot_busy = sh.in_flight.acquire().await.unwrap();
        let base = serve(2, br#"{"id":"7"}"#.to_vec()).await;
        let t = target(&base);
        fn within<T>(what: &str, r: Result<T, tokio::time::error::Elapsed>) -> T {
            r.unwrap_or_else(|_| panic!("{what} waited for a request slot"))
        }
        let dep = tokio::time::timeout(
            Duration::from_secs(10),
            get_json(&t, &sh, &format!("{base}/deploymentBase/7"), Slot::Admitted),
        )
        .await;
        assert_eq!(within("reading the deployment", dep).unwrap()["id"], "7");
        let fb = tokio::time::timeout(
            Duration::from_secs(10),
            feedback(&t, &sh, "7", "closed", "success", &[]),
        )
        .await;
        within("closed/success feedback", fb).unwrap();
        // A poll still waits for its slot.
        let poll = tokio::time::timeout(
            Duration::from_millis(300),
            get_json(&t, &sh, &format!("{base}/poll"), Slot::Take),
        )
        .await;
        assert!(poll.is_err(), "a poll must wait for a request slot");
    }

    /// The 127k rerun's "1 extra" event: a `closed/success` the server
    /// stored whose answer never came back (its kill -9) was neither
    /// acknowledged nor given up, and the run called it double counting.
    /// Feedback sent without an answer is counted apart, as maybe stored.
    #[tokio::test]
    async fn feedback_without_an_answer_counts_as_maybe_stored() {
        let sh = shared(1);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            // Reads the request, then the "server" dies without answering.
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req).await;
        });
        let t = target(&base);
        let r = feedback(&t, &sh, "7", "closed", "success", &[]).await;
        assert!(r.is_err());
        assert_eq!(sh.stats.ddi_feedback_unanswered.load(Ordering::Relaxed), 2);
        assert_eq!(sh.stats.events_acked.load(Ordering::Relaxed), 0);
    }

    /// Issue 16's 127k run: during a stall ~900 agents whose leases had
    /// run out were still counted (their tasks had not yet run to stop)
    /// while the server re-admitted others, and the device-side maximum
    /// read 2,644 against a cap of 2,000. Lapsed devices are reported
    /// apart; renewed ones stay live.
    #[tokio::test]
    async fn an_agent_whose_lease_ran_out_counts_as_lapsed_not_against_the_cap() {
        use ota_agent::lease::LeaseClock;
        let sh = shared(1);
        let st = &sh.stats;
        // Real time (this crate's tokio has no paused clock): margins of
        // 700 ms against a late wake-up.
        let lease = || LeaseClock::granted(Duration::from_secs(2), tokio::time::Instant::now());
        let lapsing = Transferring::agent(&sh, &lease());
        let mut renewed_lease = lease();
        let mut renewing = Transferring::agent(&sh, &renewed_lease);
        assert_eq!(st.max_downloading.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        renewed_lease.renewed(tokio::time::Instant::now());
        renewing.renewed(&renewed_lease);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // `lapsing` ran out and has not stopped yet; `renewing` is live.
        let admitted = Transferring::agent(&sh, &lease());
        assert_eq!(st.downloading.load(Ordering::SeqCst), 3);
        assert_eq!(st.max_downloading.load(Ordering::SeqCst), 2);
        assert_eq!(st.max_lapsed.load(Ordering::SeqCst), 1);
        drop(lapsing);
        let ddi = Transferring::ddi(&sh);
        assert_eq!(st.max_downloading.load(Ordering::SeqCst), 3);
        assert_eq!(st.max_downloading_ddi.load(Ordering::SeqCst), 1);
        drop((ddi, admitted, renewing));
        assert_eq!(st.downloading.load(Ordering::SeqCst), 0);
        assert!(st.lease_ends.lock().unwrap().is_empty());
    }

    #[test]
    fn polling_sleep_is_hours_minutes_seconds() {
        assert_eq!(parse_sleep("00:00:05"), Some(Duration::from_secs(5)));
        assert_eq!(parse_sleep("01:02:03"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_sleep("5"), None);
        assert_eq!(parse_sleep("00:x:05"), None);
    }
}
