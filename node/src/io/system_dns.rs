//! Pointing the system's resolver at the node while it runs (`[dns]
//! configure_system`), and finding the resolvers every other name goes to.
//!
//! With systemd-resolved, the TUN device gets the node as its DNS server
//! and the mesh domain and zones as routing domains (`~tern`,
//! `~internal`): resolved sends only those names to the node. Without it
//! (a bare CI container), `/etc/resolv.conf` is rewritten in place (it is
//! often a bind mount, which cannot be replaced by a rename) to name only
//! the node, which sends every other name on to the nameservers that were
//! there; the original text is kept inside the file and put back at exit,
//! or at the next start if the node could not.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use tern_node_core::resolv_conf;
use tern_shared::dns::DNS_PORT;

use super::names::Resolvers;

/// The system's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// What systemd-resolved writes for programs that read resolv.conf.
const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";
/// systemd-resolved's stub listener.
const RESOLVED_STUB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// Puts the system's resolver back as it was when dropped.
pub enum SystemDns {
    ResolvConf { path: PathBuf, original: String },
    Resolved { device: String },
}

impl Drop for SystemDns {
    fn drop(&mut self) {
        match self {
            SystemDns::ResolvConf { path, original } => {
                // Only what we wrote is put back: a file someone changed
                // since is theirs.
                let ours = std::fs::read_to_string(&*path)
                    .is_ok_and(|t| resolv_conf::writer_pid(&t) == Some(std::process::id()));
                if ours {
                    match std::fs::write(&*path, original.as_bytes()) {
                        Ok(()) => {
                            tracing::info!(path = %path.display(), "resolver configuration put back")
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), error = %e, "could not put the resolver configuration back; the next start will")
                        }
                    }
                }
            }
            SystemDns::Resolved { device } => {
                let _ = Command::new("resolvectl").args(["revert", device]).status();
            }
        }
    }
}

/// Whether systemd-resolved manages this host's resolver: resolv.conf
/// leads to its files or stub, and `resolvectl` is there to talk to it.
pub fn resolved_in_use(path: &Path) -> bool {
    let link = std::fs::read_link(path)
        .map(|t| t.to_string_lossy().contains("systemd/resolve"))
        .unwrap_or(false);
    let stub = std::fs::read_to_string(path)
        .map(|t| resolv_conf::parse(&t).nameservers == [IpAddr::V4(RESOLVED_STUB)])
        .unwrap_or(false);
    (link || stub) && Path::new("/run/systemd/resolve").is_dir() && which("resolvectl")
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Puts back a resolv.conf a node left changed (it crashed, or was killed)
/// unless that node still runs. Returns the text as it is now, or the pid
/// of the running node that manages it.
fn put_back_leftover(path: &Path) -> anyhow::Result<Result<String, u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(original) = resolv_conf::original(&text) else {
        return Ok(Ok(text));
    };
    if let Some(pid) = resolv_conf::writer_pid(&text) {
        if pid != std::process::id() && process_is_tern(pid) {
            return Ok(Err(pid));
        }
    }
    std::fs::write(path, original.as_bytes())
        .with_context(|| format!("putting back {}", path.display()))?;
    tracing::warn!(path = %path.display(), "a previous run left the resolver configuration changed; put back");
    Ok(Ok(original))
}

/// Whether this node's `/etc/resolv.conf` is another network's: the node
/// runs in a network namespace of its own but sees the host's file (`ip
/// netns exec` without `/etc/netns/NAME/resolv.conf`, `unshare -n`), whose
/// programs cannot reach this node's overlay address, so it must be left
/// alone. A namespace made by `ip netns add` has its own file exactly when
/// `/etc/netns/NAME/resolv.conf` exists (`ip netns exec` mounts it);
/// otherwise the file is compared with PID 1's, where that can be read (a
/// container shares PID 1's network).
pub fn resolver_belongs_to_another_network() -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let Some(own) = id(Path::new("/proc/self/ns/net")) else {
        return false;
    };
    if let Ok(named) = std::fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            if id(&entry.path()) == Some(own) {
                let own_file = Path::new("/etc/netns")
                    .join(entry.file_name())
                    .join("resolv.conf");
                return !own_file.exists();
            }
        }
    }
    match (id(Path::new("/proc/1/ns/net")), id(Path::new(RESOLV_CONF))) {
        (Some(init), Some(ours)) if init != own => {
            id(Path::new("/proc/1/root/etc/resolv.conf")).is_none_or(|theirs| theirs == ours)
        }
        _ => false,
    }
}

