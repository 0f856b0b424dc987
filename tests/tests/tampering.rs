//! Attacks and accidents on the offline apply path. Each test is named after
//! what it tries; each must fail with its own clear error and leave nothing at
//! `--out` (no half-written image, no temporary file).

use std::path::Path;
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ota_format::{Envelope, SigningKeyPair};
use ota_tests::{Update, images, set_arg};

/// One update shared by every test (building it is the slow part); each test
/// copies what it tampers with.
fn update() -> &'static Update {
    static U: OnceLock<Update> = OnceLock::new();
    U.get_or_init(|| {
        let old = images::base(2 << 20, 99);
        let new = images::next_version(&old);
        Update::build(Some(&old), &new, &[])
    })
}

/// Runs apply with `tweak`, asserts failure mentioning every one of `want`,
/// and that no output or temporary file was left behind.
fn refused(tweak: impl FnOnce(&mut Vec<std::ffi::OsString>, &Path), want: &[&str]) {
    let u = update();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.img");
    let r = u.apply(&out, |args| tweak(args, work.path()));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "apply succeeded on tampered input");
    for w in want {
        assert!(stderr.contains(w), "error does not mention {w:?}: {stderr}");
    }
    assert!(!out.exists(), "a file was left at --out");
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ota-apply-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn copy_to(dir: &Path, name: &str, from: &Path) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::copy(from, &p).unwrap();
    p
}

fn signing_key() -> SigningKeyPair {
    SigningKeyPair::from_pem(
        &std::fs::read_to_string(update().path("keys/ota-signing.key")).unwrap(),
    )
    .unwrap()
}

/// Decodes the signed manifest, lets `f` change it, and re-encodes it —
/// re-signed with `keys` (none: keep the original signatures).
fn rewrite_manifest(
    dir: &Path,
    keys: &[&SigningKeyPair],
    f: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let env: Envelope =
        serde_json::from_slice(&std::fs::read(update().path("update/manifest.json")).unwrap())
            .unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&env.manifest_json_unverified().unwrap()).unwrap();
    f(&mut m);
    let bytes = serde_json::to_vec(&m).unwrap();
    let new_env = if keys.is_empty() {
        Envelope {
            payload: B64.encode(&bytes),
            ..env
        }
    } else {
        Envelope::sign(&bytes, keys)
    };
    let p = dir.join("manifest.json");
    std::fs::write(&p, new_env.to_json()).unwrap();
    p
}

#[test]
fn untampered_update_applies() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.img");
    let r = update().apply(&out, |_| {});
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn flipped_bit_in_payload_is_refused_before_anything_is_written() {
    refused(
        |args, dir| {
            let p = copy_to(dir, "payload.bin", &update().path("update/payload.bin"));
            let mut b = std::fs::read(&p).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0x10;
            std::fs::write(&p, b).unwrap();
            set_arg(args, "--payload", p);
        },
        &["payload sha256", "corrupt or was altered"],
    );
}

#[test]
fn flipped_bit_in_manifest_breaks_the_signature() {
    refused(
        |args, dir| {
            let p = rewrite_manifest(dir, &[], |m| {
                let n = m["to"]["size"].as_u64().unwrap();
                m["to"]["size"] = (n ^ 1).into();
            });
            set_arg(args, "--manifest", p);
        },
        &["does not match the manifest bytes", "altered after signing"],
    );
}

#[test]
fn signature_by_an_unknown_key_is_refused() {
    let stranger = SigningKeyPair::generate().unwrap();
    refused(
        |args, dir| {
            let p = rewrite_manifest(dir, &[&stranger], |_| {});
            set_arg(args, "--manifest", p);
        },
        &["does not trust"],
    );
}

#[test]
fn signatures_below_the_threshold_are_refused() {
    let second = SigningKeyPair::generate().unwrap();
    refused(
        |args, dir| {
            let pubkey = dir.join("second.pub");
            std::fs::write(&pubkey, second.public_pem()).unwrap();
            args.extend([
                "--pubkey".into(),
                pubkey.into(),
                "--threshold".into(),
                "2".into(),
            ]);
        },
        &["only 1 valid signature", "2 required"],
    );
}

