//! TCP links beside the UDP socket, for networks that drop UDP: each link
//! (TLS over TCP, maybe through an HTTP proxy) carries framed datagrams
//! (`tern_shared::transport`) and stands for one underlay address. The
//! [`Outer`](crate::Outer) sends a datagram for that address over the link
//! and hands what the link receives out with the UDP socket's datagrams,
//! so neither core knows a link from a socket.
//!
//! The node attaches a link under its lighthouse's UDP endpoint; the
//! lighthouse, under a `stream_endpoint` of its own making per connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tern_shared::transport::{
    connect_request, frame_header, parse_connect_response, ProxyUrl, StreamTarget,
    MAX_CONNECT_RESPONSE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;

/// Datagrams waiting for a link's writer (about 1.5 MB of full-size ones,
/// whatever the far side stops reading); beyond, they are dropped, as a
/// full UDP socket buffer would drop them.
const LINK_QUEUE: usize = 1024;
/// The first byte of a WireGuard transport data message.
const WIREGUARD_DATA: u8 = 4;
/// Datagrams received on links waiting for the event loop; beyond, dropped.
const INBOUND_QUEUE: usize = 8192;
/// A link on which nothing arrives this long is closed (both daemons send
/// every few seconds: registrations and their answers).
pub const LINK_IDLE: Duration = Duration::from_secs(60);
/// How long dialling (proxy, TCP, TLS) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The links, shared by the [`Outer`](crate::Outer) and the links' tasks.
#[derive(Default)]
pub struct Streams {
    /// Any link attached (the UDP paths skip the table otherwise).
    active: AtomicBool,
    /// Datagrams waiting in `inbound`.
    pending: AtomicUsize,
    table: Mutex<Table>,
    arrived: Notify,
    next_id: AtomicU64,
    /// Datagrams dropped because a queue was full.
    dropped: AtomicU64,
}

#[derive(Default)]
struct Table {
    routes: HashMap<SocketAddr, Route>,
    /// Addresses only ever reached over a link: with none attached, what
    /// is sent to them is dropped, never sent over UDP.
    held: std::collections::HashSet<SocketAddr>,
    inbound: VecDeque<(SocketAddr, Vec<u8>)>,
}

impl Table {
    fn any(&self) -> bool {
        !self.routes.is_empty() || !self.held.is_empty()
    }
}

struct Route {
    id: u64,
    frames: mpsc::Sender<Vec<u8>>,
    reader: AbortHandle,
    /// When a UDP datagram last came from this address (UDP works again).
    heard_udp: Option<Instant>,
    /// Send the next WireGuard data message over UDP instead.
    probe: bool,
}

/// What [`Streams::send`] did with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// No link for the address: UDP.
    Unrouted,
    /// Queued on the link.
    Link,
    /// To be sent over UDP instead (a probe: does UDP work again?).
    Udp,
}

impl Streams {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn has_inbound(&self) -> bool {
        self.pending.load(Ordering::Relaxed) > 0
    }

    /// Resolves when a link delivered a datagram (a permit is kept when no
    /// one waits).
    pub(crate) async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Whether a link carries datagrams for `addr`.
    pub fn is_attached(&self, addr: SocketAddr) -> bool {
        self.is_active() && self.table().routes.contains_key(&addr)
    }

    /// How many links are attached.
    pub fn links(&self) -> usize {
        self.table().routes.len()
    }

    /// Datagrams dropped on full queues so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// When a UDP datagram last came from `addr` while a link stood for it.
    pub fn heard_udp(&self, addr: SocketAddr) -> Option<Instant> {
        self.table().routes.get(&addr).and_then(|r| r.heard_udp)
    }

    /// Sends the next WireGuard data message for `addr` over UDP instead of
    /// the link, to learn whether UDP works again (the answer comes back
    /// over UDP, noted by [`heard_udp`](Self::heard_udp)).
    pub fn probe_udp(&self, addr: SocketAddr) {
        if let Some(r) = self.table().routes.get_mut(&addr) {
            r.probe = true;
        }
    }

    /// Sends nothing to `addr` over UDP, ever: only over a link, and
    /// while none is attached, nowhere (`transport = "tcp"`).
    pub fn hold(&self, addr: SocketAddr) {
        let mut table = self.table();
        table.held.insert(addr);
        self.active.store(true, Ordering::Relaxed);
    }