fn process_is_tern(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "tern")
}

/// The nameservers in a resolv.conf text, as resolvers (the node's own
/// address left out: asking it would loop). systemd-resolved's stub stays:
/// it sends only the mesh's routing domains to the node, and the node
/// sends it only other names.
fn resolvers_in(text: &str, own: Ipv4Addr) -> Resolvers {
    Resolvers {
        servers: resolv_conf::parse(text)
            .nameservers
            .into_iter()
            .filter(|ip| *ip != IpAddr::V4(own))
            .map(|ip| SocketAddr::new(ip, DNS_PORT))
            .collect(),
    }
}

/// The resolvers other names go to, when the node does not configure the
/// system: whatever resolv.conf names (its original, if a node wrote it).
pub fn upstream_resolvers(own: Ipv4Addr) -> Resolvers {
    let path = Path::new(RESOLV_CONF);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => resolv_conf::original(&t).unwrap_or(t),
        Err(_) => String::new(),
    };
    let mut found = resolvers_in(&text, own);
    if found.servers.is_empty() {
        if let Ok(t) = std::fs::read_to_string(RESOLVED_UPSTREAM) {
            found = resolvers_in(&t, own);
        }
    }
    found
}

/// Points the system's resolver at the node at `node_ip` (on `device`)
/// for `domains` (resolved) or for every name (resolv.conf), and returns
/// the guard that puts things back (`None`: another running node manages
/// it, and it is left alone). Every other name goes on to
/// [`upstream_resolvers`].
pub fn configure(
    node_ip: Ipv4Addr,
    node_name: &str,
    device: &str,
    domains: &[String],
) -> anyhow::Result<Option<SystemDns>> {
    let path = Path::new(RESOLV_CONF);
    if resolved_in_use(path) {
        let guard = SystemDns::Resolved {
            device: device.to_string(),
        };
        set_resolved_domains(device, node_ip, domains)?;
        tracing::info!(%device, domains = %tern_shared::show::list(domains), "systemd-resolved sends the mesh's names to this node");
        return Ok(Some(guard));
    }
    let original = match put_back_leftover(path)? {
        Ok(text) => text,
        Err(pid) => {
            tracing::warn!(path = %path.display(), pid, "another tern node manages the system's resolver; this one leaves it alone (its names resolve through `tern resolve`, the proxies and [dns] listen; set [dns] configure_system = false to say so)");
            return Ok(None);
        }
    };
    let upstream = resolvers_in(&original, node_ip);
    let text = resolv_conf::render(&original, node_ip, node_name, std::process::id());
    std::fs::write(path, text.as_bytes()).with_context(|| {
        format!(
            "writing {} (run as root, or set [dns] configure_system = false)",
            path.display()
        )
    })?;
    tracing::info!(path = %path.display(), nameserver = %node_ip, upstream = %tern_shared::show::list(&upstream.servers), "resolver points at this node; other names go to the original nameservers");
    Ok(Some(SystemDns::ResolvConf {
        path: path.to_path_buf(),
        original,
    }))
}

/// systemd-resolved: the node is `device`'s DNS server for `domains`
/// (routing domains only: never the default route for names).
pub fn set_resolved_domains(
    device: &str,
    node_ip: Ipv4Addr,
    domains: &[String],
) -> anyhow::Result<()> {
    let run = |args: Vec<String>| -> anyhow::Result<()> {
        let status = Command::new("resolvectl")
            .args(&args)
            .status()
            .with_context(|| format!("running resolvectl {}", args.join(" ")))?;
        anyhow::ensure!(
            status.success(),
            "resolvectl {} failed ({status})",
            args.join(" ")
        );
        Ok(())
    };
    run(vec!["dns".into(), device.into(), node_ip.to_string()])?;
    let mut args = vec!["domain".to_string(), device.to_string()];
    args.extend(domains.iter().map(|d| format!("~{d}")));
    run(args)?;
    run(vec!["default-route".into(), device.into(), "false".into()])
}
