//! The node's tokio shell around the sans-IO core (`tern-node-core`): the
//! event loop ([`daemon`]), the place packets live ([`plane`]: a TUN device
//! or the userspace stack), the UDP data path, the local API, gateways'
//! kernel setup and routes, proxies, DNS, enrollment, and the runner.

pub mod api;
pub mod balance;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod flowfile;
pub mod gateway;
pub mod join;
pub mod links;
pub mod metrics;
pub mod names;
pub mod plane;
pub mod proxy;
pub mod routes;
pub mod services;
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

/// Tries to resolve a lighthouse's host name this many times, a second
/// apart (a CI job's resolver may need a moment).
const RESOLVE_TRIES: u32 = 5;

/// Resolves the lighthouses written by host name, once, at start: the
/// first address the system gives that the UDP socket can reach (IPv4 for
/// an IPv4 socket; any for a dual-stack one, `[::]`, in the system's order
/// of preference).
pub async fn resolve_lighthouses(config: &mut NodeConfig) -> anyhow::Result<()> {
    let dual_stack = config.listen.addr.is_ipv6();
    for i in 0..config.lighthouses.len() {
        let entry = &config.lighthouses[i];
        let Some(host) = entry.host.clone() else {
            continue;
        };
        let port = entry.endpoint.port();
        let mut tries = 0;
        let addrs = loop {
            tries += 1;
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => break addrs.map(tern_udp::canonical).collect::<Vec<_>>(),
                Err(e) if tries >= RESOLVE_TRIES => anyhow::bail!(
                    "cannot resolve the lighthouse {host}: {e}; check [[lighthouses]] endpoint and this host's DNS"
                ),
                Err(e) => {
                    tracing::debug!(%host, error = %e, "resolving a lighthouse failed; trying again");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        };
        let Some(addr) = addrs.iter().find(|a| dual_stack || a.is_ipv4()) else {
            anyhow::bail!(
                "the lighthouse {host} has only IPv6 addresses ({}), but [listen] addr {} is IPv4 only; listen dual-stack: addr = \"[::]:{}\"",
                tern_shared::show::list(&addrs),
                config.listen.addr,
                config.listen.addr.port()
            );
        };
        tracing::info!(lighthouse = %host, endpoint = %addr, "lighthouse resolved");
        let resolved = config.lighthouses[i].resolved(*addr);
        if let Some(other) = config
            .lighthouses
            .iter()
            .find(|l| l.host.is_none() || l.host != resolved.host)
            .filter(|l| l.endpoint == resolved.endpoint)
        {
            anyhow::bail!(
                "[[lighthouses]] {} and {} are the same lighthouse ({}); list it once",
                other.written(),
                resolved.written(),
                resolved.endpoint
            );
        }
        config.lighthouses[i] = resolved;
    }
    Ok(())
}

/// Reads the CA, certificate and key files named in `[pki]` and checks them
/// against each other.
pub fn load_identity(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    tern_udp::daemon::load_identity(ca, cert, key).map_err(anyhow::Error::msg)
}
