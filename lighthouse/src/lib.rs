//! The Tern lighthouse: the tokio shell (`io`) around the sans-IO core
//! (`tern-lighthouse-core`), the SQLite store (`store`) that keeps
//! enrollment's lasting state, and the command line (`cli`; the binary's
//! `main.rs` only parses it).

pub mod cli;
pub mod console;
pub mod io;
pub mod ops;
pub mod store;
