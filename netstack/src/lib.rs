//! `tern-netstack`: the userspace TCP/IP stack both daemons use where a
//! kernel's would need a TUN device (a node in userspace mode; the
//! lighthouse's admin listener on its overlay address).
//!
//! Userspace mode: no TUN device, no root. The packets the core would write
//! to a TUN device go to an in-process TCP/IP stack (smoltcp) instead, and
//! what that stack sends goes to the core as if read from a TUN device, so
//! routing, the firewall and identity checks are exactly those of TUN mode.
//!
//! The stack terminates:
//! - TCP to this node's own overlay address, on ports a local service
//!   listens on ([`Netstack::listen`]: the runner); other ports are refused
//!   with a RST, as a kernel would;
//! - TCP and UDP to the subnets this node routes as a gateway: each new flow
//!   is dialled to the private target with an ordinary socket first, and
//!   only then accepted, so a refused or unreachable target is answered with
//!   a RST (TCP) instead of a connection that hangs;
//! - connections this node opens ([`NetstackHandle::connect`], for
//!   `tern forward`, SOCKS5, HTTP CONNECT, `tern run`) and UDP it sends
//!   ([`NetstackHandle::udp_bind`], for SOCKS5 UDP ASSOCIATE).
//!
//! One task (the daemon's event loop) owns the stack. Each connection talks
//! to it through a pair of bounded channels ([`Conn`]); a [`Notify`] wakes
//! the owner when a connection has sent or made room.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet,
    TcpPacket,
};
use tern_shared::packet::{build_udp_ipv4, parse_udp_ipv4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

/// Bytes each side of a TCP connection may have in flight in the stack.
const TCP_BUFFER: usize = 256 * 1024;
/// Chunks queued between the stack and a connection's task, each way.
const CHANNEL_DEPTH: usize = 32;
/// Largest chunk read from a socket at once.
const CHUNK: usize = 16 * 1024;
/// How long a dial (ours, or a gateway's to its private target) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a gateway's private target may take to accept a connection.
const TARGET_DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keepalive on the stack's TCP connections, and when a silent peer is
/// given up: a vanished peer is noticed in seconds, as with kernel sockets
/// the runner sets up.
const KEEPALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// UDP flows through a gateway are forgotten after this long without traffic.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Most TCP connections and UDP flows at once.
const MAX_CONNECTIONS: usize = 2048;

/// Why a connection could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    #[error("{0} refused the connection")]
    Refused(SocketAddrV4),
    #[error("no answer from {0} within {1} s")]
    TimedOut(SocketAddrV4, u64),
    #[error("{0}")]
    NoRoute(String),
    #[error("the node is stopping")]
    Stopped,
    #[error("too many connections at once")]
    TooMany,
}

/// One TCP connection through the stack, as its task sees it: chunks in,
/// chunks out. Dropping the sender closes our side (FIN); the receiver ends
/// when the peer closed or the connection broke.
pub struct Conn {
    pub peer: SocketAddrV4,
    pub local: SocketAddrV4,
    rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Vec<u8>>,
    wake: Arc<Notify>,
}

impl Conn {
    /// Copies both ways between this connection and `stream` until both
    /// sides have closed.
    pub async fn splice<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let Conn {
            mut rx, tx, wake, ..
        } = self;
        let (mut read, mut write) = tokio::io::split(stream);
        let wake_in = wake.clone();
        let inbound = async move {
            while let Some(chunk) = rx.recv().await {
                wake_in.notify_one();
                if write.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = write.shutdown().await;
        };
        let outbound = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                        wake.notify_one();
                    }
                }
            }
            drop(tx);
            wake.notify_one();
        };
        tokio::join!(inbound, outbound);
    }

    /// The connection as an ordinary byte stream (for code written against
    /// sockets, like the runner): a pump task copies between the two.
    pub fn into_stream(self) -> tokio::io::DuplexStream {
        let (ours, theirs) = tokio::io::duplex(CHUNK * 4);
        tokio::spawn(self.splice(ours));
        theirs
    }
}

