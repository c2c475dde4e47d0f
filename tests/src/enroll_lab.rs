//! A loopback enrollment lab, shared by the enrollment and CI-script tests:
//! a root CA, a lighthouse with an issuer for 100.64.100.0/24 (groups ci,
//! deploy; names ci-*; at most 1 h), and a userspace gateway into a
//! 127.x.0.0/24 "private network" whose firewall lets group ci reach an HTTP
//! responder there. Real `tern` and `tern-lighthouse` processes, no root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{bin, free_tcp, free_udp, run, Daemon};

pub fn tern(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("tern"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `NAME.crt` and `NAME.key` in `dir`, signed by the lab's root CA
/// (`ca.crt`, `ca.key` there), for `ip` in `groups` (comma-separated).
pub fn sign_by_root(dir: &Path, name: &str, ip: &str, groups: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    tern(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            name,
            "--ip",
            ip,
            "--groups",
            groups,
            "--out-key",
            &key,
            "--out-crt",
            &crt,
        ],
    );
}

/// A root CA, a lighthouse with an issuer for 100.64.100.0/24 (groups ci,
/// deploy; names ci-*; at most 1 h), and a userspace gateway into
/// a private /24 that lets group ci reach an HTTP server there.
pub struct Lab {
    // Declared first, so dropped first: the daemons stop (and print their
    // logs when a test failed) before their directory goes.
    _daemons: Vec<Daemon>,
    pub dir: tempfile::TempDir,
    pub lh_port: u16,
    /// The private service: an HTTP responder at `service_ip:http_port`.
    pub service_ip: String,
    pub http_port: u16,
    /// The private network's first three octets, e.g. "127.78.0".
    pub subnet: String,
    _http: std::thread::JoinHandle<()>,
}

pub fn lab() -> Lab {
    lab_with("127.78.0", "")
}

/// The lab with the private network `subnet`.0/24 (each test file its own),
/// and `lh_extra` appended to the lighthouse's config (inside its
/// `[enroll]`, which comes last).
pub fn lab_with(subnet: &str, lh_extra: &str) -> Lab {
    lab_custom(
        subnet,
        &LabExtra {
            lh_enroll: lh_extra,
            ..LabExtra::default()
        },
    )
}

/// What a test adds to the lab's configs.
#[derive(Default)]
pub struct LabExtra<'a> {
    /// Keys for the lighthouse's `[listen]`, after its `addr`.
    pub lh_listen: &'a str,
    /// Tables for the lighthouse's config, before its `[enroll]`.
    pub lh_head: &'a str,
    /// Keys inside the lighthouse's `[enroll]` (which comes last).
    pub lh_enroll: &'a str,
    /// Tables appended to the gateway's config.
    pub gw: &'a str,
    /// Arguments `tern-lighthouse` and the gateway's `tern up` start with,
    /// after their config.
    pub args: &'a [&'a str],
}

/// The lab, with `extra` in its configs.
pub fn lab_custom(subnet: &str, extra: &LabExtra<'_>) -> Lab {
    let lh_extra = extra.lh_enroll;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tern(
        d,
        &[
            "cert",
            "ca",
            "--name",
            "root",
            "--out-crt",
            "ca.crt",
            "--out-key",
            "ca.key",
        ],
    );
    sign_by_root(d, "lh1", "100.64.0.1/10", "lighthouse");
    tern(
        d,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "gw",
            "--ip",
            "100.64.0.2/10",
            "--subnets",
            &format!("{subnet}.0/24"),
            "--out-key",
            "gw.key",
            "--out-crt",
            "gw.crt",
        ],
    );
    tern(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "lh-issuer",
            "--ips",
            "100.64.100.0/24",
            "--groups",
            "ci,deploy",
            "--max-duration",
            "1h",
            "--out-key",
            "issuer.key",
            "--out-crt",
            "issuer.crt",
        ],
    );
    let (lh_port, gw_port) = (free_udp(), free_udp());
    fs::write(
        d.join("lh.toml"),
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{lh_port}\"\n{}[api]\nsocket = \"lh.sock\"\n{}[enroll]\nissuer_cert = \"issuer.crt\"\nissuer_key = \"issuer.key\"\n{lh_extra}",
            extra.lh_listen, extra.lh_head
        ),
    )
    .unwrap();
    fs::write(
        d.join("gw.toml"),
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"gw.crt\"\nkey = \"gw.key\"\n[listen]\naddr = \"127.0.0.1:{gw_port}\"\n[[lighthouses]]\nendpoint = \"127.0.0.1:{lh_port}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"gw.sock\"\n[gateway]\nsubnets = [\"{subnet}.0/24\"]\n[[firewall.inbound]]\nproto = \"tcp\"\nlocal_cidr = \"{subnet}.0/24\"\ngroups = [\"ci\"]\n{}",
            extra.gw
        ),
    )
    .unwrap();
    // The private service: answers every connection with one line.
    // Port 0: a port free on this address (tests run in parallel, and a
    // port free on 127.0.0.1 may be taken on this one).
    let server = TcpListener::bind((format!("{subnet}.10"), 0)).unwrap();
    let http_port = server.local_addr().unwrap().port();
    let http = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in server.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = "private hello\n";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let lh_config = d.join("lh.toml").to_string_lossy().into_owned();
    let gw_config = d.join("gw.toml").to_string_lossy().into_owned();
    let mut lh_args = vec!["--config", lh_config.as_str()];
    lh_args.extend_from_slice(extra.args);
    let mut gw_args = vec!["up", "--config", gw_config.as_str()];
    gw_args.extend_from_slice(extra.args);
    let daemons = vec![
        Daemon::start("tern-lighthouse", &lh_args, d.join("lh.log")),
        Daemon::start("tern", &gw_args, d.join("gw.log")),
    ];
    let lab = Lab {
        dir,
        lh_port,
        service_ip: format!("{subnet}.10"),
        http_port,
        subnet: subnet.to_string(),
        _daemons: daemons,
        _http: http,
    };
    // Tests start from a lighthouse that answers (a busy machine may take
    // a while to start it).
    crate::wait_until("the lighthouse answers", Duration::from_secs(20), || {
        lab.lighthouse_status()["pid"].is_u64()
    });
    lab
}

