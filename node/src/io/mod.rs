//! The node's tokio shell around the sans-IO core (`tern-node-core`): the
//! event loop ([`daemon`]), the place packets live ([`plane`]: a TUN device
//! or the userspace stack), the UDP data path, the local API, gateways'
//! kernel setup and routes, proxies, DNS, enrollment, and the runner.

pub mod api;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod gateway;
pub mod join;
pub mod links;
pub mod metrics;
pub mod names;
pub mod plane;
pub mod proxy;
pub mod routes;
pub mod system_dns;
pub mod userpath;
pub mod userspace;

use std::path::Path;

use anyhow::Context;
use tern_shared::config::NodeConfig;
use tern_shared::identity::Identity;

pub use daemon::run;

/// Reads and parses a node config file.
pub fn load_node_config(path: &Path) -> anyhow::Result<NodeConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    Ok(NodeConfig::parse(&text, path)?)
}

/// Reads the CA, certificate and key files named in `[pki]` and checks them
/// against each other.
pub fn load_identity(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    tern_udp::daemon::load_identity(ca, cert, key).map_err(anyhow::Error::msg)
}