/// A UDP port on this node's overlay address, for SOCKS5 UDP ASSOCIATE:
/// datagrams sent from it, and those arriving for it.
pub struct UdpBinding {
    pub port: u16,
    pub rx: mpsc::Receiver<(SocketAddrV4, Vec<u8>)>,
    sends: mpsc::Sender<Request>,
    wake: Arc<Notify>,
}

impl UdpBinding {
    pub async fn send(&self, to: SocketAddrV4, payload: Vec<u8>) -> Result<(), DialError> {
        self.sends
            .send(Request::UdpSend {
                port: self.port,
                to,
                payload,
            })
            .await
            .map_err(|_| DialError::Stopped)?;
        self.wake.notify_one();
        Ok(())
    }
}

impl Drop for UdpBinding {
    fn drop(&mut self) {
        let _ = self.sends.try_send(Request::UdpUnbind { port: self.port });
        self.wake.notify_one();
    }
}

enum Request {
    Connect {
        target: SocketAddrV4,
        reply: oneshot::Sender<Result<Conn, DialError>>,
    },
    UdpBind {
        reply: oneshot::Sender<Result<UdpBinding, DialError>>,
    },
    UdpSend {
        port: u16,
        to: SocketAddrV4,
        payload: Vec<u8>,
    },
    UdpUnbind {
        port: u16,
    },
}

/// What other tasks hold to use the stack.
#[derive(Clone)]
pub struct NetstackHandle {
    requests: mpsc::Sender<Request>,
    wake: Arc<Notify>,
}

impl NetstackHandle {
    /// Opens a TCP connection from this node's overlay address to `target`
    /// (a peer's overlay address, or an address a gateway routes).
    pub async fn connect(&self, target: SocketAddrV4) -> Result<Conn, DialError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Connect { target, reply })
            .await
            .map_err(|_| DialError::Stopped)?;
        self.wake.notify_one();
        answer.await.map_err(|_| DialError::Stopped)?
    }

    /// A fresh UDP port on this node's overlay address.
    pub async fn udp_bind(&self) -> Result<UdpBinding, DialError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::UdpBind { reply })
            .await
            .map_err(|_| DialError::Stopped)?;
        self.wake.notify_one();
        answer.await.map_err(|_| DialError::Stopped)?
    }
}