impl Lab {
    pub fn token(&self, uses: &str, groups: &str) -> String {
        let out = run(
            "tern-lighthouse",
            &[
                "token",
                "create",
                "--config",
                &self.dir.path().join("lh.toml").to_string_lossy(),
                "--groups",
                groups,
                "--ttl",
                "1h",
                "--uses",
                uses,
                "--cert-ttl",
                "30m",
            ],
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            token.starts_with("tern1_") && !token.contains('\n'),
            "alone on stdout: {token:?}"
        );
        token
    }

    /// A CI node's config: the CA only, a forward to the private service.
    pub fn ci_config(&self, name: &str, forward: u16) -> std::path::PathBuf {
        let target = format!("{}:{}", self.service_ip, self.http_port);
        self.ci_config_to(name, &[(forward, target.as_str())])
    }

    /// A CI node's config (API socket `<name>.sock`): the CA only, and a
    /// forward from each local port to its target.
    pub fn ci_config_to(&self, name: &str, forwards: &[(u16, &str)]) -> std::path::PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let mut text = format!(
            "[pki]\nca = \"ca.crt\"\n[listen]\naddr = \"127.0.0.1:{}\"\n[[lighthouses]]\nendpoint = \"127.0.0.1:{}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"{name}.sock\"\n",
            free_udp(),
            self.lh_port
        );
        for (port, target) in forwards {
            text.push_str(&format!(
                "[[forwards]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"{target}\"\n"
            ));
        }
        fs::write(&path, text).unwrap();
        path
    }
}

/// Runs `tern down` on the node behind this API socket when dropped.
pub struct Down(pub PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(bin("tern"))
                .args(["down", "--socket"])
                .arg(&self.0)
                .output();
        }
    }
}

impl Lab {
    /// A CI node `name` that enrolls with `token`, with a forward to the
    /// private service; returns once a request through the forward is
    /// answered, with the node and the forward's port.
    pub fn start_job(&self, name: &str, token: &str) -> (Daemon, u16) {
        let forward = free_tcp();
        let config = self.ci_config(name, forward);
        let job = Daemon::start(
            "tern",
            &[
                "up",
                "--config",
                &config.to_string_lossy(),
                "--enroll-token",
                token,
            ],
            self.dir.path().join(format!("{name}.log")),
        );
        crate::wait_until(
            "the job reaches the private service",
            Duration::from_secs(20),
            || get(forward).is_some_and(|r| r.contains("private hello")),
        );
        (job, forward)
    }

    /// The gateway daemon's PID (for signals).
    pub fn gateway_pid(&self) -> u32 {
        self._daemons[1].child.id()
    }

    /// The gateway's log so far.
    pub fn gateway_log(&self) -> String {
        self._daemons[1].log()
    }

    /// `tern-lighthouse status --json` of the lab's lighthouse.
    pub fn lighthouse_status(&self) -> serde_json::Value {
        let out = run(
            "tern-lighthouse",
            &[
                "status",
                "--socket",
                &self.dir.path().join("lh.sock").to_string_lossy(),
                "--json",
            ],
            Duration::from_secs(5),
        );
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// `GET path` of the lighthouse's admin API, on its socket.
    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        crate::admin_get(&self.dir.path().join("lh.sock"), path)
    }

    /// The names of the nodes the lighthouse has registered.
    pub fn registered(&self) -> Vec<String> {
        self.lighthouse_status()["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect()
    }

    /// `tern status --json` of the node behind `<name>.sock` in the lab.
    pub fn node_status(&self, name: &str) -> serde_json::Value {
        let out = run(
            "tern",
            &[
                "status",
                "--socket",
                &self
                    .dir
                    .path()
                    .join(format!("{name}.sock"))
                    .to_string_lossy(),
                "--json",
            ],
            Duration::from_secs(5),
        );
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }
}

/// An HTTP GET through a local port; the response, if any came.
pub fn get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
