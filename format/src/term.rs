//! What both binaries need at their edges: one-line error reports and
//! whether to colour logs.

use std::io::IsTerminal;

/// An error and its causes on one line, `outer: cause: root`, skipping a
/// cause whose text is already in the line. Errors that put `{source}` in
/// their message *and* return it from `source()` (a common `thiserror`
/// pattern) would otherwise print it twice, as in
/// `No such file or directory (os error 2): No such file or directory (os error 2)`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.is_empty() && !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

/// Whether log lines on stderr may carry ANSI colours: only on a terminal,
/// and never when `NO_COLOR` is set to anything (<https://no-color.org>).
/// Redirected logs (files, pipes, systemd) stay plain text.
pub fn stderr_colors() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "server.toml: {}", self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = Outer(std::io::Error::from_raw_os_error(2));
        let s = error_chain(&e);
        assert_eq!(s.matches("os error 2").count(), 1, "{s}");
        assert!(s.starts_with("server.toml: No such file"), "{s}");
    }

    #[test]
    fn a_cause_not_in_the_message_is_appended() {
        #[derive(Debug)]
        struct Ctx(std::io::Error);
        impl std::fmt::Display for Ctx {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("reading the key")
            }
        }
        impl std::error::Error for Ctx {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let s = error_chain(&Ctx(std::io::Error::from_raw_os_error(2)));
        assert!(s.starts_with("reading the key: No such file"), "{s}");
    }
}
