//! Tern certificates: the binary format, signing, and verification against a
//! pool of trusted CAs.
//!
//! How to use it: the admin makes a CA with [`self_sign_ca`] and signs node
//! certs with [`sign_node`]. A node builds a [`CaPool`] from the CA certs in
//! its config and runs every peer's cert through [`CaPool::verify_bytes`]; the
//! [`VerifiedCert`] it gets back is the only proof of identity the rest of the
//! code accepts. Nothing here reads a clock: callers pass `now` in unix seconds.
//!
//! # Binary layout, version 1
//!
//! All integers are big-endian. `net` is `family: u8` (4 or 6), the address
//! (4 or 16 bytes), `prefix_len: u8`. `str` is `len: u16` then UTF-8 bytes.
//!
//! | field        | encoding                                   |
//! | ------------ | ------------------------------------------ |
//! | magic        | 4 bytes `TRNC`                             |
//! | version      | u8 = 1                                     |
//! | kind         | u8: 1 = CA, 2 = node                       |
//! | name         | str                                        |
//! | ips          | u16 count, then `net` each                 |
//! | groups       | u16 count, then `str` each                 |
//! | subnets      | u16 count, then `net` each                 |
//! | not_before   | u64 unix seconds                           |
//! | not_after    | u64 unix seconds                           |
//! | public_key   | 32 bytes                                   |
//! | issuer       | 32 bytes (all zero for a self-signed CA)   |
//! | signature    | 64 bytes Ed25519 over every byte above     |
//!
//! The encoding is canonical: [`Cert::decode`] accepts exactly the bytes
//! [`Cert::encode`] produces, so the signed bytes are the body as sent, and
//! the fingerprint is the SHA-256 of the whole encoding.
//!
//! # Version 2: issuers and the certificates they sign
//!
//! An *issuer* (kind 3) is signed by a root CA and signs node certificates
//! itself, within its constraints: its `ips` are the pool its nodes' overlay
//! addresses must come from, its `groups` the only groups they may carry,
//! and two fields follow `issuer`: `name_prefix` (str; every name it signs
//! starts with it) and `max_lifetime` (u64 seconds; no certificate it signs
//! lives longer). A lighthouse holds an issuer key to mint short-lived CI
//! identities; the root key stays offline, and a compromised lighthouse can
//! mint only pool-addressed, prefix-named, short-lived identities.
//!
//! A node certificate signed by an issuer is version 2 too: after `issuer`
//! (the issuer certificate's fingerprint) comes `chain` (u16 length, then
//! the issuer certificate's encoding), inside the signed bytes. Every
//! verifier checks the chain up to a root it trusts: the issuer's signature,
//! validity and place under the root's constraints, then the node's
//! signature by the issuer and its place under the issuer's constraints and
//! the root's. Certificates without an issuer stay version 1, byte for byte.
//!
//! # Version 3: DNS zones
//!
//! A CA or a node signed by it directly may carry `dns_zones` (u16 count,
//! then `str` each), right after `subnets`: for a node, the DNS zones it
//! may answer for as a gateway (`db.internal` lies under `internal`); for a
//! CA, the zones its nodes' zones must lie under (none named: any). Zones
//! are lower case, without a trailing dot, sorted and de-duplicated. A
//! certificate with zones is version 3 and one without stays version 1 (or
//! 2), so every older certificate still verifies byte for byte.
//!
//! # Version 4: issuers that delegate subnets and zones
//!
//! An issuer may carry `subnets` and `dns_zones`: the subnets and zones it
//! may delegate. A node it signs may then route subnets inside them and
//! answer for zones under them, so a long-lived gateway whose certificate
//! the issuer signed can have it renewed by the lighthouse (`[pki] renew`);
//! enrollment never puts either in a CI job's certificate. Such an issuer,
//! and a node under an issuer that carries zones, is version 4: the version
//! 2 layout with `dns_zones` (u16 count, then `str` each; an issuer may list
//! none when it delegates only subnets) right after `subnets`, as in
//! version 3. An issuer that delegates nothing stays version 2, so older
//! verifiers keep reading it; one that delegates is refused by them with
//! "unsupported version 4, upgrade tern" rather than misread.

use crate::armor::{self, ArmorError};
use crate::keys::CaSecretKey;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

/// Encoded binary size cap. Signing refuses larger certs, decoding refuses
/// larger inputs, so a peer cannot make us parse or store big blobs.
pub const MAX_CERT_LEN: usize = 1024;

/// How far a verifier's clock may run behind the signer's: a certificate is
/// accepted from `not_before - CLOCK_SKEW_SECS` on, so a node started right
/// after its certificate was signed (often on another machine) is not refused
/// for its first seconds. Expiry (`not_after`) gets no such leeway.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Nodes in this group serve as lighthouses.
pub const LIGHTHOUSE_GROUP: &str = "lighthouse";
/// Nodes in this group may offer runners to callers who pick by label
/// (`tern run --on LABEL`): a label claimed by any other node is ignored, so
/// an ordinary identity (a CI job's, say) cannot pose as a runner and
/// receive other jobs' pipelines and secrets.
pub const RUNNER_GROUP: &str = "runner";
/// Nodes in this group may relay for others (`[relay]` in a node's
/// config): a lighthouse hands pairs only to relays with it.
pub const RELAY_GROUP: &str = "relay";
/// Armor label of a certificate; the kind is inside the body.
pub const CERT_LABEL: &str = "TERN CERTIFICATE";
/// The format version of CAs and nodes they sign directly.
pub const VERSION: u8 = 1;
/// The format version of issuers and the nodes they sign.
pub const VERSION_ISSUED: u8 = 2;
/// The format version of CAs and nodes that carry DNS zones.
pub const VERSION_ZONES: u8 = 3;
/// The format version of issuers that delegate subnets or zones, and of
/// nodes with zones under an issuer.
pub const VERSION_DELEGATED: u8 = 4;
/// Most DNS zones in one cert.
pub const MAX_DNS_ZONES: usize = 16;
/// Longest DNS zone, in bytes (a DNS name's limit).
pub const MAX_ZONE_LEN: usize = 253;
/// Longest issuer name prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 32;
/// Longest name or group, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Most overlay nets in one cert (a node has exactly one; a CA's constraints may list more).
pub const MAX_IPS: usize = 8;
/// Most groups in one cert.
pub const MAX_GROUPS: usize = 16;
/// Most routable subnets in one cert.
pub const MAX_SUBNETS: usize = 16;

const MAGIC: &[u8; 4] = b"TRNC";
const SIGNATURE_LEN: usize = 64;
const KIND_CA: u8 = 1;
const KIND_NODE: u8 = 2;
const KIND_ISSUER: u8 = 3;

/// SHA-256 of a cert's full encoding (body and signature).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// A root CA: self-signed, its `ips` and `groups` constrain every cert under it.
    Ca,
    /// A node's identity.
    Node,
    /// Signed by a root CA, signs short-lived node certificates within its
    /// pool, groups, name prefix and maximum lifetime.
    Issuer,
}

/// What a cert says. See the module docs for the meaning of each field per kind.
///
/// For a CA: `ips` and `groups` are its constraints (empty = unconstrained),
/// `subnets` is empty, `public_key` is its Ed25519 verifying key and `issuer`
/// is all zero. For a node: `ips` is exactly one IPv4 net (the overlay address
/// with the mesh prefix, e.g. `100.64.0.5/10`), `public_key` is its X25519 key
/// and `issuer` the fingerprint of the CA that signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertBody {
    pub kind: CertKind,
    pub name: String,
    pub ips: Vec<IpNet>,
    pub groups: Vec<String>,
    pub subnets: Vec<IpNet>,
    /// DNS zones the node may answer for (a CA: the zones its nodes' must
    /// lie under). Empty in certificates before version 3.
    pub dns_zones: Vec<String>,
    pub not_before: u64,
    pub not_after: u64,
    pub public_key: [u8; 32],
    pub issuer: Fingerprint,
    /// Issuers only: every name they sign starts with this.
    pub name_prefix: String,
    /// Issuers only: the longest validity they may sign, in seconds.
    pub max_lifetime: u64,
    /// A node signed by an issuer: the issuer's certificate (signed with
    /// the body, so the chain cannot be swapped).
    pub chain: Option<Box<Cert>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cert {
    pub body: CertBody,
    pub signature: [u8; 64],
}

