//! The keys the server signs with: a key file, keys in a PKCS#11 token, or
//! both at once (during a key rotation).
//!
//! A key file on the server's disk is copied by every backup and readable by
//! anyone who gets root once. A PKCS#11 token (an HSM, a TPM through
//! `tpm2-pkcs11`, a cloud KMS bridge, or SoftHSM2 as the software stand-in)
//! keeps the private key inside: the server only asks it to sign. The
//! signatures are the same pure Ed25519 (`CKM_EDDSA` on a `CKK_EC_EDWARDS`
//! key over edwards25519) the agents already verify, so switching a fleet to
//! a token changes nothing on devices. SoftHSM2 2.6 (Debian) implements
//! `CKM_EDDSA`; that is why no second signature scheme was added.
//!
//! Every signature a token returns is verified against the key's public half
//! before it is used, so a misbehaving module (wrong mechanism, wrong key)
//! fails the build loudly instead of shipping manifests no device accepts.
//!
//! The PIN comes from a file or an environment variable, is held as a
//! `secrecy` string (zeroized, redacted from `Debug`) and is never logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use ed25519_dalek::VerifyingKey;
use ota_format::envelope::key_id;
use ota_format::{ManifestSigner, SignError, SigningKeyPair};
use serde::Deserialize;
use tracing::info;

/// `[signing]` in `server.toml`: keys in a PKCS#11 token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub pkcs11_module: PathBuf,
    /// Label of the token holding the keys.
    pub token_label: String,
    /// Labels (`CKA_LABEL`) of the Ed25519 keys to sign with. Every key
    /// listed signs every manifest: list two during a key rotation.
    pub key_labels: Vec<String>,
    /// File holding the user PIN (first line). One of `pin_file`, `pin_env`.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("pkcs11_module", &self.pkcs11_module)
            .field("token_label", &self.token_label)
            .field("key_labels", &self.key_labels)
            .field("pin_file", &self.pin_file)
            .field("pin_env", &self.pin_env)
            .finish()
    }
}

impl Pkcs11Config {
    /// Static checks (no module loaded). Returns what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.token_label.is_empty() || self.token_label.len() > 32 {
            return Err(
                "signing.token_label must be 1 to 32 characters (a PKCS#11 token label)".into(),
            );
        }
        if self.key_labels.is_empty() {
            return Err("signing.key_labels must name at least one key in the token".into());
        }
        if self.key_labels.iter().any(|l| l.is_empty()) {
            return Err("signing.key_labels: a label is empty".into());
        }
        match (&self.pin_file, &self.pin_env) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(
                "set exactly one of signing.pin_file and signing.pin_env (the token's user PIN)"
                    .into(),
            ),
        }
    }

    fn pin(&self) -> Result<AuthPin, SigningError> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(p), _) => std::fs::read_to_string(p)
                .map_err(|e| {
                    SigningError::Pin(format!("reading signing.pin_file {}: {e}", p.display()))
                })?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                SigningError::Pin(format!("signing.pin_env names {var}, which is not set"))
            })?,
            (None, None) => return Err(SigningError::Pin("no PIN configured".into())),
        };
        if pin.is_empty() {
            return Err(SigningError::Pin("the PIN is empty".into()));
        }
        Ok(AuthPin::new(pin.into()))
    }
}

/// Why the signing keys could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("reading signing key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key {path}: {source}")]
    BadKey {
        path: PathBuf,
        source: ota_format::envelope::KeyError,
    },
    #[error("PKCS#11 module {module}: {what}: {source}")]
    Pkcs11 {
        module: PathBuf,
        what: String,
        source: CkError,
    },
    #[error(
        "PKCS#11 module {module}: no token labelled {label:?} (tokens: {found:?}); initialise it, or fix signing.token_label"
    )]
    NoToken {
        module: PathBuf,
        label: String,
        found: Vec<String>,
    },
    #[error("token {token:?}: {what} key labelled {label:?} {problem}")]
    Key {
        token: String,
        label: String,
        what: &'static str,
        problem: String,
    },
    #[error("PKCS#11 PIN: {0} (set signing.pin_file or signing.pin_env)")]
    Pin(String),
    #[error(
        "no signing key configured: set signing_key (a key file) or [signing] (a PKCS#11 token)"
    )]
    NoKey,
}

