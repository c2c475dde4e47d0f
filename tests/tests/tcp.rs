//! Tern over TCP on loopback, no root: a CI job told `transport = "tcp"`
//! enrolls with its token and registers over the lighthouse's TLS listener
//! (`[listen] tcp`), reaches the private service behind the gateway, and
//! `tern status` and `tern ping` say which transport each path uses. (The
//! netns tests drop UDP for real and go through an HTTP proxy.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tern_tests::enroll_lab::{get, lab_custom, LabExtra};
use tern_tests::{free_tcp, run, wait_until, Daemon};

/// This file's private network (each test file its own).
const SUBNET: &str = "127.86.0";

#[test]
fn a_job_enrolls_and_registers_over_tcp() {
    let tcp_port = free_tcp();
    let listen = format!("tcp = \"127.0.0.1:{tcp_port}\"\n");
    let lab = lab_custom(
        SUBNET,
        &LabExtra {
            lh_listen: &listen,
            ..LabExtra::default()
        },
    );
    let token = lab.token("1", "ci");
    let forward = free_tcp();
    let config = lab.ci_config("job", forward);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[[lighthouses]]\n",
        &format!("[[lighthouses]]\ntcp = \"127.0.0.1:{tcp_port}\"\ntransport = \"tcp\"\n"),
    );
    std::fs::write(&config, text).unwrap();
    let job = Daemon::start(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        lab.dir.path().join("job.log"),
    );
    wait_until(
        "the job reaches the private service",
        Duration::from_secs(20),
        || get(forward).is_some_and(|r| r.contains("private hello")),
    );
    let log = job.log();
    assert!(log.contains("enrolling over TCP"), "{log}");
    assert!(log.contains("reaching the lighthouse over TCP"), "{log}");

    let status = lab.node_status("job");
    let lh = &status["lighthouses"][0];
    assert_eq!(lh["registered"], true, "{status}");
    assert_eq!(
        lh["transport"].as_str(),
        Some(format!("tcp 127.0.0.1:{tcp_port}").as_str()),
        "{status}"
    );
    let socket = lab.dir.path().join("job.sock");
    let socket = socket.to_string_lossy();
    let out = run(
        "tern",
        &["status", "--socket", &socket],
        Duration::from_secs(5),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("over tcp 127.0.0.1:{tcp_port}")),
        "{shown}"
    );

    // The lighthouse itself, over the link: the ping says so.
    let out = run(
        "tern",
        &["ping", "--socket", &socket, "100.64.0.1", "--count", "1"],
        Duration::from_secs(10),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains("over tcp"), "{shown}");
    // The gateway, straight over UDP on loopback.
    let out = run(
        "tern",
        &["ping", "--socket", &socket, "100.64.0.2", "--count", "1"],
        Duration::from_secs(10),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("over udp"), "{shown}");
}
