//! `tern-lighthouse store copy`: a store's whole state read out of one
//! store ([`StoreDump`]) and written into another, empty one — a single
//! lighthouse's SQLite file moved to the PostgreSQL database several
//! lighthouses share, or back. Everything moves as it is: token hashes and
//! their uses, leases, the issuance log, OIDC replay marks, revocations with
//! their version numbers (so nodes that hold a list keep comparing versions
//! correctly) and the lease cursor.

use super::{AnyStore, PostgresStore, SqliteStore, StoreError};

/// One stored token, as stored (only its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub hash: String,
    pub groups: String,
    pub uses_left: i64,
    pub expires: i64,
    pub cert_ttl: i64,
    pub created: i64,
}

/// One address lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub ip: String,
    pub name: String,
    pub until: i64,
}

/// One certificate of the issuance log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    pub fingerprint: String,
    pub name: String,
    pub ip: String,
    pub groups: String,
    pub not_after: i64,
    pub how: String,
    pub at: i64,
    /// The token's id, or empty.
    pub token: String,
    /// The OIDC claims, a JSON object.
    pub claims: String,
}

impl IssuedRecord {
    /// A row of `SELECT fingerprint, name, ip, groups, not_after, how, at,
    /// token, claims FROM issued`.
    pub(super) fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<IssuedRecord> {
        Ok(IssuedRecord {
            fingerprint: r.get(0)?,
            name: r.get(1)?,
            ip: r.get(2)?,
            groups: r.get(3)?,
            not_after: r.get(4)?,
            how: r.get(5)?,
            at: r.get(6)?,
            token: r.get(7)?,
            claims: r.get(8)?,
        })
    }

    /// The same row from PostgreSQL.
    pub(super) fn from_postgres(r: &postgres::Row) -> IssuedRecord {
        IssuedRecord {
            fingerprint: r.get(0),
            name: r.get(1),
            ip: r.get(2),
            groups: r.get(3),
            not_after: r.get(4),
            how: r.get(5),
            at: r.get(6),
            token: r.get(7),
            claims: r.get(8),
        }
    }
}

/// One revocation, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    pub version: i64,
    pub fingerprint: String,
    pub name: String,
    pub not_after: i64,
    pub at: i64,
}

/// A store's whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreDump {
    pub tokens: Vec<TokenRecord>,
    pub leases: Vec<LeaseRecord>,
    pub issued: Vec<IssuedRecord>,
    /// OIDC replay marks: the ID token's id and until when it is kept.
    pub oidc_used: Vec<(String, i64)>,
    pub revocations: Vec<RevocationRecord>,
    /// The address leased last (leasing goes on round robin after it).
    pub lease_cursor: Option<String>,
}

impl StoreDump {
    /// "3 tokens, 2 leases, ..." for the command's report.
    pub fn summary(&self) -> String {
        format!(
            "{} tokens, {} address leases, {} issued certificates, {} OIDC replay marks, {} revocations",
            self.tokens.len(),
            self.leases.len(),
            self.issued.len(),
            self.oidc_used.len(),
            self.revocations.len()
        )
    }

    fn is_empty(&self) -> bool {
        self.tokens.is_empty()
            && self.leases.is_empty()
            && self.issued.is_empty()
            && self.oidc_used.is_empty()
            && self.revocations.is_empty()
    }
}

impl AnyStore {
    /// Everything in the store.
    pub fn dump(&mut self) -> Result<StoreDump, StoreError> {
        match self {
            AnyStore::Sqlite(s) => sqlite_dump(s),
            AnyStore::Postgres(s) => postgres_dump(s),
        }
    }

    /// Writes `dump` into this store, in one transaction; refused (nothing
    /// written) unless the store is empty, so that no state is merged with
    /// or overwrites another lighthouse's.
    pub fn load(&mut self, dump: &StoreDump) -> Result<(), StoreError> {
        let here = self.dump()?;
        if !here.is_empty() {
            return Err(StoreError::NotEmpty(here.summary()));
        }
        match self {
            AnyStore::Sqlite(s) => sqlite_load(s, dump),
            AnyStore::Postgres(s) => postgres_load(s, dump),
        }
    }
}

