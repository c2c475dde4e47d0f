//! `tern-shared`: everything the node and the lighthouse agree on.
//!
//! Certificates and keys, the wire formats on the shared UDP socket, the
//! control protocol spoken inside WireGuard sessions with a lighthouse,
//! config types, and the sans-IO mesh core (peer table and sessions) that both
//! daemons drive. Nothing here opens a socket or reads a clock, and nothing
//! reads a file but [`pipeline::Pipeline::check_uploads`] (which checks a CI
//! workspace for a pipeline's uploads): callers pass bytes and time in.

pub mod armor;
pub mod cert;
pub mod config;
pub mod control;
pub mod duration;
pub mod enroll;
pub mod identity;
pub mod job;
pub mod keys;
pub mod mesh;
pub mod packet;
pub mod pipeline;
pub mod policy;
pub mod rate;
pub mod show;
pub mod testing;
pub mod wire;

mod codec;