/// Why a cert was refused, at decoding, signing or verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate is truncated: the data ends early; copy the whole certificate")]
    Truncated,
    #[error("certificate has {extra} unexpected bytes after its signature; copy exactly one certificate")]
    TrailingBytes { extra: usize },
    #[error("certificate is {len} bytes, more than the {max}-byte limit; use fewer groups, subnets or ips")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported certificate format version {version} (this build reads versions {VERSION} to {VERSION_DELEGATED}); upgrade tern")]
    UnsupportedVersion { version: u8 },
    #[error("unknown certificate kind {kind}; upgrade tern or check the certificate's origin")]
    UnknownKind { kind: u8 },
    #[error("malformed certificate field {field}: {reason}")]
    Malformed { field: &'static str, reason: String },
    #[error("bad certificate armor: {0}")]
    Armor(#[from] ArmorError),
    #[error("certificate signature does not verify: it was altered or not signed by the CA it names; re-sign it")]
    BadSignature,
    #[error("certificate was signed by unknown CA {issuer}: add that CA to the trusted CAs, or sign the certificate with a trusted CA")]
    UnknownIssuer { issuer: Fingerprint },
    #[error("certificate expired at {} (unix {not_after}); sign a new one", time(.not_after))]
    Expired { not_after: u64 },
    #[error("certificate is not valid before {} (unix {not_before}); wait, or check this machine's clock", time(.not_before))]
    NotYetValid { not_before: u64 },
    #[error("CA certificate {ca:?} expired at {} (unix {not_after}); make a new CA and re-sign its certificates", time(.not_after))]
    CaExpired { ca: String, not_after: u64 },
    #[error("CA certificate {ca:?} is not valid before {} (unix {not_before}); wait, or check this machine's clock", time(.not_before))]
    CaNotYetValid { ca: String, not_before: u64 },
    #[error("ip {ip} is outside the CA's allowed networks ({}); pick an address inside them", nets(.allowed))]
    IpOutsideCa { ip: IpNet, allowed: Vec<IpNet> },
    #[error("group {group:?} is not among the CA's allowed groups ({}); drop it or use a CA that allows it", .allowed.join(", "))]
    GroupOutsideCa { group: String, allowed: Vec<String> },
    #[error("DNS zone {zone:?} is not under the CA's allowed zones ({}); pick a zone under them or use a CA that allows it", .allowed.join(", "))]
    ZoneOutsideCa { zone: String, allowed: Vec<String> },
    #[error("invalid DNS zone {zone:?}: {reason}")]
    InvalidZone { zone: String, reason: String },
    #[error("subnet {subnet} is invalid: {reason}")]
    SubnetInvalid { subnet: IpNet, reason: String },
    #[error("expected a node certificate, found a CA certificate; pass the node's certificate")]
    NotANodeCert,
    #[error("expected a CA certificate, found a node certificate; pass the CA's certificate")]
    NotACaCert,
    #[error("the private key does not belong to this certificate; pass the key that was created with it")]
    KeyMismatch,
    #[error("invalid {field} {value:?}: use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -")]
    InvalidName { field: &'static str, value: String },
    #[error("the certificate goes beyond what its issuer {issuer:?} may sign: {what}")]
    BeyondIssuer { issuer: String, what: String },
    #[error("expected an issuer certificate (tern cert sign --issuer)")]
    NotAnIssuerCert,
    #[error("certificate {fingerprint} has been revoked (tern-lighthouse revoke); get a new one")]
    Revoked { fingerprint: Fingerprint },
    #[error("validity {} .. {} is outside the CA's validity {} .. {}; use a shorter duration or renew the CA", time(.not_before), time(.not_after), time(.ca_not_before), time(.ca_not_after))]
    ValidityOutsideCa {
        not_before: u64,
        not_after: u64,
        ca_not_before: u64,
        ca_not_after: u64,
    },
}

impl Cert {
    /// The canonical binary form: body, then signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_body(&self.body);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strict decoding: refuses truncation, trailing bytes, inputs over
    /// [`MAX_CERT_LEN`], bad lengths and prefixes, names outside the allowed
    /// characters, unknown kinds and versions. It does not check the
    /// signature or the kind-specific rules: that is [`CaPool::verify`]'s job.
    pub fn decode(bytes: &[u8]) -> Result<Cert, CertError> {
        if bytes.len() > MAX_CERT_LEN {
            return Err(CertError::TooLarge {
                len: bytes.len(),
                max: MAX_CERT_LEN,
            });
        }
        let mut r = Reader(crate::codec::Reader::new(bytes));
        if r.take(MAGIC.len())? != MAGIC {
            return Err(malformed("magic", "not a Tern certificate"));
        }
        let version = r.u8()?;
        if !matches!(
            version,
            VERSION | VERSION_ISSUED | VERSION_ZONES | VERSION_DELEGATED
        ) {
            return Err(CertError::UnsupportedVersion { version });
        }
        let kind = match r.u8()? {
            KIND_CA => CertKind::Ca,
            KIND_NODE => CertKind::Node,
            KIND_ISSUER => CertKind::Issuer,
            kind => return Err(CertError::UnknownKind { kind }),
        };
        // Each kind has one version per shape, so the encoding stays
        // canonical: zones make a CA or node version 3, an issuer makes
        // itself and its nodes version 2, or 4 with delegation or zones.
        let allowed = match kind {
            CertKind::Ca => matches!(version, VERSION | VERSION_ZONES),
            CertKind::Issuer => matches!(version, VERSION_ISSUED | VERSION_DELEGATED),
            CertKind::Node => true,
        };
        if !allowed {
            return Err(malformed(
                "version",
                format!("{kind} certificates are not version {version}"),
            ));
        }
        let name = r.name("name")?;
        let ips = r.nets("ips", MAX_IPS)?;
        let group_count = r.count("groups", MAX_GROUPS)?;
        let mut groups = Vec::with_capacity(group_count);
        for _ in 0..group_count {
            groups.push(r.name("group")?);
        }
        let subnets = r.nets("subnets", MAX_SUBNETS)?;
        let mut dns_zones = Vec::new();
        if matches!(version, VERSION_ZONES | VERSION_DELEGATED) {
            let count = r.count("dns_zones", MAX_DNS_ZONES)?;
            // Only an issuer delegating subnets alone lists no zone.
            if count == 0 && !(kind == CertKind::Issuer && version == VERSION_DELEGATED) {
                return Err(malformed(
                    "dns_zones",
                    format!("a version {version} certificate carries at least one zone"),
                ));
            }
            for _ in 0..count {
                dns_zones.push(r.zone()?);
            }
        }
        let not_before = r.u64()?;
        let not_after = r.u64()?;
        let public_key = r.array::<32>()?;
        let issuer = Fingerprint(r.array::<32>()?);
        let (mut name_prefix, mut max_lifetime, mut chain) = (String::new(), 0, None);
        match (kind, version) {
            (CertKind::Issuer, _) => {
                let len = usize::from(r.u16()?);
                if len > MAX_PREFIX_LEN {
                    return Err(malformed(
                        "name_prefix",
                        format!("longer than {MAX_PREFIX_LEN} bytes"),
                    ));
                }
                name_prefix = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| malformed("name_prefix", "not valid UTF-8"))?
                    .to_string();
                max_lifetime = r.u64()?;
            }
            (CertKind::Node, VERSION_ISSUED | VERSION_DELEGATED) => {
                let len = usize::from(r.u16()?);
                let inner = Cert::decode(r.take(len)?)?;
                if inner.body.kind != CertKind::Issuer {
                    return Err(malformed(
                        "chain",
                        "the embedded certificate is not an issuer",
                    ));
                }
                chain = Some(Box::new(inner));
            }
            _ => {}
        }
        let signature = r.array::<SIGNATURE_LEN>()?;
        let extra = r.0.remaining();
        if extra != 0 {
            return Err(CertError::TrailingBytes { extra });
        }
        let cert = Cert {
            body: CertBody {
                kind,
                name,
                ips,
                groups,
                subnets,
                dns_zones,
                not_before,
                not_after,
                public_key,
                issuer,
                name_prefix,
                max_lifetime,
                chain,
            },
            signature,
        };
        // One version per shape: an issuer that delegates nothing written
        // as version 4, or one that does as version 2, is not canonical.
        if format_version(&cert.body) != version {
            return Err(malformed(
                "version",
                format!(
                    "this {kind} certificate is written as version {version}, not {}",
                    format_version(&cert.body)
                ),
            ));
        }
        Ok(cert)
    }

    pub fn to_pem(&self) -> String {
        armor::encode(CERT_LABEL, &self.encode())
    }

    /// Exactly one armored certificate.
    pub fn from_pem(text: &str) -> Result<Cert, CertError> {
        Cert::decode(&armor::decode_one(text, CERT_LABEL)?)
    }

    /// One or more armored certificates (a CA file may hold several). Every
    /// block must be a certificate.
    pub fn all_from_pem(text: &str) -> Result<Vec<Cert>, CertError> {
        let blocks = armor::decode_all(text)?;
        if blocks.is_empty() {
            return Err(ArmorError::NoBlock {
                expected: CERT_LABEL.to_string(),
            }
            .into());
        }
        blocks
            .into_iter()
            .map(|(label, bytes)| {
                if label != CERT_LABEL {
                    return Err(ArmorError::WrongLabel {
                        expected: CERT_LABEL.to_string(),
                        found: label,
                    }
                    .into());
                }
                Cert::decode(&bytes)
            })
            .collect()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.encode())
    }

    /// Checks that the cert is a CA with a valid self-signature and body, and
    /// returns its verifying key.
    fn check_ca(&self) -> Result<ed25519_dalek::VerifyingKey, CertError> {
        if self.body.kind != CertKind::Ca {
            return Err(CertError::NotACaCert);
        }
        self.body.validate()?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.body.public_key)
            .map_err(|_| malformed("public_key", "not a valid Ed25519 public key"))?;
        verify_signature(&key, &self.body, &self.signature)?;
        Ok(key)
    }
}

