//! The credential a service's node adds upstream (a token or user:password
//! file, read again as it rotates, refused when others could read it) and
//! the TLS client for an https upstream.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use hyper::header::HeaderValue;
use tern_shared::kubeconfig::{KubeAccess, KubeAuth, Pem};
use tern_shared::services::ServiceConfig;

/// A credential file is read again this often (tokens rotate: a
/// Kubernetes ServiceAccount's projected token every hour or so).
const CREDENTIAL_REREAD: Duration = Duration::from_secs(60);

/// Where the node's credential comes from.
#[derive(Debug, Clone)]
pub(super) enum CredentialSource {
    /// `bearer_token_file`, or `basic_auth_file` (`basic`).
    File { path: PathBuf, basic: bool },
    /// `kubeconfig`: its user's token, tokenFile, or user and password.
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
}

/// Where the node's credential comes from, and its value as last read.
pub(super) struct Credential {
    source: CredentialSource,
    value: Mutex<(HeaderValue, Instant)>,
}

impl Credential {
    pub(super) fn load(source: CredentialSource) -> anyhow::Result<Credential> {
        let value = Credential::read(&source)?;
        Ok(Credential {
            source,
            value: Mutex::new((value, Instant::now())),
        })
    }

    fn read(source: &CredentialSource) -> anyhow::Result<HeaderValue> {
        let (text, path) = match source {
            CredentialSource::File { path, basic } => {
                let secret = read_secret(path)?;
                let text = if *basic {
                    basic_value(path, &secret)?
                } else {
                    format!("Bearer {secret}")
                };
                (text, path)
            }
            CredentialSource::Kubeconfig { path, context } => {
                let access = read_kubeconfig(path, context.as_deref())?;
                let text = match access.auth {
                    Some(KubeAuth::Token(token)) => format!("Bearer {token}"),
                    Some(KubeAuth::TokenFile(file)) => format!("Bearer {}", read_secret(&file)?),
                    Some(KubeAuth::Basic { user, password }) => {
                        basic_value(path, &format!("{user}:{password}"))?
                    }
                    _ => anyhow::bail!(
                        "{}: context {:?} no longer gives a token or a user and password",
                        path.display(),
                        access.context
                    ),
                };
                (text, path)
            }
        };
        let mut v = HeaderValue::from_str(&text)
            .map_err(|_| anyhow::anyhow!("{}: not a valid header value", path.display()))?;
        v.set_sensitive(true);
        Ok(v)
    }

    /// The value, read again when it is older than [`CREDENTIAL_REREAD`]
    /// (a file that cannot be read now keeps the last value).
    pub(super) fn value(&self, service: &str) -> HeaderValue {
        let mut cached = self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.1.elapsed() >= CREDENTIAL_REREAD {
            cached.1 = Instant::now();
            match Credential::read(&self.source) {
                Ok(v) => cached.0 = v,
                Err(e) => {
                    tracing::warn!(service, error = %e, "re-reading the credential failed; keeping the last one")
                }
            }
        }
        cached.0.clone()
    }
}

fn basic_value(path: &Path, secret: &str) -> anyhow::Result<String> {
    if !secret.contains(':') {
        anyhow::bail!("{}: expected user:password", path.display());
    }
    Ok(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(secret)
    ))
}

/// A `[[services]] kubeconfig`: private (it holds a credential), then read
/// for `context`.
pub(super) fn read_kubeconfig(path: &Path, context: Option<&str>) -> anyhow::Result<KubeAccess> {
    let text = read_secret(path)?;
    tern_shared::kubeconfig::parse(&text, path, context)
        .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))
}

