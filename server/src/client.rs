//! The admin API client behind `ota-server device|release|rollout`.
//!
//! The CLI talks to a running server over HTTP rather than opening the sled
//! database itself: sled allows one process, and the server owns it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ota_format::api::ApiError;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::releases::ReleaseRecord;
use crate::rollout::{RolloutSpec, RolloutStatus};

/// A connection to the admin API.
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// Read size of image uploads.
const UPLOAD_CHUNK: usize = 1 << 20;

impl AdminClient {
    pub fn new(base: &str, token: &str) -> Result<AdminClient> {
        if token.is_empty() {
            bail!(
                "no admin token: pass --admin-token or set OTA_ADMIN_TOKEN (it is `admin_token` in server.toml)"
            );
        }
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::builder()
                .no_gzip()
                .connect_timeout(std::time::Duration::from_secs(10))
                .build()?,
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}: is the server running?"))?;
        decode(resp, &format!("{method} {url}")).await
    }

    pub async fn device_add(
        &self,
        id: &str,
        device_type: &str,
        tags: &std::collections::BTreeMap<String, String>,
        rotate: bool,
    ) -> Result<ota_format::api::EnrollResponse> {
        self.call(
            Method::POST,
            "/api/v1/admin/devices",
            Some(
                &serde_json::json!({"id": id, "device_type": device_type, "tags": tags, "rotate": rotate}),
            ),
        )
        .await
    }

    /// One page of the inventory (`GET /api/v1/admin/devices`).
    pub async fn device_list(
        &self,
        q: &crate::inventory::DeviceQuery,
    ) -> Result<crate::inventory::DevicePage> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/admin/devices", self.base))
            .with_context(|| format!("server URL {:?}", self.base))?;
        if let serde_json::Value::Object(m) = serde_json::to_value(q)? {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) => pairs.append_pair(&k, &s),
                    other => pairs.append_pair(&k, &other.to_string()),
                };
            }
        }
        let url = url.to_string();
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}: is the server running?"))?;
        decode(resp, &format!("GET {url}")).await
    }

    pub async fn device_get(&self, id: &str) -> Result<serde_json::Value> {
        self.call::<(), _>(Method::GET, &format!("/api/v1/admin/devices/{id}"), None)
            .await
    }

    /// Retires a device (`DELETE /api/v1/admin/devices/{id}`).
    pub async fn device_retire(&self, id: &str) -> Result<serde_json::Value> {
        self.call::<(), _>(Method::DELETE, &format!("/api/v1/admin/devices/{id}"), None)
            .await
    }

    /// Deletes a release (`DELETE /api/v1/admin/releases/{device_type}/{version}`).
    pub async fn release_delete(&self, device_type: &str, version: &str) -> Result<ReleaseRecord> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/api/v1/admin/releases/{device_type}/{version}"),
            None,
        )
        .await
    }

    /// Revokes a device's client certificates (all it was issued, or the
    /// one with `serial`); returns `{"device", "revoked": [serials]}`.
    pub async fn device_revoke_cert(
        &self,
        id: &str,
        serial: Option<&str>,
    ) -> Result<serde_json::Value> {
        self.call(
            Method::POST,
            &format!("/api/v1/admin/devices/{id}/revoke-cert"),
            Some(&serde_json::json!({ "serial": serial })),
        )
        .await
    }

    /// Streams `image` to the server (never read whole into memory).
    pub async fn release_add(
        &self,
        device_type: &str,
        version: &str,
        security_counter: u64,
        image: &Path,
        progress: bool,
    ) -> Result<ReleaseRecord> {
        self.release_add_opts(
            device_type,
            version,
            security_counter,
            false,
            image,
            progress,
        )
        .await
    }

    /// [`AdminClient::release_add`], optionally a deliberate downgrade
    /// (`allow_downgrade`: the server accepts a lower version when the
    /// security counter is above every earlier release's).
    pub async fn release_add_opts(
        &self,
        device_type: &str,
        version: &str,
        security_counter: u64,
        allow_downgrade: bool,
        image: &Path,
        progress: bool,
    ) -> Result<ReleaseRecord> {
        // Refuse here what the server would refuse after the upload (the
        // server checks again): an early answer to a streamed body can be
        // lost when the server closes the connection mid-upload.
        crate::releases::check_new_release(
            &self.releases().await?,
            device_type,
            version,
            security_counter,
            allow_downgrade,
        )?;
        let url = format!(
            "{}/api/v1/admin/releases/{device_type}/{version}?security_counter={security_counter}&allow_downgrade={allow_downgrade}",
            self.base
        );
        self.put_release(&url, image, progress).await
    }

    /// Uploads a client's own bundle as an opaque release for DDI targets
    /// (`release add --format swu|raucb|file --artifact FILE`): stored as
    /// is, no deltas (see [`crate::releases::bundle`]). With `attach`, the
    /// bundle joins the existing image release of that version instead.
    #[allow(clippy::too_many_arguments)]
    pub async fn release_add_bundle(
        &self,
        device_type: &str,
        version: &str,
        security_counter: u64,
        format: crate::releases::bundle::BundleFormat,
        filename: Option<&str>,
        module_type: Option<&str>,
        attach: bool,
        artifact: &Path,
        progress: bool,
    ) -> Result<ReleaseRecord> {
        if !attach {
            crate::releases::check_new_release(
                &self.releases().await?,
                device_type,
                version,
                security_counter,
                false,
            )?;
        }
        let mut url = reqwest::Url::parse(&format!(
            "{}/api/v1/admin/releases/{device_type}/{version}",
            self.base
        ))
        .context("building the release URL")?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("security_counter", &security_counter.to_string());
            q.append_pair("format", format.codec().trim_start_matches("bundle:"));
            if let Some(f) = filename {
                q.append_pair("filename", f);
            }
            if let Some(m) = module_type {
                q.append_pair("module_type", m);
            }
            if attach {
                q.append_pair("attach", "true");
            }
        }
        self.put_release(url.as_str(), artifact, progress).await
    }

    /// Streams `image` to `url` (a release PUT) with an optional progress bar.
    async fn put_release(&self, url: &str, image: &Path, progress: bool) -> Result<ReleaseRecord> {
        let f = tokio::fs::File::open(image)
            .await
            .with_context(|| format!("opening {}", image.display()))?;
        let len = f.metadata().await?.len();
        let bar = if progress {
            indicatif::ProgressBar::new(len)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template"),
        );
        let b2 = bar.clone();
        // 1 MiB reads: ReaderStream's default 4 KiB made half a million
        // blocking-pool reads and HTTP chunks of a 2 GiB image (~40 MB/s).
        let stream = futures_util::StreamExt::inspect(
            tokio_util::io::ReaderStream::with_capacity(f, UPLOAD_CHUNK),
            move |c| {
                if let Ok(c) = c {
                    b2.inc(c.len() as u64);
                }
            },
        );
        let resp = self
            .http
            .put(url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .with_context(|| format!("PUT {url}: is the server running?"))?;
        bar.finish_and_clear();
        decode(resp, &format!("PUT {url}")).await
    }

    /// Waits until every build of a release is ready or failed. On a
    /// terminal (`progress`), one line per build shows its phase, the time
    /// since it started and, once ready, the payload size achieved; without
    /// one, a line per build is printed as it finishes, so logs of scripted
    /// runs still say what happened.
    pub async fn wait_release(
        &self,
        device_type: &str,
        version: &str,
        progress: bool,
    ) -> Result<ReleaseRecord> {
        use crate::releases::BuildStatus;
        let multi = indicatif::MultiProgress::with_draw_target(if progress {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        });
        let style = indicatif::ProgressStyle::with_template("  {spinner} {prefix:<22} {msg}")
            .expect("valid template");
        let mut bars: Vec<(indicatif::ProgressBar, Option<std::time::Instant>, bool)> = Vec::new();
        loop {
            let all = self.releases().await?;
            let r = all
                .into_iter()
                .find(|x| x.device_type == device_type && x.version == version)
                .with_context(|| {
                    format!("release {version} of {device_type} disappeared while building")
                })?;
            for (i, b) in r.builds.iter().enumerate() {
                if bars.len() <= i {
                    let bar = multi.add(indicatif::ProgressBar::new_spinner());
                    bar.set_style(style.clone());
                    bar.set_prefix(match &b.from_version {
                        Some(f) => format!("delta from {f}"),
                        None => "full image".to_string(),
                    });
                    bars.push((bar, None, false));
                }
                let (bar, started, done) = &mut bars[i];
                if *done {
                    continue;
                }
                if b.status == BuildStatus::Building && started.is_none() {
                    *started = Some(std::time::Instant::now());
                }
                let elapsed = started.map_or(String::new(), |t| {
                    format!(
                        " {}",
                        humantime::format_duration(std::time::Duration::from_secs(
                            t.elapsed().as_secs()
                        ))
                    )
                });
                let line = match b.status {
                    BuildStatus::Pending => "queued".to_string(),
                    BuildStatus::Building => match &b.progress {
                        Some(p) => format!("building: {}", crate::render::build_progress(p)),
                        None => format!("building{elapsed}"),
                    },
                    BuildStatus::Ready => format!(
                        "ready: {} payload ({:.1} % of the {} image) in {:.1} s",
                        indicatif::HumanBytes(b.artifacts.as_ref().map_or(0, |a| a.payload_size)),
                        100.0 * b.artifacts.as_ref().map_or(0, |a| a.payload_size) as f64
                            / r.image_size.max(1) as f64,
                        indicatif::HumanBytes(r.image_size),
                        b.seconds.unwrap_or(0.0)
                    ),
                    BuildStatus::Failed => {
                        format!(
                            "FAILED: {}",
                            b.error.as_deref().unwrap_or("no reason recorded")
                        )
                    }
                };
                if matches!(b.status, BuildStatus::Ready | BuildStatus::Failed) {
                    *done = true;
                    bar.finish_with_message(line.clone());
                    if !progress {
                        eprintln!("  {:<22} {line}", bar.prefix());
                    }
                } else {
                    bar.set_message(line);
                    bar.tick();
                }
            }
            if r.builds
                .iter()
                .all(|b| matches!(b.status, BuildStatus::Ready | BuildStatus::Failed))
            {
                return Ok(r);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Fleet-wide figures (`GET /api/v1/admin/stats`).
    pub async fn stats(&self) -> Result<serde_json::Value> {
        self.call::<(), _>(Method::GET, "/api/v1/admin/stats", None)
            .await
    }

    pub async fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.call::<(), _>(Method::GET, "/api/v1/admin/releases", None)
            .await
    }

    pub async fn rollout_create(&self, spec: &RolloutSpec) -> Result<RolloutStatus> {
        self.call(Method::POST, "/api/v1/admin/rollouts", Some(spec))
            .await
    }

    pub async fn group_create(&self, g: &crate::groups::Group) -> Result<crate::groups::Group> {
        self.call(Method::POST, "/api/v1/admin/groups", Some(g))
            .await
    }

    pub async fn groups(&self) -> Result<Vec<crate::groups::Group>> {
        self.call::<(), _>(Method::GET, "/api/v1/admin/groups", None)
            .await
    }

    pub async fn group(&self, name: &str) -> Result<crate::groups::Group> {
        self.call::<(), _>(Method::GET, &format!("/api/v1/admin/groups/{name}"), None)
            .await
    }

    pub async fn group_delete(&self, name: &str) -> Result<serde_json::Value> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/api/v1/admin/groups/{name}"),
            None,
        )
        .await
    }

    pub async fn rollouts(&self) -> Result<Vec<RolloutStatus>> {
        self.call::<(), _>(Method::GET, "/api/v1/admin/rollouts", None)
            .await
    }

    pub async fn rollout(&self, id: &str) -> Result<RolloutStatus> {
        self.call::<(), _>(Method::GET, &format!("/api/v1/admin/rollouts/{id}"), None)
            .await
    }

    /// `verb` is pause, resume or abort.
    /// `rollout install-now`: the devices marked to install.
    pub async fn rollout_install_now(
        &self,
        id: &str,
        devices: &[String],
    ) -> Result<crate::windows_http::InstallNowResponse> {
        self.call(
            Method::POST,
            &format!("/api/v1/admin/rollouts/{id}/install-now"),
            Some(&crate::windows_http::InstallNowRequest {
                devices: devices.to_vec(),
            }),
        )
        .await
    }

    pub async fn rollout_action(&self, id: &str, verb: &str) -> Result<RolloutStatus> {
        self.rollout_action_why(id, verb, None).await
    }

    /// A rollout action with the operator's reason (kept in the status and
    /// the audit log).
    pub async fn rollout_action_why(
        &self,
        id: &str,
        verb: &str,
        reason: Option<&str>,
    ) -> Result<RolloutStatus> {
        let path = format!("/api/v1/admin/rollouts/{id}/{verb}");
        match reason {
            Some(r) => {
                self.call(
                    Method::POST,
                    &path,
                    Some(&serde_json::json!({ "reason": r })),
                )
                .await
            }
            None => self.call::<(), _>(Method::POST, &path, None).await,
        }
    }

    /// `{"name", "role", "created_at_ms", "token"}`: the token is shown once.
    pub async fn user_create(
        &self,
        name: &str,
        role: crate::audit::Role,
    ) -> Result<serde_json::Value> {
        self.call(
            Method::POST,
            "/api/v1/admin/users",
            Some(&serde_json::json!({ "name": name, "role": role })),
        )
        .await
    }

    pub async fn users(&self) -> Result<Vec<serde_json::Value>> {
        self.call::<(), _>(Method::GET, "/api/v1/admin/users", None)
            .await
    }

    pub async fn user_delete(&self, name: &str) -> Result<serde_json::Value> {
        self.call::<(), _>(Method::DELETE, &format!("/api/v1/admin/users/{name}"), None)
            .await
    }

    pub async fn audit(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<crate::audit::AuditPage> {
        let mut path = format!("/api/v1/admin/audit?limit={limit}");
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }

    pub async fn device_history(
        &self,
        id: &str,
        before: Option<u64>,
        limit: usize,
        progress: bool,
    ) -> Result<serde_json::Value> {
        let mut path =
            format!("/api/v1/admin/devices/{id}/history?limit={limit}&progress={progress}");
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        self.call::<(), _>(Method::GET, &path, None).await
    }
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response, what: &str) -> Result<T> {
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("{what}: reading the answer"))?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        if status == StatusCode::UNAUTHORIZED {
            bail!(
                "{what}: {status}: the server refused the admin token; use `admin_token` from its server.toml or a token from `ota-server user add` (--admin-token or OTA_ADMIN_TOKEN)"
            );
        }
        bail!("{what}: {status}: {msg}");
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{what}: unexpected answer"))
}

