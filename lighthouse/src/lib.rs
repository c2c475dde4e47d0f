//! The Tern lighthouse: the tokio shell (`io`) around the sans-IO core
//! (`tern-lighthouse-core`), and enrollment (`enroll`: what a token or an
//! ID token buys, and the SQLite store that remembers it).

pub mod enroll;
pub mod io;
