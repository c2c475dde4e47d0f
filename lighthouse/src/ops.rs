//! What an admin does to the store, the same for the command line
//! (`tern-lighthouse token ...`, `revoke`) and the admin API: each
//! operation opens the configured store, checks its input, and says what
//! it did or why not, with the kind of refusal the API answers with.

use std::path::Path;

use serde::Serialize;
use tern_lighthouse_core::admin::{ApiError, ErrorKind};
use tern_lighthouse_core::enroll::{self, EnrollStore, NewToken, TokenIdPrefix};
use tern_shared::cert::{format_unix_time, Cert, Fingerprint};
use tern_shared::config::{EnrollConfig, LighthouseConfig};
use tern_shared::duration::parse_duration;

use crate::io::{load_config, open_store};

/// Why an operation did nothing.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The input was wrong: says what and how to put it right.
    #[error("{0}")]
    Invalid(String),
    /// Nothing matches (no such token, no such certificate).
    #[error("{0}")]
    NotFound(String),
    /// The lighthouse is not set up for it (no `[enroll]`).
    #[error("{0}")]
    NotConfigured(String),
    /// The config or the store failed.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl OpError {
    /// The API's answer for it (a failure's detail stays in the log).
    pub fn to_api(&self) -> ApiError {
        match self {
            OpError::Invalid(m) => ApiError::new(ErrorKind::BadRequest, m),
            OpError::NotFound(m) => ApiError::new(ErrorKind::NotFound, m),
            OpError::NotConfigured(m) => ApiError::new(ErrorKind::Unavailable, m),
            OpError::Failed(_) => ApiError::new(
                ErrorKind::Internal,
                "the lighthouse's store failed; its log says why",
            ),
        }
    }
}

fn failed(e: impl Into<anyhow::Error>) -> OpError {
    OpError::Failed(e.into())
}

/// A token just made: the secret, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedToken {
    pub token: String,
    pub id: String,
    pub groups: Vec<String>,
    pub uses: u32,
    pub expires: u64,
    pub cert_ttl_secs: u64,
}

/// A stored token without its secret.
#[derive(Debug, Clone, Serialize)]
pub struct ListedToken {
    pub id: String,
    pub groups: Vec<String>,
    pub uses_left: u32,
    pub expires: String,
    pub created: String,
    pub cert_ttl_secs: u64,
    pub expired: bool,
    pub used_up: bool,
}

/// A certificate revoked (or found revoked already).
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    pub fingerprint: String,
    pub name: String,
    /// Until when (Unix seconds; `u64::MAX`: for good, its expiry unknown).
    pub not_after: u64,
    /// False when it was revoked already.
    pub new: bool,
}

/// A revocation in force.
#[derive(Debug, Clone, Serialize)]
pub struct ListedRevocation {
    pub version: u32,
    pub fingerprint: String,
    pub not_after: u64,
}

/// The config at `path` and its `[enroll]`, or why not: tokens live in the
/// enrollment store, and only a lighthouse with `[enroll]` takes them.
pub fn enroll_config(path: &Path) -> Result<(LighthouseConfig, EnrollConfig), OpError> {
    let config = load_config(path)?;
    let enroll = config.enroll.clone().ok_or_else(|| {
        OpError::NotConfigured(format!(
            "{} has no [enroll] section, so this lighthouse enrolls no one and takes no tokens: \
             add [enroll] with issuer_cert and issuer_key (see config/lighthouse.toml; \
             tern cert sign --issuer makes them), then restart the lighthouse or send it SIGHUP",
            path.display()
        ))
    })?;
    Ok((config, enroll))
}

