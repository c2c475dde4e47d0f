//! Gateways into a private network, on real kernels: a CI node reaches
//! servers in a "vpc" namespace (198.19.0.0/24, no route to the overlay)
//! through a gateway node, and only what the gateway's firewall allows.
//! Real curl, python's http.server, OpenSSH. Needs root.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, Lab, Ns, Proc};

const SERVER: &str = "198.19.0.10";

fn gateway_config(name: &str, extra_rules: &str) -> String {
    format!(
        r#"{}[gateway]
subnets = ["198.19.0.0/24"]
masquerade = true
[firewall]
log = true
[[firewall.inbound]]
proto = "tcp"
port = "8080"
groups = ["ci"]
local_cidr = "198.19.0.10/32"
[[firewall.inbound]]
proto = "tcp"
port = "22"
groups = ["ci"]
local_cidr = "198.19.0.10/32"
[[firewall.inbound]]
proto = "tcp"
port = "5432"
action = "reject"
local_cidr = "198.19.0.0/24"
{extra_rules}"#,
        node_config_text(name, "ca.crt")
    )
}

fn client_config(name: &str) -> String {
    format!(
        "{}[[routes]]\nsubnet = \"198.19.0.0/24\"\n",
        node_config_text(name, "ca.crt")
    )
}

/// A TCP listener that accepts and closes, so "refused" can only come from the firewall.
fn listener(ns: &Ns, port: u16) -> Proc {
    let code = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{SERVER}',{port}))\ns.listen(16)\nwhile True:\n  c,_=s.accept()\n  c.close()\n"
    );
    let mut cmd = ns.command("python3");
    cmd.args(["-c", &code]);
    ns.spawn_command(cmd, &format!("listener-{port}"))
}

fn http_server(ns: &Ns, dir: &Path, port: u16) -> Proc {
    let mut cmd = ns.command("python3");
    cmd.args([
        "-m",
        "http.server",
        "--bind",
        SERVER,
        &port.to_string(),
        "--directory",
    ])
    .arg(dir);
    let server = ns.spawn_command(cmd, &format!("http-{port}"));
    wait_listening(ns, port);
    server
}

/// Until the server in `ns` answers on SERVER:port (python takes a moment
/// to start; a test that asks sooner sees a refusal, not the mesh).
fn wait_listening(ns: &Ns, port: u16) {
    let url = format!("http://{SERVER}:{port}/");
    wait_until("the http server listens", Duration::from_secs(10), || {
        ns.exec("curl", ["-s", "-o", "/dev/null", "--max-time", "1", &url])
            .status
            .success()
    });
}

