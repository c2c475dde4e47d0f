//! What a `[[services]] kubeconfig` file says about reaching a Kubernetes
//! API server: the server's URL, the CA its certificate chains to, and the
//! credential (a token or token file, a client certificate, user and
//! password), from the current context or a named one. Files it names are
//! relative to the kubeconfig's own directory, as kubectl reads them.
//! Credential plugins (`exec`, `auth-provider`) are refused: the node runs
//! no programs to authenticate.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

/// Where PEM bytes come from: inline (`...-data`, base64) or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pem {
    Data(Vec<u8>),
    File(PathBuf),
}

/// How the node authenticates to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeAuth {
    Token(String),
    TokenFile(PathBuf),
    Basic { user: String, password: String },
    ClientCert { cert: Pem, key: Pem },
}

/// One context's cluster and user, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeAccess {
    /// The context used.
    pub context: String,
    /// The API server's URL.
    pub server: String,
    /// The CA its certificate must chain to (none: the public roots).
    pub ca: Option<Pem>,
    pub auth: Option<KubeAuth>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<Named<User>>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(default, rename = "current-context")]
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    #[serde(default = "Option::default")]
    item: Option<T>,
}

#[derive(Deserialize, Default)]
struct Cluster {
    #[serde(default)]
    server: String,
    #[serde(default, rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
    #[serde(default, rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(default, rename = "insecure-skip-tls-verify")]
    insecure: bool,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(default)]
    token: Option<String>,
    #[serde(default, rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "client-certificate")]
    cert_file: Option<PathBuf>,
    #[serde(default, rename = "client-certificate-data")]
    cert_data: Option<String>,
    #[serde(default, rename = "client-key")]
    key_file: Option<PathBuf>,
    #[serde(default, rename = "client-key-data")]
    key_data: Option<String>,
    #[serde(default)]
    exec: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "auth-provider")]
    auth_provider: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
struct Context {
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    user: String,
}

/// Reads `text` (the file at `path`, whose directory relative paths are
/// taken from) for `context` (none: its current context). Errors name what
/// is missing and never quote a credential.
pub fn parse(text: &str, path: &Path, context: Option<&str>) -> Result<KubeAccess, String> {
    let file: File = yaml_serde::from_str(text).map_err(|e| {
        // The parser's message may quote the line it stopped at, which may
        // hold a credential: say where only.
        match e.location() {
            Some(at) => format!(
                "not a kubeconfig: bad YAML at line {}, column {}",
                at.line(),
                at.column()
            ),
            None => "not a kubeconfig: bad YAML".to_string(),
        }
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let relative = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let wanted = context.unwrap_or(&file.current_context);
    if wanted.is_empty() {
        return Err("no current-context; name one with kubeconfig_context".to_string());
    }
    let ctx = find(&file.contexts, wanted, "context")?;
    let cluster = find(&file.clusters, &ctx.cluster, "cluster")?;
    if cluster.server.is_empty() {
        return Err(format!("cluster {:?} has no server", ctx.cluster));
    }
    if cluster.insecure {
        return Err(format!(
            "cluster {:?} sets insecure-skip-tls-verify; the node checks the API server's certificate: give certificate-authority or certificate-authority-data",
            ctx.cluster
        ));
    }
    let decode = |what: &str, data: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|_| format!("{what} is not base64"))
    };
    let ca = match (&cluster.ca_data, &cluster.ca_file) {
        (Some(data), _) => Some(Pem::Data(decode("certificate-authority-data", data)?)),
        (None, Some(file)) => Some(Pem::File(relative(file))),
        (None, None) => None,
    };
    let auth = if ctx.user.is_empty() {
        None
    } else {
        let user = find(&file.users, &ctx.user, "user")?;
        if user.exec.is_some() || user.auth_provider.is_some() {
            return Err(format!(
                "user {:?} authenticates with a credential plugin (exec or auth-provider), which the node does not run: give it a token, tokenFile or client certificate",
                ctx.user
            ));
        }
        let cert = match (&user.cert_data, &user.cert_file) {
            (Some(d), _) => Some(Pem::Data(decode("client-certificate-data", d)?)),
            (None, Some(f)) => Some(Pem::File(relative(f))),
            (None, None) => None,
        };
        let key = match (&user.key_data, &user.key_file) {
            (Some(d), _) => Some(Pem::Data(decode("client-key-data", d)?)),
            (None, Some(f)) => Some(Pem::File(relative(f))),
            (None, None) => None,
        };
        match (&user.token, &user.token_file, &user.username, cert, key) {
            (Some(t), ..) if !t.trim().is_empty() => Some(KubeAuth::Token(t.trim().to_string())),
            (_, Some(f), ..) => Some(KubeAuth::TokenFile(relative(f))),
            (_, _, Some(u), ..) => Some(KubeAuth::Basic {
                user: u.clone(),
                password: user.password.clone().unwrap_or_default(),
            }),
            (.., Some(cert), Some(key)) => Some(KubeAuth::ClientCert { cert, key }),
            (.., Some(_), None) | (.., None, Some(_)) => {
                return Err(format!(
                    "user {:?}: a client certificate and its key go together",
                    ctx.user
                ))
            }
            _ => None,
        }
    };
    Ok(KubeAccess {
        context: wanted.to_string(),
        server: cluster.server.trim_end_matches('/').to_string(),
        ca,
        auth,
    })
}

