//! The enrollment state in PostgreSQL, shared by several lighthouses: what
//! must hold across them is held by the database — a token's uses are
//! spent by one conditional `UPDATE`, an address is leased by an `INSERT
//! ... ON CONFLICT` that only takes a lease that expired (the primary key
//! makes a second live lease of one address impossible), an OIDC token is
//! marked used by an insert that succeeds once, and revocations are
//! numbered by a sequence and announced with `NOTIFY tern_revocations`.
//!
//! The connection is made again when it is lost (the database restarted,
//! failed over, or was unreachable for a while): every call first checks
//! it, and while the database cannot be reached calls fail at once with
//! [`StoreError::Unavailable`] (one new attempt at most every
//! [`RECONNECT_EVERY`]), so a lighthouse refuses enrollments with that
//! reason instead of waiting, and goes on once the database is back.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use postgres::{Client, NoTls, Statement, Transaction};
use tern_lighthouse_core::enroll::{
    token_id, EnrollStore, Grant, HostRanges, Issuance, NewToken, TokenIdPrefix, TokenInfo,
    TokenRefusal, TokenRevokeRefusal, TOKEN_ID_LEN,
};
use tern_shared::cert::{Cert, Fingerprint};
use tern_shared::control::Revocation;

use super::{grant_of, refusal_after_failed_use, stored_time, token_verdict, StoreError, TokenRow};

/// The channel revocations are announced on.
pub const REVOCATIONS_CHANNEL: &str = "tern_revocations";

/// The schema's versions, each applied once, in order, in one transaction
/// with its version recorded (`tern_schema`).
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE tokens (
         hash TEXT PRIMARY KEY, groups TEXT NOT NULL, uses_left BIGINT NOT NULL,
         expires BIGINT NOT NULL, cert_ttl BIGINT NOT NULL, created BIGINT NOT NULL,
         seq BIGSERIAL NOT NULL);
     CREATE TABLE leases (ip TEXT PRIMARY KEY, name TEXT NOT NULL, until BIGINT NOT NULL);
     CREATE TABLE issued (
         fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, ip TEXT NOT NULL,
         groups TEXT NOT NULL, not_after BIGINT NOT NULL, how TEXT NOT NULL, at BIGINT NOT NULL);
     CREATE INDEX issued_by_name ON issued (name);
     CREATE TABLE oidc_used (id TEXT PRIMARY KEY, until BIGINT NOT NULL);
     CREATE INDEX oidc_used_until ON oidc_used (until);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE revocations (
         version BIGSERIAL PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,
         name TEXT NOT NULL, not_after BIGINT NOT NULL, at BIGINT NOT NULL);",
    // 2: which token bought a certificate, and the OIDC claims; the
    // issuance log read newest first without a sort.
    "ALTER TABLE issued ADD COLUMN token TEXT NOT NULL DEFAULT '';
     ALTER TABLE issued ADD COLUMN claims TEXT NOT NULL DEFAULT '{}';
     CREATE INDEX issued_by_time ON issued (at, fingerprint);",
    // 3: flow records nodes send (`flows.rs`), once per node and sequence
    // number; which nodes dropped how many.
    "CREATE TABLE flows (
         id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, node_fingerprint TEXT NOT NULL,
         seq BIGINT NOT NULL, start_ms BIGINT NOT NULL, end_ms BIGINT NOT NULL,
         caller TEXT NOT NULL, fingerprint TEXT NOT NULL, groups TEXT NOT NULL,
         src BIGINT NOT NULL, src_port INTEGER NOT NULL, dst BIGINT NOT NULL,
         dst_port INTEGER NOT NULL, dst_port_last INTEGER NOT NULL, proto INTEGER NOT NULL,
         allowed INTEGER NOT NULL, rule INTEGER, reason TEXT NOT NULL,
         bytes_in BIGINT NOT NULL, packets_in BIGINT NOT NULL,
         bytes_out BIGINT NOT NULL, packets_out BIGINT NOT NULL,
         UNIQUE (node, seq));
     CREATE INDEX flows_by_end ON flows (end_ms);
     CREATE INDEX flows_by_caller ON flows (fingerprint, end_ms);
     CREATE INDEX flows_by_name ON flows (caller, end_ms);
     CREATE TABLE flow_sources (
         node TEXT PRIMARY KEY, node_fingerprint TEXT NOT NULL,
         dropped BIGINT NOT NULL, seen BIGINT NOT NULL);",
];

