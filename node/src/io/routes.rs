//! Kernel routes into the TUN device (TUN mode), added so that they never
//! take the place of a route the host had: `ip route add` (never
//! `replace`) with Tern's own protocol number and a high metric, and
//! nothing at all when the host already routes that prefix or is itself
//! attached to a network holding it (a runner inside the private network
//! keeps reaching its neighbours directly).

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

/// The routing protocol number Tern's routes carry (`ip route show proto
/// 121` lists them).
pub const ROUTE_PROTO: &str = "121";
/// Their metric: behind any route of the same prefix the host adds later.
pub const ROUTE_METRIC: &str = "1024";

/// What became of a route asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAdded {
    Added,
    /// Already there (ours, into this TUN device).
    Present,
    /// Left to the host: why.
    Skipped(String),
}

/// Adds `subnet dev tun` unless the host routes it already.
pub fn add(subnet: Ipv4Net, tun: &str) -> anyhow::Result<RouteAdded> {
    let existing = ip_json(&[
        "-4",
        "route",
        "show",
        "table",
        "main",
        "exact",
        &subnet.to_string(),
    ])?;
    if let Some(why) = host_route_for(&existing, subnet, tun) {
        return Ok(match why {
            Some(why) => RouteAdded::Skipped(why),
            None => RouteAdded::Present,
        });
    }
    let addresses = ip_json(&["-4", "addr", "show"])?;
    if let Some(why) = attached_network_holding(&addresses, subnet, tun) {
        return Ok(RouteAdded::Skipped(why));
    }
    route("add", subnet, tun)?;
    Ok(RouteAdded::Added)
}

/// Removes the route this node added for `subnet` (and only that one).
pub fn remove(subnet: Ipv4Net, tun: &str) -> anyhow::Result<()> {
    route("del", subnet, tun)
}

/// `ip route VERB SUBNET dev TUN` with Tern's protocol and metric.
fn route(verb: &str, subnet: Ipv4Net, tun: &str) -> anyhow::Result<()> {
    let subnet = subnet.to_string();
    let args = [
        "route",
        verb,
        &subnet,
        "dev",
        tun,
        "proto",
        ROUTE_PROTO,
        "metric",
        ROUTE_METRIC,
    ];
    super::gateway::run_tool("ip", &args, "running ip (iproute2)")
}

/// Among the routes for exactly `subnet`: `Some(None)` when ours is there
/// already, `Some(Some(why))` when another one is (the host's), `None`
/// when there is none.
fn host_route_for(
    routes: &serde_json::Value,
    subnet: Ipv4Net,
    tun: &str,
) -> Option<Option<String>> {
    let routes = routes.as_array()?;
    let (ours, theirs): (Vec<_>, Vec<_>) =
        routes.iter().partition(|r| r["dev"].as_str() == Some(tun));
    if let Some(r) = theirs.first() {
        let via = r["gateway"]
            .as_str()
            .map_or_else(String::new, |g| format!(" via {g}"));
        let dev = r["dev"].as_str().unwrap_or("?");
        return Some(Some(format!(
            "the host already routes {subnet}{via} dev {dev} (proto {}); keeping its route",
            r["protocol"].as_str().unwrap_or("boot")
        )));
    }
    (!ours.is_empty()).then_some(None)
}

/// An address of this host (outside the TUN device) whose network holds
/// the whole of `subnet`: a route for `subnet` into the tunnel would take
/// the host's own neighbours from it.
fn attached_network_holding(
    addresses: &serde_json::Value,
    subnet: Ipv4Net,
    tun: &str,
) -> Option<String> {
    for link in addresses.as_array()? {
        let ifname = link["ifname"].as_str().unwrap_or("");
        if ifname == tun {
            continue;
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            let Ok(ip) = local.parse::<Ipv4Addr>() else {
                continue;
            };
            let Ok(net) = Ipv4Net::new(ip, len.min(32) as u8).map(|n| n.trunc()) else {
                continue;
            };
            if net.contains(&subnet) {
                return Some(format!(
                    "this host is attached to {net} on {ifname} ({local}), which holds {subnet}; it reaches it directly"
                ));
            }
        }
    }
    None
}

fn ip_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip -j {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&text)
        .with_context(|| format!("reading the output of ip -j {}", args.join(" ")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_route_the_host_has_for_the_prefix_is_kept_and_ours_is_recognized() {
        let subnet = net("198.19.0.0/24");
        let connected: serde_json::Value = serde_json::from_str(
            r#"[{"dst":"198.19.0.0/24","dev":"eth1","protocol":"kernel","scope":"link","prefsrc":"198.19.0.30","flags":[]}]"#,
        )
        .unwrap();
        let why = host_route_for(&connected, subnet, "tern0")
            .unwrap()
            .unwrap();
        assert!(
            why.contains("dev eth1") && why.contains("proto kernel"),
            "{why}"
        );
        let ours: serde_json::Value = serde_json::from_str(
            r#"[{"dst":"198.19.0.0/24","dev":"tern0","protocol":"121","metric":1024,"flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(host_route_for(&ours, subnet, "tern0"), Some(None));
        assert_eq!(
            host_route_for(&serde_json::json!([]), subnet, "tern0"),
            None
        );
        assert_eq!(
            host_route_for(&serde_json::json!("garbage"), subnet, "tern0"),
            None
        );
    }

    #[test]
    fn a_host_attached_to_a_network_holding_the_subnet_keeps_reaching_it_directly() {
        let addresses: serde_json::Value = serde_json::from_str(
            r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                {"ifname":"eth1","addr_info":[{"family":"inet","local":"198.19.0.30","prefixlen":16}]},
                {"ifname":"tern0","addr_info":[{"family":"inet","local":"100.64.0.5","prefixlen":10}]},
                {"ifname":"odd","addr_info":[{"local":"not an address","prefixlen":99},{"prefixlen":3}]}]"#,
        )
        .unwrap();
        let why = attached_network_holding(&addresses, net("198.19.4.0/24"), "tern0").unwrap();
        assert!(why.contains("198.19.0.0/16 on eth1"), "{why}");
        // A subnet wider than the attached network: the host's more
        // specific connected route still wins for its neighbours.
        assert_eq!(
            attached_network_holding(&addresses, net("198.0.0.0/8"), "tern0"),
            None
        );
        // Addresses on the TUN device itself do not count.
        assert_eq!(
            attached_network_holding(&addresses, net("100.64.7.0/24"), "tern0"),
            None
        );
    }
}
