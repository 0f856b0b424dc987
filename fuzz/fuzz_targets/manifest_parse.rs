//! `manifest_parse`: untrusted bytes through every parser an agent runs on
//! what it downloads, before and after signature checking.
//!
//! For each input:
//! 1. `Manifest::from_json(input)` (the raw manifest parser + `validate`).
//! 2. `Envelope::from_json(input)`; if it parses, `verify` against a fixed
//!    trusted key, and the envelope must round-trip through `to_json`.
//! 3. The envelope's payload (base64-decoded, unverified) is re-signed with
//!    the fixed key and the result goes through `Envelope::open` (parse,
//!    verify, `Manifest::from_json`, `check_expiry`): this is how the fuzzer
//!    reaches the manifest parser *behind* a valid signature, which it could
//!    never forge. `open` must agree with `Manifest::from_json` on the body.
//! 4. `Envelope::open(input)` itself.
//!
//! Any panic (including overflow checks, which `cargo fuzz` enables) is a bug:
//! both parsers are documented "Never panics".
//! Accepted manifests must also round-trip through `Manifest::to_json`.

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use libfuzzer_sys::fuzz_target;
use ota_format::{Envelope, EnvelopeError, Manifest, SigningKeyPair, TrustedKeys};

/// Seed of the fuzzer's signing key. Public on purpose: it only signs fuzz
/// inputs. `seeds/manifest_parse/signed-by-fuzz-key.json` is signed with it.
const FUZZ_KEY_SEED: [u8; 32] = [7; 32];

struct Keys {
    signer: SigningKeyPair,
    trusted: TrustedKeys,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let sk = ed25519_dalek::SigningKey::from_bytes(&FUZZ_KEY_SEED);
        let pem = sk
            .to_pkcs8_pem(Default::default())
            .expect("encode fuzz key");
        let signer = SigningKeyPair::from_pem(&pem).expect("read fuzz key back");
        let trusted =
            TrustedKeys::try_new([signer.verifying_key()], 1).expect("1-of-1 trust policy");
        Keys { signer, trusted }
    })
}

/// `OTA_FUZZ_TRACE=1`: one line per input on stderr saying how far it got,
/// to see which paths a corpus reaches:
/// `OTA_FUZZ_TRACE=1 target/.../manifest_parse -runs=0 corpus/manifest_parse 2>&1 | grep '^manifest_parse'`.
fn trace() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("OTA_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

/// The error's variant name, without its data, for `trace`.
fn variant<E: std::fmt::Debug>(r: &Result<impl Sized, E>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => {
            let d = format!("{e:?}");
            let end = d.find(|c: char| !c.is_alphanumeric()).unwrap_or(d.len());
            let inner = d[end..].trim_start_matches('(');
            let end2 = inner
                .find(|c: char| !c.is_alphanumeric())
                .unwrap_or(inner.len());
            format!("{}({})", &d[..end], &inner[..end2])
        }
    }
}

/// A fixed "now" (2027-01-15T08:00:00Z) so runs are reproducible.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn check_manifest(m: &Manifest) {
    // Deterministic serialization must parse back to the same manifest.
    let again = Manifest::from_json(&m.to_json()).expect("re-serialised valid manifest parses");
    assert_eq!(&again, m, "manifest does not round-trip");
    let _ = m.stats();
    let _ = m.check_expiry(now());
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();

    let mut steps: Vec<String> = Vec::new();

    // 1. The raw manifest parser.
    let raw = Manifest::from_json(data);
    if trace() {
        steps.push(format!("manifest={}", variant(&raw)));
    }
    if let Ok(m) = raw {
        check_manifest(&m);
    }

    // 2. The envelope parser and signature check.
    let env = Envelope::from_json(data);
    if trace() {
        steps.push(format!("envelope={}", variant(&env)));
    }
    if let Ok(env) = env {
        let verified = env.verify(&keys.trusted);
        if trace() {
            steps.push(format!("verify={}", variant(&verified)));
        }
        let again = Envelope::from_json(&env.to_json()).expect("re-serialised envelope parses");
        assert_eq!(again, env, "envelope does not round-trip");

        // 3. The manifest parser behind a valid signature.
        if let Ok(body) = B64.decode(&env.payload) {
            let direct = Manifest::from_json(&body);
            let signed = Envelope::sign(&body, &[&keys.signer]);
            let opened = Envelope::open(&signed.to_json(), &keys.trusted, now());
            if trace() {
                steps.push(format!("resigned_open={}", variant(&opened)));
            }
            match (&direct, &opened) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b);
                    check_manifest(a);
                }
                // A manifest that parses can only fail `open` by expiry.
                (Ok(_), Err(EnvelopeError::Manifest(_))) => {}
                (Ok(_), Err(e)) => panic!("valid manifest, freshly signed, refused by open: {e}"),
                (Err(_), Ok(_)) => panic!("open accepted a manifest that from_json refuses"),
                (Err(_), Err(_)) => {}
            }
        }
    }

    // 4. The whole path on the input itself.
    let opened = Envelope::open(data, &keys.trusted, now());
    if trace() {
        steps.push(format!("open={}", variant(&opened)));
        eprintln!("manifest_parse {}", steps.join(" "));
    }
    if let Ok(m) = opened {
        check_manifest(&m);
    }
});
