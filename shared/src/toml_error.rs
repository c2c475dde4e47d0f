//! What the TOML parser's errors say, read once for every file Tern parses
//! (node and lighthouse configs, pipelines): the position of an error, its
//! message on one line, and which kind of mistake it is, so each file's
//! error type can name the key and say what to change.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// A 1-based line and column (in characters) in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

/// Converts a byte offset (clamped to the text) into a 1-based line and a
/// 1-based column counted in characters.
pub fn position(text: &str, offset: usize) -> Position {
    let bytes = text.as_bytes();
    let before = &bytes[..offset.min(bytes.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count characters, i.e. bytes that do not continue a UTF-8 sequence.
    let col = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    Position { line, col }
}

/// Formats `file:line:col`, just `file` without a position, and `unnamed`
/// (e.g. `pipeline`) for text that came from no file.
pub struct Place<'a> {
    pub file: &'a PathBuf,
    pub at: &'a Option<Position>,
    pub unnamed: &'a str,
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.as_os_str().is_empty() && !self.unnamed.is_empty() {
            f.write_str(self.unnamed)?;
        } else {
            write!(f, "{}", self.file.display())?;
        }
        match self.at {
            Some(p) => write!(f, ":{}:{}", p.line, p.col),
            None => Ok(()),
        }
    }
}

/// Which kind of mistake a TOML error reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mistake {
    /// A key the format does not know: its name, and what serde expected
    /// instead ("expected one of `name`, `run`, …").
    UnknownKey { name: String, expected: String },
    /// A required key is absent; the span points at the table that lacks
    /// it (or is empty for the top level).
    Missing { name: String },
    /// A value of the wrong type or form (a bad duration, address, ...).
    BadValue,
    /// Anything else: not TOML, or an error tied to no key.
    Syntax,
}

/// A TOML error, read: its message on one line, where it points, and what
/// kind of mistake it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    pub message: String,
    pub span: Option<Range<usize>>,
    pub mistake: Mistake,
}

/// Message starts that report a value of the wrong type or form.
const VALUE_ERRORS: [&str; 9] = [
    "invalid type",
    "invalid value",
    "invalid length",
    "unknown variant",
    "invalid socket address",
    "invalid IP address",
    "bad duration",
    "empty duration",
    "duration ",
];

impl TomlError {
    pub fn read(err: &toml::de::Error) -> TomlError {
        // toml's messages may span lines ("invalid table header\nexpected …").
        let message = err
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let mistake = Self::mistake(&message);
        TomlError {
            message,
            span: err.span(),
            mistake,
        }
    }

    fn mistake(message: &str) -> Mistake {
        if let Some((name, tail)) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
        {
            return Mistake::UnknownKey {
                name: name.to_string(),
                expected: tail.trim_start_matches(',').trim().to_string(),
            };
        }
        if let Some((name, _)) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
        {
            return Mistake::Missing {
                name: name.to_string(),
            };
        }
        if VALUE_ERRORS.iter().any(|p| message.starts_with(p)) {
            return Mistake::BadValue;
        }
        Mistake::Syntax
    }

    /// Where the error points in `text`.
    pub fn at(&self, text: &str) -> Option<Position> {
        self.span.as_ref().map(|s| position(text, s.start))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(text: &str) -> TomlError {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            name: String,
            port: Option<u16>,
        }
        TomlError::read(&toml::from_str::<T>(text).unwrap_err())
    }

    #[test]
    fn each_kind_of_mistake_is_told_apart() {
        let e = read("name = \"a\"\nnmae = 1\n");
        assert_eq!(
            e.mistake,
            Mistake::UnknownKey {
                name: "nmae".into(),
                expected: "expected `name` or `port`".into()
            }
        );
        assert_eq!(e.at("name = \"a\"\nnmae = 1\n").map(|p| p.line), Some(2));
        assert_eq!(
            read("port = 1\n").mistake,
            Mistake::Missing {
                name: "name".into()
            }
        );
        assert_eq!(read("name = 5\n").mistake, Mistake::BadValue);
        let e = read("name = \n");
        assert_eq!(e.mistake, Mistake::Syntax);
        assert!(!e.message.contains('\n'), "{}", e.message);
    }

    #[test]
    fn positions_count_lines_and_characters() {
        assert_eq!(position("a\nbé c", 6), Position { line: 2, col: 4 });
        assert_eq!(position("", 10), Position { line: 1, col: 1 });
    }

    proptest! {
        #[test]
        fn any_text_reads_without_panicking(text in ".{0,200}") {
            if let Err(e) = toml::from_str::<toml::Value>(&text) {
                let read = TomlError::read(&e);
                let _ = read.at(&text);
                prop_assert!(!read.message.contains('\n'));
            }
        }
    }
}
