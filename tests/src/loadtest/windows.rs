//! Maintenance windows in the fleet load test (issue 15, `--window-zones`):
//! each agent reports one of the given IANA zones (round robin), the
//! rollout has one device-local window (`daily 12:00+10m local`), and the
//! harness moves the server's window clock (the test-build hook every
//! debug server has) so that the zones' windows open one after the other,
//! `--window-hold` each, with a closed spell first in which devices can
//! only download ahead. Devices download and verify, report
//! `waiting-for-window` (holding no lease), and install when the server
//! says so.
//!
//! The check, judged by the harness and not by the server's code: an
//! `install` answer a device received between sending its check-in and
//! reading the answer must overlap a spell in which the harness had opened
//! *that device's* zone. The spells are conservative: one opens when the
//! harness sent the clock change and closes when the next change was
//! acknowledged by every replica, so a slow answer is not a false alarm;
//! an install outside every spell of its zone is counted in
//! `switched_outside_window` and fails the run.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jiff::tz::TimeZone;
use tokio_util::sync::CancellationToken;

/// Local wall-clock start of the window, in every zone.
pub const START: (i8, i8) = (12, 0);
/// Its length.
pub const MINUTES: i64 = 10;

/// The rollout's window.
pub fn window_spec() -> String {
    format!("daily {:02}:{:02}+{MINUTES}m local", START.0, START.1)
}

/// One window-clock change: sent, acknowledged by every replica, the zone
/// it opened (`None`: all closed).
type Spell = (Instant, Option<Instant>, Option<usize>);

/// The zones, and which one the harness opened when.
pub struct Plan {
    pub zones: Vec<String>,
    /// (change sent, change acknowledged by every replica, zone opened or
    /// `None` = all closed), in order. An entry is logged before its change
    /// is sent, so a device can never see a change the log does not have.
    log: Mutex<Vec<Spell>>,
}

impl Plan {
    /// Checks the zones exist here (the server must know them too).
    pub fn new(zones: &[String]) -> Result<Plan> {
        for z in zones {
            TimeZone::get(z).with_context(|| format!("--window-zones: {z:?}"))?;
        }
        Ok(Plan {
            zones: zones.to_vec(),
            log: Mutex::new(Vec::new()),
        })
    }

    /// The zone device `i` reports.
    pub fn zone_of(&self, i: usize) -> &str {
        &self.zones[i % self.zones.len()]
    }

    /// Whether an install answer to device `i`, in flight from `sent` to
    /// `received`, overlaps a spell in which its zone was open.
    pub fn install_was_in_window(&self, i: usize, sent: Instant, received: Instant) -> bool {
        let z = i % self.zones.len();
        let log = self.log.lock().unwrap();
        log.iter().enumerate().any(|(k, &(from, _, open))| {
            // Open until the next change was acknowledged (still open while
            // it is in flight).
            let until = log.get(k + 1).and_then(|&(_, acked, _)| acked);
            open == Some(z) && from <= received && until.is_none_or(|u| sent <= u)
        })
    }
}

/// The window-clock offset (ms) at which zone `z`'s window opened 30 s ago
/// (today's occurrence in that zone), or, for `None`, one at which no zone
/// given is inside the window (an hour before the first one opens).
fn offset_for(zones: &[String], open: Option<usize>) -> Result<i64> {
    let now = jiff::Timestamp::now();
    let opening = |z: &str| -> Result<jiff::Timestamp> {
        let tz = TimeZone::get(z)?;
        let date = now.to_zoned(tz.clone()).date();
        Ok(date.at(START.0, START.1, 0, 0).to_zoned(tz)?.timestamp())
    };
    let at = match open {
        Some(z) => opening(&zones[z])? + jiff::SignedDuration::from_secs(30),
        None => {
            let first = zones
                .iter()
                .map(|z| opening(z))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .min()
                .context("no zones")?;
            first - jiff::SignedDuration::from_hours(1)
        }
    };
    Ok(at.as_millisecond() - now.as_millisecond())
}

/// Why a replica's window clock was not set.
#[derive(Debug)]
enum ClockError {
    /// The replica did not answer (restarting): try again.
    Unreachable(anyhow::Error),
    /// It answered with an error (e.g. no test hook): give up.
    Refused(anyhow::Error),
}

/// Sets every replica's window clock.
async fn set_clock(
    http: &reqwest::Client,
    replicas: &[String],
    admin: &str,
    offset_ms: i64,
) -> Result<(), ClockError> {
    for base in replicas {
        let r = http
            .put(format!("{base}/api/v1/admin/test/window-clock"))
            .bearer_auth(admin)
            .json(&serde_json::json!({ "offset_ms": offset_ms }))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("moving the window clock of {base}"))
            .map_err(ClockError::Unreachable)?;
        if !r.status().is_success() {
            return Err(ClockError::Refused(anyhow::anyhow!(
                "moving the window clock of {base}: {} (a release build without the \
                 test-hooks feature has no such hook)",
                r.status()
            )));
        }
    }
    Ok(())
}

/// How often a spell's clock is set again while it is held.
const REASSERT: Duration = Duration::from_secs(2);

