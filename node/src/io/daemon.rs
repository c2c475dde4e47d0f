//! The node's event loop. [`Daemon::build`] turns a config into a running
//! node (identity, UDP socket, plane, core, runner, proxies, API, signals);
//! [`Daemon::step`] waits for one input and handles it, then drains in a
//! fixed order — the core's datagrams, its events (answers, kernel routes,
//! a revocation, packets for the plane), the plane's answer, the
//! datagrams that made — and sets the next timer from the earliest
//! deadline. One task owns the core; nothing else touches it.

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::Ipv4Net;
use tern_mesh::{Mesh, MeshSettings};
use tern_node_core::firewall::{subnet_within, subnets_no_rule_opens};
use tern_node_core::node::{FlowLogSettings, LighthouseTarget, NodeCore, NodeEvent};
use tern_runner::scheduler::Caller;
use tern_shared::cert::RUNNER_GROUP;
use tern_shared::config::{NodeConfig, TunMode};
use tern_shared::identity::Identity;
use tern_udp::daemon::{seed, unix_now};
use tern_udp::Outer;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use super::api::{self, ApiCall, ApiRequest};
use super::dns::Dns;
use super::plane::{Plane, TunPlane, UserPlane};
use super::{gateway, join, load_identity, load_node_config, proxy, routes, userspace};
use tern_runner::server as runner;

/// How long a stopping node lets its `[[services]]` finish the requests
/// in flight.
const SERVICE_DRAIN: Duration = Duration::from_secs(5);

/// What a step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// SIGINT, SIGTERM, `tern down`, or a plane that went away.
    Stop,
}

/// API requests waiting for the core's answer, by request id.
type Waiting = std::collections::HashMap<u32, tokio::sync::oneshot::Sender<serde_json::Value>>;

/// Everything a node needs before its plane exists: its config, verified
/// identity, the subnets it routes as a gateway, and its UDP socket.
pub struct Setup {
    config: NodeConfig,
    config_path: PathBuf,
    identity: Identity,
    gateway_subnets: Vec<Ipv4Net>,
    outer: Outer,
    listen: SocketAddr,
}