/// Makes a token: checked against the issuer before anything is stored (a
/// token the issuer would refuse is refused now, not at enrollment); only
/// its hash is stored.
pub fn create_token(
    path: &Path,
    groups: &[String],
    ttl: &str,
    uses: u32,
    cert_ttl: &str,
    now: u64,
) -> Result<CreatedToken, OpError> {
    let (config, enroll) = enroll_config(path)?;
    let ttl = parse_duration(ttl).map_err(|e| OpError::Invalid(format!("ttl {ttl:?}: {e}")))?;
    let cert_ttl = parse_duration(cert_ttl)
        .map_err(|e| OpError::Invalid(format!("cert ttl {cert_ttl:?}: {e}")))?;
    if ttl.as_secs() == 0 {
        return Err(OpError::Invalid(
            "a ttl under a second would make a token nobody can use; give e.g. 1h".into(),
        ));
    }
    if cert_ttl.as_secs() == 0 {
        return Err(OpError::Invalid(
            "a cert ttl under a second would buy certificates that are never valid; give e.g. 30m"
                .into(),
        ));
    }
    if uses == 0 {
        return Err(OpError::Invalid(
            "0 uses would make a token nobody can use; give 1 or more".into(),
        ));
    }
    for g in groups {
        if !tern_shared::admin::is_group_name(g) {
            return Err(OpError::Invalid(format!(
                "groups: {g:?} is not a group name (1-64 of A-Z a-z 0-9 . _ -)"
            )));
        }
    }
    let issuer_file = &enroll.issuer_cert;
    let issuer = std::fs::read_to_string(issuer_file)
        .map_err(anyhow::Error::from)
        .and_then(|pem| Ok(Cert::from_pem(&pem)?))
        .map_err(|e| {
            failed(e.context(format!(
                "reading [enroll] issuer_cert {}",
                issuer_file.display()
            )))
        })?;
    enroll::check_token_against_issuer(&issuer, groups, cert_ttl.as_secs(), now).map_err(
        |why| {
            OpError::Invalid(format!(
                "{why} ([enroll] issuer_cert {}); no token was created",
                issuer_file.display()
            ))
        },
    )?;
    let mut store = open_store(&config, path)?;
    let token = enroll::new_token();
    let hash = tern_shared::enroll::token_hash(&token);
    let expires = now.saturating_add(ttl.as_secs());
    store
        .create_token(
            &NewToken {
                hash: hash.clone(),
                groups: groups.to_vec(),
                uses,
                expires,
                cert_ttl: cert_ttl.as_secs(),
            },
            now,
        )
        .map_err(failed)?;
    Ok(CreatedToken {
        token,
        id: enroll::token_id(&hash).to_string(),
        groups: groups.to_vec(),
        uses,
        expires,
        cert_ttl_secs: cert_ttl.as_secs(),
    })
}

/// Every stored token, without secrets, oldest first.
pub fn list_tokens(path: &Path, now: u64) -> Result<Vec<ListedToken>, OpError> {
    let (config, _) = enroll_config(path)?;
    let tokens = open_store(&config, path)?
        .list_tokens(now)
        .map_err(failed)?;
    Ok(tokens
        .into_iter()
        .map(|t| ListedToken {
            used_up: t.uses_left == 0,
            id: t.id,
            groups: t.groups,
            uses_left: t.uses_left,
            expires: format_unix_time(t.expires),
            created: format_unix_time(t.created),
            cert_ttl_secs: t.cert_ttl,
            expired: t.expired,
        })
        .collect())
}

/// Deletes the one token whose id starts with `id`; gives its whole id.
pub fn delete_token(path: &Path, id: &str) -> Result<String, OpError> {
    let (config, _) = enroll_config(path)?;
    let prefix = TokenIdPrefix::parse(id).map_err(|e| OpError::Invalid(e.to_string()))?;
    match open_store(&config, path)?
        .revoke_token(&prefix)
        .map_err(failed)?
    {
        Ok(id) => Ok(id),
        Err(refusal) => Err(OpError::NotFound(format!("{refusal}; nothing was revoked"))),
    }
}

/// Revokes by fingerprint (any certificate; one this lighthouse did not
/// issue is revoked for good, its expiry unknown) or by the name of
/// certificates this lighthouse issued (every unexpired one).
pub fn revoke(path: &Path, what: &str, now: u64) -> Result<Vec<Revoked>, OpError> {
    let config = load_config(path)?;
    let mut store = open_store(&config, path)?;
    let targets: Vec<(Fingerprint, String, u64)> = match what.parse::<Fingerprint>() {
        Ok(fp) => {
            let (name, not_after) = store
                .issued(&fp)
                .map_err(failed)?
                .unwrap_or((String::new(), u64::MAX));
            vec![(fp, name, not_after)]
        }
        Err(_) => {
            let found = store.issued_named(what, now).map_err(failed)?;
            if found.is_empty() {
                return Err(OpError::NotFound(format!(
                    "no unexpired certificate named {what:?} was issued by this lighthouse; \
                     revoke it by its fingerprint (64 hex digits; `tern cert print` shows it)"
                )));
            }
            found
                .into_iter()
                .map(|(fp, not_after)| (fp, what.to_string(), not_after))
                .collect()
        }
    };
    let mut out = Vec::new();
    for (fp, name, not_after) in targets {
        let new = store.revoke(&fp, &name, not_after, now).map_err(failed)?;
        out.push(Revoked {
            fingerprint: fp.to_string(),
            name,
            not_after,
            new,
        });
    }
    Ok(out)
}

