//! Flow records in the store (schema 3): written by the lighthouse's flow
//! thread (`io/flows.rs`) as nodes send them, once per node and sequence
//! number; read by `tern-lighthouse flows` and the admin API, each joined
//! to the issuance log, so that a flow from an enrolled job carries the
//! token or the ID token's claims it enrolled with; deleted after
//! `[flows] retain`. The same SQL for SQLite and PostgreSQL but for
//! placeholders, the insert's conflict clause and how a claim is read.

use std::str::FromStr;

use serde::Serialize;
use tern_lighthouse_core::flows::FlowQuery;
use tern_lighthouse_core::lighthouse::FlowBatch;
use tern_shared::cert::Fingerprint;
use tern_shared::flows::{FlowEnd, FlowEntry, FlowView};

use super::{AnyStore, StoreError};

/// A record as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFlow {
    /// The node that made it.
    pub node: String,
    pub entry: FlowEntry,
    /// How the caller's certificate was issued (`how`, `token`, `claims`),
    /// when this mesh's lighthouses issued it.
    pub enrollment: Option<serde_json::Value>,
}

impl StoredFlow {
    /// As JSON: what `--json` and the admin API give.
    pub fn view(&self) -> FlowView {
        let mut v = FlowView::new(&self.node, &self.entry);
        v.enrollment = self.enrollment.clone();
        v
    }
}

/// The claims that say which job a certificate was for, in this order
/// (GitHub's and GitLab's names): what a one-line summary shows.
const JOB_CLAIMS: &[&str] = &[
    "repository",
    "project_path",
    "workflow",
    "ref",
    "run_id",
    "pipeline_id",
    "job_id",
    "actor",
    "user_login",
];

/// How a caller enrolled, on one line: the claims that name its job
/// (`repository=acme/app ref=refs/heads/main run_id=42 actor=octocat`),
/// else every claim, else its token, else how; `-` for a certificate
/// signed by hand.
pub fn enrollment_summary(enrollment: Option<&serde_json::Value>) -> String {
    let Some(e) = enrollment else {
        return "-".into();
    };
    let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    if let Some(claims) = e.get("claims").and_then(|c| c.as_object()) {
        let named: Vec<String> = JOB_CLAIMS
            .iter()
            .filter_map(|k| claims.get(*k).map(|v| format!("{k}={}", text(v))))
            .collect();
        if !named.is_empty() {
            return named.join(" ");
        }
        let mut all: Vec<String> = claims
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect();
        all.sort();
        return all.join(" ");
    }
    match e.get("token").and_then(|t| t.as_str()) {
        Some(t) => format!("token {t}"),
        None => e.get("how").map(text).unwrap_or_else(|| "-".into()),
    }
}

/// A node that sends records, and how many it said it dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowSource {
    pub node: String,
    pub node_fingerprint: String,
    pub dropped: u64,
    /// When it last sent records (Unix ms).
    pub seen_ms: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// A query parameter, typed as its column.
enum Param {
    Big(i64),
    Int(i32),
    MaybeInt(Option<i32>),
    Text(String),
}

const COLUMNS: &str = "f.node, f.seq, f.start_ms, f.end_ms, f.caller, f.fingerprint, f.groups, \
     f.src, f.src_port, f.dst, f.dst_port, f.dst_port_last, f.proto, f.allowed, f.rule, \
     f.reason, f.bytes_in, f.packets_in, f.bytes_out, f.packets_out, i.how, i.token, i.claims";

const INSERT: &str = "INSERT INTO flows (node, node_fingerprint, seq, start_ms, end_ms, caller, \
     fingerprint, groups, src, src_port, dst, dst_port, dst_port_last, proto, allowed, rule, \
     reason, bytes_in, packets_in, bytes_out, packets_out) VALUES";

