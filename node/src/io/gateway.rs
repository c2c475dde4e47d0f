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
            if std::fs::metadata(FORWARD_SYSCTL).is_ok_and(|m| !m.permissions().readonly())
                && read_only_proc_sys()
            {
                format!(
                    "enabling IP forwarding ({FORWARD_SYSCTL}): /proc/sys is read-only here (a service \
                     manager's ProtectKernelTunables, or a container); enable it before the gateway \
                     starts: sysctl -w net.ipv4.ip_forward=1 (or net.ipv4.ip_forward=1 in /etc/sysctl.d/)"
                )
            } else {
                format!(
                    "enabling IP forwarding ({FORWARD_SYSCTL}): a gateway needs root or CAP_NET_ADMIN"
                )
            }
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

/// Whether /proc/sys is mounted read-only in this process's view (systemd's
/// ProtectKernelTunables, a container's default).
fn read_only_proc_sys() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| proc_sys_read_only_in(&m))
}

/// [`read_only_proc_sys`] on the text of a mounts table.
fn proc_sys_read_only_in(mounts: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, _, opts) = (f.next(), f.next(), f.next(), f.next());
        at == Some("/proc/sys") && opts.is_some_and(|o| o.split(',').any(|x| x == "ro"))
    })
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
        if !self.rules.is_empty() || self.previous_forward.is_some() {
            tracing::info!("gateway forwarding removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_proc_sys_is_seen_in_the_mounts_table() {
        let systemd = "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n\
                       proc /proc/sys proc ro,nosuid,nodev,noexec,relatime 0 0\n";
        assert!(proc_sys_read_only_in(systemd));
        let plain = "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n";
        assert!(!proc_sys_read_only_in(plain));
        let rw = "proc /proc/sys proc rw,relatime 0 0\n";
        assert!(!proc_sys_read_only_in(rw));
        assert!(!proc_sys_read_only_in("garbage\n\n /proc/sys\n"));
    }
}