/// While the database cannot be reached, a new connection is tried at most
/// this often (calls in between fail at once).
pub const RECONNECT_EVERY: Duration = Duration::from_millis(500);
/// How long one connection attempt may take (a database host that drops
/// packets must not hold enrollment up for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long sent data may stay unacknowledged before the connection counts
/// as lost (a database that vanished without closing it).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection unused this long is checked before its next use.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// [`EnrollStore`] in PostgreSQL.
pub struct PostgresStore {
    config: postgres::Config,
    /// TLS to the server (`sslmode=verify-full` and its synonyms), or none.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// None while the database cannot be reached.
    db: Option<Client>,
    last_attempt: Option<Instant>,
    last_used: Option<Instant>,
    /// The schema's version before and after the first connection's
    /// migrations.
    migrated: Option<(usize, usize)>,
    /// Statements of enrollment's path, prepared once per connection (each
    /// would otherwise cost a round trip more every time).
    statements: std::collections::HashMap<&'static str, Statement>,
    /// Inside [`PostgresStore::atomically`].
    in_transaction: bool,
}

impl PostgresStore {
    /// Connects (`postgres://USER@HOST:PORT/DB?sslmode=verify-full|disable`; the
    /// password given apart, never in the URL) and brings the schema up to
    /// date.
    pub fn connect(url: &str, password: Option<&str>) -> Result<PostgresStore, StoreError> {
        let mut store = Self::configure(url, password)?;
        store.client()?;
        Ok(store)
    }

