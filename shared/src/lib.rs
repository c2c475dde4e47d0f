//! `tern-shared`: the formats the node and the lighthouse agree on.
//!
//! Certificates and keys, the wire formats on the shared UDP socket, the
//! control protocol spoken inside WireGuard sessions with a lighthouse,
//! enrollment messages, config types and what their TOML errors say. The engine that drives
//! sessions with them is `tern-mesh`. Nothing here opens a socket, reads a
//! clock or a file: callers pass bytes and time in.

pub mod admin;
pub mod armor;
pub mod cert;
pub mod config;
pub mod control;
pub mod dns;
pub mod duration;
pub mod enroll;
pub mod exit;
pub mod flows;
pub mod identity;
pub mod keys;
pub mod kubeconfig;
pub mod ops;
pub mod packet;
pub mod policy;
pub mod policy_tests;
pub mod services;
pub mod show;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod toml_error;
pub mod transport;
pub mod wire;

mod codec;
