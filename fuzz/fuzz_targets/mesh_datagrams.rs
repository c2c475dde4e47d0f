//! Hostile datagrams into a node's real mesh core: up to eight datagrams
//! (each behind a one-byte length) from a few source addresses, with the
//! clock moving between them. Nothing from them may be delivered: no
//! sender holds a key the node trusts.
#![no_main]
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tern_mesh::{Mesh, MeshSettings, Received};
use tern_shared::identity::Identity;
use tern_shared::testing::{TestCa, TEST_NOW};

fn identity() -> &'static (Identity, Instant) {
    static IDENTITY: OnceLock<(Identity, Instant)> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        let ca = TestCa::new("fuzz-ca", &["100.64.0.0/10"], &[]);
        let node = ca.node("fuzz-node", "100.64.0.9/10", &[], &[], 86_400);
        let identity = Identity::from_pem(
            &ca.cert.to_pem(),
            &node.cert.to_pem(),
            &node.key.to_pem(),
            TEST_NOW,
        )
        .unwrap_or_else(|e| panic!("fuzz identity: {e}"));
        (identity, Instant::now())
    })
}

fuzz_target!(|data: &[u8]| {
    let (identity, start) = identity();
    let mut mesh = Mesh::for_identity(identity, MeshSettings::default(), *start, TEST_NOW);
    let mut out = vec![0u8; 65_536];
    let mut rest = data;
    let mut now = *start;
    for i in 0..8u16 {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let len = usize::from(len).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        rest = tail;
        let from = SocketAddr::from(([198, 18, 0, (i % 3) as u8 + 1], 4242 + i % 2));
        now += Duration::from_millis(len as u64 * 7);
        let received = mesh.handle_datagram(from, datagram, &mut out, now);
        assert!(
            matches!(received, Received::Nothing),
            "a packet was delivered from an untrusted sender"
        );
        mesh.handle_timeout(now);
    }
});
