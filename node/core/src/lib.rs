//! `tern-node-core`: the node's sans-IO core. It takes datagrams, packets
//! read from the TUN device (or the userspace stack) and the time, and gives
//! back datagrams to send, packets to write and events for the shell
//! (`tern-node`'s `io`). Nothing here opens a socket, reads a clock or a
//! file; Cargo keeps it so (no tokio, no socket or TUN crate below it).
//!
//! - [`node`]: `NodeCore`, which drives the mesh engine (`tern-mesh`) for a
//!   node: lighthouse links, lookups, gateway routes and failover, hole
//!   punching and relaying, pings, runner finds, policy queries,
//!   revocations.
//! - [`dns`]: DNS messages for mesh names and split DNS (hickory-proto's
//!   wire format): reading queries, the answers a node makes itself.
//! - [`firewall`]: the stateful inbound/outbound firewall.
//! - [`policy_check`]: `tern policy test|explain`, what configs decide for
//!   a caller and a destination, with the firewall's own decision.
//! - [`resolv_conf`]: `/etc/resolv.conf` as a node rewrites it (and puts
//!   it back).
//! - [`socks`] and [`http_connect`]: the proxies' request parsers.

pub mod dns;
pub mod firewall;
pub mod http_connect;
pub mod node;
pub mod policy_check;
pub mod resolv_conf;
pub mod socks;
