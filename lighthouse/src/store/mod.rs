//! The lighthouse's lasting enrollment state behind one trait
//! ([`tern_lighthouse_core::enroll::EnrollStore`]): in a SQLite file
//! ([`SqliteStore`], one lighthouse, no setup) or in PostgreSQL
//! ([`PostgresStore`], shared by several lighthouses). Both pass the same
//! test suite (`suite.rs`).

mod copy;
mod flows;
mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use self::copy::{IssuedRecord, StoreDump};
pub use self::flows::{enrollment_summary, FlowSource, StoredFlow};
pub use self::postgres::{PostgresStore, RevocationListener};
pub use self::sqlite::SqliteStore;

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use tern_lighthouse_core::enroll::{
    EnrollStore, Grant, Issuance, NewToken, TokenIdPrefix, TokenInfo, TokenRefusal,
    TokenRevokeRefusal,
};
use tern_shared::cert::{Cert, Fingerprint};
use tern_shared::control::Revocation;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("enrollment store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Shown with its causes (the client's own text for a server's error
    /// is only "db error").
    #[error("enrollment store (PostgreSQL): {}", with_causes(.0))]
    Postgres(::postgres::Error),
    #[error("TLS to the store's database: {0}")]
    Tls(String),
    #[error("enrollment store unavailable: {0}")]
    Unavailable(String),
    #[error("the store's schema is version {found}, newer than this lighthouse knows ({known}); run the newer tern-lighthouse, or restore the store from before the upgrade")]
    TooNew { found: usize, known: usize },
    #[error("the store to copy into is not empty (it holds {0}); copy only into a new store, so that no lighthouse's state is merged or overwritten")]
    NotEmpty(String),
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> StoreError {
        StoreError::Postgres(e)
    }
}

/// An error and every cause under it, joined by ": ".
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A stored token: groups, uses left, expiry, certificate lifetime.
pub(super) type TokenRow = (String, i64, i64, i64);

/// What a token would buy at `now`, from its row (none: unknown).
pub(super) fn token_verdict(row: Option<TokenRow>, now: u64) -> Result<Grant, TokenRefusal> {
    match row {
        None => Err(TokenRefusal::Unknown),
        Some((_, _, expires, _)) if expires <= stored_time(now) => Err(TokenRefusal::Expired),
        Some((_, uses_left, _, _)) if uses_left <= 0 => Err(TokenRefusal::UsedUp),
        Some((groups, _, _, ttl)) => Ok(grant_of(&groups, ttl)),
    }
}

/// Why a use of the token failed, from its row read after: unknown,
/// expired, or (spent meanwhile) used up.
pub(super) fn refusal_after_failed_use(row: Option<TokenRow>, now: u64) -> TokenRefusal {
    token_verdict(row, now)
        .err()
        .unwrap_or(TokenRefusal::UsedUp)
}

/// A token's grant, from its stored groups and lifetime.
pub(super) fn grant_of(groups: &str, cert_ttl: i64) -> Grant {
    Grant {
        groups: groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
        cert_ttl: cert_ttl.max(0) as u64,
    }
}

/// The steps of [`EnrollStore::use_token_for`], for a store to run inside
/// one transaction of its own.
pub(super) fn use_token_then_record<S: EnrollStore<Error = StoreError>>(
    s: &mut S,
    hash: &str,
    cert: &Cert,
    how: &Issuance,
    now: u64,
) -> Result<Result<Grant, TokenRefusal>, StoreError> {
    let used = s.use_token(hash, now)?;
    if used.is_ok() {
        s.record_issued(cert, how, now)?;
    }
    Ok(used)
}

/// The steps of [`EnrollStore::use_oidc_token_for`], likewise.
pub(super) fn use_oidc_token_then_record<S: EnrollStore<Error = StoreError>>(
    s: &mut S,
    id: &str,
    until: u64,
    cert: &Cert,
    how: &Issuance,
    now: u64,
) -> Result<bool, StoreError> {
    let fresh = s.use_oidc_token(id, until, now)?;
    if fresh {
        s.record_issued(cert, how, now)?;
    }
    Ok(fresh)
}

