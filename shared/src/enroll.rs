//! Enrollment: a node without a certificate trades a one-time token for a
//! short-lived one, signed by the lighthouse's issuer. Sans-IO: messages
//! are built and opened here; the daemons own the socket.
//!
//! On the node's one UDP socket, before any WireGuard session (the node has
//! no certificate to start one with):
//!
//! ```text
//! node                                        lighthouse
//! 0x13 enroll hello, padded              ──▶
//!                                        ◀──  0x14 its certificate
//!   (verified by the node against its CA, with the lighthouse group)
//! 0x15 eph_pub(32) | sealed request      ──▶
//!                                        ◀──  0x16 eph_pub(32) | sealed reply
//! ```
//!
//! The lighthouse answers addresses it has not verified (UDP sources can be
//! forged), so it never answers more bytes than it received, as QUIC does
//! for its Initial: a hello is padded to [`ENROLL_HELLO_LEN`], more than a
//! certificate can take, and a request to at least [`ENROLL_REQUEST_MIN`]
//! (spaces after the sealed JSON, which JSON allows). A reply larger than
//! its request is not sent; the node's repeats are padded to
//! [`MAX_ENROLL_REPLY_LEN`], which any reply fits, and get the answer the
//! lighthouse kept for that enrollment (it knows it by `eph_pub`).
//!
//! The request (the token, the node's new X25519 public key) is sealed with
//! ChaCha20-Poly1305 under a key from X25519(ephemeral, the lighthouse's
//! static key), so only that lighthouse reads the token; the reply (the
//! certificate, or why not) under the same key, so only the asker opens
//! it. The node verifies the certificate it gets against its own CA, as any
//! peer would: a lying lighthouse can refuse, never impersonate.

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

pub const TYPE_ENROLL_HELLO: u8 = 0x13;
pub const TYPE_ENROLL_CERT: u8 = 0x14;
pub const TYPE_ENROLL_REQUEST: u8 = 0x15;
pub const TYPE_ENROLL_REPLY: u8 = 0x16;
/// A lighthouse that does not enroll answers a padded hello or a request
/// with this type and why, in UTF-8, so the node can say so instead of
/// waiting for an answer that never comes.
pub const TYPE_ENROLL_DISABLED: u8 = 0x17;
/// The longest reason in a [`TYPE_ENROLL_DISABLED`] answer.
pub const MAX_DISABLED_REASON: usize = 200;

