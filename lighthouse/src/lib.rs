//! The Tern lighthouse: the tokio shell (`io`) around the sans-IO core
//! (`tern-lighthouse-core`), and the SQLite store (`store`) that keeps
//! enrollment's lasting state.

pub mod io;
pub mod store;
