//! `[[services]]` in userspace mode on loopback, no root: a userspace
//! gateway forwards an HTTP API to a CI job that enrolled with a token
//! (its forward to the service's port on the gateway's overlay address).
//! The API (a recorder in this test) gets the gateway's token and the job's
//! name and groups, never the job's own Authorization; the audit log has
//! the request. The netns test does the same in TUN mode with streaming,
//! upgrades and a refused group.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_tests::enroll_lab::{lab_custom, LabExtra};
use tern_tests::{free_tcp, wait_until, Daemon};

/// This file's private network (each test file its own).
const SUBNET: &str = "127.87.0";
const TOKEN: &str = "svc-token-4b1d";

/// An HTTP server that records each request's head and answers 200.
fn recorder() -> (u16, Arc<Mutex<Vec<String>>>) {
    let server = TcpListener::bind(format!("{SUBNET}.20:0")).unwrap();
    let port = server.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let heads = seen.clone();
    std::thread::spawn(move || {
        for mut s in server.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16_384 {
                if s.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            heads
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nupstream ok\n",
            );
        }
    });
    (port, seen)
}

fn get(port: u16, headers: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET /v1/things?secret=q HTTP/1.1\r\nHost: api\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn a_userspace_gateway_forwards_a_service_with_its_own_token() {
    let keep = tempfile::tempdir().unwrap();
    let token = keep.path().join("api.token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let audit = keep.path().join("services.jsonl");
    let (upstream_port, seen) = recorder();
    let gw = format!(
        "[[firewall.inbound]]\nproto = \"tcp\"\nport = \"9000\"\n\
         [[services]]\nname = \"api\"\nlisten = 9000\nupstream = \"http://{SUBNET}.20:{upstream_port}\"\n\
         groups = [\"ci\"]\nbearer_token_file = \"{tok}\"\naudit_log = \"{aud}\"\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"6443\"\n\
         [[services]]\nname = \"k8s\"\nkind = \"kubernetes\"\nlisten = 6443\n\
         upstream = \"http://{SUBNET}.20:{upstream_port}\"\nbearer_token_file = \"{tok}\"\naudit_log = \"{aud}\"\n",
        tok = token.display(),
        aud = audit.display()
    );
    let lab = lab_custom(
        SUBNET,
        &LabExtra {
            gw: &gw,
            ..LabExtra::default()
        },
    );
    let (forward, k8s_forward) = (free_tcp(), free_tcp());
    let config = lab.ci_config_to(
        "job",
        &[
            (forward, "100.64.0.2:9000"),
            (k8s_forward, "100.64.0.2:6443"),
        ],
    );
    let job_token = lab.token("1", "ci");
    let _job = Daemon::start(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            &job_token,
        ],
        lab.dir.path().join("job.log"),
    );
    let mut answer = String::new();
    wait_until(
        "the job reaches the service",
        Duration::from_secs(20),
        || {
            answer = get(
                forward,
                "Authorization: Bearer job-secret\r\nTern-Caller-Name: admin\r\n",
            )
            .unwrap_or_default();
            answer.contains("upstream ok")
        },
    );
    let heads = seen.lock().unwrap().clone();
    let head = heads.last().unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("get /v1/things?secret=q http/1.1"),
        "{head}"
    );
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            TOKEN.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(
        !head.contains("job-secret") && !head.contains("admin"),
        "{head}"
    );
    assert!(head.contains("tern-caller-name: ci-"), "{head}");
    assert!(head.contains("tern-caller-groups: ci\r\n"), "{head}");
    let log = std::fs::read_to_string(&audit).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["service"], "api");
    assert_eq!(line["path"], "/v1/things");
    assert_eq!(line["status"], 200);
    assert!(
        line["caller"].as_str().unwrap().starts_with("ci-"),
        "{line}"
    );
    assert!(!log.contains(TOKEN) && !log.contains("secret=q"), "{log}");
    assert!(!lab.gateway_log().contains(TOKEN));

    // kind = "kubernetes": the API server is told to impersonate the job
    // (prefixed), whatever the job claims.
    let answer = get(
        k8s_forward,
        "Impersonate-User: system:admin\r\nImpersonate-Group: system:masters\r\nAuthorization: Bearer job-secret\r\n",
    )
    .unwrap_or_default();
    assert!(answer.contains("upstream ok"), "{answer}");
    let head = seen.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(head.contains("impersonate-user: tern:ci-"), "{head}");
    assert!(head.contains("impersonate-group: tern:ci\r\n"), "{head}");
    assert!(!head.contains("system:"), "{head}");
    assert!(!head.contains("tern-caller-name"), "{head}");
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            TOKEN.to_ascii_lowercase()
        )),
        "{head}"
    );

    // `tern kubeconfig` in userspace mode: the overlay address is not this
    // host's, so the kubeconfig's server is a forward the node runs on
    // loopback (asked for once; asked again, the same one).
    let socket = lab.dir.path().join("job.sock");
    let kubeconfig = lab.dir.path().join("kubeconfig.yaml");
    let write = || {
        let out = std::process::Command::new(tern_tests::bin("tern"))
            .args(["kubeconfig", "k8s", "--socket"])
            .arg(&socket)
            .arg("--out")
            .arg(&kubeconfig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&kubeconfig).unwrap()
    };
    let written = write();
    let server = written
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(server.starts_with("http://127.0.0.1:"), "{written}");
    assert!(!written.contains(TOKEN), "{written}");
    assert_eq!(write(), written, "asked again, the same forward");
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let answer = get(port, "").unwrap_or_default();
    assert!(answer.contains("upstream ok"), "{answer}");
    let head = seen.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(head.contains("impersonate-user: tern:ci-"), "{head}");

    // `tern forward LOCAL=service:NAME`: the same service by name.
    let by_name = free_tcp();
    let _forward = Daemon::start(
        "tern",
        &[
            "forward",
            &format!("127.0.0.1:{by_name}=service:api"),
            "--socket",
            &socket.to_string_lossy(),
        ],
        lab.dir.path().join("forward.log"),
    );
    let mut answer = String::new();
    wait_until(
        "tern forward to service:api",
        Duration::from_secs(10),
        || {
            answer = get(by_name, "").unwrap_or_default();
            answer.contains("upstream ok")
        },
    );
    let head = seen.lock().unwrap().last().unwrap().to_ascii_lowercase();
    assert!(head.contains("tern-caller-groups: ci\r\n"), "{head}");
    let refused = tern_tests::run(
        "tern",
        &[
            "forward",
            &format!("127.0.0.1:{}=service:nothing-here", free_tcp()),
            "--socket",
            &socket.to_string_lossy(),
        ],
        Duration::from_secs(10),
    );
    let text = tern_tests::output_text(&refused);
    assert!(
        !refused.status.success()
            && text.contains("no node offers a service named \"nothing-here\""),
        "{text}"
    );

    // `tern up --wait-for service:NAME`: ready once a node offers it to
    // this one; a node outside its groups is told so (exit 71).
    for (name, groups, code) in [("waiter", "ci", 0), ("outsider", "deploy", 71)] {
        let config = lab.ci_config(name, free_tcp());
        let token = lab.token("1", groups);
        let _down = tern_tests::enroll_lab::Down(lab.dir.path().join(format!("{name}.sock")));
        let out = tern_tests::run(
            "tern",
            &[
                "up",
                "--config",
                &config.to_string_lossy(),
                "--enroll-token",
                &token,
                "--wait-for",
                "service:api",
                "--wait-timeout",
                "20s",
            ],
            Duration::from_secs(30),
        );
        let text = tern_tests::output_text(&out);
        assert_eq!(out.status.code(), Some(code), "{name}: {text}");
        if code == 0 {
            assert!(text.contains(":9000 answered through the mesh"), "{text}");
        } else {
            assert!(text.contains("not in") || text.contains("group"), "{text}");
        }
    }
}