impl Setup {
    /// Reads the config, gets the identity (from files, or by enrolling),
    /// checks the gateway's subnets against the certificate and binds the
    /// UDP socket. `userspace` overrides `[tun] mode`.
    pub async fn load(
        config_path: &Path,
        userspace: bool,
        enrollment: Option<&join::Enrollment>,
    ) -> anyhow::Result<Setup> {
        let mut config = load_node_config(config_path)?;
        if userspace {
            config.tun.mode = TunMode::Userspace;
        }
        super::resolve_lighthouses(&mut config).await?;
        let identity = match (enrollment, config.pki.enrolls()) {
            (Some(enrollment), true) => join::enroll(&config, enrollment).await?,
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
        let cert = &identity.cert;
        tracing::info!(name = cert.name(), overlay_ip = %cert.overlay_ip(), "starting node");
        let gateway_subnets = gateway_subnets(&config, cert)?;
        warn_closed_subnets(&config);
        let socket = tern_udp::bind(config.listen.addr)
            .with_context(|| format!("binding UDP {} ([listen] addr)", config.listen.addr))?;
        let outer =
            Outer::new(socket).context("setting up the UDP socket's batching and offloads")?;
        let listen = outer.local_addr()?;
        Ok(Setup {
            config,
            config_path: config_path.to_path_buf(),
            identity,
            gateway_subnets,
            outer,
            listen,
        })
    }

    pub fn userspace(&self) -> bool {
        self.config.tun.mode == TunMode::Userspace
    }

    /// The userspace plane for this node.
    pub fn user_plane(&self) -> UserPlane {
        let overlay = self.identity.cert.overlay_net();
        let mtu = self.config.tun.mtu;
        let stack = userspace::Netstack::new(overlay, mtu, self.gateway_subnets.clone(), seed());
        tracing::info!(address = %overlay, mtu, listen = %self.listen, "userspace mode: no TUN device, an in-process TCP/IP stack");
        UserPlane::new(stack, mtu)
    }

    /// The TUN plane for this node.
    pub fn tun_plane(&self) -> anyhow::Result<TunPlane> {
        let tun = &self.config.tun;
        TunPlane::create(
            &tun.name,
            self.identity.cert.overlay_net(),
            tun.mtu,
            tun.offload,
            self.listen,
        )
    }
}

/// The subnets `[gateway]` routes, each checked against the certificate.
fn gateway_subnets(
    config: &NodeConfig,
    cert: &tern_shared::cert::VerifiedCert,
) -> anyhow::Result<Vec<Ipv4Net>> {
    let Some(gw) = &config.gateway else {
        return Ok(Vec::new());
    };
    for subnet in &gw.subnets {
        if !subnet_within(subnet, cert.subnets()) {
            anyhow::bail!(
                "[gateway] subnets: {subnet} is not authorized by this node's certificate (it carries: {}); \
                 sign the certificate with --subnets {subnet}, or remove it from [gateway] subnets",
                tern_shared::show::list(cert.subnets())
            );
        }
    }
    Ok(gw.subnets.clone())
}

/// A running node: its core, plane and inputs, and the parts that live as
/// long as it does (dropped, they stop).
pub struct Daemon<P: Plane> {
    config: NodeConfig,
    config_path: PathBuf,
    core: NodeCore,
    outer: Outer,
    plane: P,
    api_rx: mpsc::Receiver<ApiCall>,
    identity_rx: mpsc::Receiver<runner::IdentityQuery>,
    runner_load: Option<watch::Receiver<tern_shared::control::RunnerLoad>>,
    /// The runner's newest jobs, told to the lighthouses.
    runner_jobs: Option<watch::Receiver<Vec<tern_shared::control::RecentJob>>>,
    /// `[flows] path`'s writer.
    flow_file: Option<super::flowfile::FlowFile>,
    runner_metrics: Option<tern_runner::metrics::JobMetrics>,
    /// The certificate this node runs with now (replaced by SIGHUP), and
    /// the expiry warnings already given for it.
    own_cert: tern_shared::cert::VerifiedCert,
    expiry: tern_udp::daemon::ExpiryWarnings,
    signals: Signals,
    /// Answers the core owes the API (pings, policy queries, runner
    /// finds), by request id (one counter for all three).
    waiting: Waiting,
    next_timer: tokio::time::Instant,
    /// Set when a lighthouse says our own certificate is revoked: we stop.
    revoked: Option<String>,
    socket_path: PathBuf,
    /// Listeners, the system resolver's setup, questions waiting.
    dns: Dns,
    /// TCP links to lighthouses, when UDP gets no answer.
    links: super::links::LighthouseLinks,
    _gateway: Option<gateway::GatewaySetup>,
    _runner: Option<Task>,
    /// `[[services]]`, forwarding until dropped.
    services: Vec<super::services::RunningService>,
    /// Stopping, with services finishing their requests.
    draining: bool,
    _metrics: Option<Task>,
    _proxies: Vec<Task>,
    _api: api::SocketGuard,
}

struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

/// A task that stops with the daemon.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<P: Plane> Daemon<P> {
    /// The core, the gateway's kernel setup, the runner, the proxies and
    /// the API around `plane`.
    pub async fn build(setup: Setup, mut plane: P) -> anyhow::Result<Daemon<P>> {
        let Setup {
            config,
            config_path,
            identity,
            gateway_subnets,
            outer,
            listen,
        } = setup;
        let cert = identity.cert.clone();
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
        let links = super::links::LighthouseLinks::new(&config.lighthouses, &outer, now)?;
        core.set_local_endpoints(local_endpoints(listen, &targets));
        core.set_relay_after(config.peers.relay_after);
        enable_relay(&config, &cert, &mut core)?;
        core.set_policy(&config.firewall, gateway_subnets.clone(), &config.routes);
        core.set_accept_routes(config.tun.accept_routes);
        if config.pki.renew {
            core.enable_renewal(&cert);
            tracing::info!(
                at = %tern_shared::cert::format_unix_time(tern_node_core::node::renewal_due(&cert)),
                "[pki] renew: a lighthouse is asked for a fresh certificate two thirds into this one's life"
            );
        }
        let gateway = match (&config.gateway, plane.routes_device()) {
            (Some(_), None) => {
                tracing::info!(subnets = %tern_shared::show::list(&gateway_subnets), "gateway in userspace: flows to these subnets are proxied with ordinary sockets (no ip_forward, no NAT rules)");
                None
            }
            (Some(gw), Some(device)) => Some(gateway::setup(
                device,
                cert.overlay_net(),
                &gateway_subnets,
                gw.masquerade,
            )?),
            (None, _) => None,
        };
        if config.lighthouses.is_empty() {
            tracing::warn!(
                "no [[lighthouses]] configured: this node can neither find peers nor be found"
            );
        }
        let (identity_tx, identity_rx) = mpsc::channel::<runner::IdentityQuery>(64);
        core.set_services(super::services::adverts(&config.services), now);
        core.set_flow_log(FlowLogSettings {
            record: records_flows(&config),
            ship: config.flows.ship,
            file: config.flows.path.is_some(),
            seq_base: seed(),
            queue: config.flows.queue,
        });
        let flow_file = super::flowfile::FlowFile::start(&config.flows, cert.name())?;
        let services =
            super::services::start(&config.services, cert.overlay_ip(), &identity_tx, |port| {
                plane.listener(port)
            })
            .await?;
        let (runner, runner_load, runner_metrics, runner_jobs) = match &config.runner {
            Some(r) => {
                let (task, load, jobs, recent) = runner::start(
                    r.clone(),
                    cert.name().to_string(),
                    cert.overlay_ip(),
                    identity_tx,
                    plane.runner_listener(),
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
                (Some(Task(task)), Some(load), Some(jobs), Some(recent))
            }
            None => (None, None, None, None),
        };
        let (dns, names) = Dns::start(&config, &cert, &mut core, plane.routes_device())
            .await
            .context("starting DNS ([dns], [[gateway.dns]])")?;
        let dialer = plane.dialer();
        let (api_tx, api_rx) = mpsc::channel::<ApiCall>(16);
        let service_dialer = super::balance::ServiceDialer::new(api_tx.clone(), dialer.clone());
        let dialing = api::Dialing::new(dialer, names, service_dialer);
        let proxies = proxy::start(&config, &dialing, api_tx.clone()).await?;
        let metrics = match config.metrics.listen {
            Some(listen) => Some(Task(serve_metrics(listen, api_tx.clone()).await?)),
            None => None,
        };
        let socket_path = api::socket_path_for(&config);
        let api_guard = api::serve(&socket_path, config.api.group.as_deref(), api_tx, dialing)?;
        let signals = Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        };
        Ok(Daemon {
            config,
            config_path,
            core,
            outer,
            plane,
            api_rx,
            identity_rx,
            runner_load,
            runner_jobs,
            runner_metrics,
            own_cert: cert.clone(),
            expiry: tern_udp::daemon::ExpiryWarnings::default(),
            signals,
            waiting: Waiting::new(),
            next_timer: tokio::time::Instant::now(),
            revoked: None,
            socket_path,
            dns,
            links,
            _gateway: gateway,
            _runner: runner,
            services,
            draining: false,
            flow_file,
            _metrics: metrics,
            _proxies: proxies.into_iter().map(Task).collect(),
            _api: api_guard,
        })
    }

