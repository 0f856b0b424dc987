//! The device inventory behind `GET /api/v1/admin/devices` and
//! `ota-server device list`: filters, keyset paging and the summary rows.
//!
//! Filtering and paging happen on the server, in whichever backend holds the
//! state (an in-memory scan for sled, one indexed query for PostgreSQL), so a
//! page costs the same at 100 devices or 100,000 and a client (the CLI, a
//! dashboard) never downloads the fleet to show twenty rows. Pages are keyed
//! by device id (`after` = the last id of the previous page), not by offset:
//! a device enrolled while an operator pages through neither shifts nor
//! repeats rows, and a deep page costs no more than the first.

use std::collections::{BTreeMap, BinaryHeap};

use ota_format::api::{AgentState, Slot};
use serde::{Deserialize, Serialize};

/// Rows per page when the client does not say.
pub const DEFAULT_LIMIT: usize = 100;
/// The most rows one page returns.
pub const MAX_LIMIT: usize = 1000;

/// The query string of `GET /api/v1/admin/devices`, as sent.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct DeviceQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Exact version the device last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `KEY=VALUE[,KEY=VALUE...]`: every tag must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<String>,
    /// Only members of this rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// The agent state last reported (`idle`, `downloading`, `installing`,
    /// `rebooting`, `testing`), or `never` for devices never seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Seen within the last N seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_within_s: Option<u64>,
    /// Not seen for at least N seconds (never-seen devices included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_for_s: Option<u64>,
    /// The last id of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `ID[,ID...]`: only these devices (at most [`MAX_LIMIT`]), looked up
    /// one by one instead of scanning the fleet; `total` then counts the
    /// ones that exist and match. What a dashboard refreshes often: the
    /// rows it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<String>,
}

/// The state a filter asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Never checked in (since enrollment, or since a sled server restarted).
    Never,
    Is(AgentState),
}

/// A validated [`DeviceQuery`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceFilter {
    pub device_type: Option<String>,
    pub version: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub rollout: Option<String>,
    pub state: Option<StateFilter>,
    /// `last_seen_ms >= seen_since_ms`.
    pub seen_since_ms: Option<u64>,
    /// `last_seen_ms < silent_since_ms`.
    pub silent_since_ms: Option<u64>,
    pub after: Option<String>,
    pub limit: usize,
    /// Only these devices (point lookups, no scan).
    pub ids: Option<std::collections::BTreeSet<String>>,
}

impl DeviceQuery {
    /// Validates the query at wall-clock time `now_ms`; the error says what
    /// is wrong and what would be right.
    pub fn parse(&self, now_ms: u64) -> Result<DeviceFilter, String> {
        let mut tags = BTreeMap::new();
        for kv in self.tags.iter().flat_map(|t| t.split(',')) {
            let kv = kv.trim();
            if kv.is_empty() {
                continue;
            }
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("tag filter {kv:?}: expected KEY=VALUE"))?;
            tags.insert(k.to_string(), v.to_string());
        }
        let state = match self.state.as_deref() {
            None | Some("") => None,
            Some("never") => Some(StateFilter::Never),
            Some(s) => Some(StateFilter::Is(
                serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(
                    |_| {
                        format!(
                            "state {s:?}: expected idle, downloading, installing, rebooting, testing or never"
                        )
                    },
                )?,
            )),
        };
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(format!("limit {limit}: expected 1 to {MAX_LIMIT}"));
        }
        let ids = match self.ids.as_deref() {
            None => None,
            Some(list) => {
                let ids: std::collections::BTreeSet<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                if ids.is_empty() {
                    return Err("ids: expected ID[,ID...], got none".into());
                }
                if ids.len() > MAX_LIMIT {
                    return Err(format!(
                        "ids: {} devices, at most {MAX_LIMIT} per request",
                        ids.len()
                    ));
                }
                Some(ids)
            }
        };
        let ago = |s: u64| now_ms.saturating_sub(s.saturating_mul(1000));
        Ok(DeviceFilter {
            device_type: self.device_type.clone().filter(|s| !s.is_empty()),
            version: self.version.clone().filter(|s| !s.is_empty()),
            tags,
            rollout: self.rollout.clone().filter(|s| !s.is_empty()),
            state,
            seen_since_ms: self.seen_within_s.map(ago),
            silent_since_ms: self.silent_for_s.map(ago),
            after: self.after.clone().filter(|s| !s.is_empty()),
            limit,
            ids,
        })
    }
}

impl DeviceFilter {
    /// Whether a device matches every filter but `rollout` and the cursor
    /// (the backend checks membership, which it stores elsewhere).
    /// `last_seen_ms == 0` means never seen.
    pub fn matches(
        &self,
        device_type: &str,
        version: Option<&str>,
        tags: &BTreeMap<String, String>,
        state: Option<AgentState>,
        last_seen_ms: u64,
    ) -> bool {
        if self
            .device_type
            .as_deref()
            .is_some_and(|t| t != device_type)
        {
            return false;
        }
        if self.version.is_some() && self.version.as_deref() != version {
            return false;
        }
        if !self.tags.iter().all(|(k, v)| tags.get(k) == Some(v)) {
            return false;
        }
        let seen = last_seen_ms > 0;
        match self.state {
            Some(StateFilter::Never) if seen => return false,
            Some(StateFilter::Is(s)) if !seen || state != Some(s) => return false,
            _ => {}
        }
        if self.seen_since_ms.is_some_and(|t| last_seen_ms < t) {
            return false;
        }
        if self.silent_since_ms.is_some_and(|t| last_seen_ms >= t) {
            return false;
        }
        true
    }
}

