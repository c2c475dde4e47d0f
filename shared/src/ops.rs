//! How an operator watches a daemon: `[metrics]` (a Prometheus endpoint) and
//! the log's format (`[log] format`, `--log-format`). Both daemons read them
//! the same way.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Deserialize;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For a person: one line per event, `level target: message key=value`.
    #[default]
    Text,
    /// For a log pipeline: one JSON object per line (timestamp, level,
    /// target, the event's fields with `message`, and the spans it is in,
    /// such as the peer's).
    Json,
}

impl LogFormat {
    pub const NAMES: [&'static str; 2] = ["text", "json"];

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--log-format` that is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a log format; use text or json")]
pub struct UnknownLogFormat(pub String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(s.to_string())),
        }
    }
}

/// `[metrics]`: where the daemon serves Prometheus metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The TCP address of the `/metrics` endpoint, e.g. "127.0.0.1:9101".
    /// None (the default): no endpoint. It has no authentication: bind it
    /// to loopback, or to an address only the scraper reaches (a pod's
    /// address in Kubernetes).
    pub listen: Option<SocketAddr>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_parse_in_any_case_and_name_the_bad_one() {
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let err = "xml".parse::<LogFormat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"xml\" is not a log format; use text or json"
        );
        for name in LogFormat::NAMES {
            assert_eq!(name.parse::<LogFormat>().unwrap().as_str(), name);
        }
    }

    proptest! {
        #[test]
        fn any_text_is_a_format_or_an_error(s in ".{0,40}") {
            match s.parse::<LogFormat>() {
                Ok(f) => prop_assert!(f.as_str().eq_ignore_ascii_case(&s)),
                Err(e) => prop_assert_eq!(e.0, s),
            }
        }
    }
}
