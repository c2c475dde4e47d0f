//! OIDC ID-token (JWT) verification for CI enrollment.
//!
//! A CI job (GitHub Actions, GitLab CI, ...) asks its provider for an ID
//! token and sends it to the lighthouse; the lighthouse checks it against the
//! provider's JWKS and maps its claims to certificate groups with the rules of
//! `[[enroll.oidc]]`. This module is sans-IO: fetching the JWKS and answering
//! the job is the caller's business.
//!
//! What [`verify`] checks, in order: the token's size and shape, that its
//! `alg` is RS256 or ES256, its signature against the provider's keys, then
//! `iss` (exactly the configured issuer), `aud` (the configured audience,
//! alone or in an array), `exp`, `nbf` and `iat` (with [`LEEWAY`] for clock
//! skew). Nothing in the claims is trusted before the signature verifies:
//! [`peek`] reads them unverified only to pick the provider and to see whether
//! a JWKS refresh is worth it, never to decide anything.
//!
//! Two bindings keep an attacker from choosing how the token is checked:
//! - kid pinning: when the header names a key (`kid`), only that key is
//!   tried. Otherwise a token could be checked against whichever key happens
//!   to accept it, and a key the provider withdrew or meant for something
//!   else would still sign tokens.
//! - alg/key-type binding: RS256 only ever uses RSA keys and ES256 only EC
//!   P-256 keys, and `alg` "none" and HMAC algorithms are refused outright.
//!   The classic JWT forgeries take a header that lies about the algorithm
//!   (an "HS256" token MACed with the provider's *public* RSA key, or "none").
//!
//! Keys come only from the configured JWKS; `jwk`, `jku` and `x5u` headers of
//! the token are ignored, since a token cannot vouch for its own key.

use std::collections::BTreeMap;

use ring::signature::{
    RsaPublicKeyComponents, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256,
};
use serde_json::{Map, Value};
use tern_shared::config::OidcRuleConfig;

/// Longest token accepted, in bytes. Real ID tokens are 1-2 KiB; the bound
/// keeps a hostile job from making the lighthouse decode and parse megabytes.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds: CI runners'
/// clocks are not ours.
pub const LEEWAY: u64 = 60;

/// Largest JWKS document parsed, in bytes.
pub const MAX_JWKS_LEN: usize = 256 * 1024;

/// Most keys a JWKS may list.
pub const MAX_JWKS_KEYS: usize = 64;

/// Longest piece of a token (alg, kid, issuer, audience) echoed in an error:
/// errors go back to the job and into logs, they need not carry 8 KiB.
const MAX_ECHO: usize = 200;

/// Why a token (or a provider's JWKS) was refused. Each message is sent back
/// to the CI job, so it says what is wrong in the job's terms; none carries
/// the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("the OIDC token is {len} bytes; at most {max} are accepted")]
    TooLong { len: usize, max: usize },
    #[error("the OIDC token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the OIDC token is signed with {0:?}; only RS256 and ES256 are accepted")]
    UnsupportedAlg(String),
    #[error("{}", unknown_key_message(.0))]
    UnknownKey(Option<String>),
    #[error(
        "the OIDC token names key {kid:?}, which is not a key for {alg} in the provider's JWKS"
    )]
    WrongKeyType { kid: String, alg: String },
    #[error("the OIDC token's signature does not verify against the provider's keys")]
    BadSignature,
    #[error("the OIDC token expired {} s ago; request a fresh one right before enrolling", .now.saturating_sub(*.exp))]
    Expired { exp: u64, now: u64 },
    #[error("the OIDC token's {claim} is {} s in the future; check the clocks of the CI runner and the lighthouse", .at.saturating_sub(*.now))]
    NotYetValid {
        claim: &'static str,
        at: u64,
        now: u64,
    },
    #[error("the OIDC token is from issuer {got:?}, not {want:?}")]
    WrongIssuer { got: String, want: String },
    #[error("the OIDC token has audience {got:?}; the lighthouse expects {want:?} (ask for it, e.g. tern up --oidc-audience {want})")]
    WrongAudience { got: String, want: String },
    #[error("the OIDC token has no {0:?} claim")]
    MissingClaim(&'static str),
    #[error("the provider's JWKS is unusable: {0}")]
    BadJwks(String),
}

fn unknown_key_message(kid: &Option<String>) -> String {
    match kid {
        Some(kid) => format!(
            "no key {kid:?} in the provider's JWKS (the provider may have rotated its keys; retry in a minute)"
        ),
        None => "the OIDC token names no key (kid) and no key of its type is in the provider's JWKS"
            .to_string(),
    }
}

/// A piece of untrusted input, cut short enough to quote in an error.
fn echo(s: &str) -> String {
    if s.len() <= MAX_ECHO {
        return s.to_string();
    }
    let mut end = MAX_ECHO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

// ---------------------------------------------------------------------------
// base64url (RFC 4648 §5), with the workspace's base64 crate.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// Without padding, as JWTs use it; decoding refuses padding.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone),
);
/// The same with complete padding (JWKS documents sometimes carry it).
const B64URL_PADDED: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// base64url without padding, as JWTs use it.
pub fn base64url_encode(bytes: &[u8]) -> String {
    B64URL.encode(bytes)
}

/// Decodes base64url. Only the canonical encoding is accepted (the crate's
/// engines refuse non-zero unused bits in the last character), so every
/// byte string has exactly one spelling and a token cannot be altered
/// without altering what it decodes to. `allow_padding` accepts a correct
/// trailing `=`/`==` (JWKS documents sometimes carry it; tokens never do).
pub fn base64url_decode(input: &str, allow_padding: bool) -> Option<Vec<u8>> {
    let engine = if allow_padding && input.ends_with('=') {
        &B64URL_PADDED
    } else {
        &B64URL
    };
    engine.decode(input).ok()
}

// ---------------------------------------------------------------------------
// JWKS

/// One usable signing key of a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    key: PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    /// Modulus and exponent, big-endian without leading zeros (ring refuses
    /// leading zeros; some providers publish them).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed point 0x04 || x || y.
    EcP256 { point: Vec<u8> },
}

impl PublicKey {
    fn alg(&self) -> Alg {
        match self {
            PublicKey::Rsa { .. } => Alg::Rs256,
            PublicKey::EcP256 { .. } => Alg::Es256,
        }
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            PublicKey::EcP256 { point } => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok(),
        }
    }
}