const UPSERT_SOURCE: &str = "INSERT INTO flow_sources (node, node_fingerprint, dropped, seen) \
     VALUES (P1, P2, P3, P4) ON CONFLICT (node) DO UPDATE SET \
     node_fingerprint = excluded.node_fingerprint, dropped = excluded.dropped, seen = excluded.seen";

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `text` with `P1`, `P2`, ... as the dialect's placeholders.
fn placeholders(text: &str, dialect: Dialect) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == 'P' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push(if dialect == Dialect::Sqlite { '?' } else { '$' });
        } else {
            out.push(c);
        }
    }
    out
}

fn insert_sql(dialect: Dialect) -> String {
    let values: Vec<String> = (1..=21).map(|i| format!("P{i}")).collect();
    // A record sent again (its acknowledgement lost) is kept once.
    placeholders(
        &format!(
            "{INSERT} ({}) ON CONFLICT (node, seq) DO NOTHING",
            values.join(", ")
        ),
        dialect,
    )
}

fn insert_params(batch: &FlowBatch, e: &FlowEntry) -> Vec<Param> {
    vec![
        Param::Text(batch.node.clone()),
        Param::Text(batch.node_fingerprint.to_string()),
        Param::Big(e.seq as i64),
        Param::Big(big(e.start_ms)),
        Param::Big(big(e.end_ms)),
        Param::Text(e.caller.clone()),
        Param::Text(e.fingerprint.to_string()),
        Param::Text(e.groups.join(",")),
        Param::Big(i64::from(u32::from(e.src))),
        Param::Int(i32::from(e.src_port)),
        Param::Big(i64::from(u32::from(e.dst))),
        Param::Int(i32::from(e.dst_port)),
        Param::Int(i32::from(e.dst_port_last)),
        Param::Int(i32::from(e.proto)),
        Param::Int(i32::from(e.allowed)),
        Param::MaybeInt(e.rule.map(i32::from)),
        Param::Text(e.reason.as_str().to_string()),
        Param::Big(big(e.bytes_in)),
        Param::Big(big(e.packets_in)),
        Param::Big(big(e.bytes_out)),
        Param::Big(big(e.packets_out)),
    ]
}

/// The SELECT for `q`, and its parameters.
fn select(q: &FlowQuery, now_ms: u64, dialect: Dialect) -> (String, Vec<Param>) {
    let mut conditions: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    let p = |v: Param, params: &mut Vec<Param>| {
        params.push(v);
        format!("P{}", params.len())
    };
    if let Some(name) = &q.name {
        let at = p(Param::Text(name.clone()), &mut params);
        conditions.push(format!("f.caller = {at}"));
    }
    if let Some(node) = &q.node {
        let at = p(Param::Text(node.clone()), &mut params);
        conditions.push(format!("f.node = {at}"));
    }
    if let Some(fp) = &q.fingerprint {
        if fp.len() == 64 {
            let at = p(Param::Text(fp.clone()), &mut params);
            conditions.push(format!("f.fingerprint = {at}"));
        } else {
            // Hex digits only (checked): no wildcard of the user's.
            let at = p(Param::Text(format!("{fp}%")), &mut params);
            conditions.push(format!("f.fingerprint LIKE {at}"));
        }
    }
    if let Some((key, value)) = &q.claim {
        // The claim's name: letters, digits, '_' and '-' (checked).
        let read = match dialect {
            Dialect::Sqlite => {
                let path = p(Param::Text(format!("$.\"{key}\"")), &mut params);
                format!("CAST(json_extract(i.claims, {path}) AS TEXT)")
            }
            Dialect::Postgres => {
                let k = p(Param::Text(key.clone()), &mut params);
                format!("(i.claims::jsonb ->> {k})")
            }
        };
        let at = p(Param::Text(value.clone()), &mut params);
        conditions.push(format!("{read} = {at}"));
    }
    if let Some((first, last, port)) = q.dest_range() {
        let a = p(Param::Big(i64::from(first)), &mut params);
        let b = p(Param::Big(i64::from(last)), &mut params);
        conditions.push(format!("f.dst BETWEEN {a} AND {b}"));
        if let Some(port) = port {
            let a = p(Param::Int(i32::from(port)), &mut params);
            let b = p(Param::Int(i32::from(port)), &mut params);
            conditions.push(format!("f.dst_port <= {a} AND f.dst_port_last >= {b}"));
        }
    }
    if let Some(since) = q.since_ms(now_ms) {
        let at = p(Param::Big(big(since)), &mut params);
        conditions.push(format!("f.end_ms >= {at}"));
    }
    if q.denied {
        conditions.push("f.allowed = 0".into());
    }
    let limit = p(Param::Big(q.limit as i64), &mut params);
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM flows f LEFT JOIN issued i ON i.fingerprint = f.fingerprint{filter} \
         ORDER BY f.end_ms DESC, f.id DESC LIMIT {limit}"
    );
    (placeholders(&sql, dialect), params)
}

