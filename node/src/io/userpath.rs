//! Userspace mode's data path: datagrams from the UDP socket through the
//! core into the stack, and what the stack sends through the core out of
//! the socket, with reusable buffers. (The stack itself is
//! [`super::userspace::Netstack`].)

use std::time::Instant;

use tern_udp::daemon::READS_PER_WAKEUP;

use super::userspace::Netstack;

/// The userspace data path: UDP ↔ core ↔ stack, with reusable buffers.
pub struct UserPath {
    received: tern_udp::RecvBatch,
    opened: Vec<u8>,
    sealed: Vec<u8>,
}

impl UserPath {
    pub fn new(mtu: u16) -> UserPath {
        UserPath {
            received: tern_udp::RecvBatch::default(),
            opened: vec![0; 65_535],
            sealed: vec![0; mtu as usize + 512],
        }
    }

    /// Receives what the UDP socket has (bounded), decrypts it and hands
    /// what the core lets through to the stack.
    pub fn udp_in(
        &mut self,
        core: &mut tern_node_core::node::NodeCore,
        outer: &tern_udp::Outer,
        stack: &mut Netstack,
    ) {
        for _ in 0..READS_PER_WAKEUP {
            match self.received.recv(outer) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    break;
                }
            }
            let now = Instant::now();
            for (from, datagram) in self.received.datagrams() {
                if self.opened.len() < datagram.len() + 256 {
                    self.opened.resize(datagram.len() + 256, 0);
                }
                if let Some(packet) = core.handle_datagram(from, datagram, &mut self.opened, now) {
                    stack.handle_inbound(packet, now);
                }
            }
        }
    }

    /// Sends what the stack wrote, through the core (routing, firewall,
    /// encryption), as the TUN path does with what it reads.
    pub async fn flush(
        &mut self,
        core: &mut tern_node_core::node::NodeCore,
        outer: &tern_udp::Outer,
        stack: &mut Netstack,
    ) {
        let now = Instant::now();
        while let Some(packet) = stack.poll_outbound() {
            let needed = packet.len() + tern_mesh::OVERHEAD + 256;
            if self.sealed.len() < needed {
                self.sealed.resize(needed, 0);
            }
            if let Some((dst, ciphertext)) = core.handle_tun_packet(&packet, &mut self.sealed, now)
            {
                outer.send(dst, ciphertext, None).await;
            }
        }
    }
}