/// A provider's signing keys: the RS256 and ES256 keys of its JWKS document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses a JWKS document (`{"keys":[...]}`). Kept: keys of kty "RSA"
    /// (`n`, `e`; a 2048- to 8192-bit modulus) and of kty "EC" with crv
    /// "P-256" (`x`, `y`, 32 bytes each). Skipped: other key types, keys
    /// whose `use` is not "sig" or whose `alg` is not the one their type
    /// signs with, and keys whose fields do not decode, so that one key the
    /// lighthouse cannot use does not take the provider's others down with
    /// it. A document with no usable key is an error.
    pub fn parse(json: &[u8]) -> Result<Jwks, OidcError> {
        if json.len() > MAX_JWKS_LEN {
            return Err(OidcError::BadJwks(format!(
                "it is {} bytes, more than the {MAX_JWKS_LEN} accepted",
                json.len()
            )));
        }
        let doc: Value = serde_json::from_slice(json)
            .map_err(|e| OidcError::BadJwks(format!("it is not JSON ({e})")))?;
        let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
            return Err(OidcError::BadJwks(
                "it is not a JSON object with a \"keys\" array".to_string(),
            ));
        };
        if entries.len() > MAX_JWKS_KEYS {
            return Err(OidcError::BadJwks(format!(
                "it lists {} keys, more than the {MAX_JWKS_KEYS} accepted",
                entries.len()
            )));
        }
        let keys: Vec<Jwk> = entries.iter().filter_map(parse_jwk).collect();
        if keys.is_empty() {
            return Err(OidcError::BadJwks(
                "it has no usable RS256 or ES256 signing key".to_string(),
            ));
        }
        Ok(Jwks { keys })
    }

    /// How many usable keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true for a parsed JWKS; here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a usable key has this `kid`: when a token names a key the
    /// JWKS lacks, the provider probably rotated keys and a refresh is due.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// One entry of `keys`, or None when the lighthouse cannot use it.
fn parse_jwk(entry: &Value) -> Option<Jwk> {
    let obj = entry.as_object()?;
    let field = |name: &str| obj.get(name).and_then(Value::as_str);
    // An encryption key must never verify signatures.
    if obj.contains_key("use") && field("use") != Some("sig") {
        return None;
    }
    let kid = match obj.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return None,
    };
    let key = match field("kty")? {
        "RSA" => {
            let n = strip_leading_zeros(base64url_decode(field("n")?, true)?);
            let e = strip_leading_zeros(base64url_decode(field("e")?, true)?);
            // Sizes ring's RSA_PKCS1_2048_8192_SHA256 can ever accept: a key
            // outside them would only fail every signature later.
            if !(256..=1024).contains(&n.len()) || !(1..=5).contains(&e.len()) {
                return None;
            }
            PublicKey::Rsa { n, e }
        }
        "EC" => {
            if field("crv")? != "P-256" {
                return None;
            }
            let x = base64url_decode(field("x")?, true)?;
            let y = base64url_decode(field("y")?, true)?;
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            PublicKey::EcP256 { point }
        }
        _ => return None,
    };
    // A key the provider restricted to another algorithm (say RS384) is not
    // ours to use for RS256.
    if obj.contains_key("alg") && field("alg") != Some(key.alg().name()) {
        return None;
    }
    Some(Jwk { kid, key })
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    bytes.drain(..zeros);
    bytes
}

// ---------------------------------------------------------------------------
// Tokens

/// The signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn from_name(name: &str) -> Result<Alg, OidcError> {
        match name {
            "RS256" => Ok(Alg::Rs256),
            "ES256" => Ok(Alg::Es256),
            other => Err(OidcError::UnsupportedAlg(echo(other))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

/// The token's header and claims, parsed but NOT verified: for picking the
/// provider by `iss` and for seeing whether the `kid` is known before a JWKS
/// refresh. Nothing here may decide anything on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedToken {
    /// The header's `alg`, whatever it is (checked by [`verify`]).
    pub alg: String,
    /// The header's `kid`.
    pub kid: Option<String>,
    /// The `iss` claim, when it is a string.
    pub issuer: Option<String>,
}

/// A token cut into its parts and decoded.
struct Parts<'t> {
    /// `header.payload`, the bytes the signature covers.
    signing_input: &'t str,
    alg: String,
    kid: Option<String>,
    claims: Map<String, Value>,
    signature: Vec<u8>,
}

fn split(token: &str) -> Result<Parts<'_>, OidcError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(OidcError::TooLong {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(OidcError::Malformed(
            "it is not three base64url parts separated by '.'",
        ));
    };
    let signing_input = &token[..header.len() + 1 + payload.len()];

    let header = base64url_decode(header, false)
        .ok_or(OidcError::Malformed("its header is not base64url"))?;
    let header: Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|_| OidcError::Malformed("its header is not a JSON object"))?;
    let Some(Value::String(alg)) = header.get("alg") else {
        return Err(OidcError::Malformed("its header has no \"alg\" string"));
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(OidcError::Malformed("its header's \"kid\" is not a string")),
    };
    // RFC 7515 §4.1.11: extensions marked critical must be understood or the
    // token refused; this verifier understands none.
    if header.contains_key("crit") {
        return Err(OidcError::Malformed(
            "its header lists critical extensions (\"crit\"), which are not supported",
        ));
    }

    let claims = base64url_decode(payload, false)
        .ok_or(OidcError::Malformed("its claims are not base64url"))?;
    let claims: Map<String, Value> = serde_json::from_slice(&claims)
        .map_err(|_| OidcError::Malformed("its claims are not a JSON object"))?;
    let signature = base64url_decode(signature, false)
        .ok_or(OidcError::Malformed("its signature is not base64url"))?;

    Ok(Parts {
        signing_input,
        alg: alg.clone(),
        kid,
        claims,
        signature,
    })
}

/// Reads a token's header and claims WITHOUT verifying anything.
pub fn peek(token: &str) -> Result<UnverifiedToken, OidcError> {
    let parts = split(token)?;
    let issuer = parts
        .claims
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(UnverifiedToken {
        alg: parts.alg,
        kid: parts.kid,
        issuer,
    })
}

/// A token's claims, after [`verify`] accepted it.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Map<String, Value>);

impl Claims {
    /// A claim, when it is a string.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// The `sub` claim (for logs).
    pub fn subject(&self) -> Option<&str> {
        self.get_str("sub")
    }
}

/// Verifies a token from the provider `issuer`, whose keys are `jwks`, meant
/// for `audience`, at `now` (Unix seconds). See the module doc for what is
/// checked; the claims come back only when everything holds.
pub fn verify(
    token: &str,
    jwks: &Jwks,
    issuer: &str,
    audience: &str,
    now: u64,
) -> Result<Claims, OidcError> {
    let parts = split(token)?;
    let alg = Alg::from_name(&parts.alg)?;
    check_signature(&parts, alg, jwks)?;
    check_claims(&parts.claims, issuer, audience, now)?;
    Ok(Claims(parts.claims))
}

fn check_signature(parts: &Parts<'_>, alg: Alg, jwks: &Jwks) -> Result<(), OidcError> {
    let candidates: Vec<&PublicKey> = match &parts.kid {
        Some(kid) => {
            let named: Vec<&Jwk> = jwks
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect();
            if named.is_empty() {
                return Err(OidcError::UnknownKey(Some(echo(kid))));
            }
            let usable: Vec<&PublicKey> = named
                .into_iter()
                .map(|k| &k.key)
                .filter(|k| k.alg() == alg)
                .collect();
            if usable.is_empty() {
                return Err(OidcError::WrongKeyType {
                    kid: echo(kid),
                    alg: alg.name().to_string(),
                });
            }
            usable
        }
        None => {
            let usable: Vec<&PublicKey> = jwks
                .keys
                .iter()
                .map(|k| &k.key)
                .filter(|k| k.alg() == alg)
                .collect();
            if usable.is_empty() {
                return Err(OidcError::UnknownKey(None));
            }
            usable
        }
    };
    // ring would merely fail to verify it; say what is actually wrong.
    if alg == Alg::Es256 && parts.signature.len() != 64 {
        return Err(OidcError::Malformed(
            "its ES256 signature is not 64 bytes (r || s)",
        ));
    }
    let message = parts.signing_input.as_bytes();
    if candidates
        .iter()
        .any(|key| key.verifies(message, &parts.signature))
    {
        Ok(())
    } else {
        Err(OidcError::BadSignature)
    }
}

