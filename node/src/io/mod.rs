//! The node's tokio shell: the TUN device, the one UDP socket, the local API
//! and the clock, around the sans-IO [`NodeCore`]. One task owns the core and
//! waits on whichever comes first: a datagram, a packet from the TUN device,
//! an API call, the next timer, or a signal to stop.

pub mod api;
pub mod archive;
pub mod datapath;
pub mod exec;
pub mod gateway;
pub mod job;
pub mod join;
pub mod proxy;
pub mod routes;
pub mod runner;
pub mod userspace;

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tern_mesh::{Mesh, MeshSettings};
use tern_shared::cert::RUNNER_GROUP;
use tern_shared::config::{NodeConfig, TunMode};
use tern_shared::identity::Identity;
pub use tern_udp::daemon::{seed, unix_now};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use api::{ApiCall, ApiRequest};
use datapath::{DataPath, Outer};
use tern_node_core::firewall::{subnet_within, subnets_no_rule_opens};
use tern_node_core::node::{LighthouseTarget, NodeCore, NodeEvent};
use tern_runner::scheduler::Caller;

/// Packets the kernel may queue on the TUN device for the daemon to read.
const TUN_QUEUE_LEN: u32 = 5000;

/// Reads and parses a node config file.
pub fn load_node_config(path: &Path) -> anyhow::Result<NodeConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    Ok(NodeConfig::parse(&text, path)?)
}

/// Reads the CA, certificate and key files named in `[pki]` and checks them
/// against each other.
pub fn load_identity(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p).with_context(|| format!("reading {what} {}", p.display()))
    };
    let ca_text = read(ca, "CA file [pki] ca =")?;
    let cert_text = read(cert, "certificate [pki] cert =")?;
    let key_text = read(key, "key [pki] key =")?;
    Identity::from_pem(&ca_text, &cert_text, &key_text, unix_now()).with_context(|| {
        format!(
            "checking identity (ca {}, cert {}, key {})",
            ca.display(),
            cert.display(),
            key.display()
        )
    })
}