    /// Steps until told to stop, then leaves the mesh (or, revoked, stops
    /// with its own exit code).
    pub async fn run(mut self) -> anyhow::Result<()> {
        while self.step().await == Flow::Continue {}
        self.drain_services().await;
        self.stop().await
    }

    /// Before leaving: `[[services]]` take no new connection and the
    /// requests in flight finish (for up to [`SERVICE_DRAIN`]; a second
    /// SIGINT or SIGTERM stops at once), the mesh still carrying them.
    async fn drain_services(&mut self) {
        if self.revoked.is_some() {
            return;
        }
        let open: usize = self.services.iter().map(|s| s.stop_accepting()).sum();
        if open == 0 {
            return;
        }
        tracing::info!(
            open,
            "services: finishing the requests in flight before leaving (a second signal stops at once)"
        );
        let deadline = Instant::now() + SERVICE_DRAIN;
        self.draining = true;
        while Instant::now() < deadline && self.services.iter().any(|s| s.open_connections() > 0) {
            if self.step().await == Flow::Stop {
                break;
            }
        }
        self.draining = false;
    }

    /// Waits for one input and handles it, then drains in the fixed order.
    pub async fn step(&mut self) -> Flow {
        let flow = tokio::select! {
            ready = self.outer.readable() => {
                match ready {
                    Ok(()) => self.plane.receive_udp(&mut self.core, &self.outer).await,
                    Err(e) => tracing::debug!(error = %e, "UDP socket error"),
                }
                Flow::Continue
            }
            ready = self.plane.ready() => {
                let alive = match ready {
                    Ok(()) => self.plane.send_to_mesh(&mut self.core, &self.outer).await,
                    Err(e) => {
                        tracing::error!(error = %e, "TUN device error");
                        false
                    }
                };
                if alive {
                    Flow::Continue
                } else {
                    tracing::error!("TUN device unusable; stopping");
                    Flow::Stop
                }
            }
            _ = tokio::time::sleep_until(self.next_timer) => {
                let now = Instant::now();
                self.core.handle_timeout(now);
                self.links.tick(&mut self.core, &self.outer, now);
                self.expiry.check(&self.own_cert, unix_now());
                self.dns.refresh_domains(&self.core);
                let mut next = self.core.poll_timeout(now);
                for d in [self.plane.poll_delay(), self.links.poll_delay()].into_iter().flatten() {
                    next = next.min(now + d);
                }
                self.next_timer = tokio::time::Instant::from_std(next);
                Flow::Continue
            }
            Some((request, reply)) = self.api_rx.recv() => self.answer(request, reply),
            // While draining: look again at what is still open.
            _ = async {
                if self.draining {
                    tokio::time::sleep(Duration::from_millis(50)).await
                } else {
                    std::future::pending().await
                }
            } => Flow::Continue,
            Some(input) = self.dns.recv() => {
                self.dns.handle(&mut self.core, input, Instant::now());
                Flow::Continue
            }
            Ok(()) = async {
                match self.runner_load.as_mut() {
                    Some(l) => l.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(load) = self.runner_load.as_mut().map(|l| *l.borrow_and_update()) {
                    self.core.set_runner_load(load, Instant::now());
                }
                Flow::Continue
            }
            Ok(()) = async {
                match self.runner_jobs.as_mut() {
                    Some(j) => j.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(jobs) = self.runner_jobs.as_mut().map(|j| j.borrow_and_update().clone()) {
                    self.core.set_runner_jobs(jobs, Instant::now());
                }
                Flow::Continue
            }
            Some((ip, reply)) = self.identity_rx.recv() => {
                let _ = reply.send(self.core.peer_identity(ip).map(|c| Caller::from_cert(&c)));
                Flow::Continue
            }
            _ = self.signals.hup.recv() => {
                reload(&mut self.core, &self.config_path);
                self.reload_identity();
                Flow::Continue
            }
            _ = self.signals.int.recv() => {
                tracing::info!("SIGINT: stopping");
                Flow::Stop
            }
            _ = self.signals.term.recv() => {
                tracing::info!("SIGTERM: stopping");
                Flow::Stop
            }
        };
        if flow == Flow::Stop {
            return flow;
        }
        self.drain().await;
        if self.revoked.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// The fixed order after every input: the core's datagrams; its events,
    /// and the packets among them to the plane, which answers within the
    /// step (the userspace stack's queued packets go through the core and
    /// out); the datagrams that made, and anything the core said meanwhile;
    /// then the timer from the earliest deadline.
    async fn drain(&mut self) {
        self.take_flows();
        flush(&mut self.core, &self.outer).await;
        let packets = self.take_events();
        self.plane
            .deliver(packets, &mut self.core, &self.outer)
            .await;
        // What the plane's answer made the core say: out now, and packets
        // for the plane once more (a reject of what the stack just sent).
        flush(&mut self.core, &self.outer).await;
        let packets = self.take_events();
        if !packets.is_empty() {
            self.plane
                .deliver(packets, &mut self.core, &self.outer)
                .await;
            flush(&mut self.core, &self.outer).await;
        }
        let now = Instant::now();
        let mut deadline = self.core.poll_timeout(now);
        if let Some(d) = self.plane.poll_delay() {
            deadline = deadline.min(now + d);
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        if deadline < self.next_timer {
            self.next_timer = deadline;
        }
    }

    /// Flow records the core holds: timed, sent on to the lighthouses by
    /// the core, and handed to the file's writer (never waited for).
    fn take_flows(&mut self) {
        if !self.core.flow_records_waiting() {
            return;
        }
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entries = self.core.take_flow_records(Instant::now(), unix_ms);
        if let Some(file) = &self.flow_file {
            if !entries.is_empty() {
                let lost = file.send(entries);
                self.core.flow_records_lost(lost);
            }
        }
    }

    /// Takes the core's events: answers go to whoever waits for them,
    /// kernel routes are made or removed on the plane's device, a
    /// revocation is noted; packets for the plane are returned, in order.
    fn take_events(&mut self) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        while let Some(event) = self.core.poll_event() {
            let answer = match event {
                NodeEvent::TunWrite(packet) => {
                    packets.push(packet);
                    continue;
                }
                NodeEvent::Ping(mut r) => {
                    let via = match r.path {
                        Some(tern_mesh::PathKind::Direct) => r.endpoint,
                        Some(tern_mesh::PathKind::Relayed) => r.relay,
                        _ => None,
                    };
                    r.transport = via.map(|a| super::links::transport_to(&self.outer, a));
                    (r.id, serde_json::to_value(&r))
                }
                NodeEvent::Policy(r) => (r.id, serde_json::to_value(&r)),
                NodeEvent::Runners(r) => (r.id, serde_json::to_value(&r)),
                NodeEvent::Services(r) => {
                    let mut value = serde_json::to_value(&r).unwrap_or_default();
                    if let Some(fields) = value.as_object_mut() {
                        fields.insert("my_groups".into(), self.own_cert.groups().into());
                    }
                    (r.id, Ok(value))
                }
                NodeEvent::Revoked { lighthouse } => {
                    self.revoked = Some(lighthouse);
                    continue;
                }
                NodeEvent::Dns(result) => {
                    self.dns.answered(result);
                    continue;
                }
                NodeEvent::DnsForward(forward) => {
                    self.dns.forward(forward);
                    continue;
                }
                NodeEvent::Renewed(cert) => {
                    self.renewed(cert);
                    continue;
                }
                NodeEvent::AddRoute(subnet) => {
                    if let Some(device) = self.plane.routes_device() {
                        add_route(subnet, device);
                    }
                    continue;
                }
                NodeEvent::RemoveRoute(subnet) => {
                    if let Some(device) = self.plane.routes_device() {
                        match routes::remove(subnet, device) {
                            Ok(()) => tracing::info!(%subnet, "kernel route removed"),
                            Err(e) => {
                                tracing::debug!(%subnet, error = %e, "kernel route not removed")
                            }
                        }
                    }
                    continue;
                }
            };
            if let Some(reply) = self.waiting.remove(&answer.0) {
                let _ = reply.send(answer.1.unwrap_or_default());
            }
        }
        packets
    }

    /// One API request the event loop answers (a `Dial` the API server
    /// answers itself).
    fn answer(
        &mut self,
        request: ApiRequest,
        reply: tokio::sync::oneshot::Sender<serde_json::Value>,
    ) -> Flow {
        let now = Instant::now();
        let pending = match request {
            ApiRequest::Status => {
                let mut status = self.core.status();
                for lh in &mut status.lighthouses {
                    lh.transport = Some(self.links.describe(&self.outer, lh.endpoint));
                }
                let status = api::StatusReply {
                    status,
                    mode: self.config.tun.mode,
                    pid: std::process::id(),
                };
                let _ = reply.send(serde_json::to_value(status).unwrap_or_default());
                return Flow::Continue;
            }
            ApiRequest::Metrics => {
                let runner = match (&self.runner_metrics, &self.runner_load) {
                    (Some(jobs), Some(load)) => Some(super::metrics::RunnerPart {
                        jobs,
                        load: *load.borrow(),
                    }),
                    _ => None,
                };
                let text = super::metrics::render(
                    &self.core,
                    self.own_cert.not_after(),
                    runner,
                    &self.services,
                );
                let _ = reply.send(serde_json::json!({ "text": text }));
                return Flow::Continue;
            }
            ApiRequest::Ping { peer } => self.core.ping(&peer, now),
            ApiRequest::FindRunners { selector } => self.core.find_runners(selector, now),
            ApiRequest::Services { name } => self.core.find_services(&name, now),
            ApiRequest::Policy { target } => self.core.ask_policy(*target.ip(), target.port(), now),
            ApiRequest::Peer { overlay_ip } => {
                let caller = self
                    .core
                    .peer_identity(overlay_ip)
                    .map(|c| Caller::from_cert(&c));
                let _ = reply.send(serde_json::to_value(caller).unwrap_or_default());
                return Flow::Continue;
            }
            ApiRequest::Route { ip } => {
                let _ = reply.send(match self.core.reachable(ip) {
                    Ok(()) => serde_json::to_value(api::RouteReply {
                        ok: true,
                        mode: self.config.tun.mode,
                    })
                    .unwrap_or_default(),
                    Err(e) => api::ApiError::from(e).to_value(),
                });
                return Flow::Continue;
            }
            ApiRequest::Shutdown => {
                tracing::info!("tern down: leaving the mesh");
                let _ = reply.send(serde_json::json!({ "ok": true }));
                return Flow::Stop;
            }
            ApiRequest::Dial { .. }
            | ApiRequest::DialName { .. }
            | ApiRequest::DialService { .. }
            | ApiRequest::Forward { .. }
            | ApiRequest::Resolve { .. } => {
                // Answered by the API server itself with the dialer.
                let refusal = api::ApiError::new(api::ErrorKind::Other, "not a loop request");
                let _ = reply.send(refusal.to_value());
                return Flow::Continue;
            }
        };
        match pending {
            Ok(id) => {
                self.waiting.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(api::ApiError::from(e).to_value());
            }
        }
        Flow::Continue
    }

    /// Leaves the mesh (lighthouses told), or, revoked, leaves a note
    /// beside the API socket and stops with its own exit code.
    /// SIGHUP, `[pki]`: the certificate, key and CAs read again. A new
    /// identity that verifies, for the same overlay address, replaces the
    /// running one without dropping a session; anything else is refused
    /// with its reason and the running identity stays.
    fn reload_identity(&mut self) {
        let config = match load_node_config(&self.config_path) {
            Ok(c) => c,
            Err(_) => return, // `reload` logged why
        };
        if config.pki.enrolls() {
            return; // an enrolled identity lives in memory only
        }
        let identity = match load_identity(&config.pki.ca, &config.pki.cert, &config.pki.key) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!("SIGHUP: [pki] refused, keeping the running certificate: {e}");
                return;
            }
        };
        let same_cas = identity.ca.trusts_same_cas(self.core.mesh().ca());
        if identity.cert.encoded() == self.own_cert.encoded() && same_cas {
            tracing::debug!("SIGHUP: [pki] unchanged");
            return;
        }
        match self.swap_identity(&identity.key, &identity.cert, identity.ca.clone()) {
            Ok(change) => {
                tracing::info!(
                    name = identity.cert.name(),
                    until = %tern_shared::cert::format_unix_time(identity.cert.not_after()),
                    fingerprint = %identity.cert.fingerprint(),
                    new_key = change.new_key,
                    peers = change.rehandshakes,
                    peers_refused = change.peers_refused,
                    "SIGHUP: certificate reloaded; every peer re-handshakes with it"
                );
            }
            Err(why) => {
                tracing::error!("SIGHUP: new certificate refused, keeping the running one: {why}")
            }
        }
    }

    /// `[pki] renew`: the lighthouse renewed our certificate (the core
    /// checked it renews ours exactly). It is swapped in at once, with the
    /// key from `[pki] key`, then written over `[pki] cert` atomically (mode
    /// 0600), so a restart starts with it. A file that cannot be written
    /// leaves the node running with the renewed certificate in memory, and
    /// the log says what to change.
    fn renewed(&mut self, cert: tern_shared::cert::VerifiedCert) {
        let key = match std::fs::read_to_string(&self.config.pki.key)
            .map_err(|e| e.to_string())
            .and_then(|t| tern_shared::keys::NodeSecretKey::from_pem(&t).map_err(|e| e.to_string()))
        {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(key = %self.config.pki.key.display(), error = %e, "renewed certificate not used: the key file does not read");
                self.core.renewal_done(&self.own_cert);
                return;
            }
        };
        let ca = self.core.mesh().ca().clone();
        let change = match self.swap_identity(&key, &cert, ca) {
            Ok(change) => change,
            Err(why) => {
                tracing::error!("renewed certificate not used: {why}");
                self.core.renewal_done(&self.own_cert);
                return;
            }
        };
        // Saved before it is announced: whoever reads the log line finds
        // the new file.
        if let Err(e) = write_atomically(&self.config.pki.cert, &cert.cert().to_pem()) {
            tracing::error!(
                cert = %self.config.pki.cert.display(),
                error = %e,
                "renewed certificate in use but not saved (the node starts with the old one): make its directory writable by the daemon (systemd: ReadWritePaths=)"
            );
        }
        tracing::info!(
            until = %tern_shared::cert::format_unix_time(cert.not_after()),
            peers = change.rehandshakes,
            "certificate renewed; every peer re-handshakes with it"
        );
    }

