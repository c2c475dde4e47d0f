//! `[[services]]` of a node config: HTTP APIs inside the private network
//! that the node forwards to on its overlay address, adding its own
//! credential and the verified caller's identity, so that callers (CI jobs)
//! hold no credential for them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::ConfigError;

/// Default header carrying the caller's certificate name.
pub const DEFAULT_CALLER_NAME_HEADER: &str = "Tern-Caller-Name";
/// Default header carrying the caller's certificate groups (comma-separated).
pub const DEFAULT_CALLER_GROUPS_HEADER: &str = "Tern-Caller-Groups";
/// Default `audit_log`.
pub const DEFAULT_SERVICES_AUDIT_LOG: &str = "/var/log/tern/services.jsonl";

/// Default `impersonate_prefix`.
pub const DEFAULT_IMPERSONATE_PREFIX: &str = "tern:";
/// Where a pod finds its ServiceAccount's token and the cluster's CA.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// What a service's upstream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Any HTTP API: the caller named in `caller_name_header` and
    /// `caller_groups_header`.
    #[default]
    Http,
    /// A Kubernetes API server: the node authenticates as its
    /// ServiceAccount (in-cluster by default) and impersonates the caller
    /// (`Impersonate-User: tern:NAME`, one `Impersonate-Group: tern:GROUP`
    /// per group), so the cluster's RBAC and audit see the CI job.
    Kubernetes,
}

/// One `[[services]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's name: lower-case letters, digits and `-`.
    pub name: String,
    /// `http` (default) or `kubernetes`.
    #[serde(default)]
    pub kind: ServiceKind,
    /// Kubernetes: what the impersonated user and groups start with.
    /// Default [`DEFAULT_IMPERSONATE_PREFIX`].
    #[serde(default = "default_impersonate_prefix")]
    pub impersonate_prefix: String,
    /// The TCP port on the node's overlay address callers connect to.
    pub listen: u16,
    /// Where requests go: `http://HOST[:PORT][/PATH]`; the caller's path is
    /// appended to PATH. With `kubeconfig`, default: its cluster's server.
    #[serde(default)]
    pub upstream: String,
    /// Kubernetes: a kubeconfig file (mode 0600) whose context gives the
    /// API server, its CA and the node's credential (token, tokenFile,
    /// client certificate, or user and password), instead of the pod's
    /// ServiceAccount and the keys above.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig's context to use. Default: its current-context.
    #[serde(default)]
    pub kubeconfig_context: Option<String>,
    /// Certificate groups allowed to call (any one of them). Empty: every
    /// verified peer the firewall lets in.
    #[serde(default)]
    pub groups: Vec<String>,
    /// A file holding the bearer token the node sends upstream
    /// (`Authorization: Bearer ...`); mode 0600 or 0400.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// A file holding `user:password` the node sends upstream (basic auth);
    /// mode 0600 or 0400.
    #[serde(default)]
    pub basic_auth_file: Option<PathBuf>,
    /// An https upstream: the CA certificates (PEM) its certificate must
    /// chain to. Default: the public web roots.
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
    /// An https upstream that wants a client certificate: this node's
    /// (PEM chain), with `client_key` (PEM, mode 0600 or 0400).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// The header naming the caller. Default [`DEFAULT_CALLER_NAME_HEADER`].
    #[serde(default = "default_name_header")]
    pub caller_name_header: String,
    /// The header listing the caller's groups. Default
    /// [`DEFAULT_CALLER_GROUPS_HEADER`].
    #[serde(default = "default_groups_header")]
    pub caller_groups_header: String,
    /// The JSON-lines audit file, one line per request. Default
    /// [`DEFAULT_SERVICES_AUDIT_LOG`].
    #[serde(default = "default_audit_log")]
    pub audit_log: PathBuf,
}

fn default_impersonate_prefix() -> String {
    DEFAULT_IMPERSONATE_PREFIX.into()
}

fn default_name_header() -> String {
    DEFAULT_CALLER_NAME_HEADER.into()
}

fn default_groups_header() -> String {
    DEFAULT_CALLER_GROUPS_HEADER.into()
}

fn default_audit_log() -> PathBuf {
    PathBuf::from(DEFAULT_SERVICES_AUDIT_LOG)
}

/// An upstream URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// https.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path prefix, without a trailing `/` (empty for none).
    pub base_path: String,
}

