//! `[admin]` in a lighthouse's config: the admin API and console on the
//! lighthouse's overlay address, reached only through the mesh, and who may
//! use it. The caller is the certificate the lighthouse verified for the
//! session the connection came over: `groups` may read and act,
//! `read_groups` may only read, everyone else is refused (403, naming the
//! group missing). No password, no token, no cookie.

use std::path::Path;

use serde::Deserialize;

use crate::config::{invalid, ConfigError};

/// The admin port when none is given: plain HTTP on the overlay address
/// (the mesh encrypts and authenticates it), so `http://<lighthouse>/` works.
pub const DEFAULT_ADMIN_PORT: u16 = 80;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The TCP port on the lighthouse's overlay address; 0 turns the
    /// listener off (the API socket still serves the API locally).
    pub port: u16,
    /// Groups whose members may read and act (create tokens, revoke).
    pub groups: Vec<String>,
    /// Groups whose members may only read.
    pub read_groups: Vec<String>,
    /// Host names the console and API answer to through the mesh, besides
    /// the overlay address, loopback (a local forward) and the
    /// lighthouse's own name with and without `.tern`. Any other `Host`
    /// is refused: a page elsewhere cannot point a name of its own at the
    /// lighthouse (DNS rebinding) and read the console with the admin's
    /// certificate.
    pub hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            port: DEFAULT_ADMIN_PORT,
            groups: vec!["admin".into()],
            read_groups: vec!["admin".into(), "auditor".into()],
            hosts: Vec::new(),
        }
    }
}

/// Whether `g` can be a group in a certificate: 1-64 of A-Z a-z 0-9 . _ -.
pub fn is_group_name(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 64
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `h` is a DNS host name: 1-253 bytes of labels of A-Z a-z 0-9
/// and '-', separated by dots.
pub fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    None,
    Read,
    Write,
}

impl AdminConfig {
    /// What a caller in `groups` may do.
    pub fn access(&self, groups: &[String]) -> Access {
        let any = |allowed: &[String]| allowed.iter().any(|g| groups.contains(g));
        if any(&self.groups) {
            Access::Write
        } else if any(&self.read_groups) {
            Access::Read
        } else {
            Access::None
        }
    }

    pub(crate) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        for (key, list) in [
            ("admin.groups", &self.groups),
            ("admin.read_groups", &self.read_groups),
        ] {
            for g in list {
                if !is_group_name(g) {
                    return Err(invalid(
                        file,
                        key,
                        format!("{g:?} is not a group name (1-64 of A-Z a-z 0-9 . _ -)"),
                    ));
                }
            }
        }
        for h in &self.hosts {
            if !is_host_name(h) {
                return Err(invalid(
                    file,
                    "admin.hosts",
                    format!("{h:?} is not a host name (letters, digits, '-' and '.', no port)"),
                ));
            }
        }
        if self.port != 0 && self.groups.is_empty() && self.read_groups.is_empty() {
            return Err(invalid(
                file,
                "admin.groups",
                "no group may use the admin listener; name one (e.g. [\"admin\"]), or set port = 0 to turn it off",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writers_readers_and_everyone_else() {
        let c = AdminConfig::default();
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(c.access(&g(&["ci", "admin"])), Access::Write);
        assert_eq!(c.access(&g(&["auditor"])), Access::Read);
        assert_eq!(c.access(&g(&["ci"])), Access::None);
        assert_eq!(c.access(&[]), Access::None);
    }

    #[test]
    fn bad_groups_and_nobody_allowed_are_refused_by_name() {
        let file = Path::new("/etc/tern/lighthouse.toml");
        let bad = AdminConfig {
            groups: vec!["ad min".into()],
            ..AdminConfig::default()
        };
        assert!(bad
            .validate(file)
            .unwrap_err()
            .to_string()
            .contains("admin.groups"));
        let nobody = AdminConfig {
            groups: vec![],
            read_groups: vec![],
            ..AdminConfig::default()
        };
        assert!(nobody
            .validate(file)
            .unwrap_err()
            .to_string()
            .contains("port = 0"));
        let off = AdminConfig { port: 0, ..nobody };
        assert!(off.validate(file).is_ok());
        let bad_host = AdminConfig {
            hosts: vec!["console.example:80".into()],
            ..AdminConfig::default()
        };
        assert!(bad_host
            .validate(file)
            .unwrap_err()
            .to_string()
            .contains("admin.hosts"));
        assert!(is_host_name("lh-1.mesh.example"));
        assert!(!is_host_name("a..b") && !is_host_name("") && !is_host_name("a b"));
    }
}