fn sqlite_dump(s: &mut SqliteStore) -> Result<StoreDump, StoreError> {
    let tx = s.db.transaction()?;
    let dump = StoreDump {
        tokens: tx
            .prepare("SELECT hash, groups, uses_left, expires, cert_ttl, created FROM tokens ORDER BY created, rowid")?
            .query_map([], |r| {
                Ok(TokenRecord {
                    hash: r.get(0)?,
                    groups: r.get(1)?,
                    uses_left: r.get(2)?,
                    expires: r.get(3)?,
                    cert_ttl: r.get(4)?,
                    created: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?,
        leases: tx
            .prepare("SELECT ip, name, until FROM leases ORDER BY ip")?
            .query_map([], |r| {
                Ok(LeaseRecord {
                    ip: r.get(0)?,
                    name: r.get(1)?,
                    until: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?,
        issued: tx
            .prepare("SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued ORDER BY at, fingerprint")?
            .query_map([], IssuedRecord::from_sqlite)?
            .collect::<Result<_, _>>()?,
        oidc_used: tx
            .prepare("SELECT id, until FROM oidc_used ORDER BY id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?,
        revocations: tx
            .prepare("SELECT version, fingerprint, name, not_after, at FROM revocations ORDER BY version")?
            .query_map([], |r| {
                Ok(RevocationRecord {
                    version: r.get(0)?,
                    fingerprint: r.get(1)?,
                    name: r.get(2)?,
                    not_after: r.get(3)?,
                    at: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?,
        lease_cursor: match tx.query_row(
            "SELECT value FROM meta WHERE key = 'lease_cursor'",
            [],
            |r| r.get::<_, String>(0),
        ) {
            Ok(v) => Some(v).filter(|v| !v.is_empty()),
            Err(rusqlite::Error::QueryReturnedNoRows) => None,
            Err(e) => return Err(e.into()),
        },
    };
    tx.commit()?;
    Ok(dump)
}

fn sqlite_load(s: &mut SqliteStore, d: &StoreDump) -> Result<(), StoreError> {
    use rusqlite::params;
    let tx =
        s.db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for t in &d.tokens {
        tx.execute(
            "INSERT INTO tokens (hash, groups, uses_left, expires, cert_ttl, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![t.hash, t.groups, t.uses_left, t.expires, t.cert_ttl, t.created],
        )?;
    }
    for l in &d.leases {
        tx.execute(
            "INSERT INTO leases (ip, name, until) VALUES (?1, ?2, ?3)",
            params![l.ip, l.name, l.until],
        )?;
    }
    for i in &d.issued {
        tx.execute(
            "INSERT INTO issued (fingerprint, name, ip, groups, not_after, how, at, token, claims) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![i.fingerprint, i.name, i.ip, i.groups, i.not_after, i.how, i.at, i.token, i.claims],
        )?;
    }
    for (id, until) in &d.oidc_used {
        tx.execute(
            "INSERT INTO oidc_used (id, until) VALUES (?1, ?2)",
            params![id, until],
        )?;
    }
    // Explicit versions: AUTOINCREMENT goes on after the largest.
    for r in &d.revocations {
        tx.execute(
            "INSERT INTO revocations (version, fingerprint, name, not_after, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![r.version, r.fingerprint, r.name, r.not_after, r.at],
        )?;
    }
    if let Some(cursor) = &d.lease_cursor {
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('lease_cursor', ?1)",
            [cursor],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn postgres_dump(s: &mut PostgresStore) -> Result<StoreDump, StoreError> {
    let mut tx = s.client()?.transaction()?;
    // One snapshot of every table.
    tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")?;
    let dump = StoreDump {
        tokens: tx
            .query(
                "SELECT hash, groups, uses_left, expires, cert_ttl, created FROM tokens ORDER BY created, seq",
                &[],
            )?
            .iter()
            .map(|r| TokenRecord {
                hash: r.get(0),
                groups: r.get(1),
                uses_left: r.get(2),
                expires: r.get(3),
                cert_ttl: r.get(4),
                created: r.get(5),
            })
            .collect(),
        leases: tx
            .query("SELECT ip, name, until FROM leases ORDER BY ip", &[])?
            .iter()
            .map(|r| LeaseRecord {
                ip: r.get(0),
                name: r.get(1),
                until: r.get(2),
            })
            .collect(),
        issued: tx
            .query(
                "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued ORDER BY at, fingerprint",
                &[],
            )?
            .iter()
            .map(IssuedRecord::from_postgres)
            .collect(),
        oidc_used: tx
            .query("SELECT id, until FROM oidc_used ORDER BY id", &[])?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
        revocations: tx
            .query(
                "SELECT version, fingerprint, name, not_after, at FROM revocations ORDER BY version",
                &[],
            )?
            .iter()
            .map(|r| RevocationRecord {
                version: r.get(0),
                fingerprint: r.get(1),
                name: r.get(2),
                not_after: r.get(3),
                at: r.get(4),
            })
            .collect(),
        lease_cursor: tx
            .query_opt("SELECT value FROM meta WHERE key = 'lease_cursor'", &[])?
            .map(|r| r.get::<_, String>(0))
            .filter(|v| !v.is_empty()),
    };
    tx.commit()?;
    Ok(dump)
}

fn postgres_load(s: &mut PostgresStore, d: &StoreDump) -> Result<(), StoreError> {
    let mut tx = s.client()?.transaction()?;
    // No lighthouse writes while the state moves in.
    tx.batch_execute(
        "LOCK TABLE tokens, leases, issued, oidc_used, revocations, meta IN EXCLUSIVE MODE",
    )?;
    for t in &d.tokens {
        tx.execute(
            "INSERT INTO tokens (hash, groups, uses_left, expires, cert_ttl, created) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&t.hash, &t.groups, &t.uses_left, &t.expires, &t.cert_ttl, &t.created],
        )?;
    }
    for l in &d.leases {
        tx.execute(
            "INSERT INTO leases (ip, name, until) VALUES ($1, $2, $3)",
            &[&l.ip, &l.name, &l.until],
        )?;
    }
    for i in &d.issued {
        tx.execute(
            "INSERT INTO issued (fingerprint, name, ip, groups, not_after, how, at, token, claims) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[&i.fingerprint, &i.name, &i.ip, &i.groups, &i.not_after, &i.how, &i.at, &i.token, &i.claims],
        )?;
    }
    for (id, until) in &d.oidc_used {
        tx.execute(
            "INSERT INTO oidc_used (id, until) VALUES ($1, $2)",
            &[id, until],
        )?;
    }
    for r in &d.revocations {
        tx.execute(
            "INSERT INTO revocations (version, fingerprint, name, not_after, at) VALUES ($1, $2, $3, $4, $5)",
            &[&r.version, &r.fingerprint, &r.name, &r.not_after, &r.at],
        )?;
    }
    if let Some(last) = d.revocations.iter().map(|r| r.version).max() {
        // The next revocation made here gets a larger version.
        tx.execute(
            "SELECT setval(pg_get_serial_sequence('revocations', 'version'), $1)",
            &[&last],
        )?;
    }
    if let Some(cursor) = &d.lease_cursor {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('lease_cursor', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[cursor],
        )?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::testing::TestServer;
    use tern_lighthouse_core::enroll::{EnrollStore, NewToken, TokenRefusal};
    use tern_shared::testing::TestCa;

    const NOW: u64 = 1_700_000_000;

    /// A SQLite store with some of everything.
    fn filled_sqlite(dir: &std::path::Path) -> AnyStore {
        let mut s = AnyStore::Sqlite(SqliteStore::open(&dir.join("one.db")).unwrap());
        for (hash, uses) in [("aa", 2), ("bb", 1)] {
            s.create_token(
                &NewToken {
                    hash: hash.into(),
                    groups: vec!["ci".into()],
                    uses,
                    expires: NOW + 600,
                    cert_ttl: 300,
                },
                NOW,
            )
            .unwrap();
        }
        assert!(s.use_token("bb", NOW).unwrap().is_ok());
        let pool = vec!["100.64.100.0/29".parse().unwrap()];
        s.lease(&pool, "job-1", NOW + 300, NOW).unwrap().unwrap();
        s.lease(&pool, "job-2", NOW + 300, NOW).unwrap().unwrap();
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci"]);
        for name in ["job-1", "job-2"] {
            let node = ca.node(name, "100.64.100.1/10", &["ci"], &[], 600);
            s.record_issued(&node.cert, &"token".into(), NOW).unwrap();
            s.revoke(&node.cert.fingerprint(), name, NOW + 300, NOW)
                .unwrap();
        }
        assert!(s.use_oidc_token("iss jti-1", NOW + 60, NOW).unwrap());
        s
    }

    #[test]
    fn a_sqlite_store_moves_to_postgresql_and_back_unchanged() {
        let Some(server) = TestServer::start() else {
            return;
        };
        server.create_db("shared");
        let dir = tempfile::tempdir().unwrap();
        let mut one = filled_sqlite(dir.path());
        let dump = one.dump().unwrap();
        assert_eq!(dump.tokens.len(), 2);
        assert_eq!(dump.revocations.len(), 2);
        assert!(dump.lease_cursor.is_some());

        let mut shared = AnyStore::Postgres(Box::new(
            PostgresStore::connect(&server.url("shared"), None).unwrap(),
        ));
        shared.load(&dump).unwrap();
        assert_eq!(shared.dump().unwrap(), dump);
        // The state works there: uses left, spent tokens, replay marks,
        // leases, and revocations numbered on from the copied ones.
        assert!(shared.use_token("aa", NOW).unwrap().is_ok());
        assert_eq!(
            shared.use_token("bb", NOW).unwrap(),
            Err(TokenRefusal::UsedUp)
        );
        assert!(!shared.use_oidc_token("iss jti-1", NOW + 60, NOW).unwrap());
        let pool = vec!["100.64.100.0/29".parse().unwrap()];
        let next = shared
            .lease(&pool, "job-3", NOW + 300, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(next, "100.64.100.3".parse::<std::net::Ipv4Addr>().unwrap());
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci"]);
        let third = ca.node("job-3", "100.64.100.3/10", &["ci"], &[], 600);
        shared
            .revoke(&third.cert.fingerprint(), "job-3", NOW + 300, NOW)
            .unwrap();
        let versions: Vec<u32> = shared
            .revocations(NOW)
            .unwrap()
            .iter()
            .map(|(v, _)| *v)
            .collect();
        let copied = dump.revocations.iter().map(|r| r.version).max().unwrap() as u32;
        assert_eq!(versions.len(), 3);
        assert!(versions[2] > copied, "{versions:?}");

        // Into a store that holds anything: refused, nothing written.
        let err = shared.load(&dump).unwrap_err();
        assert!(matches!(err, StoreError::NotEmpty(_)), "{err}");
        // And back into a new SQLite file.
        let mut back = AnyStore::Sqlite(SqliteStore::open(&dir.path().join("two.db")).unwrap());
        let moved = shared.dump().unwrap();
        back.load(&moved).unwrap();
        assert_eq!(back.dump().unwrap(), moved);
    }
}