#[test]
fn expired_manifest_is_refused_even_when_properly_signed() {
    let key = signing_key();
    refused(
        |args, dir| {
            let p = rewrite_manifest(dir, &[&key], |m| {
                m["expires_at"] = "2020-01-01T00:00:00Z".into()
            });
            set_arg(args, "--manifest", p);
        },
        &["expired at 2020-01-01"],
    );
}

#[test]
fn truncated_payload_is_refused_before_writing() {
    refused(
        |args, dir| {
            let p = copy_to(dir, "payload.bin", &update().path("update/payload.bin"));
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len - 100)
                .unwrap();
            set_arg(args, "--payload", p);
        },
        &["truncated or wrong payload"],
    );
}

#[test]
fn wrong_source_image_of_the_right_size_is_refused() {
    refused(
        |args, dir| {
            let p = copy_to(dir, "other.img", &update().path("old.img"));
            let mut b = std::fs::read(&p).unwrap();
            b[12345] ^= 1;
            std::fs::write(&p, b).unwrap();
            set_arg(args, "--source", p);
        },
        &["source image sha256", "wrong or modified source image"],
    );
}

#[test]
fn source_of_the_wrong_size_is_refused() {
    refused(
        |args, dir| {
            let p = copy_to(dir, "bigger.img", &update().path("old.img"));
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len + 4096)
                .unwrap();
            set_arg(args, "--source", p);
        },
        &["wrong source image", "bytes"],
    );
}

#[test]
fn oversized_manifest_is_refused_without_parsing() {
    refused(
        |args, dir| {
            let p = dir.join("huge.json");
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(40 << 20).unwrap();
            set_arg(args, "--manifest", p);
        },
        &["over the", "limit"],
    );
}

#[test]
fn missing_source_for_a_delta_is_refused() {
    refused(
        |args, _| {
            let i = args.iter().position(|a| a == "--source").unwrap();
            args.drain(i..i + 2);
        },
        &["pass its image with --source"],
    );
}

#[test]
fn payload_of_another_update_is_refused() {
    let other = Update::build(None, &images::base(300_000, 1), &[]);
    refused(
        |args, _| set_arg(args, "--payload", other.path("update/payload.bin")),
        &["payload"],
    );
}

#[test]
fn manifest_operation_data_swapped_under_a_valid_signature_is_caught() {
    // A signer's bug or a confused build: an operation claims data whose hash
    // does not match the payload. The apply engine must still refuse.
    let key = signing_key();
    refused(
        |args, dir| {
            let p = rewrite_manifest(dir, &[&key], |m| {
                // Every operation naming that data (a compression frame's
                // members share one range), so the manifest stays valid and
                // the apply engine is what must catch it.
                let ops = m["operations"].as_array_mut().unwrap();
                let at = ops.iter().find_map(|o| o.get("data")).unwrap()["offset"].clone();
                for op in ops
                    .iter_mut()
                    .filter(|o| o.get("data").is_some_and(|d| d["offset"] == at))
                {
                    op["data"]["sha256"] = "00".repeat(32).into();
                }
            });
            set_arg(args, "--manifest", p);
        },
        &["data sha256"],
    );
}

#[test]
fn one_frame_members_data_digest_changed_under_a_valid_signature_is_refused_before_download() {
    // Operations that name one data range must name it exactly: one
    // member of a frame (or of shared data) with another digest makes the
    // manifest invalid, refused before anything is fetched or written.
    let key = signing_key();
    refused(
        |args, dir| {
            let p = rewrite_manifest(dir, &[&key], |m| {
                let ops = m["operations"].as_array_mut().unwrap();
                let offsets: Vec<serde_json::Value> = ops
                    .iter()
                    .filter_map(|o| o.get("data").map(|d| d["offset"].clone()))
                    .collect();
                let shared = offsets
                    .iter()
                    .find(|o| offsets.iter().filter(|p| p == o).count() > 1)
                    .expect("the fixture has operations sharing data (a frame)")
                    .clone();
                let op = ops
                    .iter_mut()
                    .filter(|o| o.get("data").is_some_and(|d| d["offset"] == shared))
                    .nth(1)
                    .unwrap();
                op["data"]["sha256"] = "00".repeat(32).into();
            });
            set_arg(args, "--manifest", p);
        },
        &["nor exactly an earlier operation's data"],
    );
}
