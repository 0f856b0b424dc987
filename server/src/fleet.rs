//! The fleet: enrolled devices, their tokens, and what they last reported.
//!
//! Check-ins are the hottest path of the server, so everything they touch
//! here is in sharded maps (`DashMap`) and per-device mutexes held for a few
//! field writes, never across an `.await`. Tokens are 256-bit random strings
//! shown once; only their SHA-256 is kept, in memory and in sled, so a copy
//! of the data directory does not let anyone impersonate a device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use ota_format::api::{AgentState, Slot};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::store::{Store, StoreError, decode, encode, load_all};

/// A token hash: the only form in which tokens are stored.
pub type TokenHash = [u8; 32];

/// Hashes a presented token.
pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random device token: 256 bits as 64 lower-case hex digits.
///
/// Hex, not base64url: a device token is typed into command lines and
/// config files of clients we do not control, and base64url can begin
/// with `-`. SWUpdate's suricatta then reads `-k -…` as a cluster of its
/// own options: a `d` in it is `--disable`, and the target never polls,
/// silently (no error, no request: one of 64 tokens began with `-`).
/// Hex has no character a shell, getopt, an HTTP header or an INI file
/// treats specially.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// What is persisted about a device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub id: String,
    pub device_type: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Hex SHA-256 of the current token.
    pub token_sha256: String,
    pub enrolled_at_ms: u64,
    /// Last version reported (persisted when it changes).
    #[serde(default)]
    pub version: Option<String>,
}

/// What a device last said at check-in (memory only: re-learned at the next
/// check-in after a restart).
#[derive(Debug, Clone)]
pub struct LiveStatus {
    pub version: Option<String>,
    pub booted_slot: Option<Slot>,
    pub state: AgentState,
    pub last_seen_ms: u64,
}

/// One device in memory.
#[derive(Debug)]
pub struct Device {
    pub record: Mutex<DeviceRecord>,
    pub live: Mutex<LiveStatus>,
}

/// Every enrolled device.
pub struct Fleet {
    store: Store,
    devices: DashMap<String, Arc<Device>>,
    /// Token hash to its device: the same `Arc` as in `devices` (a device
    /// keeps its `Arc` across re-enrollment), so a check-in authenticates
    /// with one lookup and no copy of the id.
    tokens: DashMap<TokenHash, Arc<Device>>,
    /// Issued and revoked client certificates.
    pub certs: crate::certs::CertList,
}

impl Fleet {
    /// Loads every device from the store.
    pub fn load(store: Store) -> Result<Fleet, StoreError> {
        let fleet = Fleet {
            devices: DashMap::new(),
            tokens: DashMap::new(),
            certs: crate::certs::CertList::load(store.clone())?,
            store,
        };
        for rec in load_all::<DeviceRecord>(&fleet.store.devices)? {
            fleet.insert_mem(rec);
        }
        Ok(fleet)
    }

    fn insert_mem(&self, rec: DeviceRecord) -> Arc<Device> {
        let token = hex::decode(&rec.token_sha256)
            .ok()
            .and_then(|h| TokenHash::try_from(h.as_slice()).ok());
        let dev = Arc::new(Device {
            live: Mutex::new(LiveStatus {
                version: rec.version.clone(),
                booted_slot: None,
                state: AgentState::Idle,
                last_seen_ms: 0,
            }),
            record: Mutex::new(rec.clone()),
        });
        if let Some(h) = token {
            self.tokens.insert(h, dev.clone());
        }
        self.devices.insert(rec.id, dev.clone());
        dev
    }

