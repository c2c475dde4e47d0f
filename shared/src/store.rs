//! `[store]` of a lighthouse: where its lasting state lives (tokens and
//! their uses, leased addresses, the issuance log, used OIDC tokens,
//! revocations) — a SQLite file of its own, or a PostgreSQL database
//! several lighthouses share. Parsed as part of
//! [`crate::config::LighthouseConfig`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::ConfigError;

/// The environment variable a PostgreSQL store's password is read from
/// (unless `password_file` names a file).
pub const PASSWORD_ENV: &str = "TERN_STORE_PASSWORD";

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite:PATH` (relative to the config file) or
    /// `postgres://USER@HOST:PORT/DB?sslmode=disable`. Default: the SQLite
    /// file of `[enroll] store`, else `lighthouse.db` beside the config.
    pub url: Option<String>,
    /// A file holding the PostgreSQL password (mode 0600); without it, the
    /// password comes from `TERN_STORE_PASSWORD`. Never in the URL.
    pub password_file: Option<PathBuf>,
}

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// A PostgreSQL URL, without a password.
    Postgres(String),
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreLocation::Postgres(url) => f.write_str(url),
        }
    }
}

/// The `sslmode`s a PostgreSQL URL may name. `prefer` (libpq's default)
/// speaks without TLS; `require`, `verify-ca` and `verify-full` all use TLS
/// and verify the server's certificate chain and name (against the CA file
/// `sslrootcert=PATH`, else the public web's roots): a store that holds
/// tokens never talks TLS to a server it has not verified.
pub const SSL_MODES: [&str; 5] = ["disable", "prefer", "require", "verify-ca", "verify-full"];

/// Reads a store URL; relative SQLite paths resolve against `base`.
pub fn parse_store_url(url: &str, base: &Path) -> Result<StoreLocation, String> {
    let url = url.trim();
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err("sqlite: needs a file, e.g. \"sqlite:lighthouse.db\"".into());
        }
        let path = Path::new(path);
        return Ok(StoreLocation::Sqlite(if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        }));
    }
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        let scheme = url.split(':').next().unwrap_or(url);
        return Err(format!(
            "unknown store scheme {scheme:?}: use \"sqlite:PATH\" or \"postgres://USER@HOST:PORT/DB?sslmode=disable\""
        ));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(format!(
                "the URL carries a password; put it in {PASSWORD_ENV} or [store] password_file instead, so it is never on a command line or in a log"
            ));
        }
    }
    if authority.is_empty() {
        return Err("postgres:// needs a host, e.g. postgres://tern@db.internal:5432/tern".into());
    }
    if let Some(query) = rest.split_once('?').map(|(_, q)| q) {
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", mode)) if !SSL_MODES.contains(&mode) => {
                    return Err(format!(
                        "sslmode={mode} is not known: use verify-full (TLS, the server's certificate and name verified; require and verify-ca mean the same here) or disable (no TLS: a local socket or a network you trust)"
                    ));
                }
                Some(("sslrootcert", path)) if !Path::new(path).is_absolute() => {
                    return Err(format!(
                        "sslrootcert={path}: give the CA file's absolute path"
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(StoreLocation::Postgres(url.to_string()))
}

impl StoreConfig {
    /// Where the store is: `url`, else the SQLite file `default`.
    pub fn location(&self, default: PathBuf, base: &Path) -> Result<StoreLocation, String> {
        match &self.url {
            Some(url) => parse_store_url(url, base),
            None => Ok(StoreLocation::Sqlite(default)),
        }
    }

    pub(crate) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            let base = file.parent().unwrap_or(Path::new("."));
            parse_store_url(url, base).map_err(|message| ConfigError::Invalid {
                file: file.to_path_buf(),
                key: "store.url".into(),
                message,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn store_urls() {
        let base = Path::new("/etc/tern");
        assert_eq!(
            parse_store_url("sqlite:state/lh.db", base),
            Ok(StoreLocation::Sqlite("/etc/tern/state/lh.db".into()))
        );
        assert_eq!(
            parse_store_url("sqlite:/var/lib/tern/lh.db", base),
            Ok(StoreLocation::Sqlite("/var/lib/tern/lh.db".into()))
        );
        for good in [
            "postgres://tern@db:5432/tern?sslmode=disable",
            "postgres://tern@db:5432/tern?sslmode=verify-full&sslrootcert=/etc/tern/db-ca.pem",
            "postgres://tern@db:5432/tern?sslmode=require",
        ] {
            assert!(matches!(
                parse_store_url(good, base),
                Ok(StoreLocation::Postgres(_))
            ));
        }
        for (bad, says) in [
            ("mysql://x@db/tern", "unknown store scheme \"mysql\""),
            ("postgres://tern:s3cret@db/tern", "carries a password"),
            ("postgres:///tern", "needs a host"),
            ("postgres://tern@db/tern?sslmode=verify-some", "not known"),
            (
                "postgres://tern@db/tern?sslrootcert=ca.pem",
                "absolute path",
            ),
            ("sqlite:", "needs a file"),
        ] {
            let err = parse_store_url(bad, base).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in "\\PC*") {
            let _ = parse_store_url(&s, Path::new("/"));
        }
    }
}
