//! The Tern lighthouse: the registry of live nodes and their endpoints.
//! `proto` holds the sans-IO cores, `io` the tokio shell.

pub mod enroll;
pub mod io;
pub mod oidc;
pub mod proto;
