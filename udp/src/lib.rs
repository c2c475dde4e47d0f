//! The one UDP socket of a Tern daemon, batched: `recvmmsg` with `UDP_GRO`
//! to receive many datagrams per system call, `sendmsg` with `UDP_SEGMENT`
//! (GSO) to send a run of equal-sized datagrams to one destination in one.
//! Per-packet system calls, not cryptography, are what a userspace tunnel
//! (or relay) spends its time on. Used by the node's data path and by the
//! lighthouse (whose relay forwards other nodes' traffic). [`api_socket`]
//! is the daemons' other socket, the local API's.

pub mod api_socket;
pub mod daemon;
pub mod gso;
pub mod local;
pub mod metrics;
pub mod stream;

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Largest datagram, and largest GRO batch one receive returns.
pub const MAX_DATAGRAM: usize = 65_535;

/// Most UDP payload one GSO send may carry (the IP length field's limit).
pub const MAX_GSO_BYTES: usize = 65_000;

/// Datagram buffers per `recvmmsg`.
pub const RX_BATCH: usize = 8;

/// Socket buffers big enough to absorb a burst at line rate while the event
/// loop is busy elsewhere. `SO_RCVBUF`/`SO_SNDBUF` are capped at
/// `net.core.rmem_max`/`wmem_max` (212992 bytes by default), so with
/// CAP_NET_ADMIN the `*BUFFORCE` variants go past the cap; without it, the
/// capped size is used.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a non-blocking UDP socket with [`SOCKET_BUFFER`]-sized buffers.
/// An IPv6 address (`[::]:4242`) gives a dual-stack socket, whatever the
/// host's `net.ipv6.bindv6only`: IPv4 peers reach it too, and their
/// addresses come out of [`RecvBatch::datagrams`] as plain IPv4.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    tracing::debug!(
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The UDP socket with batched receive (recvmmsg + GRO) and segmented send
/// (GSO).
pub struct Outer {
    socket: UdpSocket,
    state: UdpSocketState,
    /// TCP links standing for some addresses ([`stream`]).
    streams: std::sync::Arc<stream::Streams>,
}

impl Outer {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        tracing::debug!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP offloads"
        );
        Ok(Outer {
            socket,
            state,
            streams: Default::default(),
        })
    }

    /// The TCP links beside the socket.
    pub fn streams(&self) -> &std::sync::Arc<stream::Streams> {
        &self.streams
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Resolves when the socket, or a TCP link, has datagrams.
    pub async fn readable(&self) -> io::Result<()> {
        if self.streams.has_inbound() {
            return Ok(());
        }
        tokio::select! {
            r = self.socket.readable() => r,
            () = self.streams.arrived() => Ok(()),
        }
    }

    /// Most segments one send may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Sends `contents` to `dst`: one datagram, or with `segment` set, a run
    /// of datagrams of `segment` bytes (the last may be shorter). Waits while
    /// the socket buffer is full. When the kernel refuses the segmented send,
    /// the datagrams go one by one.
    /// A datagram for an address a TCP link stands for goes over the link.
    pub async fn send(&self, dst: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let segment = segment.filter(|s| *s < contents.len());
        if self.streams.is_active() {
            match self.streams.send(dst, contents, segment) {
                stream::Routed::Unrouted | stream::Routed::Udp => {}
                stream::Routed::Link => return,
            }
        }
        match self.send_once(dst, contents, segment).await {
            Ok(()) => {}
            Err(e) => match segment {
                Some(size) => {
                    tracing::debug!(error = %e, %dst, "segmented UDP send refused; sending one by one");
                    for chunk in contents.chunks(size) {
                        if let Err(e) = self.send_once(dst, chunk, None).await {
                            tracing::debug!(error = %e, %dst, "UDP send failed");
                        }
                    }
                }
                None => tracing::debug!(error = %e, %dst, "UDP send failed"),
            },
        }
    }

    async fn send_once(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        self.socket
            .async_io(Interest::WRITABLE, || {
                self.state
                    .try_send(UdpSockRef::from(&self.socket), &transmit)
            })
            .await
    }

    /// One `recvmmsg` into `bufs`, if the runtime saw the socket readable;
    /// `WouldBlock` when there is nothing.
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.socket.try_io(Interest::READABLE, || {
            self.state.recv(UdpSockRef::from(&self.socket), bufs, meta)
        })
    }
}

/// Buffers for batched receives, allocated once.
pub struct RecvBatch {
    datagrams: [Vec<u8>; RX_BATCH],
    meta: [RecvMeta; RX_BATCH],
    count: usize,
    /// Take from the TCP links first this time (turns alternate, so
    /// neither the socket nor the links starve the other).
    links_first: bool,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            datagrams: std::array::from_fn(|_| vec![0; MAX_DATAGRAM]),
            meta: [RecvMeta::default(); RX_BATCH],
            count: 0,
            links_first: false,
        }
    }
}

