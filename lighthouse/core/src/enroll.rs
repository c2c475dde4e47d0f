//! Enrollment decisions: tokens and OIDC ID tokens traded for short-lived
//! node certificates, signed with the issuer key (never the root's).
//!
//! [`Enroller::enroll`] decides; the state that must survive restarts (token
//! hashes and their uses, leased addresses, issued certificates) lives
//! behind [`EnrollStore`], which the lighthouse implements with SQLite
//! (`tern_lighthouse::store`), so a database shared by several lighthouses
//! can implement it too.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use tern_shared::cert::{self, Cert, CertBody, CertKind, Fingerprint};
use tern_shared::config::OidcProviderConfig;
use tern_shared::control::Revocation;
use tern_shared::enroll::{token_hash, EnrollReply, EnrollRequest, REFUSED_STORE_UNAVAILABLE};
use tern_shared::keys::CaSecretKey;

pub use crate::issuance::Issuance;
use crate::oidc::{self, Jwks};

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub groups: Vec<String>,
    /// Lifetime of the certificate, in seconds.
    pub cert_ttl: u64,
}

/// Why a token was refused (said to the node).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the token is unknown to this lighthouse")]
    Unknown,
    #[error("the token has expired")]
    Expired,
    #[error("the token has been used up")]
    UsedUp,
}

/// One token to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub hash: String,
    pub groups: Vec<String>,
    pub uses: u32,
    pub expires: u64,
    pub cert_ttl: u64,
}

/// How many hex digits of a token's hash make its id: enough to tell a
/// lighthouse's tokens apart, far too few to help anyone find the token.
pub const TOKEN_ID_LEN: usize = 12;

/// The fewest hex digits `tern-lighthouse token revoke` takes: fewer would
/// too easily name a token other than the one meant.
pub const TOKEN_ID_MIN: usize = 8;

/// A token's id: the first [`TOKEN_ID_LEN`] hex digits of its hash.
pub fn token_id(hash: &str) -> &str {
    hash.get(..TOKEN_ID_LEN).unwrap_or(hash)
}

/// A stored token as `tern-lighthouse token list` shows it: its id, never
/// more of its hash, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The first [`TOKEN_ID_LEN`] hex digits of the token's hash.
    pub id: String,
    pub groups: Vec<String>,
    pub uses_left: u32,
    /// Unix seconds.
    pub expires: u64,
    /// Unix seconds.
    pub created: u64,
    /// Lifetime of each certificate it buys, in seconds.
    pub cert_ttl: u64,
    /// Whether it had expired at the `now` it was listed at.
    pub expired: bool,
}

/// The start of a token's id, as given to `tern-lighthouse token revoke`:
/// [`TOKEN_ID_MIN`] to 64 hex digits, kept lowercase (as hashes are stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdPrefix(String);

/// Why a token id given on the command line was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenIdError {
    #[error("token id {0:?} is not hex digits; `tern-lighthouse token list` shows the ids")]
    NotHex(String),
    #[error("token id {0:?} is too short: give at least {TOKEN_ID_MIN} of its {TOKEN_ID_LEN} hex digits (`tern-lighthouse token list` shows them)")]
    TooShort(String),
}