/// A row's values, read from either database.
struct RowValues {
    node: String,
    seq: i64,
    start_ms: i64,
    end_ms: i64,
    caller: String,
    fingerprint: String,
    groups: String,
    src: i64,
    src_port: i32,
    dst: i64,
    dst_port: i32,
    dst_port_last: i32,
    proto: i32,
    allowed: i32,
    rule: Option<i32>,
    reason: String,
    counts: [i64; 4],
    how: Option<String>,
    token: Option<String>,
    claims: Option<String>,
}

impl RowValues {
    fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowValues> {
        Ok(RowValues {
            node: r.get(0)?,
            seq: r.get(1)?,
            start_ms: r.get(2)?,
            end_ms: r.get(3)?,
            caller: r.get(4)?,
            fingerprint: r.get(5)?,
            groups: r.get(6)?,
            src: r.get(7)?,
            src_port: r.get(8)?,
            dst: r.get(9)?,
            dst_port: r.get(10)?,
            dst_port_last: r.get(11)?,
            proto: r.get(12)?,
            allowed: r.get(13)?,
            rule: r.get(14)?,
            reason: r.get(15)?,
            counts: [r.get(16)?, r.get(17)?, r.get(18)?, r.get(19)?],
            how: r.get(20)?,
            token: r.get(21)?,
            claims: r.get(22)?,
        })
    }

    fn from_postgres(r: &postgres::Row) -> Result<RowValues, postgres::Error> {
        Ok(RowValues {
            node: r.try_get(0)?,
            seq: r.try_get(1)?,
            start_ms: r.try_get(2)?,
            end_ms: r.try_get(3)?,
            caller: r.try_get(4)?,
            fingerprint: r.try_get(5)?,
            groups: r.try_get(6)?,
            src: r.try_get(7)?,
            src_port: r.try_get(8)?,
            dst: r.try_get(9)?,
            dst_port: r.try_get(10)?,
            dst_port_last: r.try_get(11)?,
            proto: r.try_get(12)?,
            allowed: r.try_get(13)?,
            rule: r.try_get(14)?,
            reason: r.try_get(15)?,
            counts: [
                r.try_get(16)?,
                r.try_get(17)?,
                r.try_get(18)?,
                r.try_get(19)?,
            ],
            how: r.try_get(20)?,
            token: r.try_get(21)?,
            claims: r.try_get(22)?,
        })
    }