fn check_claims(
    claims: &Map<String, Value>,
    issuer: &str,
    audience: &str,
    now: u64,
) -> Result<(), OidcError> {
    match claims.get("iss") {
        None | Some(Value::Null) => return Err(OidcError::MissingClaim("iss")),
        Some(Value::String(iss)) if iss == issuer => {}
        Some(Value::String(iss)) => {
            return Err(OidcError::WrongIssuer {
                got: echo(iss),
                want: issuer.to_string(),
            })
        }
        Some(_) => return Err(OidcError::Malformed("its \"iss\" is not a string")),
    }

    let wrong_audience = |got: String| OidcError::WrongAudience {
        got: echo(&got),
        want: audience.to_string(),
    };
    match claims.get("aud") {
        None | Some(Value::Null) => return Err(OidcError::MissingClaim("aud")),
        Some(Value::String(aud)) if aud == audience => {}
        Some(Value::String(aud)) => return Err(wrong_audience(aud.clone())),
        Some(Value::Array(auds)) => {
            let mut names = Vec::with_capacity(auds.len());
            for aud in auds {
                let Some(aud) = aud.as_str() else {
                    return Err(OidcError::Malformed(
                        "its \"aud\" array holds something other than strings",
                    ));
                };
                names.push(aud);
            }
            if !names.contains(&audience) {
                return Err(wrong_audience(names.join(", ")));
            }
        }
        Some(_) => {
            return Err(OidcError::Malformed(
                "its \"aud\" is neither a string nor an array of strings",
            ))
        }
    }

    let exp = time_claim(claims, "exp", "its \"exp\" is not a non-negative number")?
        .ok_or(OidcError::MissingClaim("exp"))?;
    if exp.saturating_add(LEEWAY) <= now {
        return Err(OidcError::Expired { exp, now });
    }
    let not_before = [
        ("nbf", "its \"nbf\" is not a non-negative number"),
        ("iat", "its \"iat\" is not a non-negative number"),
    ];
    for (claim, malformed) in not_before {
        if let Some(at) = time_claim(claims, claim, malformed)? {
            if at > now.saturating_add(LEEWAY) {
                return Err(OidcError::NotYetValid { claim, at, now });
            }
        }
    }
    Ok(())
}

/// A NumericDate claim in whole seconds: an integer, or a float truncated.
fn time_claim(
    claims: &Map<String, Value>,
    name: &str,
    malformed: &'static str,
) -> Result<Option<u64>, OidcError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let Value::Number(n) = value else {
        return Err(OidcError::Malformed(malformed));
    };
    if let Some(secs) = n.as_u64() {
        return Ok(Some(secs));
    }
    match n.as_f64() {
        // `as` saturates: a float beyond u64 becomes u64::MAX, far future.
        Some(secs) if secs.is_finite() && secs >= 0.0 => Ok(Some(secs as u64)),
        _ => Err(OidcError::Malformed(malformed)),
    }
}

// ---------------------------------------------------------------------------
// Rules

/// The rule that decided, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleMatch<'a> {
    /// Its position in the provider's `rules`.
    pub index: usize,
    pub rule: &'a OidcRuleConfig,
    /// (claim, value) pairs that matched its patterns, for the issuance log.
    pub matched: Vec<(String, String)>,
}

/// The first rule (in order) whose every claim pattern matches the claims.
/// A rule with no patterns never matches: it would admit every token the
/// provider signs, which for GitHub or GitLab means every repository on it.
pub fn match_rule<'a>(rules: &'a [OidcRuleConfig], claims: &Claims) -> Option<RuleMatch<'a>> {
    rules.iter().enumerate().find_map(|(index, rule)| {
        let matched = match_patterns(&rule.claims, claims)?;
        Some(RuleMatch {
            index,
            rule,
            matched,
        })
    })
}

fn match_patterns(
    patterns: &BTreeMap<String, String>,
    claims: &Claims,
) -> Option<Vec<(String, String)>> {
    if patterns.is_empty() {
        return None;
    }
    patterns
        .iter()
        .map(|(name, pattern)| {
            let value = claim_text(claims.0.get(name)?)?;
            glob_match(pattern, &value).then(|| (name.clone(), value))
        })
        .collect()
}

/// A claim as text for matching: strings as they are, numbers and booleans
/// as their JSON text ("42", "true"). Anything else never matches: a pattern
/// is no way to say what an object or array should hold.
fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Whether `text` matches `pattern` as a whole, where `*` matches any run of
/// characters (including none) and everything else matches itself.
///
/// The classic two-pointer walk: on a mismatch, go back to the last `*` and
/// let it swallow one more character. Only the last `*` ever needs
/// revisiting (an earlier one could only swallow text the later one can
/// too), so the work is at most pattern × text, never exponential.
/// Working on bytes is exact for UTF-8: a literal never starts with a
/// continuation byte, so `*` never ends inside a character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen, and where in the text what it swallows ends.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, ti));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

// ---------------------------------------------------------------------------