/// Stored times are signed 64-bit; "forever" is stored as i64::MAX.
pub(super) fn stored_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// The store a lighthouse was configured with.
pub enum AnyStore {
    Sqlite(SqliteStore),
    /// Boxed: its client and configuration are large beside SQLite's handle.
    Postgres(Box<PostgresStore>),
}

/// Opens the store at `location`; a PostgreSQL password comes from
/// `password_file`, else `TERN_STORE_PASSWORD` (never the URL).
pub fn open(
    location: &tern_shared::store::StoreLocation,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<AnyStore> {
    open_with(location, password_file, false)
}

/// Whether [`open_with`] may return a PostgreSQL store whose database
/// cannot be reached yet (it connects at its first use that can).
type MayWait = bool;

fn open_with(
    location: &tern_shared::store::StoreLocation,
    password_file: Option<&std::path::Path>,
    may_wait: MayWait,
) -> anyhow::Result<AnyStore> {
    use anyhow::Context;
    use tern_shared::store::{StoreLocation, PASSWORD_ENV};
    match location {
        StoreLocation::Sqlite(path) => Ok(AnyStore::Sqlite(
            SqliteStore::open(path)
                .with_context(|| format!("opening the store {}", path.display()))?,
        )),
        StoreLocation::Postgres(url) => {
            let password = match password_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading [store] password_file {}", f.display()))?
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                ),
                None => std::env::var(PASSWORD_ENV).ok(),
            };
            let store = if may_wait {
                PostgresStore::connect_or_wait(url, password.as_deref())
            } else {
                PostgresStore::connect(url, password.as_deref())
            };
            Ok(AnyStore::Postgres(Box::new(store.with_context(|| {
                format!("connecting to the store {url}")
            })?)))
        }
    }
}

/// The running lighthouse's [`open`], on a thread of its own: PostgreSQL's
/// synchronous client runs a runtime of its own, which it cannot start on
/// a thread that drives the lighthouse's. The store is then used from
/// threads without one (the enrollment worker, the revocation watcher). A
/// database that cannot be reached yet is no error here: the lighthouse
/// starts (registrations, lookups and relaying need no store) and refuses
/// enrollments as "store unavailable" until the database answers. One that
/// answers and refuses (a wrong password, no such database) is.
pub fn open_off_runtime(
    location: &tern_shared::store::StoreLocation,
    password_file: Option<&std::path::Path>,
) -> anyhow::Result<AnyStore> {
    let (location, password_file) = (location.clone(), password_file.map(|p| p.to_path_buf()));
    std::thread::spawn(move || open_with(&location, password_file.as_deref(), true))
        .join()
        .map_err(|_| anyhow::anyhow!("opening the store: its thread panicked"))?
}

impl From<SqliteStore> for AnyStore {
    fn from(s: SqliteStore) -> AnyStore {
        AnyStore::Sqlite(s)
    }
}

impl From<PostgresStore> for AnyStore {
    fn from(s: PostgresStore) -> AnyStore {
        AnyStore::Postgres(Box::new(s))
    }
}

impl AnyStore {
    /// For a database: a connection that hears revocations the moment any
    /// lighthouse makes one. SQLite has none (its file is looked at).
    pub fn listen_for_revocations(&self) -> Option<Result<RevocationListener, StoreError>> {
        match self {
            AnyStore::Sqlite(_) => None,
            AnyStore::Postgres(s) => Some(s.listen_for_revocations()),
        }
    }

    /// The schema's version when the store was opened and now.
    pub fn migrated(&self) -> Option<(usize, usize)> {
        match self {
            AnyStore::Sqlite(s) => Some(s.migrated()),
            AnyStore::Postgres(s) => s.migrated(),
        }
    }

