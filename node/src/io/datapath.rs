//! The batched data path between the TUN device and the UDP socket.
//!
//! Per-packet system calls, not cryptography, are what a userspace tunnel
//! spends its time on, so each wake-up moves as much as the kernel has:
//!
//! - **TUN → UDP**: with offloads on, one TUN read returns up to 64 KiB of
//!   one TCP or UDP flow (`IFF_VNET_HDR`, TSO/USO), which `tun-rs` splits into
//!   MTU-sized packets. Each packet is encrypted straight into one contiguous
//!   buffer; runs of equal-sized ciphertexts to the same endpoint leave in a
//!   single `sendmsg` with `UDP_SEGMENT` (GSO).
//! - **UDP → TUN**: `recvmmsg` with `UDP_GRO` returns many datagrams per call,
//!   each decrypted into its own reusable buffer; `tun-rs` then coalesces
//!   consecutive segments of a flow back into large packets (GRO), so the
//!   kernel gets one write per burst instead of one per packet.
//!
//! All buffers are allocated once. The core ([`NodeCore`]) still sees one
//! packet at a time and decides everything (routes, firewall, peers).

use std::io;
use std::time::Instant;

use tern_udp::gso::GsoRun;
use tern_udp::{RecvBatch, MAX_GSO_BYTES};
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

pub use tern_udp::Outer;

use tern_mesh::OVERHEAD;
use tern_node_core::node::NodeCore;
use tern_udp::daemon::READS_PER_WAKEUP;

/// Room in front of every packet written to the TUN device for the virtio
/// header `tun-rs` fills in when offloads are on.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// Largest TUN read or coalesced TUN write.
const MAX_PACKET: usize = 65_535;

/// Packets one TUN read may split into: 64 KiB at the smallest MSS.
const TUN_SEGMENTS: usize = tun_rs::IDEAL_BATCH_SIZE;

/// Decrypted packets gathered before one coalescing write to the TUN device.
const TUN_WRITE_BATCH: usize = 64;

/// Extra bytes WireGuard's handshake needs in an output buffer beyond the
/// packet itself (a handshake initiation is 148 bytes).
const HANDSHAKE_ROOM: usize = 256;

/// The buffers of both directions, allocated once per daemon.
pub struct DataPath {
    // TUN → UDP
    tun_read: Vec<u8>,
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    sealed: Vec<u8>,
    // UDP → TUN
    received: RecvBatch,
    opened: Vec<Vec<u8>>,
    gro: GROTable,
}

/// One run of ciphertexts in `DataPath::sealed`: they start at `start` and
/// follow each other; `gso` keeps the run's rule.
struct Run {
    start: usize,
    gso: GsoRun,
}

impl Run {
    fn end(&self) -> usize {
        self.start + self.gso.bytes
    }
}

impl DataPath {
    pub fn new(mtu: u16) -> Self {
        let segment_len = mtu as usize + 64;
        DataPath {
            tun_read: vec![0; TUN_OFFSET + MAX_PACKET],
            segments: vec![vec![0; segment_len]; TUN_SEGMENTS],
            sizes: vec![0; TUN_SEGMENTS],
            sealed: vec![0; MAX_GSO_BYTES + 2 * (segment_len + OVERHEAD + HANDSHAKE_ROOM)],
            received: RecvBatch::default(),
            // Capacity for a coalesced 64 KiB write; pages are touched only
            // as far as a burst fills them.
            opened: (0..TUN_WRITE_BATCH)
                .map(|_| Vec::with_capacity(TUN_OFFSET + MAX_PACKET))
                .collect(),
            gro: GROTable::default(),
        }
    }

