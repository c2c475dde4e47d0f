//! Ways into the mesh for programs that know nothing of it, in both modes:
//! forwarded local ports (`[[forwards]]`, `tern forward`), a SOCKS5
//! listener (CONNECT and UDP ASSOCIATE) and an HTTP CONNECT proxy. Each
//! connection is dialled through a [`Dialer`]: the userspace stack, or the
//! kernel (whose routes send it into the TUN device).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::api::Dialing;
use super::names::NameService;
use super::userspace::{DialError, NetstackHandle};
use tern_node_core::http_connect;
use tern_node_core::socks::{self, Command, Reply, Target};
use tern_shared::dns::ForwardTarget;

/// A byte stream to a target in the mesh.
pub use tern_runner::ByteStream;

/// How this node opens connections into the mesh.
#[derive(Clone)]
pub enum Dialer {
    /// TUN mode: ordinary sockets bound to the TUN device (`device`), so
    /// the kernel can send them nowhere else: whatever the host's routes
    /// say, nothing dialled here leaves the mesh.
    Kernel { device: String },
    /// Userspace mode: the in-process stack.
    Userspace(NetstackHandle),
}

impl Dialer {
    pub async fn connect(&self, target: SocketAddrV4) -> Result<Box<dyn ByteStream>, DialError> {
        match self {
            Dialer::Userspace(stack) => Ok(Box::new(stack.connect(target).await?.into_stream())),
            Dialer::Kernel { device } => {
                let socket = tokio::net::TcpSocket::new_v4()
                    .and_then(|s| s.bind_device(Some(device.as_bytes())).map(|()| s))
                    .map_err(|e| {
                        DialError::NoRoute(format!(
                            "{target}: cannot bind a socket to the TUN device {device}: {e}"
                        ))
                    })?;
                let dial = tokio::time::timeout(
                    super::userspace::DIAL_TIMEOUT,
                    socket.connect(SocketAddr::V4(target)),
                )
                .await;
                match dial {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        // A peer that vanishes (and its tunnel with it)
                        // cannot say goodbye: keepalive notices in seconds,
                        // as the userspace stack does.
                        tern_runner::server::keepalive(&s);
                        Ok(Box::new(s))
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Err(DialError::Refused(target))
                    }
                    Ok(Err(e)) => Err(DialError::NoRoute(format!("{target}: {e}"))),
                    Err(_) => Err(DialError::TimedOut(
                        target,
                        super::userspace::DIAL_TIMEOUT.as_secs(),
                    )),
                }
            }
        }
    }
}

/// Binds a local listener, with an error that says what to do when the
/// port is taken.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "{what}: {addr} is already in use by another program; pick another local port"
            )
        } else {
            anyhow::anyhow!("{what}: cannot listen on {addr}: {e}")
        }
    })
}

/// Serves a forwarded port: every connection to `listener` is spliced to
/// `target` in the mesh (a name resolved anew for each connection, a
/// service's node chosen anew).
pub async fn serve_forward(listener: TcpListener, target: ForwardTarget, dialing: Dialing) {
    loop {
        let Ok((local, from)) = listener.accept().await else {
            continue;
        };
        let (dialing, target) = (dialing.clone(), target.clone());
        tokio::spawn(async move {
            let _ = local.set_nodelay(true);
            match dialing.connect(&target).await {
                Ok(remote) => splice(local, remote).await,
                Err(e) => tracing::warn!(%from, %target, "forward: {e}"),
            }
        });
    }
}