impl CertBody {
    /// Kind-specific rules, checked when signing and when verifying:
    /// names and groups well formed, groups sorted and de-duplicated,
    /// `not_before <= not_after`; a CA's constraint nets have no host bits,
    /// it routes no subnets and names no issuer; a node has exactly one IPv4
    /// overlay net with a usable host address, and its subnets have no host bits.
    pub fn validate(&self) -> Result<(), CertError> {
        validate_name("name", &self.name)?;
        if self.ips.len() > MAX_IPS {
            return Err(malformed("ips", format!("more than {MAX_IPS} entries")));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(malformed(
                "groups",
                format!("more than {MAX_GROUPS} entries"),
            ));
        }
        if self.subnets.len() > MAX_SUBNETS {
            return Err(malformed(
                "subnets",
                format!("more than {MAX_SUBNETS} entries"),
            ));
        }
        for group in &self.groups {
            validate_name("group", group)?;
        }
        if self.dns_zones.len() > MAX_DNS_ZONES {
            return Err(malformed(
                "dns_zones",
                format!("more than {MAX_DNS_ZONES} entries"),
            ));
        }
        for zone in &self.dns_zones {
            validate_zone(zone)?;
        }
        if self.dns_zones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("dns_zones", "not sorted and de-duplicated"));
        }
        if self.groups.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("groups", "not sorted and de-duplicated"));
        }
        if self.not_before > self.not_after {
            return Err(malformed("not_after", "earlier than not_before"));
        }
        match self.kind {
            CertKind::Ca => {
                no_host_bits(&self.ips, "constraint")?;
                if !self.subnets.is_empty() {
                    return Err(malformed("subnets", "a CA certificate routes no subnets"));
                }
                if self.issuer != Fingerprint::ZERO {
                    return Err(malformed(
                        "issuer",
                        "a self-signed CA names no issuer (all zero)",
                    ));
                }
                if !self.name_prefix.is_empty() || self.max_lifetime != 0 || self.chain.is_some() {
                    return Err(malformed("kind", "a CA has no issuer fields"));
                }
            }
            CertKind::Issuer => {
                if self.ips.is_empty() || self.ips.iter().any(|n| !matches!(n, IpNet::V4(_))) {
                    return Err(malformed(
                        "ips",
                        "an issuer needs an IPv4 address pool, e.g. 100.64.100.0/24",
                    ));
                }
                no_host_bits(&self.ips, "pool")?;
                subnets_without_host_bits(&self.subnets)?;
                if self.issuer == Fingerprint::ZERO {
                    return Err(malformed("issuer", "an issuer is signed by a root CA"));
                }
                if !self.name_prefix.is_empty() {
                    validate_name("name_prefix", &self.name_prefix)?;
                }
                if self.name_prefix.len() > MAX_PREFIX_LEN {
                    return Err(malformed(
                        "name_prefix",
                        format!("longer than {MAX_PREFIX_LEN} bytes"),
                    ));
                }
                if self.max_lifetime == 0 {
                    return Err(malformed(
                        "max_lifetime",
                        "an issuer must allow some lifetime, e.g. 1h",
                    ));
                }
                if self.chain.is_some() {
                    return Err(malformed(
                        "chain",
                        "an issuer is signed by a root CA directly",
                    ));
                }
            }
            CertKind::Node => {
                self.node_net()?;
                subnets_without_host_bits(&self.subnets)?;
                if self.public_key == [0; 32] {
                    return Err(malformed("public_key", "all zero"));
                }
                if !self.name_prefix.is_empty() || self.max_lifetime != 0 {
                    return Err(malformed("kind", "a node has no issuer constraints"));
                }
                if let Some(chain) = &self.chain {
                    if chain.fingerprint() != self.issuer {
                        return Err(malformed(
                            "issuer",
                            "does not match the embedded issuer certificate",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A node's overlay net, checked.
    fn node_net(&self) -> Result<Ipv4Net, CertError> {
        let net = match self.ips.as_slice() {
            [IpNet::V4(net)] => *net,
            [IpNet::V6(_)] => {
                return Err(malformed("ips", "a node's overlay address must be IPv4"));
            }
            _ => {
                return Err(malformed(
                    "ips",
                    format!(
                        "a node has exactly one overlay address, found {}",
                        self.ips.len()
                    ),
                ));
            }
        };
        if net.prefix_len() <= 30 && (net.addr() == net.network() || net.addr() == net.broadcast())
        {
            return Err(malformed(
                "ips",
                format!(
                    "{net} is the network or broadcast address of its prefix; pick a host address"
                ),
            ));
        }
        Ok(net)
    }
}

/// Routed (or delegated) subnets are networks: no host bits set.
fn subnets_without_host_bits(subnets: &[IpNet]) -> Result<(), CertError> {
    match subnets.iter().find(|s| s.trunc() != **s) {
        Some(subnet) => Err(CertError::SubnetInvalid {
            subnet: *subnet,
            reason: format!("host bits are set; did you mean {}?", subnet.trunc()),
        }),
        None => Ok(()),
    }
}

/// Self-signs a CA certificate. Checks that `body` is a valid CA body whose
/// `public_key` is `key`'s; sorts and de-duplicates the groups.
pub fn self_sign_ca(mut body: CertBody, key: &CaSecretKey) -> Result<Cert, CertError> {
    if body.kind != CertKind::Ca {
        return Err(CertError::NotACaCert);
    }
    if body.public_key != key.public_bytes() {
        return Err(CertError::KeyMismatch);
    }
    canonicalize_groups(&mut body.groups);
    canonicalize_zones(&mut body.dns_zones);
    body.validate()?;
    sign_body(body, key)
}

/// Signs a node certificate under `ca`. Sorts and de-duplicates the groups,
/// sets the issuer, and refuses (never clamps) anything the CA does not allow:
/// an address outside its nets, a group outside its groups, a validity window
/// outside its own. Also refuses when the CA is not valid at `now_unix`, when
/// the cert would already be expired, and when `ca_key` is not the CA's key.
pub fn sign_node(
    ca: &Cert,
    ca_key: &CaSecretKey,
    body: CertBody,
    now_unix: u64,
) -> Result<Cert, CertError> {
    if body.kind != CertKind::Node {
        return Err(CertError::NotANodeCert);
    }
    sign_under_root(ca, ca_key, body, now_unix)
}

/// Signs an issuer certificate under the root `ca`: its pool, groups and
/// validity must sit inside the CA's constraints (refused, never clamped).
pub fn sign_issuer(
    ca: &Cert,
    ca_key: &CaSecretKey,
    body: CertBody,
    now_unix: u64,
) -> Result<Cert, CertError> {
    if body.kind != CertKind::Issuer {
        return Err(CertError::NotAnIssuerCert);
    }
    ed25519_dalek::VerifyingKey::from_bytes(&body.public_key)
        .map_err(|_| malformed("public_key", "not a valid Ed25519 public key"))?;
    sign_under_root(ca, ca_key, body, now_unix)
}

/// What signing anything under a root CA checks: the CA and its key, the
/// body's rules, the CA's validity and constraints, not already expired.
fn sign_under_root(
    ca: &Cert,
    ca_key: &CaSecretKey,
    mut body: CertBody,
    now_unix: u64,
) -> Result<Cert, CertError> {
    ca.check_ca()?;
    if ca.body.public_key != ca_key.public_bytes() {
        return Err(CertError::KeyMismatch);
    }
    canonicalize_groups(&mut body.groups);
    canonicalize_zones(&mut body.dns_zones);
    body.issuer = ca.fingerprint();
    body.validate()?;
    check_ca_time(&ca.body, now_unix)?;
    if body.not_after < now_unix {
        return Err(CertError::Expired {
            not_after: body.not_after,
        });
    }
    check_under_ca(&ca.body, &body)?;
    sign_body(body, ca_key)
}

/// Signs a node certificate under an issuer (which is embedded in it):
/// refuses anything outside the issuer's pool, groups, name prefix and
/// maximum lifetime, or outside its validity.
pub fn sign_under_issuer(
    issuer: &Cert,
    issuer_key: &CaSecretKey,
    body: CertBody,
    now_unix: u64,
) -> Result<Cert, CertError> {
    let body = prepare_under_issuer(issuer, Some(issuer_key), body, now_unix)?;
    sign_body(body, issuer_key)
}

/// Whether [`sign_under_issuer`] would sign `body` at `now_unix`: the same
/// checks (all but the key's, which needs the key), without signing. An
/// enrolling lighthouse runs it before it spends a token or an address.
pub fn check_node_under_issuer(
    issuer: &Cert,
    body: &CertBody,
    now_unix: u64,
) -> Result<(), CertError> {
    prepare_under_issuer(issuer, None, body.clone(), now_unix).map(drop)
}

/// What signing a node under an issuer checks, shared by
/// [`sign_under_issuer`] and [`check_node_under_issuer`] so they cannot
/// drift: the body as it would be signed, or why not.
fn prepare_under_issuer(
    issuer: &Cert,
    issuer_key: Option<&CaSecretKey>,
    mut body: CertBody,
    now_unix: u64,
) -> Result<CertBody, CertError> {
    if issuer.body.kind != CertKind::Issuer {
        return Err(CertError::NotAnIssuerCert);
    }
    if issuer_key.is_some_and(|key| issuer.body.public_key != key.public_bytes()) {
        return Err(CertError::KeyMismatch);
    }
    if body.kind != CertKind::Node {
        return Err(CertError::NotANodeCert);
    }
    canonicalize_groups(&mut body.groups);
    canonicalize_zones(&mut body.dns_zones);
    body.issuer = issuer.fingerprint();
    body.chain = Some(Box::new(issuer.clone()));
    body.validate()?;
    check_ca_time(&issuer.body, now_unix)?;
    if body.not_after < now_unix {
        return Err(CertError::Expired {
            not_after: body.not_after,
        });
    }
    check_under_issuer(&issuer.body, &body)?;
    Ok(body)
}

/// A node's place under its issuer: an address from the pool, only the
/// issuer's groups, a name with its prefix, subnets inside the ones it
/// delegates and zones under its zones (none, for an issuer that delegates
/// none), and a lifetime within both its maximum and its own validity.
fn check_under_issuer(issuer: &CertBody, node: &CertBody) -> Result<(), CertError> {
    let beyond = |what: String| CertError::BeyondIssuer {
        issuer: issuer.name.clone(),
        what,
    };
    // The pool holds the address; the mesh prefix stays the node's own.
    for ip in &node.ips {
        if !issuer.ips.iter().any(|pool| pool.contains(&ip.addr())) {
            return Err(beyond(format!(
                "address {ip} is outside its pool {}",
                nets(&issuer.ips)
            )));
        }
    }
    if let Some(g) = node.groups.iter().find(|g| !issuer.groups.contains(g)) {
        return Err(beyond(format!(
            "group {g:?} is not among its groups ({})",
            issuer.groups.join(", ")
        )));
    }
    if !node.name.starts_with(&issuer.name_prefix) {
        return Err(beyond(format!(
            "name {:?} does not start with {:?}",
            node.name, issuer.name_prefix
        )));
    }
    if let Some(s) = node
        .subnets
        .iter()
        .find(|s| !issuer.subnets.iter().any(|d| d.contains(*s)))
    {
        return Err(beyond(if issuer.subnets.is_empty() {
            format!("subnet {s}: it delegates no subnets, so its certificates route none (sign the issuer with --subnets)")
        } else {
            format!(
                "subnet {s} is outside the subnets it delegates ({})",
                nets(&issuer.subnets)
            )
        }));
    }
    if let Some(z) = node
        .dns_zones
        .iter()
        .find(|z| !issuer.dns_zones.iter().any(|d| name_in_zone(z, d)))
    {
        return Err(beyond(if issuer.dns_zones.is_empty() {
            format!("DNS zone {z:?}: it delegates no zones, so its certificates answer for none (sign the issuer with --dns-zones)")
        } else {
            format!(
                "DNS zone {z:?} is not under the zones it delegates ({})",
                issuer.dns_zones.join(", ")
            )
        }));
    }
    let lifetime = node.not_after.saturating_sub(node.not_before);
    if lifetime > issuer.max_lifetime {
        return Err(beyond(format!(
            "a lifetime of {lifetime} s is longer than its maximum of {} s",
            issuer.max_lifetime
        )));
    }
    if node.not_before < issuer.not_before || node.not_after > issuer.not_after {
        return Err(beyond(format!(
            "validity {} .. {} is outside its own {} .. {}",
            format_unix_time(node.not_before),
            format_unix_time(node.not_after),
            format_unix_time(issuer.not_before),
            format_unix_time(issuer.not_after)
        )));
    }
    Ok(())
}

/// The CAs a node trusts, keyed by fingerprint.
#[derive(Clone, Debug, Default)]
pub struct CaPool {
    cas: BTreeMap<Fingerprint, TrustedCa>,
    /// Revoked certificates (nodes' or issuers'), each kept until it would
    /// have expired anyway.
    revoked: BTreeMap<Fingerprint, u64>,
}

/// Most revocations a pool keeps: a bound on what a lighthouse can make a
/// node hold. Entries leave as their certificates expire.
pub const MAX_REVOKED: usize = 100_000;

#[derive(Clone, Debug)]
struct TrustedCa {
    cert: Cert,
    key: ed25519_dalek::VerifyingKey,
}

impl CaPool {
    /// Each cert must be a CA with a valid self-signature. Duplicates are
    /// merged. Expiry is checked at verification time, not here.
    pub fn new(cas: Vec<Cert>) -> Result<CaPool, CertError> {
        let mut pool = CaPool::default();
        for cert in cas {
            let key = cert.check_ca()?;
            pool.cas.insert(cert.fingerprint(), TrustedCa { cert, key });
        }
        Ok(pool)
    }

    /// Verifies a node certificate: kind, issuer in the pool, signature over
    /// the exact body bytes, the body's rules, validity at `now_unix` (the
    /// cert's and the CA's), and the CA's constraints.
    pub fn verify(&self, cert: &Cert, now_unix: u64) -> Result<VerifiedCert, CertError> {
        let encoded = cert.encode();
        if encoded.len() > MAX_CERT_LEN {
            return Err(CertError::TooLarge {
                len: encoded.len(),
                max: MAX_CERT_LEN,
            });
        }
        self.verify_encoded(cert.clone(), encoded, now_unix)
    }

    /// Decodes and verifies bytes from the network.
    pub fn verify_bytes(&self, bytes: &[u8], now_unix: u64) -> Result<VerifiedCert, CertError> {
        let cert = Cert::decode(bytes)?;
        self.verify_encoded(cert, bytes.to_vec(), now_unix)
    }

    pub fn fingerprints(&self) -> impl Iterator<Item = Fingerprint> + '_ {
        self.cas.keys().copied()
    }

    /// The trusted CA cert with this fingerprint.
    pub fn get(&self, fingerprint: &Fingerprint) -> Option<&Cert> {
        self.cas.get(fingerprint).map(|ca| &ca.cert)
    }

    pub fn len(&self) -> usize {
        self.cas.len()
    }

    /// Refuses the certificate with this fingerprint from now on, a node's
    /// or an issuer's (then every certificate it signed), until `not_after`,
    /// when it would have expired anyway. Returns whether it was new.
    pub fn revoke(&mut self, fingerprint: Fingerprint, not_after: u64) -> bool {
        if self.revoked.len() >= MAX_REVOKED && !self.revoked.contains_key(&fingerprint) {
            return false;
        }
        self.revoked.insert(fingerprint, not_after).is_none()
    }

    pub fn is_revoked(&self, fingerprint: &Fingerprint) -> bool {
        self.revoked.contains_key(fingerprint)
    }

    /// Whether a verified certificate, or the issuer that signed it, has
    /// been revoked since it was verified.
    pub fn revokes(&self, cert: &VerifiedCert) -> bool {
        self.is_revoked(&cert.fingerprint())
            || cert
                .issuer_fingerprint()
                .is_some_and(|f| self.is_revoked(&f))
    }

    /// Whether both pools trust exactly the same CAs (revocations aside).
    pub fn trusts_same_cas(&self, other: &CaPool) -> bool {
        self.cas.keys().eq(other.cas.keys())
    }

    /// Takes on `old`'s revocations (a pool read again from its files knows
    /// none of those learned since).
    pub fn keep_revocations_of(&mut self, old: &CaPool) {
        for (fingerprint, not_after) in &old.revoked {
            self.revoke(*fingerprint, *not_after);
        }
    }

    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// Forgets revocations of certificates that have expired by `now_unix`.
    pub fn prune_revoked(&mut self, now_unix: u64) {
        self.revoked.retain(|_, not_after| *not_after >= now_unix);
    }

    pub fn is_empty(&self) -> bool {
        self.cas.is_empty()
    }

    /// An issuer embedded in a node certificate: signed by `ca`, valid now,
    /// inside the CA's constraints. Returns its verifying key.
    fn verify_issuer(
        &self,
        issuer: &Cert,
        ca: &TrustedCa,
        now_unix: u64,
    ) -> Result<ed25519_dalek::VerifyingKey, CertError> {
        if issuer.body.kind != CertKind::Issuer {
            return Err(CertError::NotAnIssuerCert);
        }
        verify_signature(&ca.key, &issuer.body, &issuer.signature)?;
        issuer.body.validate()?;
        check_ca_time(&issuer.body, now_unix)?;
        check_under_ca(&ca.cert.body, &issuer.body)?;
        ed25519_dalek::VerifyingKey::from_bytes(&issuer.body.public_key)
            .map_err(|_| malformed("public_key", "the issuer's key is not a valid Ed25519 key"))
    }

    /// `encoded` must be `cert`'s encoding.
    fn verify_encoded(
        &self,
        cert: Cert,
        encoded: Vec<u8>,
        now_unix: u64,
    ) -> Result<VerifiedCert, CertError> {
        let body = &cert.body;
        if body.kind != CertKind::Node {
            return Err(CertError::NotANodeCert);
        }
        // The root: the node's signer, or its issuer's.
        let root_fp = match &body.chain {
            None => body.issuer,
            Some(issuer) => issuer.body.issuer,
        };
        let ca = self
            .cas
            .get(&root_fp)
            .ok_or(CertError::UnknownIssuer { issuer: root_fp })?;
        match &body.chain {
            None => verify_signature(&ca.key, body, &cert.signature)?,
            Some(issuer) => {
                let issuer_key = self.verify_issuer(issuer, ca, now_unix)?;
                verify_signature(&issuer_key, body, &cert.signature)?;
            }
        }
        body.validate()?;
        let overlay_net = body.node_net()?;
        if now_unix.saturating_add(CLOCK_SKEW_SECS) < body.not_before {
            return Err(CertError::NotYetValid {
                not_before: body.not_before,
            });
        }
        if now_unix > body.not_after {
            return Err(CertError::Expired {
                not_after: body.not_after,
            });
        }
        check_ca_time(&ca.cert.body, now_unix)?;
        check_under_ca(&ca.cert.body, body)?;
        if let Some(issuer) = &body.chain {
            check_under_issuer(&issuer.body, body)?;
        }
        let fingerprint = Fingerprint::of(&encoded);
        let issuer_fingerprint = body.chain.as_ref().map(|issuer| issuer.fingerprint());
        for fp in std::iter::once(fingerprint).chain(issuer_fingerprint) {
            if self.is_revoked(&fp) {
                return Err(CertError::Revoked { fingerprint: fp });
            }
        }
        Ok(VerifiedCert(Arc::new(Verified {
            cert,
            encoded,
            fingerprint,
            issuer_fingerprint,
            overlay_net,
        })))
    }
}

/// A node certificate that passed [`CaPool::verify`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct VerifiedCert(Arc<Verified>);

#[derive(Debug)]
struct Verified {
    cert: Cert,
    encoded: Vec<u8>,
    fingerprint: Fingerprint,
    /// The issuer's, when an issuer (not the root) signed it.
    issuer_fingerprint: Option<Fingerprint>,
    overlay_net: Ipv4Net,
}

impl VerifiedCert {
    pub fn cert(&self) -> &Cert {
        &self.0.cert
    }

    /// The exact bytes that were verified, for passing on to others.
    pub fn encoded(&self) -> &[u8] {
        &self.0.encoded
    }

    pub fn name(&self) -> &str {
        &self.0.cert.body.name
    }

    pub fn overlay_ip(&self) -> Ipv4Addr {
        self.0.overlay_net.addr()
    }

    /// The overlay address with the mesh prefix, e.g. `100.64.0.5/10`.
    pub fn overlay_net(&self) -> Ipv4Net {
        self.0.overlay_net
    }

    pub fn groups(&self) -> &[String] {
        &self.0.cert.body.groups
    }

    pub fn has_group(&self, g: &str) -> bool {
        self.0
            .cert
            .body
            .groups
            .binary_search_by(|x| x.as_str().cmp(g))
            .is_ok()
    }

    pub fn subnets(&self) -> &[IpNet] {
        &self.0.cert.body.subnets
    }

    /// The DNS zones the node may answer for.
    pub fn dns_zones(&self) -> &[String] {
        &self.0.cert.body.dns_zones
    }

    /// Whether the certificate lets the node answer for `name` (canonical
    /// form): it lies under one of its zones.
    pub fn answers_for(&self, name: &str) -> bool {
        self.dns_zones().iter().any(|zone| name_in_zone(name, zone))
    }

    /// The node's X25519 (WireGuard static) public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.cert.body.public_key
    }

    pub fn not_after(&self) -> u64 {
        self.0.cert.body.not_after
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.0.fingerprint
    }

    pub fn issuer(&self) -> Fingerprint {
        self.0.cert.body.issuer
    }

    /// The fingerprint of the issuer that signed it, when not the root CA
    /// directly.
    pub fn issuer_fingerprint(&self) -> Option<Fingerprint> {
        self.0.issuer_fingerprint
    }

    /// The issuer that signed it, when not the root CA directly.
    pub fn issued_by(&self) -> Option<&str> {
        self.0
            .cert
            .body
            .chain
            .as_ref()
            .map(|c| c.body.name.as_str())
    }
}

impl Fingerprint {
    /// The issuer of a self-signed CA.
    pub const ZERO: Fingerprint = Fingerprint([0; 32]);

    /// SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(bytes).into())
    }

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        armor::hex(&self.0[..4])
    }
}

/// Lower-case hex.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&armor::hex(&self.0))
    }
}