    /// The record; `None` for a row no lighthouse wrote (damaged by hand).
    fn into_flow(self) -> Option<StoredFlow> {
        let u16_of = |v: i32| u16::try_from(v).ok();
        let ip = |v: i64| u32::try_from(v).ok().map(std::net::Ipv4Addr::from);
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        let enrollment = self.how.map(|how| {
            let claims: serde_json::Value = self
                .claims
                .as_deref()
                .and_then(|c| serde_json::from_str(c).ok())
                .unwrap_or(serde_json::Value::Null);
            let mut e = serde_json::json!({ "how": how });
            if let Some(t) = self.token.filter(|t| !t.is_empty()) {
                e["token"] = serde_json::Value::String(t);
            }
            if claims.as_object().is_some_and(|c| !c.is_empty()) {
                e["claims"] = claims;
            }
            e
        });
        Some(StoredFlow {
            node: self.node,
            entry: FlowEntry {
                seq: self.seq as u64,
                start_ms: u64::try_from(self.start_ms).ok()?,
                end_ms: u64::try_from(self.end_ms).ok()?,
                caller: self.caller,
                fingerprint: Fingerprint::from_str(&self.fingerprint).ok()?,
                groups: self
                    .groups
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect(),
                src: ip(self.src)?,
                src_port: u16_of(self.src_port)?,
                dst: ip(self.dst)?,
                dst_port: u16_of(self.dst_port)?,
                dst_port_last: u16_of(self.dst_port_last)?,
                proto: u8::try_from(self.proto).ok()?,
                allowed: self.allowed != 0,
                rule: self.rule.and_then(|r| u16::try_from(r).ok()),
                reason: FlowEnd::parse(&self.reason)?,
                bytes_in: count(self.counts[0]),
                packets_in: count(self.counts[1]),
                bytes_out: count(self.counts[2]),
                packets_out: count(self.counts[3]),
            },
            enrollment,
        })
    }
}

fn sqlite_params(params: &[Param]) -> Vec<&dyn rusqlite::ToSql> {
    params
        .iter()
        .map(|p| match p {
            Param::Big(v) => v as &dyn rusqlite::ToSql,
            Param::Int(v) => v as &dyn rusqlite::ToSql,
            Param::MaybeInt(v) => v as &dyn rusqlite::ToSql,
            Param::Text(v) => v as &dyn rusqlite::ToSql,
        })
        .collect()
}

fn postgres_params(params: &[Param]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            Param::Big(v) => v as &(dyn postgres::types::ToSql + Sync),
            Param::Int(v) => v as &(dyn postgres::types::ToSql + Sync),
            Param::MaybeInt(v) => v as &(dyn postgres::types::ToSql + Sync),
            Param::Text(v) => v as &(dyn postgres::types::ToSql + Sync),
        })
        .collect()
}

impl AnyStore {
    /// Keeps a node's batch (a record already kept is skipped), and what
    /// the node said it dropped. Returns how many were new.
    pub fn insert_flows(&mut self, batch: &FlowBatch, now_ms: u64) -> Result<usize, StoreError> {
        let source = [
            Param::Text(batch.node.clone()),
            Param::Text(batch.node_fingerprint.to_string()),
            Param::Big(big(batch.dropped)),
            Param::Big(big(now_ms)),
        ];
        let mut added = 0;
        match self {
            AnyStore::Sqlite(s) => {
                let tx = s.db.transaction()?;
                {
                    let mut insert = tx.prepare_cached(&insert_sql(Dialect::Sqlite))?;
                    for e in &batch.flows {
                        let params = insert_params(batch, e);
                        added += insert.execute(sqlite_params(&params).as_slice())?;
                    }
                    tx.execute(
                        &placeholders(UPSERT_SOURCE, Dialect::Sqlite),
                        sqlite_params(&source).as_slice(),
                    )?;
                }
                tx.commit()?;
            }
            AnyStore::Postgres(s) => {
                let client = s.client()?;
                let mut tx = client.transaction()?;
                let insert = tx.prepare(&insert_sql(Dialect::Postgres))?;
                for e in &batch.flows {
                    let params = insert_params(batch, e);
                    added += tx.execute(&insert, &postgres_params(&params))? as usize;
                }
                tx.execute(
                    &placeholders(UPSERT_SOURCE, Dialect::Postgres),
                    &postgres_params(&source),
                )?;
                tx.commit()?;
            }
        }
        Ok(added)
    }

