//! `tern-lighthouse-core`: the lighthouse's sans-IO core. It takes
//! datagrams and the time, and gives back datagrams to send; nothing here
//! opens a socket, reads a clock or a file, or touches the store.
//!
//! - [`lighthouse`]: `LighthouseCore`, which drives the mesh engine
//!   (`tern-mesh`) for a lighthouse: registrations, lookups, route and
//!   runner lists, revocations, introductions.
//! - [`registry`]: the live nodes, their endpoints, routes and runner adverts.
//! - [`relay`]: relaying WireGuard between introduced pairs, on a budget.
//! - [`waiting`]: lookups for addresses not registered yet, answered when
//!   they register.
//! - [`admission`]: rate buckets for enrollment before anyone is verified
//!   (the mesh's, which its hellos use too).
//! - [`enroll`]: what a token or an ID token buys (`Enroller`), and the
//!   store it needs (`EnrollStore`, implemented by the lighthouse).
//! - [`issuance`]: what the issuance log keeps of how a certificate was
//!   bought (which token, which OIDC claims).
//! - [`admin`]: the admin API's requests, errors and pages of nodes, and
//!   what the console shows (served over HTTP by the shell).
//! - [`oidc`]: ID-token checks (signature, issuer, audience, expiry) and
//!   the claim rules.

pub use tern_mesh::admission;
pub mod admin;
pub mod enroll;
pub mod flows;
pub mod issuance;
pub mod lighthouse;
pub mod oidc;
pub mod registry;
/// The relay table, shared with nodes that relay (it lives in `tern-mesh`).
pub use tern_mesh::relay;
pub mod relay_nodes;
pub mod renew;
pub mod waiting;