impl TokenIdPrefix {
    pub fn parse(text: &str) -> Result<TokenIdPrefix, TokenIdError> {
        let text = text.trim();
        if text.is_empty() || text.len() > 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenIdError::NotHex(text.to_string()));
        }
        if text.len() < TOKEN_ID_MIN {
            return Err(TokenIdError::TooShort(text.to_string()));
        }
        Ok(TokenIdPrefix(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why [`EnrollStore::revoke_token`] revoked nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRevokeRefusal {
    #[error("no token has an id starting with {0:?}; `tern-lighthouse token list` shows the ids")]
    Unknown(String),
    #[error("{count} tokens have ids starting with {id:?}; give more of the id (`tern-lighthouse token list` shows the ids)")]
    Ambiguous { id: String, count: usize },
}

/// Checks a token about to be made against the issuer that will sign what
/// it buys, so a token the issuer would refuse is refused now, not at
/// enrollment: `issuer` must be an issuer that has not expired at `now`
/// and may sign every one of `groups`, for `cert_ttl` seconds.
pub fn check_token_against_issuer(
    issuer: &Cert,
    groups: &[String],
    cert_ttl: u64,
    now: u64,
) -> Result<(), String> {
    let b = &issuer.body;
    if b.kind != CertKind::Issuer {
        return Err(format!(
            "the certificate {:?} is not an issuer certificate; make one with tern cert sign --issuer",
            b.name
        ));
    }
    if b.not_after <= now {
        return Err(format!(
            "the issuer {:?} expired at {}: it can sign nothing; make a new one (tern cert sign --issuer) and restart the lighthouse",
            b.name,
            cert::format_unix_time(b.not_after)
        ));
    }
    if let Some(g) = groups.iter().find(|g| !b.groups.contains(g)) {
        let signs = if b.groups.is_empty() {
            "no groups".to_string()
        } else {
            format!("only {}", b.groups.join(", "))
        };
        return Err(format!(
            "the issuer {:?} may not sign group {g:?} (it signs {signs}); drop it from --groups, or make an issuer with it (tern cert sign --issuer --groups ...)",
            b.name
        ));
    }
    if cert_ttl > b.max_lifetime {
        let d = |s| tern_shared::duration::format_duration(std::time::Duration::from_secs(s));
        return Err(format!(
            "--cert-ttl {} is longer than the issuer {:?} may sign (at most {}); give --cert-ttl {} or less",
            d(cert_ttl),
            b.name,
            d(b.max_lifetime),
            d(b.max_lifetime)
        ));
    }
    Ok(())
}

/// The lighthouse's lasting enrollment state.
pub trait EnrollStore {
    /// What goes wrong in the store itself (its database, its disk).
    type Error: std::error::Error;

    fn create_token(&mut self, token: &NewToken, now: u64) -> Result<(), Self::Error>;
    /// What [`EnrollStore::use_token`] would answer at `now`, without using
    /// the token (enrollment checks everything else before it spends a use).
    fn peek_token(
        &mut self,
        hash: &str,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, Self::Error>;
    /// Uses the token once, atomically: of two simultaneous uses of a
    /// single-use token, exactly one succeeds.
    fn use_token(
        &mut self,
        hash: &str,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, Self::Error>;
    /// Leases a free address from `pool` until `until` (an address is free
    /// once the certificate it was leased for expired).
    fn lease(
        &mut self,
        pool: &[Ipv4Net],
        name: &str,
        until: u64,
        now: u64,
    ) -> Result<Option<Ipv4Addr>, Self::Error>;
    /// Gives back an address leased for `name` whose certificate was never
    /// handed out (the token was used up meanwhile). Only a lease still held
    /// by `name` goes; nothing else changes (where the next lease starts
    /// looking may stay past the address).
    fn release_lease(&mut self, ip: Ipv4Addr, name: &str) -> Result<(), Self::Error>;
    fn record_issued(&mut self, cert: &Cert, how: &Issuance, now: u64) -> Result<(), Self::Error>;
    /// A renewal (`[pki] renew`): the lease of `ip` for `name` extended to
    /// `until` (taken, when no lease holds it or the one that does has
    /// run out) and `cert` recorded, as one atomic step. False, changing
    /// nothing, when another name holds `ip`.
    fn renew_for(
        &mut self,
        ip: Ipv4Addr,
        name: &str,
        until: u64,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<bool, Self::Error>;
    /// [`EnrollStore::use_token`] and, when the use succeeded,
    /// [`EnrollStore::record_issued`] of `cert`, as one atomic step: a
    /// store that fails between the two (its database gone) keeps neither,
    /// so a token's use is never spent on a certificate nobody got.
    fn use_token_for(
        &mut self,
        hash: &str,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, Self::Error>;
    /// [`EnrollStore::use_oidc_token`] and, when it was fresh,
    /// [`EnrollStore::record_issued`] of `cert`, as one atomic step.
    fn use_oidc_token_for(
        &mut self,
        id: &str,
        until: u64,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<bool, Self::Error>;
    /// Whether an OIDC token (its id as for [`EnrollStore::use_oidc_token`])
    /// is marked used at `now`, without marking it.
    fn oidc_token_used(&mut self, id: &str, now: u64) -> Result<bool, Self::Error>;
    /// Marks an OIDC token (by its `jti`, or its hash) used until `until`,
    /// atomically; false when it was used before.
    fn use_oidc_token(&mut self, id: &str, until: u64, now: u64) -> Result<bool, Self::Error>;
    /// Certificates issued under `name` that have not expired by `now`:
    /// fingerprint and expiry.
    fn issued_named(
        &mut self,
        name: &str,
        now: u64,
    ) -> Result<Vec<(Fingerprint, u64)>, Self::Error>;
    /// The name and expiry of an issued certificate, if this lighthouse
    /// issued it.
    fn issued(&mut self, fingerprint: &Fingerprint) -> Result<Option<(String, u64)>, Self::Error>;
    /// Revokes a certificate until `not_after`; false when it was already.
    fn revoke(
        &mut self,
        fingerprint: &Fingerprint,
        name: &str,
        not_after: u64,
        now: u64,
    ) -> Result<bool, Self::Error>;
    /// The revocations still in force at `now`, each with its version (a
    /// number that grows with every revocation).
    fn revocations(&mut self, now: u64) -> Result<Vec<(u32, Revocation)>, Self::Error>;
    /// Every stored token, expired and used up ones too (`now` tells which
    /// have expired), oldest first. Only the id leaves the store: never
    /// more of the hash.
    fn list_tokens(&mut self, now: u64) -> Result<Vec<TokenInfo>, Self::Error>;
    /// Deletes the one token whose hash starts with `id`, atomically, and
    /// gives its id ([`TOKEN_ID_LEN`] digits); nothing when no token or more
    /// than one matches. A deleted token is refused as unknown.
    fn revoke_token(
        &mut self,
        id: &TokenIdPrefix,
    ) -> Result<Result<String, TokenRevokeRefusal>, Self::Error>;
}

/// A pool's host addresses, numbered in order across its nets without
/// walking them: (first host, how many) per net.
pub struct HostRanges(Vec<(u32, u64)>);

impl HostRanges {
    pub fn of(pool: &[Ipv4Net]) -> HostRanges {
        HostRanges(
            pool.iter()
                .map(|net| {
                    let base = u32::from(net.network());
                    match net.prefix_len() {
                        32 => (base, 1),
                        31 => (base, 2),
                        len => (base.saturating_add(1), (1u64 << (32 - len)) - 2),
                    }
                })
                .collect(),
        )
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    pub fn index_of(&self, ip: Ipv4Addr) -> Option<u64> {
        let ip = u64::from(u32::from(ip));
        let mut offset = 0;
        for &(first, count) in &self.0 {
            let first = u64::from(first);
            if ip >= first && ip < first + count {
                return Some(offset + ip - first);
            }
            offset += count;
        }
        None
    }

    pub fn at(&self, mut index: u64) -> Option<Ipv4Addr> {
        for &(first, count) in &self.0 {
            if index < count {
                return u32::try_from(u64::from(first) + index)
                    .ok()
                    .map(Ipv4Addr::from);
            }
            index -= count;
        }
        None
    }
}

/// Why an issuer certificate and key cannot enroll anyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerError {
    #[error(
        "{section} issuer_cert is not an issuer certificate; make one with tern cert sign --issuer"
    )]
    NotAnIssuer { section: &'static str },
    #[error("{section} issuer_key does not belong to issuer_cert")]
    KeyMismatch { section: &'static str },
    #[error("[enroll] pool {net} is not inside the issuer's address pool ({pool}); pick addresses from it, or sign an issuer with a wider --ips")]
    PoolOutsideIssuer { net: Ipv4Net, pool: String },
}

/// An issuer certificate with its key, for the config `section` it came from.
fn check_issuer(
    issuer: &Cert,
    key: &CaSecretKey,
    section: &'static str,
) -> Result<(), IssuerError> {
    if issuer.body.kind != CertKind::Issuer {
        return Err(IssuerError::NotAnIssuer { section });
    }
    if issuer.body.public_key != key.public_bytes() {
        return Err(IssuerError::KeyMismatch { section });
    }
    Ok(())
}

/// Signs what enrollment grants.
pub struct Enroller {
    pub(crate) issuer: Cert,
    pub(crate) key: CaSecretKey,
    /// The mesh prefix nodes' addresses carry (the root CA's overlay net).
    prefix_len: u8,
    /// The addresses enrollment leases (`[enroll] pool`): the issuer's IPv4
    /// pool unless narrowed by [`Enroller::with_lease_pool`].
    lease_pool: Vec<Ipv4Net>,
    /// `[[enroll.oidc]]`, each with the signing keys last read or fetched.
    oidc: Vec<OidcProvider>,
    /// `[[enroll.renew]]`: issuers whose certificates are renewed, never
    /// enrolled with (their certificate and key).
    pub(crate) renewing: Vec<(Cert, CaSecretKey)>,
}

/// One OIDC provider and what is known of its keys.
struct OidcProvider {
    config: OidcProviderConfig,
    jwks: Option<Jwks>,
    /// When the keys were last read or fetched (unix seconds), and why that
    /// failed if it did.
    keys_at: Option<u64>,
    keys_error: Option<String>,
}

/// How soon a token that names an unknown key may make the lighthouse
/// fetch the provider's keys again (providers rotate keys rarely; a flood of
/// made-up key ids must not become a flood of fetches).
pub const JWKS_REFETCH_AFTER: u64 = 30;

/// What [`Enroller::decide`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The answer for the node.
    Reply(EnrollReply),
    /// The token names a key of this provider the lighthouse does not hold:
    /// read or fetch its keys ([`Enroller::set_keys`]), then decide again.
    NeedKeys(usize),
}

impl Enroller {
    /// `prefix_len`: the mesh's prefix (this lighthouse's own overlay
    /// prefix), which every node's address carries.
    pub fn new(issuer: Cert, key: CaSecretKey, prefix_len: u8) -> Result<Enroller, IssuerError> {
        check_issuer(&issuer, &key, "[enroll]")?;
        let lease_pool = issuer
            .body
            .ips
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(*n),
                IpNet::V6(_) => None,
            })
            .collect();
        Ok(Enroller {
            issuer,
            key,
            prefix_len,
            lease_pool,
            oidc: Vec::new(),
            renewing: Vec::new(),
        })
    }

    /// Also renews certificates this issuer signed (`[[enroll.renew]]`),
    /// and never enrolls with it.
    pub fn with_renewing(
        mut self,
        issuer: Cert,
        key: CaSecretKey,
    ) -> Result<Enroller, IssuerError> {
        check_issuer(&issuer, &key, "[[enroll.renew]]")?;
        self.renewing.push((issuer, key));
        Ok(self)
    }

    /// Leases only from `pool` (`[enroll] pool`; empty: the issuer's whole
    /// pool), which must lie inside the issuer's pool: the rest is left for
    /// certificates signed by hand under the issuer.
    pub fn with_lease_pool(mut self, pool: &[Ipv4Net]) -> Result<Enroller, IssuerError> {
        if pool.is_empty() {
            return Ok(self);
        }
        if let Some(net) = pool
            .iter()
            .find(|net| !self.lease_pool.iter().any(|p| p.contains(*net)))
        {
            return Err(IssuerError::PoolOutsideIssuer {
                net: *net,
                pool: tern_shared::show::list(&self.issuer.body.ips).to_string(),
            });
        }
        self.lease_pool = pool.to_vec();
        Ok(self)
    }

    /// The addresses enrollment leases.
    pub fn lease_pool(&self) -> &[Ipv4Net] {
        &self.lease_pool
    }

    /// Accepts OIDC ID tokens from these providers (their keys come later,
    /// through [`Enroller::set_keys`]).
    pub fn with_oidc(mut self, providers: Vec<OidcProviderConfig>) -> Enroller {
        self.oidc = providers
            .into_iter()
            .map(|config| OidcProvider {
                config,
                jwks: None,
                keys_at: None,
                keys_error: None,
            })
            .collect();
        self
    }

    /// Whether keys for this provider are held.
    pub fn has_keys(&self, provider: usize) -> bool {
        self.oidc.get(provider).is_some_and(|p| p.jwks.is_some())
    }

    pub fn oidc_providers(&self) -> impl Iterator<Item = &OidcProviderConfig> {
        self.oidc.iter().map(|p| &p.config)
    }

    /// The provider's keys as just read or fetched at `now`, or why they
    /// could not be (then the old keys, if any, are kept).
    pub fn set_keys(&mut self, provider: usize, keys: Result<Jwks, String>, now: u64) {
        let Some(p) = self.oidc.get_mut(provider) else {
            return;
        };
        p.keys_at = Some(now);
        match keys {
            Ok(jwks) => {
                p.jwks = Some(jwks);
                p.keys_error = None;
            }
            Err(e) => p.keys_error = Some(e),
        }
    }

    /// Answers one request, or asks for a provider's keys first.
    pub fn decide<S: EnrollStore + ?Sized>(
        &self,
        request: &EnrollRequest,
        store: &mut S,
        now: u64,
    ) -> Decision {
        if let Some(token) = &request.oidc {
            if let Some(provider) = self.keys_needed(token, now) {
                return Decision::NeedKeys(provider);
            }
        }
        Decision::Reply(self.enroll(request, store, now))
    }

    /// The provider whose keys should be (re)fetched before this token can
    /// be judged: none held yet, or the token names a key not among them,
    /// and the last fetch is old enough.
    fn keys_needed(&self, token: &str, now: u64) -> Option<usize> {
        let peeked = oidc::peek(token).ok()?;
        let iss = peeked.issuer?;
        let (i, p) = self
            .oidc
            .iter()
            .enumerate()
            .find(|(_, p)| p.config.issuer == iss)?;
        let known = match (&p.jwks, &peeked.kid) {
            (None, _) => false,
            (Some(jwks), Some(kid)) => jwks.has_kid(kid),
            (Some(_), None) => true,
        };
        let recent = p
            .keys_at
            .is_some_and(|at| now.saturating_sub(at) < JWKS_REFETCH_AFTER);
        (!known && !recent).then_some(i)
    }

    pub fn issuer(&self) -> &Cert {
        &self.issuer
    }

    /// Answers one request: a certificate, or why not. Never panics on
    /// what the node sent; refusals say what to do.
    pub fn enroll<S: EnrollStore + ?Sized>(
        &self,
        request: &EnrollRequest,
        store: &mut S,
        now: u64,
    ) -> EnrollReply {
        match self.try_enroll(request, store, now) {
            Ok(cert) => EnrollReply {
                cert: Some(cert.to_pem()),
                refused: None,
                code: None,
            },
            Err(refusal) => EnrollReply {
                cert: None,
                refused: Some(refusal.why),
                code: refusal
                    .store_unavailable
                    .then(|| REFUSED_STORE_UNAVAILABLE.to_string()),
            },
        }
    }

    /// Nothing is spent on a request that is then refused: everything that
    /// can refuse it is checked first (the request itself, the grant looked
    /// at but not taken, a dry run of the signature); then an address is
    /// leased and the certificate signed; only then is the token used (or
    /// the OIDC token marked used), atomically, and a request that loses that
    /// race gives its address back.
    fn try_enroll<S: EnrollStore + ?Sized>(
        &self,
        request: &EnrollRequest,
        store: &mut S,
        now: u64,
    ) -> Result<Cert, Refusal> {
        let issuer = &self.issuer.body;
        // a. What can be checked without the store.
        if request.public_key == [0; 32] {
            return Err("the public key is all zero".into());
        }
        let credential = match (&request.token, &request.oidc) {
            (Some(token), None) => Credential::Token(token),
            (None, Some(oidc)) => Credential::Oidc(oidc),
            (Some(_), Some(_)) => return Err("both a token and an OIDC token: send one".into()),
            (None, None) => {
                return Err(
                    "no token: enroll with tern up --enroll-token TOKEN or --enroll-oidc".into(),
                )
            }
        };
        let name = node_name(&issuer.name_prefix, request, now)?;
        let pool = self.lease_pool.clone();
        // The dry runs sign for the pool's first host; the lease picks the
        // real one, which differs only in the host part.
        let placeholder = HostRanges::of(&pool).at(0).ok_or(
            "the issuer certificate has no IPv4 address pool; make an issuer with one (tern cert sign --issuer)",
        )?;
        let any_grant = Grant {
            groups: Vec::new(),
            cert_ttl: issuer.max_lifetime,
        };
        self.dry_run(request, &name, placeholder, &any_grant, now)?;
        // b. The grant, looked at but not taken.
        let (grant, how, spend) = match credential {
            Credential::Token(token) => {
                let hash = token_hash(token);
                let grant = store
                    .peek_token(&hash, now)
                    .map_err(|e| store_down("check the token", e))?
                    .map_err(token_refused)?;
                let how = Issuance {
                    how: format!("token {}", token_id(&hash)),
                    token: Some(token_id(&hash).to_string()),
                    claims: Default::default(),
                };
                (grant, how, Spend::Token(hash))
            }
            Credential::Oidc(oidc) => self.oidc_grant(oidc, store, now)?,
        };
        // c. The grant against the issuer.
        if let Some(g) = grant.groups.iter().find(|g| !issuer.groups.contains(g)) {
            return Err(format!(
                "the {} grants group {g:?}, which the issuer {:?} may not sign",
                if how.token.is_some() {
                    "token"
                } else {
                    "matching enroll.oidc rule"
                },
                issuer.name
            )
            .into());
        }
        let body = self.dry_run(request, &name, placeholder, &grant, now)?;
        // d. The address.
        let ip = store
            .lease(&pool, &name, body.not_after, now)
            .map_err(|e| store_down("lease an address", e))?
            .ok_or("the issuer's address pool is exhausted; try again when certificates expire")?;
        // e. The certificate (refused only if the dry run missed something).
        let signed = Ipv4Net::new(ip, self.prefix_len)
            .map_err(|e| e.to_string())
            .and_then(|overlay| {
                let body = CertBody {
                    ips: vec![IpNet::V4(overlay)],
                    ..body
                };
                cert::sign_under_issuer(&self.issuer, &self.key, body, now)
                    .map_err(|e| format!("the issuer refused: {e}"))
            });
        let cert = match signed {
            Ok(cert) => cert,
            Err(why) => return Err(give_back(store, ip, &name, why.into())),
        };
        // f. The token, spent at last, and the certificate recorded, in
        // one step.
        if let Err(why) = spend.take(store, &cert, &how, now) {
            return Err(give_back(store, ip, &name, why));
        }
        Ok(cert)
    }

    /// Checks that the issuer would sign `name` at `ip` with this grant,
    /// without signing: the body to sign.
    fn dry_run(
        &self,
        request: &EnrollRequest,
        name: &str,
        ip: Ipv4Addr,
        grant: &Grant,
        now: u64,
    ) -> Result<CertBody, String> {
        let issuer = &self.issuer.body;
        let not_after = now
            .saturating_add(grant.cert_ttl.min(issuer.max_lifetime))
            .min(issuer.not_after);
        let overlay = Ipv4Net::new(ip, self.prefix_len).map_err(|e| e.to_string())?;
        let body = CertBody {
            kind: CertKind::Node,
            name: name.to_string(),
            ips: vec![IpNet::V4(overlay)],
            groups: grant.groups.clone(),
            subnets: vec![],
            dns_zones: vec![],
            not_before: now,
            not_after,
            public_key: request.public_key,
            issuer: Fingerprint::ZERO,
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: None,
        };
        cert::check_node_under_issuer(&self.issuer, &body, now)
            .map_err(|e| format!("the issuer refused: {e}"))?;
        Ok(body)
    }
}

/// What a request enrolls with.
enum Credential<'a> {
    Token(&'a str),
    Oidc(&'a str),
}

/// What an enrollment spends once its certificate is signed.
enum Spend {
    /// One use of the token with this hash.
    Token(String),
    /// An OIDC token's one enrollment: its id, kept until `until`.
    Oidc { id: String, until: u64 },
}

impl Spend {
    /// Spends it and records `cert` as issued, atomically; why not when it
    /// is gone meanwhile (a simultaneous request took the token's last use,
    /// or the ID token).
    fn take<S: EnrollStore + ?Sized>(
        &self,
        store: &mut S,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<(), Refusal> {
        match self {
            Spend::Token(hash) => store
                .use_token_for(hash, cert, how, now)
                .map_err(|e| store_down("use the token", e))?
                .map(drop)
                .map_err(|r| token_refused(r).into()),
            Spend::Oidc { id, until } => {
                let fresh = store
                    .use_oidc_token_for(id, *until, cert, how, now)
                    .map_err(|e| store_down("record the OIDC token", e))?;
                if fresh {
                    Ok(())
                } else {
                    Err(OIDC_USED.into())
                }
            }
        }
    }
}

/// Gives back the address of a request refused after its lease: `why`, the
/// refusal. A failure to give it back costs the address until the lease
/// would have ended, not the refusal's reason.
fn give_back<S: EnrollStore + ?Sized>(
    store: &mut S,
    ip: Ipv4Addr,
    name: &str,
    why: Refusal,
) -> Refusal {
    if let Err(e) = store.release_lease(ip, name) {
        tracing::warn!(%ip, name, error = %e, refusal = %why.why, "could not give back the address of a refused enrollment; it stays leased until its certificate would have expired");
    }
    why
}

/// Why a request was refused, and whether because the store could not be
/// reached (then nothing was spent, and the node may try again or another
/// lighthouse).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) why: String,
    pub(crate) store_unavailable: bool,
}

impl From<String> for Refusal {
    fn from(why: String) -> Refusal {
        Refusal {
            why,
            store_unavailable: false,
        }
    }
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Refusal {
        why.to_string().into()
    }
}

/// The store failed while the lighthouse tried to `what`. The detail (a
/// database's error) is logged here, not sent to the node.
pub(crate) fn store_down(what: &str, e: impl std::fmt::Display) -> Refusal {
    tracing::warn!(error = %e, "enrollment store unavailable: could not {what}");
    Refusal {
        why: format!(
            "store unavailable: the lighthouse could not {what} in its store; nothing was spent, try again shortly or through another lighthouse"
        ),
        store_unavailable: true,
    }
}

fn token_refused(r: TokenRefusal) -> String {
    format!("{r}; create a new one with tern-lighthouse token create")
}

const OIDC_USED: &str = "this OIDC token was used to enroll already; ask the CI provider for a new one (each tern up --enroll-oidc does)";

impl Enroller {
    /// The issuer certificate, to change in tests (a tampered or future
    /// issuer the signing code must still refuse).
    #[cfg(any(test, feature = "test-support"))]
    pub fn issuer_mut(&mut self) -> &mut Cert {
        &mut self.issuer
    }
}

impl Enroller {
    /// Verifies an OIDC ID token against its provider's keys and rules: the
    /// grant of the first matching rule, what to log about it (the
    /// provider, the rule and the claims that matched), and the token's one
    /// enrollment to spend. Refuses a token already used, but does not mark
    /// it used.
    fn oidc_grant<S: EnrollStore + ?Sized>(
        &self,
        token: &str,
        store: &mut S,
        now: u64,
    ) -> Result<(Grant, Issuance, Spend), Refusal> {
        let token = token.trim();
        let peeked = oidc::peek(token).map_err(|e| e.to_string())?;
        let iss = peeked.issuer.ok_or("the OIDC token has no issuer (iss)")?;
        let Some(provider) = self.oidc.iter().find(|p| p.config.issuer == iss) else {
            let accepted: Vec<&str> = self.oidc.iter().map(|p| p.config.issuer.as_str()).collect();
            return Err(if accepted.is_empty() {
                "this lighthouse accepts no OIDC tokens (no [[enroll.oidc]]); enroll with a token"
                    .into()
            } else {
                format!(
                    "the OIDC token is from issuer {:?}, which this lighthouse does not accept (it accepts {})",
                    cut(&iss),
                    accepted.join(", ")
                )
            }
            .into());
        };
        let Some(jwks) = &provider.jwks else {
            return Err(format!(
                "the lighthouse has no signing keys for {} yet ({}); try again shortly",
                provider.config.issuer,
                provider.keys_error.as_deref().unwrap_or("not fetched")
            )
            .into());
        };
        let claims = oidc::verify(
            token,
            jwks,
            &provider.config.issuer,
            &provider.config.audience,
            now,
        )
        .map_err(|e| match (&e, &provider.keys_error) {
            (oidc::OidcError::UnknownKey(_), Some(fetch)) => {
                format!("{e} (fetching the provider's keys failed: {fetch})")
            }
            _ => e.to_string(),
        })?;
        let Some(rule) = oidc::match_rule(&provider.config.rules, &claims) else {
            // Say what the rules look at, so the job's owner can see why.
            let mut names: Vec<&str> = provider
                .config
                .rules
                .iter()
                .flat_map(|r| r.claims.keys().map(String::as_str))
                .collect();
            names.sort_unstable();
            names.dedup();
            let shown: Vec<String> = names
                .iter()
                .map(|n| match claims.0.get(*n) {
                    Some(serde_json::Value::String(v)) => format!("{n}={:?}", cut(v)),
                    Some(v) => format!("{n}={}", cut(&v.to_string())),
                    None => format!("{n} absent"),
                })
                .collect();
            return Err(format!(
                "the OIDC token matches no enroll.oidc rule of {} ({}); add a rule for it on the lighthouse",
                provider.config.issuer,
                shown.join(", ")
            )
            .into());
        };
        // One enrollment per ID token: a token copied from a log cannot
        // enroll a second node while it is still valid.
        let exp = claims
            .0
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(now + 3600);
        let id = match claims.get_str("jti") {
            Some(jti) => format!("{iss} {jti}"),
            None => token_hash(token),
        };
        let used = store
            .oidc_token_used(&id, now)
            .map_err(|e| store_down("check the OIDC token", e))?;
        if used {
            return Err(OIDC_USED.into());
        }
        let spend = Spend::Oidc {
            id,
            until: exp.saturating_add(oidc::LEEWAY),
        };
        let grant = Grant {
            groups: rule.rule.groups.clone(),
            cert_ttl: rule
                .rule
                .cert_ttl
                .map_or(self.issuer.body.max_lifetime, |d| d.as_secs()),
        };
        let matched: Vec<String> = rule
            .matched
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let how = Issuance {
            how: format!(
                "oidc {} rule {}: {}",
                provider.config.issuer,
                rule.index,
                matched.join(" ")
            ),
            token: None,
            claims: Issuance::kept_claims(&claims.0),
        };
        Ok((grant, how, spend))
    }
}

/// Text from a token, cut for a message.
fn cut(text: &str) -> String {
    text.chars().take(120).collect()
}

/// An enrolled node's name: the issuer's prefix, then the node's hint
/// (reduced to name characters, at most 24) and a unique tail from its key,
/// or with no hint the tail and a stamp from the time. It always fits
/// [`cert::MAX_NAME_LEN`]: the tail is kept whole, the hint is cut (and the
/// stamp left out) to fit; refused when the prefix leaves no room for the
/// tail. (Names may start with any name character, so nothing is stripped.)
pub fn node_name(prefix: &str, request: &EnrollRequest, now: u64) -> Result<String, String> {
    let tail = tern_shared::armor::hex(&request.public_key[..4]);
    let Some(room) = cert::MAX_NAME_LEN.checked_sub(prefix.len() + tail.len()) else {
        return Err(format!(
            "the issuer certificate's name prefix {:?} is too long: a node's name is at most {} characters, {} of them its unique tail; make the issuer again with a shorter --name-prefix",
            cut(prefix),
            cert::MAX_NAME_LEN,
            tail.len()
        ));
    };
    // The hint needs a `-` before the tail.
    let hint: String = request
        .name_hint
        .as_deref()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(24.min(room.saturating_sub(1)))
        .collect();
    if !hint.is_empty() {
        return Ok(format!("{prefix}{hint}-{tail}"));
    }
    let stamp = format!("-{}", now % 100_000);
    Ok(if stamp.len() <= room {
        format!("{prefix}{tail}{stamp}")
    } else {
        format!("{prefix}{tail}")
    })
}

/// A new token: 32 random bytes, printable.
pub fn new_token() -> String {
    use rand_core::RngCore;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    format!("tern1_{}", tern_shared::armor::hex(&bytes))
}