    /// Like [`PostgresStore::connect`], but a database that cannot be
    /// reached now (down, restarting, unreachable) is not an error: it is
    /// tried again at each use. One that answers and refuses (a wrong
    /// password, no such database or user) is.
    pub fn connect_or_wait(url: &str, password: Option<&str>) -> Result<PostgresStore, StoreError> {
        let mut store = Self::configure(url, password)?;
        match store.client() {
            Ok(_) => {}
            Err(StoreError::Postgres(e)) if unreachable(&e) => {
                tracing::warn!(error = %e, "the store's database cannot be reached; enrollments are refused (store unavailable) until it can")
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    fn configure(url: &str, password: Option<&str>) -> Result<PostgresStore, StoreError> {
        let (url, tls) = split_tls(url)?;
        let mut config: postgres::Config = url.parse()?;
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
        config.application_name("tern-lighthouse");
        Ok(PostgresStore {
            config,
            tls: tls.map(tokio_postgres_rustls::MakeRustlsConnect::new),
            db: None,
            last_attempt: None,
            last_used: None,
            migrated: None,
            statements: std::collections::HashMap::new(),
            in_transaction: false,
        })
    }

    /// The schema's version before and after the first connection's
    /// migrations (none before a first connection).
    pub fn migrated(&self) -> Option<(usize, usize)> {
        self.migrated
    }

    /// Whether a connection is open now (it may still turn out lost).
    pub fn is_connected(&self) -> bool {
        self.db.as_ref().is_some_and(|c| !c.is_closed())
    }

    /// The open connection, made again (and the schema brought up to date)
    /// if it was lost.
    pub(super) fn client(&mut self) -> Result<&mut Client, StoreError> {
        let now = Instant::now();
        // The client notices a closed connection only when it uses it: one
        // idle for a while is checked first (a round trip), so the first
        // enrollment after a database restart does not fail on the old one.
        let idle = self
            .last_used
            .is_none_or(|t| now.saturating_duration_since(t) >= CHECK_IDLE_AFTER);
        if self.in_transaction {
            // Inside [`PostgresStore::atomically`]: the connection it began
            // on, or nothing.
            return match self.db.as_mut() {
                Some(db) if !db.is_closed() => Ok(db),
                _ => Err(StoreError::Unavailable(
                    "the connection was lost in the middle of a transaction".into(),
                )),
            };
        }
        if let Some(db) = self.db.as_mut() {
            if db.is_closed() || (idle && db.is_valid(CONNECT_TIMEOUT).is_err()) {
                self.db = None;
                self.statements.clear();
                tracing::warn!("lost the connection to the store's database; connecting again");
            }
        }
        self.last_used = Some(now);
        if self.db.is_none() {
            if self
                .last_attempt
                .is_some_and(|t| now.saturating_duration_since(t) < RECONNECT_EVERY)
            {
                return Err(StoreError::Unavailable(
                    "the database could not be reached a moment ago".into(),
                ));
            }
            let again = self.last_attempt.replace(now).is_some();
            let mut db = match &self.tls {
                Some(tls) => self.config.connect(tls.clone())?,
                None => self.config.connect(NoTls)?,
            };
            let (from, to) = migrate(&mut db)?;
            if from != to {
                tracing::info!(from, to, "migrated the store's schema");
            }
            self.migrated.get_or_insert((from, to));
            if again {
                tracing::info!("connected to the store's database again");
            }
            self.db = Some(db);
        }
        self.db
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("not connected".into()))
    }

    /// Applies the migrations this database lacks: the schema's version
    /// before and after.
    pub fn migrate(&mut self) -> Result<(usize, usize), StoreError> {
        migrate(self.client()?)
    }

    /// The newest revocation's version: it changes whenever a revocation
    /// is added, at any lighthouse.
    pub fn revocations_version(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .client()?
            .query_one("SELECT coalesce(max(version), 0) FROM revocations", &[])?
            .get(0))
    }

    /// At most `limit` issuance records older than `before` (at,
    /// fingerprint), newest first.
    pub fn issued_page(
        &mut self,
        before: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<super::copy::IssuedRecord>, StoreError> {
        let (at, fp) = before.unwrap_or((i64::MAX, ""));
        let rows = self.client()?.query(
            "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued
             WHERE at < $1 OR (at = $1 AND fingerprint < $2)
             ORDER BY at DESC, fingerprint DESC LIMIT $3",
            &[&at, &fp, &(limit as i64)],
        )?;
        Ok(rows
            .iter()
            .map(super::copy::IssuedRecord::from_postgres)
            .collect())
    }

    /// The issuance records of these certificates.
    pub fn issued_records(
        &mut self,
        fingerprints: &[String],
    ) -> Result<Vec<super::copy::IssuedRecord>, StoreError> {
        let rows = self.client()?.query(
            "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued
             WHERE fingerprint = ANY($1)",
            &[&fingerprints],
        )?;
        Ok(rows
            .iter()
            .map(super::copy::IssuedRecord::from_postgres)
            .collect())
    }

    /// How many certificates were issued at or after `since` (Unix seconds).
    pub fn issued_since(&mut self, since: i64) -> Result<u64, StoreError> {
        let n: i64 = self
            .client()?
            .query_one("SELECT count(*) FROM issued WHERE at >= $1", &[&since])?
            .get(0);
        Ok(n.max(0) as u64)
    }

    /// The issuance record of the certificate with this fingerprint.
    pub fn issued_record(
        &mut self,
        fingerprint: &str,
    ) -> Result<Option<super::copy::IssuedRecord>, StoreError> {
        let row = self.client()?.query_opt(
            "SELECT fingerprint, name, ip, groups, not_after, how, at, token, claims FROM issued
             WHERE fingerprint = $1",
            &[&fingerprint],
        )?;
        Ok(row.as_ref().map(super::copy::IssuedRecord::from_postgres))
    }

    /// A connection of its own that waits for revocations announced on
    /// `tern_revocations` (by any lighthouse).
    pub fn listen_for_revocations(&self) -> Result<RevocationListener, StoreError> {
        let mut client = match &self.tls {
            Some(tls) => self.config.connect(tls.clone())?,
            None => self.config.connect(NoTls)?,
        };
        client.batch_execute(&format!("LISTEN {REVOCATIONS_CHANNEL}"))?;
        Ok(RevocationListener { client })
    }

    /// `f` in one transaction on one connection: all it wrote, or (it
    /// failed, or the connection was lost) nothing. A lost connection is
    /// not replaced inside it.
    fn atomically<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.client()?.batch_execute("BEGIN")?;
        self.in_transaction = true;
        let result = f(self);
        self.in_transaction = false;
        match result {
            Ok(v) => {
                self.client()?.batch_execute("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                if let Ok(db) = self.client() {
                    let _ = db.batch_execute("ROLLBACK");
                }
                Err(e)
            }
        }
    }

    /// `sql` prepared on the current connection (once per connection).
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        // Connected first: a new connection forgets the old statements.
        self.client()?;
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client()?.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn token_row(&mut self, hash: &str) -> Result<Option<TokenRow>, StoreError> {
        let statement = self
            .prepared("SELECT groups, uses_left, expires, cert_ttl FROM tokens WHERE hash = $1")?;
        Ok(self
            .client()?
            .query_opt(&statement, &[&hash])?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
    }
}

/// A connection listening for revocation announcements.
pub struct RevocationListener {
    client: Client,
}

impl RevocationListener {
    /// Waits up to `timeout` for an announcement: whether one came (all
    /// that came are taken). An error: the connection is lost.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, StoreError> {
        if self.client.is_closed() {
            return Err(StoreError::Unavailable(
                "the listening connection closed".into(),
            ));
        }
        use postgres::fallible_iterator::FallibleIterator;
        let mut notifications = self.client.notifications();
        let came = notifications.timeout_iter(timeout).next()?.is_some();
        // Several revocations at once: one read covers them all.
        while notifications.iter().next()?.is_some() {}
        Ok(came)
    }
}

/// Takes libpq's `sslmode` and `sslrootcert` out of `url` (the client knows
/// only `disable`, `prefer` and `require`, and no CA file): the URL the
/// client reads, and the TLS configuration when TLS is asked for — the
/// server's certificate verified against the CA file, else the public
/// web's roots, and its name against the URL's host, whatever the mode
/// says (`require` and `verify-ca` verify less in libpq; a lighthouse's
/// store is never spoken to unverified).
fn split_tls(url: &str) -> Result<(String, Option<rustls::ClientConfig>), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut kept = Vec::new();
    let (mut tls, mut ca_file) = (false, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", "require" | "verify-ca" | "verify-full")) => tls = true,
            Some(("sslmode", _)) => kept.push(pair),
            Some(("sslrootcert", path)) => ca_file = Some(path),
            _ => kept.push(pair),
        }
    }
    if tls {
        kept.push("sslmode=require");
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    if !tls {
        return Ok((url, None));
    }
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<_, _>>())
                .map_err(|e| StoreError::Tls(format!("sslrootcert {path}: {e}")))?;
            if certs.is_empty() {
                return Err(StoreError::Tls(format!(
                    "sslrootcert {path}: no certificate in it"
                )));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| StoreError::Tls(format!("sslrootcert {path}: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((url, Some(config)))
}

/// Applies the migrations this database lacks, in one transaction: the
/// schema's version before and after. Lighthouses starting at once wait for each
/// other (an advisory lock), so each migration runs once.
fn migrate(db: &mut Client) -> Result<(usize, usize), StoreError> {
    let mut tx = db.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7414)", &[])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tern_schema (version INTEGER NOT NULL)")?;
    let current: i32 = tx
        .query_opt("SELECT max(version) FROM tern_schema", &[])?
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .unwrap_or(0);
    let current = usize::try_from(current).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql)?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("INSERT INTO tern_schema (version) VALUES ($1)", &[&version])?;
    }
    tx.commit()?;
    Ok((current, MIGRATIONS.len()))
}