/// Copies both ways until both sides closed.
pub async fn splice(a: impl ByteStream, b: impl ByteStream) {
    let (mut a, mut b) = (a, b);
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// Where a SOCKS5 or HTTP target goes: IP literals as they are; names
/// through the mesh when they are the mesh's (node names, names under a
/// gateway's zone: remote resolution, as `socks5h://` users expect), else
/// through this machine's resolver (the first IPv4 address).
async fn resolve(target: &Target, names: &NameService) -> Result<SocketAddrV4, Reply> {
    match target {
        Target::Ip(SocketAddr::V4(a)) => Ok(*a),
        Target::Ip(SocketAddr::V6(_)) => Err(Reply::AddressTypeNotSupported),
        Target::Domain(name, port) => match names.lookup_v4(name).await {
            Ok(ip) => Ok(SocketAddrV4::new(ip, *port)),
            Err(why) => {
                tracing::debug!("cannot resolve {why}");
                Err(Reply::HostUnreachable)
            }
        },
    }
}

fn reply_for(e: &DialError) -> Reply {
    match e {
        DialError::Refused(_) => Reply::ConnectionRefused,
        DialError::TimedOut(..) => Reply::HostUnreachable,
        DialError::NoRoute(_) => Reply::NetworkUnreachable,
        DialError::Stopped | DialError::TooMany => Reply::GeneralFailure,
    }
}

/// Reads into `buf` until `parse` gives an answer; `None` if the client left.
async fn read_until<T, E>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<Option<(T, usize)>, E> {
    loop {
        if let Some(done) = parse(buf)? {
            return Ok(Some(done));
        }
        if buf.len() >= max {
            return Ok(None);
        }
        let mut chunk = [0u8; 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The SOCKS5 listener (no authentication: it listens on loopback only).
pub async fn serve_socks5(listener: TcpListener, dialer: Dialer, names: NameService) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let (dialer, names) = (dialer.clone(), names.clone());
        tokio::spawn(async move {
            if let Err(e) = socks5_session(stream, dialer, names).await {
                tracing::debug!(%from, "SOCKS5: {e:#}");
            }
        });
    }
}

async fn socks5_session(
    mut stream: TcpStream,
    dialer: Dialer,
    names: NameService,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let greeting = match read_until(&mut stream, &mut buf, 512, socks::parse_greeting).await {
        Ok(Some((g, used))) => {
            buf.drain(..used);
            g
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            // Not SOCKS5: nothing sensible to answer.
            anyhow::bail!("bad greeting: {e}");
        }
    };
    if !greeting.offers_no_auth() {
        stream
            .write_all(&socks::greeting_reply(socks::NO_ACCEPTABLE))
            .await?;
        anyhow::bail!("the client offers no method without authentication");
    }
    stream
        .write_all(&socks::greeting_reply(socks::NO_AUTH))
        .await?;
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let request = match read_until(&mut stream, &mut buf, 600, socks::parse_request).await {
        Ok(Some((r, used))) => {
            buf.drain(..used);
            r
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            stream
                .write_all(&socks::reply(e.reply(), unspecified))
                .await?;
            anyhow::bail!("bad request: {e}");
        }
    };
    match request.command {
        Command::Connect => {
            let target = match resolve(&request.target, &names).await {
                Ok(t) => t,
                Err(code) => {
                    stream.write_all(&socks::reply(code, unspecified)).await?;
                    anyhow::bail!("cannot resolve {}", request.target);
                }
            };
            match dialer.connect(target).await {
                Ok(mut remote) => {
                    stream
                        .write_all(&socks::reply(Reply::Succeeded, unspecified))
                        .await?;
                    if !buf.is_empty() {
                        remote.write_all(&buf).await?;
                    }
                    splice(stream, remote).await;
                    Ok(())
                }
                Err(e) => {
                    stream
                        .write_all(&socks::reply(reply_for(&e), unspecified))
                        .await?;
                    anyhow::bail!("{}: {e}", request.target)
                }
            }
        }
        Command::UdpAssociate => udp_associate(stream, dialer, names).await,
        Command::Bind => {
            stream
                .write_all(&socks::reply(Reply::CommandNotSupported, unspecified))
                .await?;
            anyhow::bail!("BIND is not supported")
        }
    }
}

/// UDP ASSOCIATE: a local UDP relay for as long as the control connection
/// stays open. Datagrams from the client go to their targets in the mesh;
/// answers come back with their source in the SOCKS header.
async fn udp_associate(
    mut control: TcpStream,
    dialer: Dialer,
    names: NameService,
) -> anyhow::Result<()> {
    let local_ip = control.local_addr()?.ip();
    let relay = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    let bound = relay.local_addr()?;
    control
        .write_all(&socks::reply(Reply::Succeeded, bound))
        .await?;
    let mut client: Option<SocketAddr> = None;
    let mut from_client = vec![0u8; 65_535];
    let mut closed = [0u8; 64];
    match dialer {
        Dialer::Userspace(stack) => {
            let mut binding = stack.udp_bind().await?;
            loop {
                tokio::select! {
                    got = relay.recv_from(&mut from_client) => {
                        let (n, from) = got?;
                        client.get_or_insert(from);
                        if client != Some(from) { continue; }
                        let Ok(d) = socks::parse_udp(&from_client[..n]) else { continue };
                        let Ok(to) = resolve(&d.target, &names).await else { continue };
                        binding.send(to, d.payload.to_vec()).await?;
                    }
                    back = binding.rx.recv() => {
                        let Some((source, payload)) = back else { break };
                        if let Some(c) = client {
                            let _ = relay.send_to(&socks::encode_udp(SocketAddr::V4(source), &payload), c).await;
                        }
                    }
                    n = control.read(&mut closed) => {
                        if matches!(n, Ok(0) | Err(_)) { break; }
                    }
                }
            }
        }
        Dialer::Kernel { device } => {
            let out = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
            out.bind_device(Some(device.as_bytes()))?;
            let mut from_mesh = vec![0u8; 65_535];
            loop {
                tokio::select! {
                    got = relay.recv_from(&mut from_client) => {
                        let (n, from) = got?;
                        client.get_or_insert(from);
                        if client != Some(from) { continue; }
                        let Ok(d) = socks::parse_udp(&from_client[..n]) else { continue };
                        let Ok(to) = resolve(&d.target, &names).await else { continue };
                        let _ = out.send_to(d.payload, SocketAddr::V4(to)).await;
                    }
                    got = out.recv_from(&mut from_mesh) => {
                        let (n, source) = got?;
                        if let (Some(c), IpAddr::V4(_)) = (client, source.ip()) {
                            let _ = relay.send_to(&socks::encode_udp(source, &from_mesh[..n]), c).await;
                        }
                    }
                    n = control.read(&mut closed) => {
                        if matches!(n, Ok(0) | Err(_)) { break; }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The HTTP CONNECT proxy (no authentication: loopback only). `api` asks
/// the node's event loop why a target could not be reached (the peer in
/// front of it answers from its firewall's rules), for the error's body.
pub async fn serve_http(
    listener: TcpListener,
    dialer: Dialer,
    api: tokio::sync::mpsc::Sender<super::api::ApiCall>,
    names: NameService,
) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        let (dialer, api, names) = (dialer.clone(), api.clone(), names.clone());
        tokio::spawn(async move {
            if let Err(e) = http_session(stream, dialer, api, names).await {
                tracing::debug!(%from, "HTTP CONNECT: {e:#}");
            }
        });
    }
}

/// Whether the peer in front of `target` denies this node by its firewall:
/// `Some(why)` ("gw-1's inbound rule-2/reject") when it says so in time.
async fn denied_by_policy(
    api: &tokio::sync::mpsc::Sender<super::api::ApiCall>,
    target: SocketAddrV4,
) -> Option<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    api.send((super::api::ApiRequest::Policy { target }, tx))
        .await
        .ok()?;
    let reply = tokio::time::timeout(std::time::Duration::from_secs(3), rx)
        .await
        .ok()?
        .ok()?;
    let reply = super::api::decode(reply).ok()?.ok()?;
    match super::api::policy_verdict(&reply)? {
        (false, why) => Some(why),
        (true, _) => None,
    }
}

async fn http_session(
    mut stream: TcpStream,
    dialer: Dialer,
    api: tokio::sync::mpsc::Sender<super::api::ApiCall>,
    names: NameService,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let request = match read_until(
        &mut stream,
        &mut buf,
        http_connect::MAX_HEAD + 1,
        http_connect::parse,
    )
    .await
    {
        Ok(Some((r, used))) => {
            buf.drain(..used);
            r
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            let (status, reason) = e.status();
            stream
                .write_all(&http_connect::response(status, reason))
                .await?;
            anyhow::bail!("{e}");
        }
    };
    let target = match resolve(&request.target, &names).await {
        Ok(t) => t,
        Err(_) => {
            stream
                .write_all(&http_connect::response(502, "Bad Gateway"))
                .await?;
            anyhow::bail!("cannot resolve {}", request.target);
        }
    };
    match dialer.connect(target).await {
        Ok(mut remote) => {
            stream.write_all(&http_connect::established()).await?;
            if !buf.is_empty() {
                remote.write_all(&buf).await?;
            }
            splice(stream, remote).await;
            Ok(())
        }
        Err(e) => {
            // Say why, in the body, as a SOCKS5 reply carries its reason: a
            // firewall's verdict names its rule.
            let answer = match denied_by_policy(&api, target).await {
                Some(why) => http_connect::response_with_body(
                    403,
                    "Forbidden",
                    &format!("{target} is denied by policy: {why}\n"),
                ),
                None => {
                    let (status, reason) = match e {
                        DialError::TimedOut(..) => (504, "Gateway Timeout"),
                        _ => (502, "Bad Gateway"),
                    };
                    http_connect::response_with_body(
                        status,
                        reason,
                        &format!("{target} through the mesh: {e}\n"),
                    )
                }
            };
            stream.write_all(&answer).await?;
            anyhow::bail!("{target}: {e}")
        }
    }
}

/// Starts the daemon's configured listeners; errors (a port taken) stop
/// the daemon at start with the reason.
pub async fn start(
    config: &tern_shared::config::NodeConfig,
    dialing: &Dialing,
    api: tokio::sync::mpsc::Sender<super::api::ApiCall>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let (dialer, names) = (&dialing.dialer, &dialing.names);
    let mut tasks = Vec::new();
    for (i, f) in config.forwards.iter().enumerate() {
        let listener = bind(f.listen, &format!("[[forwards]] {i}")).await?;
        tracing::info!(listen = %f.listen, target = %f.target, "forwarding");
        tasks.push(tokio::spawn(serve_forward(
            listener,
            f.target.clone(),
            dialing.clone(),
        )));
    }
    if let Some(addr) = config.proxy.socks5 {
        let listener = bind(addr, "[proxy] socks5").await?;
        tracing::info!(%addr, "SOCKS5 proxy listening");
        tasks.push(tokio::spawn(serve_socks5(
            listener,
            dialer.clone(),
            names.clone(),
        )));
    }
    if let Some(addr) = config.proxy.http {
        let listener = bind(addr, "[proxy] http").await?;
        tracing::info!(%addr, "HTTP CONNECT proxy listening");
        tasks.push(tokio::spawn(serve_http(
            listener,
            dialer.clone(),
            api,
            names.clone(),
        )));
    }
    Ok(tasks)
}
