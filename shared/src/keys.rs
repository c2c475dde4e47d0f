//! Node and CA keys and their armored text form.
//!
//! A node's identity key is an X25519 key: it is also its WireGuard static key.
//! A CA's key is an Ed25519 signing key. Secret types print only a short
//! fingerprint of their public half in `Debug`, never the secret; the secret
//! bytes are wiped on drop by the dalek types they wrap.
//!
//! Armored bodies are the raw 32 key bytes. This module does no file IO: the
//! CLI reads and writes the text.

use crate::armor::{self, ArmorError};
use sha2::{Digest, Sha256};
use std::fmt;

pub const NODE_SECRET_LABEL: &str = "TERN X25519 PRIVATE KEY";
pub const NODE_PUBLIC_LABEL: &str = "TERN X25519 PUBLIC KEY";
pub const CA_SECRET_LABEL: &str = "TERN ED25519 PRIVATE KEY";

/// Why key text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("bad key armor: {0}")]
    Armor(#[from] ArmorError),
    #[error("a {label} holds {expected} bytes, this one holds {found}; the file is damaged or not a Tern key")]
    BadLength {
        label: &'static str,
        expected: usize,
        found: usize,
    },
}

/// A node's X25519 secret key (its WireGuard static private key).
#[derive(Clone)]
pub struct NodeSecretKey(x25519_dalek::StaticSecret);

/// A node's X25519 public key (its WireGuard static public key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePublicKey(pub [u8; 32]);

/// A CA's Ed25519 signing key. Keep it offline.
#[derive(Clone)]
pub struct CaSecretKey(ed25519_dalek::SigningKey);

impl NodeSecretKey {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> NodeSecretKey {
        NodeSecretKey(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> NodeSecretKey {
        NodeSecretKey(x25519_dalek::StaticSecret::from(bytes))
    }

    pub fn public(&self) -> NodePublicKey {
        NodePublicKey(self.public_bytes())
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// A copy of the secret, for handing to boringtun.
    pub fn static_secret(&self) -> x25519_dalek::StaticSecret {
        self.0.clone()
    }

    pub fn to_pem(&self) -> String {
        armor::encode(NODE_SECRET_LABEL, self.0.as_bytes())
    }

    pub fn from_pem(text: &str) -> Result<NodeSecretKey, KeyError> {
        let bytes = decode_32(text, NODE_SECRET_LABEL)?;
        Ok(NodeSecretKey::from_bytes(bytes))
    }
}

impl NodePublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Returns itself; here so every key type answers `public()`.
    pub fn public(&self) -> NodePublicKey {
        *self
    }

    pub fn to_pem(&self) -> String {
        armor::encode(NODE_PUBLIC_LABEL, &self.0)
    }

    pub fn from_pem(text: &str) -> Result<NodePublicKey, KeyError> {
        Ok(NodePublicKey(decode_32(text, NODE_PUBLIC_LABEL)?))
    }

    /// First 8 hex digits of the SHA-256 of the key: enough to tell keys apart in logs.
    pub fn short_fingerprint(&self) -> String {
        short_fingerprint(&self.0)
    }
}

impl CaSecretKey {
    /// A fresh key from the operating system's RNG.
    pub fn generate() -> CaSecretKey {
        CaSecretKey(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> CaSecretKey {
        CaSecretKey(ed25519_dalek::SigningKey::from_bytes(&bytes))
    }

    pub fn public(&self) -> ed25519_dalek::VerifyingKey {
        self.0.verifying_key()
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `message` (a certificate body) with Ed25519.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.0.sign(message).to_bytes()
    }

    pub fn to_pem(&self) -> String {
        armor::encode(CA_SECRET_LABEL, self.0.as_bytes())
    }

    pub fn from_pem(text: &str) -> Result<CaSecretKey, KeyError> {
        let bytes = decode_32(text, CA_SECRET_LABEL)?;
        Ok(CaSecretKey::from_bytes(bytes))
    }
}

impl fmt::Debug for NodeSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NodeSecretKey(pub {})",
            short_fingerprint(&self.public_bytes())
        )
    }
}

impl fmt::Debug for CaSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaSecretKey(pub {})",
            short_fingerprint(&self.public_bytes())
        )
    }
}

impl fmt::Debug for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublicKey({})", armor::hex(&self.0))
    }
}

/// Lower-case hex of the key.
impl fmt::Display for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&armor::hex(&self.0))
    }
}

fn short_fingerprint(public: &[u8; 32]) -> String {
    let digest = Sha256::digest(public);
    armor::hex(&digest[..4])
}

fn decode_32(text: &str, label: &'static str) -> Result<[u8; 32], KeyError> {
    let bytes = armor::decode_one(text, label)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::BadLength {
        label,
        expected: 32,
        found: bytes.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn node_key_round_trips_and_matches_x25519() {
        let key = NodeSecretKey::generate();
        let back = NodeSecretKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(back.public(), key.public());
        let expected = x25519_dalek::PublicKey::from(&key.static_secret()).to_bytes();
        assert_eq!(key.public_bytes(), expected);
        let public = NodePublicKey::from_pem(&key.public().to_pem()).unwrap();
        assert_eq!(public, key.public());
    }

    #[test]
    fn ca_key_round_trips_and_signs() {
        use ed25519_dalek::Verifier as _;
        let key = CaSecretKey::generate();
        let back = CaSecretKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(back.public_bytes(), key.public_bytes());
        let sig = ed25519_dalek::Signature::from_bytes(&back.sign(b"msg"));
        assert!(key.public().verify(b"msg", &sig).is_ok());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let node = NodeSecretKey::from_bytes([7; 32]);
        let ca = CaSecretKey::from_bytes([7; 32]);
        for (dbg, secret) in [
            (format!("{node:?}"), node.to_pem()),
            (format!("{ca:?}"), ca.to_pem()),
        ] {
            assert!(!dbg.contains("0707"), "{dbg}");
            assert!(!dbg.contains("BwcH"), "{dbg}");
            assert!(dbg.len() < 40, "{dbg}");
            assert!(secret.contains("BwcH"));
        }
    }

    #[test]
    fn wrong_label_and_length_are_refused() {
        let ca = CaSecretKey::generate();
        assert!(matches!(
            NodeSecretKey::from_pem(&ca.to_pem()),
            Err(KeyError::Armor(ArmorError::WrongLabel { .. }))
        ));
        let short = armor::encode(NODE_PUBLIC_LABEL, &[1; 31]);
        assert_eq!(
            NodePublicKey::from_pem(&short),
            Err(KeyError::BadLength {
                label: NODE_PUBLIC_LABEL,
                expected: 32,
                found: 31
            })
        );
    }
}