    /// Closes the link for `addr`, if any.
    pub fn detach(&self, addr: SocketAddr) {
        let mut table = self.table();
        if let Some(route) = table.routes.remove(&addr) {
            route.reader.abort();
        }
        self.active.store(table.any(), Ordering::Relaxed);
    }

    fn detach_if(&self, addr: SocketAddr, id: u64) {
        let mut table = self.table();
        if table.routes.get(&addr).is_some_and(|r| r.id == id) {
            table.routes.remove(&addr);
        }
        self.active.store(table.any(), Ordering::Relaxed);
    }

    /// Queues `contents` (one datagram, or a run of `segment`-sized ones)
    /// on the link for `dst`, if there is one.
    pub(crate) fn send(&self, dst: SocketAddr, contents: &[u8], segment: Option<usize>) -> Routed {
        let mut table = self.table();
        let held = table.held.contains(&dst);
        let Some(route) = table.routes.get_mut(&dst) else {
            if held {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Routed::Link;
            }
            return Routed::Unrouted;
        };
        // The probe is a WireGuard data message to the far side itself (a
        // registration, say): it answers it, over UDP if that works. A
        // relayed message would only be refused there.
        if route.probe && !held && segment.is_none() && contents.first() == Some(&WIREGUARD_DATA) {
            route.probe = false;
            return Routed::Udp;
        }
        let size = segment.unwrap_or(contents.len()).max(1);
        for datagram in contents.chunks(size) {
            if route.frames.try_send(datagram.to_vec()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Routed::Link
    }

    /// Notes that UDP datagrams came from `sources` (UDP works for any that
    /// a link stands for).
    pub(crate) fn saw_udp(&self, sources: impl Iterator<Item = SocketAddr>) {
        let mut table = self.table();
        let now = Instant::now();
        for from in sources {
            if let Some(r) = table.routes.get_mut(&from) {
                r.heard_udp = Some(now);
            }
        }
    }

    /// Moves up to `max` received datagrams out, in arrival order.
    pub(crate) fn take_inbound(
        &self,
        max: usize,
        mut each: impl FnMut(SocketAddr, &[u8]),
    ) -> usize {
        let mut table = self.table();
        let n = table.inbound.len().min(max);
        for (from, datagram) in table.inbound.drain(..n) {
            each(from, &datagram);
        }
        self.pending.store(table.inbound.len(), Ordering::Relaxed);
        n
    }

    fn deliver(&self, from: SocketAddr, datagram: Vec<u8>) {
        let mut table = self.table();
        if table.inbound.len() >= INBOUND_QUEUE {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        table.inbound.push_back((from, datagram));
        self.pending.store(table.inbound.len(), Ordering::Relaxed);
        drop(table);
        self.arrived.notify_one();
    }

    /// Makes `stream` the link for `addr` (closing any link it had): what
    /// arrives on it comes out of the [`Outer`](crate::Outer) as from
    /// `addr`, what is sent to `addr` goes into it. The returned task ends
    /// when the link does (closed by the far side, idle for
    /// [`LINK_IDLE`], failed, or detached).
    pub fn attach<S>(self: &Arc<Self>, addr: SocketAddr, stream: S) -> tokio::task::JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (read, write) = tokio::io::split(stream);
        let (frames, rx) = mpsc::channel(LINK_QUEUE);
        let writer = tokio::spawn(write_frames(write, rx));
        let streams = self.clone();
        let reader = tokio::spawn(async move {
            let why = read_frames(read, addr, &streams).await;
            tracing::debug!(%addr, %why, "TCP link closed");
            writer.abort();
            streams.detach_if(addr, id);
        });
        let mut table = self.table();
        let old = table.routes.insert(
            addr,
            Route {
                id,
                frames,
                reader: reader.abort_handle(),
                heard_udp: None,
                probe: false,
            },
        );
        if let Some(old) = old {
            old.reader.abort();
        }
        self.active.store(true, Ordering::Relaxed);
        reader
    }
}

/// Reads frames until the link ends; why it ended.
async fn read_frames<R: AsyncRead + Unpin>(
    mut read: R,
    addr: SocketAddr,
    streams: &Streams,
) -> String {
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let len = match tokio::time::timeout(LINK_IDLE, read.read_u16()).await {
            Err(_) => return format!("nothing arrived for {LINK_IDLE:?}"),
            Ok(Err(e)) => return e.to_string(),
            Ok(Ok(len)) => usize::from(len),
        };
        let datagram = &mut buf[..len];
        match tokio::time::timeout(LINK_IDLE, read.read_exact(datagram)).await {
            Err(_) => return "a frame stopped arriving halfway".into(),
            Ok(Err(e)) => return e.to_string(),
            Ok(Ok(_)) => {}
        }
        // An empty frame keeps the link alive and carries nothing.
        if len > 0 {
            streams.deliver(addr, datagram.to_vec());
        }
    }
}

/// Writes queued datagrams, flushing whenever the queue runs dry.
async fn write_frames<W: AsyncWrite + Unpin>(write: W, mut frames: mpsc::Receiver<Vec<u8>>) {
    let mut out = BufWriter::with_capacity(64 * 1024, write);
    while let Some(mut datagram) = frames.recv().await {
        loop {
            let Some(header) = frame_header(datagram.len()) else {
                tracing::debug!(
                    len = datagram.len(),
                    "datagram too long for a TCP link; dropped"
                );
                break;
            };
            if out.write_all(&header).await.is_err() || out.write_all(&datagram).await.is_err() {
                return;
            }
            match frames.try_recv() {
                Ok(next) => datagram = next,
                Err(_) => break,
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.shutdown().await;
}

/// A TLS client that accepts whatever certificate the lighthouse's TCP
/// listener shows: the lighthouse is authenticated inside the link by its
/// Tern certificate and WireGuard key (Noise IK), as over UDP. TLS is there
/// so that middleboxes passing only TLS on 443 pass the link; the
/// handshake's signatures are still checked.
pub fn client_tls() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(InsideAuthenticated(provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct InsideAuthenticated(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for InsideAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS server of a lighthouse's TCP listener, from a PEM certificate
/// chain and key.
pub fn server_tls(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Dials `target`: through `proxy` (HTTP CONNECT) when given, then TLS.
pub async fn dial(
    target: &StreamTarget,
    proxy: Option<&ProxyUrl>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let dialled = async {
        let tcp = match proxy {
            Some(proxy) => through_proxy(target, proxy).await?,
            None => TcpStream::connect((target.host.as_str(), target.port)).await?,
        };
        tcp.set_nodelay(true)?;
        let name = match target.ip() {
            Some(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            None => rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        };
        let tls = client_tls().map_err(io::Error::other)?;
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
    };
    match tokio::time::timeout(DIAL_TIMEOUT, dialled).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no TLS link within {DIAL_TIMEOUT:?}"),
        )),
    }
}

/// A TCP connection to `target` tunnelled through `proxy`.
async fn through_proxy(target: &StreamTarget, proxy: &ProxyUrl) -> io::Result<TcpStream> {
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("proxy {proxy}: {e}")))?;
    tcp.write_all(&connect_request(target, proxy)).await?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        // One byte at a time past the head would be slow; the proxy sends
        // nothing after its answer until the TLS handshake starts, so what
        // arrives is the head alone.
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("proxy {proxy} closed the connection before answering CONNECT"),
            ));
        }
        head.extend_from_slice(&buf[..n]);
        let answer = parse_connect_response(&head).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("proxy {proxy}: {e}"))
        })?;
        if let Some(answer) = answer {
            if !answer.is_open() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("proxy {proxy}: {}", answer.refusal()),
                ));
            }
            if answer.head_len != head.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("proxy {proxy} sent data before the tunnel's first byte"),
                ));
            }
            return Ok(tcp);
        }
        if head.len() >= MAX_CONNECT_RESPONSE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("proxy {proxy}: answer too long"),
            ));
        }
    }
}