/// `tern up`: runs the node in the foreground until SIGINT or SIGTERM.
/// `userspace` overrides `[tun] mode` (`tern up --userspace`).
pub async fn run(
    config_path: &Path,
    userspace: bool,
    enrollment: Option<&join::Credential>,
) -> anyhow::Result<()> {
    let mut config = load_node_config(config_path)?;
    if userspace {
        config.tun.mode = TunMode::Userspace;
    }
    let userspace = config.tun.mode == TunMode::Userspace;
    let identity = match (enrollment, config.pki.enrolls()) {
        (Some(credential), true) => join::enroll(&config, credential, unix_now()).await?,
        (None, false) => load_identity(&config.pki.ca, &config.pki.cert, &config.pki.key)?,
        (None, true) => anyhow::bail!(
            "{}: [pki] names no cert and key; give them, or enroll: tern up --config {} --enroll-token TOKEN (or --enroll-oidc)",
            config_path.display(),
            config_path.display()
        ),
        (Some(_), false) => anyhow::bail!(
            "{}: [pki] already names a cert and key; an enrolling node has only [pki] ca (remove cert and key)",
            config_path.display()
        ),
    };
    let cert = identity.cert.clone();
    let overlay = cert.overlay_net();
    tracing::info!(name = cert.name(), overlay_ip = %cert.overlay_ip(), "starting node");

    let gateway_subnets = match &config.gateway {
        Some(gw) => {
            for subnet in &gw.subnets {
                if !subnet_within(subnet, cert.subnets()) {
                    anyhow::bail!(
                        "[gateway] subnets: {subnet} is not authorized by this node's certificate (it carries: {}); \
                         sign the certificate with --subnets {subnet}, or remove it from [gateway] subnets",
                        if cert.subnets().is_empty() { "none".to_string() } else { cert.subnets().iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ") }
                    );
                }
            }
            gw.subnets.clone()
        }
        None => Vec::new(),
    };
    warn_closed_subnets(&config);
    let socket = tern_udp::bind(config.listen.addr)
        .with_context(|| format!("binding UDP {} ([listen] addr)", config.listen.addr))?;
    let outer = Outer::new(socket).context("setting up the UDP socket's batching and offloads")?;
    let listen = outer.local_addr()?;

    // The plane packets for this node go to: a TUN device, or the
    // userspace stack.
    let mut plane = if userspace {
        let stack =
            userspace::Netstack::new(overlay, config.tun.mtu, gateway_subnets.clone(), seed());
        tracing::info!(address = %overlay, mtu = config.tun.mtu, %listen, "userspace mode: no TUN device, an in-process TCP/IP stack");
        Plane::User {
            stack: Box::new(stack),
            path: Box::new(userspace::UserPath::new(config.tun.mtu)),
        }
    } else {
        let tun = tun_rs::DeviceBuilder::new()
            .name(&config.tun.name)
            .ipv4(overlay.addr(), overlay.prefix_len(), None)
            .mtu(config.tun.mtu)
            // The kernel's queue toward the daemon: the default 500 packets
            // overflow in bursts while the loop serves the other direction.
            .tx_queue_len(TUN_QUEUE_LEN)
            .offload(config.tun.offload)
            .build_async()
            .with_context(|| {
                format!(
                    "creating TUN device {:?} with {overlay}: this needs root or CAP_NET_ADMIN and /dev/net/tun \
                     (or run without either: [tun] mode = \"userspace\", or tern up --userspace)",
                    config.tun.name
                )
            })?;
        tracing::info!(
            device = %config.tun.name,
            address = %overlay,
            mtu = config.tun.mtu,
            tcp_offload = tun.tcp_gso(),
            udp_offload = tun.udp_gso(),
            %listen,
            "TUN device up"
        );
        Plane::Tun {
            tun: Box::new(tun),
            path: Box::new(DataPath::new(config.tun.mtu)),
        }
    };

    let now = Instant::now();
    let settings = MeshSettings {
        keepalive: Some(config.peers.keepalive.as_secs().min(u16::MAX as u64) as u16),
        idle_timeout: config.peers.idle_timeout,
        seed: seed(),
        ..MeshSettings::default()
    };
    let mesh = Mesh::for_identity(&identity, settings, now, unix_now());
    let targets: Vec<LighthouseTarget> = config
        .lighthouses
        .iter()
        .map(|l| LighthouseTarget {
            endpoint: l.endpoint,
            name: l.name.clone(),
        })
        .collect();
    let mut core = NodeCore::new(mesh, &cert, targets.clone(), now);
    core.set_local_endpoints(local_endpoints(listen, &targets));
    core.set_relay_after(config.peers.relay_after);
    core.set_policy(&config.firewall, gateway_subnets.clone(), &config.routes);
    core.set_accept_routes(config.tun.accept_routes);
    let _gateway = match &config.gateway {
        Some(_) if userspace => {
            tracing::info!(subnets = %tern_shared::show::list(&gateway_subnets), "gateway in userspace: flows to these subnets are proxied with ordinary sockets (no ip_forward, no NAT rules)");
            None
        }
        Some(gw) => Some(gateway::setup(
            &config.tun.name,
            overlay,
            &gateway_subnets,
            gw.masquerade,
        )?),
        None => None,
    };
    if config.lighthouses.is_empty() {
        tracing::warn!(
            "no [[lighthouses]] configured: this node can neither find peers nor be found"
        );
    }

    let (identity_tx, mut identity_rx) = mpsc::channel::<runner::IdentityQuery>(64);
    let (_runner, mut runner_load) = match &config.runner {
        Some(r) => {
            let listener = match &mut plane {
                Plane::User { stack, .. } => {
                    runner::Listener::Userspace(stack.listen(tern_runner::job::RUNNER_PORT))
                }
                Plane::Tun { .. } => runner::Listener::Kernel,
            };
            let (task, load) = runner::start(
                r.clone(),
                cert.name().to_string(),
                cert.overlay_ip(),
                identity_tx,
                listener,
            )
            .await
            .context("starting the runner ([runner])")?;
            if cert.has_group(RUNNER_GROUP) {
                core.set_runner(r.labels.clone(), *load.borrow(), now);
            } else if !r.labels.is_empty() {
                tracing::warn!(
                    labels = %tern_shared::show::list(&r.labels),
                    "this node's certificate lacks the '{RUNNER_GROUP}' group, so its runner labels are not advertised: \
                     `tern run --on LABEL` will not pick it (`--node NAME` still works); sign it with --groups {RUNNER_GROUP},..."
                );
            }
            (Some(RunnerTask(task)), Some(load))
        }
        None => (None, None),
    };
    let dialer = match &plane {
        Plane::User { stack, .. } => proxy::Dialer::Userspace(stack.handle()),
        Plane::Tun { .. } => proxy::Dialer::Kernel {
            device: config.tun.name.clone(),
        },
    };
    let (api_tx, mut api_rx) = mpsc::channel::<ApiCall>(16);
    let _proxies = ProxyTasks(proxy::start(&config, &dialer, api_tx.clone()).await?);
    let socket_path = api::socket_path_for(&config);
    let _api_guard = api::serve(
        &socket_path,
        config.api.group.as_deref(),
        api_tx,
        dialer.clone(),
    )?;
    let stack_wake = match &plane {
        Plane::User { stack, .. } => Some(stack.wake()),
        Plane::Tun { .. } => None,
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // Answers the core owes the API (pings, policy queries, runner finds),
    // by request id (one counter for all three).
    let mut waiting: Waiting = std::collections::HashMap::new();
    let mut next_timer = tokio::time::Instant::now();

    // Set when a lighthouse says our own certificate is revoked: we stop.
    let mut revoked: Option<String> = None;
    loop {
        tokio::select! {
            ready = outer.readable() => {
                match ready {
                    Ok(()) => match &mut plane {
                        Plane::Tun { tun, path } => path.udp_to_tun(&mut core, tun, &outer).await,
                        Plane::User { stack, path } => path.udp_in(&mut core, &outer, stack),
                    },
                    Err(e) => tracing::debug!(error = %e, "UDP socket error"),
                }
            }
            ready = async {
                match &plane {
                    Plane::Tun { tun, .. } => tun.readable().await,
                    Plane::User { .. } => std::future::pending().await,
                }
            } => {
                let alive = match (ready, &mut plane) {
                    (Ok(()), Plane::Tun { tun, path }) => path.tun_to_udp(&mut core, tun, &outer).await,
                    (Ok(()), Plane::User { .. }) => true,
                    (Err(e), _) => {
                        tracing::error!(error = %e, "TUN device error");
                        false
                    }
                };
                if !alive {
                    tracing::error!("TUN device unusable; stopping");
                    break;
                }
            }
            _ = async {
                match &stack_wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = tokio::time::sleep_until(next_timer) => {
                let now = Instant::now();
                core.handle_timeout(now);
                let mut next = core.poll_timeout(now);
                if let Plane::User { stack, .. } = &mut plane {
                    if let Some(d) = stack.poll_delay() {
                        next = next.min(now + d);
                    }
                }
                next_timer = tokio::time::Instant::from_std(next);
            }
            Some((request, reply)) = api_rx.recv() => {
                match request {
                    ApiRequest::Status => {
                        let mut status = serde_json::to_value(core.status()).unwrap_or_default();
                        if let Some(fields) = status.as_object_mut() {
                            fields.insert("mode".into(), serde_json::to_value(config.tun.mode).unwrap_or_default());
                            // Which process answers: `tern up --wait-for` reports only the node it started.
                            fields.insert("pid".into(), std::process::id().into());
                        }
                        let _ = reply.send(status);
                    }
                    ApiRequest::Ping { peer } => match core.ping(&peer, Instant::now()) {
                        Ok(id) => {
                            waiting.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(serde_json::json!({ "error": e.to_string() }));
                        }
                    },
                    ApiRequest::FindRunners { selector } => {
                        match core.find_runners(selector, Instant::now()) {
                            Ok(id) => {
                                waiting.insert(id, reply);
                            }
                            Err(e) => {
                                let _ = reply.send(serde_json::json!({ "error": e.to_string() }));
                            }
                        }
                    }
                    ApiRequest::Policy { target } => {
                        match core.ask_policy(*target.ip(), target.port(), Instant::now()) {
                            Ok(id) => {
                                waiting.insert(id, reply);
                            }
                            Err(e) => {
                                let _ = reply.send(serde_json::json!({ "error": e.to_string() }));
                            }
                        }
                    }
                    ApiRequest::Peer { overlay_ip } => {
                        let _ = reply.send(serde_json::to_value(core.peer_identity(overlay_ip).map(|c| Caller::from_cert(&c))).unwrap_or_default());
                    }
                    ApiRequest::Route { ip } => {
                        let _ = reply.send(match core.reachable(ip) {
                            Ok(()) => serde_json::json!({ "ok": true, "mode": config.tun.mode }),
                            Err(e) => serde_json::json!({ "error": e.to_string() }),
                        });
                    }
                    ApiRequest::Shutdown => {
                        tracing::info!("tern down: leaving the mesh");
                        let _ = reply.send(serde_json::json!({ "ok": true }));
                        break;
                    }
                    ApiRequest::Dial { .. } => {
                        // Answered by the API server itself with the dialer.
                        let _ = reply.send(serde_json::json!({ "error": "dial is not a loop request" }));
                    }
                }
            }
            Ok(()) = async { match runner_load.as_mut() { Some(l) => l.changed().await, None => std::future::pending().await } } => {
                if let Some(load) = runner_load.as_mut().map(|l| *l.borrow_and_update()) {
                    core.set_runner_load(load, Instant::now());
                }
            }
            Some((ip, reply)) = identity_rx.recv() => {
                let _ = reply.send(core.peer_identity(ip).map(|c| Caller::from_cert(&c)));
            }
            _ = sighup.recv() => reload(&mut core, config_path),
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
        }
        flush(&mut core, &outer).await;
        let routes_dev = (!userspace).then_some(config.tun.name.as_str());
        let packets = take_events(&mut core, &mut waiting, routes_dev, &mut revoked);
        match &mut plane {
            Plane::Tun { tun, path } => {
                for reply in packets {
                    path.write_one(tun, &reply).await;
                }
            }
            Plane::User { stack, path } => {
                let now = Instant::now();
                for reply in packets {
                    stack.handle_inbound(&reply, now);
                }
                stack.poll(now, &|ip| core.reachable(ip).map_err(|e| e.to_string()));
                path.flush(&mut core, &outer, stack).await;
                // What the stack's packets made the core say (a lookup, a
                // handshake): now, not at the next timer tick.
                flush(&mut core, &outer).await;
                for reply in take_events(&mut core, &mut waiting, None, &mut revoked) {
                    stack.handle_inbound(&reply, now);
                }
                if let Some(d) = stack.poll_delay() {
                    let at = tokio::time::Instant::now() + d;
                    if at < next_timer {
                        next_timer = at;
                    }
                }
            }
        }
        // What this step gave the core may want the clock sooner (a new
        // peer's first handshake timers, a lookup, a ping).
        let deadline = tokio::time::Instant::from_std(core.poll_timeout(Instant::now()));
        if deadline < next_timer {
            next_timer = deadline;
        }
        if revoked.is_some() {
            break;
        }
    }
    if revoked.is_none() {
        core.shutdown(Instant::now());
        flush(&mut core, &outer).await;
    }
    drop(plane);
    tracing::info!(
        "stopped{}",
        if userspace {
            ""
        } else {
            "; TUN device removed"
        }
    );
    if let Some(lighthouse) = revoked {
        let message = format!(
            "this node's certificate was revoked (lighthouse {lighthouse} says so); no peer accepts it any more. Get a new certificate (or enroll again) and start the node"
        );
        let stopped_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        api::write_stop_note(
            &socket_path,
            &api::StopNote {
                stopped_at: tern_shared::cert::format_unix_time(stopped_at),
                exit_code: tern_shared::exit::REVOKED,
                reason: message.clone(),
            },
        );
        return Err(join::Exit {
            code: tern_shared::exit::REVOKED,
            message,
        }
        .into());
    }
    Ok(())
}

/// API requests waiting for the core's answer, by request id.
type Waiting = std::collections::HashMap<u32, tokio::sync::oneshot::Sender<serde_json::Value>>;

/// Takes the core's events: answers go to whoever waits for them, kernel
/// routes are made or removed on `routes_dev` (none in userspace mode: the
/// stack hands every packet to the core), a revocation is noted in
/// `revoked`; packets for the TUN device or the stack are returned, in
/// order.
fn take_events(
    core: &mut NodeCore,
    waiting: &mut Waiting,
    routes_dev: Option<&str>,
    revoked: &mut Option<String>,
) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut answer = |id: u32, value: serde_json::Value| {
        if let Some(reply) = waiting.remove(&id) {
            let _ = reply.send(value);
        }
    };
    while let Some(event) = core.poll_event() {
        match event {
            NodeEvent::TunWrite(packet) => packets.push(packet),
            NodeEvent::Ping(r) => answer(r.id, serde_json::to_value(&r).unwrap_or_default()),
            NodeEvent::Policy(r) => answer(r.id, serde_json::to_value(&r).unwrap_or_default()),
            NodeEvent::Runners(r) => answer(r.id, serde_json::to_value(&r).unwrap_or_default()),
            NodeEvent::Revoked { lighthouse } => *revoked = Some(lighthouse),
            NodeEvent::AddRoute(subnet) => {
                let Some(tun) = routes_dev else { continue };
                match routes::add(subnet, tun) {
                    Ok(routes::RouteAdded::Added) => {
                        tracing::info!(%subnet, dev = %tun, "kernel route added")
                    }
                    Ok(routes::RouteAdded::Present) => {
                        tracing::debug!(%subnet, "kernel route already there")
                    }
                    Ok(routes::RouteAdded::Skipped(why)) => {
                        tracing::warn!(%subnet, reason = %why, "kernel route skipped")
                    }
                    Err(e) => tracing::warn!(%subnet, error = %e, "kernel route not added"),
                }
            }
            NodeEvent::RemoveRoute(subnet) => {
                let Some(tun) = routes_dev else { continue };
                match routes::remove(subnet, tun) {
                    Ok(()) => tracing::info!(%subnet, "kernel route removed"),
                    Err(e) => tracing::debug!(%subnet, error = %e, "kernel route not removed"),
                }
            }
        }
    }
    packets
}

/// Where packets for this node go.
enum Plane {
    Tun {
        tun: Box<tun_rs::AsyncDevice>,
        path: Box<DataPath>,
    },
    User {
        stack: Box<userspace::Netstack>,
        path: Box<userspace::UserPath>,
    },
}

/// Stops the local proxies and forwards with the daemon.
struct ProxyTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for ProxyTasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Stops the runner's listener with the daemon.
struct RunnerTask(tokio::task::JoinHandle<()>);

impl Drop for RunnerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGHUP: re-reads the config and applies its `[firewall]` without touching
/// tunnels. A config that does not parse is refused and the old rules stay.
/// A gateway whose inbound rules open none of its subnets passes nothing
/// into them: say so, for each, with the rule that would.
fn warn_closed_subnets(config: &NodeConfig) {
    let Some(gateway) = &config.gateway else {
        return;
    };
    for subnet in subnets_no_rule_opens(&config.firewall, &gateway.subnets) {
        tracing::warn!(
            %subnet,
            "[gateway] subnets: no [[firewall.inbound]] rule lets anything into {subnet}, so no client can reach it (rules without local_cidr cover only this node's own address); add one, e.g. [[firewall.inbound]] proto = \"tcp\" port = \"443\" groups = [\"ci\"] local_cidr = \"{subnet}\""
        );
    }
}

fn reload(core: &mut NodeCore, config_path: &Path) {
    match load_node_config(config_path) {
        Ok(config) => {
            warn_closed_subnets(&config);
            core.reload_firewall(&config.firewall);
            tracing::info!(
                inbound = config.firewall.inbound.len(),
                outbound = config.firewall.outbound.len(),
                "SIGHUP: firewall rules reloaded (other settings take effect at restart)"
            );
        }
        Err(e) => tracing::error!("SIGHUP: config reload refused, keeping the old rules: {e:#}"),
    }
}

async fn flush(core: &mut NodeCore, outer: &Outer) {
    while let Some(t) = core.poll_transmit() {
        outer.send(t.dst, &t.payload, None).await;
    }
}

/// The addresses other nodes on our own networks can reach us at: the
/// listen address when it names one, else the source address the kernel
/// would pick toward each lighthouse.
fn local_endpoints(listen: SocketAddr, lighthouses: &[LighthouseTarget]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if !listen.ip().is_unspecified() {
        out.push(listen);
        return out;
    }
    for lh in lighthouses {
        let bind: SocketAddr = match lh.endpoint.ip() {
            IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let Ok(probe) = StdUdpSocket::bind(bind) else {
            continue;
        };
        if probe.connect(lh.endpoint).is_ok() {
            if let Ok(local) = probe.local_addr() {
                let e = SocketAddr::new(local.ip(), listen.port());
                if !out.contains(&e) {
                    out.push(e);
                }
            }
        }
    }
    out
}
