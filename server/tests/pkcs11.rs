//! Signing keys in a PKCS#11 token (issue 17 item 5), tested against
//! Debian's SoftHSM2 as the module: manifests and freshness statements
//! signed in the token verify on devices, a wrong PIN or a missing key is a
//! clear start-up error, and the key-rotation drill of docs/operations.md
//! runs end to end (two keys trusted with threshold 1, switch, retire).
//!
//! Needs `softhsm2` (`apt-get install softhsm2`). Without it the tests say
//! so and pass, except under `CI=true`, where they fail: CI installs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use common::*;
use ota_format::api::AgentState;
use ota_format::{Envelope, EnvelopeError, Freshness, TrustedKeys};
use ota_server::signing::{Pkcs11Config, destroy_in_token, generate_in_token};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "ota-test";
const PIN: &str = "246810";

struct Hsm {
    _dir: tempfile::TempDir,
    pin_file: PathBuf,
}

/// One SoftHSM2 token for this test process: the module reads
/// `SOFTHSM2_CONF` once, at `C_Initialize`, so every test shares it (each
/// with its own key labels).
fn hsm() -> Option<&'static Hsm> {
    static HSM: OnceLock<Option<Hsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        let util = Command::new("softhsm2-util").arg("--version").output();
        if !Path::new(MODULE).exists() || util.is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "softhsm2 is missing ({MODULE}, softhsm2-util): CI must install it (apt-get install softhsm2)"
            );
            eprintln!("SKIPPED: softhsm2 is not installed (apt-get install softhsm2)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        // SAFETY: set once, inside the OnceLock initialiser, before any
        // thread of this process loads the module (which reads it).
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", TOKEN, "--so-pin", "13579135", "--pin", PIN])
            .output()
            .expect("running softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        Some(Hsm {
            _dir: dir,
            pin_file,
        })
    })
    .as_ref()
}

fn token_cfg(h: &Hsm, labels: &[&str]) -> Pkcs11Config {
    Pkcs11Config {
        pkcs11_module: MODULE.into(),
        token_label: TOKEN.into(),
        key_labels: labels.iter().map(|l| l.to_string()).collect(),
        pin_file: Some(h.pin_file.clone()),
        pin_env: None,
    }
}

fn signing_section(h: &Hsm, labels: &[&str]) -> String {
    let labels: Vec<String> = labels.iter().map(|l| format!("{l:?}")).collect();
    format!(
        "[signing]\npkcs11_module = {MODULE:?}\ntoken_label = {TOKEN:?}\nkey_labels = [{}]\npin_file = {:?}\n",
        labels.join(", "),
        h.pin_file
    )
}

/// Rewrites the test server's config: no key file, the token keys `labels`.
fn use_token_only(ts: &TestServer, h: &Hsm, labels: &[&str], extra: &str) {
    let cfg = ts.dir.path().join("server.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut out: String = text
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with("signing_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(extra);
    out.push_str(&signing_section(h, labels));
    std::fs::write(cfg, out).unwrap();
}

/// Starts a server whose only signing keys are `labels` in the token.
async fn token_server(h: &Hsm, labels: &[&str]) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:0", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("signing_key = \"signing.key\"\n", "");
    std::fs::write(
        &cfg,
        format!("{text}{}{}", fast_checkin(5000), signing_section(h, labels)),
    )
    .unwrap();
    let config = ota_server::config::ServerConfig::load(&cfg).unwrap();
    let running = ota_server::app::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let base = format!("http://{}", running.addr);
    TestServer {
        admin: ota_server::client::AdminClient::new(&base, ADMIN).unwrap(),
        running: Some(running),
        base,
        dir,
    }
}