/// One row of the inventory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceSummary {
    pub id: String,
    pub device_type: String,
    pub version: Option<String>,
    /// `None` until the device checks in.
    pub state: Option<AgentState>,
    pub booted_slot: Option<Slot>,
    /// 0 = never seen.
    pub last_seen_ms: u64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// One page of the inventory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DevicePage {
    /// Sorted by id.
    pub devices: Vec<DeviceSummary>,
    /// Devices matching the filters, over every page.
    pub total: u64,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// Collects the first `limit` matching devices after the cursor from an
/// unordered scan, in O(n log limit) time and O(limit) memory.
pub struct PageBuilder<'a> {
    filter: &'a DeviceFilter,
    total: u64,
    /// Max-heap by id of the smallest ids seen (at most `limit + 1`).
    heap: BinaryHeap<ById>,
}

struct ById(DeviceSummary);

impl PartialEq for ById {
    fn eq(&self, o: &Self) -> bool {
        self.0.id == o.0.id
    }
}
impl Eq for ById {}
impl PartialOrd for ById {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ById {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&o.0.id)
    }
}

impl<'a> PageBuilder<'a> {
    pub fn new(filter: &'a DeviceFilter) -> Self {
        PageBuilder {
            filter,
            total: 0,
            heap: BinaryHeap::with_capacity(filter.limit + 1),
        }
    }

    /// Offers a device that matched the filter; `row` builds its summary
    /// only if it can land on the page (clones are the cost of a scan).
    pub fn offer(&mut self, id: &str, row: impl FnOnce() -> DeviceSummary) {
        self.total += 1;
        if self.filter.after.as_deref().is_some_and(|a| id <= a) {
            return;
        }
        if self.heap.len() > self.filter.limit
            && self.heap.peek().is_some_and(|top| top.0.id.as_str() <= id)
        {
            return;
        }
        self.heap.push(ById(row()));
        if self.heap.len() > self.filter.limit + 1 {
            self.heap.pop();
        }
    }

    pub fn finish(self) -> DevicePage {
        let mut devices: Vec<DeviceSummary> = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|b| b.0)
            .collect();
        let next = if devices.len() > self.filter.limit {
            devices.truncate(self.filter.limit);
            devices.last().map(|d| d.id.clone())
        } else {
            None
        };
        DevicePage {
            devices,
            total: self.total,
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, t: &str, seen: u64) -> DeviceSummary {
        DeviceSummary {
            id: id.into(),
            device_type: t.into(),
            version: Some("1.0.0".into()),
            state: (seen > 0).then_some(AgentState::Idle),
            booted_slot: None,
            last_seen_ms: seen,
            tags: BTreeMap::from([("site".into(), if seen > 0 { "a" } else { "b" }.into())]),
        }
    }

    fn scan(f: &DeviceFilter, rows: &[DeviceSummary]) -> DevicePage {
        let mut p = PageBuilder::new(f);
        for r in rows {
            if f.matches(
                &r.device_type,
                r.version.as_deref(),
                &r.tags,
                r.state,
                r.last_seen_ms,
            ) {
                p.offer(&r.id, || r.clone());
            }
        }
        p.finish()
    }

    #[test]
    fn pages_walk_every_match_once_in_id_order() {
        // Inserted out of order, as a hash map scan would yield them.
        let rows: Vec<_> = (0..1000u64)
            .map(|i| (i * 7919) % 1000)
            .map(|i| row(&format!("d{i:04}"), if i % 3 == 0 { "x" } else { "y" }, i))
            .collect();
        let mut q = DeviceQuery {
            device_type: Some("x".into()),
            limit: Some(50),
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let p = scan(&q.parse(0).unwrap(), &rows);
            assert_eq!(p.total, 334);
            seen.extend(p.devices.iter().map(|d| d.id.clone()));
            match p.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        let want: Vec<_> = (0..1000).step_by(3).map(|i| format!("d{i:04}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn filters_state_tags_and_last_seen() {
        let rows = vec![
            row("a", "x", 0),
            row("b", "x", 50_000),
            row("c", "x", 99_000),
        ];
        let ids = |q: DeviceQuery| -> Vec<String> {
            scan(&q.parse(100_000).unwrap(), &rows)
                .devices
                .into_iter()
                .map(|d| d.id)
                .collect()
        };
        let q = |f: fn(&mut DeviceQuery)| {
            let mut q = DeviceQuery::default();
            f(&mut q);
            q
        };
        assert_eq!(ids(q(|q| q.state = Some("never".into()))), ["a"]);
        assert_eq!(ids(q(|q| q.state = Some("idle".into()))), ["b", "c"]);
        assert_eq!(ids(q(|q| q.tags = Some("site=b".into()))), ["a"]);
        assert_eq!(ids(q(|q| q.seen_within_s = Some(10))), ["c"]);
        assert_eq!(ids(q(|q| q.silent_for_s = Some(10))), ["a", "b"]);
        assert_eq!(
            ids(q(|q| q.version = Some("2.0.0".into()))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn bad_queries_are_refused_with_the_expected_form() {
        let bad = |f: fn(&mut DeviceQuery)| {
            let mut q = DeviceQuery::default();
            f(&mut q);
            q.parse(0).unwrap_err()
        };
        assert!(bad(|q| q.state = Some("sleeping".into())).contains("expected idle"));
        assert!(bad(|q| q.tags = Some("site".into())).contains("KEY=VALUE"));
        assert!(bad(|q| q.limit = Some(0)).contains("1 to 1000"));
        assert!(bad(|q| q.limit = Some(5000)).contains("1 to 1000"));
    }
}