    /// Enrolls `id` (or re-enrolls it: the old token is revoked) and returns
    /// its new token, once the record is durable.
    ///
    /// # Cancel safety
    /// If cancelled after the write but before it is durable, the device may
    /// or may not be enrolled after a crash; the caller never saw the token,
    /// so the device simply enrolls again.
    pub async fn enroll(
        &self,
        id: &str,
        device_type: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<String, StoreError> {
        let token = new_token();
        let hash = hash_token(&token);
        let old = self
            .devices
            .get(id)
            .map(|d| d.record.lock().unwrap().clone());
        let rec = DeviceRecord {
            id: id.to_string(),
            device_type: device_type.to_string(),
            tags,
            token_sha256: hex::encode(hash),
            enrolled_at_ms: crate::now_ms(),
            version: old.as_ref().and_then(|o| o.version.clone()),
        };
        self.store.devices.insert(id.as_bytes(), encode(&rec))?;
        self.store.durable().await?;
        if let Some(old) = old
            && let Ok(h) = hex::decode(&old.token_sha256)
            && let Ok(h) = TokenHash::try_from(h.as_slice())
        {
            self.tokens.remove(&h);
        }
        match self.devices.get(id).map(|d| d.clone()) {
            Some(dev) => {
                *dev.record.lock().unwrap() = rec;
                self.tokens.insert(hash, dev);
            }
            None => {
                self.insert_mem(rec);
            }
        }
        Ok(token)
    }

    /// Replaces a device's tags (its token stays), once durable; `false` if
    /// there is no such device. DDI `configData` lands here
    /// ([`crate::ddi`]). Two concurrent updates of one device: the later
    /// write wins.
    ///
    /// # Cancel safety
    /// Memory follows only a durable write; cancelled before, the tags may
    /// or may not have changed after a crash, and the target sends its
    /// attributes again when asked.
    pub async fn set_tags(
        &self,
        id: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<bool, StoreError> {
        let Some(dev) = self.get(id) else {
            return Ok(false);
        };
        let rec = {
            let mut r = dev.record.lock().unwrap().clone();
            r.tags = tags;
            r
        };
        self.store.devices.insert(id.as_bytes(), encode(&rec))?;
        self.store.durable().await?;
        dev.record.lock().unwrap().tags = rec.tags;
        Ok(true)
    }

    /// Deletes a device and revokes its token, once the deletion is durable;
    /// `false` if there was none.
    ///
    /// # Cancel safety
    /// If cancelled before the deletion is durable, the device may be back
    /// after a crash; the operator, who saw no answer, retires it again.
    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let Some(dev) = self.get(id) else {
            return Ok(false);
        };
        self.store.devices.remove(id.as_bytes())?;
        self.store.durable().await?;
        let rec = dev.record.lock().unwrap().clone();
        if let Ok(h) = hex::decode(&rec.token_sha256)
            && let Ok(h) = TokenHash::try_from(h.as_slice())
        {
            self.tokens.remove(&h);
        }
        self.devices.remove(id);
        Ok(true)
    }

    /// The device a token belongs to, by the token's [`hash_token`] (which
    /// the caller keeps as the device's cache key: one hash per request).
    pub fn authenticate(&self, token_sha256: &TokenHash) -> Option<Arc<Device>> {
        self.tokens.get(token_sha256).map(|d| d.clone())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.devices.get(id).map(|d| d.clone())
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Calls `f` on every device (for status scans; not on the hot path).
    pub fn for_each(&self, mut f: impl FnMut(&Device)) {
        for d in self.devices.iter() {
            f(d.value());
        }
    }

    /// Records a check-in. Persists the version when it changed (without
    /// waiting for durability: the next check-in repeats it anyway).
    pub fn record_checkin(
        &self,
        dev: &Device,
        version: &str,
        slot: Slot,
        state: AgentState,
    ) -> Result<(), StoreError> {
        {
            let mut live = dev.live.lock().unwrap();
            live.booted_slot = Some(slot);
            live.state = state;
            live.last_seen_ms = crate::now_ms();
            if live.version.as_deref() == Some(version) {
                return Ok(());
            }
            live.version = Some(version.to_string());
        }
        let rec = {
            let mut r = dev.record.lock().unwrap();
            r.version = Some(version.to_string());
            r.clone()
        };
        self.store.devices.insert(rec.id.as_bytes(), encode(&rec))?;
        Ok(())
    }

    /// Decodes a raw record (for admin views).
    pub fn decode_record(k: &[u8], v: &[u8]) -> Result<DeviceRecord, StoreError> {
        decode(k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: tokens were base64url, and one in 64 began with `-`.
    /// SWUpdate (`swupdate -u '… -k <token>'`) read such a token as its
    /// own options and, given a `d`, never polled: in CI one of twenty
    /// real SWUpdate targets was never heard from. 10,000 draws: a
    /// 1-in-64 first character is all but certain to appear.
    #[test]
    fn device_tokens_never_begin_with_a_dash_so_command_lines_read_them_as_values() {
        for _ in 0..10_000 {
            let t = new_token();
            assert_eq!(t.len(), 64, "{t}");
            assert!(
                t.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "token {t} has a character outside lower-case hex"
            );
        }
        assert_ne!(new_token(), new_token());
    }
}
