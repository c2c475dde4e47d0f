//! Where a node's packets live: a TUN device (the kernel's stack) or the
//! userspace stack. Both are one [`Plane`] to the event loop, which drives
//! them in the same order every step, so neither mode can drift from the
//! other: datagrams in, the plane's packets out, the core's events, then
//! [`Plane::deliver`] (which, in userspace mode, lets the stack answer
//! within the same step).

use std::io;
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_node_core::node::NodeCore;
use tern_udp::Outer;

use super::datapath::DataPath;
use super::proxy::Dialer;
use super::userpath::UserPath;
use super::userspace::Netstack;
use tern_runner::server as runner;

/// Packets the kernel may queue on the TUN device for the daemon to read.
const TUN_QUEUE_LEN: u32 = 5000;

/// What the event loop needs of the place packets live. (Its futures are
/// awaited on the daemon's one task, so no `Send` bound is asked of them.)
#[allow(async_fn_in_trait)]
pub trait Plane {
    /// Waits until the plane has packets for the mesh.
    async fn ready(&self) -> io::Result<()>;
    /// Receives what the UDP socket has, through the core, into the plane.
    async fn receive_udp(&mut self, core: &mut NodeCore, outer: &Outer);
    /// Sends what the plane has for the mesh, through the core. False when
    /// the plane is gone (the node stops).
    async fn send_to_mesh(&mut self, core: &mut NodeCore, outer: &Outer) -> bool;
    /// Hands the plane the packets the core answered toward it (rejects),
    /// then lets the plane answer in turn: whatever it queued for the mesh
    /// leaves through the core before the step ends.
    async fn deliver(&mut self, packets: Vec<Vec<u8>>, core: &mut NodeCore, outer: &Outer);
    /// When the plane next needs the clock, if it keeps timers of its own.
    fn poll_delay(&mut self) -> Option<Duration>;
    /// How the node opens connections into the mesh (forwards, proxies,
    /// `tern run`, the readiness gate).
    fn dialer(&self) -> Dialer;
    /// How a service on the overlay address takes connections on `port`
    /// (the runner, `[[services]]`).
    fn listener(&mut self, port: u16) -> runner::Listener;
    /// How the runner takes connections.
    fn runner_listener(&mut self) -> runner::Listener {
        self.listener(tern_runner::protocol::RUNNER_PORT)
    }
    /// The device kernel routes go to; none in userspace mode (the stack
    /// hands every packet to the core).
    fn routes_device(&self) -> Option<&str>;
}

/// TUN mode: the kernel's stack behind a TUN device, with offloads.
pub struct TunPlane {
    name: String,
    tun: tun_rs::AsyncDevice,
    path: DataPath,
}

impl TunPlane {
    /// Creates the TUN device with the node's overlay address.
    pub fn create(
        name: &str,
        overlay: ipnet::Ipv4Net,
        mtu: u16,
        offload: bool,
        listen: std::net::SocketAddr,
    ) -> anyhow::Result<TunPlane> {
        let tun = tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv4(overlay.addr(), overlay.prefix_len(), None)
            .mtu(mtu)
            // The kernel's queue toward the daemon: the default 500 packets
            // overflow in bursts while the loop serves the other direction.
            .tx_queue_len(TUN_QUEUE_LEN)
            .offload(offload)
            .build_async()
            .with_context(|| {
                format!(
                    "creating TUN device {name:?} with {overlay}: this needs root or CAP_NET_ADMIN and /dev/net/tun \
                     (or run without either: [tun] mode = \"userspace\", or tern up --userspace)"
                )
            })?;
        tracing::info!(
            device = %name,
            address = %overlay,
            mtu,
            tcp_offload = tun.tcp_gso(),
            udp_offload = tun.udp_gso(),
            %listen,
            "TUN device up"
        );
        Ok(TunPlane {
            name: name.to_string(),
            tun,
            path: DataPath::new(mtu),
        })
    }
}

impl Plane for TunPlane {
    async fn ready(&self) -> io::Result<()> {
        self.tun.readable().await
    }

    async fn receive_udp(&mut self, core: &mut NodeCore, outer: &Outer) {
        self.path.udp_to_tun(core, &self.tun, outer).await;
    }

    async fn send_to_mesh(&mut self, core: &mut NodeCore, outer: &Outer) -> bool {
        self.path.tun_to_udp(core, &self.tun, outer).await
    }

    async fn deliver(&mut self, packets: Vec<Vec<u8>>, _core: &mut NodeCore, _outer: &Outer) {
        for packet in packets {
            self.path.write_one(&self.tun, &packet).await;
        }
    }

