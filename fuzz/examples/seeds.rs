//! Writes the committed seed corpus (`fuzz/seeds/<target>/`): valid inputs
//! made by the encoders and the example configs, so that each target starts
//! from what real senders send. `cargo run --example seeds` from `fuzz/`.

use std::fs;
use std::path::{Path, PathBuf};

use tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer;
use tern_node_core::dns::{build_query, RecordType};
use tern_runner_core::protocol::Message;
use tern_shared::control::ControlMessage;
use tern_shared::testing::{TestCa, TEST_NOW};
use tern_shared::{armor, enroll, packet, wire};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn repo(path: &str) -> Vec<u8> {
    let p: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn main() {
    let ca = TestCa::new("seed-ca", &["100.64.0.0/10"], &["ci"]);
    let node = ca.node("seed-node", "100.64.0.7/10", &["ci"], &[], 3600);
    let other = ca.node("seed-other", "100.64.0.8/10", &[], &[], 3600);

    put("certs", "node.bin", &node.cert.encode());
    put("certs", "ca.bin", &ca.cert.encode());
    put("certs", "node.pem", node.cert.to_pem().as_bytes());
    put("certs", "key.pem", node.key.to_pem().as_bytes());
    put("certs", "ca-key.pem", ca.key.to_pem().as_bytes());
    put(
        "certs",
        "fingerprint",
        node.cert.fingerprint().to_string().as_bytes(),
    );
    put(
        "certs",
        "armor",
        armor::encode("TERN TEST", b"\x00\x01payload").as_bytes(),
    );

    let cert_bytes = node.cert.encode();
    let hello = wire::Hello {
        wants_reply: true,
        cert: &cert_bytes,
    }
    .encode();
    put("wire", "hello", &hello);
    let envelope = wire::RelayEnvelope {
        peer: "100.64.0.8"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        message: &[1, 0, 0, 0, 9, 9, 9],
    };
    put(
        "wire",
        "relay-request",
        &envelope.encode(wire::TYPE_RELAY_REQUEST),
    );
    put("wire", "relayed", &envelope.encode(wire::TYPE_RELAYED));

    let messages = [
        ControlMessage::Register {
            id: 1,
            local: vec!["198.18.0.2:4242"
                .parse()
                .unwrap_or(([0, 0, 0, 0], 0).into())],
            routes: vec![],
        },
        ControlMessage::Query {
            id: 2,
            overlay_ip: "100.64.0.8"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        },
        ControlMessage::Deregister { id: 3 },
    ];
    for (i, m) in messages.iter().enumerate() {
        if let Ok(bytes) = m.encode() {
            put("control", &format!("message-{i}"), &bytes);
        }
    }

    put(
        "enroll",
        "disabled",
        &enroll::disabled_answer("enrollment is closed"),
    );
    put(
        "enroll",
        "request.json",
        br#"{"kind":"token","token":"tern_enroll_x","name_hint":"ci-job","public_key":"AAAA"}"#,
    );

    put("transport", "target", b"lighthouse.example:443");
    put(
        "transport",
        "proxy",
        b"http://user:pa%20ss@proxy.internal:3128",
    );
    put(
        "transport",
        "no-proxy",
        b".internal,10.0.0.0/8\napi.internal",
    );
    put(
        "transport",
        "answer",
        b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n",
    );

    put("socks_http", "greeting", &[5, 1, 0]);
    put(
        "socks_http",
        "request-ip",
        &[5, 1, 0, 1, 198, 19, 0, 10, 0x1f, 0x90],
    );
    put(
        "socks_http",
        "request-name",
        b"\x05\x01\x00\x03\x0cdb.internal.x\x15\x38",
    );
    put(
        "socks_http",
        "connect",
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n",
    );

    if let Ok(q) = build_query("gw-1.tern.internal", RecordType::A, 7) {
        put("dns", "query-a", &q);
    }
    if let Ok(q) = build_query("api.corp.internal", RecordType::SRV, 8) {
        put("dns", "query-srv", &q);
    }

    let frames = [
        Message::Denied {
            reason: "not in group ci".into(),
        },
        Message::Accepted {
            job_id: "job-1".into(),
        },
        Message::UploadChunk(b"tar bytes".to_vec()),
        Message::Heartbeat,
    ];
    for (i, m) in frames.iter().enumerate() {
        if let Ok(bytes) = m.encode() {
            put("job_frames", &format!("frame-{i}"), &bytes[4..]);
            put(
                "job_frames",
                &format!("stream-{i}"),
                &[&[4u8][..], &bytes].concat(),
            );
        }
    }

    if let Ok(dir) = tempfile::tempdir() {
        let _ = fs::create_dir_all(dir.path().join("out/sub"));
        let _ = fs::write(dir.path().join("out/report.txt"), b"hello\n");
        let _ = fs::write(dir.path().join("out/sub/data.bin"), [0u8, 1, 2, 3]);
        let mut tar = Vec::new();
        if tern_runner::archive::pack(dir.path(), &[PathBuf::from("out")], false, &mut tar).is_ok()
        {
            put("archive", "workspace.tar", &tar);
        }
    }

    put("configs", "node.toml", &repo("config/node.toml"));
    put("configs", "gateway.toml", &repo("config/gateway.toml"));
    put(
        "configs",
        "lighthouse.toml",
        &repo("config/lighthouse.toml"),
    );
    put("configs", "pipeline.toml", &repo("config/pipeline.toml"));
    put("configs", "runner.toml", &repo("config/runner.toml"));
    put(
        "configs",
        "kubeconfig",
        b"apiVersion: v1\nkind: Config\ncurrent-context: ci\nclusters:\n- name: c\n  cluster:\n    server: https://198.19.0.10:6443\n    certificate-authority-data: LS0tLS1CRUdJTg==\ncontexts:\n- name: ci\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user:\n    token: t\n",
    );

    if let Ok(issuer) = TestOidcIssuer::es256("seed-kid") {
        let claims = serde_json::json!({
            "iss": "https://issuer.example", "aud": "tern", "sub": "repo:acme/app:ref:refs/heads/main",
            "repository": "acme/app", "iat": TEST_NOW - 10, "nbf": TEST_NOW - 10, "exp": TEST_NOW + 300,
        });
        let token = issuer.sign(&claims);
        put(
            "oidc",
            "jwks-and-token",
            format!("{}\n{token}", issuer.jwks_json()).as_bytes(),
        );
    }

    for (name, text) in [
        ("duration", "1h30m"),
        ("ports", "8000-8080"),
        (
            "store",
            "postgres://tern:secret@198.19.0.5:5432/tern?sslmode=require",
        ),
        ("sqlite", "sqlite:///var/lib/tern/store.db"),
        ("service", "service:k8s"),
        ("forward", "db.internal:5432"),
        ("resolver", "198.19.0.2"),
        ("upstream", "https://198.19.0.10:6443/base"),
    ] {
        put("small_parsers", name, text.as_bytes());
    }
    let udp = packet::build_udp_ipv4(
        "100.64.0.7"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        "100.64.0.8"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        5353,
        53,
        b"payload",
    );
    put("small_parsers", "udp-packet", &udp);

    // The mesh target: length-prefixed datagrams; a hello from a node of
    // the same CA (a hello carries no data), then a handshake-sized
    // WireGuard message no key of the node's answers.
    let other_bytes = other.cert.encode();
    let other_hello = wire::Hello {
        wants_reply: true,
        cert: &other_bytes,
    }
    .encode();
    let mut datagrams = Vec::new();
    if other_hello.len() < 256 {
        datagrams.push(other_hello.len() as u8);
        datagrams.extend_from_slice(&other_hello);
    }
    let mut initiation = vec![1u8, 0, 0, 0];
    initiation.resize(148, 0x5a);
    datagrams.push(148);
    datagrams.extend_from_slice(&initiation);
    put("mesh_datagrams", "hello-and-initiation", &datagrams);
    println!("seeds written");
}