/// The device between smoltcp and the core: two packet queues.
#[derive(Default)]
struct Queues {
    inbound: VecDeque<Vec<u8>>,
    outbound: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.inbound.pop_front()?;
        Some((Rx(packet), Tx(&mut self.outbound)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(&mut self.outbound))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// A TCP four-tuple: (peer, local).
type Tuple = (SocketAddrV4, SocketAddrV4);

/// What a stack socket is for.
enum Role {
    /// Accepting for a local service; delivered once established.
    Service(mpsc::Sender<Conn>),
    /// Accepting for a gateway flow whose private target is already
    /// connected; spliced to it once established.
    Gateway(tokio::net::TcpStream),
    /// Our own connect; the opener waits.
    Opening {
        reply: oneshot::Sender<Result<Conn, DialError>>,
        target: SocketAddrV4,
        deadline: Instant,
    },
    /// Established and attached to a task.
    Open(Pipe),
}

/// The stack's side of a connection's channels.
struct Pipe {
    to_app: Option<mpsc::Sender<Vec<u8>>>,
    from_app: mpsc::Receiver<Vec<u8>>,
    /// A chunk from the task not yet fully in the socket's buffer.
    pending: Option<(Vec<u8>, usize)>,
    app_done: bool,
    /// A chunk read from the socket that the task had no room for yet.
    held: Option<Vec<u8>>,
}

struct UdpFlow {
    socket: Arc<tokio::net::UdpSocket>,
    last: Instant,
    task: tokio::task::JoinHandle<()>,
}

/// The userspace TCP/IP stack of one node. Owned by the event loop.
pub struct Netstack {
    iface: Interface,
    device: Queues,
    sockets: SocketSet<'static>,
    overlay_ip: Ipv4Addr,
    routed: Vec<Ipv4Net>,
    services: HashMap<u16, mpsc::Sender<Conn>>,
    roles: HashMap<SocketHandle, Role>,
    tuples: HashMap<Tuple, SocketHandle>,
    /// Gateway dials in progress, with the SYN that asked for each.
    dialling: HashMap<Tuple, Vec<u8>>,
    dials_tx: mpsc::Sender<(Tuple, Result<tokio::net::TcpStream, ()>)>,
    dials_rx: mpsc::Receiver<(Tuple, Result<tokio::net::TcpStream, ()>)>,
    requests: mpsc::Receiver<Request>,
    requests_tx: mpsc::Sender<Request>,
    udp_flows: HashMap<Tuple, UdpFlow>,
    udp_back_tx: mpsc::Sender<(Tuple, Vec<u8>)>,
    udp_back_rx: mpsc::Receiver<(Tuple, Vec<u8>)>,
    udp_bindings: HashMap<u16, mpsc::Sender<(SocketAddrV4, Vec<u8>)>>,
    next_port: u16,
    wake: Arc<Notify>,
    start: Instant,
    /// Bytes each way per TCP connection, and most connections at once.
    tcp_buffer: usize,
    max_connections: usize,
}

fn v4(e: IpEndpoint) -> Option<SocketAddrV4> {
    match e.addr {
        IpAddress::Ipv4(a) => Some(SocketAddrV4::new(a, e.port)),
    }
}

impl Netstack {
    /// A stack for `overlay` (this node's address and the mesh's prefix)
    /// that also terminates the subnets in `routed` (a gateway's).
    pub fn new(overlay: Ipv4Net, mtu: u16, routed: Vec<Ipv4Net>, seed: u64) -> Netstack {
        let mut device = Queues {
            mtu: mtu as usize,
            ..Queues::default()
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let start = Instant::now();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::Ipv4(overlay.addr()),
                overlay.prefix_len(),
            ));
        });
        // Everything not in the mesh goes out "through us": the core routes
        // it to a gateway. And with any-IP on, a gateway's stack accepts
        // packets for the subnets it routes (which packets reach the stack
        // at all is the core's decision).
        let _ = iface.routes_mut().add_default_ipv4_route(overlay.addr());
        iface.set_any_ip(true);
        let (requests_tx, requests) = mpsc::channel(256);
        let (dials_tx, dials_rx) = mpsc::channel(256);
        let (udp_back_tx, udp_back_rx) = mpsc::channel(1024);
        Netstack {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            overlay_ip: overlay.addr(),
            routed,
            services: HashMap::new(),
            roles: HashMap::new(),
            tuples: HashMap::new(),
            dialling: HashMap::new(),
            dials_tx,
            dials_rx,
            requests,
            requests_tx,
            udp_flows: HashMap::new(),
            udp_back_tx,
            udp_back_rx,
            udp_bindings: HashMap::new(),
            next_port: 40_000 + (seed % 20_000) as u16,
            wake: Arc::new(Notify::new()),
            start,
            tcp_buffer: TCP_BUFFER,
            max_connections: MAX_CONNECTIONS,
        }
    }

    /// Smaller (or larger) limits than a node's: `tcp_buffer` bytes each
    /// way per TCP connection, at most `max_connections` at once (the
    /// lighthouse's admin listener needs few and small).
    pub fn with_limits(mut self, tcp_buffer: usize, max_connections: usize) -> Netstack {
        self.tcp_buffer = tcp_buffer.max(1024);
        self.max_connections = max_connections.max(1);
        self
    }

    pub fn handle(&self) -> NetstackHandle {
        NetstackHandle {
            requests: self.requests_tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Notified whenever the stack has work: poll it then.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// A local service on this node's overlay address: connections to
    /// `port` arrive on the returned receiver once established.
    pub fn listen(&mut self, port: u16) -> mpsc::Receiver<Conn> {
        let (tx, rx) = mpsc::channel(64);
        self.services.insert(port, tx);
        rx
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn routes(&self, ip: Ipv4Addr) -> bool {
        self.routed.iter().any(|n| n.contains(&ip))
    }

    /// A packet the core let through (decrypted, firewall passed), as it
    /// would have been written to a TUN device.
    pub fn handle_inbound(&mut self, packet: &[u8], now: Instant) {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return;
        };
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let ours = dst == self.overlay_ip;
        let routed = !ours && self.routes(dst);
        if !ours && !routed {
            return;
        }
        match ip.next_header() {
            IpProtocol::Udp => {
                if let Some(udp) = parse_udp_ipv4(packet) {
                    let from = SocketAddrV4::new(src, udp.src_port);
                    let to = SocketAddrV4::new(dst, udp.dst_port);
                    if ours {
                        if let Some(tx) = self.udp_bindings.get(&udp.dst_port) {
                            let _ = tx.try_send((from, udp.payload.to_vec()));
                        }
                    } else {
                        self.udp_to_target((from, to), udp.payload, now);
                    }
                }
            }
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    return;
                };
                let tuple = (
                    SocketAddrV4::new(src, tcp.src_port()),
                    SocketAddrV4::new(dst, tcp.dst_port()),
                );
                let new_flow = tcp.syn() && !tcp.ack() && !self.tuples.contains_key(&tuple);
                if new_flow && routed {
                    self.dial_target(tuple, packet);
                    return;
                }
                if new_flow && ours {
                    if let Some(service) = self.services.get(&tuple.1.port()).cloned() {
                        self.accept(tuple, Role::Service(service));
                    }
                }
                self.device.inbound.push_back(packet.to_vec());
            }
            // Echo requests to this node are answered by the stack; those
            // to a routed target are not (no raw sockets without root).
            IpProtocol::Icmp if ours => self.device.inbound.push_back(packet.to_vec()),
            _ => {}
        }
    }

    /// A new TCP flow to a routed target: connect to the target first, and
    /// accept (or refuse) the overlay side once that has an answer.
    fn dial_target(&mut self, tuple: Tuple, syn: &[u8]) {
        if self.dialling.contains_key(&tuple) {
            return; // a retransmitted SYN
        }
        if self.roles.len() + self.dialling.len() >= self.max_connections {
            self.device.inbound.push_back(syn.to_vec()); // refused: no socket
            return;
        }
        self.dialling.insert(tuple, syn.to_vec());
        let results = self.dials_tx.clone();
        let wake = self.wake.clone();
        tokio::spawn(async move {
            let target = SocketAddr::V4(tuple.1);
            let stream =
                tokio::time::timeout(TARGET_DIAL_TIMEOUT, tokio::net::TcpStream::connect(target))
                    .await;
            let result = match stream {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    Ok(s)
                }
                Ok(Err(e)) => {
                    tracing::debug!(%target, error = %e, "gateway target refused");
                    Err(())
                }
                Err(_) => {
                    tracing::debug!(%target, "gateway target did not answer");
                    Err(())
                }
            };
            let _ = results.send((tuple, result)).await;
            wake.notify_one();
        });
    }

    fn new_socket(&mut self) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.tcp_buffer]),
            tcp::SocketBuffer::new(vec![0; self.tcp_buffer]),
        );
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(KEEPALIVE.into()));
        socket.set_timeout(Some(IDLE_TIMEOUT.into()));
        socket
    }

    /// A listening socket for exactly this flow's local endpoint, so the
    /// SYN that follows is accepted.
    fn accept(&mut self, tuple: Tuple, role: Role) {
        let mut socket = self.new_socket();
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*tuple.1.ip())),
            port: tuple.1.port(),
        };
        if socket.listen(endpoint).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        self.roles.insert(handle, role);
        self.tuples.insert(tuple, handle);
    }

    fn udp_to_target(&mut self, tuple: Tuple, payload: &[u8], now: Instant) {
        if !self.udp_flows.contains_key(&tuple) {
            if self.udp_flows.len() >= self.max_connections {
                return;
            }
            let socket = match std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
                s.connect(tuple.1)?;
                s.set_nonblocking(true)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(target = %tuple.1, error = %e, "gateway UDP socket failed");
                    return;
                }
            };
            let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else {
                return;
            };
            let socket = Arc::new(socket);
            let (reader, back, wake) =
                (socket.clone(), self.udp_back_tx.clone(), self.wake.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                while let Ok(n) = reader.recv(&mut buf).await {
                    if back.send((tuple, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                    wake.notify_one();
                }
            });
            self.udp_flows.insert(
                tuple,
                UdpFlow {
                    socket,
                    last: now,
                    task,
                },
            );
        }
        if let Some(flow) = self.udp_flows.get_mut(&tuple) {
            flow.last = now;
            let _ = flow.socket.try_send(payload);
        }
    }

    fn free_port(&mut self) -> Option<u16> {
        for _ in 0..20_000 {
            let port = self.next_port;
            self.next_port = if self.next_port >= 59_999 {
                40_000
            } else {
                self.next_port + 1
            };
            let used = self.udp_bindings.contains_key(&port)
                || self.tuples.keys().any(|(_, local)| local.port() == port);
            if !used {
                return Some(port);
            }
        }
        None
    }

    fn handle_request(&mut self, request: Request, route: &dyn Fn(Ipv4Addr) -> Result<(), String>) {
        match request {
            Request::Connect { target, reply } => {
                if let Err(why) = route(*target.ip()) {
                    let _ = reply.send(Err(DialError::NoRoute(why)));
                    return;
                }
                if self.roles.len() >= self.max_connections {
                    let _ = reply.send(Err(DialError::TooMany));
                    return;
                }
                let Some(port) = self.free_port() else {
                    let _ = reply.send(Err(DialError::TooMany));
                    return;
                };
                let mut socket = self.new_socket();
                let local = SocketAddrV4::new(self.overlay_ip, port);
                let remote = IpEndpoint::new(IpAddress::Ipv4(*target.ip()), target.port());
                if let Err(e) = socket.connect(self.iface.context(), remote, port) {
                    let _ = reply.send(Err(DialError::NoRoute(format!(
                        "cannot connect to {target}: {e}"
                    ))));
                    return;
                }
                let handle = self.sockets.add(socket);
                self.tuples.insert((target, local), handle);
                self.roles.insert(
                    handle,
                    Role::Opening {
                        reply,
                        target,
                        deadline: Instant::now() + DIAL_TIMEOUT,
                    },
                );
            }
            Request::UdpBind { reply } => {
                let Some(port) = self.free_port() else {
                    let _ = reply.send(Err(DialError::TooMany));
                    return;
                };
                let (tx, rx) = mpsc::channel(256);
                self.udp_bindings.insert(port, tx);
                let _ = reply.send(Ok(UdpBinding {
                    port,
                    rx,
                    sends: self.requests_tx.clone(),
                    wake: self.wake.clone(),
                }));
            }
            Request::UdpSend { port, to, payload } => {
                if self.udp_bindings.contains_key(&port) {
                    let packet =
                        build_udp_ipv4(self.overlay_ip, *to.ip(), port, to.port(), &payload);
                    self.device.outbound.push_back(packet);
                }
            }
            Request::UdpUnbind { port } => {
                self.udp_bindings.remove(&port);
            }
        }
    }

    /// Does whatever is due: requests from tasks, finished dials, the
    /// stack's own processing, moving bytes between sockets and tasks.
    /// `route` says whether an address is reachable at all (the core's
    /// routes), for a clear error instead of a timeout.
    pub fn poll(&mut self, now: Instant, route: &dyn Fn(Ipv4Addr) -> Result<(), String>) {
        while let Ok(request) = self.requests.try_recv() {
            self.handle_request(request, route);
        }
        while let Ok((tuple, result)) = self.dials_rx.try_recv() {
            let Some(syn) = self.dialling.remove(&tuple) else {
                continue;
            };
            if let Ok(stream) = result {
                self.accept(tuple, Role::Gateway(stream));
            }
            // Without a socket for it the stack answers the SYN with a RST.
            self.device.inbound.push_back(syn);
        }
        while let Ok((tuple, payload)) = self.udp_back_rx.try_recv() {
            let (client, target) = tuple;
            let packet = build_udp_ipv4(
                *target.ip(),
                *client.ip(),
                target.port(),
                client.port(),
                &payload,
            );
            self.device.outbound.push_back(packet);
        }
        self.udp_flows.retain(|_, f| {
            let keep = now.saturating_duration_since(f.last) < UDP_IDLE;
            if !keep {
                f.task.abort();
            }
            keep
        });
        let mut again = false;
        for _ in 0..4 {
            let ts = self.now();
            self.iface.poll(ts, &mut self.device, &mut self.sockets);
            again = self.service_sockets(now);
            if !again {
                break;
            }
        }
        if again {
            // Work is left (bytes moved into sockets after the last pass):
            // come back at once rather than at the next timer.
            self.wake.notify_one();
        }
    }

    /// Moves bytes between each socket and its task, attaches newly
    /// established connections, and removes finished ones. True when
    /// something changed that the stack should process again at once.
    fn service_sockets(&mut self, now: Instant) -> bool {
        let mut again = false;
        let handles: Vec<SocketHandle> = self.roles.keys().copied().collect();
        let mut buf = vec![0u8; CHUNK];
        for handle in handles {
            let Some(role) = self.roles.remove(&handle) else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            let state = socket.state();
            let role = match role {
                Role::Opening {
                    reply,
                    target,
                    deadline,
                } => match state {
                    tcp::State::Established => {
                        let (conn, pipe) = pair(socket, &self.wake);
                        // Bytes may have come with the handshake: pump at once.
                        again = true;
                        match reply.send(Ok(conn)) {
                            Ok(()) => Some(Role::Open(pipe)),
                            Err(_) => {
                                socket.abort();
                                None
                            }
                        }
                    }
                    tcp::State::Closed => {
                        let _ = reply.send(Err(DialError::Refused(target)));
                        None
                    }
                    _ if now >= deadline => {
                        socket.abort();
                        let _ =
                            reply.send(Err(DialError::TimedOut(target, DIAL_TIMEOUT.as_secs())));
                        None
                    }
                    _ => Some(Role::Opening {
                        reply,
                        target,
                        deadline,
                    }),
                },
                Role::Service(service) => match state {
                    tcp::State::Established => {
                        let (conn, pipe) = pair(socket, &self.wake);
                        again = true;
                        match service.try_send(conn) {
                            Ok(()) => Some(Role::Open(pipe)),
                            Err(_) => {
                                socket.abort();
                                None
                            }
                        }
                    }
                    tcp::State::Listen | tcp::State::SynReceived => Some(Role::Service(service)),
                    _ => None,
                },
                Role::Gateway(stream) => match state {
                    tcp::State::Established => {
                        let (conn, pipe) = pair(socket, &self.wake);
                        again = true;
                        tokio::spawn(conn.splice(stream));
                        Some(Role::Open(pipe))
                    }
                    tcp::State::Listen | tcp::State::SynReceived => Some(Role::Gateway(stream)),
                    _ => None,
                },
                Role::Open(mut pipe) => {
                    again |= pump(socket, &mut pipe, &mut buf);
                    if !socket.is_open() {
                        pipe.to_app = None;
                        None
                    } else {
                        Some(Role::Open(pipe))
                    }
                }
            };
            match role {
                Some(role) => {
                    self.roles.insert(handle, role);
                }
                None => {
                    self.sockets.remove(handle);
                    self.tuples.retain(|_, h| *h != handle);
                    again = true;
                }
            }
        }
        again
    }
}

