//! A daemon's own identity: its trusted CAs, its certificate and its key,
//! checked against each other before anything starts. Callers read the
//! files; this module only judges their contents.

use crate::cert::{CaPool, Cert, CertError, VerifiedCert};
use crate::keys::{KeyError, NodeSecretKey};

/// Trusted CAs plus this daemon's verified certificate and matching key.
pub struct Identity {
    pub ca: CaPool,
    pub cert: VerifiedCert,
    pub key: NodeSecretKey,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("CA file: {0}")]
    Ca(CertError),
    #[error("CA file holds no certificate; put the CA's certificate (ca.crt) there")]
    NoCa,
    #[error("certificate file: {0}")]
    Cert(CertError),
    #[error("key file: {0}")]
    Key(KeyError),
    #[error("the key file does not hold the key of this certificate (the certificate names key {cert_key}, the file holds {file_key}); use the key the certificate was signed for")]
    KeyMismatch { cert_key: String, file_key: String },
}

impl Identity {
    /// Parses and cross-checks the three PEM texts at `now_unix`.
    pub fn from_pem(
        ca: &str,
        cert: &str,
        key: &str,
        now_unix: u64,
    ) -> Result<Identity, IdentityError> {
        let cas = Cert::all_from_pem(ca).map_err(IdentityError::Ca)?;
        if cas.is_empty() {
            return Err(IdentityError::NoCa);
        }
        let pool = CaPool::new(cas).map_err(IdentityError::Ca)?;
        let cert = Cert::from_pem(cert).map_err(IdentityError::Cert)?;
        let cert = pool.verify(&cert, now_unix).map_err(IdentityError::Cert)?;
        let key = NodeSecretKey::from_pem(key).map_err(IdentityError::Key)?;
        if key.public_bytes() != cert.public_key() {
            return Err(IdentityError::KeyMismatch {
                cert_key: hex8(&cert.public_key()),
                file_key: hex8(&key.public_bytes()),
            });
        }
        Ok(Identity {
            ca: pool,
            cert,
            key,
        })
    }
}

fn hex8(b: &[u8; 32]) -> String {
    b[..4].iter().map(|x| format!("{x:02x}")).collect()
}