/// A throwaway OIDC provider for tests (here, in other crates' integration
/// tests and in benchmarks): a signing key and its JWKS. Built only for
/// tests and with the `test-support` feature.
#[cfg(any(test, feature = "test-support"))]
pub mod test_issuer {
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents, ECDSA_P256_SHA256_FIXED_SIGNING,
        RSA_PKCS1_SHA256,
    };
    use serde_json::{json, Value};

    use super::base64url_encode;

    enum SigningKey {
        Es256(EcdsaKeyPair),
        Rs256(RsaKeyPair),
    }

    /// A throwaway OIDC provider for tests: a signing key and its JWKS.
    pub struct TestOidcIssuer {
        kid: String,
        key: SigningKey,
        rng: SystemRandom,
    }

    impl std::fmt::Debug for TestOidcIssuer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestOidcIssuer")
                .field("alg", &self.alg())
                .field("kid", &self.kid)
                .finish_non_exhaustive()
        }
    }

    impl TestOidcIssuer {
        /// A fresh P-256 key signing ES256.
        pub fn es256(kid: &str) -> Result<TestOidcIssuer, String> {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| "generating a P-256 key failed".to_string())?;
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .map_err(|e| format!("loading the P-256 key: {e}"))?;
            Ok(TestOidcIssuer {
                kid: kid.to_string(),
                key: SigningKey::Es256(key),
                rng,
            })
        }

        /// A fresh 2048-bit RSA key signing RS256. ring cannot generate RSA
        /// keys, so this runs `openssl genpkey` (0.1-1 s: generate once per
        /// test binary).
        pub fn rs256(kid: &str) -> Result<TestOidcIssuer, String> {
            let out = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-outform",
                    "DER",
                ])
                .output()
                .map_err(|e| format!("running openssl: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "openssl genpkey failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            // OpenSSL 3 writes the traditional PKCS#1 form for DER, older or
            // differently configured ones PKCS#8: take either.
            let key = RsaKeyPair::from_pkcs8(&out.stdout)
                .or_else(|_| RsaKeyPair::from_der(&out.stdout))
                .map_err(|e| format!("loading openssl's RSA key: {e}"))?;
            Ok(TestOidcIssuer {
                kid: kid.to_string(),
                key: SigningKey::Rs256(key),
                rng: SystemRandom::new(),
            })
        }

        /// The key's `kid`.
        pub fn kid(&self) -> &str {
            &self.kid
        }

        /// "ES256" or "RS256".
        pub fn alg(&self) -> &'static str {
            match self.key {
                SigningKey::Es256(_) => "ES256",
                SigningKey::Rs256(_) => "RS256",
            }
        }

        /// The public key as one JWKS entry.
        pub fn jwk(&self) -> Value {
            match &self.key {
                SigningKey::Es256(key) => {
                    // 0x04 || x || y
                    let coords = key.public_key().as_ref().get(1..).unwrap_or_default();
                    let (x, y) = coords.split_at(coords.len() / 2);
                    json!({
                        "kty": "EC",
                        "crv": "P-256",
                        "use": "sig",
                        "alg": "ES256",
                        "kid": self.kid,
                        "x": base64url_encode(x),
                        "y": base64url_encode(y),
                    })
                }
                SigningKey::Rs256(key) => {
                    let public: RsaPublicKeyComponents<Vec<u8>> = key.public().into();
                    json!({
                        "kty": "RSA",
                        "use": "sig",
                        "alg": "RS256",
                        "kid": self.kid,
                        "n": base64url_encode(&public.n),
                        "e": base64url_encode(&public.e),
                    })
                }
            }
        }

        /// The provider's JWKS document: `{"keys":[<this key>]}`.
        pub fn jwks_json(&self) -> String {
            json!({ "keys": [self.jwk()] }).to_string()
        }

        /// A token with header `{"alg":..,"kid":..,"typ":"JWT"}`.
        pub fn sign(&self, claims: &Value) -> String {
            let header = json!({ "alg": self.alg(), "kid": self.kid, "typ": "JWT" });
            self.sign_with_header(&header, claims)
        }

        /// A token with any header, signed with this issuer's key whatever
        /// the header says (to forge lying headers). Signing cannot fail
        /// with a good key; if ring still refuses, the token carries an
        /// empty signature, which never verifies.
        pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
            let signing_input = format!(
                "{}.{}",
                base64url_encode(header.to_string().as_bytes()),
                base64url_encode(claims.to_string().as_bytes())
            );
            let message = signing_input.as_bytes();
            let signature = match &self.key {
                SigningKey::Es256(key) => key
                    .sign(&self.rng, message)
                    .map(|sig| sig.as_ref().to_vec())
                    .unwrap_or_default(),
                SigningKey::Rs256(key) => {
                    let mut sig = vec![0; key.public().modulus_len()];
                    match key.sign(&RSA_PKCS1_SHA256, &self.rng, message, &mut sig) {
                        Ok(()) => sig,
                        Err(_) => Vec::new(),
                    }
                }
            };
            format!("{signing_input}.{}", base64url_encode(&signature))
        }
    }

    /// Claims like GitHub Actions' for a push to `git_ref` of `repository`
    /// ("owner/name"), valid for 5 minutes from `now`.
    pub fn github_like_claims(
        issuer: &str,
        audience: &str,
        repository: &str,
        git_ref: &str,
        now: u64,
    ) -> Value {
        let owner = repository.split('/').next().unwrap_or(repository);
        json!({
            "jti": format!("test-{now}-{repository}"),
            "sub": format!("repo:{repository}:ref:{git_ref}"),
            "aud": audience,
            "ref": git_ref,
            "ref_type": "branch",
            "sha": "0123456789abcdef0123456789abcdef01234567",
            "repository": repository,
            "repository_id": "123456789",
            "repository_owner": owner,
            "repository_owner_id": "987654321",
            "repository_visibility": "private",
            "run_id": "4242424242",
            "run_number": "7",
            "run_attempt": "1",
            "actor": "octocat",
            "actor_id": "583231",
            "workflow": "CI",
            "workflow_ref": format!("{repository}/.github/workflows/ci.yml@{git_ref}"),
            "job_workflow_ref": format!("{repository}/.github/workflows/ci.yml@{git_ref}"),
            "event_name": "push",
            "runner_environment": "github-hosted",
            "iss": issuer,
            "nbf": now,
            "iat": now,
            "exp": now.saturating_add(300),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use serde_json::json;

    use super::test_issuer::{github_like_claims, TestOidcIssuer};
    use super::*;

    const ISS: &str = "https://token.actions.githubusercontent.com";
    const AUD: &str = "tern-test";
    const NOW: u64 = 1_700_000_000;

    fn es() -> &'static TestOidcIssuer {
        static KEY: OnceLock<TestOidcIssuer> = OnceLock::new();
        KEY.get_or_init(|| TestOidcIssuer::es256("es-key").unwrap())
    }

    /// openssl keygen is slow: one RSA key per test binary.
    fn rsa() -> &'static TestOidcIssuer {
        static KEY: OnceLock<TestOidcIssuer> = OnceLock::new();
        KEY.get_or_init(|| TestOidcIssuer::rs256("rsa-key").unwrap())
    }

    fn jwks_of(issuers: &[&TestOidcIssuer]) -> Jwks {
        let keys: Vec<Value> = issuers.iter().map(|i| i.jwk()).collect();
        Jwks::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn claims() -> Value {
        github_like_claims(ISS, AUD, "acme/widgets", "refs/heads/main", NOW)
    }

    fn with(mut claims: Value, name: &str, value: Value) -> Value {
        claims[name] = value;
        claims
    }

    fn without(mut claims: Value, name: &str) -> Value {
        claims.as_object_mut().unwrap().remove(name);
        claims
    }

    fn check(issuer: &TestOidcIssuer, claims: &Value) -> Result<Claims, OidcError> {
        verify(&issuer.sign(claims), &jwks_of(&[issuer]), ISS, AUD, NOW)
    }

    /// A token with its segment `i` replaced.
    fn replace_segment(token: &str, i: usize, with: &str) -> String {
        let mut segments: Vec<&str> = token.split('.').collect();
        segments[i] = with;
        segments.join(".")
    }

    fn rule(claims: &[(&str, &str)], groups: &[&str]) -> OidcRuleConfig {
        OidcRuleConfig {
            claims: claims
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            cert_ttl: None,
        }
    }

    // --- accepting ---------------------------------------------------------

    #[test]
    fn es256_token_verifies() {
        let got = check(es(), &claims()).unwrap();
        assert_eq!(Value::Object(got.0.clone()), claims());
        assert_eq!(got.get_str("repository"), Some("acme/widgets"));
        assert_eq!(got.subject(), Some("repo:acme/widgets:ref:refs/heads/main"));
    }

    #[test]
    fn rs256_token_verifies() {
        let got = check(rsa(), &claims()).unwrap();
        assert_eq!(Value::Object(got.0), claims());
    }

    #[test]
    fn peek_reads_header_and_issuer_unverified() {
        let token = es().sign(&claims());
        let peeked = peek(&token).unwrap();
        assert_eq!(
            peeked,
            UnverifiedToken {
                alg: "ES256".into(),
                kid: Some("es-key".into()),
                issuer: Some(ISS.into()),
            }
        );
        // Unverified means unverified: a forged signature peeks the same.
        let forged = replace_segment(&token, 2, &base64url_encode(&[7; 64]));
        assert_eq!(peek(&forged).unwrap(), peeked);
        let no_kid = es().sign_with_header(&json!({"alg": "XYZ"}), &without(claims(), "iss"));
        let peeked = peek(&no_kid).unwrap();
        assert_eq!(
            (peeked.alg.as_str(), peeked.kid, peeked.issuer),
            ("XYZ", None, None)
        );
    }

    #[test]
    fn audience_array_containing_ours_is_accepted() {
        let c = with(claims(), "aud", json!(["other", AUD]));
        assert!(check(es(), &c).is_ok());
    }

    #[test]
    fn float_times_are_truncated() {
        let c = with(claims(), "exp", json!(NOW as f64 + 300.9));
        let c = with(c, "iat", json!(NOW as f64 + 0.5));
        assert!(check(es(), &c).is_ok());
    }

    #[test]
    fn token_without_kid_tries_every_key_of_its_type() {
        let other = TestOidcIssuer::es256("other").unwrap();
        let jwks = jwks_of(&[es(), rsa(), &other]);
        let token = other.sign_with_header(&json!({"alg": "ES256", "typ": "JWT"}), &claims());
        assert!(verify(&token, &jwks, ISS, AUD, NOW).is_ok());
        let token = rsa().sign_with_header(&json!({"alg": "RS256"}), &claims());
        assert!(verify(&token, &jwks, ISS, AUD, NOW).is_ok());
    }

    // --- refusing ----------------------------------------------------------

    #[test]
    fn wrong_audience_is_refused() {
        let c = with(claims(), "aud", json!("someone-else"));
        let err = check(es(), &c).unwrap_err();
        assert_eq!(
            err,
            OidcError::WrongAudience {
                got: "someone-else".into(),
                want: AUD.into()
            }
        );
        assert!(
            err.to_string().contains("--oidc-audience tern-test"),
            "{err}"
        );

        let c = with(claims(), "aud", json!(["a", "b"]));
        assert_eq!(
            check(es(), &c).unwrap_err(),
            OidcError::WrongAudience {
                got: "a, b".into(),
                want: AUD.into()
            }
        );
        let c = with(claims(), "aud", json!([]));
        assert!(matches!(
            check(es(), &c),
            Err(OidcError::WrongAudience { .. })
        ));
        let c = with(claims(), "aud", json!(42));
        assert!(matches!(check(es(), &c), Err(OidcError::Malformed(_))));
        let c = with(claims(), "aud", json!([AUD, 42]));
        assert!(matches!(check(es(), &c), Err(OidcError::Malformed(_))));
    }

    #[test]
    fn wrong_issuer_is_refused() {
        let c = with(claims(), "iss", json!("https://gitlab.example.com"));
        assert_eq!(
            check(es(), &c).unwrap_err(),
            OidcError::WrongIssuer {
                got: "https://gitlab.example.com".into(),
                want: ISS.into()
            }
        );
        // Exactly: no trailing-slash leniency.
        let c = with(claims(), "iss", json!(format!("{ISS}/")));
        assert!(matches!(
            check(es(), &c),
            Err(OidcError::WrongIssuer { .. })
        ));
        let c = with(claims(), "iss", json!(7));
        assert!(matches!(check(es(), &c), Err(OidcError::Malformed(_))));
    }

    #[test]
    fn missing_claims_are_named() {
        for name in ["iss", "aud", "exp"] {
            assert_eq!(
                check(es(), &without(claims(), name)).unwrap_err(),
                OidcError::MissingClaim(name)
            );
        }
        // nbf and iat are optional.
        let c = without(without(claims(), "nbf"), "iat");
        assert!(check(es(), &c).is_ok());
    }

    #[test]
    fn expiry_allows_only_the_leeway() {
        for exp in [NOW - LEEWAY - 1, NOW - LEEWAY, 0] {
            let err = check(es(), &with(claims(), "exp", json!(exp))).unwrap_err();
            assert_eq!(err, OidcError::Expired { exp, now: NOW });
        }
        let err = check(es(), &with(claims(), "exp", json!(NOW - 100))).unwrap_err();
        assert!(err.to_string().contains("expired 100 s ago"), "{err}");
        // Within the leeway of a runner whose clock is behind ours.
        for exp in [NOW - LEEWAY + 1, NOW, NOW + 1] {
            assert!(check(es(), &with(claims(), "exp", json!(exp))).is_ok());
        }
    }

    #[test]
    fn not_yet_valid_is_refused_beyond_the_leeway() {
        for claim in ["nbf", "iat"] {
            let at = NOW + LEEWAY + 1;
            assert_eq!(
                check(es(), &with(claims(), claim, json!(at))).unwrap_err(),
                OidcError::NotYetValid {
                    claim,
                    at,
                    now: NOW
                }
            );
            assert!(check(es(), &with(claims(), claim, json!(NOW + LEEWAY))).is_ok());
        }
        let err = check(es(), &with(claims(), "nbf", json!(NOW + 90))).unwrap_err();
        assert!(err.to_string().contains("90 s in the future"), "{err}");
    }

    #[test]
    fn bad_time_claims_are_malformed() {
        for claim in ["exp", "nbf", "iat"] {
            for bad in [
                json!(-1),
                json!(-0.5),
                json!("1700000000"),
                json!(null),
                json!([1]),
            ] {
                let c = with(claims(), claim, bad.clone());
                assert!(
                    matches!(check(es(), &c), Err(OidcError::Malformed(_))),
                    "{claim} = {bad}"
                );
            }
        }
    }

    #[test]
    fn flipped_signature_byte_is_refused() {
        for issuer in [es(), rsa()] {
            let token = issuer.sign(&claims());
            let mut sig = base64url_decode(token.split('.').nth(2).unwrap(), false).unwrap();
            sig[10] ^= 0x01;
            let forged = replace_segment(&token, 2, &base64url_encode(&sig));
            assert_eq!(
                verify(&forged, &jwks_of(&[issuer]), ISS, AUD, NOW),
                Err(OidcError::BadSignature)
            );
        }
    }

    #[test]
    fn payload_altered_after_signing_is_refused() {
        for issuer in [es(), rsa()] {
            let token = issuer.sign(&claims());
            let evil = with(claims(), "repository", json!("acme/secrets"));
            let forged = replace_segment(&token, 1, &base64url_encode(evil.to_string().as_bytes()));
            assert_eq!(
                verify(&forged, &jwks_of(&[issuer]), ISS, AUD, NOW),
                Err(OidcError::BadSignature)
            );
        }
    }

    #[test]
    fn another_key_with_the_same_kid_is_refused() {
        let impostor = TestOidcIssuer::es256(es().kid()).unwrap();
        let token = impostor.sign(&claims());
        assert_eq!(
            verify(&token, &jwks_of(&[es()]), ISS, AUD, NOW),
            Err(OidcError::BadSignature)
        );
    }

    #[test]
    fn kid_pins_the_key() {
        // Both keys are in the JWKS, but the header names the other one: the
        // signer's own key is not tried.
        let signer = TestOidcIssuer::es256("signer").unwrap();
        let jwks = jwks_of(&[es(), &signer]);
        let token = signer.sign_with_header(&json!({"alg": "ES256", "kid": es().kid()}), &claims());
        assert_eq!(
            verify(&token, &jwks, ISS, AUD, NOW),
            Err(OidcError::BadSignature)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let token = format!(
            "{}.{}.",
            base64url_encode(br#"{"alg":"none","typ":"JWT"}"#),
            base64url_encode(claims().to_string().as_bytes())
        );
        assert_eq!(
            verify(&token, &jwks_of(&[es()]), ISS, AUD, NOW),
            Err(OidcError::UnsupportedAlg("none".into()))
        );
    }

    #[test]
    fn hs256_is_refused() {
        // The classic forgery: HMAC keyed with the provider's public key.
        let header = base64url_encode(br#"{"alg":"HS256","kid":"rsa-key"}"#);
        let payload = base64url_encode(claims().to_string().as_bytes());
        let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, rsa().jwks_json().as_bytes());
        let tag = ring::hmac::sign(&mac_key, format!("{header}.{payload}").as_bytes());
        let token = format!("{header}.{payload}.{}", base64url_encode(tag.as_ref()));
        let err = verify(&token, &jwks_of(&[rsa()]), ISS, AUD, NOW).unwrap_err();
        assert_eq!(err, OidcError::UnsupportedAlg("HS256".into()));
        assert!(err.to_string().contains("only RS256 and ES256"), "{err}");
    }

    #[test]
    fn alg_and_key_type_are_bound() {
        let jwks = jwks_of(&[es(), rsa()]);
        // RS256 header over the EC key.
        let token = es().sign_with_header(&json!({"alg": "RS256", "kid": es().kid()}), &claims());
        assert_eq!(
            verify(&token, &jwks, ISS, AUD, NOW),
            Err(OidcError::WrongKeyType {
                kid: "es-key".into(),
                alg: "RS256".into()
            })
        );
        // ES256 header over the RSA key.
        let token = rsa().sign_with_header(&json!({"alg": "ES256", "kid": rsa().kid()}), &claims());
        assert_eq!(
            verify(&token, &jwks, ISS, AUD, NOW),
            Err(OidcError::WrongKeyType {
                kid: "rsa-key".into(),
                alg: "ES256".into()
            })
        );
        let token = es().sign_with_header(&json!({"alg": "ES256", "kid": rsa().kid()}), &claims());
        assert_eq!(
            verify(&token, &jwks, ISS, AUD, NOW),
            Err(OidcError::WrongKeyType {
                kid: "rsa-key".into(),
                alg: "ES256".into()
            })
        );
        // Without a kid, keys of the other type are not even tried.
        let token = es().sign_with_header(&json!({"alg": "ES256"}), &claims());
        assert_eq!(
            verify(&token, &jwks_of(&[rsa()]), ISS, AUD, NOW),
            Err(OidcError::UnknownKey(None))
        );
    }

    #[test]
    fn unknown_kid_is_refused() {
        let stranger = TestOidcIssuer::es256("rotated-in").unwrap();
        let jwks = jwks_of(&[es()]);
        assert!(!jwks.has_kid("rotated-in"));
        let err = verify(&stranger.sign(&claims()), &jwks, ISS, AUD, NOW).unwrap_err();
        assert_eq!(err, OidcError::UnknownKey(Some("rotated-in".into())));
        assert!(err.to_string().contains("\"rotated-in\""), "{err}");
    }

    #[test]
    fn too_long_is_refused_first() {
        let token = "!".repeat(MAX_TOKEN_LEN + 1);
        let want = OidcError::TooLong {
            len: MAX_TOKEN_LEN + 1,
            max: MAX_TOKEN_LEN,
        };
        assert_eq!(peek(&token), Err(want.clone()));
        assert_eq!(verify(&token, &jwks_of(&[es()]), ISS, AUD, NOW), Err(want));
        // A valid token padded past the limit with a big claim.
        let big = with(claims(), "pad", json!("x".repeat(MAX_TOKEN_LEN)));
        assert!(matches!(check(es(), &big), Err(OidcError::TooLong { .. })));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = es().sign(&claims());
        let h = |header: &str| base64url_encode(header.as_bytes());
        let payload = base64url_encode(claims().to_string().as_bytes());
        let sig = good.split('.').nth(2).unwrap().to_string();
        let cases = [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{good}.x"),
            format!("!!.{payload}.{sig}"),
            format!("{}=.{payload}.{sig}", h(r#"{"alg":"ES256"}"#)),
            format!("{}.{payload}.{sig}", h("not json")),
            format!("{}.{payload}.{sig}", h(r#"["alg","ES256"]"#)),
            format!("{}.{payload}.{sig}", h(r#"{"typ":"JWT"}"#)),
            format!("{}.{payload}.{sig}", h(r#"{"alg":256}"#)),
            format!("{}.{payload}.{sig}", h(r#"{"alg":"ES256","kid":1}"#)),
            format!(
                "{}.{payload}.{sig}",
                h(r#"{"alg":"ES256","crit":["b64"],"b64":false}"#)
            ),
            format!("{}.{}.{sig}", h(r#"{"alg":"ES256"}"#), h("[1,2]")),
            format!("{}.{}.{sig}", h(r#"{"alg":"ES256"}"#), h("{")),
            format!("{}.{payload}.{sig}*", h(r#"{"alg":"ES256"}"#)),
            // An ES256 signature must be exactly r || s.
            format!(
                "{}.{payload}.{}",
                h(r#"{"alg":"ES256"}"#),
                base64url_encode(&[1; 63])
            ),
            format!("{}.{payload}.", h(r#"{"alg":"ES256"}"#)),
        ];
        for token in cases {
            let got = verify(&token, &jwks_of(&[es()]), ISS, AUD, NOW);
            assert!(
                matches!(got, Err(OidcError::Malformed(_))),
                "{token}: {got:?}"
            );
        }
    }

    #[test]
    fn errors_never_quote_the_token() {
        let token = es().sign(&with(claims(), "aud", json!("elsewhere")));
        let err = verify(&token, &jwks_of(&[es()]), ISS, AUD, NOW).unwrap_err();
        let text = err.to_string();
        for segment in token.split('.') {
            assert!(!text.contains(segment), "{text}");
        }
        // Long attacker-chosen strings are cut short.
        let long = "k".repeat(5000);
        let token = es().sign_with_header(&json!({"alg": "ES256", "kid": long}), &claims());
        let err = verify(&token, &jwks_of(&[es()]), ISS, AUD, NOW).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    // --- JWKS --------------------------------------------------------------

    #[test]
    fn jwks_keeps_rsa_and_p256_keys() {
        let jwks = jwks_of(&[es(), rsa()]);
        assert_eq!(jwks.len(), 2);
        assert!(!jwks.is_empty());
        assert!(jwks.has_kid("es-key") && jwks.has_kid("rsa-key"));
        assert!(!jwks.has_kid("nope"));
        assert!(Jwks::parse(es().jwks_json().as_bytes()).is_ok());
    }

    #[test]
    fn jwks_skips_what_it_cannot_use() {
        let mut enc = es().jwk();
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc");
        let mut p384 = es().jwk();
        p384["crv"] = json!("P-384");
        p384["kid"] = json!("p384");
        let mut rs384 = rsa().jwk();
        rs384["alg"] = json!("RS384");
        rs384["kid"] = json!("rs384");
        let mut short_x = es().jwk();
        short_x["x"] = json!(base64url_encode(&[1; 31]));
        short_x["kid"] = json!("short");
        let mut small_rsa = rsa().jwk();
        small_rsa["n"] = json!(base64url_encode(&[0xc5; 128]));
        small_rsa["kid"] = json!("small");
        let mut numeric_kid = es().jwk();
        numeric_kid["kid"] = json!(5);
        let doc = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "ed"},
            enc, p384, rs384, short_x, small_rsa, numeric_kid, "not an object",
            {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
            es().jwk(),
        ]});
        let jwks = Jwks::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(jwks.len(), 1);
        assert!(jwks.has_kid("es-key"));
        for kid in [
            "hmac", "ed", "enc", "p384", "rs384", "short", "small", "no-n",
        ] {
            assert!(!jwks.has_kid(kid), "{kid}");
        }
    }

    #[test]
    fn jwks_without_usable_keys_is_an_error() {
        let mut enc = es().jwk();
        enc["use"] = json!("enc");
        for doc in [
            json!({"keys": []}),
            json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
            json!({"keys": [enc]}),
        ] {
            assert!(matches!(
                Jwks::parse(doc.to_string().as_bytes()),
                Err(OidcError::BadJwks(_))
            ));
        }
    }

    #[test]
    fn jwks_garbage_is_an_error() {
        for doc in [
            &b""[..],
            b"garbage",
            b"{",
            b"[]",
            b"{}",
            b"{\"keys\": {}}",
            b"{\"keys\": null}",
            b"\xff\xfe",
        ] {
            assert!(matches!(Jwks::parse(doc), Err(OidcError::BadJwks(_))));
        }
    }

    #[test]
    fn jwks_is_bounded() {
        let keys: Vec<Value> = (0..=MAX_JWKS_KEYS).map(|_| es().jwk()).collect();
        let err = Jwks::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("65 keys"), "{err}");
        let keys: Vec<Value> = (0..MAX_JWKS_KEYS).map(|_| es().jwk()).collect();
        assert!(Jwks::parse(json!({ "keys": keys }).to_string().as_bytes()).is_ok());
        let mut huge = es().jwks_json().into_bytes();
        huge.resize(MAX_JWKS_LEN + 1, b' ');
        assert!(matches!(Jwks::parse(&huge), Err(OidcError::BadJwks(_))));
    }

    #[test]
    fn jwks_accepts_padding_and_leading_zeros() {
        let mut jwk = rsa().jwk();
        let n = base64url_decode(jwk["n"].as_str().unwrap(), false).unwrap();
        let mut padded_n = vec![0];
        padded_n.extend_from_slice(&n);
        // 257 bytes: the base64 needs padding.
        let n_b64 = base64url_encode(&padded_n);
        jwk["n"] = json!(format!("{n_b64}{}", "=".repeat((4 - n_b64.len() % 4) % 4)));
        jwk["e"] = json!("AQAB");
        let jwks = Jwks::parse(json!({ "keys": [jwk] }).to_string().as_bytes()).unwrap();
        assert!(verify(&rsa().sign(&claims()), &jwks, ISS, AUD, NOW).is_ok());
    }

    // --- base64url ---------------------------------------------------------

    #[test]
    fn base64url_known_answers() {
        let vectors: [(&[u8], &str); 8] = [
            (b"", ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff, 0xbf], "-_-_"),
        ];
        for (bytes, text) in vectors {
            assert_eq!(base64url_encode(bytes), text);
            assert_eq!(base64url_decode(text, false).as_deref(), Some(bytes));
        }
    }

    #[test]
    fn base64url_is_strict() {
        assert_eq!(base64url_decode("Zg==", true).unwrap(), b"f");
        assert_eq!(base64url_decode("Zm8=", true).unwrap(), b"fo");
        for (text, allow_padding) in [
            ("Zg==", false),
            ("Zg=", true),
            ("Zg===", true),
            ("Zm9v=", true),
            ("Zm9v====", true),
            ("====", true),
            ("Z", false),
            ("Zh", false),  // unused bits set
            ("Zm9", false), // unused bits set
            ("Zm+v", false),
            ("Zm/v", false),
            ("Zm9v ", false),
        ] {
            assert_eq!(base64url_decode(text, allow_padding), None, "{text}");
        }
    }

    // --- rules -------------------------------------------------------------

    #[test]
    fn first_matching_rule_wins() {
        let rules = [
            rule(&[("repository", "acme/other")], &["never"]),
            rule(
                &[("repository", "acme/*"), ("ref", "refs/heads/main")],
                &["ci-main"],
            ),
            rule(&[("repository", "acme/*")], &["ci"]),
        ];
        let claims = check(es(), &claims()).unwrap();
        let m = match_rule(&rules, &claims).unwrap();
        assert_eq!(m.index, 1);
        assert_eq!(m.rule.groups, ["ci-main"]);
        // BTreeMap order: by claim name.
        assert_eq!(
            m.matched,
            [
                ("ref".to_string(), "refs/heads/main".to_string()),
                ("repository".to_string(), "acme/widgets".to_string()),
            ]
        );
        let dev = Claims(
            with(self::claims(), "ref", json!("refs/heads/dev"))
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(match_rule(&rules, &dev).unwrap().index, 2);
        let stranger = Claims(
            with(self::claims(), "repository", json!("evil/widgets"))
                .as_object()
                .unwrap()
                .clone(),
        );
        assert!(match_rule(&rules, &stranger).is_none());
        assert!(match_rule(&[], &claims).is_none());
    }

    #[test]
    fn rule_without_patterns_never_matches() {
        let rules = [rule(&[], &["everyone"]), rule(&[("sub", "*")], &["any"])];
        let claims = check(es(), &claims()).unwrap();
        assert_eq!(match_rule(&rules, &claims).unwrap().index, 1);
    }

    #[test]
    fn rules_match_numbers_and_bools_as_json_text() {
        let claims = Claims(
            json!({"run": 42, "big": 1.5, "fork": false, "s": "true"})
                .as_object()
                .unwrap()
                .clone(),
        );
        for (name, pattern) in [
            ("run", "42"),
            ("run", "4*"),
            ("big", "1.5"),
            ("fork", "false"),
            ("s", "true"),
        ] {
            let rules = [rule(&[(name, pattern)], &["g"])];
            assert!(match_rule(&rules, &claims).is_some(), "{name} ~ {pattern}");
        }
        let rules = [rule(&[("run", "*"), ("fork", "f*")], &["g"])];
        let m = match_rule(&rules, &claims).unwrap();
        assert_eq!(
            m.matched,
            [
                ("fork".to_string(), "false".to_string()),
                ("run".to_string(), "42".to_string()),
            ]
        );
        assert!(match_rule(&[rule(&[("run", "42.0")], &["g"])], &claims).is_none());
    }

    #[test]
    fn absent_null_and_structured_claims_never_match() {
        let claims = Claims(
            json!({"n": null, "o": {"a": "b"}, "a": ["x"], "e": ""})
                .as_object()
                .unwrap()
                .clone(),
        );
        for name in ["missing", "n", "o", "a"] {
            assert!(
                match_rule(&[rule(&[(name, "*")], &["g"])], &claims).is_none(),
                "{name}"
            );
        }
        // An empty string is present: `*` matches it.
        assert!(match_rule(&[rule(&[("e", "*")], &["g"])], &claims).is_some());
        // One failing pattern fails the whole rule.
        let r = rule(&[("e", "*"), ("missing", "*")], &["g"]);
        assert!(match_rule(&[r], &claims).is_none());
    }

    #[test]
    fn glob_cases() {
        let yes = [
            ("", ""),
            ("*", ""),
            ("*", "anything"),
            ("**", ""),
            ("acme/*", "acme/widgets"),
            ("acme/*", "acme/"),
            ("*/widgets", "acme/widgets"),
            ("refs/*/main", "refs/heads/main"),
            ("refs/*/main", "refs//main"),
            ("*a*b*c*", "xxaxxbxxcxx"),
            ("*a*b*c*", "abc"),
            ("a*a*a", "aaaaa"),
            ("exact", "exact"),
            ("é*ü", "éèü"),
        ];
        for (p, t) in yes {
            assert!(glob_match(p, t), "{p:?} should match {t:?}");
        }
        let no = [
            ("", "x"),
            ("acme/*", "acme"),
            ("acme/*", "evil/acme/x"),
            ("*/widgets", "acme/widgets2"),
            ("exact", "exactly"),
            ("exact", "Exact"),
            ("*a*b*c*", "acb"),
            ("a*a*a", "aa"),
            ("?", "x"),
        ];
        for (p, t) in no {
            assert!(!glob_match(p, t), "{p:?} should not match {t:?}");
        }
        // The shape that makes naive backtracking exponential stays quick.
        let text = "a".repeat(5000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(50)), &text));
    }

    #[test]
    fn github_like_claims_shape() {
        let c = github_like_claims(ISS, AUD, "acme/widgets", "refs/heads/main", NOW);
        assert_eq!(c["repository_owner"], "acme");
        assert_eq!(c["exp"], NOW + 300);
        assert_eq!(c["sub"], "repo:acme/widgets:ref:refs/heads/main");
    }

    // --- properties --------------------------------------------------------

    /// Reference glob: the obvious recursion, fine for short inputs.
    fn glob_reference(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| glob_reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && glob_reference(rest, &t[1..]),
        }
    }

    fn b64_segment() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| base64url_encode(&b)),
            "[A-Za-z0-9_-]{0,40}",
            Just(base64url_encode(br#"{"alg":"ES256","kid":"es-key"}"#)),
            Just(base64url_encode(br#"{"alg":"RS256"}"#)),
            any::<i64>().prop_map(|n| base64url_encode(n.to_string().as_bytes())),
            "\\{\"[a-z]{1,4}\":[0-9a-z\"\\[\\]{},:-]{0,20}\\}"
                .prop_map(|s| base64url_encode(s.as_bytes())),
        ]
    }

    proptest! {
        #[test]
        fn random_strings_never_panic(s in "\\PC{0,300}") {
            let _ = peek(&s);
            let _ = verify(&s, &jwks_of(&[es()]), ISS, AUD, NOW);
            let _ = base64url_decode(&s, true);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Jwks::parse(&bytes);
            let s = String::from_utf8_lossy(&bytes);
            let _ = peek(&s);
            let _ = verify(&s, &jwks_of(&[es()]), ISS, AUD, NOW);
        }

        #[test]
        fn token_shaped_input_never_panics(
            h in b64_segment(), p in b64_segment(), s in b64_segment(),
        ) {
            let token = format!("{h}.{p}.{s}");
            let _ = peek(&token);
            prop_assert!(verify(&token, &jwks_of(&[es(), rsa()]), ISS, AUD, NOW).is_err());
        }

        #[test]
        fn jwks_shaped_input_never_panics(
            kty in prop_oneof![Just("RSA".to_string()), Just("EC".to_string()), "[A-Z]{0,3}"],
            crv in prop_oneof![Just("P-256".to_string()), "[A-Z0-9-]{0,6}"],
            a in b64_segment(), b in b64_segment(),
        ) {
            let doc = json!({"keys": [
                {"kty": kty, "crv": crv, "n": a, "e": b, "x": a, "y": b, "kid": "k"},
            ]});
            if let Ok(jwks) = Jwks::parse(doc.to_string().as_bytes()) {
                // A random key never verifies a real token.
                let token = es().sign_with_header(&json!({"alg": "ES256", "kid": "k"}), &claims());
                prop_assert!(verify(&token, &jwks, ISS, AUD, NOW).is_err());
                let token = rsa().sign_with_header(&json!({"alg": "RS256", "kid": "k"}), &claims());
                prop_assert!(verify(&token, &jwks, ISS, AUD, NOW).is_err());
            }
        }

        /// Any one character of a valid token changed, anywhere: the token no
        /// longer verifies. base64url decoding is canonical, so a changed
        /// character always changes the decoded bytes (or fails to decode).
        #[test]
        fn altered_token_never_verifies(
            use_rsa in any::<bool>(),
            at in any::<proptest::sample::Index>(),
            replacement in prop_oneof![
                proptest::char::range('A', 'Z'),
                proptest::char::range('a', 'z'),
                proptest::char::range('0', '9'),
                Just('-'), Just('_'), Just('.'), Just('='), Just('+'), Just('é'),
            ],
        ) {
            let issuer = if use_rsa { rsa() } else { es() };
            let token = issuer.sign(&claims());
            let jwks = jwks_of(&[issuer]);
            prop_assert!(verify(&token, &jwks, ISS, AUD, NOW).is_ok());
            let mut chars: Vec<char> = token.chars().collect();
            let i = at.index(chars.len());
            prop_assume!(chars[i] != replacement);
            chars[i] = replacement;
            let altered: String = chars.into_iter().collect();
            prop_assert!(verify(&altered, &jwks, ISS, AUD, NOW).is_err());
        }

        #[test]
        fn glob_agrees_with_reference(p in "[ab*]{0,8}", t in "[ab]{0,10}") {
            prop_assert_eq!(
                glob_match(&p, &t),
                glob_reference(p.as_bytes(), t.as_bytes()),
                "{:?} ~ {:?}", p, t
            );
        }

        #[test]
        fn base64url_round_trips_canonically(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            s in "[A-Za-z0-9_-]{0,20}",
        ) {
            let text = base64url_encode(&bytes);
            prop_assert_eq!(base64url_decode(&text, false), Some(bytes.clone()));
            prop_assert_eq!(base64url_decode(&text, true), Some(bytes));
            // Whatever decodes has exactly this one spelling.
            if let Some(decoded) = base64url_decode(&s, false) {
                prop_assert_eq!(base64url_encode(&decoded), s);
            }
        }
    }
}