    /// Reads what the TUN device has (bounded), encrypts and sends it.
    /// Returns false when the device is gone.
    pub async fn tun_to_udp(
        &mut self,
        core: &mut NodeCore,
        tun: &AsyncDevice,
        outer: &Outer,
    ) -> bool {
        let max_segments = outer.max_segments();
        let mut run: Option<Run> = None;
        for _ in 0..READS_PER_WAKEUP {
            let count = match tun.try_recv_multiple(
                &mut self.tun_read,
                &mut self.segments,
                &mut self.sizes,
                0,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    tracing::error!(error = %e, "TUN device gone");
                    return false;
                }
                Err(e) => {
                    // A packet tun-rs could not split (a malformed offload
                    // header): drop it, keep going.
                    tracing::debug!(error = %e, "TUN read dropped");
                    continue;
                }
            };
            let now = Instant::now();
            for i in 0..count {
                let len = self.sizes[i];
                let Some(packet) = self.segments[i].get(..len) else {
                    continue;
                };
                let needed = len + OVERHEAD + HANDSHAKE_ROOM;
                let mut at = run.as_ref().map_or(0, Run::end);
                if self.sealed.len() - at < needed {
                    if let Some(r) = run.take() {
                        send_run(outer, &self.sealed, &r).await;
                    }
                    at = 0;
                }
                // The core writes the ciphertext at the start of the buffer
                // it is lent (the mesh's contract), right after the run.
                let Some((dst, ciphertext)) =
                    core.handle_tun_packet(packet, &mut self.sealed[at..], now)
                else {
                    continue;
                };
                let n = ciphertext.len();
                match run.as_mut() {
                    Some(r) if r.gso.joins(dst, n, max_segments) => r.gso.add(n),
                    _ => {
                        if let Some(r) = run.take() {
                            send_run(outer, &self.sealed, &r).await;
                        }
                        run = Some(Run {
                            start: at,
                            gso: GsoRun::start(dst, n),
                        });
                    }
                }
            }
        }
        if let Some(r) = run.take() {
            send_run(outer, &self.sealed, &r).await;
        }
        true
    }

    /// Receives what the UDP socket has (bounded), decrypts it and writes the
    /// packets the core lets through to the TUN device.
    pub async fn udp_to_tun(&mut self, core: &mut NodeCore, tun: &AsyncDevice, outer: &Outer) {
        let mut pending = 0;
        for _ in 0..READS_PER_WAKEUP {
            match self.received.recv(outer) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    break;
                }
            }
            let now = Instant::now();
            for (from, datagram) in self.received.datagrams() {
                let slot = &mut self.opened[pending];
                // Only the bytes past the previous packet get zeroed.
                slot.resize(TUN_OFFSET + datagram.len().max(HANDSHAKE_ROOM), 0);
                // The core writes the packet at the start of the buffer it
                // is lent (the mesh's contract): right after the header room.
                let Some(packet) =
                    core.handle_datagram(from, datagram, &mut slot[TUN_OFFSET..], now)
                else {
                    continue;
                };
                let n = packet.len();
                slot.truncate(TUN_OFFSET + n);
                pending += 1;
                if pending == self.opened.len() {
                    write_tun(tun, &mut self.gro, &mut self.opened[..pending]).await;
                    pending = 0;
                }
            }
        }
        write_tun(tun, &mut self.gro, &mut self.opened[..pending]).await;
    }

    /// Writes one packet built outside the data path (a firewall reject, a
    /// control reply) to the TUN device.
    pub async fn write_one(&mut self, tun: &AsyncDevice, packet: &[u8]) {
        let Some(slot) = self.opened.first_mut() else {
            return;
        };
        slot.clear();
        slot.resize(TUN_OFFSET, 0);
        slot.extend_from_slice(packet);
        write_tun(tun, &mut self.gro, &mut self.opened[..1]).await;
    }
}

async fn write_tun(tun: &AsyncDevice, gro: &mut GROTable, packets: &mut [Vec<u8>]) {
    if packets.is_empty() {
        return;
    }
    if let Err(e) = tun.send_multiple(gro, packets, TUN_OFFSET).await {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

async fn send_run(outer: &Outer, sealed: &[u8], run: &Run) {
    let Some(contents) = sealed.get(run.start..run.end()) else {
        return;
    };
    outer
        .send(run.gso.dst, contents, run.gso.segment_size())
        .await;
}
