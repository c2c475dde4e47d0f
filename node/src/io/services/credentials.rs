//! The credential a service's node adds upstream (a token or user:password
//! file, read again as it rotates, refused when others could read it) and
//! the TLS client for an https upstream.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use hyper::header::HeaderValue;
use tern_shared::services::ServiceConfig;

/// A credential file is read again this often (tokens rotate: a
/// Kubernetes ServiceAccount's projected token every hour or so).
const CREDENTIAL_REREAD: Duration = Duration::from_secs(60);

/// Where the node's credential comes from, and its value as last read.
pub(super) struct Credential {
    path: std::path::PathBuf,
    basic: bool,
    value: Mutex<(HeaderValue, Instant)>,
}

impl Credential {
    pub(super) fn load(path: &Path, basic: bool) -> anyhow::Result<Credential> {
        let value = Credential::read(path, basic)?;
        Ok(Credential {
            path: path.to_path_buf(),
            basic,
            value: Mutex::new((value, Instant::now())),
        })
    }

    fn read(path: &Path, basic: bool) -> anyhow::Result<HeaderValue> {
        let secret = read_secret(path)?;
        let text = if basic {
            if !secret.contains(':') {
                anyhow::bail!("{}: expected user:password", path.display());
            }
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(secret)
            )
        } else {
            format!("Bearer {secret}")
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
            match Credential::read(&self.path, self.basic) {
                Ok(v) => cached.0 = v,
                Err(e) => {
                    tracing::warn!(service, error = %e, "re-reading the credential failed; keeping the last one")
                }
            }
        }
        cached.0.clone()
    }
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

/// The TLS client for an https upstream: its certificate checked against
/// `upstream_ca` (else the public web roots), this node's client
/// certificate when configured, offering the protocols `alpn`.
pub(super) fn upstream_tls(
    config: &ServiceConfig,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    match &config.upstream_ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("upstream_ca {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!("upstream_ca {}: no CA certificate in it", path.display());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut tls = match (&config.client_cert, &config.client_key) {
        (Some(cert), Some(key)) => {
            // The key is a credential too: this node's alone.
            read_secret(key)?;
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("client_cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow::anyhow!("client_key {}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
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
        let v = Credential::read(&path, true).unwrap();
        // base64("deploy:pa ss")
        assert_eq!(v.to_str().unwrap(), "Basic ZGVwbG95OnBhIHNz");
        assert!(v.is_sensitive());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "no-colon").unwrap();
        let err = Credential::read(&path, true).unwrap_err().to_string();
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
}
