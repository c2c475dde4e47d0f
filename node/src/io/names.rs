//! The node's DNS shell: listeners for local programs (UDP and TCP), the
//! system's own resolvers for every name that is not the mesh's, the
//! gateway's resolvers for the zones it serves, and name lookups for the
//! proxies and `tern forward NAME:PORT`.
//!
//! Which name is whose is the core's decision ([`NodeCore::resolve`]); a
//! listener hands each query to the event loop through a [`NameService`]
//! and answers with what comes back.
//!
//! [`NodeCore::resolve`]: tern_node_core::node::NodeCore::resolve

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand_core::{OsRng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Semaphore};

use tern_node_core::dns::{self, RecordType, MAX_MESSAGE_LEN, PLAIN_UDP_LIMIT};

/// How long one resolver gets to answer over UDP (then the next is tried).
pub const RESOLVER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP clients served at once per listener.
const MAX_TCP_CLIENTS: usize = 64;

/// What the event loop made of a query.
#[derive(Debug)]
pub enum DnsOutcome {
    Answer {
        answer: Vec<u8>,
        source: String,
    },
    /// Not the mesh's: ask the system's resolvers.
    Upstream,
    /// Nothing to answer.
    Drop,
}

/// A query for the event loop, and where its outcome goes.
pub struct DnsCall {
    pub query: Vec<u8>,
    pub reply: oneshot::Sender<DnsOutcome>,
}

/// How the node's DNS parts reach the core, and the system's resolvers:
/// cheap to clone.
#[derive(Clone)]
pub struct NameService {
    calls: mpsc::Sender<DnsCall>,
    upstream: Arc<Resolvers>,
}

/// Where a name's answer came from, for `tern resolve`.
#[derive(Debug)]
pub struct Resolved {
    pub answer: Vec<u8>,
    pub source: String,
}

impl NameService {
    pub fn new(calls: mpsc::Sender<DnsCall>, upstream: Resolvers) -> NameService {
        NameService {
            calls,
            upstream: Arc::new(upstream),
        }
    }

    /// The system's resolvers this node sends other names to.
    pub fn upstream(&self) -> &Resolvers {
        &self.upstream
    }

    /// A query from a local program: the mesh's answer, or the system
    /// resolvers' (as they gave it: a truncated UDP answer stays truncated,
    /// for the program to ask again over TCP). `None`: no answer at all.
    pub async fn answer(&self, query: Vec<u8>, tcp: bool) -> Option<Resolved> {
        match self.ask_core(query.clone()).await {
            DnsOutcome::Answer { answer, source } => Some(Resolved { answer, source }),
            DnsOutcome::Drop => None,
            DnsOutcome::Upstream => match self.upstream.ask(&query, tcp).await {
                Some((answer, from)) => Some(Resolved {
                    answer,
                    source: format!("upstream {from}"),
                }),
                // Say so at once: silence would keep the program waiting
                // for its own timeout (seconds, for each name it tries).
                None => match dns::parse_query(&query) {
                    dns::Parsed::Query(q) => Some(Resolved {
                        answer: dns::servfail(&q),
                        source: if self.upstream.servers.is_empty() {
                            "this node (no other resolver is configured)".into()
                        } else {
                            "this node (no other resolver answered)".into()
                        },
                    }),
                    _ => None,
                },
            },
        }
    }

    async fn ask_core(&self, query: Vec<u8>) -> DnsOutcome {
        let (reply, rx) = oneshot::channel();
        if self.calls.send(DnsCall { query, reply }).await.is_err() {
            return DnsOutcome::Drop;
        }
        rx.await.unwrap_or(DnsOutcome::Drop)
    }

    /// `name`'s answer for `qtype` (the CLI's `tern resolve`): through the
    /// mesh, or the system's resolvers, whole (TCP after a truncated UDP
    /// answer).
    pub async fn resolve(&self, name: &str, qtype: RecordType) -> Result<Resolved, String> {
        let query = dns::build_query(name, qtype, OsRng.next_u32() as u16)?;
        match self.ask_core(query.clone()).await {
            DnsOutcome::Answer { answer, source } => Ok(Resolved { answer, source }),
            DnsOutcome::Drop => Err("the node is stopping".into()),
            DnsOutcome::Upstream => {
                if self.upstream.servers.is_empty() {
                    return Err(format!(
                        "{name} is not a mesh name (no gateway advertises a zone it lies under) and this node knows no other resolver"
                    ));
                }
                let (answer, from) = self.upstream.ask_whole(&query).await.ok_or_else(|| {
                    format!(
                        "{name} is not a mesh name, and no resolver of this system ({}) answered",
                        tern_shared::show::list(&self.upstream.servers)
                    )
                })?;
                Ok(Resolved {
                    answer,
                    source: format!("upstream {from}"),
                })
            }
        }
    }

    /// The first IPv4 address of a host for the proxies and forwards:
    /// mesh names and names under the mesh's zones through the mesh (as
    /// `socks5h://` users expect), others through this machine's resolver.
    pub async fn lookup_v4(&self, host: &str) -> Result<Ipv4Addr, String> {
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Ok(ip);
        }
        let query = dns::build_query(host, RecordType::A, OsRng.next_u32() as u16)?;
        match self.ask_core(query).await {
            DnsOutcome::Answer { answer, source } => dns::addresses(&answer)
                .map(|ips| ips[0])
                .map_err(|why| format!("{host}: {why} (answered by {source})")),
            DnsOutcome::Drop => Err(format!("{host}: the node is stopping")),
            DnsOutcome::Upstream => {
                let found = tokio::net::lookup_host((host, 0))
                    .await
                    .map_err(|e| format!("{host}: {e}"))?;
                found
                    .filter_map(|a| match a.ip() {
                        IpAddr::V4(ip) => Some(ip),
                        IpAddr::V6(_) => None,
                    })
                    .next()
                    .ok_or_else(|| format!("{host}: no IPv4 address"))
            }
        }
    }
}

