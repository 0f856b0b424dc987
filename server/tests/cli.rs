//! The `ota-server` command line as an operator meets it: the real binary,
//! against a real server on 127.0.0.1 where one is needed. Help on every
//! option, errors that neither repeat their cause nor list env-backed
//! options as missing, plain logs when redirected, human output of the
//! admin commands, and one clear error for a second server on a data
//! directory.

mod common;

use std::process::{Command, Output};

use common::*;
use ota_format::api::AgentState;

fn ota(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ota-server"));
    c.args(args)
        .env_remove("OTA_SERVER")
        .env_remove("OTA_ADMIN_TOKEN");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs an admin subcommand against `ts` with the connection from the
/// environment, as the README sets it up; returns (stdout, stderr).
fn admin(ts: &TestServer, args: &[&str]) -> (String, String) {
    let o = ota(
        args,
        &[("OTA_SERVER", &ts.base), ("OTA_ADMIN_TOKEN", ADMIN)],
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "ota-server {args:?}: {err}");
    (out, err)
}

const SUBCOMMANDS: &[&[&str]] = &[
    &["keygen"],
    &["delta"],
    &["serve"],
    &["device", "add"],
    &["device", "list"],
    &["device", "show"],
    &["device", "retire"],
    &["release", "add"],
    &["release", "list"],
    &["release", "delete"],
    &["rollout", "create"],
    &["rollout", "status"],
    &["rollout", "pause"],
    &["group", "create"],
    &["group", "list"],
    &["group", "show"],
    &["group", "delete"],
    &["device", "history"],
    &["user", "add"],
    &["user", "list"],
    &["user", "delete"],
    &["audit", "list"],
];

#[test]
fn every_option_and_argument_has_help_text() {
    let mut missing = Vec::new();
    for sub in SUBCOMMANDS {
        let mut args = sub.to_vec();
        args.push("-h");
        let o = ota(&args, &[]);
        assert!(o.status.success(), "{sub:?} -h");
        let help = text(&o.stdout);
        // An argument line starts with `-` or `<`; its help follows on the
        // same line after two spaces, or (clap's layout when lines are
        // long) on the next, further indented lines.
        let mut in_args = false;
        let mut pending: Option<String> = None;
        for line in help.lines() {
            if line.ends_with(':') && !line.starts_with(' ') {
                in_args = line == "Arguments:" || line == "Options:";
                continue;
            }
            if !in_args || line.trim().is_empty() {
                continue;
            }
            let t = line.trim();
            if t.starts_with('-') || t.starts_with('<') {
                if let Some(p) = pending.take() {
                    missing.push(format!("{}: {p}", sub.join(" ")));
                }
                let cols = t.split("  ").filter(|c| !c.trim().is_empty()).count();
                if cols < 2 {
                    pending = Some(t.to_string());
                }
            } else {
                pending = None;
            }
        }
        if let Some(p) = pending {
            missing.push(format!("{}: {p}", sub.join(" ")));
        }
    }
    assert!(
        missing.is_empty(),
        "options without help:\n{}",
        missing.join("\n")
    );
}

#[test]
fn a_missing_argument_error_does_not_list_env_backed_connection_options() {
    let o = ota(&["device", "add", "--type", "rpi4"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("--id"), "{err}");
    assert!(
        !err.contains("--server") && !err.contains("--admin-token"),
        "{err}"
    );
}

#[test]
fn an_error_names_its_cause_once() {
    let o = ota(&["serve", "--config", "/nonexistent/server.toml"], &[]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert!(err.contains("/nonexistent/server.toml"), "{err}");
}

#[test]
fn redirected_logs_carry_no_colour_codes() {
    // A warning (the signing key is group-readable) logged to a pipe.
    let dir = tempfile::tempdir().unwrap();
    assert!(
        ota(&["keygen", "--out", dir.path().to_str().unwrap()], &[])
            .status
            .success()
    );
    let key = dir.path().join("ota-signing.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = ota(
        &[
            "delta",
            "--to",
            "/nonexistent.img",
            "--to-version",
            "2",
            "--key",
            key.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    let err = text(&o.stderr);
    assert!(err.contains("chmod 600"), "no warning logged: {err}");
    assert!(
        !err.contains('\x1b'),
        "ANSI codes in a redirected log: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_gets_one_clear_error() {
    let ts = TestServer::start(&fast_checkin(5000)).await;
    let cfg = ts.dir.path().join("server.toml");
    let second = ota_server::app::start(
        ota_server::config::ServerConfig::load(&cfg).unwrap(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let Err(e) = second else {
        panic!("a second server opened the same sled database");
    };
    let msg = ota_format::term::error_chain(e.as_ref());
    assert!(msg.contains("another ota-server uses"), "{msg}");
    assert!(msg.contains("data"), "{msg}");
    assert!(
        !msg.to_lowercase().contains("resource temporarily"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_speak_human_with_json_on_request() {
    let ts = TestServer::start(&fast_checkin(5000)).await;
    let (out, _) = admin(&ts, &["rollout", "list"]);
    assert!(out.contains("no rollouts yet"), "{out}");
    let (out, _) = admin(&ts, &["release", "list"]);
    assert!(out.contains("no releases yet"), "{out}");

    // release add --wait, not on a terminal: one line per finished build.
    let img = ts.dir.path().join("v1.img");
    std::fs::write(&img, image(16, 1)).unwrap();
    let (_, err) = admin(
        &ts,
        &[
            "release",
            "add",
            "--version",
            "1.0",
            "--device-type",
            "t",
            "--image",
            img.to_str().unwrap(),
            "--wait",
        ],
    );
    assert!(
        err.contains("full image") && err.contains("ready:"),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "{err:?}");

    let d = Sim::enroll(&ts.base, "dev-1", "t", &http()).await;
    d.checkin("1.0", AgentState::Idle, None).await;
    Sim::enroll(&ts.base, "dev-2", "t", &http()).await;
    let (out, _) = admin(&ts, &["device", "list", "--type", "t"]);
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains("dev-1") && out.contains("s ago"), "{out}");
    assert!(
        out.contains("never") && out.contains("2 matching devices"),
        "{out}"
    );
    let (out, _) = admin(&ts, &["device", "list", "--state", "never", "--json"]);
    let page: ota_server::inventory::DevicePage = serde_json::from_str(&out).unwrap();
    assert_eq!(page.devices.len(), 1);
    assert_eq!(page.devices[0].id, "dev-2");

    let (out, _) = admin(&ts, &["device", "show", "dev-1"]);
    assert!(out.contains("last seen") && out.contains("s ago)"), "{out}");
    assert!(!out.contains("last_seen_ms"), "{out}");
    let (out, _) = admin(&ts, &["device", "show", "dev-1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["last_seen_ms"].as_u64().unwrap() > 0);

    admin(&ts, &["device", "retire", "dev-2"]);
    let (out, _) = admin(&ts, &["device", "list"]);
    assert!(!out.contains("dev-2"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn release_add_format_swu_stores_the_bundle_as_is_with_its_hashes() {
    let ts = TestServer::start("").await;
    let p = ts.dir.path().join("fw.swu");
    // Not a multiple of 4096: an image release would refuse it.
    std::fs::write(&p, b"070701 not really a cpio, stored as is").unwrap();
    let path = p.to_str().unwrap();
    let args = [
        "release",
        "add",
        "--device-type",
        "swt",
        "--version",
        "2.0.0",
        "--format",
        "swu",
        "--artifact",
        path,
        "--filename",
        "fw-2.0.0.swu",
    ];
    let (out, _) = admin(&ts, &args);
    // sha1 of the bytes above, computed independently.
    use sha1::Digest as _;
    let sha1 = hex::encode(sha1::Sha1::digest(std::fs::read(&p).unwrap()));
    assert!(out.contains("fw-2.0.0.swu") && out.contains(&sha1), "{out}");
    let r = ts.admin.releases().await.unwrap();
    let b = r[0].bundle.as_ref().expect("an opaque release");
    assert_eq!((b.size, b.sha1.as_str()), (38, sha1.as_str()));
    assert_eq!(r[0].builds.len(), 1, "no deltas");
    // A bundle with --image is refused by the CLI before any upload.
    let o = ota(
        &[
            "release",
            "add",
            "--device-type",
            "swt",
            "--version",
            "2.0.1",
            "--image",
            path,
            "--artifact",
            path,
            "--format",
            "swu",
        ],
        &[("OTA_SERVER", &ts.base), ("OTA_ADMIN_TOKEN", ADMIN)],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("cannot be used with"),
        "{}",
        text(&o.stderr)
    );
}

/// Issue 15: `group create|list|show|delete` and `rollout create --group`
/// through the real binary.
#[tokio::test(flavor = "multi_thread")]
async fn group_commands_save_a_selector_a_rollout_can_target() {
    let ts = TestServer::with_two_releases(5000).await;
    let (out, _) = admin(
        &ts,
        &[
            "group",
            "create",
            "kiosks",
            "--device-type",
            "t",
            "--selector",
            "site=lab",
        ],
    );
    assert!(out.contains("kiosks") && out.contains("site=lab"), "{out}");
    let (out, _) = admin(&ts, &["group", "list"]);
    assert!(out.starts_with("NAME") && out.contains("kiosks"), "{out}");
    let (out, _) = admin(&ts, &["group", "show", "kiosks"]);
    assert!(out.contains("site=lab"), "{out}");
    let o = ota(
        &["group", "create", "kiosks", "--device-type", "t"],
        &[("OTA_SERVER", &ts.base), ("OTA_ADMIN_TOKEN", ADMIN)],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("exists already"),
        "{}",
        text(&o.stderr)
    );

    let (id, _) = admin(
        &ts,
        &[
            "rollout",
            "create",
            "--release",
            "2.0",
            "--group",
            "kiosks",
            "--max-concurrent",
            "5",
            "--max-starts-per-min",
            "60",
        ],
    );
    let id = id.trim();
    let st = ts.status(id).await;
    assert_eq!(st.spec.group.as_deref(), Some("kiosks"));
    assert_eq!(
        st.spec.selector.get("site").map(String::as_str),
        Some("lab")
    );
    let (out, _) = admin(&ts, &["rollout", "status", id]);
    assert!(out.contains("of t (group kiosks) to 2.0"), "{out}");

    let o = ota(
        &["group", "delete", "kiosks"],
        &[("OTA_SERVER", &ts.base), ("OTA_ADMIN_TOKEN", ADMIN)],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains(&format!("ota-server rollout abort {id}")),
        "{}",
        text(&o.stderr)
    );
    admin(&ts, &["rollout", "abort", id]);
    let (out, _) = admin(&ts, &["group", "delete", "kiosks"]);
    assert!(out.contains("deleted group kiosks"), "{out}");
}

/// Issue 15: `--start-at` (with its offset, or `+DURATION`), `--wave-offsets`
/// and `--ramp-max` reach the spec, and `rollout status` says on its `next:`
/// line what the rollout waits for; a time without an offset is refused.
#[tokio::test(flavor = "multi_thread")]
async fn rollout_create_schedules_a_start_and_wave_offsets() {
    let ts = TestServer::with_two_releases(5000).await;
    let create = |extra: &[&str]| {
        let mut args = vec![
            "rollout",
            "create",
            "--release",
            "2.0",
            "--device-type",
            "t",
            "--waves",
            "10,100",
            "--max-concurrent",
            "5",
            "--max-starts-per-min",
            "60",
        ];
        args.extend_from_slice(extra);
        ota(
            &args,
            &[("OTA_SERVER", &ts.base), ("OTA_ADMIN_TOKEN", ADMIN)],
        )
    };
    let o = create(&["--start-at", "2026-12-03T02:00:00"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("with an offset"),
        "{}",
        text(&o.stderr)
    );
    let o = create(&["--wave-offsets", "0s,6h,1d"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("one per wave"),
        "{}",
        text(&o.stderr)
    );
    assert!(ts.admin.rollouts().await.unwrap().is_empty());

    let before = ota_server::now_ms();
    let o = create(&[
        "--start-at",
        "+2h",
        "--wave-offsets",
        "0s,1d",
        "--ramp-factor",
        "2",
        "--ramp-max",
        "500",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let id = text(&o.stdout).trim().to_string();
    let st = ts.status(&id).await;
    let at = st.spec.start_at_ms.unwrap();
    assert!(
        (before + 7_200_000..before + 7_300_000).contains(&at),
        "{at}"
    );
    assert_eq!(st.spec.wave_offsets_ms, vec![0, 86_400_000]);
    assert_eq!(st.spec.ramp_max_per_min, Some(500.0));
    let (out, _) = admin(&ts, &["rollout", "status", &id]);
    assert!(out.contains("scheduled: starts at "), "{out}");
    assert!(out.contains("next: the rollout starts at "), "{out}");
}