/// Whether `e` says the database could not be reached (down, restarting,
/// shutting down, the connection lost) rather than that it refused us.
pub fn unreachable(e: &postgres::Error) -> bool {
    match e.code() {
        // Connection exceptions and operator intervention (shutdown,
        // "the database system is starting up").
        Some(code) => matches!(&code.code()[..2], "08" | "57"),
        None => {
            let text = e.to_string();
            !(text.starts_with("authentication error") || text.starts_with("invalid configuration"))
        }
    }
}

/// Takes `ip` for `name` unless it holds a lease that has not expired by
/// `now`: one statement, so two lighthouses cannot both take it.
fn take_lease(
    tx: &mut Transaction<'_>,
    statement: &Statement,
    ip: Ipv4Addr,
    name: &str,
    until: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let taken = tx.query_opt(statement, &[&ip.to_string(), &name, &until, &now])?;
    Ok(taken.is_some())
}

/// [`take_lease`]'s statement.
const TAKE_LEASE: &str = "INSERT INTO leases (ip, name, until) VALUES ($1, $2, $3)
     ON CONFLICT (ip) DO UPDATE SET name = EXCLUDED.name, until = EXCLUDED.until
     WHERE leases.until <= $4
     RETURNING ip";

impl EnrollStore for PostgresStore {
    type Error = StoreError;

