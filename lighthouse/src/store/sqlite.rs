//! The enrollment state in a SQLite file:
//! [`SqliteStore`] implements [`EnrollStore`] (token hashes and their uses,
//! leased addresses, issued certificates, used OIDC tokens, revocations).

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use tern_lighthouse_core::enroll::{
    token_id, EnrollStore, Grant, HostRanges, Issuance, NewToken, TokenIdPrefix, TokenInfo,
    TokenRefusal, TokenRevokeRefusal, TOKEN_ID_LEN,
};
use tern_shared::cert::{Cert, Fingerprint};
use tern_shared::control::Revocation;

use super::{grant_of, refusal_after_failed_use, stored_time, token_verdict, StoreError, TokenRow};

/// [`EnrollStore`] in a SQLite file (WAL, so `tern-lighthouse token create`
/// can write while the daemon runs).
pub struct SqliteStore {
    pub(super) db: rusqlite::Connection,
    migrated: (usize, usize),
}

/// How long [`SqliteStore::open`] keeps trying while another process (the
/// running lighthouse, a `token create`) holds the file's lock.
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl SqliteStore {
    /// Opens (or creates) the store. Switching a new file to WAL and
    /// creating the tables need a lock that SQLite's busy timeout does not
    /// always wait for: when the lighthouse and `token create` open a new
    /// store at once, one of them is told "database is locked" at once. It
    /// tries again, for up to 10 s.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let deadline = std::time::Instant::now() + OPEN_PATIENCE;
        loop {
            match Self::open_once(path) {
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<SqliteStore, StoreError> {
        let mut db = rusqlite::Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // In WAL mode NORMAL syncs at checkpoints, not at every commit: a
        // crash of the lighthouse loses nothing, a power cut at most the
        // last moments' commits. Full syncs made every enrollment wait for
        // three disk flushes on the lighthouse's one store.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let migrated = migrate(&mut db)?;
        Ok(SqliteStore { db, migrated })
    }

    /// The schema's version when the store was opened, and now (after the
    /// migrations it lacked).
    pub fn migrated(&self) -> (usize, usize) {
        self.migrated
    }

    /// At most `limit` issuance records older than `before` (at,
    /// fingerprint), newest first.
    pub fn issued_page(
        &mut self,
        before: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<super::copy::IssuedRecord>, StoreError> {
        let (at, fp) = before.unwrap_or((i64::MAX, ""));
        let mut q = self.db.prepare_cached(
            "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued
             WHERE at < ?1 OR (at = ?1 AND fingerprint < ?2)
             ORDER BY at DESC, fingerprint DESC LIMIT ?3",
        )?;
        let rows = q.query_map(
            rusqlite::params![at, fp, limit as i64],
            super::copy::IssuedRecord::from_sqlite,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    /// The issuance records of these certificates.
    pub fn issued_records(
        &mut self,
        fingerprints: &[String],
    ) -> Result<Vec<super::copy::IssuedRecord>, StoreError> {
        let mut found = Vec::new();
        // SQLite takes at most 32,766 parameters; a page has at most 1,000.
        for chunk in fingerprints.chunks(1000) {
            let marks = vec!["?"; chunk.len()].join(",");
            let mut q = self.db.prepare(&format!(
                "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued
                 WHERE fingerprint IN ({marks})"
            ))?;
            let rows = q.query_map(
                rusqlite::params_from_iter(chunk.iter()),
                super::copy::IssuedRecord::from_sqlite,
            )?;
            for r in rows {
                found.push(r?);
            }
        }
        Ok(found)
    }

    /// How many certificates were issued at or after `since` (Unix seconds).
    pub fn issued_since(&mut self, since: i64) -> Result<u64, StoreError> {
        let n: i64 = self
            .db
            .prepare_cached("SELECT count(*) FROM issued WHERE at >= ?1")?
            .query_row([since], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// The issuance record of the certificate with this fingerprint.
    pub fn issued_record(
        &mut self,
        fingerprint: &str,
    ) -> Result<Option<super::copy::IssuedRecord>, StoreError> {
        let mut q = self.db.prepare_cached(
            "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued
             WHERE fingerprint = ?1",
        )?;
        let mut rows = q.query_map([fingerprint], super::copy::IssuedRecord::from_sqlite)?;
        Ok(rows.next().transpose()?)
    }
}

/// The schema's versions, each applied once, in order (the version is the
/// file's `user_version`). The first is the schema before versions were
/// kept, written so that it also applies to a store made then.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tokens (
         hash TEXT PRIMARY KEY, groups TEXT NOT NULL, uses_left INTEGER NOT NULL,
         expires INTEGER NOT NULL, cert_ttl INTEGER NOT NULL, created INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS leases (
         ip TEXT PRIMARY KEY, name TEXT NOT NULL, until INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS issued (
         fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, ip TEXT NOT NULL,
         groups TEXT NOT NULL, not_after INTEGER NOT NULL, how TEXT NOT NULL,
         at INTEGER NOT NULL);
     CREATE INDEX IF NOT EXISTS issued_by_name ON issued (name);
     CREATE TABLE IF NOT EXISTS oidc_used (id TEXT PRIMARY KEY, until INTEGER NOT NULL);
     CREATE INDEX IF NOT EXISTS oidc_used_until ON oidc_used (until);
     CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS revocations (
         version INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL UNIQUE,
         name TEXT NOT NULL, not_after INTEGER NOT NULL, at INTEGER NOT NULL);",
    // 2: which token bought a certificate, and the OIDC claims; the
    // issuance log read newest first without a sort.
    "ALTER TABLE issued ADD COLUMN token TEXT NOT NULL DEFAULT '';
     ALTER TABLE issued ADD COLUMN claims TEXT NOT NULL DEFAULT '{}';
     CREATE INDEX IF NOT EXISTS issued_by_time ON issued (at, fingerprint);",
    // 3: flow records nodes send (`flows.rs`), once per node and sequence
    // number; which nodes dropped how many.
    "CREATE TABLE IF NOT EXISTS flows (
         id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, node_fingerprint TEXT NOT NULL,
         seq INTEGER NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
         caller TEXT NOT NULL, fingerprint TEXT NOT NULL, groups TEXT NOT NULL,
         src INTEGER NOT NULL, src_port INTEGER NOT NULL, dst INTEGER NOT NULL,
         dst_port INTEGER NOT NULL, dst_port_last INTEGER NOT NULL, proto INTEGER NOT NULL,
         allowed INTEGER NOT NULL, rule INTEGER, reason TEXT NOT NULL,
         bytes_in INTEGER NOT NULL, packets_in INTEGER NOT NULL,
         bytes_out INTEGER NOT NULL, packets_out INTEGER NOT NULL,
         UNIQUE (node, seq));
     CREATE INDEX IF NOT EXISTS flows_by_end ON flows (end_ms);
     CREATE INDEX IF NOT EXISTS flows_by_caller ON flows (fingerprint, end_ms);
     CREATE INDEX IF NOT EXISTS flows_by_name ON flows (caller, end_ms);
     CREATE TABLE IF NOT EXISTS flow_sources (
         node TEXT PRIMARY KEY, node_fingerprint TEXT NOT NULL,
         dropped INTEGER NOT NULL, seen INTEGER NOT NULL);",
];

/// Applies the migrations the file lacks, in one transaction that holds the
/// write lock (two processes opening a new store take turns); the version
/// before and after.
fn migrate(db: &mut rusqlite::Connection) -> Result<(usize, usize), StoreError> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let found = usize::try_from(found).unwrap_or(0);
    if found > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found,
            known: MIGRATIONS.len(),
        });
    }
    for sql in &MIGRATIONS[found..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()?;
    Ok((found, MIGRATIONS.len()))
}

impl EnrollStore for SqliteStore {
    type Error = StoreError;

    fn create_token(&mut self, t: &NewToken, now: u64) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO tokens (hash, groups, uses_left, expires, cert_ttl, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![t.hash, t.groups.join(","), t.uses, t.expires as i64, t.cert_ttl as i64, now as i64],
        )?;
        Ok(())
    }

    fn peek_token(
        &mut self,
        hash: &str,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
        Ok(token_verdict(self.token_row(hash)?, now))
    }

    fn use_token(
        &mut self,
        hash: &str,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
        // One statement: the decrement and the check are one atomic step.
        let used = self.db.prepare_cached(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1 AND uses_left > 0 AND expires > ?2",
        )?.execute(rusqlite::params![hash, now as i64])?;
        let row = self.token_row(hash)?;
        Ok(match (used, row) {
            (1, Some((groups, _, _, ttl))) => Ok(grant_of(&groups, ttl)),
            (_, row) => Err(refusal_after_failed_use(row, now)),
        })
    }

    fn lease(
        &mut self,
        pool: &[Ipv4Net],
        name: &str,
        until: u64,
        now: u64,
    ) -> Result<Option<Ipv4Addr>, StoreError> {
        // Round robin from the address leased last: each probe is one
        // lookup by key, the addresses free soonest (leased longest ago)
        // come first, and a returned address waits as long as possible
        // before it is handed out again. Immediate: the write lock is taken
        // (waiting out others) before the probes read, so two lighthouses or
        // threads leasing at once wait for each other instead of failing.
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let cursor: Option<Ipv4Addr> = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'lease_cursor'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?
            .and_then(|text| text.parse().ok());
        let hosts = HostRanges::of(pool);
        let total = hosts.total();
        let start = cursor.and_then(|c| hosts.index_of(c)).map_or(0, |i| i + 1);
        let mut found = None;
        for ip in (0..total).filter_map(|i| hosts.at((start + i) % total.max(1))) {
            let taken: Option<i64> = tx
                .prepare_cached("SELECT until FROM leases WHERE ip = ?1")?
                .query_row([ip.to_string()], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            if taken.is_none_or(|u| u <= stored_time(now)) {
                tx.execute(
                    "INSERT OR REPLACE INTO leases (ip, name, until) VALUES (?1, ?2, ?3)",
                    rusqlite::params![ip.to_string(), name, stored_time(until)],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('lease_cursor', ?1)",
                    [ip.to_string()],
                )?;
                found = Some(ip);
                break;
            }
        }
        tx.commit()?;
        Ok(found)
    }

    fn use_token_for(
        &mut self,
        hash: &str,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
        self.atomically(|s| super::use_token_then_record(s, hash, cert, how, now))
    }

    fn use_oidc_token_for(
        &mut self,
        id: &str,
        until: u64,
        cert: &Cert,
        how: &Issuance,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.atomically(|s| super::use_oidc_token_then_record(s, id, until, cert, how, now))
    }

    fn release_lease(&mut self, ip: Ipv4Addr, name: &str) -> Result<(), StoreError> {
        self.db
            .prepare_cached("DELETE FROM leases WHERE ip = ?1 AND name = ?2")?
            .execute(rusqlite::params![ip.to_string(), name])?;
        Ok(())
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
        self.atomically(|s| {
            let held = s.db.execute(
                "INSERT INTO leases (ip, name, until) VALUES (?1, ?2, ?3)
                 ON CONFLICT (ip) DO UPDATE SET name = excluded.name, until = max(leases.until, excluded.until)
                 WHERE leases.name = excluded.name OR leases.until <= ?4",
                rusqlite::params![ip.to_string(), name, stored_time(until), stored_time(now)],
            )? == 1;
            if held {
                s.record_issued(cert, how, now)?;
            }
            Ok(held)
        })
    }

    fn record_issued(&mut self, cert: &Cert, how: &Issuance, now: u64) -> Result<(), StoreError> {
        let b = &cert.body;
        self.db.execute(
            "INSERT OR REPLACE INTO issued (fingerprint, name, ip, groups, not_after, how, at, token, claims) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                cert.fingerprint().to_string(),
                b.name,
                b.ips.first().map(|n| n.to_string()).unwrap_or_default(),
                b.groups.join(","),
                b.not_after as i64,
                how.how,
                now as i64,
                how.token.as_deref().unwrap_or(""),
                how.claims_json()
            ],
        )?;
        Ok(())
    }

    fn oidc_token_used(&mut self, id: &str, now: u64) -> Result<bool, StoreError> {
        Ok(Self::optional(self.db.query_row(
            "SELECT 1 FROM oidc_used WHERE id = ?1 AND until >= ?2",
            rusqlite::params![id, stored_time(now)],
            |_| Ok(()),
        ))?
        .is_some())
    }

    fn use_oidc_token(&mut self, id: &str, until: u64, now: u64) -> Result<bool, StoreError> {
        self.db
            .prepare_cached("DELETE FROM oidc_used WHERE until < ?1")?
            .execute([stored_time(now)])?;
        let added = self
            .db
            .prepare_cached("INSERT OR IGNORE INTO oidc_used (id, until) VALUES (?1, ?2)")?
            .execute(rusqlite::params![id, stored_time(until)])?;
        Ok(added == 1)
    }

    fn issued_named(
        &mut self,
        name: &str,
        now: u64,
    ) -> Result<Vec<(Fingerprint, u64)>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT fingerprint, not_after FROM issued WHERE name = ?1 AND not_after >= ?2",
        )?;
        let rows = stmt.query_map(rusqlite::params![name, stored_time(now)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (fp, not_after) = row?;
            if let Some(fp) = parse_fingerprint(&fp) {
                out.push((fp, not_after.max(0) as u64));
            }
        }
        Ok(out)
    }

    fn issued(&mut self, fingerprint: &Fingerprint) -> Result<Option<(String, u64)>, StoreError> {
        Self::optional(self.db.query_row(
            "SELECT name, not_after FROM issued WHERE fingerprint = ?1",
            [fingerprint.to_string()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)),
        ))
    }

    fn revoke(
        &mut self,
        fingerprint: &Fingerprint,
        name: &str,
        not_after: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let added = self.db.execute(
            "INSERT OR IGNORE INTO revocations (fingerprint, name, not_after, at) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![fingerprint.to_string(), name, stored_time(not_after), stored_time(now)],
        )?;
        Ok(added == 1)
    }

    fn revocations(&mut self, now: u64) -> Result<Vec<(u32, Revocation)>, StoreError> {
        let mut stmt = self.db.prepare_cached(
            "SELECT version, fingerprint, not_after FROM revocations WHERE not_after >= ?1 ORDER BY version",
        )?;
        let rows = stmt.query_map([stored_time(now)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (version, fp, not_after) = row?;
            let (Ok(version), Some(fingerprint)) = (u32::try_from(version), parse_fingerprint(&fp))
            else {
                continue;
            };
            out.push((
                version,
                Revocation {
                    fingerprint,
                    not_after: not_after.max(0) as u64,
                },
            ));
        }
        Ok(out)
    }

    fn list_tokens(&mut self, now: u64) -> Result<Vec<TokenInfo>, StoreError> {
        // The id is cut in the query: the rest of the hash never leaves it.
        // Tokens made in the same second come in the order they were made.
        let mut stmt = self.db.prepare_cached(
            "SELECT substr(hash, 1, ?1), groups, uses_left, expires, created, cert_ttl FROM tokens ORDER BY created, rowid",
        )?;
        let rows = stmt.query_map([TOKEN_ID_LEN as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, groups, uses_left, expires, created, cert_ttl) = row?;
            let grant = grant_of(&groups, cert_ttl);
            out.push(TokenInfo {
                id,
                groups: grant.groups,
                uses_left: u32::try_from(uses_left.max(0)).unwrap_or(u32::MAX),
                expires: expires.max(0) as u64,
                created: created.max(0) as u64,
                cert_ttl: grant.cert_ttl,
                expired: expires <= stored_time(now),
            });
        }
        Ok(out)
    }

    fn revoke_token(
        &mut self,
        id: &TokenIdPrefix,
    ) -> Result<Result<String, TokenRevokeRefusal>, StoreError> {
        // Immediate: no token made meanwhile can turn a unique prefix into
        // an ambiguous one between the look and the delete.
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let prefix = id.as_str();
        let matching: Vec<String> = {
            let mut stmt =
                tx.prepare("SELECT hash FROM tokens WHERE substr(hash, 1, ?1) = ?2 LIMIT 2")?;
            let rows =
                stmt.query_map(rusqlite::params![prefix.len() as i64, prefix], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let hash = match matching.as_slice() {
            [] => return Ok(Err(TokenRevokeRefusal::Unknown(prefix.to_string()))),
            [one] => one.clone(),
            _ => {
                let count: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM tokens WHERE substr(hash, 1, ?1) = ?2",
                    rusqlite::params![prefix.len() as i64, prefix],
                    |r| r.get(0),
                )?;
                return Ok(Err(TokenRevokeRefusal::Ambiguous {
                    id: prefix.to_string(),
                    count: usize::try_from(count).unwrap_or(usize::MAX),
                }));
            }
        };
        tx.execute("DELETE FROM tokens WHERE hash = ?1", [&hash])?;
        tx.commit()?;
        Ok(Ok(token_id(&hash).to_string()))
    }
}

impl SqliteStore {
    /// `f` in one transaction: all it wrote, or (it failed) nothing.
    fn atomically<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.db.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// A cheap token that changes whenever another connection (the
    /// `tern-lighthouse revoke` command) wrote to the database.
    pub fn data_version(&mut self) -> Result<i64, StoreError> {
        Ok(self.db.query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// A token's groups, uses left, expiry and certificate lifetime.
    fn token_row(&mut self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        Self::optional(
            self.db
                .prepare_cached(
                    "SELECT groups, uses_left, expires, cert_ttl FROM tokens WHERE hash = ?1",
                )?
                .query_row([hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))),
        )
    }

    fn optional<T>(r: rusqlite::Result<T>) -> Result<Option<T>, StoreError> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn parse_fingerprint(text: &str) -> Option<Fingerprint> {
    text.parse().ok()
}

#[cfg(test)]
mod suite_tests {
    use super::*;

    /// A fresh SQLite file; each connection opens it anew.
    struct SqliteBackend {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    impl SqliteBackend {
        fn new() -> Option<SqliteBackend> {
            let dir = tempfile::tempdir().ok()?;
            let path = dir.path().join("store.db");
            Some(SqliteBackend { _dir: dir, path })
        }
    }

    impl crate::store::suite::Backend for SqliteBackend {
        type Store = SqliteStore;
        fn connect(&self) -> SqliteStore {
            SqliteStore::open(&self.path).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    crate::store::suite::store_suite!(SqliteBackend::new());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_lighthouse_core::enroll::*;
    use tern_lighthouse_core::oidc::Jwks;
    use tern_shared::cert;
    use tern_shared::config::OidcProviderConfig;
    use tern_shared::enroll::{token_hash, EnrollRequest};
    use tern_shared::testing::{TestCa, TEST_NOW};

    fn setup() -> (Enroller, SqliteStore, tempfile::TempDir, TestCa) {
        setup_with("ci-", "100.64.100.0/30")
    }

    /// An issuer with this name prefix and pool.
    fn setup_with(prefix: &str, pool: &str) -> (Enroller, SqliteStore, tempfile::TempDir, TestCa) {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci", "deploy", "db"]);
        let issuer = ca.issuer("lh-issuer", pool, &["ci", "deploy"], prefix, 3600);
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("lh.db")).unwrap();
        let enroller = Enroller::new(issuer.cert, issuer.key, 10).unwrap();
        (enroller, store, dir, ca)
    }

    fn request(token: &str, key: u8) -> EnrollRequest {
        EnrollRequest {
            token: Some(token.into()),
            oidc: None,
            public_key: [key; 32],
            name_hint: Some("build 7!".into()),
        }
    }

    fn token(store: &mut SqliteStore, groups: &[&str], uses: u32, ttl: u64) -> String {
        let t = new_token();
        store
            .create_token(
                &NewToken {
                    hash: token_hash(&t),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                    uses,
                    expires: TEST_NOW + 86_400,
                    cert_ttl: ttl,
                },
                TEST_NOW,
            )
            .unwrap();
        t
    }

    #[test]
    fn a_version_one_store_gains_the_token_and_claims_of_its_issuance_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch(MIGRATIONS[0]).unwrap();
            db.pragma_update(None, "user_version", 1).unwrap();
            db.execute(
                "INSERT INTO issued (fingerprint, name, ip, groups, not_after, how, at) VALUES ('ab', 'ci-1', '100.64.100.1/10', 'ci', 9, 'token', 5)",
                [],
            )
            .unwrap();
        }
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.migrated(), (1, MIGRATIONS.len()));
        let old = store.issued_record("ab").unwrap().unwrap();
        assert_eq!(
            (old.how.as_str(), old.token.as_str(), old.claims.as_str()),
            ("token", "", "{}")
        );
        // A new record keeps which token, and the claims.
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let n = ca.node("ci-2", "100.64.100.2/10", &["ci"], &[], 600);
        let how = Issuance {
            how: "oidc https://issuer rule 0: repository=acme/app".into(),
            token: None,
            claims: [("repository".to_string(), "acme/app".to_string())].into(),
        };
        store.record_issued(&n.cert, &how, 7).unwrap();
        let fp = n.cert.fingerprint().to_string();
        let got = store
            .issued_records(&[fp.clone(), "ab".into(), "none".into()])
            .unwrap();
        assert_eq!(got.len(), 2);
        let new = got.iter().find(|r| r.fingerprint == fp).unwrap();
        assert_eq!(Issuance::claims_from_json(&new.claims), how.claims);
        assert_eq!(store.issued_since(6).unwrap(), 1);
    }

    #[test]
    fn processes_opening_a_new_store_at_once_all_get_it() {
        // The lighthouse and `token create` start together on a fresh file.
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("race-{round}.db"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteStore::open(&path)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            for o in openers {
                assert_eq!(o.join().unwrap(), Ok(()));
            }
        }
    }

    #[test]
    fn a_token_buys_one_certificate_that_peers_verify() {
        let (enroller, mut store, _dir, ca) = setup();
        let t = token(&mut store, &["ci"], 1, 1800);
        let reply = enroller.enroll(&request(&t, 1), &mut store, TEST_NOW);
        let cert = Cert::from_pem(reply.cert.as_deref().unwrap()).unwrap();
        let v = ca.pool().verify(&cert, TEST_NOW + 10).unwrap();
        assert!(v.name().starts_with("ci-build7-"), "{}", v.name());
        assert_eq!(v.groups(), ["ci"]);
        assert_eq!(v.overlay_net().to_string(), "100.64.100.1/10");
        assert_eq!(v.not_after(), TEST_NOW + 1800);
        assert_eq!(v.issued_by(), Some("lh-issuer"));
        // Used up: the second use is refused, saying so.
        let again = enroller.enroll(&request(&t, 2), &mut store, TEST_NOW);
        assert!(again.cert.is_none());
        assert!(again.refused.unwrap().contains("used up"));
        let unknown = enroller.enroll(&request("tern1_nope", 3), &mut store, TEST_NOW);
        assert!(unknown.refused.unwrap().contains("unknown"));
        let late = token(&mut store, &["ci"], 1, 60);
        let expired = enroller.enroll(&request(&late, 4), &mut store, TEST_NOW + 90_000);
        assert!(expired.refused.unwrap().contains("expired"));
    }

    #[test]
    fn lifetimes_are_capped_addresses_leased_until_expiry_and_groups_checked() {
        let (enroller, mut store, _dir, _ca) = setup();
        // A token asking 10 h gets the issuer's maximum, 1 h.
        let t = token(&mut store, &["ci"], 5, 36_000);
        let first = enroller.enroll(&request(&t, 1), &mut store, TEST_NOW);
        let cert = Cert::from_pem(&first.cert.unwrap()).unwrap();
        assert_eq!(cert.body.not_after - cert.body.not_before, 3600);
        // The /30 pool has two hosts: the third enrollment finds none free,
        // until the first certificate has expired.
        assert!(enroller
            .enroll(&request(&t, 2), &mut store, TEST_NOW)
            .cert
            .is_some());
        let full = enroller.enroll(&request(&t, 3), &mut store, TEST_NOW);
        assert!(full.refused.unwrap().contains("exhausted"));
        let reused = enroller.enroll(&request(&t, 4), &mut store, TEST_NOW + 3601);
        let reused = Cert::from_pem(&reused.cert.unwrap()).unwrap();
        assert_eq!(reused.body.ips, cert.body.ips, "reused after expiry");
        // A token for a group the issuer may not sign.
        let db = token(&mut store, &["db"], 1, 60);
        let refused = enroller.enroll(&request(&db, 5), &mut store, TEST_NOW);
        assert!(refused.refused.unwrap().contains("\"db\""));
    }

    #[test]
    fn host_ranges_number_a_pools_hosts_like_walking_them() {
        let pool: Vec<Ipv4Net> = [
            "100.64.100.0/29",
            "100.64.7.8/31",
            "100.64.9.9/32",
            "100.80.0.0/14",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let ranges = HostRanges::of(&pool);
        let walked: Vec<Ipv4Addr> = pool.iter().take(3).flat_map(|n| n.hosts()).collect();
        assert_eq!(ranges.total(), walked.len() as u64 + (1 << 18) - 2);
        for (i, ip) in walked.iter().enumerate() {
            assert_eq!(ranges.at(i as u64), Some(*ip));
            assert_eq!(ranges.index_of(*ip), Some(i as u64));
        }
        let last = ranges.total() - 1;
        assert_eq!(ranges.at(last), Some(Ipv4Addr::new(100, 83, 255, 254)));
        assert_eq!(ranges.at(last + 1), None);
        assert_eq!(
            ranges.index_of(Ipv4Addr::new(100, 64, 100, 0)),
            None,
            "the network address"
        );
        assert_eq!(ranges.index_of(Ipv4Addr::new(198, 18, 0, 1)), None);
    }

    #[test]
    fn addresses_are_leased_round_robin_so_a_returned_one_waits_longest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("lh.db")).unwrap();
        let pool: Vec<Ipv4Net> = vec!["100.64.100.0/29".parse().unwrap()];
        let lease = |store: &mut SqliteStore, until: u64, now: u64| {
            store
                .lease(&pool, "ci-x", until, now)
                .unwrap()
                .map(|ip| ip.octets()[3])
        };
        // .1 lives a minute, the others an hour.
        assert_eq!(lease(&mut store, TEST_NOW + 60, TEST_NOW), Some(1));
        for want in 2..=6 {
            assert_eq!(lease(&mut store, TEST_NOW + 3600, TEST_NOW), Some(want));
        }
        assert_eq!(lease(&mut store, TEST_NOW + 3600, TEST_NOW), None, "full");
        // .1 has expired: it is the one free address, found past the end.
        assert_eq!(lease(&mut store, TEST_NOW + 3600, TEST_NOW + 61), Some(1));
        // A new store on the same file carries on from where it was.
        drop(store);
        let mut store = SqliteStore::open(&dir.path().join("lh.db")).unwrap();
        assert_eq!(lease(&mut store, TEST_NOW + 9000, TEST_NOW + 3601), Some(2));
    }

    #[test]
    fn revocations_by_fingerprint_and_by_name_are_kept_until_the_certificate_expires() {
        let (enroller, mut store, _dir, _ca) = setup();
        let t = token(&mut store, &["ci"], 2, 600);
        let a = Cert::from_pem(
            &enroller
                .enroll(&request(&t, 1), &mut store, TEST_NOW)
                .cert
                .unwrap(),
        )
        .unwrap();
        let named = store.issued_named(&a.body.name, TEST_NOW).unwrap();
        assert_eq!(named, vec![(a.fingerprint(), a.body.not_after)]);
        assert_eq!(
            store.issued(&a.fingerprint()).unwrap(),
            Some((a.body.name.clone(), a.body.not_after))
        );
        assert!(store
            .issued_named(&a.body.name, a.body.not_after + 1)
            .unwrap()
            .is_empty());
        assert!(store
            .revoke(&a.fingerprint(), &a.body.name, a.body.not_after, TEST_NOW)
            .unwrap());
        assert!(!store
            .revoke(&a.fingerprint(), &a.body.name, a.body.not_after, TEST_NOW)
            .unwrap());
        let other = Fingerprint([9; 32]);
        assert!(store.revoke(&other, "", u64::MAX, TEST_NOW).unwrap());
        let list = store.revocations(TEST_NOW).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].0 < list[1].0, "versions grow");
        assert_eq!(list[0].1.fingerprint, a.fingerprint());
        assert_eq!(
            list[1].1.not_after,
            i64::MAX as u64,
            "forever, as far as i64 goes"
        );
        // Once a's certificate has expired its revocation is no longer sent.
        let later = store.revocations(a.body.not_after + 1).unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].1.fingerprint, other);
    }

    const GH: &str = "https://token.actions.example";

    fn oidc_setup() -> (
        Enroller,
        SqliteStore,
        tempfile::TempDir,
        tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer,
    ) {
        let (enroller, store, dir, _ca) = setup();
        let provider: OidcProviderConfig = toml::from_str(&format!(
            r#"
            issuer = "{GH}"
            audience = "tern"
            jwks = "unused"
            [[rules]]
            claims = {{ repository = "acme/app", ref = "refs/heads/main" }}
            groups = ["deploy"]
            cert_ttl = "10m"
            [[rules]]
            claims = {{ repository = "acme/*" }}
            groups = ["ci"]
            "#
        ))
        .unwrap();
        let signer = tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer::es256("k1").unwrap();
        let mut enroller = enroller.with_oidc(vec![provider]);
        enroller.set_keys(
            0,
            Ok(Jwks::parse(signer.jwks_json().as_bytes()).unwrap()),
            TEST_NOW,
        );
        (enroller, store, dir, signer)
    }

    fn oidc_request(token: String, key: u8) -> EnrollRequest {
        EnrollRequest {
            token: None,
            oidc: Some(token),
            public_key: [key; 32],
            name_hint: None,
        }
    }

    fn claims(repo: &str, git_ref: &str, jti: &str) -> serde_json::Value {
        let mut c = tern_lighthouse_core::oidc::test_issuer::github_like_claims(
            GH, "tern", repo, git_ref, TEST_NOW,
        );
        c["jti"] = jti.into();
        c
    }

    fn refused(enroller: &Enroller, store: &mut SqliteStore, token: String) -> String {
        let reply = enroller.enroll(&oidc_request(token, 9), store, TEST_NOW);
        assert!(reply.cert.is_none());
        reply.refused.unwrap()
    }

    #[test]
    fn an_oidc_token_whose_claims_match_a_rule_gets_that_rules_groups_and_lifetime() {
        let (enroller, mut store, _dir, signer) = oidc_setup();
        let main = signer.sign(&claims("acme/app", "refs/heads/main", "j1"));
        let reply = enroller.enroll(&oidc_request(main.clone(), 1), &mut store, TEST_NOW);
        let cert = Cert::from_pem(&reply.cert.unwrap()).unwrap();
        assert_eq!(cert.body.groups, ["deploy"]);
        assert_eq!(cert.body.not_after - cert.body.not_before, 600);
        // The issuance log says which provider, rule and claims.
        let how: String = store
            .db
            .query_row(
                "SELECT how FROM issued WHERE fingerprint = ?1",
                [cert.fingerprint().to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            how.contains("rule 0")
                && how.contains("repository=acme/app")
                && how.contains("ref=refs/heads/main"),
            "{how}"
        );
        // A branch gets the second rule: ci, the issuer's maximum lifetime.
        let branch = signer.sign(&claims("acme/lib", "refs/heads/dev", "j2"));
        let cert = Cert::from_pem(
            &enroller
                .enroll(&oidc_request(branch, 2), &mut store, TEST_NOW)
                .cert
                .unwrap(),
        )
        .unwrap();
        assert_eq!(cert.body.groups, ["ci"]);
        assert_eq!(cert.body.not_after - cert.body.not_before, 3600);
        // The same ID token again (a copy from a log): refused.
        assert!(refused(&enroller, &mut store, main).contains("used to enroll already"));
    }

    #[test]
    fn oidc_tokens_are_refused_with_a_reason_for_each_failure() {
        let (enroller, mut store, _dir, signer) = oidc_setup();
        let mut wrong_aud = claims("acme/app", "refs/heads/main", "a");
        wrong_aud["aud"] = "someone-else".into();
        assert!(refused(&enroller, &mut store, signer.sign(&wrong_aud)).contains("audience"));
        let mut wrong_iss = claims("acme/app", "refs/heads/main", "b");
        wrong_iss["iss"] = "https://evil.example".into();
        assert!(refused(&enroller, &mut store, signer.sign(&wrong_iss)).contains("does not accept"));
        let mut expired = claims("acme/app", "refs/heads/main", "c");
        expired["exp"] = (TEST_NOW - 600).into();
        assert!(refused(&enroller, &mut store, signer.sign(&expired)).contains("expired"));
        let impostor =
            tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer::es256("k1").unwrap();
        let forged = impostor.sign(&claims("acme/app", "refs/heads/main", "d"));
        assert!(refused(&enroller, &mut store, forged).contains("signature"));
        let other = signer.sign(&claims("evil/app", "refs/heads/main", "e"));
        let why = refused(&enroller, &mut store, other);
        assert!(
            why.contains("matches no") && why.contains("repository=\"evil/app\""),
            "{why}"
        );
        assert!(refused(&enroller, &mut store, "garbage".into()).contains("malformed"));
    }

    #[test]
    fn a_token_naming_an_unknown_key_asks_for_the_providers_keys_once_in_a_while() {
        let (enroller, mut store, _dir, signer) = oidc_setup();
        let rotated = tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer::es256("k2").unwrap();
        let token = rotated.sign(&claims("acme/app", "refs/heads/main", "r1"));
        let request = oidc_request(token, 1);
        // Keys were read at TEST_NOW: within the quiet period the token is
        // judged with what is held (unknown key), after it the keys are asked for.
        assert!(
            matches!(enroller.decide(&request, &mut store, TEST_NOW + 1), Decision::Reply(r) if r.refused.as_deref().is_some_and(|w| w.contains("k2")))
        );
        let later = TEST_NOW + JWKS_REFETCH_AFTER;
        assert_eq!(
            enroller.decide(&request, &mut store, later),
            Decision::NeedKeys(0)
        );
        let mut enroller = enroller;
        let both = format!("{{\"keys\":[{},{}]}}", signer.jwk(), rotated.jwk());
        enroller.set_keys(0, Ok(Jwks::parse(both.as_bytes()).unwrap()), later);
        assert!(
            matches!(enroller.decide(&request, &mut store, later), Decision::Reply(r) if r.cert.is_some())
        );
    }

    #[test]
    fn two_simultaneous_uses_of_a_single_use_token_yield_one_certificate() {
        // A pool with room for every racer: each leases an address before
        // the token is spent, and each loser must give its address back.
        let (enroller, mut store, dir, _ca) = setup_with("ci-", "100.64.100.0/28");
        let t = token(&mut store, &["ci"], 1, 600);
        drop(store);
        let path = dir.path().join("lh.db");
        let enroller = std::sync::Arc::new(enroller);
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let (enroller, path, t) = (enroller.clone(), path.clone(), t.clone());
                std::thread::spawn(move || {
                    let mut store = SqliteStore::open(&path).unwrap();
                    enroller
                        .enroll(&request(&t, i + 1), &mut store, TEST_NOW)
                        .cert
                })
            })
            .collect();
        let won: Vec<Cert> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .map(|pem| Cert::from_pem(&pem).unwrap())
            .collect();
        assert_eq!(won.len(), 1);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            leases(&store),
            [(
                won[0].body.ips[0].addr().to_string(),
                won[0].body.name.clone()
            )],
            "the losers' addresses are back in the pool"
        );
        assert_eq!(uses_left(&store, &t), 0);
        assert_eq!(issued_count(&store), 1);
    }

    fn uses_left(store: &SqliteStore, token: &str) -> i64 {
        store
            .db
            .query_row(
                "SELECT uses_left FROM tokens WHERE hash = ?1",
                [token_hash(token)],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn a_store_that_fails_to_record_the_certificate_keeps_the_token_use() {
        let (enroller, mut store, _dir, _ca) = setup();
        let t = token(&mut store, &["ci"], 1, 60);
        // The issuance log cannot be written (as a disk gone full would).
        store
            .db
            .execute_batch(
                "CREATE TRIGGER no_room BEFORE INSERT ON issued BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            )
            .unwrap();
        let reply = enroller.enroll(&request(&t, 1), &mut store, TEST_NOW);
        assert_eq!(reply.cert, None);
        assert_eq!(
            reply.code.as_deref(),
            Some(tern_shared::enroll::REFUSED_STORE_UNAVAILABLE)
        );
        assert_eq!(uses_left(&store, &t), 1, "the use was not spent");
        assert!(leases(&store).is_empty(), "the address was given back");
        store.db.execute_batch("DROP TRIGGER no_room").unwrap();
        let reply = enroller.enroll(&request(&t, 1), &mut store, TEST_NOW);
        assert!(reply.cert.is_some(), "{:?}", reply.refused);
        assert_eq!(uses_left(&store, &t), 0);
    }

    /// The leases held: address and name.
    fn leases(store: &SqliteStore) -> Vec<(String, String)> {
        let mut stmt = store
            .db
            .prepare("SELECT ip, name FROM leases ORDER BY ip")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    }

    fn issued_count(store: &SqliteStore) -> i64 {
        store
            .db
            .query_row("SELECT COUNT(*) FROM issued", [], |r| r.get(0))
            .unwrap()
    }

    fn oidc_marked(store: &SqliteStore) -> i64 {
        store
            .db
            .query_row("SELECT COUNT(*) FROM oidc_used", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_long_prefix_and_hint_are_cut_so_the_name_fits_with_its_tail_whole() {
        // The longest prefix an issuer may have, and the longest hint.
        let prefix = format!("ci-{}", "p".repeat(cert::MAX_PREFIX_LEN - 3));
        let (enroller, mut store, _dir, ca) = setup_with(&prefix, "100.64.100.0/30");
        let t = token(&mut store, &["ci"], 1, 600);
        let mut req = request(&t, 0xab);
        req.name_hint = Some("abcdefghijklmnopqrstuvwx".into());
        let reply = enroller.enroll(&req, &mut store, TEST_NOW);
        let pem = reply.cert.unwrap_or_else(|| panic!("{:?}", reply.refused));
        let cert = ca
            .pool()
            .verify(&Cert::from_pem(&pem).unwrap(), TEST_NOW)
            .unwrap();
        let name = cert.name();
        assert!(name.len() <= cert::MAX_NAME_LEN, "{name}");
        assert!(name.starts_with(&prefix), "{name}");
        assert!(name.ends_with("-abababab"), "{name}");
        assert_eq!(name, format!("{prefix}abcdefghijklmnopqrstuvw-abababab"));
    }

    #[test]
    fn node_names_fit_keeping_the_unique_tail_whole() {
        let named = |prefix: &str, hint: Option<&str>, now: u64| {
            let mut req = request("", 0xab);
            req.name_hint = hint.map(str::to_string);
            node_name(prefix, &req, now)
        };
        let now = TEST_NOW + 12_345;
        assert_eq!(
            named("ci-", Some("build 7!"), now).unwrap(),
            "ci-build7-abababab"
        );
        // No hint, or none left once reduced to name characters: the stamp.
        assert_eq!(named("ci-", None, now).unwrap(), "ci-abababab-12345");
        assert_eq!(
            named("ci-", Some("!! ?"), now).unwrap(),
            "ci-abababab-12345"
        );
        // Room for one hint character and its `-`.
        let p54 = "p".repeat(54);
        assert_eq!(
            named(&p54, Some("xyz"), now).unwrap(),
            format!("{p54}x-abababab")
        );
        // Room for the stamp, then not: the tail alone.
        let p50 = "p".repeat(50);
        assert_eq!(
            named(&p50, None, now).unwrap(),
            format!("{p50}abababab-12345")
        );
        let p51 = "p".repeat(51);
        assert_eq!(named(&p51, None, now).unwrap(), format!("{p51}abababab"));
        // Room for the tail only.
        let p56 = "p".repeat(56);
        for hint in [Some("xyz"), None] {
            let name = named(&p56, hint, now).unwrap();
            assert_eq!(name, format!("{p56}abababab"));
            assert_eq!(name.len(), cert::MAX_NAME_LEN);
        }
        // No room for the tail.
        let why = named(&"p".repeat(57), Some("xyz"), now).unwrap_err();
        assert!(
            why.contains("name prefix") && why.contains("too long"),
            "{why}"
        );
    }

    #[test]
    fn a_prefix_with_no_room_for_the_tail_is_refused_before_anything_is_spent() {
        let (mut enroller, mut store, _dir, _ca) = setup();
        let t = token(&mut store, &["ci"], 1, 600);
        // Longer than an issuer may be signed with: only a future limit
        // (or a tampered certificate) gets here.
        enroller.issuer_mut().body.name_prefix = "p".repeat(cert::MAX_NAME_LEN - 7);
        let why = enroller
            .enroll(&request(&t, 1), &mut store, TEST_NOW)
            .refused
            .unwrap();
        assert!(
            why.contains("name prefix") && why.contains("too long"),
            "{why}"
        );
        assert_eq!(uses_left(&store, &t), 1, "the token's use is not spent");
        assert!(leases(&store).is_empty(), "no address is leased");
        // The token still buys a certificate from a sound issuer.
        enroller.issuer_mut().body.name_prefix = "ci-".into();
        assert!(enroller
            .enroll(&request(&t, 1), &mut store, TEST_NOW)
            .cert
            .is_some());
        assert_eq!(uses_left(&store, &t), 0);
    }

    #[test]
    fn a_token_for_groups_the_issuer_may_not_sign_is_refused_without_spending_it() {
        let (enroller, mut store, _dir, _ca) = setup();
        let t = token(&mut store, &["ci", "db"], 1, 600);
        let why = enroller
            .enroll(&request(&t, 1), &mut store, TEST_NOW)
            .refused
            .unwrap();
        assert!(
            why.contains("\"db\"") && why.contains("may not sign"),
            "{why}"
        );
        assert_eq!(uses_left(&store, &t), 1, "the token's use is not spent");
        assert!(leases(&store).is_empty(), "no address is leased");
        assert_eq!(issued_count(&store), 0);
    }

    #[test]
    fn an_exhausted_pool_refuses_without_spending_the_token() {
        let (enroller, mut store, _dir, _ca) = setup();
        // The /30 pool has two hosts; fill them.
        let fill = token(&mut store, &["ci"], 2, 600);
        for key in 1..=2 {
            assert!(enroller
                .enroll(&request(&fill, key), &mut store, TEST_NOW)
                .cert
                .is_some());
        }
        let t = token(&mut store, &["ci"], 1, 600);
        let full = enroller.enroll(&request(&t, 3), &mut store, TEST_NOW);
        assert!(full.refused.unwrap().contains("exhausted"));
        assert_eq!(uses_left(&store, &t), 1, "the token's use is not spent");
        assert_eq!(leases(&store).len(), 2);
        // Once the first certificates have expired, the same token enrolls.
        assert!(enroller
            .enroll(&request(&t, 3), &mut store, TEST_NOW + 601)
            .cert
            .is_some());
        assert_eq!(uses_left(&store, &t), 0);
    }

    #[test]
    fn enroll_pool_leaves_the_rest_of_the_issuers_pool_to_hand_signed_nodes() {
        let (enroller, mut store, _dir, ca) = setup_with("ci-", "100.64.100.0/24");
        let outside: Ipv4Net = "100.64.101.0/25".parse().unwrap();
        let issuer = ca.issuer("lh-issuer", "100.64.100.0/24", &["ci"], "ci-", 3600);
        let err = Enroller::new(issuer.cert, issuer.key, 10)
            .unwrap()
            .with_lease_pool(&[outside])
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("not inside the issuer's address pool (100.64.100.0/24)"),
            "{err}"
        );
        let dynamic: Ipv4Net = "100.64.100.128/30".parse().unwrap();
        let enroller = enroller.with_lease_pool(&[dynamic]).unwrap();
        let t = token(&mut store, &["ci"], 3, 600);
        let mut got = Vec::new();
        for key in 1..=3 {
            let reply = enroller.enroll(&request(&t, key), &mut store, TEST_NOW);
            match reply.cert {
                Some(pem) => got.push(Cert::from_pem(&pem).unwrap().body.ips[0].addr()),
                None => assert!(reply.refused.unwrap().contains("exhausted")),
            }
        }
        assert_eq!(
            got,
            [
                "100.64.100.129".parse::<std::net::IpAddr>().unwrap(),
                "100.64.100.130".parse().unwrap()
            ],
            "only the /30's two hosts"
        );
    }

    #[test]
    fn an_oidc_token_refused_after_verification_is_not_marked_used() {
        let (enroller, mut store, _dir, signer) = oidc_setup();
        let fill = token(&mut store, &["ci"], 2, 60);
        for key in 1..=2 {
            assert!(enroller
                .enroll(&request(&fill, key), &mut store, TEST_NOW)
                .cert
                .is_some());
        }
        let id_token = signer.sign(&claims("acme/app", "refs/heads/main", "j9"));
        let full = enroller.enroll(&oidc_request(id_token.clone(), 3), &mut store, TEST_NOW);
        assert!(full.refused.unwrap().contains("exhausted"));
        assert_eq!(oidc_marked(&store), 0, "no replay record");
        // The pool frees up while the ID token is still valid: it enrolls,
        // once.
        let later = TEST_NOW + 61;
        let reply = enroller.enroll(&oidc_request(id_token.clone(), 3), &mut store, later);
        assert!(reply.cert.is_some(), "{:?}", reply.refused);
        assert_eq!(oidc_marked(&store), 1);
        let again = enroller.enroll(&oidc_request(id_token, 4), &mut store, later);
        assert!(again.refused.unwrap().contains("used to enroll already"));
    }

    /// A store on which a rival request spends the credential (`rival`
    /// runs) just after this request's lease: the race a request can lose.
    struct Rival<'a> {
        store: &'a mut SqliteStore,
        rival: Option<RivalMove<'a>>,
    }

    type RivalMove<'a> = Box<dyn FnOnce(&mut SqliteStore) + 'a>;

    impl EnrollStore for Rival<'_> {
        type Error = StoreError;
        fn create_token(&mut self, token: &NewToken, now: u64) -> Result<(), StoreError> {
            self.store.create_token(token, now)
        }
        fn peek_token(
            &mut self,
            hash: &str,
            now: u64,
        ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
            self.store.peek_token(hash, now)
        }
        fn use_token(
            &mut self,
            hash: &str,
            now: u64,
        ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
            self.store.use_token(hash, now)
        }
        fn lease(
            &mut self,
            pool: &[Ipv4Net],
            name: &str,
            until: u64,
            now: u64,
        ) -> Result<Option<Ipv4Addr>, StoreError> {
            let ip = self.store.lease(pool, name, until, now)?;
            if let Some(rival) = self.rival.take() {
                rival(self.store);
            }
            Ok(ip)
        }
        fn release_lease(&mut self, ip: Ipv4Addr, name: &str) -> Result<(), StoreError> {
            self.store.release_lease(ip, name)
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
            self.store.renew_for(ip, name, until, cert, how, now)
        }
        fn use_token_for(
            &mut self,
            hash: &str,
            cert: &Cert,
            how: &Issuance,
            now: u64,
        ) -> Result<Result<Grant, TokenRefusal>, StoreError> {
            self.store.use_token_for(hash, cert, how, now)
        }
        fn use_oidc_token_for(
            &mut self,
            id: &str,
            until: u64,
            cert: &Cert,
            how: &Issuance,
            now: u64,
        ) -> Result<bool, StoreError> {
            self.store.use_oidc_token_for(id, until, cert, how, now)
        }
        fn record_issued(
            &mut self,
            cert: &Cert,
            how: &Issuance,
            now: u64,
        ) -> Result<(), StoreError> {
            self.store.record_issued(cert, how, now)
        }
        fn oidc_token_used(&mut self, id: &str, now: u64) -> Result<bool, StoreError> {
            self.store.oidc_token_used(id, now)
        }
        fn use_oidc_token(&mut self, id: &str, until: u64, now: u64) -> Result<bool, StoreError> {
            self.store.use_oidc_token(id, until, now)
        }
        fn issued_named(
            &mut self,
            name: &str,
            now: u64,
        ) -> Result<Vec<(Fingerprint, u64)>, StoreError> {
            self.store.issued_named(name, now)
        }
        fn issued(
            &mut self,
            fingerprint: &Fingerprint,
        ) -> Result<Option<(String, u64)>, StoreError> {
            self.store.issued(fingerprint)
        }
        fn revoke(
            &mut self,
            fingerprint: &Fingerprint,
            name: &str,
            not_after: u64,
            now: u64,
        ) -> Result<bool, StoreError> {
            self.store.revoke(fingerprint, name, not_after, now)
        }
        fn revocations(&mut self, now: u64) -> Result<Vec<(u32, Revocation)>, StoreError> {
            self.store.revocations(now)
        }
        fn list_tokens(&mut self, now: u64) -> Result<Vec<TokenInfo>, StoreError> {
            self.store.list_tokens(now)
        }
        fn revoke_token(
            &mut self,
            id: &TokenIdPrefix,
        ) -> Result<Result<String, TokenRevokeRefusal>, StoreError> {
            self.store.revoke_token(id)
        }
    }

    #[test]
    fn a_request_that_loses_its_token_after_leasing_gives_the_address_back() {
        let (enroller, mut store, _dir, signer) = oidc_setup();
        let t = token(&mut store, &["ci"], 1, 600);
        let hash = token_hash(&t);
        let lost = enroller.enroll(
            &request(&t, 1),
            &mut Rival {
                store: &mut store,
                rival: Some(Box::new(move |s: &mut SqliteStore| {
                    assert!(s.use_token(&hash, TEST_NOW).unwrap().is_ok());
                })),
            },
            TEST_NOW,
        );
        assert!(lost.refused.unwrap().contains("used up"));
        assert!(leases(&store).is_empty(), "the address is given back");
        assert_eq!(issued_count(&store), 0);
        // The same with an ID token another request enrolled with meanwhile.
        let id_token = signer.sign(&claims("acme/app", "refs/heads/main", "j5"));
        let lost = enroller.enroll(
            &oidc_request(id_token, 2),
            &mut Rival {
                store: &mut store,
                rival: Some(Box::new(|s: &mut SqliteStore| {
                    assert!(s
                        .use_oidc_token(&format!("{GH} j5"), TEST_NOW + 400, TEST_NOW)
                        .unwrap());
                })),
            },
            TEST_NOW,
        );
        assert!(lost.refused.unwrap().contains("used to enroll already"));
        assert!(leases(&store).is_empty(), "the address is given back");
        assert_eq!(issued_count(&store), 0);
    }

    /// A token with a chosen hash (prefixes shared on purpose).
    fn token_with_hash(store: &mut SqliteStore, hash: &str, groups: &[&str], uses: u32) {
        store
            .create_token(
                &NewToken {
                    hash: hash.to_string(),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                    uses,
                    expires: TEST_NOW + 600,
                    cert_ttl: 1800,
                },
                TEST_NOW,
            )
            .unwrap();
    }

    fn prefix(text: &str) -> TokenIdPrefix {
        TokenIdPrefix::parse(text).unwrap()
    }

    #[test]
    fn token_list_shows_twelve_digits_of_the_hash_and_never_more_nor_the_token() {
        let (enroller, mut store, _dir, _ca) = setup();
        let spent = token(&mut store, &["ci"], 1, 600);
        let both = token(&mut store, &["ci", "deploy"], 3, 1800);
        assert!(enroller
            .enroll(&request(&spent, 1), &mut store, TEST_NOW)
            .cert
            .is_some());
        let list = store.list_tokens(TEST_NOW).unwrap();
        assert_eq!(list.len(), 2);
        // Made in the same second: in the order they were made.
        for (info, t) in list.iter().zip([&spent, &both]) {
            let hash = token_hash(t);
            assert_eq!(info.id, hash[..TOKEN_ID_LEN]);
            assert_eq!(info.id, token_id(&hash));
            let shown = format!("{info:?}");
            assert!(!shown.contains(&hash[..TOKEN_ID_LEN + 1]), "{shown}");
            assert!(!shown.contains(t.as_str()), "{shown}");
            assert!(!shown.contains(&t["tern1_".len()..][..8]), "{shown}");
        }
        assert_eq!(
            list[1],
            TokenInfo {
                id: token_hash(&both)[..TOKEN_ID_LEN].to_string(),
                groups: vec!["ci".into(), "deploy".into()],
                uses_left: 3,
                expires: TEST_NOW + 86_400,
                created: TEST_NOW,
                cert_ttl: 1800,
                expired: false,
            }
        );
        assert_eq!((list[0].uses_left, list[0].expired), (0, false));
        // Expired ones are listed, and say so.
        let later = store.list_tokens(TEST_NOW + 86_400).unwrap();
        assert!(later.iter().all(|t| t.expired), "{later:?}");
    }

    #[test]
    fn a_token_revoked_by_a_prefix_of_its_id_is_refused_as_unknown() {
        let (enroller, mut store, _dir, _ca) = setup();
        let gone = token(&mut store, &["ci"], 5, 600);
        let kept = token(&mut store, &["ci"], 5, 600);
        let id = token_hash(&gone)[..TOKEN_ID_MIN].to_ascii_uppercase();
        assert_eq!(
            store.revoke_token(&prefix(&id)).unwrap(),
            Ok(token_hash(&gone)[..TOKEN_ID_LEN].to_string())
        );
        assert_eq!(
            store.peek_token(&token_hash(&gone), TEST_NOW).unwrap(),
            Err(TokenRefusal::Unknown)
        );
        let refused = enroller.enroll(&request(&gone, 1), &mut store, TEST_NOW);
        assert!(refused.refused.unwrap().contains("unknown"));
        let left: Vec<String> = store
            .list_tokens(TEST_NOW)
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(left, [token_hash(&kept)[..TOKEN_ID_LEN].to_string()]);
        assert!(enroller
            .enroll(&request(&kept, 2), &mut store, TEST_NOW)
            .cert
            .is_some());
        // Revoked twice: the second finds nothing.
        assert_eq!(
            store.revoke_token(&prefix(&id)).unwrap(),
            Err(TokenRevokeRefusal::Unknown(id.to_ascii_lowercase()))
        );
    }

    #[test]
    fn an_ambiguous_or_unknown_token_id_revokes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("lh.db")).unwrap();
        let a = format!("aaaaaaaa11{}", "0".repeat(54));
        let b = format!("aaaaaaaa22{}", "0".repeat(54));
        let c = format!("aaaaaaaa23{}", "0".repeat(54));
        for h in [&a, &b, &c] {
            token_with_hash(&mut store, h, &["ci"], 1);
        }
        assert_eq!(
            store.revoke_token(&prefix("aaaaaaaa")).unwrap(),
            Err(TokenRevokeRefusal::Ambiguous {
                id: "aaaaaaaa".into(),
                count: 3
            })
        );
        assert_eq!(
            store.revoke_token(&prefix("aaaaaaaa2")).unwrap(),
            Err(TokenRevokeRefusal::Ambiguous {
                id: "aaaaaaaa2".into(),
                count: 2
            })
        );
        assert_eq!(
            store.revoke_token(&prefix("bbbbbbbb")).unwrap(),
            Err(TokenRevokeRefusal::Unknown("bbbbbbbb".into()))
        );
        assert_eq!(store.list_tokens(TEST_NOW).unwrap().len(), 3, "none gone");
        // Enough digits to tell them apart.
        assert_eq!(
            store.revoke_token(&prefix("aaaaaaaa22")).unwrap(),
            Ok(b[..TOKEN_ID_LEN].to_string())
        );
        let left: Vec<String> = store
            .list_tokens(TEST_NOW)
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(
            left,
            [a[..TOKEN_ID_LEN].to_string(), c[..TOKEN_ID_LEN].to_string()]
        );
    }

    #[test]
    fn a_token_id_must_be_hex_and_at_least_eight_digits() {
        assert_eq!(prefix(" 3FA2b1C4 ").as_str(), "3fa2b1c4");
        assert_eq!(
            TokenIdPrefix::parse("3fa2b1c"),
            Err(TokenIdError::TooShort("3fa2b1c".into()))
        );
        // `%` and `_` would be wildcards to a careless LIKE.
        for bad in ["", "%%%%%%%%", "________", "3fa2b1c4…", "tern1_3fa2b1c4"] {
            assert!(
                matches!(TokenIdPrefix::parse(bad), Err(TokenIdError::NotHex(_))),
                "{bad:?}"
            );
        }
        assert!(TokenIdPrefix::parse(&"a".repeat(64)).is_ok());
        assert!(TokenIdPrefix::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn a_token_the_issuer_would_refuse_is_refused_when_it_is_made() {
        let (enroller, _store, _dir, ca) = setup();
        let issuer = enroller.issuer();
        let groups = |g: &[&str]| g.iter().map(|g| g.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_token_against_issuer(issuer, &groups(&["ci", "deploy"]), 3600, TEST_NOW),
            Ok(())
        );
        assert_eq!(
            check_token_against_issuer(issuer, &[], 60, TEST_NOW),
            Ok(())
        );
        let why = check_token_against_issuer(issuer, &groups(&["ci", "admin"]), 60, TEST_NOW)
            .unwrap_err();
        assert!(
            why.contains("group \"admin\"")
                && why.contains("\"lh-issuer\"")
                && why.contains("only ci, deploy"),
            "{why}"
        );
        let why =
            check_token_against_issuer(issuer, &groups(&["ci"]), 5 * 3600, TEST_NOW).unwrap_err();
        assert!(
            why.contains("--cert-ttl 5h")
                && why.contains("at most 1h")
                && why.contains("lh-issuer"),
            "{why}"
        );
        let why = check_token_against_issuer(issuer, &[], 60, issuer.body.not_after).unwrap_err();
        assert!(why.contains("expired"), "{why}");
        let why = check_token_against_issuer(&ca.cert, &[], 60, TEST_NOW).unwrap_err();
        assert!(why.contains("not an issuer"), "{why}");
    }

    #[test]
    fn a_lease_is_released_only_while_its_name_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("lh.db")).unwrap();
        let pool: Vec<Ipv4Net> = vec!["100.64.100.0/30".parse().unwrap()];
        let ip = store
            .lease(&pool, "ci-a", TEST_NOW + 60, TEST_NOW)
            .unwrap()
            .unwrap();
        store.release_lease(ip, "ci-b").unwrap();
        assert_eq!(leases(&store), [(ip.to_string(), "ci-a".to_string())]);
        store.release_lease(ip, "ci-a").unwrap();
        assert!(leases(&store).is_empty());
        // Given back, it is leased again once the round comes to it.
        let next = store.lease(&pool, "ci-c", TEST_NOW + 60, TEST_NOW).unwrap();
        assert_ne!(next, Some(ip), "the other address first");
        let again = store.lease(&pool, "ci-d", TEST_NOW + 60, TEST_NOW).unwrap();
        assert_eq!(again, Some(ip));
    }
}