impl Upstream {
    /// Parses `http[s]://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let (tls, rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest, 80)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest, 443)
        } else {
            return Err("expected http[s]://HOST[:PORT][/PATH]".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err("the upstream URL may not carry a query or fragment".into());
        }
        let target = if authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !p.is_empty() && (!h.contains(':') || h.ends_with(']')))
        {
            crate::transport::StreamTarget::parse(authority)
        } else {
            crate::transport::StreamTarget::parse(&format!("{authority}:{default_port}"))
        }
        .map_err(|_| "expected http[s]://HOST[:PORT][/PATH]".to_string())?;
        Ok(Upstream {
            tls,
            host: target.host,
            port: target.port,
            base_path: path.trim_end_matches('/').to_string(),
        })
    }

    /// `HOST:PORT` as a Host header says it.
    pub fn authority(&self) -> String {
        crate::transport::StreamTarget {
            host: self.host.clone(),
            port: self.port,
        }
        .to_string()
    }
}

impl ServiceConfig {
    pub(crate) fn resolve(&mut self, base: &Path) {
        for p in [
            &mut self.bearer_token_file,
            &mut self.basic_auth_file,
            &mut self.upstream_ca,
            &mut self.client_cert,
            &mut self.client_key,
            &mut self.kubeconfig,
        ]
        .into_iter()
        .flatten()
        {
            *p = crate::config::resolve(base, p);
        }
        self.audit_log = crate::config::resolve(base, &self.audit_log);
    }

    pub(crate) fn validate(&self, file: &Path, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("services[{i}].{k}");
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(crate::config::invalid(
                file,
                key("name"),
                format!(
                    "{:?}: use 1 to 63 lower-case letters, digits and '-'",
                    self.name
                ),
            ));
        }
        if self.listen == 0 || self.listen == crate::control::CONTROL_PORT {
            return Err(crate::config::invalid(
                file,
                key("listen"),
                format!("{}: give a port for the service on this node's overlay address (not 0, not {})", self.listen, crate::control::CONTROL_PORT),
            ));
        }
        if self.kubeconfig.is_some() {
            if self.kind != ServiceKind::Kubernetes {
                return Err(crate::config::invalid(
                    file,
                    key("kubeconfig"),
                    "only a kind = \"kubernetes\" service reads a kubeconfig",
                ));
            }
            for (k, set) in [
                ("bearer_token_file", self.bearer_token_file.is_some()),
                ("basic_auth_file", self.basic_auth_file.is_some()),
                ("upstream_ca", self.upstream_ca.is_some()),
                ("client_cert", self.client_cert.is_some()),
                ("client_key", self.client_key.is_some()),
            ] {
                if set {
                    return Err(crate::config::invalid(
                        file,
                        key(k),
                        "the kubeconfig gives the credential and the CA; remove this key or the kubeconfig",
                    ));
                }
            }
        } else if self.kubeconfig_context.is_some() {
            return Err(crate::config::invalid(
                file,
                key("kubeconfig_context"),
                "names a context of `kubeconfig`, which is not set",
            ));
        }
        if self.upstream.is_empty() && self.kubeconfig.is_none() {
            return Err(crate::config::invalid(
                file,
                key("upstream"),
                "missing: give the URL requests go to, e.g. upstream = \"http://198.19.4.30:8080\"",
            ));
        }
        if !self.upstream.is_empty() {
            let upstream = Upstream::parse(&self.upstream).map_err(|e| {
                crate::config::invalid(file, key("upstream"), format!("{:?}: {e}", self.upstream))
            })?;
            if !upstream.tls {
                for (k, set) in [
                    ("upstream_ca", self.upstream_ca.is_some()),
                    ("client_cert", self.client_cert.is_some()),
                ] {
                    if set {
                        return Err(crate::config::invalid(
                            file,
                            key(k),
                            "only an https upstream uses it; write the upstream as https://... or remove it",
                        ));
                    }
                }
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(crate::config::invalid(
                file,
                key("client_key"),
                "client_cert and client_key go together",
            ));
        }
        if self.bearer_token_file.is_some() && self.basic_auth_file.is_some() {
            return Err(crate::config::invalid(
                file,
                key("basic_auth_file"),
                "give one credential: bearer_token_file or basic_auth_file",
            ));
        }
        for (k, header) in [
            ("caller_name_header", &self.caller_name_header),
            ("caller_groups_header", &self.caller_groups_header),
        ] {
            let ok = !header.is_empty()
                && header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !header.eq_ignore_ascii_case("authorization")
                && !header.eq_ignore_ascii_case("host");
            if !ok {
                return Err(crate::config::invalid(
                    file,
                    key(k),
                    format!("{header:?} is not a header name this node may set (letters, digits and '-')"),
                ));
            }
        }
        if self.kind == ServiceKind::Kubernetes
            && (self.impersonate_prefix.is_empty()
                || self.impersonate_prefix.starts_with("system:")
                || self
                    .impersonate_prefix
                    .chars()
                    .any(|c| c.is_control() || c == ','))
        {
            return Err(crate::config::invalid(
                file,
                key("impersonate_prefix"),
                format!(
                    "{:?}: give a prefix of your own (default \"{DEFAULT_IMPERSONATE_PREFIX}\"), never one of Kubernetes' system: names",
                    self.impersonate_prefix
                ),
            ));
        }
        if self.groups.iter().any(|g| g.trim().is_empty()) {
            return Err(crate::config::invalid(
                file,
                key("groups"),
                "a group is empty",
            ));
        }
        Ok(())
    }
}

