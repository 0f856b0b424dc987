//! A scale-out deployment on loopback: N `ota-server serve` processes
//! sharing one `data_dir`, one PostgreSQL database and one Redis key prefix,
//! behind a real nginx as the load balancer.
//!
//! ```text
//!   devices ──► nginx 127.0.0.1:lb ──► r0 127.0.0.1:p0 ─┐
//!                                  ├─► r1 127.0.0.1:p1 ─┼─► PostgreSQL (state)
//!                                  └─► r2 127.0.0.1:p2 ─┘   Redis (throttle)
//!                                                           data_dir (shared)
//! ```
//!
//! With the sled backend there is one replica (sled is one process), still
//! optionally behind nginx; that is how the balancer path is tested without
//! PostgreSQL.
//!
//! Every process is a child of this one: [`Cluster`]'s `Drop` kills the
//! replicas (kill -9) and stops nginx (SIGTERM, then SIGKILL of the master
//! and any worker left), and drops the database if asked to. Every wait is
//! bounded.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a replica may take to print its "listening" line (a first
/// replica runs the migrations).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of a process's stderr kept for error messages.
const TAIL_LINES: usize = 40;

/// The last lines a process wrote to stderr.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut t = self.0.lock().unwrap();
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
    fn text(&self) -> String {
        let t = self.0.lock().unwrap();
        if t.is_empty() {
            return "(nothing on stderr)".into();
        }
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// One `ota-server serve` process; restarts on the same address.
///
/// The config is written as `listen = "<addr>"` plus `body`; with port 0 the
/// server picks one, and the file is rewritten with it so a restart comes
/// back on the same address (the balancer's upstream stays valid).
pub struct ServerProc {
    child: Option<Child>,
    cfg: PathBuf,
    body: String,
    name: String,
    rust_log: String,
    forward_stderr: bool,
    /// The `ota-server` binary (another build for side-by-side benchmarks).
    bin: PathBuf,
    tail: Tail,
    pid: Arc<AtomicU32>,
    pub addr: SocketAddr,
}

impl ServerProc {
    /// Writes the config to `cfg` and starts the server; returns once it
    /// listens.
    pub fn start(
        cfg: &Path,
        listen: SocketAddr,
        body: &str,
        name: &str,
        rust_log: &str,
        forward_stderr: bool,
        bin: Option<&Path>,
    ) -> Result<ServerProc> {
        let mut s = ServerProc {
            child: None,
            cfg: cfg.to_path_buf(),
            body: body.to_string(),
            name: name.to_string(),
            rust_log: rust_log.to_string(),
            forward_stderr,
            bin: bin.map_or_else(|| crate::bin("ota-server"), Path::to_path_buf),
            tail: Tail::default(),
            pid: Arc::new(AtomicU32::new(0)),
            addr: listen,
        };
        s.spawn()?;
        Ok(s)
    }

    fn write_config(&self) -> Result<()> {
        std::fs::write(
            &self.cfg,
            format!("listen = \"{}\"\n{}", self.addr, self.body),
        )
        .with_context(|| format!("writing {}", self.cfg.display()))
    }

    fn spawn(&mut self) -> Result<()> {
        self.write_config()?;
        // OTA_SERVER_WRAP: words to run the server under (e.g. `valgrind
        // --tool=callgrind ...` for checkin-bench's instruction counts).
        let wrap: Vec<String> = std::env::var("OTA_SERVER_WRAP")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&self.cfg)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ota-server")?;
        // stderr: kept (the tail explains failures) and forwarded, prefixed.
        let err = child.stderr.take().expect("piped");
        let tail = self.tail.clone();
        let (name, fwd) = (self.name.clone(), self.forward_stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if fwd {
                    eprintln!("[{name}] {line}");
                }
                tail.push(line);
            }
        });
        // stdout: the first line says where it listens; the rest is drained
        // so the server never writes into a closed pipe.
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            let _ = tx.send(lines.next());
            for _ in lines.map_while(Result::ok) {}
        });
        let first = rx.recv_timeout(START_TIMEOUT);
        let fail = |child: &mut Child, what: String| -> anyhow::Error {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            // Give the stderr thread a moment to read the last lines.
            std::thread::sleep(Duration::from_millis(100));
            anyhow::anyhow!(
                "{} ({}) did not start: {what} ({status}); its stderr:\n{}",
                self.name,
                self.cfg.display(),
                self.tail.text()
            )
        };
        let line = match first {
            Ok(Some(Ok(l))) => l,
            Ok(_) => return Err(fail(&mut child, "it exited".into())),
            Err(_) => {
                return Err(fail(
                    &mut child,
                    format!("no \"listening\" line in {START_TIMEOUT:?}"),
                ));
            }
        };
        let Some(addr) = line.trim().strip_prefix("ota-server listening on ") else {
            return Err(fail(&mut child, format!("unexpected first line {line:?}")));
        };
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("{}: bad address in {line:?}", self.name))?;
        if addr != self.addr {
            self.addr = addr;
            self.write_config()?;
        }
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// kill -9 (no-op when not running).
    pub fn kill9(&mut self) -> Result<()> {
        self.pid.store(0, Ordering::Relaxed);
        if let Some(mut c) = self.child.take() {
            c.kill().context("kill -9")?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts it again on the same address (after [`Self::kill9`]); retries
    /// for 10 s while the port lingers.
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let t = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if t.elapsed() < Duration::from_secs(10) => {
                    tracing::warn!(error = %format!("{e:#}"), "restart failed, retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// kill -9 and start again on the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.start_again()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// What a [`Cluster`] runs.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// The database (already created, empty or migrated) every replica
    /// shares; `None` = sled in `data_dir` (one replica only).
    pub pg_url: Option<String>,
    /// Redis for the fleet-wide throttle; `None` = each replica's own.
    pub redis_url: Option<String>,
    /// Redis key prefix (isolates clusters sharing one Redis).
    pub key_prefix: String,
    /// Connections per replica to PostgreSQL.
    pub pool_size: usize,
    pub admin_token: String,
    pub enrollment_key: String,
    /// PKCS#8 PEM signing key; `None` = a new one in the cluster's dir.
    pub signing_key: Option<PathBuf>,
    /// Extra top-level TOML lines (`zstd_level = 9`...).
    pub top_level: String,
    /// Extra TOML sections (`[checkin]`...), after everything else.
    pub sections: String,
    /// Put nginx in front (else `lb_url` is replica 0's URL).
    pub balancer: bool,
    /// nginx worker processes.
    pub nginx_workers: usize,
    /// `RUST_LOG` of the replicas.
    pub rust_log: String,
    /// Copy the replicas' stderr to ours, each line prefixed `[rN]`.
    pub forward_stderr: bool,
    /// Where to put configs, data and nginx's prefix; `None` = a temporary
    /// directory removed on drop.
    pub dir: Option<PathBuf>,
    /// Drop `pg_url`'s database through this admin URL on drop.
    pub drop_database_via: Option<String>,
    /// Tests of the balancer alone: without `pg_url`, N sled servers each
    /// with a `data_dir` of its own. They share nothing, so only requests
    /// that need no shared state mean anything through the balancer.
    pub independent_sled: bool,
    /// Run this `ota-server` binary instead of the workspace's (checkin-bench
    /// `--baseline-bin`: an older build measured side by side). It gets no
    /// `[connections]` section, which older builds do not know.
    pub server_bin: Option<PathBuf>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            pg_url: None,
            redis_url: None,
            key_prefix: "ota".into(),
            pool_size: 16,
            admin_token: "2c5db9e8d9964cd1c3b3eb62b3d9b138".into(),
            enrollment_key: "50fd572d3c1732d859ef819f434180ec".into(),
            signing_key: None,
            top_level: String::new(),
            sections: String::new(),
            balancer: true,
            nginx_workers: 1,
            rust_log: "warn".into(),
            forward_stderr: true,
            dir: None,
            drop_database_via: None,
            independent_sled: false,
            server_bin: None,
        }
    }
}

struct Replica {
    proc: Mutex<ServerProc>,
    pid: Arc<AtomicU32>,
    addr: SocketAddr,
}

/// N replicas, optionally behind nginx. See the module docs.
pub struct Cluster {
    replicas: Vec<Replica>,
    nginx: Option<Balancer>,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    opts: ClusterOpts,
}

impl Cluster {
    /// Starts `n` replicas (the first alone: it runs the migrations; then
    /// the others together) and nginx in front of them. On failure every
    /// process started is stopped (and the database dropped, if asked).
    pub fn start(n: usize, opts: ClusterOpts) -> Result<Cluster> {
        let cleanup = (opts.drop_database_via.clone(), opts.pg_url.clone());
        let r = Self::start_inner(n, opts);
        if r.is_err()
            && let (Some(admin), Some(db)) = cleanup
        {
            drop_database_blocking(admin, db);
        }
        r
    }

    fn start_inner(n: usize, opts: ClusterOpts) -> Result<Cluster> {
        if n == 0 {
            bail!("a cluster needs at least one replica");
        }
        if opts.pg_url.is_none() && n > 1 && !opts.independent_sled {
            bail!(
                "{n} replicas need storage.backend = \"postgres\": sled is one process (pass a PostgreSQL URL)"
            );
        }
        if opts.pg_url.is_none() && opts.redis_url.is_some() {
            bail!("a Redis throttle needs the postgres backend (the server refuses sled + redis)");
        }
        let (tmp, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("ota-cluster-").tempdir()?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let data_of = |i: usize| -> PathBuf {
            if opts.independent_sled && i > 0 {
                dir.join(format!("data-r{i}"))
            } else {
                data.clone()
            }
        };
        let key = match &opts.signing_key {
            Some(k) => k.clone(),
            None => {
                let k = dir.join("signing.key");
                let pair = ota_format::SigningKeyPair::generate()?;
                std::fs::write(&k, pair.to_pem()?)?;
                k
            }
        };
        let body = |i: usize| -> String {
            let mut s = format!(
                "data_dir = {:?}\nadmin_token = {:?}\nenrollment_key = {:?}\nsigning_key = {:?}\n{}\n",
                data_of(i).display().to_string(),
                opts.admin_token,
                opts.enrollment_key,
                key.display().to_string(),
                opts.top_level.trim_end()
            );
            if let Some(pg) = &opts.pg_url {
                s += &format!(
                    "[storage]\nbackend = \"postgres\"\nurl = {pg:?}\npool_size = {}\nreplica_id = \"r{i}\"\n",
                    opts.pool_size
                );
            }
            // The section is always written: the key prefix is harmless with
            // the local throttle, and some server versions require it.
            match &opts.redis_url {
                Some(redis) => {
                    s += &format!(
                        "[throttle]\nbackend = \"redis\"\nurl = {redis:?}\nkey_prefix = {:?}\n",
                        opts.key_prefix
                    )
                }
                None => {
                    s += &format!(
                        "[throttle]\nbackend = \"local\"\nkey_prefix = {:?}\n",
                        opts.key_prefix
                    )
                }
            }
            // Every test client comes from loopback, and behind nginx (or
            // the load test's fault proxy) from one address: the
            // per-address cap is for the open internet, as in
            // deploy/examples/nginx.conf.
            if opts.server_bin.is_none() {
                s += "[connections]\nmax_connections_per_address = 0\n";
            }
            s += &opts.sections;
            s
        };
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let start_one = |i: usize| -> Result<ServerProc> {
            ServerProc::start(
                &dir.join(format!("r{i}.toml")),
                any,
                &body(i),
                &format!("r{i}"),
                &opts.rust_log,
                opts.forward_stderr,
                opts.server_bin.as_deref(),
            )
        };
        let mut procs = vec![start_one(0)?];
        if let Some(pg) = &opts.pg_url {
            // The first replica migrated the database before it listened: a
            // server that ignores storage.backend would leave it empty and
            // quietly run on sled in the shared data_dir.
            let pg = pg.clone();
            let tables =
                crate::services::block_on(async move { crate::services::user_tables(&pg).await })?;
            if tables == 0 {
                bail!(
                    "r0 listens but created no table in {}: does this ota-server support storage.backend = \"postgres\"?",
                    opts.pg_url.as_deref().unwrap_or_default()
                );
            }
        }
        let rest: Vec<Result<ServerProc>> = std::thread::scope(|s| {
            let hs: Vec<_> = (1..n).map(|i| s.spawn(move || start_one(i))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("a start thread panicked"))
                .collect()
        });
        for r in rest {
            procs.push(r?);
        }
        let replicas: Vec<Replica> = procs
            .into_iter()
            .map(|p| Replica {
                pid: p.pid.clone(),
                addr: p.addr,
                proc: Mutex::new(p),
            })
            .collect();
        let mut c = Cluster {
            replicas,
            nginx: None,
            dir,
            _tmp: tmp,
            opts,
        };
        if c.opts.balancer {
            let ups: Vec<SocketAddr> = c.replicas.iter().map(|r| r.addr).collect();
            c.nginx = Some(Balancer::start(
                &c.dir.join("nginx"),
                &ups,
                c.opts.nginx_workers,
            )?);
        }
        Ok(c)
    }

    /// Where devices and the admin client go: nginx, or replica 0 without
    /// a balancer.
    pub fn lb_url(&self) -> String {
        format!("http://{}", self.lb_addr())
    }

    pub fn lb_addr(&self) -> SocketAddr {
        match &self.nginx {
            Some(n) => n.addr,
            None => self.replicas[0].addr,
        }
    }

    pub fn replica_url(&self, i: usize) -> String {
        format!("http://{}", self.replicas[i].addr)
    }

    pub fn replica_addr(&self, i: usize) -> SocketAddr {
        self.replicas[i].addr
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The cluster's directory (configs, `data/`, `nginx/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn opts(&self) -> &ClusterOpts {
        &self.opts
    }

    /// kill -9 of replica `i`.
    pub fn kill9(&self, i: usize) -> Result<()> {
        self.replicas[i].proc.lock().unwrap().kill9()
    }

    /// Starts replica `i` again (kill -9 first if it runs), same address.
    pub fn restart(&self, i: usize) -> Result<()> {
        self.replicas[i].proc.lock().unwrap().restart()
    }

    /// Starts replica `i` again after [`Self::kill9`] (no-op if it runs).
    pub fn start_again(&self, i: usize) -> Result<()> {
        self.replicas[i].proc.lock().unwrap().start_again()
    }

    /// Each replica's pid (`None` while it is down).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.replicas
            .iter()
            .map(|r| Some(r.pid.load(Ordering::Relaxed)).filter(|&p| p != 0))
            .collect()
    }

    /// nginx's master and worker pids.
    pub fn nginx_pids(&self) -> Vec<u32> {
        self.nginx.as_ref().map_or_else(Vec::new, |n| n.pids())
    }

    /// The end of nginx's error log (for failure messages).
    pub fn nginx_error_log(&self) -> String {
        self.nginx
            .as_ref()
            .map_or_else(String::new, |n| n.error_tail())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(n) = self.nginx.take() {
            drop(n);
        }
        for r in &self.replicas {
            let _ = r.proc.lock().map(|mut p| p.kill9());
        }
        if let (Some(admin), Some(db)) = (
            self.opts.drop_database_via.clone(),
            self.opts.pg_url.clone(),
        ) {
            drop_database_blocking(admin, db);
        }
    }
}

fn drop_database_blocking(admin: String, db: String) {
    let r =
        crate::services::block_on(async move { crate::services::drop_database(&admin, &db).await });
    if let Err(e) = r {
        eprintln!("cluster: dropping the test database: {e:#}");
    }
}

/// nginx as a child process, in a prefix directory of its own, balancing
/// over a list of upstreams (see [`nginx_conf`] for the configuration).
pub struct Balancer {
    child: Option<Child>,
    prefix: PathBuf,
    addr: SocketAddr,
}

/// Highest open-files limit we may give nginx's workers.
fn nofile_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 1024;
    }
    // Even root may not raise the hard limit (containers without
    // CAP_SYS_RESOURCE): stay within it.
    l.rlim_max.min(65536)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The temp-path directives of the modules this nginx was built with