    /// At most `limit` issuance records older than `before` (at,
    /// fingerprint), newest first: the admin API's issuance log, a page at
    /// a time.
    pub fn issued_page(
        &mut self,
        before: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<IssuedRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.issued_page(before, limit),
            AnyStore::Postgres(s) => s.issued_page(before, limit),
        }
    }

    /// The issuance records of these certificates (a page of nodes').
    pub fn issued_records(
        &mut self,
        fingerprints: &[String],
    ) -> Result<Vec<IssuedRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.issued_records(fingerprints),
            AnyStore::Postgres(s) => s.issued_records(fingerprints),
        }
    }

    /// How many certificates were issued at or after `since` (Unix
    /// seconds): the console's enrollments in the last hour.
    pub fn issued_since(&mut self, since: i64) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.issued_since(since),
            AnyStore::Postgres(s) => s.issued_since(since),
        }
    }

    /// The issuance record of one certificate, if this mesh issued it.
    pub fn issued_record(&mut self, fingerprint: &str) -> Result<Option<IssuedRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.issued_record(fingerprint),
            AnyStore::Postgres(s) => s.issued_record(fingerprint),
        }
    }

    /// A cheap number that changes whenever a revocation was added (by
    /// this lighthouse, another one, or `tern-lighthouse revoke`).
    pub fn revocations_changed_token(&mut self) -> Result<i64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.data_version(),
            AnyStore::Postgres(s) => s.revocations_version(),
        }
    }
}

/// Every call goes to the store configured.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call,
            AnyStore::Postgres($s) => $call,
        }
    };
}

impl EnrollStore for AnyStore {
    type Error = StoreError;

    fn create_token(&mut self, token: &NewToken, now: u64) -> Result<(), StoreError> {
        delegate!(self, s => s.create_token(token, now))
    }

    fn peek_token(
        &mut self,
        hash: &str,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
        delegate!(self, s => s.peek_token(hash, now))
    }

    fn use_token(
        &mut self,
        hash: &str,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
        delegate!(self, s => s.use_token(hash, now))
    }

    fn lease(
        &mut self,
        pool: &[Ipv4Net],
        name: &str,
        until: u64,
        now: u64,
    ) -> Result<Option<Ipv4Addr>, StoreError> {
        delegate!(self, s => s.lease(pool, name, until, now))
    }

    fn use_token_for(
        &mut self,
        hash: &str,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
        delegate!(self, s => s.use_token_for(hash, cert, how, now))
    }

    fn use_oidc_token_for(
        &mut self,
        id: &str,
        until: u64,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.use_oidc_token_for(id, until, cert, how, now))
    }

    fn release_lease(&mut self, ip: Ipv4Addr, name: &str) -> Result<(), StoreError> {
        delegate!(self, s => s.release_lease(ip, name))
    }

    fn renew_for(
        &mut self,
        ip: Ipv4Addr,
        name: &str,
        until: u64,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.renew_for(ip, name, until, cert, how, now))
    }

    fn record_issued(&mut self, cert: &Cert, how: &Issuance, now: u64) -> Result<(), StoreError> {
        delegate!(self, s => s.record_issued(cert, how, now))
    }

    fn oidc_token_used(&mut self, id: &str, now: u64) -> Result<bool, StoreError> {
        delegate!(self, s => s.oidc_token_used(id, now))
    }

    fn use_oidc_token(&mut self, id: &str, until: u64, now: u64) -> Result<bool, StoreError> {
        delegate!(self, s => s.use_oidc_token(id, until, now))
    }

    fn issued_named(
        &mut self,
        name: &str,
        now: u64,
    ) -> Result<Vec<(Fingerprint, u64)>, StoreError> {
        delegate!(self, s => s.issued_named(name, now))
    }

    fn issued(&mut self, fingerprint: &Fingerprint) -> Result<Option<(String, u64)>, StoreError> {
        delegate!(self, s => s.issued(fingerprint))
    }

    fn revoke(
        &mut self,
        fingerprint: &Fingerprint,
        name: &str,
        not_after: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.revoke(fingerprint, name, not_after, now))
    }

    fn revocations(&mut self, now: u64) -> Result<Vec<(u32, Revocation)>, StoreError> {
        delegate!(self, s => s.revocations(now))
    }

    fn list_tokens(&mut self, now: u64) -> Result<Vec<TokenInfo>, StoreError> {
        delegate!(self, s => s.list_tokens(now))
    }

    fn revoke_token(
        &mut self,
        id: &TokenIdPrefix,
    ) -> Result<Result<String, TokenRevokeRefusal>, StoreError> {
        delegate!(self, s => s.revoke_token(id))
    }
}
