//! Sans-IO cores of the node.

pub mod firewall;
pub mod http_connect;
pub mod node;
pub mod runner;
pub mod socks;