    fn create_token(&mut self, t: &NewToken, now: u64) -> Result<(), StoreError> {
        self.client()?.execute(
            "INSERT INTO tokens (hash, groups, uses_left, expires, cert_ttl, created) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&t.hash, &t.groups.join(","), &i64::from(t.uses), &stored_time(t.expires), &stored_time(t.cert_ttl), &stored_time(now)],
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
        // One statement: the check and the decrement are one atomic step,
        // whichever lighthouse runs it.
        let statement = self.prepared(
            "UPDATE tokens SET uses_left = uses_left - 1
             WHERE hash = $1 AND uses_left > 0 AND expires > $2
             RETURNING groups, cert_ttl",
        )?;
        let used = self
            .client()?
            .query_opt(&statement, &[&hash, &stored_time(now)])?;
        if let Some(row) = used {
            return Ok(Ok(grant_of(&row.get::<_, String>(0), row.get(1))));
        }
        Ok(Err(refusal_after_failed_use(self.token_row(hash)?, now)))
    }

    fn lease(
        &mut self,
        pool: &[Ipv4Net],
        name: &str,
        until: u64,
        now: u64,
    ) -> Result<Option<Ipv4Addr>, StoreError> {
        // Round robin from the address leased last, as in SQLite; the
        // cursor's row lock makes lighthouses leasing at once take turns.
        let make_cursor = self.prepared(
            "INSERT INTO meta (key, value) VALUES ('lease_cursor', '') ON CONFLICT (key) DO NOTHING",
        )?;
        let lock_cursor =
            self.prepared("SELECT value FROM meta WHERE key = 'lease_cursor' FOR UPDATE")?;
        let take = self.prepared(TAKE_LEASE)?;
        let move_cursor = self.prepared("UPDATE meta SET value = $1 WHERE key = 'lease_cursor'")?;
        let mut tx = self.client()?.transaction()?;
        tx.execute(&make_cursor, &[])?;
        let cursor: Option<Ipv4Addr> = tx
            .query_one(&lock_cursor, &[])?
            .get::<_, String>(0)
            .parse()
            .ok();
        let hosts = HostRanges::of(pool);
        let total = hosts.total();
        let start = cursor.and_then(|c| hosts.index_of(c)).map_or(0, |i| i + 1);
        let mut found = None;
        for ip in (0..total).filter_map(|i| hosts.at((start + i) % total.max(1))) {
            if take_lease(
                &mut tx,
                &take,
                ip,
                name,
                stored_time(until),
                stored_time(now),
            )? {
                tx.execute(&move_cursor, &[&ip.to_string()])?;
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
            let statement = s.prepared(
                "INSERT INTO leases (ip, name, until) VALUES ($1, $2, $3)
                 ON CONFLICT (ip) DO UPDATE SET name = EXCLUDED.name, until = GREATEST(leases.until, EXCLUDED.until)
                 WHERE leases.name = EXCLUDED.name OR leases.until <= $4",
            )?;
            let held = s.client()?.execute(
                &statement,
                &[&ip.to_string(), &name, &stored_time(until), &stored_time(now)],
            )? == 1;
            if held {
                s.record_issued(cert, how, now)?;
            }
            Ok(held)
        })
    }

    fn release_lease(&mut self, ip: Ipv4Addr, name: &str) -> Result<(), StoreError> {
        self.client()?.execute(
            "DELETE FROM leases WHERE ip = $1 AND name = $2",
            &[&ip.to_string(), &name],
        )?;
        Ok(())
    }

    fn record_issued(&mut self, cert: &Cert, how: &Issuance, now: u64) -> Result<(), StoreError> {
        let b = &cert.body;
        let statement = self.prepared(
            "INSERT INTO issued (fingerprint, name, ip, groups, not_after, how, at, token, claims) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (fingerprint) DO UPDATE SET name = EXCLUDED.name, ip = EXCLUDED.ip,
                 groups = EXCLUDED.groups, not_after = EXCLUDED.not_after, how = EXCLUDED.how, at = EXCLUDED.at,
                 token = EXCLUDED.token, claims = EXCLUDED.claims",
        )?;
        self.client()?.execute(
            &statement,
            &[
                &cert.fingerprint().to_string(),
                &b.name,
                &b.ips.first().map(|n| n.to_string()).unwrap_or_default(),
                &b.groups.join(","),
                &stored_time(b.not_after),
                &how.how,
                &stored_time(now),
                &how.token.as_deref().unwrap_or(""),
                &how.claims_json(),
            ],
        )?;
        Ok(())
    }

    fn oidc_token_used(&mut self, id: &str, now: u64) -> Result<bool, StoreError> {
        let statement = self.prepared("SELECT 1 FROM oidc_used WHERE id = $1 AND until >= $2")?;
        Ok(self
            .client()?
            .query_opt(&statement, &[&id, &stored_time(now)])?
            .is_some())
    }

    fn use_oidc_token(&mut self, id: &str, until: u64, now: u64) -> Result<bool, StoreError> {
        let forget = self.prepared("DELETE FROM oidc_used WHERE until < $1")?;
        let mark = self.prepared(
            "INSERT INTO oidc_used (id, until) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )?;
        self.client()?.execute(&forget, &[&stored_time(now)])?;
        let added = self.client()?.execute(&mark, &[&id, &stored_time(until)])?;
        Ok(added == 1)
    }

    fn issued_named(
        &mut self,
        name: &str,
        now: u64,
    ) -> Result<Vec<(Fingerprint, u64)>, StoreError> {
        let rows = self.client()?.query(
            "SELECT fingerprint, not_after FROM issued WHERE name = $1 AND not_after >= $2",
            &[&name, &stored_time(now)],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let fp: String = r.get(0);
                let not_after: i64 = r.get(1);
                Some((fp.parse().ok()?, not_after.max(0) as u64))
            })
            .collect())
    }