    /// The core takes `cert` (see `NodeCore::replace_identity`); then it is
    /// this node's: metrics, expiry warnings and the next renewal follow it.
    fn swap_identity(
        &mut self,
        key: &tern_shared::keys::NodeSecretKey,
        cert: &tern_shared::cert::VerifiedCert,
        ca: tern_shared::cert::CaPool,
    ) -> Result<tern_mesh::IdentityChange, String> {
        let change = self
            .core
            .replace_identity(key.static_secret(), cert, ca, Instant::now())?;
        self.core.renewal_done(cert);
        self.own_cert = cert.clone();
        self.expiry = tern_udp::daemon::ExpiryWarnings::default();
        Ok(change)
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let userspace = self.plane.routes_device().is_none();
        if self.revoked.is_none() {
            self.core.shutdown(Instant::now());
        } else {
            self.core.stop_recording_flows(Instant::now());
        }
        // The flows still open, recorded as stopped: to the file, and sent
        // once (to a lighthouse still listening).
        self.take_flows();
        if self.revoked.is_none() {
            flush(&mut self.core, &self.outer).await;
        }
        let revoked = self.revoked.take();
        let socket_path = self.socket_path.clone();
        drop(self);
        tracing::info!(
            "stopped{}",
            if userspace {
                ""
            } else {
                "; TUN device removed"
            }
        );
        let Some(lighthouse) = revoked else {
            return Ok(());
        };
        let message = format!(
            "this node's certificate was revoked (lighthouse {lighthouse} says so); no peer accepts it any more. Get a new certificate (or enroll again) and start the node"
        );
        api::write_stop_note(
            &socket_path,
            &api::StopNote {
                stopped_at: tern_shared::cert::format_unix_time(unix_now()),
                exit_code: tern_shared::exit::REVOKED,
                reason: message.clone(),
            },
        );
        Err(join::Exit {
            code: tern_shared::exit::REVOKED,
            message,
        }
        .into())
    }
}

