//! Sans-IO cores of the node.

pub mod firewall;
pub mod node;
pub mod runner;
pub mod http_connect;
pub mod socks;