/// (nginx creates every compiled-in module's temp directory at start-up,
/// under /var/lib/nginx by default, which a non-root user may not write).
fn temp_path_directives(nginx: &Path, prefix: &Path) -> Result<String> {
    let out = Command::new(nginx)
        .arg("-V")
        .output()
        .with_context(|| format!("running {} -V", nginx.display()))?;
    let v =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let mut s = String::new();
    for (module, directive) in [
        ("client_body", "client_body_temp_path"),
        ("http_proxy", "proxy_temp_path"),
        ("http_fastcgi", "fastcgi_temp_path"),
        ("http_uwsgi", "uwsgi_temp_path"),
        ("http_scgi", "scgi_temp_path"),
    ] {
        if v.contains(&format!("--without-{module}_module")) {
            continue;
        }
        let d = prefix
            .join("temp")
            .join(directive.trim_end_matches("_temp_path"));
        s += &format!("    {directive} {};\n", d.display());
    }
    Ok(s)
}

/// nginx.conf for a balancer on `port` in front of `upstreams`.
///
/// - `max_fails=1 fail_timeout=2s`: a dead replica is skipped after one
///   failed attempt, retried after 2 s;
/// - `proxy_next_upstream error timeout http_502 non_idempotent`: a request
///   that hits a dead replica goes to the next one, POSTs included (device
///   check-ins are idempotent and events are deduplicated by (device, seq));
/// - device API bodies are small and buffered (the default), so nginx can
///   always resend a POST to the next replica (it cannot resend an
///   unbuffered body it has started to send, though it reads a small body
///   that came with the headers whole either way); release uploads, the one
///   large request body, stream (`proxy_request_buffering off`);
/// - responses stream (`proxy_buffering off`): artifact Range downloads go
///   straight through;
/// - HTTP/1.1 keep-alive to the replicas (`keepalive 64`, closed by nginx
///   before the server's own idle timeout).
fn nginx_conf(
    prefix: &Path,
    port: u16,
    upstreams: &[SocketAddr],
    workers: usize,
    temp_paths: &str,
) -> String {
    let nofile = nofile_limit();
    let conns = nofile.saturating_sub(64).clamp(1024, 16384);
    let user = if is_root() {
        // Workers must reach the prefix (a private temporary directory) and
        // their temp paths; without `user` a root master runs them as nobody.
        "user root;\n"
    } else {
        ""
    };
    let servers: String = upstreams
        .iter()
        .map(|a| format!("        server {a} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    let p = prefix.display();
    let tries = upstreams.len().max(1);
    format!(
        r#"# Generated by ota-tests (tests/src/cluster.rs).
{user}worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {p}/nginx.pid;
error_log {p}/error.log warn;

events {{
    worker_connections {conns};
    multi_accept on;
}}

http {{
    log_format upstream '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                        'upstream=$upstream_addr upstream_status=$upstream_status '
                        'rt=$request_time urt=$upstream_response_time';
    access_log {p}/access.log upstream buffer=256k flush=2s;
{temp_paths}
    server_tokens off;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    client_max_body_size 0;
    client_body_buffer_size 64k;
    send_timeout 120s;

    upstream ota {{
{servers}        keepalive 64;
        keepalive_requests 100000;
        keepalive_timeout 20s;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_next_upstream error timeout http_502 non_idempotent;
        proxy_next_upstream_tries {tries};
        proxy_next_upstream_timeout 15s;
        proxy_connect_timeout 2s;
        proxy_send_timeout 120s;
        proxy_read_timeout 120s;
        proxy_buffering off;
        proxy_buffer_size 64k;
        proxy_buffers 4 64k;
        proxy_busy_buffers_size 128k;

        # Release images: streamed to the replica as they arrive. (No
        # trailing slash: nginx would redirect the list, /api/v1/admin/releases.)
        location ^~ /api/v1/admin/releases {{
            proxy_request_buffering off;
            proxy_pass http://ota;
        }}

        location / {{
            proxy_pass http://ota;
        }}
    }}
}}
"#
    )
}

impl Balancer {
    /// Starts nginx with `prefix` as its directory (config, logs, pid,
    /// temp files) in front of `upstreams`; returns once it accepts
    /// connections.
    pub fn start(prefix: &Path, upstreams: &[SocketAddr], workers: usize) -> Result<Balancer> {
        let bin = crate::services::nginx_bin().context(
            "nginx not found (it is the cluster's load balancer): apt-get install nginx-light",
        )?;
        std::fs::create_dir_all(prefix.join("temp"))?;
        let temp_paths = temp_path_directives(&bin, prefix)?;
        // The port is picked here and bound by nginx: retry on a clash.
        let mut last = None;
        for _ in 0..3 {
            let port = free_port()?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(
                &conf,
                nginx_conf(prefix, port, upstreams, workers.max(1), &temp_paths),
            )?;
            let _ = std::fs::remove_file(prefix.join("error.log"));
            let child = Command::new(&bin)
                .arg("-p")
                .arg(prefix)
                .arg("-e")
                .arg(prefix.join("error.log"))
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let mut n = Balancer {
                child: Some(child),
                prefix: prefix.to_path_buf(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            match n.wait_ready() {
                Ok(()) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "nginx exited ({st}); {}:\n{}",
                    self.prefix.join("error.log").display(),
                    self.error_tail()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "nginx did not listen on {} in 10 s; error.log:\n{}",
                    self.addr,
                    self.error_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The end of its error log.
    pub fn error_tail(&self) -> String {
        let log = std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// Master and workers.
    pub fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.as_ref().map(|c| c.id()) else {
            return Vec::new();
        };
        let mut v = vec![master];
        v.extend(children_of(master));
        v
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = c.id();
        let workers = children_of(pid);
        // SIGTERM: fast shutdown, the master stops its workers.
        // SAFETY: kill with a pid we own (our child, not yet reaped).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        for w in workers {
            // Only if it still is a worker of that (now gone) master.
            if std::fs::read_to_string(format!("/proc/{w}/cmdline"))
                .is_ok_and(|c| c.contains("nginx"))
            {
                // SAFETY: plain kill of a process we started (an nginx worker).
                unsafe {
                    libc::kill(w as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// Pids whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A free loopback port (bound and released: the caller binds it soon).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One plain HTTP/1.1 GET (tests of the balancer itself): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {buf:?}"))?;
    let body = buf.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    Ok((status, body))
}