/// Resolvers asked in order: the system's original ones (for names that
/// are not the mesh's), or a gateway's for a zone it serves.
#[derive(Debug, Clone, Default)]
pub struct Resolvers {
    pub servers: Vec<SocketAddr>,
}

impl Resolvers {
    /// Asks each in turn over UDP (or TCP), each for up to
    /// [`RESOLVER_TIMEOUT`]; the first answer to the query's ID wins.
    pub async fn ask(&self, query: &[u8], tcp: bool) -> Option<(Vec<u8>, SocketAddr)> {
        for server in &self.servers {
            let answer = if tcp {
                ask_tcp(*server, query).await
            } else {
                ask_udp(*server, query).await
            };
            if let Some(a) = answer {
                return Some((a, *server));
            }
        }
        None
    }

    /// The whole answer: over UDP, then TCP when the UDP answer was
    /// truncated.
    pub async fn ask_whole(&self, query: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
        for server in &self.servers {
            let Some(answer) = ask_udp(*server, query).await else {
                continue;
            };
            if is_truncated(&answer) {
                if let Some(whole) = ask_tcp(*server, query).await {
                    return Some((whole, *server));
                }
            }
            return Some((answer, *server));
        }
        None
    }
}

fn is_truncated(answer: &[u8]) -> bool {
    answer.len() >= 3 && answer[2] & 0x02 != 0
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(server).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let deadline = tokio::time::Instant::now() + RESOLVER_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        // Only the answer to this query's ID (a late answer to an earlier
        // one is not it).
        if n >= 12 && buf[..2] == query[..2] {
            return Some(buf[..n].to_vec());
        }
    }
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.ok()?;
        write_framed(&mut stream, query).await.ok()?;
        read_framed(&mut stream).await.ok()?
    };
    tokio::time::timeout(RESOLVER_TIMEOUT, exchange)
        .await
        .ok()?
}

/// A DNS message over TCP: a two-byte length, then the message.
async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&message[..usize::from(len)]);
    stream.write_all(&framed).await
}

/// `Ok(None)` when the other side closed between messages.
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

/// Who may ask a listener: on the node's overlay address, only programs
/// on this host (the source is the overlay address itself or loopback),
/// never a peer through the tunnel, which would ask with this node's
/// identity; on `[dns] listen` (loopback only) anyone who reaches it.
#[derive(Debug, Clone, Copy)]
pub struct LocalOnly(pub Option<Ipv4Addr>);

impl LocalOnly {
    fn allows(&self, from: IpAddr) -> bool {
        match self.0 {
            None => true,
            Some(own) => from.is_loopback() || from == IpAddr::V4(own),
        }
    }
}

/// Serves DNS over UDP on `socket`: each query is answered in its own task,
/// cut to what the asker can take over UDP.
pub async fn serve_udp(socket: UdpSocket, names: NameService, local: LocalOnly) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if !local.allows(from.ip()) {
            tracing::debug!(%from, "DNS query from outside this host on the overlay address; ignored");
            continue;
        }
        let query = buf[..n].to_vec();
        let (socket, names) = (socket.clone(), names.clone());
        tokio::spawn(async move {
            let limit = match dns::parse_query(&query) {
                dns::Parsed::Query(q) => q.udp_limit,
                _ => PLAIN_UDP_LIMIT,
            };
            if let Some(r) = names.answer(query, false).await {
                let _ = socket.send_to(&dns::fit_udp(&r.answer, limit), from).await;
            }
        });
    }
}

/// Serves DNS over TCP on `listener`: any number of queries per
/// connection, answered whole.
pub async fn serve_tcp(listener: TcpListener, names: NameService, local: LocalOnly) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let Ok((mut stream, from)) = listener.accept().await else {
            continue;
        };
        if !local.allows(from.ip()) {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let names = names.clone();
        tokio::spawn(async move {
            let _slot = slot;
            while let Ok(Ok(Some(query))) =
                tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await
            {
                let Some(r) = names.answer(query, true).await else {
                    break;
                };
                if write_framed(&mut stream, &r.answer).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Binds UDP and TCP on `addr` and serves both; the tasks stop when their
/// handles are aborted.
pub async fn listen(
    addr: SocketAddr,
    names: &NameService,
    local: LocalOnly,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let udp = UdpSocket::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("DNS: cannot listen on {addr} (UDP): {e}"))?;
    let tcp = super::proxy::bind(addr, "DNS (TCP)").await?;
    tracing::info!(%addr, "serving DNS (UDP and TCP)");
    Ok(vec![
        tokio::spawn(serve_udp(udp, names.clone(), local)),
        tokio::spawn(serve_tcp(tcp, names.clone(), local)),
    ])
}

/// As a gateway: asks the zone's resolvers for a peer's query (whole: TCP
/// after a truncated UDP answer); `None` when none answered.
pub async fn forward(resolvers: Resolvers, query: Vec<u8>) -> Option<Vec<u8>> {
    resolvers.ask_whole(&query).await.map(|(answer, _)| answer)
}
