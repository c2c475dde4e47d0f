//! Tern where UDP is blocked, on real kernels: the lighthouse listens on
//! TCP 443 (TLS) beside UDP. A CI host whose every UDP packet iptables
//! drops enrolls with a token over TCP, reaches a server in the private
//! network through the gateway (the relay, over the TCP link; curl,
//! hash-checked), and goes back to UDP once UDP is let through. A CI host
//! allowed out only to an HTTP proxy (Debian's tinyproxy, in a namespace of
//! its own, with proxy authentication) does the same through
//! `HTTPS_PROXY`; a wrong proxy password is refused with a message saying
//! so. Needs root, iptables, curl and tinyproxy.

use std::time::Duration;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, workspace_bin, Ns, Proc};

const SERVER: &str = "198.19.0.10";
const PROXY: &str = "198.18.0.5";

struct World {
    lab: tern_netns_tests::Lab,
    dir: std::path::PathBuf,
    ci: Ns,
    want: String,
    lh_config: std::path::PathBuf,
    _keep: Vec<Proc>,
}

/// The gateway lab, its lighthouse listening on TCP 443 too and enrolling
/// group ci; the CI host's config names the lighthouse's TCP listener
/// (transport auto) and routes the vpc.
fn world(prefix: &str) -> World {
    let GatewayLab {
        lab,
        dir,
        lh,
        ci,
        gw,
        vpc,
    } = gateway_lab(prefix, SERVER);
    let bytes = vpc.exec("head", ["-c", "5242880", "/dev/urandom"]).stdout;
    let http = web_server(&vpc, &dir, SERVER, &[("blob.bin", &bytes)]);
    let want = sha256_file(&dir.join("www/blob.bin"));
    make_ca_and_lighthouse(&dir);
    sign(
        &dir,
        "ca",
        "gw",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign_issuer(&dir, "ca", "lh-issuer", "100.64.100.0/24", "ci");
    let lh_config = write_lighthouse_config(&dir);
    let text = std::fs::read_to_string(&lh_config).unwrap_or_default().replace(
        "addr = \"0.0.0.0:4242\"\n",
        "addr = \"0.0.0.0:4242\"\ntcp = \"0.0.0.0:443\"\n",
    ) + "[enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\nstore = \"lh.db\"\n";
    std::fs::write(&lh_config, text).unwrap_or_else(|e| panic!("lighthouse config: {e}"));
    let lh_proc = start_lighthouse(&lh, &lh_config);
    let gateway = gateway_8080_config(&node_config_text("gw", "ca.crt"));
    let gw_proc = start_node(&gw, &write_file(&dir, "gw.toml", &gateway), "node-gw");
    let job = node_config_text("job", "ca.crt")
        .replace("cert = \"job.crt\"\n", "")
        .replace("key = \"job.key\"\n", "")
        + &format!("tcp = \"{LH_UNDERLAY}:443\"\n[[routes]]\nsubnet = \"198.19.0.0/24\"\n");
    write_file(&dir, "job.toml", &job);
    wait_registered(&dir, "gw", Duration::from_secs(20));
    World {
        lab,
        dir,
        ci,
        want,
        lh_config,
        _keep: vec![http, lh_proc, gw_proc],
    }
}

impl World {
    fn job(&self, proxy: Option<&str>) -> Proc {
        let token = create_token(&self.lh_config);
        let mut cmd = self.ci.command(workspace_bin("tern"));
        cmd.args(["up", "--config"])
            .arg(self.dir.join("job.toml"))
            .args(["--enroll-token", &token]);
        if let Some(url) = proxy {
            cmd.env("HTTPS_PROXY", url);
        }
        self.ci.spawn_command(cmd, "node-job")
    }

    /// The 5 MB blob through the gateway, hash-checked.
    fn download_checks(&self) {
        let out = self.dir.join("blob.got");
        let _ = std::fs::remove_file(&out);
        let fetched = self
            .ci
            .exec(
                "curl",
                [
                    "-s",
                    "--fail",
                    "--max-time",
                    "60",
                    "-o",
                    &out.to_string_lossy(),
                    &format!("http://{SERVER}:8080/blob.bin"),
                ],
            )
            .status
            .success();
        assert!(fetched, "curl through the gateway failed");
        assert_eq!(sha256_file(&out), self.want, "the blob arrived changed");
    }

    /// The job enrolled and its API answers.
    fn wait_up(&self) {
        wait_until("the job is up", Duration::from_secs(30), || {
            self.dir.join("job.sock").exists()
        });
    }

    fn lighthouse_transport(&self) -> String {
        status(&self.dir, "job")["lighthouses"][0]["transport"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// iptables in `ns`, which must succeed.
fn iptables(ns: &Ns, args: &str) {
    let out = ns.exec("iptables", args.split_whitespace());
    assert!(
        out.status.success(),
        "iptables {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn with_udp_dropped_a_job_reaches_the_private_server_over_tcp() {
    if !require_root("tcp") || !require_tools("tcp", &["iptables", "curl", "python3"]) {
        return;
    }
    let _serial = serial();
    let w = world("tcpu");
    for chain in ["OUTPUT", "INPUT"] {
        iptables(&w.ci, &format!("-A {chain} -p udp -j DROP"));
    }
    let job = w.job(None);
    w.wait_up();
    wait_until("a route to the vpc", Duration::from_secs(20), || {
        status(&w.dir, "job")["routes"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    w.download_checks();
    let log = job.log();
    assert!(
        log.contains("enrolling over TCP"),
        "enrollment went over TCP"
    );
    assert_eq!(w.lighthouse_transport(), format!("tcp {LH_UNDERLAY}:443"));
    let gw = status(&w.dir, "job")["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "gw").cloned())
        .unwrap_or_default();
    assert_eq!(gw["path"], "relayed", "{gw}");
    let out = w.ci.exec(
        &workspace_bin("tern").to_string_lossy(),
        [
            "ping",
            "--socket",
            &w.dir.join("job.sock").to_string_lossy(),
            "gw",
            "--count",
            "1",
        ],
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("relayed via") && shown.contains("over tcp"),
        "{shown}"
    );

    // UDP let through again: back on UDP (a probe every 15 s), direct.
    for chain in ["OUTPUT", "INPUT"] {
        iptables(&w.ci, &format!("-D {chain} -p udp -j DROP"));
    }
    wait_until("back on UDP", Duration::from_secs(40), || {
        w.lighthouse_transport() == "udp"
    });
    w.download_checks();
    assert!(job.log().contains("answers over UDP again"));
}

#[test]
fn through_an_http_proxy_alone_with_proxy_authentication() {
    if !require_root("tcp") || !require_tools("tcp", &["iptables", "curl", "python3", "tinyproxy"])
    {
        return;
    }
    let _serial = serial();
    let w = world("tcpp");
    let px = w.lab.add_ns("px");
    w.lab.connect_to_wan(&px, &format!("{PROXY}/24"));
    let conf = write_file(
        &w.dir,
        "tinyproxy.conf",
        &format!(
            "Port 8888\nListen {PROXY}\nTimeout 600\nMaxClients 50\nBasicAuth ci s3cret\n\
             ConnectPort 443\nAllow 198.18.0.0/16\nLogLevel Info\n"
        ),
    );
    let mut cmd = px.command("tinyproxy");
    cmd.args(["-d", "-c"]).arg(&conf);
    let proxy = px.spawn_command(cmd, "tinyproxy");
    proxy.wait_for_log("Accepting connections", Duration::from_secs(10));
    // Out of the CI host's network: the proxy's port and answers to what
    // it sent (the overlay's own device, tern0, is inside the host).
    for rule in [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -o tern0 -j ACCEPT",
        "-A INPUT -i tern0 -j ACCEPT",
        &format!("-A OUTPUT -p tcp -d {PROXY} --dport 8888 -j ACCEPT"),
        "-A OUTPUT -j DROP",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -j DROP",
    ] {
        iptables(&w.ci, rule);
    }

    // A wrong password: refused, and the message says what to do.
    let refused = w.job(Some(&format!("http://ci:Wr0ngPw@{PROXY}:8888")));
    wait_until("the job gives up", Duration::from_secs(30), || {
        !refused.is_running()
    });
    let log = refused.log();
    assert!(
        log.contains("refused CONNECT") && log.contains("USER:PASSWORD"),
        "{log}"
    );
    assert!(
        !log.contains("Wr0ngPw"),
        "the password is not logged: {log}"
    );

    let job = w.job(Some(&format!("http://ci:s3cret@{PROXY}:8888")));
    w.wait_up();
    wait_until("a route to the vpc", Duration::from_secs(30), || {
        status(&w.dir, "job")["routes"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    w.download_checks();
    assert_eq!(
        w.lighthouse_transport(),
        format!("tcp {LH_UNDERLAY}:443 via proxy http://ci@{PROXY}:8888")
    );
    assert!(
        proxy.log().contains("CONNECT"),
        "the proxy carried the link"
    );
    assert!(!job.log().contains("s3cret"), "the password is not logged");
}