fn find<'a, T: Default>(list: &'a [Named<T>], name: &str, what: &str) -> Result<&'a T, String> {
    list.iter()
        .find(|n| n.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = list.iter().map(|n| n.name.as_str()).collect();
            format!(
                "no {what} named {name:?} (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?
        .item
        .as_ref()
        .ok_or_else(|| format!("{what} {name:?} is empty"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: ci
clusters:
- name: prod
  cluster:
    server: https://198.19.0.10:6443/
    certificate-authority-data: LS0tLS1CRUdJTg==
- name: lab
  cluster:
    server: https://198.19.0.11:6443
    certificate-authority: certs/ca.pem
contexts:
- name: ci
  context:
    cluster: prod
    user: deployer
- name: lab
  context:
    cluster: lab
    user: cert-user
- name: plugin
  context:
    cluster: lab
    user: gke
users:
- name: deployer
  user:
    token: sa-token-1
- name: cert-user
  user:
    client-certificate: certs/me.pem
    client-key-data: a2V5
- name: gke
  user:
    exec:
      command: gke-gcloud-auth-plugin
"#;

    #[test]
    fn the_current_context_or_a_named_one() {
        let path = Path::new("/etc/tern/kubeconfig");
        let ci = parse(KUBECONFIG, path, None).unwrap();
        assert_eq!(ci.context, "ci");
        assert_eq!(ci.server, "https://198.19.0.10:6443");
        assert_eq!(ci.ca, Some(Pem::Data(b"-----BEGIN".to_vec())));
        assert_eq!(ci.auth, Some(KubeAuth::Token("sa-token-1".into())));
        let lab = parse(KUBECONFIG, path, Some("lab")).unwrap();
        assert_eq!(lab.ca, Some(Pem::File("/etc/tern/certs/ca.pem".into())));
        assert_eq!(
            lab.auth,
            Some(KubeAuth::ClientCert {
                cert: Pem::File("/etc/tern/certs/me.pem".into()),
                key: Pem::Data(b"key".to_vec()),
            })
        );
    }

    #[test]
    fn what_the_node_cannot_use_is_refused_by_name_without_quoting_secrets() {
        let path = Path::new("k");
        let plugin = parse(KUBECONFIG, path, Some("plugin")).unwrap_err();
        assert!(plugin.contains("credential plugin"), "{plugin}");
        let none = parse(KUBECONFIG, path, Some("staging")).unwrap_err();
        assert!(
            none.contains("no context named \"staging\" (it has: ci, lab, plugin)"),
            "{none}"
        );
        let insecure = KUBECONFIG.replace(
            "    server: https://198.19.0.10:6443/\n",
            "    server: https://198.19.0.10:6443/\n    insecure-skip-tls-verify: true\n",
        );
        let err = parse(&insecure, path, None).unwrap_err();
        assert!(err.contains("insecure-skip-tls-verify"), "{err}");
        let bad = "users:\n- name: x\n  user:\n    token: [sa-token-secret\n";
        let err = parse(bad, path, None).unwrap_err();
        assert!(err.contains("bad YAML") && !err.contains("secret"), "{err}");
        let err = parse("current-context: \"\"\n", path, None).unwrap_err();
        assert!(err.contains("kubeconfig_context"), "{err}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in "\\PC{0,300}", ctx in proptest::option::of("[a-z]{0,5}")) {
            let _ = parse(&text, Path::new("k"), ctx.as_deref());
        }

        #[test]
        fn mangled_kubeconfigs_never_panic(cut in 0usize..900, byte in any::<u8>()) {
            let mut bytes = KUBECONFIG.as_bytes().to_vec();
            let at = cut.min(bytes.len() - 1);
            bytes[at] = byte;
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse(&text, Path::new("k"), None);
        }
    }
}
