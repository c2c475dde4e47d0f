//! Output a person reads. Values as a person writes them, for log fields
//! (`endpoint = %or_none(e)`): `198.18.0.2:4242` or `none` rather than
//! `Some(198.18.0.2:4242)`, and `ci, dev` rather than `["ci", "dev"]`. Both
//! wrappers are lazy: nothing is formatted unless the event is logged. And
//! whether to colour it at all.

use std::ffi::OsStr;
use std::fmt::{self, Display};

/// Whether logs on stderr get ANSI colours: only when stderr is a terminal
/// (a log file or the journal would keep the escape codes as text), and not
/// when `NO_COLOR` is set to anything non-empty (<https://no-color.org>).
/// The caller passes `std::io::stderr().is_terminal()` and
/// `std::env::var_os("NO_COLOR")`: this crate does no IO.
pub fn colour_logs(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// An optional value: the value itself, or `none`.
pub fn or_none<T: Display>(value: Option<T>) -> OrNone<T> {
    OrNone(value)
}

/// Items joined by `, `; `none` when there are none. Takes anything
/// iterable that can be walked again (a slice, a `Vec` by reference, a
/// `map` over one).
pub fn list<I>(items: I) -> List<I>
where
    I: IntoIterator + Clone,
    I::Item: Display,
{
    List(items)
}

/// See [`or_none`].
pub struct OrNone<T>(Option<T>);

impl<T: Display> Display for OrNone<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// See [`list`].
pub struct List<I>(I);

impl<I> Display for List<I>
where
    I: IntoIterator + Clone,
    I::Item: Display,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = self.0.clone().into_iter();
        let Some(first) = items.next() else {
            return f.write_str("none");
        };
        write!(f, "{first}")?;
        for item in items {
            write!(f, ", {item}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn colour_only_on_a_terminal_and_never_under_no_color() {
        assert!(colour_logs(true, None));
        assert!(
            colour_logs(true, Some(OsStr::new(""))),
            "empty NO_COLOR is unset"
        );
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None), "a log file gets no escape codes");
    }

    #[test]
    fn options_and_lists_read_as_a_person_writes_them() {
        let addr: SocketAddr = "198.18.0.2:4242".parse().unwrap();
        assert_eq!(or_none(Some(addr)).to_string(), "198.18.0.2:4242");
        assert_eq!(or_none(None::<SocketAddr>).to_string(), "none");
        let groups = vec!["ci".to_string(), "dev".to_string()];
        assert_eq!(list(&groups).to_string(), "ci, dev");
        assert_eq!(list(groups.iter().map(|g| g.len())).to_string(), "2, 3");
        assert_eq!(list(&[] as &[String]).to_string(), "none");
    }
}
