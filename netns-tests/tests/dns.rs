//! Names on real kernels: mesh names (`gw-1.tern`) and split DNS into a
//! private network (`api.internal`, answered by a real dnsmasq in the "vpc"
//! namespace through a gateway whose certificate carries the zone), with
//! the system's resolver pointed at the node by the node itself — in a
//! namespace with its own resolv.conf and no systemd-resolved — and put
//! back when it stops or after it crashed. Real dig, getent, curl and ping;
//! a userspace node resolves through SOCKS5, HTTP CONNECT and `tern
//! forward NAME:PORT`. Needs root, dnsmasq and dig.

use std::fs;
use std::path::Path;
use std::time::Duration;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, Lab, Ns, Proc};

const SERVER: &str = "198.19.0.10";
const VPC_RESOLVER: &str = "198.19.0.2";
const PUBLIC_RESOLVER: &str = "198.18.0.53";
/// A TXT answer too large for a plain 512-byte UDP reply.
const BIG_TXT_PART: &str = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789";

fn gateway_config(name: &str) -> String {
    format!(
        r#"{}[gateway]
subnets = ["198.19.0.0/24"]
[[gateway.dns]]
zone = "internal"
resolver = "{VPC_RESOLVER}:53"
[[firewall.inbound]]
proto = "tcp"
port = "8080"
groups = ["ci"]
local_cidr = "198.19.0.10/32"
[[firewall.inbound]]
proto = "icmp"
groups = ["ci"]
"#,
        node_config_text(name, "ca.crt")
    )
}

fn client_config(name: &str) -> String {
    format!(
        "{}[[routes]]\nsubnet = \"198.19.0.0/24\"\n",
        node_config_text(name, "ca.crt")
    )
}

/// dnsmasq answering only from its own records (no upstream, no hosts file).
fn dnsmasq(ns: &Ns, dir: &Path, listen: &str, records: &[String], log: &str) -> Proc {
    let mut cmd = ns.command("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--user=root",
        "--log-queries",
        "--log-facility=-",
    ])
    .arg(format!("--listen-address={listen}"))
    .arg(format!(
        "--pid-file={}",
        dir.join(format!("{log}.pid")).display()
    ));
    for r in records {
        cmd.arg(r);
    }
    ns.spawn_command(cmd, log)
}

fn dig(ns: &Ns, args: &[&str]) -> String {
    let mut all = vec!["+time=3", "+tries=1"];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&ns.exec("dig", all).stdout).into_owned()
}