/// Parses 64 hex digits, as [`Fingerprint`]'s `Display` writes them.
impl FromStr for Fingerprint {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Fingerprint, CertError> {
        armor::unhex::<32>(s.trim())
            .map(Fingerprint)
            .ok_or_else(|| malformed("fingerprint", "expected 64 hex digits"))
    }
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertKind::Ca => "ca",
            CertKind::Node => "node",
            CertKind::Issuer => "issuer",
        })
    }
}

/// Formats unix seconds as RFC 3339 UTC, e.g. `2024-05-01T12:00:00Z`.
pub fn format_unix_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn time(secs: &u64) -> String {
    format_unix_time(*secs)
}

fn nets(list: &[IpNet]) -> String {
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn malformed(field: &'static str, reason: impl Into<String>) -> CertError {
    CertError::Malformed {
        field,
        reason: reason.into(),
    }
}

fn validate_name(field: &'static str, value: &str) -> Result<(), CertError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName {
            field,
            value: value.to_string(),
        })
    }
}

/// A CA's constraint nets and an issuer's pools are networks, not hosts.
fn no_host_bits(ips: &[IpNet], what: &str) -> Result<(), CertError> {
    match ips.iter().find(|net| net.trunc() != **net) {
        Some(net) => Err(malformed(
            "ips",
            format!(
                "{what} {net} has host bits set; did you mean {}?",
                net.trunc()
            ),
        )),
        None => Ok(()),
    }
}

fn canonicalize_groups(groups: &mut Vec<String>) {
    groups.sort();
    groups.dedup();
}

/// Lower case, no trailing dot, sorted, de-duplicated.
fn canonicalize_zones(zones: &mut Vec<String>) {
    for zone in zones.iter_mut() {
        *zone = canonical_zone(zone);
    }
    zones.sort();
    zones.dedup();
}

/// A zone or name as certificates and lookups compare it: lower case,
/// without the trailing dot.
pub fn canonical_zone(zone: &str) -> String {
    zone.strip_suffix('.').unwrap_or(zone).to_ascii_lowercase()
}

/// Whether `name` is `zone` or lies under it (`db.internal` under
/// `internal`; `xinternal` not). Both in canonical form.
pub fn name_in_zone(name: &str, zone: &str) -> bool {
    match name.strip_suffix(zone) {
        Some("") => true,
        Some(rest) => rest.ends_with('.'),
        None => false,
    }
}

/// A DNS zone: dot-separated labels of 1-63 characters from a-z 0-9 - _,
/// not starting or ending with '-', 1-253 bytes in all, lower case, with
/// no trailing dot.
pub fn validate_zone(zone: &str) -> Result<(), CertError> {
    let bad = |reason: &str| CertError::InvalidZone {
        zone: zone.chars().take(MAX_ZONE_LEN).collect(),
        reason: reason.to_string(),
    };
    if zone.is_empty() || zone.len() > MAX_ZONE_LEN {
        return Err(bad(
            "a zone has 1-253 characters, e.g. internal or svc.cluster.local",
        ));
    }
    for label in zone.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label has 1-63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
        {
            return Err(bad(
                "use lower-case letters, digits, '-' and '_' between dots",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label does not start or end with '-'"));
        }
    }
    Ok(())
}

fn check_ca_time(ca: &CertBody, now_unix: u64) -> Result<(), CertError> {
    if now_unix.saturating_add(CLOCK_SKEW_SECS) < ca.not_before {
        return Err(CertError::CaNotYetValid {
            ca: ca.name.clone(),
            not_before: ca.not_before,
        });
    }
    if now_unix > ca.not_after {
        return Err(CertError::CaExpired {
            ca: ca.name.clone(),
            not_after: ca.not_after,
        });
    }
    Ok(())
}

/// The node's validity window, address and groups must sit inside the CA's.
fn check_under_ca(ca: &CertBody, node: &CertBody) -> Result<(), CertError> {
    if node.not_before < ca.not_before || node.not_after > ca.not_after {
        return Err(CertError::ValidityOutsideCa {
            not_before: node.not_before,
            not_after: node.not_after,
            ca_not_before: ca.not_before,
            ca_not_after: ca.not_after,
        });
    }
    if !ca.ips.is_empty() {
        for ip in &node.ips {
            if !ca.ips.iter().any(|allowed| allowed.contains(ip)) {
                return Err(CertError::IpOutsideCa {
                    ip: *ip,
                    allowed: ca.ips.clone(),
                });
            }
        }
    }
    if !ca.groups.is_empty() {
        for group in &node.groups {
            if !ca.groups.contains(group) {
                return Err(CertError::GroupOutsideCa {
                    group: group.clone(),
                    allowed: ca.groups.clone(),
                });
            }
        }
    }
    if !ca.dns_zones.is_empty() {
        for zone in &node.dns_zones {
            if !ca
                .dns_zones
                .iter()
                .any(|allowed| name_in_zone(zone, allowed))
            {
                return Err(CertError::ZoneOutsideCa {
                    zone: zone.clone(),
                    allowed: ca.dns_zones.clone(),
                });
            }
        }
    }
    Ok(())
}

fn sign_body(body: CertBody, key: &CaSecretKey) -> Result<Cert, CertError> {
    let bytes = encode_body(&body);
    let len = bytes.len() + SIGNATURE_LEN;
    if len > MAX_CERT_LEN {
        return Err(CertError::TooLarge {
            len,
            max: MAX_CERT_LEN,
        });
    }
    let signature = key.sign(&bytes);
    Ok(Cert { body, signature })
}

fn verify_signature(
    key: &ed25519_dalek::VerifyingKey,
    body: &CertBody,
    signature: &[u8; 64],
) -> Result<(), CertError> {
    let signature = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(&encode_body(body), &signature)
        .map_err(|_| CertError::BadSignature)
}

/// The bytes a certificate's signature covers (for tools and tests that
/// sign by hand; [`sign_node`] and friends are the checked way).
pub fn signed_bytes(body: &CertBody) -> Vec<u8> {
    encode_body(body)
}

/// The signed bytes. Lengths that do not fit a u16 saturate; such a body is
/// far over [`MAX_CERT_LEN`], so signing and decoding refuse it anyway.
/// The one format version a body is written in (see the module docs).
fn format_version(body: &CertBody) -> u8 {
    let delegates = body.kind == CertKind::Issuer && !body.subnets.is_empty();
    match (
        body.kind == CertKind::Issuer || body.chain.is_some(),
        body.dns_zones.is_empty(),
    ) {
        (true, true) if !delegates => VERSION_ISSUED,
        (true, _) => VERSION_DELEGATED,
        (false, true) => VERSION,
        (false, false) => VERSION_ZONES,
    }
}

fn encode_body(body: &CertBody) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    let version = format_version(body);
    out.push(version);
    out.push(match body.kind {
        CertKind::Ca => KIND_CA,
        CertKind::Node => KIND_NODE,
        CertKind::Issuer => KIND_ISSUER,
    });
    put_str(&mut out, &body.name);
    put_nets(&mut out, &body.ips);
    put_u16(&mut out, body.groups.len());
    for group in &body.groups {
        put_str(&mut out, group);
    }
    put_nets(&mut out, &body.subnets);
    if matches!(version, VERSION_ZONES | VERSION_DELEGATED) {
        put_u16(&mut out, body.dns_zones.len());
        for zone in &body.dns_zones {
            put_str(&mut out, zone);
        }
    }
    out.extend_from_slice(&body.not_before.to_be_bytes());
    out.extend_from_slice(&body.not_after.to_be_bytes());
    out.extend_from_slice(&body.public_key);
    out.extend_from_slice(&body.issuer.0);
    if body.kind == CertKind::Issuer {
        put_str(&mut out, &body.name_prefix);
        out.extend_from_slice(&body.max_lifetime.to_be_bytes());
    } else if let Some(chain) = &body.chain {
        let inner = chain.encode();
        put_u16(&mut out, inner.len());
        out.extend_from_slice(&inner);
    }
    out
}

