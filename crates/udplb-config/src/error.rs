//! Configuration errors: where (file, line, column, key path) and what.

use std::collections::HashMap;
use std::fmt;

/// One problem in a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as given to [`crate::load`] or [`crate::parse`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// Dotted key path, e.g. `listeners.dns.address`.
    pub key: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.key, self.message
        )
    }
}

/// Every problem found in a configuration, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The problems.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where the keys of a parsed file are, to report problems found after parsing (a user that
/// does not exist, a program that cannot be run) at their line like any other error.
#[derive(Clone, Debug, Default)]
pub struct Positions {
    /// The main file.
    file: String,
    /// File, line and column of every key path read (an included file's keys are in it).
    at: HashMap<String, (String, usize, usize)>,
}

impl Positions {
    pub(crate) fn new(file: &str, at: HashMap<String, (String, usize, usize)>) -> Self {
        Positions {
            file: file.into(),
            at,
        }
    }

    /// An error at the key path `key` (`pools.dns.notify`), or at the closest enclosing key
    /// the files have (the `[runtime]` header for a missing `runtime.user`; else line 1 of
    /// the main file).
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let (file, line, column) = enclosing(&self.at, key)
            .cloned()
            .unwrap_or_else(|| (self.file.clone(), 1, 1));
        ConfigError {
            file,
            line,
            column,
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The value of `key` in `map`, or of the closest enclosing key path that has one.
pub(crate) fn enclosing<'m, V>(map: &'m HashMap<String, V>, key: &str) -> Option<&'m V> {
    let mut probe = key;
    loop {
        if let Some(v) = map.get(probe) {
            return Some(v);
        }
        probe = &probe[..probe.rfind(['.', '['])?];
    }
}

/// Maps byte offsets of a source text to 1-based line and column.
pub(crate) struct Lines<'a> {
    src: &'a str,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        Lines { src }
    }

    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.src.len());
        while !self.src.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.src[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let lines = Lines::new("ab\ncd\n\nxé");
        assert_eq!(lines.position(0), (1, 1));
        assert_eq!(lines.position(4), (2, 2));
        assert_eq!(lines.position(7), (4, 1));
        assert_eq!(lines.position(9), (4, 2)); // inside "é": rounded down
        assert_eq!(lines.position(999), (4, 3));
    }
}
