//! Memory of the peer table, measured with a counting allocator.
//!
//! `cargo bench -p tern-mesh --bench peer_memory [-- PEERS]` builds a
//! [`Mesh`] and fills it with PEERS peers (default 10,000) twice over:
//!
//! 1. **known**: verified certificates in the table, no session yet (what a
//!    node holds for peers it was told about but has not talked to);
//! 2. **connected**: each peer completes a real WireGuard handshake with the
//!    mesh (a throwaway counterpart mesh per peer answers it), so the table
//!    holds live session keys, timers and the packet queue.
//!
//! It prints the heap bytes the mesh holds per peer in each state: bytes
//! allocated minus bytes freed while the table grew, with every counterpart
//! already dropped. The figure includes the hash maps' slack. WireGuard's
//! handshake rate limit (per second of real time) paces the second part: it
//! takes about PEERS/400 seconds.

use std::alloc::System;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tern_mesh::{Mesh, MeshSettings, PeerRole, Received};
use tern_shared::cert::CaPool;
use tern_shared::packet::build_udp_ipv4;
use tern_shared::testing::{TestCa, TestNode, TEST_NOW};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const OUR_ADDR: &str = "198.18.0.2:4242";

fn main() {
    let peers: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse().unwrap_or_else(|e| panic!("PEERS {a:?}: {e}")))
        .unwrap_or(10_000);
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let pool = ca.pool();
    let us = ca.node("us", "100.64.0.1/10", &[], &[], 86_400);
    eprintln!("signing {peers} peer certificates...");
    let others: Vec<TestNode> = (0..peers)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 1, 0)) + i as u32);
            ca.node(
                &format!("peer-{i}"),
                &format!("{ip}/10"),
                &["ci"],
                &[],
                86_400,
            )
        })
        .collect();

    let known = measure_known(&us, &others, &pool);
    let connected = measure_connected(&us, &others, &pool);
    println!("peer table memory ({peers} peers, heap bytes held by the mesh per peer):");
    println!("  known (certificate, no session):   {known:>7.0} B/peer");
    println!("  connected (live WireGuard session): {connected:>7.0} B/peer");
    println!(
        "  of which boringtun's Tunn, without its boxed sessions: {} B",
        std::mem::size_of::<boringtun::noise::Tunn>()
    );
}

fn new_mesh(node: &TestNode, pool: &CaPool, seed: u64, now: Instant) -> Mesh {
    Mesh::new(
        node.key.static_secret(),
        &node.verified(pool),
        pool.clone(),
        MeshSettings {
            seed,
            max_known_certs: 16,
            ..MeshSettings::default()
        },
        now,
        TEST_NOW,
    )
}

fn endpoint(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 18, (i >> 8) as u8 + 1, i as u8], 4242))
}

fn measure_known(us: &TestNode, others: &[TestNode], pool: &CaPool) -> f64 {
    let now = Instant::now();
    let certs: Vec<_> = others.iter().map(|n| n.verified(pool)).collect();
    let mut mesh = new_mesh(us, pool, 1, now);
    let region = Region::new(GLOBAL);
    for (i, cert) in certs.iter().enumerate() {
        mesh.add_peer(cert.clone(), &[endpoint(i)], PeerRole::Node, now);
    }
    let stats = region.change();
    drop(certs);
    assert_eq!(mesh.peer_count(), others.len(), "every peer in the table");
    per_peer(stats, others.len())
}

fn measure_connected(us: &TestNode, others: &[TestNode], pool: &CaPool) -> f64 {
    let start = Instant::now();
    let ours: SocketAddr = OUR_ADDR.parse().unwrap_or_else(|e| panic!("{e}"));
    let mut mesh = new_mesh(us, pool, 2, start);
    let mut out = vec![0u8; 4096];
    let mut scratch = vec![0u8; 4096];
    let certs: Vec<_> = others.iter().map(|n| n.verified(pool)).collect();
    let region = Region::new(GLOBAL);
    for (i, (node, cert)) in others.iter().zip(&certs).enumerate() {
        // WireGuard's handshake rate limit counts per second of real time:
        // stay under it.
        if i % 400 == 399 {
            std::thread::sleep(Duration::from_millis(1100));
            mesh.handle_timeout(Instant::now());
            while mesh.poll_transmit().is_some() {}
        }
        let now = Instant::now();
        let addr = endpoint(i);
        let mut other = new_mesh(node, pool, 1_000_000 + i as u64 * 977, now);
        let peer = mesh
            .add_peer(cert.clone(), &[addr], PeerRole::Node, now)
            .unwrap_or_else(|| panic!("peer {i} refused"));
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 1, 0)) + i as u32);
        let first = build_udp_ipv4(Ipv4Addr::new(100, 64, 0, 1), ip, 1000, 2000, b"hi");
        let _ = mesh.encapsulate(peer, &first, &mut out, now);
        let mut delivered = false;
        for _ in 0..20 {
            let mut moved = false;
            while let Some(t) = mesh.poll_transmit() {
                moved = true;
                if let Received::Packet { .. } =
                    other.handle_datagram(ours, &t.payload, &mut scratch, now)
                {
                    delivered = true;
                }
            }
            while let Some(t) = other.poll_transmit() {
                moved = true;
                let _ = mesh.handle_datagram(addr, &t.payload, &mut scratch, now);
            }
            if !moved {
                break;
            }
        }
        assert!(delivered, "peer {i}: handshake did not complete");
        assert!(mesh.is_connected(peer), "peer {i}: not connected");
        drop(other);
    }
    let stats = region.change();
    drop(certs);
    per_peer(stats, others.len())
}

fn per_peer(stats: stats_alloc::Stats, peers: usize) -> f64 {
    let held = stats.bytes_allocated as f64 + stats.bytes_reallocated as f64
        - stats.bytes_deallocated as f64;
    held / peers as f64
}