fn put_u16(out: &mut Vec<u8>, n: usize) {
    let n = u16::try_from(n).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u16(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_nets(out: &mut Vec<u8>, nets: &[IpNet]) {
    put_u16(out, nets.len());
    for net in nets {
        match net {
            IpNet::V4(n) => {
                out.push(4);
                out.extend_from_slice(&n.addr().octets());
            }
            IpNet::V6(n) => {
                out.push(6);
                out.extend_from_slice(&n.addr().octets());
            }
        }
        out.push(net.prefix_len());
    }
}

/// The shared bounds-checked reader ([`crate::codec::Reader`]) for
/// certificates: running out of bytes is [`CertError::Truncated`], and a
/// certificate's own fields (counts, names, nets) are read with their
/// limits.
struct Reader<'a>(crate::codec::Reader<'a>);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CertError> {
        self.0.bytes(n).ok_or(CertError::Truncated)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CertError> {
        self.0.array().ok_or(CertError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, CertError> {
        self.0.u8().ok_or(CertError::Truncated)
    }

    fn u16(&mut self) -> Result<u16, CertError> {
        self.0.u16().ok_or(CertError::Truncated)
    }

    fn u64(&mut self) -> Result<u64, CertError> {
        self.0.u64().ok_or(CertError::Truncated)
    }

    fn count(&mut self, field: &'static str, max: usize) -> Result<usize, CertError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(malformed(
                field,
                format!("{n} entries, at most {max} allowed"),
            ));
        }
        Ok(n)
    }

    fn name(&mut self, field: &'static str) -> Result<String, CertError> {
        let len = usize::from(self.u16()?);
        if len > MAX_NAME_LEN {
            return Err(CertError::InvalidName {
                field,
                value: format!("<{len} bytes>"),
            });
        }
        let bytes = self.take(len)?;
        let value = std::str::from_utf8(bytes)
            .map_err(|_| malformed(field, "not valid UTF-8"))?
            .to_string();
        validate_name(field, &value)?;
        Ok(value)
    }

    fn zone(&mut self) -> Result<String, CertError> {
        let len = usize::from(self.u16()?);
        if len > MAX_ZONE_LEN {
            return Err(malformed(
                "dns_zones",
                format!("a zone of {len} bytes, at most {MAX_ZONE_LEN}"),
            ));
        }
        let zone = std::str::from_utf8(self.take(len)?)
            .map_err(|_| malformed("dns_zones", "not valid UTF-8"))?
            .to_string();
        validate_zone(&zone)?;
        Ok(zone)
    }

    fn nets(&mut self, field: &'static str, max: usize) -> Result<Vec<IpNet>, CertError> {
        let n = self.count(field, max)?;
        let mut nets = Vec::with_capacity(n);
        for _ in 0..n {
            let net = match self.u8()? {
                4 => {
                    let addr = Ipv4Addr::from(self.array::<4>()?);
                    let prefix = self.u8()?;
                    Ipv4Net::new(addr, prefix).map(IpNet::V4).map_err(|_| {
                        malformed(field, format!("IPv4 prefix length {prefix} > 32"))
                    })?
                }
                6 => {
                    let addr = Ipv6Addr::from(self.array::<16>()?);
                    let prefix = self.u8()?;
                    Ipv6Net::new(addr, prefix).map(IpNet::V6).map_err(|_| {
                        malformed(field, format!("IPv6 prefix length {prefix} > 128"))
                    })?
                }
                family => {
                    return Err(malformed(field, format!("unknown address family {family}")));
                }
            };
            nets.push(net);
        }
        Ok(nets)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::keys::NodeSecretKey;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000;
    const DAY: u64 = 86_400;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ca_body(key: &CaSecretKey, ips: &[&str], groups: &[&str]) -> CertBody {
        CertBody {
            kind: CertKind::Ca,
            name: "test-ca".into(),
            ips: ips.iter().map(|s| net(s)).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            subnets: vec![],
            dns_zones: vec![],
            not_before: NOW - DAY,
            not_after: NOW + 365 * DAY,
            public_key: key.public_bytes(),
            issuer: Fingerprint::ZERO,
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: None,
        }
    }

    fn make_ca(ips: &[&str], groups: &[&str]) -> (Cert, CaSecretKey) {
        let key = CaSecretKey::generate();
        let ca = self_sign_ca(ca_body(&key, ips, groups), &key).unwrap();
        (ca, key)
    }

    fn node_body(ip: &str, groups: &[&str]) -> CertBody {
        CertBody {
            kind: CertKind::Node,
            name: "node-1".into(),
            ips: vec![net(ip)],
            groups: groups.iter().map(|s| s.to_string()).collect(),
            subnets: vec![net("198.19.0.0/16")],
            dns_zones: vec![],
            not_before: NOW - 60,
            not_after: NOW + DAY,
            public_key: NodeSecretKey::generate().public_bytes(),
            issuer: Fingerprint::ZERO,
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: None,
        }
    }

    /// Signs without any of `sign_node`'s checks, to test what verification
    /// does with certs a careless or hostile signer produced.
    fn force_sign(ca: &Cert, key: &CaSecretKey, mut body: CertBody) -> Cert {
        body.issuer = ca.fingerprint();
        let signature = key.sign(&encode_body(&body));
        Cert { body, signature }
    }

    fn pool(cas: &[&Cert]) -> CaPool {
        CaPool::new(cas.iter().map(|c| (*c).clone()).collect()).unwrap()
    }

    #[test]
    fn dns_zones_make_version_3_and_are_checked_against_the_ca() {
        // A CA without zones lets its nodes carry any.
        let (ca, key) = make_ca(&["100.64.0.0/10"], &[]);
        assert_eq!(ca.encode()[4], VERSION);
        let mut body = node_body("100.64.0.9/10", &[]);
        body.dns_zones = vec![
            "Internal.".into(),
            "svc.cluster.local".into(),
            "internal".into(),
        ];
        let cert = sign_node(&ca, &key, body, NOW).unwrap();
        assert_eq!(cert.body.dns_zones, ["internal", "svc.cluster.local"]);
        let bytes = cert.encode();
        assert_eq!(bytes[4], VERSION_ZONES);
        assert_eq!(Cert::decode(&bytes).unwrap(), cert);
        let v = pool(&[&ca]).verify_bytes(&bytes, NOW).unwrap();
        assert_eq!(v.dns_zones(), ["internal", "svc.cluster.local"]);
        assert!(v.answers_for("db.internal") && v.answers_for("internal"));
        assert!(v.answers_for("web.default.svc.cluster.local"));
        assert!(!v.answers_for("xinternal") && !v.answers_for("cluster.local"));
        // Without zones a node stays version 1, byte for byte.
        let plain = sign_node(&ca, &key, node_body("100.64.0.10/10", &[]), NOW).unwrap();
        assert_eq!(plain.encode()[4], VERSION);

        // A CA naming zones: its nodes' zones lie under them.
        let mut ca_body = ca_body(&CaSecretKey::generate(), &[], &[]);
        let zoned_key = CaSecretKey::generate();
        ca_body.public_key = zoned_key.public_bytes();
        ca_body.dns_zones = vec!["internal".into()];
        let zoned = self_sign_ca(ca_body, &zoned_key).unwrap();
        assert_eq!(zoned.encode()[4], VERSION_ZONES);
        let mut body = node_body("100.64.0.9/10", &[]);
        body.dns_zones = vec!["prod.internal".into()];
        sign_node(&zoned, &zoned_key, body.clone(), NOW).unwrap();
        body.dns_zones = vec!["corp".into()];
        let err = sign_node(&zoned, &zoned_key, body.clone(), NOW).unwrap_err();
        assert!(
            matches!(err, CertError::ZoneOutsideCa { ref zone, .. } if zone == "corp"),
            "{err}"
        );
        // Forced past the signer's checks: verification refuses it too.
        let forced = force_sign(&zoned, &zoned_key, body);
        let err = pool(&[&zoned])
            .verify_bytes(&forced.encode(), NOW)
            .unwrap_err();
        assert!(
            err.to_string().contains("not under the CA's allowed zones"),
            "{err}"
        );
    }

    #[test]
    fn malformed_dns_zones_are_refused_with_the_reason() {
        let (ca, key) = make_ca(&[], &[]);
        for (zone, why) in [
            ("", "1-253 characters"),
            ("a..b", "1-63 characters"),
            ("-bad.internal", "start or end with '-'"),
            ("caf\u{e9}.internal", "lower-case letters"),
            ("sp ace", "lower-case letters"),
            (&"a".repeat(64), "1-63 characters"),
        ] {
            let mut body = node_body("100.64.0.9/10", &[]);
            body.dns_zones = vec![zone.to_string()];
            let err = sign_node(&ca, &key, body, NOW).unwrap_err();
            assert!(err.to_string().contains(why), "{zone:?}: {err}");
        }
        // Version 3 without a zone is not canonical; an issuer is never 3.
        let cert = sign_node(&ca, &key, node_body("100.64.0.9/10", &[]), NOW).unwrap();
        let mut bytes = cert.encode();
        bytes[4] = VERSION_ZONES;
        assert!(Cert::decode(&bytes).is_err());
        let (_, issuer, _) = issuer_setup();
        let mut bytes = issuer.encode();
        bytes[4] = VERSION_ZONES;
        assert!(Cert::decode(&bytes).is_err());
        // Not sorted: refused by verification (the signer sorts).
        let mut body = node_body("100.64.0.9/10", &[]);
        body.dns_zones = vec!["b".into(), "a".into()];
        let unsorted = force_sign(&ca, &key, body);
        let err = pool(&[&ca])
            .verify_bytes(&unsorted.encode(), NOW)
            .unwrap_err();
        assert!(err.to_string().contains("sorted"), "{err}");
        // Nodes an issuer that delegates no zones signs carry none.
        let (_, issuer, issuer_key) = issuer_setup();
        let mut body = ci_body("100.64.100.7/10", &["ci"]);
        body.dns_zones = vec!["internal".into()];
        let err = sign_under_issuer(&issuer, &issuer_key, body, NOW).unwrap_err();
        assert!(err.to_string().contains("delegates no zones"), "{err}");
    }

    #[test]
    fn round_trips_binary_and_pem() {
        let (ca, key) = make_ca(&["100.64.0.0/10"], &["ci", "db", "lighthouse"]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &["db", "ci"]), NOW).unwrap();
        for cert in [&ca, &node] {
            let bytes = cert.encode();
            assert!(bytes.len() <= MAX_CERT_LEN);
            assert_eq!(&Cert::decode(&bytes).unwrap(), cert);
            let pem = cert.to_pem();
            assert!(pem.starts_with("-----BEGIN TERN CERTIFICATE-----\n"));
            assert_eq!(&Cert::from_pem(&pem).unwrap(), cert);
        }
        let both = format!("# CA bundle\n{}\n{}", ca.to_pem(), node.to_pem());
        assert_eq!(Cert::all_from_pem(&both).unwrap(), vec![ca.clone(), node]);
        assert!(matches!(
            Cert::from_pem(&both),
            Err(CertError::Armor(ArmorError::MultipleBlocks {
                count: 2,
                ..
            }))
        ));
        assert!(matches!(
            Cert::all_from_pem(&key.to_pem()),
            Err(CertError::Armor(ArmorError::WrongLabel { .. }))
        ));
    }

    #[test]
    fn verify_accepts_a_good_cert_and_exposes_its_fields() {
        let (ca, key) = make_ca(&["100.64.0.0/10"], &[]);
        let node = sign_node(
            &ca,
            &key,
            node_body("100.64.0.5/10", &["db", "ci", "db"]),
            NOW,
        )
        .unwrap();
        assert_eq!(node.body.groups, vec!["ci".to_string(), "db".to_string()]);
        assert_eq!(node.body.issuer, ca.fingerprint());
        let v = pool(&[&ca]).verify_bytes(&node.encode(), NOW).unwrap();
        assert_eq!(v.cert(), &node);
        assert_eq!(v.encoded(), node.encode().as_slice());
        assert_eq!(v.name(), "node-1");
        assert_eq!(v.overlay_ip(), Ipv4Addr::new(100, 64, 0, 5));
        assert_eq!(v.overlay_net(), "100.64.0.5/10".parse::<Ipv4Net>().unwrap());
        assert!(v.has_group("db") && v.has_group("ci") && !v.has_group(LIGHTHOUSE_GROUP));
        assert_eq!(v.subnets(), &[net("198.19.0.0/16")]);
        assert_eq!(v.public_key(), node.body.public_key);
        assert_eq!(v.not_after(), NOW + DAY);
        assert_eq!(v.fingerprint(), node.fingerprint());
        assert_eq!(v.issuer(), ca.fingerprint());
        // Validity bounds are inclusive.
        assert!(pool(&[&ca]).verify(&node, NOW - 60).is_ok());
        assert!(pool(&[&ca]).verify(&node, NOW + DAY).is_ok());
    }

    #[test]
    fn forged_signature_is_rejected() {
        let (ca, key) = make_ca(&[], &[]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW).unwrap();
        let pool = pool(&[&ca]);
        let bytes = node.encode();
        // Flip one bit of the body's public key: a different identity.
        let mut forged = bytes.clone();
        forged[bytes.len() - 64 - 32 - 32] ^= 1;
        assert_eq!(
            pool.verify_bytes(&forged, NOW).unwrap_err(),
            CertError::BadSignature
        );
        // Swap the name for another valid one.
        let mut renamed = node.clone();
        renamed.body.name = "node-2".into();
        assert_eq!(
            pool.verify(&renamed, NOW).unwrap_err(),
            CertError::BadSignature
        );
        // Damage the signature itself.
        let mut bad_sig = bytes.clone();
        *bad_sig.last_mut().unwrap() ^= 0x80;
        assert_eq!(
            pool.verify_bytes(&bad_sig, NOW).unwrap_err(),
            CertError::BadSignature
        );
    }

    #[test]
    fn cert_from_another_ca_is_unknown_issuer() {
        let (ca, key) = make_ca(&[], &[]);
        let (other_ca, _) = make_ca(&[], &[]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW).unwrap();
        assert_eq!(
            pool(&[&other_ca]).verify(&node, NOW).unwrap_err(),
            CertError::UnknownIssuer {
                issuer: ca.fingerprint()
            }
        );
        // Claiming the trusted CA as issuer does not help: the signature fails.
        let (evil_ca, evil_key) = make_ca(&[], &[]);
        let mut forged = force_sign(&evil_ca, &evil_key, node_body("100.64.0.5/10", &[]));
        forged.body.issuer = other_ca.fingerprint();
        assert_eq!(
            pool(&[&other_ca]).verify(&forged, NOW).unwrap_err(),
            CertError::BadSignature
        );
    }

    #[test]
    fn expired_and_not_yet_valid_are_rejected() {
        let (ca, key) = make_ca(&[], &[]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW).unwrap();
        let pool = pool(&[&ca]);
        assert_eq!(
            pool.verify(&node, NOW + DAY + 1).unwrap_err(),
            CertError::Expired {
                not_after: NOW + DAY
            }
        );
        assert_eq!(
            pool.verify(&node, NOW - 60 - CLOCK_SKEW_SECS - 1)
                .unwrap_err(),
            CertError::NotYetValid {
                not_before: NOW - 60
            }
        );
        // A verifier whose clock runs up to CLOCK_SKEW_SECS behind the
        // signer's accepts a brand-new certificate; expiry has no leeway.
        assert!(pool.verify(&node, NOW - 60 - CLOCK_SKEW_SECS).is_ok());
        assert!(pool.verify(&node, NOW + DAY).is_ok());
        let msg = CertError::Expired { not_after: 0 }.to_string();
        assert!(msg.contains("expired at 1970-01-01T00:00:00Z"), "{msg}");
    }

    #[test]
    fn expired_ca_is_rejected() {
        let key = CaSecretKey::generate();
        let mut body = ca_body(&key, &[], &[]);
        body.not_after = NOW + 100;
        let ca = self_sign_ca(body, &key).unwrap();
        assert!(matches!(
            sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW + 101),
            Err(CertError::CaExpired { not_after, .. }) if not_after == NOW + 100
        ));
        // A cert that outlives its CA (signed without the checks) is refused
        // once the CA has expired.
        let mut long = node_body("100.64.0.5/10", &[]);
        long.not_after = NOW + 1000;
        let cert = force_sign(&ca, &key, long);
        assert!(matches!(
            pool(&[&ca]).verify(&cert, NOW + 500),
            Err(CertError::CaExpired { .. })
        ));
        assert!(matches!(
            pool(&[&ca]).verify(&cert, NOW),
            Err(CertError::ValidityOutsideCa { .. })
        ));
    }

    #[test]
    fn ip_outside_ca_constraint_is_rejected() {
        let (ca, key) = make_ca(&["100.64.0.0/24"], &[]);
        assert_eq!(
            sign_node(&ca, &key, node_body("100.64.1.5/10", &[]), NOW).unwrap_err(),
            CertError::IpOutsideCa {
                ip: net("100.64.1.5/10"),
                allowed: vec![net("100.64.0.0/24")]
            }
        );
        // Inside the CA's net but with a wider prefix than the CA allows.
        assert!(matches!(
            sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW),
            Err(CertError::IpOutsideCa { .. })
        ));
        assert!(sign_node(&ca, &key, node_body("100.64.0.5/24", &[]), NOW).is_ok());
        let forced = force_sign(&ca, &key, node_body("100.64.1.5/24", &[]));
        assert!(matches!(
            pool(&[&ca]).verify(&forced, NOW),
            Err(CertError::IpOutsideCa { ip, .. }) if ip == net("100.64.1.5/24")
        ));
    }

    #[test]
    fn group_outside_ca_constraint_is_rejected() {
        let (ca, key) = make_ca(&[], &["ci", "db"]);
        assert_eq!(
            sign_node(&ca, &key, node_body("100.64.0.5/10", &["ci", "admin"]), NOW).unwrap_err(),
            CertError::GroupOutsideCa {
                group: "admin".into(),
                allowed: vec!["ci".into(), "db".into()]
            }
        );
        let forced = force_sign(&ca, &key, node_body("100.64.0.5/10", &["admin"]));
        assert!(matches!(
            pool(&[&ca]).verify(&forced, NOW),
            Err(CertError::GroupOutsideCa { group, .. }) if group == "admin"
        ));
    }

    #[test]
    fn signing_refuses_what_the_ca_does_not_allow() {
        let (ca, key) = make_ca(&[], &[]);
        let mut long = node_body("100.64.0.5/10", &[]);
        long.not_after = ca.body.not_after + 1;
        assert!(matches!(
            sign_node(&ca, &key, long, NOW),
            Err(CertError::ValidityOutsideCa { .. })
        ));
        let mut early = node_body("100.64.0.5/10", &[]);
        early.not_before = ca.body.not_before - 1;
        assert!(matches!(
            sign_node(&ca, &key, early, NOW),
            Err(CertError::ValidityOutsideCa { .. })
        ));
        let mut stale = node_body("100.64.0.5/10", &[]);
        stale.not_after = NOW - 1;
        assert!(matches!(
            sign_node(&ca, &key, stale, NOW),
            Err(CertError::Expired { .. })
        ));
        let other = CaSecretKey::generate();
        assert_eq!(
            sign_node(&ca, &other, node_body("100.64.0.5/10", &[]), NOW).unwrap_err(),
            CertError::KeyMismatch
        );
        assert_eq!(
            self_sign_ca(ca_body(&key, &[], &[]), &other).unwrap_err(),
            CertError::KeyMismatch
        );
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW).unwrap();
        assert_eq!(
            sign_node(&node, &key, node_body("100.64.0.6/10", &[]), NOW).unwrap_err(),
            CertError::NotACaCert
        );
        assert_eq!(
            sign_node(&ca, &key, ca_body(&key, &[], &[]), NOW).unwrap_err(),
            CertError::NotANodeCert
        );
    }

    #[test]
    fn body_rules_are_enforced_at_signing() {
        let (ca, key) = make_ca(&[], &[]);
        let sign = |body: CertBody| sign_node(&ca, &key, body, NOW).unwrap_err();
        let mut b = node_body("100.64.0.5/10", &[]);
        b.subnets = vec![net("198.19.4.20/16")];
        assert!(matches!(sign(b), CertError::SubnetInvalid { .. }));
        let mut b = node_body("100.64.0.5/10", &[]);
        b.name = "bad name".into();
        assert!(matches!(
            sign(b),
            CertError::InvalidName { field: "name", .. }
        ));
        let mut b = node_body("100.64.0.5/10", &[]);
        b.name = "x".repeat(65);
        assert!(matches!(sign(b), CertError::InvalidName { .. }));
        assert!(matches!(
            sign(node_body("100.64.0.5/10", &["ok", "no/slash"])),
            CertError::InvalidName { field: "group", .. }
        ));
        assert!(matches!(
            sign(node_body("fd00::5/64", &[])),
            CertError::Malformed { field: "ips", .. }
        ));
        assert!(matches!(
            sign(node_body("100.64.0.0/10", &[])),
            CertError::Malformed { field: "ips", .. }
        ));
        let mut b = node_body("100.64.0.5/10", &[]);
        b.ips.push(net("100.64.0.6/10"));
        assert!(matches!(sign(b), CertError::Malformed { field: "ips", .. }));
        let mut b = node_body("100.64.0.5/10", &[]);
        b.not_before = b.not_after + 1;
        assert!(matches!(
            sign(b),
            CertError::Malformed {
                field: "not_after",
                ..
            }
        ));
        let mut b = node_body("100.64.0.5/10", &[]);
        b.subnets = (0..=MAX_SUBNETS as u8)
            .map(|i| net(&format!("10.{i}.0.0/16")))
            .collect();
        assert!(matches!(
            sign(b),
            CertError::Malformed {
                field: "subnets",
                ..
            }
        ));
        // Under the count limits but over the size cap.
        let mut b = node_body("100.64.0.5/10", &[]);
        b.name = "n".repeat(MAX_NAME_LEN);
        b.groups = (0..MAX_GROUPS)
            .map(|i| format!("{i:02}{}", "g".repeat(62)))
            .collect();
        b.subnets = (0..MAX_SUBNETS as u16)
            .map(|i| net(&format!("fd00:{i:x}::/32")))
            .collect();
        assert!(matches!(sign(b), CertError::TooLarge { .. }));
        let mut ca_with_host_bits = ca_body(&key, &["100.64.0.1/10"], &[]);
        assert!(matches!(
            self_sign_ca(ca_with_host_bits.clone(), &key),
            Err(CertError::Malformed { field: "ips", .. })
        ));
        ca_with_host_bits.ips.clear();
        ca_with_host_bits.subnets = vec![net("10.0.0.0/8")];
        assert!(matches!(
            self_sign_ca(ca_with_host_bits, &key),
            Err(CertError::Malformed {
                field: "subnets",
                ..
            })
        ));
    }

    #[test]
    fn pool_takes_only_self_signed_cas_and_verifies_only_nodes() {
        let (ca, key) = make_ca(&[], &[]);
        let (ca2, _) = make_ca(&[], &[]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW).unwrap();
        assert_eq!(
            CaPool::new(vec![node.clone()]).unwrap_err(),
            CertError::NotACaCert
        );
        let mut tampered = ca.clone();
        tampered.body.name = "other-ca".into();
        assert_eq!(
            CaPool::new(vec![tampered]).unwrap_err(),
            CertError::BadSignature
        );
        let p = pool(&[&ca, &ca2, &ca]);
        assert_eq!(p.len(), 2);
        let mut fps: Vec<_> = p.fingerprints().collect();
        fps.sort();
        let mut expected = vec![ca.fingerprint(), ca2.fingerprint()];
        expected.sort();
        assert_eq!(fps, expected);
        assert_eq!(p.get(&ca.fingerprint()), Some(&ca));
        assert_eq!(p.verify(&ca, NOW).unwrap_err(), CertError::NotANodeCert);
    }

    #[test]
    fn truncated_at_every_length() {
        let (ca, key) = make_ca(&["100.64.0.0/10"], &["ci"]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &["ci"]), NOW).unwrap();
        for cert in [&ca, &node] {
            let bytes = cert.encode();
            for len in 0..bytes.len() {
                assert_eq!(
                    Cert::decode(&bytes[..len]),
                    Err(CertError::Truncated),
                    "len {len}"
                );
            }
            assert_eq!(
                pool(&[&ca])
                    .verify_bytes(&bytes[..bytes.len() - 1], NOW)
                    .unwrap_err(),
                CertError::Truncated
            );
        }
    }

    #[test]
    fn strict_decoding_names_the_problem() {
        let (ca, key) = make_ca(&[], &[]);
        let node = sign_node(&ca, &key, node_body("100.64.0.5/10", &[]), NOW).unwrap();
        let bytes = node.encode();

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            Cert::decode(&trailing),
            Err(CertError::TrailingBytes { extra: 1 })
        );

        let huge = vec![0u8; MAX_CERT_LEN + 1];
        assert_eq!(
            Cert::decode(&huge),
            Err(CertError::TooLarge {
                len: MAX_CERT_LEN + 1,
                max: MAX_CERT_LEN
            })
        );

        assert!(matches!(
            Cert::decode(b"garbage, not a certificate at all"),
            Err(CertError::Malformed { field: "magic", .. })
        ));
        assert!(matches!(
            Cert::from_pem("hello world\n"),
            Err(CertError::Armor(ArmorError::NoBlock { .. }))
        ));

        let mut v9 = bytes.clone();
        v9[4] = 9;
        assert_eq!(
            Cert::decode(&v9),
            Err(CertError::UnsupportedVersion { version: 9 })
        );

        let mut kind = bytes.clone();
        kind[5] = 4;
        assert_eq!(Cert::decode(&kind), Err(CertError::UnknownKind { kind: 4 }));
        kind[5] = 3; // an issuer is always version 2
        assert!(matches!(
            Cert::decode(&kind),
            Err(CertError::Malformed {
                field: "version",
                ..
            })
        ));

        // name "node-1" starts at 6 (u16 len) + 2.
        let mut non_utf8 = bytes.clone();
        non_utf8[8] = 0xff;
        assert!(matches!(
            Cert::decode(&non_utf8),
            Err(CertError::Malformed { field: "name", .. })
        ));
        let mut control = bytes.clone();
        control[8] = 0x1b;
        assert!(matches!(
            Cert::decode(&control),
            Err(CertError::InvalidName { field: "name", .. })
        ));

        // ips: count at 14, family 16, addr 17..21, prefix 21.
        assert_eq!(&bytes[14..17], &[0, 1, 4]);
        let mut prefix = bytes.clone();
        prefix[21] = 33;
        assert!(matches!(
            Cert::decode(&prefix),
            Err(CertError::Malformed { field: "ips", .. })
        ));
        let mut family = bytes.clone();
        family[16] = 5;
        assert!(matches!(
            Cert::decode(&family),
            Err(CertError::Malformed { field: "ips", .. })
        ));
        let mut count = bytes.clone();
        count[15] = 200;
        assert!(matches!(
            Cert::decode(&count),
            Err(CertError::Malformed { field: "ips", .. })
        ));
    }

    #[test]
    fn fingerprint_text_round_trips() {
        let (ca, _) = make_ca(&[], &[]);
        let fp = ca.fingerprint();
        let text = fp.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(fp.short(), text[..8]);
        assert_eq!(fp, Fingerprint::of(&ca.encode()));
        assert!("xyz".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn formats_unix_time_as_rfc3339() {
        assert_eq!(format_unix_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_unix_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_unix_time(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(format_unix_time(4_107_542_400), "2100-03-01T00:00:00Z");
        let _ = format_unix_time(u64::MAX);
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(a, p)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), p).unwrap())),
            (any::<[u8; 16]>(), 0u8..=128)
                .prop_map(|(a, p)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), p).unwrap())),
        ]
    }

    fn arb_body() -> impl Strategy<Value = CertBody> {
        let name = "[A-Za-z0-9._-]{1,64}";
        (
            prop_oneof![
                Just(CertKind::Ca),
                Just(CertKind::Node),
                Just(CertKind::Issuer)
            ],
            name,
            proptest::collection::vec(arb_net(), 0..=4),
            proptest::collection::btree_set("[a-z0-9._-]{1,20}", 0..=6),
            (
                proptest::collection::vec(arb_net(), 0..=6),
                proptest::collection::btree_set(
                    "[a-z0-9_]{1,10}(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,2}",
                    0..=3,
                ),
            ),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(
                |(kind, name, ips, groups, (subnets, zones), a, b, public_key, issuer)| CertBody {
                    kind,
                    name,
                    ips,
                    groups: groups.into_iter().collect(),
                    subnets,
                    dns_zones: zones.into_iter().collect(),
                    not_before: a.min(b),
                    not_after: a.max(b),
                    public_key,
                    issuer: Fingerprint(issuer),
                    // Issuers carry their constraints (any subnets and
                    // zones: delegation); the others none.
                    name_prefix: if kind == CertKind::Issuer {
                        "ci-".into()
                    } else {
                        String::new()
                    },
                    max_lifetime: if kind == CertKind::Issuer { a } else { 0 },
                    chain: None,
                },
            )
    }

    fn issuer_body(key: &CaSecretKey) -> CertBody {
        CertBody {
            kind: CertKind::Issuer,
            name: "lh-issuer".into(),
            ips: vec![net("100.64.100.0/24")],
            groups: vec!["ci".into(), "deploy".into()],
            subnets: vec![],
            dns_zones: vec![],
            not_before: NOW - DAY,
            not_after: NOW + 30 * DAY,
            public_key: key.public_bytes(),
            issuer: Fingerprint::ZERO,
            name_prefix: "ci-".into(),
            max_lifetime: 3600,
            chain: None,
        }
    }

    fn ci_body(ip: &str, groups: &[&str]) -> CertBody {
        let mut body = node_body(ip, groups);
        body.name = "ci-job-7".into();
        body.subnets = vec![];
        body.not_before = NOW;
        body.not_after = NOW + 1800;
        body
    }

    /// A root limited to 100.64.0.0/10 and groups ci, deploy, db; an issuer
    /// under it for 100.64.100.0/24, groups ci and deploy, names ci-*, 1 h.
    fn issuer_setup() -> (Cert, Cert, CaSecretKey) {
        let (ca, ca_key) = make_ca(&["100.64.0.0/10"], &["ci", "deploy", "db"]);
        let key = CaSecretKey::generate();
        let issuer = sign_issuer(&ca, &ca_key, issuer_body(&key), NOW).unwrap();
        (ca, issuer, key)
    }

    #[test]
    fn a_node_issued_under_an_issuer_verifies_through_the_chain() {
        let (ca, issuer, key) = issuer_setup();
        assert_eq!(issuer.body.issuer, ca.fingerprint());
        let cert =
            sign_under_issuer(&issuer, &key, ci_body("100.64.100.7/10", &["ci"]), NOW).unwrap();
        let bytes = cert.encode();
        assert_eq!(bytes[4], VERSION_ISSUED);
        assert!(bytes.len() <= MAX_CERT_LEN, "{} bytes", bytes.len());
        // Canonical both ways, armored too.
        assert_eq!(Cert::decode(&bytes).unwrap(), cert);
        assert_eq!(Cert::decode(&issuer.encode()).unwrap(), issuer);
        assert_eq!(Cert::from_pem(&cert.to_pem()).unwrap(), cert);
        // Peers trust the root only, and that is enough.
        let v = pool(&[&ca]).verify_bytes(&bytes, NOW + 60).unwrap();
        assert_eq!(v.name(), "ci-job-7");
        assert_eq!(v.issued_by(), Some("lh-issuer"));
        assert_eq!(v.overlay_ip(), Ipv4Addr::new(100, 64, 100, 7));
        // Another root does not vouch for it.
        let (other, _) = make_ca(&[], &[]);
        assert!(matches!(
            pool(&[&other]).verify_bytes(&bytes, NOW),
            Err(CertError::UnknownIssuer { .. })
        ));
    }

    #[test]
    fn revoked_certificates_and_everything_a_revoked_issuer_signed_are_refused() {
        let (ca, issuer, key) = issuer_setup();
        let a = sign_under_issuer(&issuer, &key, ci_body("100.64.100.7/10", &["ci"]), NOW).unwrap();
        let b = sign_under_issuer(&issuer, &key, ci_body("100.64.100.8/10", &["ci"]), NOW).unwrap();
        let mut pool = pool(&[&ca]);
        let verified_a = pool.verify(&a, NOW).unwrap();
        assert!(pool.revoke(a.fingerprint(), a.body.not_after));
        assert!(
            !pool.revoke(a.fingerprint(), a.body.not_after),
            "not new the second time"
        );
        assert!(pool.revokes(&verified_a));
        assert_eq!(
            pool.verify_bytes(&a.encode(), NOW).unwrap_err(),
            CertError::Revoked {
                fingerprint: a.fingerprint()
            }
        );
        // Its sibling is fine until the issuer itself is revoked.
        let verified_b = pool.verify(&b, NOW).unwrap();
        assert!(!pool.revokes(&verified_b));
        pool.revoke(issuer.fingerprint(), issuer.body.not_after);
        assert!(pool.revokes(&verified_b));
        assert!(
            matches!(pool.verify(&b, NOW), Err(CertError::Revoked { fingerprint }) if fingerprint == issuer.fingerprint())
        );
        // Entries leave once the certificate would have expired anyway.
        pool.prune_revoked(a.body.not_after + 1);
        assert_eq!(pool.revoked_count(), 1, "the issuer lives longer");
        pool.prune_revoked(issuer.body.not_after + 1);
        assert_eq!(pool.revoked_count(), 0);
    }

    #[test]
    fn an_issuer_cannot_sign_beyond_its_constraints_and_forgeries_fail_everywhere() {
        let (ca, issuer, key) = issuer_setup();
        type Change = Box<dyn Fn(&mut CertBody)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "outside its pool",
                Box::new(|b| b.ips = vec![net("100.64.0.5/10")]),
            ),
            (
                "not among its groups",
                Box::new(|b| b.groups = vec!["db".into()]),
            ),
            (
                "does not start with",
                Box::new(|b| b.name = "prod-db".into()),
            ),
            (
                "delegates no subnets",
                Box::new(|b| b.subnets = vec![net("198.19.0.0/24")]),
            ),
            (
                "longer than its maximum",
                Box::new(|b| b.not_after = NOW + 7200),
            ),
        ];
        for (why, change) in &cases {
            let mut body = ci_body("100.64.100.7/10", &["ci"]);
            change(&mut body);
            let err = sign_under_issuer(&issuer, &key, body.clone(), NOW).unwrap_err();
            assert!(err.to_string().contains(why), "signing, {why}: {err}");
            // The dry run refuses alike.
            assert_eq!(check_node_under_issuer(&issuer, &body, NOW), Err(err));
            // Signed anyway by a hostile issuer key holder: refused by peers.
            body.issuer = issuer.fingerprint();
            body.chain = Some(Box::new(issuer.clone()));
            let forged = Cert {
                signature: key.sign(&encode_body(&body)),
                body,
            };
            let err = pool(&[&ca])
                .verify_bytes(&forged.encode(), NOW)
                .unwrap_err();
            assert!(err.to_string().contains(why), "verifying, {why}: {err}");
        }
        // The issuer itself must sit inside the root's constraints.
        let mut wide = issuer_body(&CaSecretKey::generate());
        wide.ips = vec![net("10.0.0.0/8")];
        assert!(matches!(
            sign_issuer(&ca, &make_ca(&[], &[]).1, wide.clone(), NOW),
            Err(CertError::KeyMismatch)
        ));
        let (ca2, ca2_key) = make_ca(&["100.64.0.0/10"], &["ci"]);
        assert!(matches!(
            sign_issuer(&ca2, &ca2_key, wide, NOW),
            Err(CertError::IpOutsideCa { .. })
        ));
        let mut greedy = issuer_body(&CaSecretKey::generate());
        greedy.groups = vec!["ci".into(), "deploy".into()];
        assert!(matches!(
            sign_issuer(&ca2, &ca2_key, greedy, NOW),
            Err(CertError::GroupOutsideCa { .. })
        ));
    }

    #[test]
    fn a_swapped_or_expired_issuer_breaks_the_chain() {
        let (ca, issuer, key) = issuer_setup();
        let cert =
            sign_under_issuer(&issuer, &key, ci_body("100.64.100.7/10", &["ci"]), NOW).unwrap();
        // Another issuer under the same root, with a wider pool, swapped in:
        // the signed bytes change, so the signature fails.
        let key2 = CaSecretKey::generate();
        let mut wide = issuer_body(&key2);
        wide.ips = vec![net("100.64.0.0/10")];
        let mut swapped = cert.clone();
        swapped.body.chain = Some(Box::new(Cert {
            body: {
                let mut b = wide;
                b.issuer = ca.fingerprint();
                b
            },
            signature: [7; 64],
        }));
        assert!(pool(&[&ca]).verify_bytes(&swapped.encode(), NOW).is_err());
        // The issuer's expiry ends what it signed.
        let late = NOW + 31 * DAY;
        let err = pool(&[&ca]).verify_bytes(&cert.encode(), late).unwrap_err();
        assert!(
            matches!(err, CertError::Expired { .. } | CertError::CaExpired { .. }),
            "{err}"
        );
        // A CA or an issuer is not a node identity.
        assert!(matches!(
            pool(&[&ca]).verify(&issuer, NOW),
            Err(CertError::NotANodeCert)
        ));
        // An issuer cannot sign another issuer, nor a CA a node with a chain.
        let mut nested = ci_body("100.64.100.8/10", &[]);
        nested.kind = CertKind::Issuer;
        assert!(matches!(
            sign_under_issuer(&issuer, &key, nested, NOW),
            Err(CertError::NotANodeCert)
        ));
    }

    #[test]
    fn version_and_kind_must_agree() {
        let (_, issuer, key) = issuer_setup();
        let cert = sign_under_issuer(&issuer, &key, ci_body("100.64.100.7/10", &[]), NOW).unwrap();
        let mut v1 = cert.encode();
        v1[4] = VERSION; // a chain under version 1
        assert!(Cert::decode(&v1).is_err());
        let mut bad_issuer = issuer.encode();
        bad_issuer[4] = VERSION;
        assert!(Cert::decode(&bad_issuer).is_err());
        // Version 4 is an issuer's that delegates, or a node's with zones
        // under one: neither of these.
        let mut v4 = cert.encode();
        v4[4] = VERSION_DELEGATED;
        assert!(Cert::decode(&v4).is_err());
        let mut v4 = issuer.encode();
        v4[4] = VERSION_DELEGATED;
        assert!(Cert::decode(&v4).is_err());
        let mut v5 = cert.encode();
        v5[4] = 5;
        assert!(matches!(
            Cert::decode(&v5),
            Err(CertError::UnsupportedVersion { version: 5 })
        ));
    }

    /// An issuer for gateways: the setup's, delegating 198.19.0.0/16 and
    /// the zone `internal`, names `gw-*`, 1 day.
    fn delegating_issuer(subnets: &[&str], zones: &[&str]) -> (Cert, Cert, CaSecretKey) {
        let (ca, ca_key) = make_ca(&["100.64.0.0/10"], &["ci", "deploy", "db"]);
        let key = CaSecretKey::generate();
        let mut body = issuer_body(&key);
        body.subnets = subnets.iter().map(|s| net(s)).collect();
        body.dns_zones = zones.iter().map(|z| z.to_string()).collect();
        body.name_prefix = "gw-".into();
        body.max_lifetime = DAY;
        let issuer = sign_issuer(&ca, &ca_key, body, NOW).unwrap();
        (ca, issuer, key)
    }

    fn gateway_body(subnets: &[&str], zones: &[&str]) -> CertBody {
        let mut body = ci_body("100.64.100.9/10", &["db"]);
        body.name = "gw-1".into();
        body.groups = vec!["ci".into()];
        body.subnets = subnets.iter().map(|s| net(s)).collect();
        body.dns_zones = zones.iter().map(|z| z.to_string()).collect();
        body
    }

    #[test]
    fn an_issuer_delegates_subnets_and_zones_to_the_gateways_it_signs() {
        let (ca, issuer, key) = delegating_issuer(&["198.19.0.0/16"], &["internal"]);
        let issuer_bytes = issuer.encode();
        assert_eq!(issuer_bytes[4], VERSION_DELEGATED);
        assert_eq!(Cert::decode(&issuer_bytes).unwrap(), issuer);
        // A gateway routing part of it and answering for a zone under it.
        let gw = sign_under_issuer(
            &issuer,
            &key,
            gateway_body(&["198.19.1.0/24", "198.19.9.0/24"], &["db.internal"]),
            NOW,
        )
        .unwrap();
        let bytes = gw.encode();
        assert_eq!(bytes[4], VERSION_DELEGATED, "zones under an issuer");
        assert!(bytes.len() <= MAX_CERT_LEN);
        assert_eq!(Cert::decode(&bytes).unwrap(), gw);
        let v = pool(&[&ca]).verify_bytes(&bytes, NOW).unwrap();
        assert_eq!(v.subnets(), [net("198.19.1.0/24"), net("198.19.9.0/24")]);
        assert_eq!(v.dns_zones(), ["db.internal".to_string()]);
        // Subnets without zones: version 2, the issuer inside still 4.
        let plain =
            sign_under_issuer(&issuer, &key, gateway_body(&["198.19.1.0/24"], &[]), NOW).unwrap();
        assert_eq!(plain.encode()[4], VERSION_ISSUED);
        pool(&[&ca]).verify(&plain, NOW).unwrap();
        // A CI job's certificate under it still routes nothing unless asked.
        let job = sign_under_issuer(&issuer, &key, gateway_body(&[], &[]), NOW).unwrap();
        assert_eq!(job.encode()[4], VERSION_ISSUED);
        // Beyond the delegation: refused when signing, and when a hostile
        // key holder signs anyway.
        for (subnets, zones, why) in [
            (
                &["198.18.0.0/24"][..],
                &[][..],
                "outside the subnets it delegates",
            ),
            (
                &["198.0.0.0/8"][..],
                &[][..],
                "outside the subnets it delegates",
            ),
            (
                &[][..],
                &["example.org"][..],
                "not under the zones it delegates",
            ),
        ] {
            let body = gateway_body(subnets, zones);
            let err = sign_under_issuer(&issuer, &key, body.clone(), NOW).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
            let mut body = body;
            body.issuer = issuer.fingerprint();
            body.chain = Some(Box::new(issuer.clone()));
            let forged = Cert {
                signature: key.sign(&encode_body(&body)),
                body,
            };
            let err = pool(&[&ca]).verify(&forged, NOW).unwrap_err();
            assert!(err.to_string().contains(why), "verifying: {err}");
        }
        // An issuer delegating subnets alone lists no zone, and is 4 too.
        let (ca, issuer, key) = delegating_issuer(&["198.19.0.0/16"], &[]);
        assert_eq!(issuer.encode()[4], VERSION_DELEGATED);
        assert_eq!(Cert::decode(&issuer.encode()).unwrap(), issuer);
        let err =
            sign_under_issuer(&issuer, &key, gateway_body(&[], &["internal"]), NOW).unwrap_err();
        assert!(err.to_string().contains("delegates no zones"), "{err}");
        let gw =
            sign_under_issuer(&issuer, &key, gateway_body(&["198.19.0.0/16"], &[]), NOW).unwrap();
        pool(&[&ca]).verify(&gw, NOW).unwrap();
        // The issuer's zones sit under the root's, its subnets have no host bits.
        let (ca, ca_key) = make_ca(&[], &[]);
        let mut body = issuer_body(&CaSecretKey::generate());
        body.subnets = vec![IpNet::V4(
            Ipv4Net::new(Ipv4Addr::new(198, 19, 0, 1), 16).unwrap(),
        )];
        let err = sign_issuer(&ca, &ca_key, body, NOW).unwrap_err();
        assert!(err.to_string().contains("host bits"), "{err}");
        let (zoned, zoned_key) = {
            let key = CaSecretKey::generate();
            let mut body = ca_body(&key, &[], &[]);
            body.dns_zones = vec!["internal".into()];
            (self_sign_ca(body, &key).unwrap(), key)
        };
        let mut body = issuer_body(&CaSecretKey::generate());
        body.dns_zones = vec!["example.org".into()];
        assert!(matches!(
            sign_issuer(&zoned, &zoned_key, body, NOW),
            Err(CertError::ZoneOutsideCa { .. })
        ));
    }

    #[test]
    fn a_delegating_issuer_is_never_read_as_an_older_version() {
        let (_, issuer, key) = delegating_issuer(&["198.19.0.0/16"], &[]);
        let gw =
            sign_under_issuer(&issuer, &key, gateway_body(&["198.19.1.0/24"], &[]), NOW).unwrap();
        // Relabelled version 2, the delegating issuer does not decode; an
        // older verifier sees version 4 and says to upgrade.
        let mut as_v2 = issuer.encode();
        as_v2[4] = VERSION_ISSUED;
        assert!(Cert::decode(&as_v2).is_err());
        let bytes = gw.encode();
        let at = bytes
            .windows(4)
            .rposition(|w| w == MAGIC)
            .expect("the embedded issuer");
        assert_eq!(bytes[at + 4], VERSION_DELEGATED);
        // An issuer without delegation written as 4 (an empty zones field
        // after its empty subnets) is not canonical either.
        let (_, plain, _) = issuer_setup();
        let mut body = encode_body(&plain.body);
        body[4] = VERSION_DELEGATED;
        let after_subnets = body.len() - (8 + 8 + 32 + 32 + 2 + plain.body.name_prefix.len() + 8);
        body.splice(after_subnets..after_subnets, [0, 0]);
        let err = Cert::decode(&[body, plain.signature.to_vec()].concat()).unwrap_err();
        assert!(err.to_string().contains("not 2"), "{err}");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = Cert::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_near_valid(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..4),
            cut in 0usize..200,
        ) {
            let key = CaSecretKey::from_bytes([9; 32]);
            let ca = self_sign_ca(ca_body(&key, &["100.64.0.0/10"], &["a", "b"]), &key).unwrap();
            let mut bytes = ca.encode();
            for (at, val) in flips {
                let at = at % bytes.len();
                bytes[at] = val;
            }
            bytes.truncate(bytes.len().saturating_sub(cut % 8));
            let _ = Cert::decode(&bytes);
            let _ = CaPool::new(vec![ca]).unwrap().verify_bytes(&bytes, NOW);
        }

        #[test]
        fn from_pem_never_panics(s in "\\PC*") {
            let _ = Cert::from_pem(&s);
            let _ = Cert::all_from_pem(&s);
            let _ = armor::decode_all(&s);
        }

        #[test]
        fn armored_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 1..1100)) {
            let _ = Cert::from_pem(&armor::encode(CERT_LABEL, &bytes));
        }

        #[test]
        fn arbitrary_bodies_round_trip(body in arb_body(), signature in any::<[u8; 32]>()) {
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&signature);
            sig[32..].copy_from_slice(&signature);
            let cert = Cert { body, signature: sig };
            let bytes = cert.encode();
            prop_assert!(bytes.len() <= MAX_CERT_LEN);
            prop_assert_eq!(&Cert::decode(&bytes).unwrap(), &cert);
            prop_assert_eq!(&Cert::from_pem(&cert.to_pem()).unwrap(), &cert);
        }

        #[test]
        fn mutated_issued_certs_never_panic_and_never_verify_altered(
            flips in proptest::collection::vec((0usize..1024, any::<u8>()), 1..4),
            cut in 0usize..1024,
        ) {
            let (ca, issuer, key) = issuer_setup();
            let cert = sign_under_issuer(&issuer, &key, ci_body("100.64.100.7/10", &["ci"]), NOW).unwrap();
            let good = cert.encode();
            let mut bytes = good.clone();
            for (at, v) in flips {
                let at = at % bytes.len();
                bytes[at] ^= v;
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            let verified = pool(&[&ca]).verify_bytes(&bytes, NOW);
            if bytes != good {
                prop_assert!(verified.is_err());
            }
        }

        #[test]
        fn signed_node_certs_verify(
            host in 1u32..(1 << 22) - 1,
            groups in proptest::collection::vec("[a-z]{1,8}", 0..5),
            lifetime in 0u64..(300 * DAY),
        ) {
            let key = CaSecretKey::from_bytes([3; 32]);
            let ca = self_sign_ca(ca_body(&key, &["100.64.0.0/10"], &[]), &key).unwrap();
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + host);
            let mut body = node_body(&format!("{ip}/10"), &[]);
            body.groups = groups;
            body.not_before = NOW;
            body.not_after = NOW + lifetime;
            let cert = sign_node(&ca, &key, body, NOW).unwrap();
            let v = CaPool::new(vec![ca]).unwrap().verify_bytes(&cert.encode(), NOW).unwrap();
            prop_assert_eq!(v.overlay_ip(), ip);
            prop_assert!(v.groups().windows(2).all(|w| w[0] < w[1]));
        }
    }
}