/// The signed manifest of the full-image build of `version`.
async fn manifest_of(ts: &TestServer, version: &str) -> Vec<u8> {
    let rel = ts.admin.releases().await.unwrap();
    let r = rel.iter().find(|r| r.version == version).unwrap();
    let full = r
        .builds
        .iter()
        .find(|b| b.from_version.is_none())
        .and_then(|b| b.artifacts.clone())
        .unwrap();
    http()
        .get(format!(
            "{}/api/v1/artifacts/{}",
            ts.base, full.manifest_sha256
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

async fn reload(ts: &TestServer) -> reqwest::Response {
    http()
        .post(format!("{}/api/v1/admin/reload", ts.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_freshness_statements_are_signed_in_the_token() {
    let Some(h) = hsm() else { return };
    let public = generate_in_token(&token_cfg(h, &[]), "build-key").unwrap();
    let ts = token_server(h, &["build-key"]).await;
    ts.release("t", "1.0", &image(16, 1)).await;
    let trusted = TrustedKeys::try_new([public], 1).unwrap();
    let m = Envelope::open(&manifest_of(&ts, "1.0").await, &trusted, SystemTime::now())
        .expect("a manifest signed in the token verifies with the token's public key");
    assert_eq!(m.to.version, "1.0");
    // Not by some other key.
    let other = ota_format::SigningKeyPair::generate().unwrap();
    let wrong = TrustedKeys::try_new([other.verifying_key()], 1).unwrap();
    assert!(matches!(
        Envelope::open(&manifest_of(&ts, "1.0").await, &wrong, SystemTime::now()),
        Err(EnvelopeError::UntrustedSigner { .. })
    ));
    // The check-in answer carries a statement signed in the token too.
    let dev = Sim::enroll(&ts.base, "d1", "t", &http()).await;
    let r = dev.checkin("0", AgentState::Idle, None).await;
    let f = Freshness::open(
        r.freshness.as_ref().expect("a freshness statement"),
        &trusted,
    )
    .unwrap();
    assert_eq!(f.device_type, "t");
    assert_eq!(f.latest_version.as_deref(), Some("1.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_or_missing_key_fails_the_start_with_a_clear_error() {
    let Some(h) = hsm() else { return };
    generate_in_token(&token_cfg(h, &[]), "pin-key").unwrap();
    // A missing key names itself and what to do.
    let err = ota_server::signing::Signers::open(None, Some(&token_cfg(h, &["no-such-key"])))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no-such-key") && err.contains("not in the token"),
        "{err}"
    );
    // A wrong PIN, in a process of its own (PKCS#11 login state is per
    // process and token: this process is already logged in). The real
    // binary, through `token-keygen`, which logs in the same way.
    let dir = tempfile::tempdir().unwrap();
    let bad_pin = dir.path().join("bad-pin");
    std::fs::write(&bad_pin, "000000\n").unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:0", "");
    let mut section = signing_section(h, &["pin-key"]);
    section = section.replace(&format!("{:?}", h.pin_file), &format!("{bad_pin:?}"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}{section}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ota-server"))
        .args(["token-keygen", "--label", "never", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.path().join("never.pub"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("wrong PIN"), "{err}");
    assert!(!err.contains("000000"), "the PIN is never printed: {err}");
    // A wrong token label lists the tokens there are.
    let mut cfg = token_cfg(h, &["pin-key"]);
    cfg.token_label = "nope".into();
    let err = ota_server::signing::Signers::open(None, Some(&cfg))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(TOKEN), "{err}");
    // Keys are generated once per label.
    assert!(generate_in_token(&token_cfg(h, &[]), "pin-key").is_err());
}

/// The drill of docs/operations.md, "Rotating the signing key".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_drill_switch_then_retire() {
    let Some(h) = hsm() else { return };
    let old = generate_in_token(&token_cfg(h, &[]), "rot-2026").unwrap();
    let ts = token_server(h, &["rot-2026"]).await;
    ts.release("t", "1.0", &image(16, 1)).await;

    // 1. A new key in the token; devices trust both, threshold 1.
    let new = generate_in_token(&token_cfg(h, &[]), "rot-2027").unwrap();
    let both = TrustedKeys::try_new([old, new], 1).unwrap();
    // 2. The server signs with both (new first), by reload, no restart.
    use_token_only(&ts, h, &["rot-2027", "rot-2026"], &fast_checkin(5000));
    let r = reload(&ts).await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    ts.release("t", "2.0", &image(16, 2)).await;
    // 3. Switch: the new key alone.
    use_token_only(&ts, h, &["rot-2027"], &fast_checkin(5000));
    assert!(reload(&ts).await.status().is_success());
    ts.release("t", "3.0", &image(16, 3)).await;
    let now = SystemTime::now();
    let (m1, m2, m3) = (
        manifest_of(&ts, "1.0").await,
        manifest_of(&ts, "2.0").await,
        manifest_of(&ts, "3.0").await,
    );
    assert_eq!(Envelope::from_json(&m2).unwrap().signatures.len(), 2);
    assert_eq!(Envelope::from_json(&m3).unwrap().signatures.len(), 1);
    for m in [&m1, &m2, &m3] {
        Envelope::open(m, &both, now).expect("devices trusting both keys accept every release");
    }
    // 4. Retire: devices drop the old key from their config. What only the
    // retired key signed is refused; what the new key signed is accepted.
    let new_only = TrustedKeys::try_new([new], 1).unwrap();
    assert!(
        matches!(
            Envelope::open(&m1, &new_only, now),
            Err(EnvelopeError::UntrustedSigner { .. })
        ),
        "a manifest signed only by the retired key must be refused"
    );
    Envelope::open(&m2, &new_only, now).unwrap();
    Envelope::open(&m3, &new_only, now).unwrap();
    // 5. The old key leaves the token; a server configured with it now
    // refuses to reload (and keeps signing with the new key).
    assert_eq!(destroy_in_token(&token_cfg(h, &[]), "rot-2026").unwrap(), 2);
    use_token_only(&ts, h, &["rot-2026"], &fast_checkin(5000));
    let r = reload(&ts).await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("rot-2026"));
    assert_eq!(
        ts.app().signers.load().keyids(),
        vec![ota_format::envelope::key_id(&new)]
    );
}
