//! Userspace mode's TCP/IP stack: `tern-netstack` (its own crate, which
//! the lighthouse's admin listener uses too).

pub use tern_netstack::*;