/// `tern up`: builds the node for its mode and runs it until SIGINT,
/// SIGTERM or `tern down`.
pub async fn run(
    config_path: &Path,
    userspace: bool,
    enrollment: Option<&join::Enrollment>,
) -> anyhow::Result<()> {
    let setup = Setup::load(config_path, userspace, enrollment).await?;
    if setup.userspace() {
        let plane = setup.user_plane();
        Daemon::build(setup, plane).await?.run().await
    } else {
        let plane = setup.tun_plane()?;
        Daemon::build(setup, plane).await?.run().await
    }
}

fn add_route(subnet: Ipv4Net, device: &str) {
    match routes::add(subnet, device) {
        Ok(routes::RouteAdded::Added) => {
            tracing::info!(%subnet, dev = %device, "kernel route added")
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

/// Replaces `path` with `text` (mode 0600): written to a file beside it,
/// synced, then renamed over it, so a crash leaves the old or the new file,
/// never half of one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The `[metrics] listen` endpoint: each scrape asks the event loop (the
/// core's one owner) through the same channel the API socket uses.
async fn serve_metrics(
    listen: std::net::SocketAddr,
    calls: mpsc::Sender<ApiCall>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tern_udp::metrics::bind(listen)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(%listen, "metrics at http://{listen}/metrics");
    Ok(tern_udp::metrics::serve(listener, move || {
        let calls = calls.clone();
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            calls.send((ApiRequest::Metrics, tx)).await.ok()?;
            let reply = rx.await.ok()?;
            reply.get("text")?.as_str().map(str::to_string)
        }
    }))
}

/// SIGHUP: re-reads the config and applies its `[firewall]` without touching
/// tunnels. A config that does not parse is refused and the old rules stay.
fn reload(core: &mut NodeCore, config_path: &Path) {
    match load_node_config(config_path) {
        Ok(config) => {
            warn_closed_subnets(&config);
            core.reload_firewall(&config.firewall);
            core.record_flows(records_flows(&config));
            tracing::info!(
                inbound = config.firewall.inbound.len(),
                outbound = config.firewall.outbound.len(),
                flow_records = records_flows(&config),
                "SIGHUP: firewall rules reloaded, and [flows] record (other settings take effect at restart)"
            );
        }
        Err(e) => tracing::error!("SIGHUP: config reload refused, keeping the old rules: {e:#}"),
    }
}

/// Whether flows are recorded: `[flows] record`, on a node with inbound
/// rules (without, nothing comes in).
fn records_flows(config: &NodeConfig) -> bool {
    config.flows.record && !config.firewall.inbound.is_empty()
}

/// `[relay]`: relaying for others, with the relay group only.
fn enable_relay(
    config: &NodeConfig,
    cert: &tern_shared::cert::VerifiedCert,
    core: &mut NodeCore,
) -> anyhow::Result<()> {
    if !config.relay.enabled {
        return Ok(());
    }
    if !cert.has_group(tern_shared::cert::RELAY_GROUP) {
        anyhow::bail!(
            "[relay] enabled, but this node's certificate lacks the '{}' group: sign it with --groups {} (lighthouses hand pairs only to relays with it), or remove [relay]",
            tern_shared::cert::RELAY_GROUP,
            tern_shared::cert::RELAY_GROUP
        );
    }
    core.enable_relay(config.relay.packets_per_sec);
    tracing::info!(
        packets_per_sec = config.relay.packets_per_sec,
        "relaying for pairs the lighthouses hand to this node"
    );
    Ok(())
}

async fn flush(core: &mut NodeCore, outer: &Outer) {
    while let Some(t) = core.poll_transmit() {
        outer.send(t.dst, &t.payload, None).await;
    }
}

/// The addresses other nodes on our own networks can reach us at: the
/// listen address when it names one, else the source address the kernel
/// would pick toward each lighthouse, and, listening dual-stack (`[::]`),
/// the host's global IPv6 addresses (a direct IPv6 path where IPv4 goes
/// through NATs).
fn local_endpoints(listen: SocketAddr, lighthouses: &[LighthouseTarget]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if !listen.ip().is_unspecified() {
        out.push(listen);
        return out;
    }
    if listen.is_ipv6() {
        for ip in tern_udp::local::interface_ipv6() {
            out.push(SocketAddr::new(IpAddr::V6(ip), listen.port()));
        }
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