/// Renders a rollout status as a table.
pub fn render_status(s: &RolloutStatus) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "rollout {} of {}{} to {}: {:?} — {}",
        s.id,
        s.spec.device_type,
        s.spec
            .group
            .as_ref()
            .map(|g| format!(" (group {g})"))
            .unwrap_or_default(),
        s.spec.release,
        s.state,
        s.reason
    );
    let _ = writeln!(
        o,
        "  open wave {} of {}; leases {}/{}; start rate {:.1}/min; queued {}; leases expired {}",
        s.open_wave,
        s.waves.len(),
        s.active_leases,
        s.spec.max_concurrent,
        s.starts_per_min_now,
        s.queued,
        s.leases_expired
    );
    let _ = writeln!(
        o,
        "  {:>4} {:>4} {:>4} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>7} {:>12}",
        "wave",
        "%",
        "open",
        "eligible",
        "admitted",
        "waiting",
        "download",
        "installed",
        "committed",
        "failed",
        "rolledb",
        "bytes"
    );
    o.push_str(&crate::render::windows(s));
    for w in s.waves.iter().chain(std::iter::once(&s.totals())) {
        let name = if w.wave == 0 {
            "all".to_string()
        } else {
            w.wave.to_string()
        };
        let _ = writeln!(
            o,
            "  {:>4} {:>4} {:>4} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>7} {:>12}",
            name,
            w.percent,
            if w.open { "yes" } else { "no" },
            w.eligible,
            w.admitted,
            w.waiting,
            w.downloading,
            w.installed,
            w.committed + w.already_current,
            w.failed,
            w.rolled_back,
            w.bytes_served
        );
    }
    if let Some(next) = &s.next_wave {
        let _ = writeln!(o, "  next: {next}");
    }
    o.push_str(&crate::render::failure_reasons(s));
    o
}
