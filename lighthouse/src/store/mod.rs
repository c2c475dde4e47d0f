//! The lighthouse's lasting enrollment state behind one trait
//! ([`tern_lighthouse_core::enroll::EnrollStore`]): in a SQLite file
//! ([`SqliteStore`], one lighthouse, no setup) or in PostgreSQL
//! ([`PostgresStore`], shared by several lighthouses). Both pass the same
//! test suite (`suite.rs`).

mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("enrollment store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("enrollment store (PostgreSQL): {0}")]
    Postgres(#[from] ::postgres::Error),
}

/// A token's grant, from its stored groups and lifetime.
pub(super) fn grant_of(groups: &str, cert_ttl: i64) -> tern_lighthouse_core::enroll::Grant {
    tern_lighthouse_core::enroll::Grant {
        groups: groups
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
        cert_ttl: cert_ttl.max(0) as u64,
    }
}

/// Stored times are signed 64-bit; "forever" is stored as i64::MAX.
pub(super) fn stored_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}