/// The two ends of a newly established connection's channels.
fn pair(socket: &tcp::Socket, wake: &Arc<Notify>) -> (Conn, Pipe) {
    {
        let (to_app, rx) = mpsc::channel(CHANNEL_DEPTH);
        let (tx, from_app) = mpsc::channel(CHANNEL_DEPTH);
        let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let conn = Conn {
            peer: socket.remote_endpoint().and_then(v4).unwrap_or(unspecified),
            local: socket.local_endpoint().and_then(v4).unwrap_or(unspecified),
            rx,
            tx,
            wake: wake.clone(),
        };
        let pipe = Pipe {
            to_app: Some(to_app),
            from_app,
            pending: None,
            app_done: false,
            held: None,
        };
        (conn, pipe)
    }
}

impl Netstack {
    /// Packets for the core, as if read from a TUN device.
    pub fn poll_outbound(&mut self) -> Option<Vec<u8>> {
        self.device.outbound.pop_front()
    }

    /// When the stack next needs [`Netstack::poll`] without other input.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let ts = self.now();
        let mut delay = self
            .iface
            .poll_delay(ts, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        if self
            .roles
            .values()
            .any(|r| matches!(r, Role::Opening { .. }))
        {
            delay = Some(delay.map_or(Duration::from_millis(200), |d| {
                d.min(Duration::from_millis(200))
            }));
        }
        if !self.udp_flows.is_empty() {
            delay = Some(delay.map_or(Duration::from_secs(5), |d| d.min(Duration::from_secs(5))));
        }
        delay
    }