/// Closed for `hold`, then each zone's window in turn for `hold`, round
/// and round until `cancel`.
///
/// A replica killed and restarted (the run's `--server-restart-at`) comes
/// back on the real clock, where every zone is normally closed, and one
/// restarting refuses connections for a few seconds. The first 127k run of
/// this scenario met the kill just as the clock was due to move: the move
/// failed, the driver stopped, and no window opened again. So a change is
/// retried until every replica took it, and the spell's offset is set
/// again every [`REASSERT`] while it is held; a spell is logged as open
/// from its first send, so a late re-assertion can only close a window
/// early on the server, never open one outside the log.
pub async fn drive(
    plan: std::sync::Arc<Plan>,
    replicas: Vec<String>,
    admin: String,
    hold: Duration,
    cancel: CancellationToken,
) -> Result<()> {
    let http = reqwest::Client::new();
    let steps = std::iter::once(None).chain((0..plan.zones.len()).map(Some).cycle());
    for open in steps {
        let offset = offset_for(&plan.zones, open)?;
        let k = {
            let mut log = plan.log.lock().unwrap();
            log.push((Instant::now(), None, open));
            log.len() - 1
        };
        let mut tries = 0u32;
        loop {
            match set_clock(&http, &replicas, &admin, offset).await {
                Ok(()) => break,
                Err(ClockError::Refused(e)) => return Err(e),
                Err(ClockError::Unreachable(e)) => {
                    tries += 1;
                    if tries >= 60 {
                        return Err(e.context("a replica stayed unreachable for a minute"));
                    }
                    tracing::warn!(error = %e, "window clock not moved yet; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        plan.log.lock().unwrap()[k].1 = Some(Instant::now());
        tracing::info!(zone = ?open.map(|z| &plan.zones[z]), offset_ms = offset, "window clock moved");
        let until = tokio::time::Instant::now() + hold;
        loop {
            let next = (tokio::time::Instant::now() + REASSERT).min(until);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(next) => {}
            }
            if next >= until {
                break;
            }
            if let Err(e) = set_clock(&http, &replicas, &admin, offset).await {
                tracing::debug!(error = ?e, "re-asserting the window clock");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_install_counts_only_inside_a_spell_of_its_own_zone() {
        let zones = ["Asia/Dhaka", "Asia/Kolkata"].map(String::from);
        let plan = Plan::new(&zones).unwrap();
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        {
            let mut log = plan.log.lock().unwrap();
            log.push((s(0), Some(s(10)), None));
            log.push((s(100), Some(s(110)), Some(0)));
            log.push((s(200), Some(s(210)), Some(1)));
        }
        // Device 0 is in Dhaka, device 1 in Kolkata.
        assert!(!plan.install_was_in_window(0, s(20), s(90)), "closed spell");
        assert!(
            plan.install_was_in_window(0, s(95), s(105)),
            "answer raced the change"
        );
        assert!(
            plan.install_was_in_window(0, s(205), s(215)),
            "Dhaka's spell ends at 210"
        );
        assert!(
            !plan.install_was_in_window(0, s(211), s(300)),
            "Kolkata's spell"
        );
        assert!(plan.install_was_in_window(1, s(250), s(260)));
        assert!(!plan.install_was_in_window(1, s(120), s(150)));
        // A change in flight (logged, not yet acknowledged): the spell
        // before it is still open, and the new one already may be.
        plan.log.lock().unwrap().push((s(300), None, Some(0)));
        assert!(plan.install_was_in_window(1, s(305), s(400)));
        assert!(plan.install_was_in_window(0, s(305), s(306)));
    }

    #[test]
    fn the_offsets_open_each_zone_and_the_closed_one_opens_none() {
        let zones = ["Asia/Dhaka", "Asia/Kathmandu", "Asia/Kolkata"].map(String::from);
        let w = ota_server::rollout::window::Window::parse(&window_spec()).unwrap();
        let at = |off: i64| {
            jiff::Timestamp::from_millisecond(jiff::Timestamp::now().as_millisecond() + off)
                .unwrap()
        };
        let zone = |z: &str| ota_server::rollout::window::DeviceZone::reported(Some(z));
        let closed = at(offset_for(&zones, None).unwrap());
        for z in &zones {
            assert!(!w.is_open(closed, &zone(z)), "{z} open in the closed spell");
        }
        for (k, z) in zones.iter().enumerate() {
            let t = at(offset_for(&zones, Some(k)).unwrap());
            for (j, other) in zones.iter().enumerate() {
                assert_eq!(w.is_open(t, &zone(other)), j == k, "{z}'s spell, {other}");
            }
        }
    }

    /// The first 127k run of this scenario: the server's kill -9 landed as
    /// the clock was due to move, the move failed, the driver stopped, and
    /// no window opened again. A replica that is down when the clock moves
    /// gets the change when it is back, and a held spell is set again (a
    /// restarted replica forgets it).
    #[tokio::test]
    async fn the_clock_reaches_a_replica_that_was_down_and_is_set_again_while_held() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let zones = ["Asia/Dhaka"].map(String::from);
        let plan = std::sync::Arc::new(Plan::new(&zones).unwrap());
        let cancel = CancellationToken::new();
        let driver = tokio::spawn(drive(
            plan.clone(),
            vec![format!("http://127.0.0.1:{port}")],
            "admin".into(),
            Duration::from_secs(3),
            cancel.clone(),
        ));
        // Down for 1.5 s, then up: it answers every PUT and counts them.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let puts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = puts.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some(h) = text.find("\r\n\r\n")
                            && text[h + 4..].contains('}')
                        {
                            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            got.clear();
                            let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if s.write_all(ok.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        cancel.cancel();
        driver
            .await
            .unwrap()
            .expect("the driver gave up on a replica that came back");
        let log = plan.log.lock().unwrap();
        assert!(
            log[0].1.is_some(),
            "the closed spell was never acknowledged"
        );
        assert!(
            puts.load(std::sync::atomic::Ordering::SeqCst) >= 3,
            "the change, a re-assertion while held and the next spell: {} PUTs",
            puts.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
}