/// The [`TYPE_ENROLL_DISABLED`] answer with `reason` (cut to
/// [`MAX_DISABLED_REASON`] bytes at a character boundary).
pub fn disabled_answer(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_DISABLED_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = vec![TYPE_ENROLL_DISABLED];
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// The reason in a [`TYPE_ENROLL_DISABLED`] answer, printable: control
/// characters dropped, at most [`MAX_DISABLED_REASON`] bytes read.
pub fn disabled_reason(datagram: &[u8]) -> Option<String> {
    let (&ty, rest) = datagram.split_first()?;
    if ty != TYPE_ENROLL_DISABLED {
        return None;
    }
    let rest = &rest[..rest.len().min(MAX_DISABLED_REASON)];
    Some(
        String::from_utf8_lossy(rest)
            .chars()
            .filter(|c| !c.is_control())
            .collect(),
    )
}

/// Largest sealed request or reply accepted: room for an OIDC ID token of
/// several kilobytes (the datagram may be fragmented on its way).
pub const MAX_ENROLL_LEN: usize = 8192;

/// A hello's length: the lighthouse answers shorter ones with nothing, and
/// its answer (type byte and a certificate of at most
/// [`crate::cert::MAX_CERT_LEN`]) is never longer.
pub const ENROLL_HELLO_LEN: usize = 1200;

/// The shortest request a lighthouse opens: one IPv6-minimum-MTU datagram,
/// which is enough for a refusal or a typical certificate.
pub const ENROLL_REQUEST_MIN: usize = 1200;

/// The longest reply a lighthouse seals: a certificate of
/// [`crate::cert::MAX_CERT_LEN`] in armor, or a refusal. Repeated requests
/// are padded to this, so that any reply may be sent.
pub const MAX_ENROLL_REPLY_LEN: usize = 1700;

// A hello's answer, the type and a certificate, always fits in a hello.
const _: () = assert!(crate::cert::MAX_CERT_LEN < ENROLL_HELLO_LEN);

/// A hello as the node sends it: the type and zero padding.
pub fn enroll_hello() -> Vec<u8> {
    let mut hello = vec![0u8; ENROLL_HELLO_LEN];
    hello[0] = TYPE_ENROLL_HELLO;
    hello
}

/// Whether a lighthouse may send `answer` to an unverified source that
/// sent `request`: never more bytes than it received.
pub fn may_answer(request: &[u8], answer: &[u8]) -> bool {
    answer.len() <= request.len()
}

/// What the node asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// A one-time token from `tern-lighthouse token create`.
    pub token: Option<String>,
    /// An OIDC ID token from the CI provider.
    pub oidc: Option<String>,
    /// The node's new WireGuard (X25519) public key; the private key never
    /// leaves the node.
    pub public_key: [u8; 32],
    /// A name to put after the issuer's prefix (sanitized by the lighthouse).
    pub name_hint: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollReply {
    /// The certificate (armored), when enrolled.
    pub cert: Option<String>,
    /// Why not.
    pub refused: Option<String>,
    /// What kind of refusal, for the node to act on (absent: the request
    /// itself was refused): [`REFUSED_STORE_UNAVAILABLE`]. Older nodes
    /// ignore it; older lighthouses never send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// [`EnrollReply::code`]: the lighthouse could not reach its store (its
/// database is down); nothing was spent, and another lighthouse, or the
/// same one a little later, may enroll the node.
pub const REFUSED_STORE_UNAVAILABLE: &str = "store_unavailable";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment message malformed: {0}")]
    Malformed(&'static str),
    #[error("enrollment message too long")]
    TooLong,
    #[error("enrollment message does not open: not for this key, or altered")]
    Sealed,
}

fn key(shared: &[u8; 32], eph: &[u8; 32], lighthouse: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut h = Sha256::new();
    h.update(b"tern enroll v1");
    h.update(shared);
    h.update(eph);
    h.update(lighthouse);
    let k: [u8; 32] = h.finalize().into();
    ChaCha20Poly1305::new(Key::from_slice(&k))
}

fn nonce(n: u8) -> Nonce {
    let mut b = [0u8; 12];
    b[11] = n;
    *Nonce::from_slice(&b)
}

/// The node's side of one enrollment: an ephemeral key, and the key
/// shared with the lighthouse whose static key it was given.
pub struct Sealer {
    eph_pub: [u8; 32],
    aead: ChaCha20Poly1305,
}

impl Sealer {
    /// `lighthouse` is the X25519 key from the lighthouse's verified
    /// certificate; `eph` a fresh secret.
    pub fn new(eph: StaticSecret, lighthouse: [u8; 32]) -> Sealer {
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let shared = eph.diffie_hellman(&PublicKey::from(lighthouse)).to_bytes();
        Sealer {
            eph_pub,
            aead: key(&shared, &eph_pub, &lighthouse),
        }
    }

    /// The 0x15 datagram, at least `min_len` bytes long (spaces after the
    /// JSON): [`ENROLL_REQUEST_MIN`] for the first try,
    /// [`MAX_ENROLL_REPLY_LEN`] for repeats.
    pub fn seal_request(
        &self,
        request: &EnrollRequest,
        min_len: usize,
    ) -> Result<Vec<u8>, EnrollError> {
        let mut plain =
            serde_json::to_vec(request).map_err(|_| EnrollError::Malformed("request"))?;
        let overhead = 1 + 32 + 16;
        let wanted = min_len.min(MAX_ENROLL_LEN).saturating_sub(overhead);
        if plain.len() < wanted {
            plain.resize(wanted, b' ');
        }
        let sealed = self
            .aead
            .encrypt(&nonce(0), plain.as_slice())
            .map_err(|_| EnrollError::Sealed)?;
        let mut out = vec![TYPE_ENROLL_REQUEST];
        out.extend_from_slice(&self.eph_pub);
        out.extend_from_slice(&sealed);
        if out.len() > MAX_ENROLL_LEN {
            return Err(EnrollError::TooLong);
        }
        Ok(out)
    }

    /// Opens a 0x16 datagram meant for this enrollment.
    pub fn open_reply(&self, datagram: &[u8]) -> Result<EnrollReply, EnrollError> {
        let (eph, sealed) = split(datagram, TYPE_ENROLL_REPLY)?;
        if eph != self.eph_pub {
            return Err(EnrollError::Sealed);
        }
        let plain = self
            .aead
            .decrypt(&nonce(1), sealed)
            .map_err(|_| EnrollError::Sealed)?;
        serde_json::from_slice(&plain).map_err(|_| EnrollError::Malformed("reply"))
    }
}

fn split(datagram: &[u8], ty: u8) -> Result<([u8; 32], &[u8]), EnrollError> {
    if datagram.len() > MAX_ENROLL_LEN {
        return Err(EnrollError::TooLong);
    }
    if datagram.first() != Some(&ty) {
        return Err(EnrollError::Malformed("type"));
    }
    let eph: [u8; 32] = datagram
        .get(1..33)
        .and_then(|b| b.try_into().ok())
        .ok_or(EnrollError::Malformed("truncated"))?;
    Ok((eph, &datagram[33..]))
}

/// The ephemeral public key a request (0x15) names, which tells one
/// enrollment from another: its repeats carry the same one.
pub fn request_key(datagram: &[u8]) -> Option<[u8; 32]> {
    match datagram.first() {
        Some(&TYPE_ENROLL_REQUEST) => datagram.get(1..33)?.try_into().ok(),
        _ => None,
    }
}

/// The lighthouse's side: opens a 0x15 request with its static secret and
/// returns it with a way to seal the answer.
pub fn open_request(
    datagram: &[u8],
    secret: &StaticSecret,
) -> Result<(EnrollRequest, ReplySealer), EnrollError> {
    let (eph, sealed) = split(datagram, TYPE_ENROLL_REQUEST)?;
    let ours = PublicKey::from(secret).to_bytes();
    let shared = secret.diffie_hellman(&PublicKey::from(eph)).to_bytes();
    let aead = key(&shared, &eph, &ours);
    let plain = aead
        .decrypt(&nonce(0), sealed)
        .map_err(|_| EnrollError::Sealed)?;
    let request: EnrollRequest =
        serde_json::from_slice(&plain).map_err(|_| EnrollError::Malformed("request"))?;
    Ok((request, ReplySealer { eph, aead }))
}

/// Seals the lighthouse's answer to one request.
pub struct ReplySealer {
    eph: [u8; 32],
    aead: ChaCha20Poly1305,
}

impl ReplySealer {
    /// The 0x16 datagram.
    pub fn seal(&self, reply: &EnrollReply) -> Result<Vec<u8>, EnrollError> {
        let plain = serde_json::to_vec(reply).map_err(|_| EnrollError::Malformed("reply"))?;
        let sealed = self
            .aead
            .encrypt(&nonce(1), plain.as_slice())
            .map_err(|_| EnrollError::Sealed)?;
        let mut out = vec![TYPE_ENROLL_REPLY];
        out.extend_from_slice(&self.eph);
        out.extend_from_slice(&sealed);
        Ok(out)
    }
}

/// SHA-256 of a token, hex: what the lighthouse stores instead of it.
pub fn token_hash(token: &str) -> String {
    crate::armor::hex(&Sha256::digest(token.trim().as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    fn request() -> EnrollRequest {
        EnrollRequest {
            token: Some("tern1_secret".into()),
            oidc: None,
            public_key: [9; 32],
            name_hint: Some("job-42".into()),
        }
    }

    #[test]
    fn a_request_opens_only_with_the_lighthouse_key_and_the_reply_only_for_the_asker() {
        let lh = StaticSecret::random_from_rng(OsRng);
        let lh_pub = PublicKey::from(&lh).to_bytes();
        let node = Sealer::new(StaticSecret::random_from_rng(OsRng), lh_pub);
        let wire = node.seal_request(&request(), ENROLL_REQUEST_MIN).unwrap();
        assert_eq!(wire.len(), ENROLL_REQUEST_MIN, "padded");
        assert_eq!(request_key(&wire), Some(node.eph_pub));
        assert!(
            !String::from_utf8_lossy(&wire).contains("tern1_secret"),
            "the token is sealed"
        );
        let (got, sealer) = open_request(&wire, &lh).unwrap();
        assert_eq!(got, request());
        // Another lighthouse cannot open it.
        assert_eq!(
            open_request(&wire, &StaticSecret::random_from_rng(OsRng)).err(),
            Some(EnrollError::Sealed)
        );
        let reply = EnrollReply {
            cert: Some("CERT".into()),
            refused: None,
            code: None,
        };
        let back = sealer.seal(&reply).unwrap();
        assert_eq!(node.open_reply(&back).unwrap(), reply);
        // A reply of a lighthouse that knows no codes still opens, and one
        // with a code an older node does not know is read without it.
        let old: EnrollReply = serde_json::from_str(r#"{"cert":null,"refused":"no"}"#).unwrap();
        assert_eq!(old.code, None);
        let coded = serde_json::to_string(&EnrollReply {
            cert: None,
            refused: Some("down".into()),
            code: Some(REFUSED_STORE_UNAVAILABLE.into()),
        })
        .unwrap();
        assert!(coded.contains(r#""code":"store_unavailable""#), "{coded}");
        // Another enrollment's sealer cannot.
        let other = Sealer::new(StaticSecret::random_from_rng(OsRng), lh_pub);
        assert!(other.open_reply(&back).is_err());
        // Altered bytes do not open.
        let mut bad = back.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(node.open_reply(&bad).err(), Some(EnrollError::Sealed));
        assert_eq!(token_hash("abc"), token_hash(" abc\n"));
    }

    #[test]
    fn a_disabled_answer_carries_a_printable_reason_and_fits_a_hello() {
        let answer = disabled_answer("enrollment is not enabled here");
        assert!(may_answer(&enroll_hello(), &answer));
        assert_eq!(
            disabled_reason(&answer).as_deref(),
            Some("enrollment is not enabled here")
        );
        let long = disabled_answer(&"é".repeat(400));
        assert!(long.len() <= 1 + MAX_DISABLED_REASON);
        assert!(disabled_reason(&long).is_some_and(|r| r.chars().all(|c| c == 'é')));
        assert_eq!(
            disabled_reason(&[TYPE_ENROLL_DISABLED, b'a', 0x1b, b'b']).as_deref(),
            Some("ab")
        );
        assert_eq!(disabled_reason(&[TYPE_ENROLL_CERT, b'a']), None);
        assert_eq!(disabled_reason(&[]), None);
    }

    #[test]
    fn no_answer_is_longer_than_what_a_node_sends_for_it() {
        // A hello's answer: the type and the longest certificate (also
        // checked when compiling, below the constants).
        assert!(may_answer(
            &enroll_hello(),
            &[0u8; 1 + crate::cert::MAX_CERT_LEN]
        ));
        assert!(!may_answer(&[TYPE_ENROLL_HELLO], &[0u8; 2]));
        // The longest reply: a certificate of the longest encoding, armored.
        let lh = StaticSecret::random_from_rng(OsRng);
        let lh_pub = PublicKey::from(&lh).to_bytes();
        let node = Sealer::new(StaticSecret::random_from_rng(OsRng), lh_pub);
        let (_, sealer) = open_request(
            &node.seal_request(&request(), ENROLL_REQUEST_MIN).unwrap(),
            &lh,
        )
        .unwrap();
        let longest = EnrollReply {
            cert: Some(crate::armor::encode(
                "TERN CERTIFICATE",
                &[0xff; crate::cert::MAX_CERT_LEN],
            )),
            refused: None,
            code: None,
        };
        let reply = sealer.seal(&longest).unwrap();
        let repeat = node.seal_request(&request(), MAX_ENROLL_REPLY_LEN).unwrap();
        assert!(
            may_answer(&repeat, &reply),
            "{} > {}",
            reply.len(),
            repeat.len()
        );
        // A long refusal too (refusals quote at most a few hundred bytes).
        let refusal = EnrollReply {
            cert: None,
            refused: Some("x".repeat(600)),
            code: Some(REFUSED_STORE_UNAVAILABLE.into()),
        };
        assert!(may_answer(&repeat, &sealer.seal(&refusal).unwrap()));
        // A request already longer than the minimum is not padded further.
        let mut big = request();
        big.oidc = Some("e".repeat(3000));
        assert!(node.seal_request(&big, ENROLL_REQUEST_MIN).unwrap().len() > 3000);
        // The padding opens.
        let (opened, _) = open_request(
            &node.seal_request(&request(), MAX_ENROLL_REPLY_LEN).unwrap(),
            &lh,
        )
        .unwrap();
        assert_eq!(opened, request());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let lh = StaticSecret::from([7; 32]);
            let _ = open_request(&bytes, &lh);
            let node = Sealer::new(StaticSecret::from([8; 32]), PublicKey::from(&lh).to_bytes());
            let _ = node.open_reply(&bytes);
            let _ = request_key(&bytes);
            let _ = disabled_reason(&bytes);
        }
    }
}