/// The current signers, swapped as a whole by a configuration reload.
pub type SignerSlot = Arc<arc_swap::ArcSwap<Signers>>;

/// The set of keys every manifest and freshness statement is signed with.
pub struct Signers {
    list: Vec<Arc<dyn ManifestSigner>>,
}

impl Signers {
    /// Opens every configured key: the key file (if any) and each key of the
    /// token (if any). Blocking (module loading, login): call it once at
    /// start or reload, from a blocking context.
    pub fn open(
        key_file: Option<&Path>,
        token: Option<&Pkcs11Config>,
    ) -> Result<Signers, SigningError> {
        let mut list: Vec<Arc<dyn ManifestSigner>> = Vec::new();
        if let Some(path) = key_file {
            let pem = std::fs::read_to_string(path).map_err(|source| SigningError::ReadKey {
                path: path.into(),
                source,
            })?;
            let key = SigningKeyPair::from_pem(&pem).map_err(|source| SigningError::BadKey {
                path: path.into(),
                source,
            })?;
            info!(keyid = %key.keyid(), path = %path.display(), "signing with a key file");
            list.push(Arc::new(key));
        }
        if let Some(cfg) = token {
            for label in &cfg.key_labels {
                let s = Pkcs11Signer::open(cfg, label)?;
                info!(keyid = %s.keyid, token = %cfg.token_label, key = %label, "signing with a PKCS#11 key");
                list.push(Arc::new(s));
            }
        }
        if list.is_empty() {
            return Err(SigningError::NoKey);
        }
        Ok(Signers { list })
    }

    /// Signers over keys already in memory (tests, the `delta` command).
    pub fn from_keys(keys: Vec<SigningKeyPair>) -> Signers {
        Signers {
            list: keys
                .into_iter()
                .map(|k| Arc::new(k) as Arc<dyn ManifestSigner>)
                .collect(),
        }
    }

    /// The signers, as `Envelope::sign_with` takes them.
    pub fn refs(&self) -> Vec<&dyn ManifestSigner> {
        self.list.iter().map(|s| s.as_ref()).collect()
    }

    /// Key ids, in signing order.
    pub fn keyids(&self) -> Vec<String> {
        self.list.iter().map(|s| s.keyid().to_string()).collect()
    }
}

/// One process-wide context per module: `C_Initialize` may run only once per
/// process, and a reload must reuse the loaded module.
fn context(module: &Path) -> Result<Pkcs11, SigningError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS.get_or_init(Default::default).lock().unwrap();
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    let err = |what: &str| {
        let what = what.to_string();
        move |source| SigningError::Pkcs11 {
            module: module.into(),
            what,
            source,
        }
    };
    let ctx = Pkcs11::new(module).map_err(err("loading the module"))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err("C_Initialize")(e)),
    }
    map.insert(module.into(), ctx.clone());
    Ok(ctx)
}

/// Finds the slot holding the token labelled `label`.
fn find_token(ctx: &Pkcs11, module: &Path, label: &str) -> Result<Slot, SigningError> {
    let err = |source| SigningError::Pkcs11 {
        module: module.into(),
        what: "listing tokens".into(),
        source,
    };
    let mut found = Vec::new();
    for slot in ctx.get_slots_with_token().map_err(err)? {
        let info = ctx.get_token_info(slot).map_err(err)?;
        let l = info.label().trim_end().to_string();
        if l == label {
            return Ok(slot);
        }
        found.push(l);
    }
    Err(SigningError::NoToken {
        module: module.into(),
        label: label.into(),
        found,
    })
}

