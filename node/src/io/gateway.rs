//! What a gateway sets up in its kernel to forward overlay traffic into its
//! private subnets, and takes down again at stop: IP forwarding, a MASQUERADE
//! rule per subnet (so the private network needs no route back), FORWARD
//! accepts (for hosts whose FORWARD policy is DROP), and TCP MSS clamping to
//! the path MTU both ways through the TUN device (so TLS and large transfers
//! don't black-hole behind the smaller overlay MTU).
//!
//! Every rule carries the comment `tern-gateway:<tun>`; leftovers of a crashed
//! run with the same spec are removed before adding.

use std::process::Command;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

const FORWARD_SYSCTL: &str = "/proc/sys/net/ipv4/ip_forward";

/// The kernel state a running gateway added; undone on drop.
pub struct GatewaySetup {
    rules: Vec<Vec<String>>,
    previous_forward: Option<String>,
}

/// Sets up forwarding for `subnets` through the TUN device `tun`.
pub fn setup(
    tun: &str,
    overlay: Ipv4Net,
    subnets: &[Ipv4Net],
    masquerade: bool,
) -> anyhow::Result<GatewaySetup> {
    let comment = format!("tern-gateway:{tun}");
    let mut specs: Vec<Vec<String>> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    for subnet in subnets {
        let subnet = subnet.to_string();
        if masquerade {
            specs.push(s(&[
                "-t",
                "nat",
                "POSTROUTING",
                "-s",
                &overlay.trunc().to_string(),
                "-d",
                &subnet,
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "MASQUERADE",
            ]));
        }
        specs.push(s(&[
            "-t",
            "filter",
            "FORWARD",
            "-i",
            tun,
            "-d",
            &subnet,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "ACCEPT",
        ]));
        specs.push(s(&[
            "-t",
            "filter",
            "FORWARD",
            "-o",
            tun,
            "-s",
            &subnet,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "ACCEPT",
        ]));
    }
    for dir in ["-i", "-o"] {
        specs.push(s(&[
            "-t",
            "mangle",
            "FORWARD",
            dir,
            tun,
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN,RST",
            "SYN",
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            "TCPMSS",
            "--clamp-mss-to-pmtu",
        ]));
    }

    let previous_forward = std::fs::read_to_string(FORWARD_SYSCTL)
        .ok()
        .map(|v| v.trim().to_string());
    let mut setup = GatewaySetup {
        rules: Vec::new(),
        previous_forward: None,
    };
    if previous_forward.as_deref() != Some("1") {
        std::fs::write(FORWARD_SYSCTL, "1").with_context(|| {
            format!(
                "enabling IP forwarding ({FORWARD_SYSCTL}): a gateway needs root or CAP_NET_ADMIN"
            )
        })?;
        setup.previous_forward = previous_forward;
    }
    for spec in specs {
        // A crashed run may have left the same rule behind.
        while iptables("-C", &spec).is_ok() {
            iptables("-D", &spec)?;
        }
        let action = if spec[2] == "FORWARD" && spec[1] == "filter" {
            "-I"
        } else {
            "-A"
        };
        iptables(action, &spec).context(
            "setting up the gateway: it needs root or CAP_NET_ADMIN and the iptables tool (apt-get install iptables)",
        )?;
        setup.rules.push(spec);
    }
    tracing::info!(subnets = %tern_shared::show::list(subnets), masquerade, "gateway forwarding set up");
    Ok(setup)
}

/// Runs `iptables -t TABLE <action> CHAIN rest...` for a spec written as
/// `["-t", TABLE, CHAIN, rest...]`.
fn iptables(action: &str, spec: &[String]) -> anyhow::Result<()> {
    let mut args: Vec<&str> = vec!["-w", "5", &spec[0], &spec[1], action, &spec[2]];
    args.extend(spec[3..].iter().map(String::as_str));
    run_tool("iptables", &args, "running iptables (is it installed?)")
}

/// Runs a system tool; a failure carries its command line and stderr.
pub(crate) fn run_tool(program: &str, args: &[&str], what: &'static str) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().context(what)?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for GatewaySetup {
    fn drop(&mut self) {
        for spec in self.rules.iter().rev() {
            if let Err(e) = iptables("-D", spec) {
                tracing::warn!(error = %e, "could not remove a gateway rule");
            }
        }
        if let Some(previous) = &self.previous_forward {
            if let Err(e) = std::fs::write(FORWARD_SYSCTL, previous) {
                tracing::warn!(error = %e, "could not restore {FORWARD_SYSCTL}");
            }
        }
        tracing::info!("gateway forwarding removed");
    }
}