    fn issued(&mut self, fingerprint: &Fingerprint) -> Result<Option<(String, u64)>, StoreError> {
        Ok(self
            .client()?
            .query_opt(
                "SELECT name, not_after FROM issued WHERE fingerprint = $1",
                &[&fingerprint.to_string()],
            )?
            .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64)))
    }

    fn revoke(
        &mut self,
        fingerprint: &Fingerprint,
        name: &str,
        not_after: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.client()?.transaction()?;
        let added = tx.execute(
            "INSERT INTO revocations (fingerprint, name, not_after, at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (fingerprint) DO NOTHING",
            &[
                &fingerprint.to_string(),
                &name,
                &stored_time(not_after),
                &stored_time(now),
            ],
        )?;
        if added == 1 {
            // Delivered at commit, to every lighthouse listening.
            tx.batch_execute(&format!("NOTIFY {REVOCATIONS_CHANNEL}"))?;
        }
        tx.commit()?;
        Ok(added == 1)
    }

    fn revocations(&mut self, now: u64) -> Result<Vec<(u32, Revocation)>, StoreError> {
        let rows = self.client()?.query(
            "SELECT version, fingerprint, not_after FROM revocations WHERE not_after >= $1 ORDER BY version",
            &[&stored_time(now)],
        )?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let version = u32::try_from(r.get::<_, i64>(0)).ok()?;
                let fingerprint = r.get::<_, String>(1).parse().ok()?;
                let not_after = r.get::<_, i64>(2).max(0) as u64;
                Some((
                    version,
                    Revocation {
                        fingerprint,
                        not_after,
                    },
                ))
            })
            .collect())
    }

    fn list_tokens(&mut self, now: u64) -> Result<Vec<TokenInfo>, StoreError> {
        // The id is cut in the query: the rest of the hash never leaves it.
        let rows = self.client()?.query(
            "SELECT left(hash, $1), groups, uses_left, expires, created, cert_ttl FROM tokens ORDER BY created, seq",
            &[&(TOKEN_ID_LEN as i32)],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                let expires: i64 = r.get(3);
                let grant = grant_of(&r.get::<_, String>(1), r.get(5));
                TokenInfo {
                    id: r.get(0),
                    groups: grant.groups,
                    uses_left: u32::try_from(r.get::<_, i64>(2).max(0)).unwrap_or(u32::MAX),
                    expires: expires.max(0) as u64,
                    created: r.get::<_, i64>(4).max(0) as u64,
                    cert_ttl: grant.cert_ttl,
                    expired: expires <= stored_time(now),
                }
            })
            .collect())
    }

    fn revoke_token(
        &mut self,
        id: &TokenIdPrefix,
    ) -> Result<Result<String, TokenRevokeRefusal>, StoreError> {
        let prefix = id.as_str();
        let mut tx = self.client()?.transaction()?;
        // No token made meanwhile can turn a unique prefix into an
        // ambiguous one between the look and the delete.
        tx.batch_execute("LOCK TABLE tokens IN SHARE ROW EXCLUSIVE MODE")?;
        let matching: Vec<String> = tx
            .query(
                "SELECT hash FROM tokens WHERE left(hash, $1) = $2",
                &[&(prefix.len() as i32), &prefix],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let hash = match matching.as_slice() {
            [] => return Ok(Err(TokenRevokeRefusal::Unknown(prefix.to_string()))),
            [one] => one.clone(),
            more => {
                return Ok(Err(TokenRevokeRefusal::Ambiguous {
                    id: prefix.to_string(),
                    count: more.len(),
                }))
            }
        };
        tx.execute("DELETE FROM tokens WHERE hash = $1", &[&hash])?;
        tx.commit()?;
        Ok(Ok(token_id(&hash).to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use crate::store::testing::TestServer;
    use tern_lighthouse_core::enroll::{new_token, Enroller};
    use tern_shared::enroll::{token_hash, EnrollRequest, REFUSED_STORE_UNAVAILABLE};
    use tern_shared::testing::{TestCa, TEST_NOW};

    /// Connections to one fresh database on a server of the test's own.
    pub(crate) struct PostgresBackend {
        server: TestServer,
    }

    impl PostgresBackend {
        pub(crate) fn new() -> Option<PostgresBackend> {
            let server = TestServer::start()?;
            server.create_db("tern");
            Some(PostgresBackend { server })
        }
    }

    impl crate::store::suite::Backend for PostgresBackend {
        type Store = PostgresStore;
        fn connect(&self) -> PostgresStore {
            PostgresStore::connect(&self.server.url("tern"), None).unwrap()
        }
    }

    crate::store::suite::store_suite!(PostgresBackend::new());

    #[test]
    fn migrations_run_once_and_a_second_lighthouse_finds_the_schema_done() {
        let Some(b) = PostgresBackend::new() else {
            return;
        };
        use crate::store::suite::Backend;
        let mut one = b.connect();
        let mut two = b.connect();
        let done = (MIGRATIONS.len(), MIGRATIONS.len());
        assert_eq!(one.migrate().unwrap(), done);
        assert_eq!(two.migrate().unwrap(), done);
        let versions: i64 = one
            .client()
            .unwrap()
            .query_one("SELECT count(*) FROM tern_schema", &[])
            .unwrap()
            .get(0);
        assert_eq!(versions, MIGRATIONS.len() as i64);
    }

    /// An enroller with a one-use token in `store`: (enroller, token).
    fn enroller_with_token(store: &mut PostgresStore) -> (Enroller, String) {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci"]);
        let issuer = ca.issuer("lh-issuer", "100.64.100.0/30", &["ci"], "ci-", 3600);
        let enroller = Enroller::new(issuer.cert, issuer.key, 10).unwrap();
        let token = new_token();
        store
            .create_token(
                &NewToken {
                    hash: token_hash(&token),
                    groups: vec!["ci".into()],
                    uses: 1,
                    expires: TEST_NOW + 600,
                    cert_ttl: 600,
                },
                TEST_NOW,
            )
            .unwrap();
        (enroller, token)
    }

    fn request(token: &str, key: u8) -> EnrollRequest {
        EnrollRequest {
            token: Some(token.into()),
            oidc: None,
            public_key: [key; 32],
            name_hint: None,
        }
    }

    #[test]
    fn a_database_outage_refuses_enrollment_as_store_unavailable_and_spends_nothing() {
        let Some(b) = PostgresBackend::new() else {
            return;
        };
        use crate::store::suite::Backend;
        let mut store = b.connect();
        let (enroller, token) = enroller_with_token(&mut store);
        b.server.stop();
        let down = enroller.enroll(&request(&token, 1), &mut store, TEST_NOW);
        assert_eq!(down.cert, None);
        assert_eq!(down.code.as_deref(), Some(REFUSED_STORE_UNAVAILABLE));
        let why = down.refused.unwrap();
        assert!(why.starts_with("store unavailable"), "{why}");
        assert!(!store.is_connected());
        // While it is down every call fails at once with the same reason.
        assert!(matches!(
            store.peek_token(&token_hash(&token), TEST_NOW),
            Err(StoreError::Unavailable(_) | StoreError::Postgres(_))
        ));
        b.server.start_again();
        std::thread::sleep(RECONNECT_EVERY);
        let up = enroller.enroll(&request(&token, 1), &mut store, TEST_NOW);
        assert!(up.cert.is_some(), "{:?}", up.refused);
        assert!(store.is_connected());
        // The token had kept its one use: it is spent now, once.
        let again = enroller.enroll(&request(&token, 2), &mut store, TEST_NOW);
        assert!(again.refused.unwrap().contains("used up"));
        assert_eq!(again.code, None);
    }

    #[test]
    fn a_lighthouse_starts_while_its_database_is_down_and_connects_when_it_is_back() {
        let Some(b) = PostgresBackend::new() else {
            return;
        };
        b.server.stop();
        let url = b.server.url("tern");
        assert!(
            PostgresStore::connect(&url, None).is_err(),
            "the command line wants the database now"
        );
        let mut store = PostgresStore::connect_or_wait(&url, None).unwrap();
        assert!(!store.is_connected());
        assert!(store.revocations_version().is_err());
        b.server.start_again();
        std::thread::sleep(RECONNECT_EVERY);
        assert_eq!(store.revocations_version().unwrap(), 0);
        assert!(store.is_connected());
        // A database that answers and refuses is an error at once.
        let err = PostgresStore::connect_or_wait(&b.server.url("no_such_db"), None)
            .err()
            .expect("no such database");
        assert!(err.to_string().contains("no_such_db"), "{err}");
    }

    #[test]
    fn tls_is_used_and_the_server_verified_against_the_named_ca() {
        let Some(server) = TestServer::start_tls() else {
            return;
        };
        server.create_db("tern");
        let url = |query: &str| server.tcp_url("tern").replace("sslmode=disable", query);
        let ca = server.ca_file();
        let mut store = PostgresStore::connect(
            &url(&format!("sslmode=verify-full&sslrootcert={}", ca.display())),
            None,
        )
        .unwrap();
        let ssl: bool = store
            .client()
            .unwrap()
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ssl, "the connection is TLS");
        assert_eq!(store.revocations_version().unwrap(), 0);
        // Without TLS the same server is reached in clear.
        let mut plain = PostgresStore::connect(&url("sslmode=disable"), None).unwrap();
        let ssl: bool = plain
            .client()
            .unwrap()
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(!ssl);
        // A server whose certificate another CA signed is refused, whatever
        // the mode's name (require verifies too), as is one the public web's
        // roots do not know.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
        for query in [
            format!("sslmode=require&sslrootcert={}", other.display()),
            "sslmode=verify-full".to_string(),
        ] {
            let err = PostgresStore::connect(&url(&query), None)
                .err()
                .unwrap_or_else(|| panic!("{query}: connected to an unverified server"));
            assert!(err.to_string().contains("certificate"), "{query}: {err}");
        }
        // A CA file that is not one says so.
        std::fs::write(&other, "not a certificate").unwrap();
        let err = PostgresStore::connect(
            &url(&format!(
                "sslmode=verify-full&sslrootcert={}",
                other.display()
            )),
            None,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }

    #[test]
    fn a_revocation_made_on_one_connection_is_heard_on_a_listening_one() {
        let Some(b) = PostgresBackend::new() else {
            return;
        };
        use crate::store::suite::Backend;
        let watcher = b.connect();
        let mut listener = watcher.listen_for_revocations().unwrap();
        assert!(
            !listener.wait(Duration::from_millis(50)).unwrap(),
            "nothing yet"
        );
        let mut other = b.connect();
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci"]);
        for name in ["one", "two"] {
            let node = ca.node(name, "100.64.0.9/10", &["ci"], &[], 600);
            assert!(other
                .revoke(&node.cert.fingerprint(), name, TEST_NOW + 600, TEST_NOW)
                .unwrap());
        }
        assert!(listener.wait(Duration::from_secs(5)).unwrap());
        // That wait took what had arrived; the second announcement may
        // still have been on its way (a loaded machine): at most one more
        // wait hears something, then nothing comes.
        let more = (0..3)
            .take_while(|_| listener.wait(Duration::from_millis(200)).unwrap())
            .count();
        assert!(more <= 1, "{more} announcements beyond the two revocations");
        // The database goes away: the listener says so.
        b.server.stop();
        assert!(listener.wait(Duration::from_millis(500)).is_err());
    }
}