/// Files the kubelet mounts into a pod (its ServiceAccount's token): mode
/// 0644 by default, and seen only inside the pod's own mount namespace.
pub(super) fn kubelet_managed(path: &Path) -> bool {
    [
        "/var/run/secrets/kubernetes.io/",
        "/run/secrets/kubernetes.io/",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// Reads a credential file, refusing one that others on this host could
/// read (jobs on the same node must not see it).
pub(super) fn read_secret(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.mode() & 0o077 != 0 && !kubelet_managed(path) {
        anyhow::bail!(
            "{} is readable by others (mode {:o}); chmod 600 it: the credential is this node's alone",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        anyhow::bail!("{} is empty", path.display());
    }
    Ok(secret)
}

/// What the TLS client for an https upstream checks and shows: the CA
/// (none: the public web roots) and this node's client certificate and key.
#[derive(Debug, Clone, Default)]
pub(super) struct TlsMaterial {
    pub ca: Option<Pem>,
    pub client: Option<(Pem, Pem)>,
}

impl TlsMaterial {
    /// From `upstream_ca`, `client_cert` and `client_key`.
    pub(super) fn from_config(config: &ServiceConfig) -> TlsMaterial {
        TlsMaterial {
            ca: config.upstream_ca.clone().map(Pem::File),
            client: config
                .client_cert
                .clone()
                .zip(config.client_key.clone())
                .map(|(c, k)| (Pem::File(c), Pem::File(k))),
        }
    }
}

/// PEM bytes, and what to call them in an error.
fn pem_bytes(pem: &Pem, what: &str, secret: bool) -> anyhow::Result<(Vec<u8>, String)> {
    match pem {
        Pem::Data(d) => Ok((d.clone(), format!("{what} (kubeconfig data)"))),
        Pem::File(path) => {
            if secret {
                // A key is a credential too: this node's alone.
                read_secret(path)?;
            }
            let bytes =
                std::fs::read(path).with_context(|| format!("{what} {}", path.display()))?;
            Ok((bytes, format!("{what} {}", path.display())))
        }
    }
}

/// The TLS client for an https upstream: its certificate checked against
/// the CA in `material` (else the public web roots), this node's client
/// certificate when given, offering the protocols `alpn`.
pub(super) fn upstream_tls(
    material: &TlsMaterial,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &material.ca {
        Some(ca) => {
            let (bytes, what) = pem_bytes(ca, "upstream_ca", false)?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!("{what}: no CA certificate in it");
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut tls = match &material.client {
        Some((cert, key)) => {
            let (cert, cert_what) = pem_bytes(cert, "client_cert", false)?;
            let (key, key_what) = pem_bytes(key, "client_key", true)?;
            let chain = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{cert_what}: {e}"))?;
            // Never the parser's words about a key: only which one.
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|_| anyhow::anyhow!("{key_what}: not a PEM private key"))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_shared::services::IN_CLUSTER_TOKEN;

    #[test]
    fn basic_credentials_are_user_colon_password() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("basic");
        std::fs::write(&path, "deploy:pa ss\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        let basic = CredentialSource::File {
            path: path.clone(),
            basic: true,
        };
        let v = Credential::read(&basic).unwrap();
        // base64("deploy:pa ss")
        assert_eq!(v.to_str().unwrap(), "Basic ZGVwbG95OnBhIHNz");
        assert!(v.is_sensitive());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "no-colon").unwrap();
        let err = Credential::read(&basic).unwrap_err().to_string();
        assert!(
            err.contains("user:password") && !err.contains("no-colon"),
            "{err}"
        );
        assert!(kubelet_managed(Path::new(IN_CLUSTER_TOKEN)));
        assert!(!kubelet_managed(Path::new("/etc/tern/token")));
    }

    #[test]
    fn credential_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && !err.contains("s3cret"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "s3cret");
    }

    #[test]
    fn a_kubeconfig_gives_the_token_from_its_file_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private =
            |p: &Path| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = dir.path().join("sa.token");
        std::fs::write(&token, "rotating-1\n").unwrap();
        private(&token);
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "current-context: a\nclusters:\n- name: c\n  cluster:\n    server: https://198.19.0.10:6443\n\
             contexts:\n- name: a\n  context:\n    cluster: c\n    user: u\n\
             - name: b\n  context:\n    cluster: c\n    user: v\n\
             users:\n- name: u\n  user:\n    tokenFile: sa.token\n\
             - name: v\n  user:\n    username: deploy\n    password: pw\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let source = |context: Option<&str>| CredentialSource::Kubeconfig {
            path: path.clone(),
            context: context.map(str::to_string),
        };
        let err = Credential::read(&source(None)).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        private(&path);
        let v = Credential::read(&source(None)).unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer rotating-1");
        assert!(v.is_sensitive());
        // base64("deploy:pw")
        let v = Credential::read(&source(Some("b"))).unwrap();
        assert_eq!(v.to_str().unwrap(), "Basic ZGVwbG95OnB3");
        let access = read_kubeconfig(&path, None).unwrap();
        assert_eq!(access.server, "https://198.19.0.10:6443");
        let err = read_kubeconfig(&path, Some("z")).unwrap_err().to_string();
        assert!(err.contains("no context named \"z\""), "{err}");
    }
}