/// Opens a session on the token and logs the user in (a second login on
/// the same token is fine: PKCS#11 login state is per token).
fn login(cfg: &Pkcs11Config, rw: bool) -> Result<Session, SigningError> {
    let module = cfg.pkcs11_module.as_path();
    let ctx = context(module)?;
    let slot = find_token(&ctx, module, &cfg.token_label)?;
    let err = |what: &'static str| {
        move |source| SigningError::Pkcs11 {
            module: module.into(),
            what: what.into(),
            source,
        }
    };
    let session = if rw {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(err("opening a session"))?;
    match session.login(UserType::User, Some(&cfg.pin()?)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(err("logging in with the user PIN (wrong PIN?)")(e)),
    }
    Ok(session)
}

/// The Ed25519 curve as `CKA_EC_PARAMS`: the printable string
/// "edwards25519" (what SoftHSM2 and OpenSC write; RFC 8410's OID
/// 1.3.101.112 is accepted by newer modules too).
const ED25519_PARAMS: [u8; 14] = [
    0x13, 0x0c, b'e', b'd', b'w', b'a', b'r', b'd', b's', b'2', b'5', b'5', b'1', b'9',
];

/// Reads a `CKA_EC_POINT`: the 32 key bytes, bare or DER OCTET STRING wrapped.
fn ec_point_to_key(point: &[u8]) -> Option<VerifyingKey> {
    let raw = match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
        p if p.len() == 32 => p,
        _ => return None,
    };
    VerifyingKey::from_bytes(raw.try_into().ok()?).ok()
}

/// A key that stays in a PKCS#11 token.
pub struct Pkcs11Signer {
    keyid: String,
    public: VerifyingKey,
    label: String,
    key: ObjectHandle,
    /// A session is not `Sync`: one signature at a time (a token is a
    /// serial device anyway, and signing is once per build).
    session: Mutex<Session>,
}

impl Pkcs11Signer {
    /// Finds the key pair labelled `label` in the configured token.
    pub fn open(cfg: &Pkcs11Config, label: &str) -> Result<Pkcs11Signer, SigningError> {
        let session = login(cfg, false)?;
        let key_err = |what: &'static str, problem: String| SigningError::Key {
            token: cfg.token_label.clone(),
            label: label.into(),
            what,
            problem,
        };
        let find = |class: ObjectClass, what: &'static str| -> Result<ObjectHandle, SigningError> {
            let found = session
                .find_objects(&[
                    Attribute::Class(class),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(|e| key_err(what, format!("cannot be searched for: {e}")))?;
            match found.as_slice() {
                [one] => Ok(*one),
                [] => Err(key_err(what, "is not in the token; generate it (ota-server token-keygen) or fix signing.key_labels".into())),
                _ => Err(key_err(what, format!("is ambiguous: {} objects carry it", found.len()))),
            }
        };
        let private = find(ObjectClass::PRIVATE_KEY, "private")?;
        let public = find(ObjectClass::PUBLIC_KEY, "public")?;
        let attrs = session
            .get_attributes(public, &[AttributeType::KeyType, AttributeType::EcPoint])
            .map_err(|e| key_err("public", format!("cannot be read: {e}")))?;
        let mut point = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) if t != KeyType::EC_EDWARDS => {
                    return Err(key_err(
                        "public",
                        format!("is a {t} key, not Ed25519 (CKK_EC_EDWARDS)"),
                    ));
                }
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        let public_key = point
            .as_deref()
            .and_then(ec_point_to_key)
            .ok_or_else(|| key_err("public", "has no Ed25519 point (CKA_EC_POINT)".into()))?;
        let signer = Pkcs11Signer {
            keyid: key_id(&public_key),
            public: public_key,
            label: label.into(),
            key: private,
            session: Mutex::new(session),
        };
        // Prove the pair works (and the PIN gives signing rights) now,
        // not at the first release.
        signer
            .sign_message(b"edge-ota signing self-test")
            .map_err(|e| key_err("private", e.reason))?;
        Ok(signer)
    }

    /// The public key (what devices must trust).
    pub fn public_key(&self) -> VerifyingKey {
        self.public
    }
}

impl ManifestSigner for Pkcs11Signer {
    fn keyid(&self) -> &str {
        &self.keyid
    }