    fn poll_delay(&mut self) -> Option<Duration> {
        None
    }

    fn dialer(&self) -> Dialer {
        Dialer::Kernel {
            device: self.name.clone(),
        }
    }

    fn listener(&mut self, _port: u16) -> runner::Listener {
        runner::Listener::Kernel
    }

    fn routes_device(&self) -> Option<&str> {
        Some(&self.name)
    }
}

/// Userspace mode: an in-process TCP/IP stack, no device, no root.
pub struct UserPlane {
    stack: Netstack,
    path: UserPath,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl UserPlane {
    pub fn new(stack: Netstack, mtu: u16) -> UserPlane {
        let wake = stack.wake();
        UserPlane {
            stack,
            path: UserPath::new(mtu),
            wake,
        }
    }
}

impl Plane for UserPlane {
    async fn ready(&self) -> io::Result<()> {
        self.wake.notified().await;
        Ok(())
    }

    async fn receive_udp(&mut self, core: &mut NodeCore, outer: &Outer) {
        self.path.udp_in(core, outer, &mut self.stack);
    }

    async fn send_to_mesh(&mut self, _core: &mut NodeCore, _outer: &Outer) -> bool {
        // The stack's output leaves in `deliver`, after it has run.
        true
    }

    async fn deliver(&mut self, packets: Vec<Vec<u8>>, core: &mut NodeCore, outer: &Outer) {
        let now = Instant::now();
        for packet in packets {
            self.stack.handle_inbound(&packet, now);
        }
        self.stack
            .poll(now, &|ip| core.reachable(ip).map_err(|e| e.to_string()));
        self.path.flush(core, outer, &mut self.stack).await;
    }

    fn poll_delay(&mut self) -> Option<Duration> {
        self.stack.poll_delay()
    }

    fn dialer(&self) -> Dialer {
        Dialer::Userspace(self.stack.handle())
    }

    fn listener(&mut self, port: u16) -> runner::Listener {
        // The stack's connections, handed over as byte streams.
        let mut conns = self.stack.listen(port);
        let (tx, rx) = tokio::sync::mpsc::channel::<runner::Incoming>(16);
        tokio::spawn(async move {
            while let Some(conn) = conns.recv().await {
                let peer = std::net::SocketAddr::V4(conn.peer);
                if tx.send((Box::new(conn.into_stream()), peer)).await.is_err() {
                    break;
                }
            }
        });
        runner::Listener::Streams(rx)
    }

    fn routes_device(&self) -> Option<&str> {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tern_mesh::{Mesh, MeshSettings};
    use tern_node_core::node::LighthouseTarget;
    use tern_shared::testing::{TestCa, TEST_NOW};

    /// The ordering userspace mode once got wrong: what the stack queues
    /// while it runs (here the SYN of a new connection) goes through the
    /// core in the same step, not at the next timer tick.
    #[tokio::test]
    async fn a_packet_the_stack_queues_reaches_the_core_in_the_same_step() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let me = ca.node("me", "100.64.0.5/10", &[], &[], 86_400);
        let pool = ca.pool();
        let cert = me.verified(&pool);
        let now = Instant::now();
        let mesh = Mesh::new(
            me.key.static_secret(),
            &cert,
            pool,
            MeshSettings::default(),
            now,
            TEST_NOW,
        );
        let lighthouse = LighthouseTarget {
            endpoint: "127.0.0.1:9".parse().unwrap(),
            name: None,
        };
        let mut core = NodeCore::new(mesh, &cert, vec![lighthouse], now);
        let outer = Outer::new(tern_udp::bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let stack = Netstack::new(cert.overlay_net(), 1420, Vec::new(), 7);
        let mut plane = UserPlane::new(stack, 1420);

        // Someone dials a peer through the stack; the stack is woken.
        let target: std::net::SocketAddrV4 = "100.64.0.9:80".parse().unwrap();
        let Dialer::Userspace(handle) = plane.dialer() else {
            panic!("a userspace plane dials through its stack");
        };
        let dial = tokio::spawn(async move { handle.connect(target).await });
        tokio::time::timeout(Duration::from_secs(5), plane.ready())
            .await
            .expect("the stack is woken")
            .unwrap();
        assert!(core.status().looking_up.is_empty());

        // One step's delivery: the stack takes the request and sends its
        // SYN, which the core holds while it looks the peer up.
        assert!(plane.send_to_mesh(&mut core, &outer).await);
        plane.deliver(Vec::new(), &mut core, &outer).await;
        assert_eq!(core.status().looking_up, vec![*target.ip()]);
        dial.abort();
    }
}