/// The revocations in force.
pub fn list_revocations(path: &Path, now: u64) -> Result<Vec<ListedRevocation>, OpError> {
    let config = load_config(path)?;
    let list = open_store(&config, path)?
        .revocations(now)
        .map_err(failed)?;
    Ok(list
        .into_iter()
        .map(|(version, r)| ListedRevocation {
            version,
            fingerprint: r.fingerprint.to_string(),
            not_after: r.not_after,
        })
        .collect())
}

/// One record of the issuance log.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedEntry {
    pub fingerprint: String,
    pub name: String,
    pub overlay_ip: String,
    pub groups: Vec<String>,
    pub not_after: i64,
    pub expires: String,
    /// How it was bought: `token ID`, `oidc ISSUER rule N: claim=value ...`
    /// (the claims the rule matched), or a renewal.
    pub how: String,
    pub at: i64,
    pub issued: String,
    /// The id of the token that bought it.
    pub token: Option<String>,
    /// The claims of the OIDC ID token that bought it.
    pub claims: std::collections::BTreeMap<String, String>,
}

impl IssuedEntry {
    /// As a node's enrollment in the admin API.
    pub fn enrollment(&self) -> tern_lighthouse_core::admin::NodeEnrollment {
        tern_lighthouse_core::admin::NodeEnrollment {
            issued: self.issued.clone(),
            how: self.how.clone(),
            token: self.token.clone(),
            claims: self.claims.clone(),
        }
    }
}

/// A page of the issuance log, newest first; `next` is the `after` of the
/// following page.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedPage {
    pub items: Vec<IssuedEntry>,
    pub next: Option<String>,
}

/// At most `limit` records of the issuance log older than `after`.
pub fn issued_page(
    path: &Path,
    after: Option<&(i64, String)>,
    limit: usize,
) -> Result<IssuedPage, OpError> {
    let config = load_config(path)?;
    let mut store = open_store(&config, path)?;
    let records = store
        .issued_page(after.map(|(a, f)| (*a, f.as_str())), limit)
        .map_err(failed)?;
    let next = (records.len() == limit)
        .then(|| {
            records
                .last()
                .map(|r| format!("{}:{}", r.at, r.fingerprint))
        })
        .flatten();
    Ok(IssuedPage {
        items: records.into_iter().map(issued_entry).collect(),
        next,
    })
}

fn issued_entry(r: crate::store::IssuedRecord) -> IssuedEntry {
    let time = |t: i64| format_unix_time(t.max(0) as u64);
    IssuedEntry {
        expires: time(r.not_after),
        issued: time(r.at),
        groups: r
            .groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
        fingerprint: r.fingerprint,
        name: r.name,
        overlay_ip: r.ip,
        not_after: r.not_after,
        how: r.how,
        at: r.at,
        token: Some(r.token).filter(|t| !t.is_empty()),
        claims: tern_lighthouse_core::enroll::Issuance::claims_from_json(&r.claims),
    }
}

/// The issuance records of these certificates (those this mesh issued).
pub fn issued_records(path: &Path, fingerprints: &[String]) -> Result<Vec<IssuedEntry>, OpError> {
    if fingerprints.is_empty() {
        return Ok(Vec::new());
    }
    let config = load_config(path)?;
    let mut store = open_store(&config, path)?;
    Ok(store
        .issued_records(fingerprints)
        .map_err(failed)?
        .into_iter()
        .map(issued_entry)
        .collect())
}

/// The issuance record of one certificate, if this mesh issued it.
pub fn issued_record(path: &Path, fingerprint: &str) -> Result<Option<IssuedEntry>, OpError> {
    let config = load_config(path)?;
    let mut store = open_store(&config, path)?;
    Ok(store
        .issued_record(fingerprint)
        .map_err(failed)?
        .map(issued_entry))
}

/// How many certificates were issued at or after `since` (Unix seconds).
pub fn issued_since(path: &Path, since: i64) -> Result<u64, OpError> {
    let config = load_config(path)?;
    let mut store = open_store(&config, path)?;
    store.issued_since(since).map_err(failed)
}

/// Flow records the store holds, newest first, each with how its caller
/// enrolled; and the nodes that dropped records (their count).
pub fn flows(
    path: &Path,
    query: &tern_lighthouse_core::flows::FlowQuery,
) -> Result<
    (
        Vec<tern_shared::flows::FlowView>,
        Vec<crate::store::FlowSource>,
    ),
    OpError,
> {
    let config = load_config(path)?;
    let mut store = open_store(&config, path)?;
    let now_ms = tern_udp::daemon::unix_now().saturating_mul(1000);
    let found = store.flows(query, now_ms).map_err(failed)?;
    let sources = store.flow_sources().map_err(failed)?;
    Ok((found.iter().map(|f| f.view()).collect(), sources))
}