    /// Connections open and dials in progress, for status.
    pub fn connections(&self) -> (usize, usize) {
        (self.roles.len(), self.udp_flows.len())
    }
}

/// Moves what can move between a socket and its task. True when bytes moved
/// (the stack may have segments or a window update to send).
fn pump(socket: &mut tcp::Socket, pipe: &mut Pipe, buf: &mut [u8]) -> bool {
    let mut sent = false;
    // Task → socket.
    loop {
        if pipe.pending.is_none() && !pipe.app_done {
            match pipe.from_app.try_recv() {
                Ok(chunk) => pipe.pending = Some((chunk, 0)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    pipe.app_done = true;
                }
            }
        }
        let Some((chunk, at)) = pipe.pending.as_mut() else {
            if pipe.app_done && socket.may_send() {
                socket.close();
                sent = true;
            }
            break;
        };
        if !socket.can_send() {
            break;
        }
        match socket.send_slice(&chunk[*at..]) {
            Ok(n) => {
                *at += n;
                sent |= n > 0;
                if *at == chunk.len() {
                    pipe.pending = None;
                } else {
                    break;
                }
            }
            Err(_) => {
                pipe.pending = None;
                pipe.app_done = true;
                break;
            }
        }
    }
    // Socket → task.
    if let Some(to_app) = &pipe.to_app {
        loop {
            let chunk = match pipe.held.take() {
                Some(c) => c,
                None => {
                    if !socket.can_recv() {
                        break;
                    }
                    match socket.recv_slice(buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            // The window opened: the stack may owe an update.
                            sent = true;
                            buf[..n].to_vec()
                        }
                    }
                }
            };
            match to_app.try_send(chunk) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(c)) => {
                    pipe.held = Some(c);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    socket.abort();
                    break;
                }
            }
        }
        // The peer closed its side and everything it sent was handed on.
        if !socket.may_recv() && pipe.held.is_none() && !socket.can_recv() {
            pipe.to_app = None;
        }
    }
    sent
}