fn resolve_json(dir: &Path, name: &str, host: &str) -> serde_json::Value {
    let socket = dir.join(format!("{name}.sock"));
    let out = std::process::Command::new(tern_netns_tests::workspace_bin("tern"))
        .args(["resolve", host, "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap_or_else(|e| panic!("tern resolve: {e}"));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn names_resolve_through_the_mesh_and_the_system_resolver_comes_back() {
    let test = "dns";
    if !require_root(test) || !require_tools(test, &["dnsmasq", "dig", "curl", "python3", "getent"])
    {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("dns");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let job = lab.add_ns("job");
    let dev = lab.add_ns("dev");
    let usr = lab.add_ns("usr");
    let gw = lab.add_ns("gw");
    let public = lab.add_ns("pub");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, "198.18.0.1/24");
    lab.connect_to_wan(&job, "198.18.0.2/24");
    lab.connect_to_wan(&dev, "198.18.0.3/24");
    lab.connect_to_wan(&gw, "198.18.0.4/24");
    lab.connect_to_wan(&usr, "198.18.0.5/24");
    lab.connect_to_wan(&public, &format!("{PUBLIC_RESOLVER}/24"));
    lab.bridge(&vpc, "br1", "198.19.0.10/24");
    vpc.ip(["addr", "add", &format!("{VPC_RESOLVER}/24"), "dev", "br1"]);
    lab.connect_to_bridge(&gw, "198.19.0.3/24", &vpc, "br1");

    // The resolvers: a "public" one on the underlay (what the hosts use
    // before Tern) and the VPC's, which alone knows the private zone.
    let _public_dns = dnsmasq(
        &public,
        &dir,
        PUBLIC_RESOLVER,
        &["--address=/www.example.test/198.18.0.80".into()],
        "dnsmasq-public",
    );
    let _vpc_dns = dnsmasq(
        &vpc,
        &dir,
        VPC_RESOLVER,
        &[
            format!("--host-record=api.internal,{SERVER}"),
            format!("--host-record=db.internal,{SERVER}"),
            format!("--txt-record=big.internal,\"{BIG_TXT_PART}\",\"{BIG_TXT_PART}\",\"{BIG_TXT_PART}\""),
        ],
        "dnsmasq-vpc",
    );
    let original = format!("nameserver {PUBLIC_RESOLVER}\nsearch corp.test\noptions ndots:1\n");
    for ns in [&job, &dev, &usr] {
        fs::write(ns.resolv_conf(), &original).unwrap_or_else(|e| panic!("resolv.conf: {e}"));
    }
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    fs::write(www.join("index.html"), "hello from the vpc\n").unwrap_or_else(|e| panic!("{e}"));
    let mut http = vpc.command("python3");
    http.args(["-m", "http.server", "--bind", SERVER, "8080", "--directory"])
        .arg(&www);
    let _http = vpc.spawn_command(http, "http");

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
    sign(&dir, "ca", "us-1", "100.64.0.22/10", &["--groups", "ci"]);
    sign(
        &dir,
        "ca",
        "gw-1",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24", "--dns-zones", "internal"],
    );
    sign(
        &dir,
        "ca",
        "liar",
        "100.64.0.40/10",
        &["--subnets", "198.19.0.0/24"],
    );

    let _lh = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    let gw_proc = start_node(
        &gw,
        &write_file(&dir, "gw-1.toml", &gateway_config("gw-1")),
        "node-gw-1",
    );
    let ci_config = write_file(&dir, "ci-1.toml", &client_config("ci-1"));
    let ci = start_node(&job, &ci_config, "node-ci-1");
    let _dev = start_node(
        &dev,
        &write_file(&dir, "dev-1.toml", &client_config("dev-1")),
        "node-dev-1",
    );
    let us_config = format!(
        "{}[tun]\nmode = \"userspace\"\n[proxy]\nsocks5 = \"127.0.0.1:1080\"\nhttp = \"127.0.0.1:3128\"\n[dns]\nlisten = [\"127.0.0.1:5353\"]\n",
        node_config_text("us-1", "ca.crt").replace("[tun]\nname = \"tern0\"\nmtu = 1420\n", "")
    );
    let _us = start_node(
        &usr,
        &write_file(&dir, "us-1.toml", &us_config),
        "node-us-1",
    );

    // A gateway whose certificate lacks the zone refuses to start.
    let liar = start_node(
        &lab.add_ns("liar"),
        &write_file(&dir, "liar.toml", &gateway_config("liar")),
        "node-liar",
    );
    wait_until(
        "the gateway without the zone exits",
        Duration::from_secs(10),
        || !liar.is_running(),
    );
    assert!(
        liar.log()
            .contains("zone \"internal\" is not carried by this node's certificate"),
        "{}",
        liar.log()
    );

    // The node points the namespace's resolver at itself, keeping the
    // original inside the file.
    wait_until(
        "ci-1 rewrote its resolv.conf",
        Duration::from_secs(10),
        || {
            fs::read_to_string(job.resolv_conf())
                .is_ok_and(|t| t.contains("nameserver 100.64.0.20"))
        },
    );
    let written = fs::read_to_string(job.resolv_conf()).unwrap_or_default();
    assert!(
        written.contains("# tern-original: nameserver 198.18.0.53"),
        "{written}"
    );
    assert!(
        written.contains("search corp.test") && written.contains("options ndots:1"),
        "{written}"
    );

    // 1. A private name, through the gateway, once ci-1 learned the zone.
    wait_until(
        "ci-1 resolves api.internal",
        Duration::from_secs(20),
        || dig(&job, &["+short", "api.internal"]).trim() == SERVER,
    );
    let out = job.exec("getent", ["hosts", "db.internal"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(SERVER),
        "getent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = job.run(
        "curl",
        // The web server in the vpc may still be starting.
        [
            "-sS",
            "--max-time",
            "10",
            "--retry",
            "5",
            "--retry-connrefused",
            "http://api.internal:8080/",
        ],
    );
    assert_eq!(page, "hello from the vpc\n");
    let answer = resolve_json(&dir, "ci-1", "api.internal");
    assert_eq!(answer["records"][0]["data"], SERVER, "{answer}");
    assert_eq!(answer["source"], "gateway gw-1 (zone internal)", "{answer}");

    // 2. A node name, from a certificate; the system's ping uses it.
    assert_eq!(dig(&job, &["+short", "gw-1.tern"]).trim(), "100.64.0.30");
    assert!(job
        .exec("ping", ["-c1", "-W3", "gw-1.tern"])
        .status
        .success());
    assert!(dig(&job, &["nobody.tern"]).contains("status: NXDOMAIN"));
    assert!(dig(&job, &["gw-1.tern", "AAAA"]).contains("status: NOERROR"));

    // 3. Any other name goes to the original resolver, unchanged.
    assert_eq!(
        dig(&job, &["+short", "www.example.test"]).trim(),
        "198.18.0.80"
    );

    // 4. An answer over 512 bytes: truncated over plain UDP, whole over TCP
    //    (dig retries by itself), through the mesh in parts.
    let udp = dig(&job, &["+noedns", "+ignore", "big.internal", "TXT"]);
    assert!(udp.contains(" tc"), "truncated over UDP: {udp}");
    let whole = dig(&job, &["+noedns", "+short", "big.internal", "TXT"]);
    assert_eq!(whole.matches(BIG_TXT_PART).count(), 3, "{whole}");

    // 5. A caller the gateway's firewall does not let into its subnets is
    //    refused, and counted.
    wait_until("dev-1 learned the zone", Duration::from_secs(20), || {
        status(&dir, "dev-1")["dns"]["zones"]["internal"].is_array()
    });
    assert!(dig(&dev, &["api.internal"]).contains("status: REFUSED"));
    assert!(status(&dir, "gw-1")["dns"]["counters"]["refused_groups"].as_u64() >= Some(1));

    // 6. Garbage at the DNS port: no crash, counted, and names still resolve.
    let burst = "import os,socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(3000):\n  s.sendto(os.urandom(12+i%300),('100.64.0.20',53))\n";
    job.run("python3", ["-c", burst]);
    assert_eq!(dig(&job, &["+short", "api.internal"]).trim(), SERVER);
    assert!(ci.is_running());
    assert!(status(&dir, "ci-1")["dns"]["counters"]["malformed"].as_u64() >= Some(1));

    // 7. Userspace: SOCKS5 with remote names, HTTP CONNECT, and a forward
    //    to NAME:PORT, resolved through the mesh.
    wait_until(
        "us-1 resolves through SOCKS5",
        Duration::from_secs(20),
        || {
            usr.exec(
                "curl",
                [
                    "-sS",
                    "--max-time",
                    "5",
                    "--socks5-hostname",
                    "127.0.0.1:1080",
                    "http://api.internal:8080/",
                ],
            )
            .status
            .success()
        },
    );
    let page = usr.run(
        "curl",
        [
            "-sS",
            "--max-time",
            "10",
            "-p",
            "-x",
            "http://127.0.0.1:3128",
            "http://api.internal:8080/",
        ],
    );
    assert_eq!(page, "hello from the vpc\n");
    let mut forward = usr.command(tern_netns_tests::workspace_bin("tern"));
    forward
        .args(["forward", "127.0.0.1:18080=api.internal:8080", "--socket"])
        .arg(dir.join("us-1.sock"));
    let forward = usr.spawn_command(forward, "forward");
    forward.wait_for_log("forwarding until Ctrl-C", Duration::from_secs(10));
    let page = usr.run(
        "curl",
        ["-sS", "--max-time", "10", "http://127.0.0.1:18080/"],
    );
    assert_eq!(page, "hello from the vpc\n");
    drop(forward);
    // [dns] listen: a userspace node answers DNS on loopback too.
    assert_eq!(
        dig(
            &usr,
            &["@127.0.0.1", "-p", "5353", "+short", "api.internal"]
        )
        .trim(),
        SERVER
    );
    assert_eq!(
        dig(&usr, &["@127.0.0.1", "-p", "5353", "+short", "gw-1.tern"]).trim(),
        "100.64.0.30"
    );
    // ... and leaves the namespace's resolver alone.
    assert_eq!(
        fs::read_to_string(usr.resolv_conf()).unwrap_or_default(),
        original
    );

    // 8. Stopped, the node puts the resolver back as it was.
    ci.terminate_and_wait(Duration::from_secs(10));
    assert_eq!(
        fs::read_to_string(job.resolv_conf()).unwrap_or_default(),
        original
    );

    // 9. Killed, it cannot; the next start does, then points it at itself again.
    let ci = start_node(&job, &ci_config, "node-ci-1-again");
    wait_until(
        "ci-1 rewrote resolv.conf again",
        Duration::from_secs(10),
        || {
            fs::read_to_string(job.resolv_conf())
                .is_ok_and(|t| t.contains("nameserver 100.64.0.20"))
        },
    );
    ci.kill_hard();
    assert!(fs::read_to_string(job.resolv_conf())
        .unwrap_or_default()
        .contains("nameserver 100.64.0.20"));
    // This time in the background, ready once a private name answers.
    let tern = tern_netns_tests::workspace_bin("tern");
    let log = dir.join("ci-1-third.log");
    let up = job.exec(
        &tern.to_string_lossy(),
        [
            "up",
            "--config",
            &ci_config.to_string_lossy(),
            "--wait-for",
            "api.internal:8080",
            "--log-file",
            &log.to_string_lossy(),
        ],
    );
    assert!(
        up.status.success(),
        "tern up --wait-for api.internal:8080: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("a previous run left the resolver configuration changed; put back"));
    assert_eq!(dig(&job, &["+short", "api.internal"]).trim(), SERVER);
    let down = job.exec(
        &tern.to_string_lossy(),
        ["down", "--config", &ci_config.to_string_lossy()],
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    wait_until(
        "ci-1 put the resolver back",
        Duration::from_secs(10),
        || fs::read_to_string(job.resolv_conf()).unwrap_or_default() == original,
    );
    drop(gw_proc);
}