/// Checks the `[[services]]` list as a whole: each entry, and no two with
/// one name or one port.
pub(crate) fn validate_all(services: &[ServiceConfig], file: &Path) -> Result<(), ConfigError> {
    for (i, s) in services.iter().enumerate() {
        s.validate(file, i)?;
        if let Some(j) = services[..i].iter().position(|o| o.name == s.name) {
            return Err(crate::config::invalid(
                file,
                format!("services[{i}].name"),
                format!(
                    "{:?} is also services[{j}]; give each service its own name",
                    s.name
                ),
            ));
        }
        if let Some(j) = services[..i].iter().position(|o| o.listen == s.listen) {
            return Err(crate::config::invalid(
                file,
                format!("services[{i}].listen"),
                format!("port {} is also services[{j}]'s", s.listen),
            ));
        }
    }
    Ok(())
}

/// Whether a caller with `caller_groups` may use a service allowing
/// `allowed` (empty: everyone); when not, why, naming the groups.
pub fn authorize(allowed: &[String], caller_groups: &[String]) -> Result<(), String> {
    if allowed.is_empty() || allowed.iter().any(|g| caller_groups.contains(g)) {
        return Ok(());
    }
    let have = if caller_groups.is_empty() {
        "none".to_string()
    } else {
        caller_groups.join(", ")
    };
    Err(format!(
        "this service is for group {}; your certificate's groups: {have}",
        allowed.join(" or ")
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upstreams() {
        let u = Upstream::parse("http://198.19.0.10:8080/api/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("198.19.0.10", 8080, "/api")
        );
        assert_eq!(u.authority(), "198.19.0.10:8080");
        let u = Upstream::parse("http://api.internal").unwrap();
        assert_eq!((u.port, u.base_path.as_str()), (80, ""));
        let u = Upstream::parse("https://api.internal/k8s").unwrap();
        assert_eq!((u.tls, u.port, u.base_path.as_str()), (true, 443, "/k8s"));
        assert!(!Upstream::parse("http://api").unwrap().tls);
        for bad in [
            "",
            "api:80",
            "http://",
            "http://api:0",
            "http://api/x?y=1",
            "ftp://x",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn callers_outside_the_groups_are_told_which() {
        let allowed = vec!["ci".to_string(), "deploy".to_string()];
        assert!(authorize(&allowed, &["deploy".into()]).is_ok());
        assert!(authorize(&[], &[]).is_ok());
        let why = authorize(&allowed, &["dev".into()]).unwrap_err();
        assert!(why.contains("ci or deploy") && why.contains("dev"), "{why}");
        assert!(authorize(&allowed, &[]).unwrap_err().contains("none"));
    }

    fn node(extra: &str) -> Result<crate::config::NodeConfig, ConfigError> {
        crate::config::NodeConfig::parse(
            &format!("[pki]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n{extra}"),
            Path::new("/etc/tern/node.toml"),
        )
    }

    fn invalid_key(r: Result<crate::config::NodeConfig, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn services_in_a_node_config() {
        let config = node(
            "[[services]]\nname = \"api\"\nlisten = 9000\nupstream = \"http://198.19.0.10:8080/v1\"\ngroups = [\"ci\"]\nbearer_token_file = \"api.token\"\n",
        )
        .unwrap();
        let k8s = node(
            "[[services]]\nname = \"k8s\"\nkind = \"kubernetes\"\nlisten = 6443\nkubeconfig = \"kc.yaml\"\nkubeconfig_context = \"ci\"\n",
        )
        .unwrap();
        assert_eq!(
            k8s.services[0].kubeconfig,
            Some(PathBuf::from("/etc/tern/kc.yaml"))
        );
        assert_eq!(k8s.services[0].upstream, "");
        let s = &config.services[0];
        assert_eq!(
            s.bearer_token_file,
            Some(PathBuf::from("/etc/tern/api.token"))
        );
        assert_eq!(s.caller_name_header, DEFAULT_CALLER_NAME_HEADER);
        assert_eq!(s.audit_log, PathBuf::from(DEFAULT_SERVICES_AUDIT_LOG));
        let base = "name = \"api\"\nlisten = 9000\nupstream = \"http://api:80\"\n";
        for (extra, key) in [
            (
                "name = \"API\"\nlisten = 9000\nupstream = \"http://api\"\n",
                "services[0].name",
            ),
            (
                "name = \"api\"\nlisten = 0\nupstream = \"http://api\"\n",
                "services[0].listen",
            ),
            (
                "name = \"api\"\nlisten = 9000\nupstream = \"api:80\"\n",
                "services[0].upstream",
            ),
            (
                &format!("{base}bearer_token_file = \"a\"\nbasic_auth_file = \"b\"\n"),
                "services[0].basic_auth_file",
            ),
            (
                &format!("{base}caller_name_header = \"Authorization\"\n"),
                "services[0].caller_name_header",
            ),
            (
                &format!("{base}caller_groups_header = \"x y\"\n"),
                "services[0].caller_groups_header",
            ),
            (&format!("{base}groups = [\"\"]\n"), "services[0].groups"),
            (&format!("{base}upstream_ca = \"ca.pem\"\n"), "services[0].upstream_ca"),
            (
                "name = \"api\"\nlisten = 9000\nupstream = \"https://api\"\nclient_cert = \"c.pem\"\n",
                "services[0].client_key",
            ),
            ("name = \"api\"\nlisten = 9000\n", "services[0].upstream"),
            (
                "name = \"api\"\nlisten = 9000\nkubeconfig = \"kc\"\n",
                "services[0].kubeconfig",
            ),
            (
                "name = \"k\"\nkind = \"kubernetes\"\nlisten = 9000\nkubeconfig = \"kc\"\nbearer_token_file = \"t\"\n",
                "services[0].bearer_token_file",
            ),
            (
                &format!("{base}kubeconfig_context = \"ci\"\n"),
                "services[0].kubeconfig_context",
            ),
        ] {
            assert_eq!(
                invalid_key(node(&format!("[[services]]\n{extra}"))),
                key,
                "{extra}"
            );
        }
        let k8s = node(
            "[[services]]\nname = \"k8s\"\nkind = \"kubernetes\"\nlisten = 6443\nupstream = \"https://kubernetes.default.svc\"\n",
        )
        .unwrap();
        assert_eq!(k8s.services[0].kind, ServiceKind::Kubernetes);
        assert_eq!(k8s.services[0].impersonate_prefix, "tern:");
        assert_eq!(
            invalid_key(node(&format!(
                "[[services]]\n{base}kind = \"kubernetes\"\nimpersonate_prefix = \"system:\"\n"
            ))),
            "services[0].impersonate_prefix"
        );
        let twice = format!("[[services]]\n{base}[[services]]\n{base}");
        assert_eq!(invalid_key(node(&twice)), "services[1].name");
        let same_port = format!(
            "[[services]]\n{base}[[services]]\n{}",
            base.replace("\"api\"", "\"other\"")
        );
        assert_eq!(invalid_key(node(&same_port)), "services[1].listen");
    }

    proptest! {
        #[test]
        fn garbage_upstreams_never_panic(text in ".{0,60}") {
            let _ = Upstream::parse(&text);
            let _ = Upstream::parse(&format!("http://{text}"));
        }
    }
}