/// The proxy the environment names for `target`: `HTTPS_PROXY` (or
/// `https_proxy`, or `ALL_PROXY`/`all_proxy`) unless `NO_PROXY`/`no_proxy`
/// names the host. An unusable value is an error naming the variable.
pub fn proxy_from_env(target: &StreamTarget) -> Result<Option<ProxyUrl>, String> {
    fn var(names: &[&'static str]) -> Option<(&'static str, String)> {
        names.iter().find_map(|n| {
            std::env::var(n)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| (*n, v))
        })
    }
    let Some((name, url)) = var(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]) else {
        return Ok(None);
    };
    if let Some((_, no_proxy)) = var(&["NO_PROXY", "no_proxy"]) {
        if tern_shared::transport::no_proxy_matches(&no_proxy, &target.host) {
            return Ok(None);
        }
    }
    ProxyUrl::parse(&url)
        .map(Some)
        .map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{bind, Outer, RecvBatch};

    async fn recv_all(outer: &Outer, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut batch = RecvBatch::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), outer.readable()).await;
            if batch.recv(outer).is_ok() {
                got.extend(batch.datagrams().map(|(f, d)| (f, d.to_vec())));
            }
        }
        got
    }

    /// Two daemons joined by a link: datagrams (single and in GSO runs)
    /// arrive whole, in order, as from the address the link stands for;
    /// UDP to other addresses is untouched.
    #[tokio::test]
    async fn a_link_carries_datagrams_as_from_its_address() {
        let node = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let lighthouse = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let lh_udp: SocketAddr = "198.18.0.1:4242".parse().unwrap();
        let node_link = tern_shared::transport::stream_endpoint(7);
        let (a, b) = tokio::io::duplex(4096);
        node.streams().attach(lh_udp, a);
        lighthouse.streams().attach(node_link, b);
        assert!(node.streams().is_attached(lh_udp));

        node.send(lh_udp, b"hello", None).await;
        let run: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        node.send(lh_udp, &run, Some(1000)).await;
        let got = recv_all(&lighthouse, 4).await;
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|(from, _)| *from == node_link));
        assert_eq!(got[0].1, b"hello");
        assert_eq!(got[1..].concat_payloads(), run);

        lighthouse.send(node_link, b"ack", None).await;
        assert_eq!(recv_all(&node, 1).await, vec![(lh_udp, b"ack".to_vec())]);

        // Plain UDP still works beside the link.
        let other = node.local_addr().unwrap();
        lighthouse.send(other, b"udp", None).await;
        let got = recv_all(&node, 1).await;
        assert_eq!(got[0].1, b"udp");

        node.streams().detach(lh_udp);
        assert!(!node.streams().is_attached(lh_udp));
        // The far side sees the link end and forgets it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while lighthouse.streams().is_attached(node_link) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!lighthouse.streams().is_attached(node_link));
    }

    /// A probe goes over UDP as well; a datagram arriving over UDP from the
    /// link's address is noted (UDP works again).
    #[tokio::test]
    async fn probes_and_udp_heard() {
        let node = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let lighthouse = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let lh_udp = lighthouse.local_addr().unwrap();
        let (a, _b) = tokio::io::duplex(4096);
        node.streams().attach(lh_udp, a);
        node.send(lh_udp, b"\x04over the link", None).await;
        node.streams().probe_udp(lh_udp);
        // A relay envelope is no probe; the next data message is.
        node.send(lh_udp, b"\x80relayed", None).await;
        node.send(lh_udp, b"\x04probe", None).await;
        node.send(lh_udp, b"\x04link again", None).await;
        let got = recv_all(&lighthouse, 1).await;
        assert_eq!(
            got,
            vec![(node.local_addr().unwrap(), b"\x04probe".to_vec())]
        );
        assert_eq!(node.streams().heard_udp(lh_udp), None);
        lighthouse
            .send(node.local_addr().unwrap(), b"udp works", None)
            .await;
        assert_eq!(recv_all(&node, 1).await[0].1, b"udp works");
        assert!(node.streams().heard_udp(lh_udp).is_some());
    }

    /// A held address gets nothing over UDP, before a link and after one.
    #[tokio::test]
    async fn a_held_address_never_gets_udp() {
        let node = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let lighthouse = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let lh_udp = lighthouse.local_addr().unwrap();
        node.streams().hold(lh_udp);
        node.send(lh_udp, b"\x04dropped", None).await;
        let (a, b) = tokio::io::duplex(4096);
        node.streams().attach(lh_udp, a);
        node.streams().probe_udp(lh_udp);
        node.send(lh_udp, b"\x04linked", None).await;
        let mut b = b;
        let mut frame = [0u8; 9];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut frame)
            .await
            .unwrap();
        assert_eq!(&frame, b"\x00\x07\x04linked");
        let mut batch = RecvBatch::default();
        let _ = tokio::time::timeout(Duration::from_millis(300), lighthouse.readable()).await;
        assert!(batch.recv(&lighthouse).is_err(), "nothing came over UDP");
        assert_eq!(node.streams().dropped(), 1);
    }

    trait Concat {
        fn concat_payloads(&self) -> Vec<u8>;
    }
    impl Concat for [(SocketAddr, Vec<u8>)] {
        fn concat_payloads(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, d)| d.clone()).collect()
        }
    }
}