    fn sign_message(&self, msg: &[u8]) -> Result<[u8; 64], SignError> {
        let fail = |reason: String| SignError {
            keyid: self.keyid.clone(),
            reason: format!("PKCS#11 key {:?}: {reason}", self.label),
        };
        let mech = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
        let sig = self
            .session
            .lock()
            .unwrap()
            .sign(&mech, self.key, msg)
            .map_err(|e| fail(format!("C_Sign: {e}")))?;
        let sig: [u8; 64] = sig.as_slice().try_into().map_err(|_| {
            fail(format!(
                "the token returned {} bytes, not a 64-byte Ed25519 signature",
                sig.len()
            ))
        })?;
        self.public
            .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| {
                fail("the token's signature does not verify with its public key".into())
            })?;
        Ok(sig)
    }
}

/// Generates an Ed25519 key pair labelled `label` inside the token (the
/// private half is sensitive and never extractable) and returns its public
/// key. Refuses a label already in use.
pub fn generate_in_token(cfg: &Pkcs11Config, label: &str) -> Result<VerifyingKey, SigningError> {
    let session = login(cfg, true)?;
    let key_err = |problem: String| SigningError::Key {
        token: cfg.token_label.clone(),
        label: label.into(),
        what: "new",
        problem,
    };
    let existing = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .map_err(|e| key_err(format!("cannot be searched for: {e}")))?;
    if !existing.is_empty() {
        return Err(key_err(
            "already exists: pick a new label (labels name keys for rotation)".into(),
        ));
    }
    let id = label.as_bytes().to_vec();
    let public_tpl = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(ED25519_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let private_tpl = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
    ];
    let (public, _) = session
        .generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public_tpl, &private_tpl)
        .map_err(|e| {
            key_err(format!(
                "could not be generated (does the module support CKM_EC_EDWARDS_KEY_PAIR_GEN?): {e}"
            ))
        })?;
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(|e| key_err(format!("public half cannot be read: {e}")))?;
    point
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => ec_point_to_key(&p),
            _ => None,
        })
        .ok_or_else(|| key_err("has no Ed25519 point".into()))
}

/// SPKI PEM of a public key (what agents list in `trusted_keys`).
pub fn public_pem(key: &VerifyingKey) -> String {
    use ed25519_dalek::pkcs8::EncodePublicKey;
    key.to_public_key_pem(Default::default())
        .expect("encoding a valid public key cannot fail")
}

/// Removes the key pair labelled `label` from the token: the last step of
/// a rotation, once no device trusts the key any more.
pub fn destroy_in_token(cfg: &Pkcs11Config, label: &str) -> Result<usize, SigningError> {
    let session = login(cfg, true)?;
    let key_err = |problem: String| SigningError::Key {
        token: cfg.token_label.clone(),
        label: label.into(),
        what: "retired",
        problem,
    };
    let found = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .map_err(|e| key_err(format!("cannot be searched for: {e}")))?;
    for h in &found {
        session
            .destroy_object(*h)
            .map_err(|e| key_err(format!("cannot be destroyed: {e}")))?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_bare_and_wrapped() {
        let k = SigningKeyPair::generate().unwrap().verifying_key();
        let mut wrapped = vec![0x04, 0x20];
        wrapped.extend_from_slice(k.as_bytes());
        assert_eq!(ec_point_to_key(&wrapped), Some(k));
        assert_eq!(ec_point_to_key(k.as_bytes()), Some(k));
        assert_eq!(ec_point_to_key(&wrapped[..20]), None);
    }

    #[test]
    fn config_needs_exactly_one_pin_source_and_a_key() {
        let mut c = Pkcs11Config {
            pkcs11_module: "/x.so".into(),
            token_label: "ota".into(),
            key_labels: vec!["k1".into()],
            pin_file: Some("/pin".into()),
            pin_env: None,
        };
        assert!(c.validate().is_ok());
        c.pin_env = Some("PIN".into());
        assert!(c.validate().unwrap_err().contains("exactly one"));
        c.pin_file = None;
        c.key_labels.clear();
        assert!(c.validate().unwrap_err().contains("at least one key"));
    }
}
