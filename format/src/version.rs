//! Release versions and their one order, shared by server and agent.
//!
//! A version is a [semantic version](https://semver.org/spec/v2.0.0.html):
//! `MAJOR[.MINOR[.PATCH]][-PRERELEASE][+BUILD]`, where a missing `MINOR` or
//! `PATCH` counts as 0 (`2` = `2.0` = `2.0.0`, written as given). The order is
//! semver precedence: numeric components compare as numbers (`1.10` > `1.9`);
//! a pre-release sorts *before* its release (`1.1-rc1` < `1.1`); pre-release
//! identifiers compare dot by dot, numbers numerically and below text
//! (`rc.2` < `rc.10` < `rc.a`), a shorter list first when one is a prefix of
//! the other (`rc` < `rc.1`); build metadata (`+...`) is ignored.
//!
//! Why one strict order: the server refuses at `release add` a version that
//! is not greater than the newest release of its device type, and the agent
//! refuses a manifest that is not newer than what it runs. If either side
//! accepted a string the other orders differently (`banana`, or `1.1-rc1`
//! compared as text after `1.1`), a device could commit a version after
//! which it refuses every real release — stuck for good. So both sides call
//! [`Version::parse`] and [`Version::cmp`], and nothing else.

use std::cmp::Ordering;
use std::fmt;

/// Why a string is not a version. The message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a version: {why}; write a semantic version such as 1.4.2 or 2.0.0-rc.1 (see docs/format.md, \"Versions\")"
)]
pub struct VersionError {
    pub input: String,
    pub why: String,
}

/// A parsed version. Equality and order are semver precedence, so `1.0` ==
/// `1.0.0` and `1.0+b1` == `1.0+b2`; [`Version::as_str`] keeps the text.
#[derive(Debug, Clone)]
pub struct Version {
    text: String,
    core: [u64; 3],
    pre: Vec<Ident>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ident {
    Num(u64),
    Text(String),
}

impl Ord for Ident {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Ident::Num(a), Ident::Num(b)) => a.cmp(b),
            (Ident::Num(_), Ident::Text(_)) => Ordering::Less,
            (Ident::Text(_), Ident::Num(_)) => Ordering::Greater,
            (Ident::Text(a), Ident::Text(b)) => a.cmp(b),
        }
    }
}

impl PartialOrd for Ident {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A number without leading zeros (semver forbids `01`: it would make `1.01`
/// and `1.1` two spellings of one version).
fn number(s: &str, what: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the {what} {s:?} is not a number"));
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(format!("the {what} {s:?} has a leading zero"));
    }
    s.parse::<u64>()
        .map_err(|_| format!("the {what} {s:?} is too large"))
}

fn ident_chars_ok(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Version {
    /// Parses `MAJOR[.MINOR[.PATCH]][-PRERELEASE][+BUILD]`.
    pub fn parse(s: &str) -> Result<Version, VersionError> {
        let err = |why: String| VersionError {
            input: s.chars().take(80).collect(),
            why,
        };
        if s.len() > 128 {
            return Err(err("it is longer than 128 bytes".into()));
        }
        let (rest, build) = match s.split_once('+') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        if let Some(b) = build
            && !b.split('.').all(ident_chars_ok)
        {
            return Err(err(format!(
                "the build metadata {b:?} must be dot-separated [0-9A-Za-z-] identifiers"
            )));
        }
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        if core.starts_with(['v', 'V']) {
            return Err(err("it starts with \"v\"; leave the prefix out".into()));
        }
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() > 3 {
            return Err(err(format!(
                "it has {} numeric components; at most 3 (MAJOR.MINOR.PATCH)",
                parts.len()
            )));
        }
        let mut nums = [0u64; 3];
        for (i, (p, what)) in parts.iter().zip(["major", "minor", "patch"]).enumerate() {
            nums[i] = number(p, &format!("{what} version")).map_err(err)?;
        }
        let mut idents = Vec::new();
        if let Some(p) = pre {
            for id in p.split('.') {
                if !ident_chars_ok(id) {
                    return Err(err(format!(
                        "the pre-release {p:?} must be dot-separated [0-9A-Za-z-] identifiers"
                    )));
                }
                if id.bytes().all(|b| b.is_ascii_digit()) {
                    idents.push(Ident::Num(
                        number(id, "pre-release identifier").map_err(err)?,
                    ));
                } else {
                    idents.push(Ident::Text(id.to_string()));
                }
            }
        }
        Ok(Version {
            text: s.to_string(),
            core: nums,
            pre: idents,
        })
    }

    /// The text as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this is a pre-release (`-rc.1` and the like).
    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core.cmp(&other.core).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A pre-release comes before its release.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Lexicographic over identifiers, the shorter list first
                // when it is a prefix: exactly semver's rule.
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn version_order_is_semver_precedence() {
        // Each strictly below the next: semver.org's own example list, plus
        // short forms and numeric components past 9.
        let ordered = [
            "0.5",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.1-rc1",
            "1.1",
            "1.9.3",
            "1.10.0",
            "2",
            "10",
        ];
        for w in ordered.windows(2) {
            assert!(v(w[0]) < v(w[1]), "{} < {}", w[0], w[1]);
            assert!(v(w[1]) > v(w[0]), "{} > {}", w[1], w[0]);
        }
    }

    #[test]
    fn prerelease_sorts_before_its_release() {
        assert!(v("1.1-rc1") < v("1.1"));
        assert!(v("2.0.0-rc.1") < v("2.0.0"));
        assert!(v("2.0.0-rc.1").is_prerelease());
    }

    #[test]
    fn short_forms_and_build_metadata_are_equal() {
        assert_eq!(v("2"), v("2.0.0"));
        assert_eq!(v("2.0"), v("2.0.0"));
        assert_eq!(v("1.0+build.5"), v("1.0.0+other"));
        assert_eq!(v("1.0+build.5").as_str(), "1.0+build.5");
    }

    #[test]
    fn non_versions_are_refused_with_a_reason() {
        for bad in [
            "banana",
            "",
            "1.",
            ".1",
            "1..2",
            "1.2.3.4",
            "v1.2",
            "1.02",
            "1.2-",
            "1.2-rc..1",
            "1.2-rc.01",
            "1.2+",
            "1.2-r_c",
            "-1",
            "1.2 ",
        ] {
            let e = Version::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("semantic version"), "{e}");
        }
        let e = Version::parse("banana").unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }
}