    /// The records `q` asks for, newest first (`now_ms`: the wall clock,
    /// for `since`).
    pub fn flows(&mut self, q: &FlowQuery, now_ms: u64) -> Result<Vec<StoredFlow>, StoreError> {
        let rows = match self {
            AnyStore::Sqlite(s) => {
                let (sql, params) = select(q, now_ms, Dialect::Sqlite);
                let mut stmt = s.db.prepare(&sql)?;
                let rows =
                    stmt.query_map(sqlite_params(&params).as_slice(), RowValues::from_sqlite)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
            AnyStore::Postgres(s) => {
                let (sql, params) = select(q, now_ms, Dialect::Postgres);
                let rows = s.client()?.query(&sql, &postgres_params(&params))?;
                rows.iter()
                    .map(RowValues::from_postgres)
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(rows.into_iter().filter_map(RowValues::into_flow).collect())
    }

    /// Deletes records that ended before `before_ms`; how many.
    pub fn prune_flows(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        let before = big(before_ms);
        Ok(match self {
            AnyStore::Sqlite(s) => {
                s.db.execute("DELETE FROM flows WHERE end_ms < ?1", [before])? as u64
            }
            AnyStore::Postgres(s) => s
                .client()?
                .execute("DELETE FROM flows WHERE end_ms < $1", &[&before])?,
        })
    }

    /// The nodes that sent records, and what each dropped.
    pub fn flow_sources(&mut self) -> Result<Vec<FlowSource>, StoreError> {
        let sql = "SELECT node, node_fingerprint, dropped, seen FROM flow_sources ORDER BY node";
        let rows: Vec<(String, String, i64, i64)> = match self {
            AnyStore::Sqlite(s) => {
                let mut stmt = s.db.prepare(sql)?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.collect::<Result<_, _>>()?
            }
            AnyStore::Postgres(s) => s
                .client()?
                .query(sql, &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect(),
        };
        Ok(rows
            .into_iter()
            .map(|(node, node_fingerprint, dropped, seen)| FlowSource {
                node,
                node_fingerprint,
                dropped: u64::try_from(dropped).unwrap_or(0),
                seen_ms: u64::try_from(seen).unwrap_or(0),
            })
            .collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_claims_are_summed_up_on_one_line() {
        let e = serde_json::json!({"how": "oidc", "claims": {"actor": "octocat", "jti": "x", "repository": "acme/app", "ref": "refs/heads/main", "run_id": "42"}});
        assert_eq!(
            enrollment_summary(Some(&e)),
            "repository=acme/app ref=refs/heads/main run_id=42 actor=octocat"
        );
        let other = serde_json::json!({"how": "oidc", "claims": {"b": "2", "a": 1}});
        assert_eq!(enrollment_summary(Some(&other)), "a=1 b=2");
        let token = serde_json::json!({"how": "token abc", "token": "abc"});
        assert_eq!(enrollment_summary(Some(&token)), "token abc");
        assert_eq!(enrollment_summary(None), "-");
    }

    #[test]
    fn placeholders_follow_the_dialect_and_leave_words_alone() {
        assert_eq!(
            placeholders("a = P1 AND Port = P12", Dialect::Postgres),
            "a = $1 AND Port = $12"
        );
        assert_eq!(
            placeholders("x IN (P1, P2)", Dialect::Sqlite),
            "x IN (?1, ?2)"
        );
        let q = FlowQuery {
            claim: Some(("repository".into(), "org/repo".into())),
            dest: Some(("198.19.0.0/24".parse().unwrap(), Some(5432))),
            denied: true,
            limit: 10,
            ..FlowQuery::default()
        };
        let (sql, params) = select(&q, 0, Dialect::Postgres);
        assert!(sql.contains("(i.claims::jsonb ->> $1) = $2"), "{sql}");
        assert!(sql.contains("f.dst BETWEEN $3 AND $4"), "{sql}");
        assert!(sql.ends_with("LIMIT $7"), "{sql}");
        assert_eq!(params.len(), 7);
    }
}
