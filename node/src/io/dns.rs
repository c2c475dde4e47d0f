//! The node's DNS as its event loop holds it: the listeners, the system
//! resolver's configuration (put back when dropped), the gateway's
//! resolvers per zone, and the questions waiting for the core's answer.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use tern_node_core::node::{DnsForward, DnsResult, DnsStep, NodeCore, ServedZone};
use tern_shared::cert::VerifiedCert;
use tern_shared::config::{NodeConfig, TunMode};
use tern_shared::dns::DNS_PORT;
use tokio::sync::{mpsc, oneshot};

use super::names::{self, DnsCall, DnsOutcome, LocalOnly, NameService, Resolvers};
use super::system_dns::{self, SystemDns};

/// What the loop waits for from DNS.
pub enum DnsInput {
    /// A query from a listener, a proxy or the API.
    Call(DnsCall),
    /// The gateway's resolver answered a forwarded query (`None`: it did not).
    Forwarded(u32, Option<Vec<u8>>),
}

/// The node's DNS parts; dropped, the listeners stop and the system's
/// resolver is put back.
pub struct Dns {
    calls: mpsc::Receiver<DnsCall>,
    forwarded_tx: mpsc::Sender<(u32, Option<Vec<u8>>)>,
    forwarded_rx: mpsc::Receiver<(u32, Option<Vec<u8>>)>,
    /// Questions waiting for the core's answer, by its id.
    waiting: HashMap<u32, oneshot::Sender<DnsOutcome>>,
    /// As a gateway: the resolvers for each zone it serves, in order.
    zone_resolvers: HashMap<String, Resolvers>,
    /// systemd-resolved: the TUN device and the routing domains set on it.
    resolved: Option<(String, Ipv4Addr, Vec<String>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _system: Option<SystemDns>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The zones `[[gateway.dns]]` serves, each checked against the
/// certificate: a gateway refuses to start for a zone it may not answer.
pub fn served_zones(config: &NodeConfig, cert: &VerifiedCert) -> anyhow::Result<Vec<ServedZone>> {
    let Some(gw) = &config.gateway else {
        return Ok(Vec::new());
    };
    for entry in &gw.dns {
        if !cert.answers_for(&entry.zone) {
            anyhow::bail!(
                "[[gateway.dns]] zone {:?} is not carried by this node's certificate (it carries: {}); \
                 sign the certificate with --dns-zones {}, or remove the entry",
                entry.zone,
                if cert.dns_zones().is_empty() {
                    "no zones".to_string()
                } else {
                    cert.dns_zones().join(", ")
                },
                entry.zone
            );
        }
    }
    let served = ServedZone::from_config(gw);
    if served.len() > tern_shared::cert::MAX_DNS_ZONES {
        anyhow::bail!(
            "[[gateway.dns]] names {} zones; at most {} can be advertised",
            served.len(),
            tern_shared::cert::MAX_DNS_ZONES
        );
    }
    Ok(served)
}

impl Dns {
    /// Starts the listeners (TUN mode: the overlay address, port 53; and
    /// `[dns] listen`), points the system's resolver at the node when
    /// asked to, and tells the core its domain and served zones.
    pub async fn start(
        config: &NodeConfig,
        cert: &VerifiedCert,
        core: &mut NodeCore,
        device: Option<&str>,
    ) -> anyhow::Result<(Dns, NameService)> {
        let served = served_zones(config, cert)?;
        core.set_dns(&config.dns.domain, served);
        let zone_resolvers = zone_resolvers(config);
        let overlay_ip = cert.overlay_ip();
        let tun = config.tun.mode == TunMode::Tun && device.is_some();
        let root = nix::unistd::geteuid().is_root();
        let configure = config.dns.configure_system.unwrap_or(tun && root);
        if configure && !tun {
            tracing::warn!("[dns] configure_system needs TUN mode (the node serves DNS on its overlay address); the system's resolver is left alone");
        }
        let (calls_tx, calls) = mpsc::channel::<DnsCall>(256);
        // Other names go where they went before the node (the original
        // nameservers, even in a resolv.conf a crashed run left behind).
        let service = NameService::new(calls_tx, system_dns::upstream_resolvers(overlay_ip));
        // The listeners first: the system is pointed at the node only once
        // it answers.
        let mut tasks = Vec::new();
        let mut serving_overlay = false;
        if tun {
            let addr = SocketAddr::from((overlay_ip, DNS_PORT));
            match names::listen(addr, &service, LocalOnly(Some(overlay_ip))).await {
                Ok(t) => {
                    tasks.extend(t);
                    serving_overlay = true;
                }
                // Port 53 wants root or CAP_NET_BIND_SERVICE; the rest of
                // the node does not.
                Err(e) => tracing::warn!("{e:#}; mesh names still resolve through `tern resolve`, the proxies and [dns] listen"),
            }
        }
        for addr in &config.dns.listen {
            tasks.extend(names::listen(*addr, &service, LocalOnly(None)).await?);
        }
        let (mut system, mut resolved) = (None, None);
        let explicit = config.dns.configure_system == Some(true);
        if configure && serving_overlay && system_dns::resolver_belongs_to_another_network() {
            tracing::warn!(
                "this node runs in a network namespace of its own but shares the host's /etc/resolv.conf \
                 (ip netns exec without /etc/netns/NAME/resolv.conf): the system's resolver is left alone; \
                 give the namespace its own resolv.conf to let the node configure it"
            );
        } else if configure && serving_overlay {
            let device = device.unwrap_or_default();
            let domains = vec![config.dns.domain.clone()];
            match system_dns::configure(overlay_ip, cert.name(), device, &domains) {
                Ok(guard) => {
                    if matches!(guard, Some(SystemDns::Resolved { .. })) {
                        resolved = Some((device.to_string(), overlay_ip, domains));
                    }
                    system = guard;
                }
                // Asked for in the config: a node that cannot do it stops.
                Err(e) if explicit => return Err(e),
                Err(e) => tracing::warn!("{e:#}; the system's resolver is left alone"),
            }
        }
        let (forwarded_tx, forwarded_rx) = mpsc::channel(256);
        Ok((
            Dns {
                calls,
                forwarded_tx,
                forwarded_rx,
                waiting: HashMap::new(),
                zone_resolvers,
                resolved,
                tasks,
                _system: system,
            },
            service,
        ))
    }

    /// The next query or forwarded answer.
    pub async fn recv(&mut self) -> Option<DnsInput> {
        tokio::select! {
            Some(call) = self.calls.recv() => Some(DnsInput::Call(call)),
            Some((request, answer)) = self.forwarded_rx.recv() => Some(DnsInput::Forwarded(request, answer)),
            else => None,
        }
    }

    /// Hands an input to the core.
    pub fn handle(&mut self, core: &mut NodeCore, input: DnsInput, now: Instant) {
        match input {
            DnsInput::Call(call) => {
                let outcome = match core.resolve(&call.query, now) {
                    DnsStep::Answer { answer, source } => DnsOutcome::Answer { answer, source },
                    DnsStep::Upstream => DnsOutcome::Upstream,
                    DnsStep::Drop => DnsOutcome::Drop,
                    DnsStep::Pending(id) => {
                        self.waiting.insert(id, call.reply);
                        return;
                    }
                };
                let _ = call.reply.send(outcome);
            }
            DnsInput::Forwarded(request, answer) => core.dns_forwarded(request, answer, now),
        }
    }

    /// The core's answer to a question that waited.
    pub fn answered(&mut self, result: DnsResult) {
        if let Some(reply) = self.waiting.remove(&result.id) {
            let _ = reply.send(DnsOutcome::Answer {
                answer: result.answer,
                source: result.source,
            });
        }
    }

    /// As a gateway: asks the zone's resolvers, off the loop; the answer
    /// comes back through [`Dns::recv`].
    pub fn forward(&self, f: DnsForward) {
        let resolvers = self
            .zone_resolvers
            .get(&f.zone)
            .cloned()
            .unwrap_or_default();
        let tx = self.forwarded_tx.clone();
        tokio::spawn(async move {
            let answer = names::forward(resolvers, f.query).await;
            let _ = tx.send((f.request, answer)).await;
        });
    }

    /// With systemd-resolved: keeps the device's routing domains equal to
    /// the mesh domain and the zones gateways advertise (and this node
    /// serves).
    pub fn refresh_domains(&mut self, core: &NodeCore) {
        let Some((device, ip, applied)) = &mut self.resolved else {
            return;
        };
        let status = core.dns_status();
        let mut domains = vec![status.domain];
        domains.extend(status.zones.into_keys());
        domains.extend(status.serving);
        domains.sort();
        domains.dedup();
        if *applied == domains {
            return;
        }
        match system_dns::set_resolved_domains(device, *ip, &domains) {
            Ok(()) => *applied = domains,
            Err(e) => {
                tracing::warn!(error = %e, "could not update systemd-resolved's routing domains")
            }
        }
    }
}

/// `[[gateway.dns]]`'s resolvers for each zone, in the order given.
fn zone_resolvers(config: &NodeConfig) -> HashMap<String, Resolvers> {
    let mut out: HashMap<String, Resolvers> = HashMap::new();
    for entry in config.gateway.iter().flat_map(|g| &g.dns) {
        out.entry(entry.zone.clone())
            .or_default()
            .servers
            .push(entry.resolver);
    }
    out
}