/// sshd on 198.19.0.10:22 with key authentication only; returns the client key path.
fn sshd(ns: &Ns, dir: &Path) -> (Proc, std::path::PathBuf) {
    let ssh = dir.join("ssh");
    fs::create_dir_all(&ssh).unwrap_or_else(|e| panic!("mkdir ssh: {e}"));
    for (file, kind) in [("host_ed25519", "ed25519"), ("client_ed25519", "ed25519")] {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f"])
            .arg(ssh.join(file))
            .output()
            .unwrap_or_else(|e| panic!("ssh-keygen: {e}"));
        assert!(
            out.status.success(),
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::copy(ssh.join("client_ed25519.pub"), ssh.join("authorized_keys"))
        .unwrap_or_else(|e| panic!("authorized_keys: {e}"));
    let config = format!(
        "ListenAddress {SERVER}:22\nHostKey {host}\nAuthorizedKeysFile {auth}\nPidFile {pid}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n",
        host = ssh.join("host_ed25519").display(),
        auth = ssh.join("authorized_keys").display(),
        pid = ssh.join("sshd.pid").display(),
    );
    let config_path = write_file(&ssh, "sshd_config", &config);
    // sshd insists on its privilege-separation directory.
    fs::create_dir_all("/run/sshd").unwrap_or_else(|e| panic!("mkdir /run/sshd: {e}"));
    let mut cmd = ns.command("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&config_path);
    (ns.spawn_command(cmd, "sshd"), ssh.join("client_ed25519"))
}

fn curl(ns: &Ns, args: &[&str]) -> (bool, i32, Duration) {
    let start = Instant::now();
    let out = ns.exec("curl", args);
    (
        out.status.success(),
        out.status.code().unwrap_or(-1),
        start.elapsed(),
    )
}

fn hup(proc: &Proc) {
    let out = Command::new("kill")
        .args(["-HUP", &proc.pid().to_string()])
        .output()
        .unwrap_or_else(|e| panic!("kill -HUP: {e}"));
    assert!(out.status.success());
}

#[test]
fn ci_node_reaches_the_private_network_through_gateways_within_policy() {
    let test = "gateway";
    if !require_root(test)
        || !require_tools(
            test,
            &["curl", "python3", "ssh", "ssh-keygen", "iptables", "sshd"],
        )
    {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("gw");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let ci = lab.add_ns("ci");
    let dev = lab.add_ns("dev");
    let gw1 = lab.add_ns("gw1");
    let gw2 = lab.add_ns("gw2");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, "198.18.0.1/24");
    lab.connect_to_wan(&ci, "198.18.0.2/24");
    lab.connect_to_wan(&dev, "198.18.0.3/24");
    lab.connect_to_wan(&gw1, "198.18.0.4/24");
    lab.connect_to_wan(&gw2, "198.18.0.5/24");
    lab.bridge(&vpc, "br1", "198.19.0.10/24");
    lab.connect_to_bridge(&gw1, "198.19.0.2/24", &vpc, "br1");
    lab.connect_to_bridge(&gw2, "198.19.0.3/24", &vpc, "br1");
    assert!(
        !vpc.ip(["route"]).contains("100.64"),
        "the vpc has no route to the overlay"
    );

    // Servers in the vpc.
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    let blob = www.join("blob.bin");
    let bytes = vpc.exec("head", ["-c", "20971520", "/dev/urandom"]).stdout;
    fs::write(&blob, &bytes).unwrap_or_else(|e| panic!("write blob: {e}"));
    let _http = http_server(&vpc, &www, 8080);
    let _http2 = http_server(&vpc, &www, 9090);
    let _pg = listener(&vpc, 5432);
    let (_sshd, client_key) = sshd(&vpc, &dir);

    // Identities.
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci-1", "100.64.0.20/10", &["--groups", "ci"]);
    sign(&dir, "ca", "dev-1", "100.64.0.21/10", &["--groups", "dev"]);
    sign(
        &dir,
        "ca",
        "gw-1",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign(
        &dir,
        "ca",
        "gw-2",
        "100.64.0.31/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign(&dir, "ca", "liar", "100.64.0.40/10", &[]);

    let _lh = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    let gw1_config = write_file(&dir, "gw-1.toml", &gateway_config("gw-1", ""));
    let gw1_proc = start_node(&gw1, &gw1_config, "node-gw-1");
    let gw2_proc = start_node(
        &gw2,
        &write_file(&dir, "gw-2.toml", &gateway_config("gw-2", "")),
        "node-gw-2",
    );
    let _ci = start_node(
        &ci,
        &write_file(&dir, "ci-1.toml", &client_config("ci-1")),
        "node-ci-1",
    );
    let _dev = start_node(
        &dev,
        &write_file(&dir, "dev-1.toml", &client_config("dev-1")),
        "node-dev-1",
    );

    // A gateway whose certificate lacks the subnet refuses to start.
    let liar = start_node(
        &lab.add_ns("liar"),
        &write_file(&dir, "liar.toml", &gateway_config("liar", "")),
        "node-liar",
    );
    wait_until(
        "the unauthorized gateway exits",
        Duration::from_secs(10),
        || !liar.is_running(),
    );
    assert!(
        liar.log()
            .contains("not authorized by this node's certificate"),
        "{}",
        liar.log()
    );

    // Gateways set up MSS clamping and NAT.
    wait_until("gw-1 set up forwarding", Duration::from_secs(10), || {
        gw1_proc.log().contains("gateway forwarding set up")
    });
    assert!(gw1
        .run("iptables", ["-t", "mangle", "-S", "FORWARD"])
        .contains("TCPMSS"));
    assert!(gw1
        .run("iptables", ["-t", "nat", "-S", "POSTROUTING"])
        .contains("MASQUERADE"));

    // 1. curl through the gateway, hash-checked. ci-1 sends its first
    //    packet once it knows both gateways, so it picks gw-1 (the first by
    //    name), which the checks below look at; on a loaded machine gw-2 may
    //    otherwise be the only one known when the first packet leaves.
    wait_until("ci-1 knows both gateways", Duration::from_secs(10), || {
        status(&dir, "ci-1")["routes"][0]["gateways"]
            .as_array()
            .is_some_and(|g| g.len() == 2)
    });
    let url = format!("http://{SERVER}:8080/blob.bin");
    wait_until(
        "ci-1 reaches the vpc web server",
        Duration::from_secs(20),
        || {
            curl(
                &ci,
                &[
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "3",
                    &format!("http://{SERVER}:8080/"),
                ],
            )
            .0
        },
    );
    let got = dir.join("got.bin");
    let (ok, code, _) = curl(
        &ci,
        &[
            "-sS",
            "--max-time",
            "60",
            "-o",
            &got.to_string_lossy(),
            &url,
        ],
    );
    assert!(ok, "curl exit {code}");
    assert_eq!(
        sha256_file(&got),
        sha256_file(&blob),
        "20 MB through the gateway, intact"
    );

    // 2. ssh runs a command in the vpc and brings back its output and exit code.
    let out = ci.exec(
        "ssh",
        [
            "-i",
            &client_key.to_string_lossy(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            &format!("root@{SERVER}"),
            "echo hello-from-the-vpc; exit 7",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-from-the-vpc"
    );

    // 3. Policy: 5432 is refused at once (RST from the gateway's firewall,
    //    although a listener is there); dev-1 (not in group ci) reaches nothing.
    let (ok, code, took) = curl(
        &ci,
        &["-sS", "--max-time", "5", &format!("http://{SERVER}:5432/")],
    );
    assert!(
        !ok && code == 7,
        "curl to 5432 must be refused (exit 7), got {code}"
    );
    assert!(
        took < Duration::from_secs(2),
        "refused quickly, not a timeout: {took:?}"
    );
    // dev-1 sends its first packet once it knows both gateways, so it
    // picks gw-1 (the first), whose firewall this checks.
    wait_until("dev-1 knows both gateways", Duration::from_secs(10), || {
        status(&dir, "dev-1")["routes"][0]["gateways"]
            .as_array()
            .is_some_and(|g| g.len() == 2)
    });
    let (ok, code, _) = curl(
        &dev,
        &["-sS", "--max-time", "3", &format!("http://{SERVER}:8080/")],
    );
    assert!(
        !ok && code == 28,
        "dev-1 must time out (dropped), got {code}"
    );
    let st = status(&dir, "gw-1");
    let denied = &st["firewall"]["denied"];
    assert!(
        denied["inbound/rule-2/reject"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert!(
        denied["inbound/default-deny"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    assert!(
        gw1_proc.log().contains("firewall denied"),
        "denials are logged"
    );

    // 4. A spoofed inner source from the client dies at the gateway.
    ci.ip(["addr", "add", "100.64.0.99/32", "dev", "tern0"]);
    let before = counter(
        &status(&dir, "gw-1"),
        "mesh_counters",
        "spoofed_source_drops",
    );
    let (ok, _, _) = curl(
        &ci,
        &[
            "-sS",
            "--max-time",
            "2",
            "--interface",
            "100.64.0.99",
            &format!("http://{SERVER}:8080/"),
        ],
    );
    assert!(!ok);
    assert!(
        counter(
            &status(&dir, "gw-1"),
            "mesh_counters",
            "spoofed_source_drops"
        ) > before
    );
    ci.ip(["addr", "del", "100.64.0.99/32", "dev", "tern0"]);

    // 5. SIGHUP with a new rule opens 9090 while a transfer runs; a broken
    //    config is refused and the old rules stay.
    let slow = dir.join("slow.bin");
    let mut transfer = ci.command("curl");
    transfer
        .args(["-sS", "--max-time", "60", "--limit-rate", "4M", "-o"])
        .arg(&slow)
        .arg(&url);
    let transfer = ci.spawn_command(transfer, "slow-transfer");
    std::thread::sleep(Duration::from_millis(800));
    // The gateway's certificate renewed in the middle of it (the same key,
    // signed now) and SIGHUP sent; then one for another address, refused
    // with the reason while the renewed one goes on.
    tern(
        &dir,
        &[
            "cert",
            "pubkey",
            "--key",
            "gw-1.key",
            "--out-pub",
            "gw-1.pub",
        ],
    );
    let resign = |ip: &str| {
        tern(
            &dir,
            &[
                "cert",
                "sign",
                "--ca-crt",
                "ca.crt",
                "--ca-key",
                "ca.key",
                "--name",
                "gw-1",
                "--ip",
                ip,
                "--subnets",
                "198.19.0.0/24",
                "--duration",
                "4000h",
                "--in-pub",
                "gw-1.pub",
                "--out-crt",
                "gw-1.crt",
                "--force",
            ],
        );
    };
    resign("100.64.0.30/10");
    let renewed = fs::read(dir.join("gw-1.crt")).unwrap_or_else(|e| panic!("gw-1.crt: {e}"));
    hup(&gw1_proc);
    gw1_proc.wait_for_log("SIGHUP: certificate reloaded", Duration::from_secs(5));
    resign("100.64.0.99/10");
    hup(&gw1_proc);
    gw1_proc.wait_for_log("new certificate refused", Duration::from_secs(5));
    assert!(gw1_proc.log().contains("an address change needs a restart"));
    fs::write(dir.join("gw-1.crt"), &renewed).unwrap_or_else(|e| panic!("gw-1.crt: {e}"));
    assert!(
        transfer.is_running(),
        "the transfer was in flight during both"
    );
    assert!(
        !curl(
            &ci,
            &["-sS", "--max-time", "2", &format!("http://{SERVER}:9090/")]
        )
        .0,
        "9090 closed before the reload"
    );
    let open_9090 = "[[firewall.inbound]]\nproto = \"tcp\"\nport = \"9090\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.10/32\"\n";
    fs::write(&gw1_config, gateway_config("gw-1", open_9090))
        .unwrap_or_else(|e| panic!("rewrite gw-1.toml: {e}"));
    let reloads = gw1_proc.log().matches("firewall rules reloaded").count();
    hup(&gw1_proc);
    gw1_proc.wait_for_another_log("firewall rules reloaded", reloads, Duration::from_secs(5));
    assert!(
        curl(
            &ci,
            &[
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "3",
                &format!("http://{SERVER}:9090/")
            ]
        )
        .0,
        "9090 open after the reload"
    );
    fs::write(&gw1_config, "[firewall\nbroken = ")
        .unwrap_or_else(|e| panic!("break gw-1.toml: {e}"));
    hup(&gw1_proc);
    gw1_proc.wait_for_log("config reload refused", Duration::from_secs(5));
    assert!(
        curl(
            &ci,
            &[
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "3",
                &format!("http://{SERVER}:9090/")
            ]
        )
        .0,
        "old rules stay"
    );
    wait_until(
        "the slow transfer finishes",
        Duration::from_secs(30),
        || !transfer.is_running(),
    );
    assert_eq!(
        transfer.try_wait().and_then(|s| s.code()),
        Some(0),
        "{}",
        transfer.log()
    );
    assert_eq!(
        sha256_file(&slow),
        sha256_file(&blob),
        "the transfer ran through the certificate's and the rules' reloads intact"
    );
    fs::write(&gw1_config, gateway_config("gw-1", open_9090))
        .unwrap_or_else(|e| panic!("restore gw-1.toml: {e}"));

    // 6. Two gateways: stop the one in use while the client polls; traffic
    //    resumes through the other.
    let active = status(&dir, "ci-1")["routes"][0]["active"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(active, "gw-1", "gw-1 first (by name)");
    let stopped = gw1_proc.terminate_and_wait(Duration::from_secs(5));
    assert!(stopped.is_some_and(|s| s.success()), "gw-1 stops cleanly");
    assert!(
        !gw1.run("iptables", ["-t", "mangle", "-S", "FORWARD"])
            .contains("TCPMSS"),
        "gw-1 removed its rules"
    );
    let since = Instant::now();
    wait_until(
        "traffic resumes through gw-2",
        Duration::from_secs(15),
        || {
            curl(
                &ci,
                &[
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "1",
                    &format!("http://{SERVER}:8080/"),
                ],
            )
            .0
        },
    );
    eprintln!("failover took {:?}", since.elapsed());
    assert_eq!(status(&dir, "ci-1")["routes"][0]["active"], "gw-2");
    assert!(gw2_proc.is_running());
}

/// Routes learned from gateways never take the place of the host's own: a
/// node attached to the private network keeps its connected route (and
/// reaches its neighbours directly) even when its config names the
/// subnet; a prefix covering the lighthouse's address is refused and the
/// table left as it was; a client that accepts routes gets a kernel route
/// only for the verified, harmless subnet, and one that does not gets none.
#[test]
fn learned_routes_never_replace_the_hosts_own_routes() {
    let test = "gateway_routes";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables"]) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("gwrt");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let gw1 = lab.add_ns("gw1");
    let wide = lab.add_ns("wide");
    let inside = lab.add_ns("inside");
    let client = lab.add_ns("client");
    let plain = lab.add_ns("plain");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, "198.18.0.1/24");
    lab.connect_to_wan(&client, "198.18.0.2/24");
    lab.connect_to_wan(&plain, "198.18.0.3/24");
    lab.connect_to_wan(&gw1, "198.18.0.4/24");
    lab.connect_to_wan(&wide, "198.18.0.5/24");
    lab.connect_to_wan(&inside, "198.18.0.6/24");
    lab.bridge(&vpc, "br1", "198.19.0.10/24");
    lab.connect_to_bridge(&gw1, "198.19.0.2/24", &vpc, "br1");
    let inside_if = lab.connect_to_bridge(&inside, "198.19.0.30/24", &vpc, "br1");
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    fs::write(www.join("hello.txt"), "hello from the vpc\n").unwrap_or_else(|e| panic!("{e}"));
    let _http = http_server(&vpc, &www, 8080);

    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(
        &dir,
        "ca",
        "gw-1",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    // A gateway whose certificate covers the underlay, the lighthouse's
    // address included: what a careless CA (or a lying one) could sign.
    sign(
        &dir,
        "ca",
        "wide",
        "100.64.0.31/10",
        &["--subnets", "198.18.0.0/24"],
    );
    sign(&dir, "ca", "inside", "100.64.0.40/10", &["--groups", "ci"]);
    sign(&dir, "ca", "client", "100.64.0.41/10", &["--groups", "ci"]);
    sign(&dir, "ca", "plain", "100.64.0.42/10", &["--groups", "ci"]);
    let _lh = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    let _gw1 = start_node(
        &gw1,
        &write_file(&dir, "gw-1.toml", &gateway_config("gw-1", "")),
        "node-gw-1",
    );
    let wide_config = gateway_config("wide", "").replace("198.19.0.0/24\"]", "198.18.0.0/24\"]");
    let _wide = start_node(
        &wide,
        &write_file(&dir, "wide.toml", &wide_config),
        "node-wide",
    );
    let accepting = |name: &str, routes: &str| {
        node_config_text(name, "ca.crt")
            .replace("mtu = 1420\n", "mtu = 1420\naccept_routes = true\n")
            + routes
    };
    let routes_before = inside.ip(["-4", "route", "show"]);
    let inside_node = start_node(
        &inside,
        &write_file(
            &dir,
            "inside.toml",
            &accepting("inside", "[[routes]]\nsubnet = \"198.19.0.0/24\"\n"),
        ),
        "node-inside",
    );
    let client_node = start_node(
        &client,
        &write_file(&dir, "client.toml", &accepting("client", "")),
        "node-client",
    );
    let _plain = start_node(
        &plain,
        &write_file(&dir, "plain.toml", &node_config_text("plain", "ca.crt")),
        "node-plain",
    );
    wait_until("every node registers", Duration::from_secs(20), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 5)
    });

    // The client accepts gw-1's subnet once it verified gw-1's certificate,
    // and reaches the vpc through the mesh.
    wait_until(
        "the client routes the vpc into its TUN device",
        Duration::from_secs(20),
        || {
            client
                .ip(["-4", "route", "show", "198.19.0.0/24"])
                .contains("dev tern0")
        },
    );
    let route = client.ip(["-4", "route", "show", "198.19.0.0/24"]);
    assert!(
        route.contains("proto 121") && route.contains("metric 1024"),
        "{route}"
    );
    let (ok, code, _) = curl(
        &client,
        &[
            "-sf",
            "--max-time",
            "10",
            "http://198.19.0.10:8080/hello.txt",
        ],
    );
    assert!(ok, "curl through the mesh: exit {code}");
    // Both accepting nodes refuse the underlay prefix, say so, and leave
    // their tables alone.
    for (ns, node) in [(&client, &client_node), (&inside, &inside_node)] {
        node.wait_for_log("covers 198.18.0.1", Duration::from_secs(20));
        let underlay = ns.ip(["-4", "route", "show", "198.18.0.0/24"]);
        assert!(
            !underlay.contains("tern0"),
            "{}: {underlay}",
            ns.short_name()
        );
    }

    // `tern status` says which routes have kernel routes, and why not.
    let text = tern(
        &dir,
        &[
            "status",
            "--socket",
            &dir.join("client.sock").to_string_lossy(),
        ],
    );
    let line = |subnet: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(subnet))
            .unwrap_or_else(|| panic!("no route {subnet} in:\n{text}"))
            .to_string()
    };
    assert!(line("198.19.0.0/24").trim_end().ends_with("yes"), "{text}");
    assert!(
        line("198.18.0.0/24").contains("no: it covers 198.18.0.1"),
        "{text}"
    );

    // The node inside the vpc keeps its connected route and reaches its
    // neighbour directly (gw-1's firewall would take it only from group ci
    // through the mesh, and the vpc server has no route to the overlay).
    inside_node.wait_for_log("kernel route skipped", Duration::from_secs(20));
    let route = inside.ip(["-4", "route", "show", "198.19.0.0/24"]);
    assert!(
        route.contains(&format!("dev {inside_if}")) && !route.contains("tern0"),
        "{route}"
    );
    let routes_after = inside.ip(["-4", "route", "show"]);
    let without_tern = |t: &str| {
        t.lines()
            .filter(|l| !l.contains("tern0"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        without_tern(&routes_before),
        without_tern(&routes_after),
        "the host's own routes are as they were"
    );
    let (ok, code, _) = curl(
        &inside,
        &[
            "-sf",
            "--max-time",
            "5",
            "http://198.19.0.10:8080/hello.txt",
        ],
    );
    assert!(
        ok,
        "the node inside the vpc reaches its neighbour: exit {code}"
    );

    // A node that neither names the subnet nor accepts routes learns it
    // (for userspace dials and `tern status`) but gets no kernel route.
    wait_until(
        "the plain node learns gw-1's subnet",
        Duration::from_secs(20),
        || {
            status(&dir, "plain")["routes"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r["subnet"] == "198.19.0.0/24" && r["kernel_route"] == false)
            })
        },
    );
    let plain_routes = plain.ip(["-4", "route", "show"]);
    assert!(!plain_routes.contains("198.19.0.0/24"), "{plain_routes}");
}