impl RecvBatch {
    /// Receives what the socket has (one `recvmmsg`); returns how many
    /// buffers were filled, each maybe holding several datagrams (GRO).
    /// Datagrams from TCP links come in turn with the socket's.
    pub fn recv(&mut self, outer: &Outer) -> io::Result<usize> {
        self.count = 0;
        self.links_first = !self.links_first;
        if self.links_first && outer.streams.has_inbound() {
            return Ok(self.recv_links(outer));
        }
        let mut slices = self.datagrams.each_mut().map(|b| IoSliceMut::new(b));
        let n = match outer.try_recv(&mut slices, &mut self.meta) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && outer.streams.has_inbound() => {
                return Ok(self.recv_links(outer))
            }
            r => r?,
        };
        self.count = n;
        if outer.streams.is_active() {
            outer
                .streams
                .saw_udp(self.meta[..n].iter().map(|m| canonical(m.addr)));
        }
        Ok(n)
    }

    fn recv_links(&mut self, outer: &Outer) -> usize {
        let mut i = 0;
        let (bufs, meta) = (&mut self.datagrams, &mut self.meta);
        let n = outer.streams.take_inbound(RX_BATCH, |from, datagram| {
            let len = datagram.len().min(bufs[i].len());
            bufs[i][..len].copy_from_slice(&datagram[..len]);
            meta[i] = RecvMeta::default();
            meta[i].addr = from;
            meta[i].len = len;
            meta[i].stride = len;
            i += 1;
        });
        self.count = n;
        n
    }

    /// The datagrams of the last receive, with their sources, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta
            .iter()
            .zip(self.datagrams.iter())
            .take(self.count)
            .flat_map(|(meta, buf)| {
                let data = &buf[..meta.len.min(buf.len())];
                let stride = if meta.stride == 0 {
                    data.len().max(1)
                } else {
                    meta.stride
                };
                // An IPv4 peer on a dual-stack socket arrives as
                // ::ffff:a.b.c.d; everything above compares plain IPv4.
                let from = canonical(meta.addr);
                data.chunks(stride).map(move |d| (from, d))
            })
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) turned into
/// the IPv4 address it is, so one peer has one address whichever socket
/// family it came through.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Gathers datagrams into runs (same destination, same size, the last one
/// maybe shorter) and sends each run with one GSO `sendmsg`. For payloads
/// that arrive one by one (the lighthouse's relay); the node's data path
/// seals straight into its own run buffer instead.
pub struct SendBatch {
    buf: Vec<u8>,
    run: Option<gso::GsoRun>,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            buf: Vec::with_capacity(MAX_GSO_BYTES + MAX_DATAGRAM),
            run: None,
        }
    }
}

impl SendBatch {
    /// Adds one datagram, sending the current run first if this one cannot
    /// join it.
    pub async fn push(&mut self, outer: &Outer, dst: SocketAddr, payload: &[u8]) {
        match self.run.as_mut() {
            Some(run) if run.joins(dst, payload.len(), outer.max_segments()) => {
                run.add(payload.len())
            }
            _ => {
                self.flush(outer).await;
                self.run = Some(gso::GsoRun::start(dst, payload.len()));
            }
        }
        self.buf.extend_from_slice(payload);
    }

    /// Sends the run gathered so far.
    pub async fn flush(&mut self, outer: &Outer) {
        if let Some(run) = self.run.take() {
            if !self.buf.is_empty() {
                outer.send(run.dst, &self.buf, run.segment_size()).await;
            }
        }
        self.buf.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The first datagram `outer` receives within 5 s, with its source.
    async fn recv_one(outer: &Outer) -> Option<(SocketAddr, Vec<u8>)> {
        let mut recv = RecvBatch::default();
        for _ in 0..50 {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(100), outer.readable()).await;
            if recv.recv(outer).is_ok() {
                return recv.datagrams().map(|(f, d)| (f, d.to_vec())).next();
            }
        }
        None
    }

    /// A dual-stack socket hears an IPv4 peer as plain IPv4 and answers it
    /// at that address.
    #[tokio::test]
    async fn a_dual_stack_socket_speaks_plain_ipv4_to_ipv4_peers() {
        let Ok(socket) = bind("[::]:0".parse().unwrap()) else {
            eprintln!("no IPv6 on this host: skipped");
            return;
        };
        let dual = Outer::new(socket).unwrap();
        let port = dual.local_addr().unwrap().port();
        let v4 = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let v4_addr = v4.local_addr().unwrap();
        v4.send(format!("127.0.0.1:{port}").parse().unwrap(), b"hi", None)
            .await;
        let (from, data) = recv_one(&dual).await.expect("the IPv4 datagram arrives");
        assert_eq!((from, data.as_slice()), (v4_addr, &b"hi"[..]));
        assert!(from.is_ipv4(), "{from}");
        dual.send(from, b"back", None).await;
        let (from, data) = recv_one(&v4).await.expect("the answer arrives");
        assert_eq!(data, b"back");
        assert_eq!(from.port(), port);
        assert_eq!(
            canonical("[::ffff:198.18.0.1]:4242".parse().unwrap()),
            "198.18.0.1:4242".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[2001:db8::1]:4242".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    /// Runs of different sizes and destinations arrive whole, in order,
    /// datagram by datagram, on a real loopback socket.
    #[tokio::test]
    async fn batched_sends_arrive_as_the_datagrams_they_were() {
        let rx = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let tx = Outer::new(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let dst = rx.local_addr().unwrap();
        let mut sent = Vec::new();
        let mut batch = SendBatch::default();
        for i in 0..200u32 {
            let len = if i % 50 == 49 { 300 } else { 1200 };
            let payload: Vec<u8> = (0..len).map(|j| (i as usize * 7 + j) as u8).collect();
            batch.push(&tx, dst, &payload).await;
            sent.push(payload);
        }
        batch.flush(&tx).await;
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut recv = RecvBatch::default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < sent.len() && std::time::Instant::now() < deadline {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(100), rx.readable()).await;
            match recv.recv(&rx) {
                Ok(_) => got.extend(recv.datagrams().map(|(from, d)| {
                    assert_eq!(from, tx.local_addr().unwrap());
                    d.to_vec()
                })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "same datagrams, same order");
    }
}
