//! Userspace mode meeting TUN mode on real kernels: a TUN-mode CI node
//! reaching a private network through a userspace gateway (no TUN device,
//! no ip_forward, no NAT rules), and a userspace client reaching it through
//! a TUN-mode gateway. Real curl and python's http.server. Needs root (for
//! the namespaces and the TUN-mode nodes).

use std::fs;
use std::time::Duration;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, Lab, Ns, Proc};

const SERVER: &str = "198.19.0.10";

fn http_server(ns: &Ns, dir: &std::path::Path) -> Proc {
    let mut cmd = ns.command("python3");
    cmd.args(["-m", "http.server", "--bind", SERVER, "8080", "--directory"])
        .arg(dir);
    let server = ns.spawn_command(cmd, "http");
    // Python takes a moment to listen; a test asking sooner sees a refusal.
    let url = format!("http://{SERVER}:8080/");
    tern_netns_tests::wait_until("the http server listens", Duration::from_secs(10), || {
        ns.exec("curl", ["-s", "-o", "/dev/null", "--max-time", "1", &url])
            .status
            .success()
    });
    server
}

fn gateway(name: &str, userspace: bool) -> String {
    format!(
        "{}[gateway]\nsubnets = [\"198.19.0.0/24\"]\nmasquerade = true\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.0/24\"\n",
        node_config_text(name, "ca.crt").replace(
            "[tun]\n",
            if userspace { "[tun]\nmode = \"userspace\"\n" } else { "[tun]\n" }
        )
    )
}

/// A lighthouse, a CI node, two gateways in front of the vpc
/// (198.19.0.0/24): `gw-user` in userspace mode, `gw-tun` in TUN mode.
/// Only one of them runs at a time (`start_gateway`).
struct World {
    _lab: Lab,
    dir: std::path::PathBuf,
    ci: Ns,
    gw_user: Ns,
    gw_tun: Ns,
    want: String,
    _keep: Vec<Proc>,
}

fn world(prefix: &str) -> World {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let ci = lab.add_ns("ci");
    let gw_user = lab.add_ns("gwu");
    let gw_tun = lab.add_ns("gwt");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&ci, "198.18.0.2/24");
    lab.connect_to_wan(&gw_user, "198.18.0.4/24");
    lab.connect_to_wan(&gw_tun, "198.18.0.5/24");
    lab.bridge(&vpc, "br1", "198.19.0.10/24");
    lab.connect_to_bridge(&gw_user, "198.19.0.2/24", &vpc, "br1");
    lab.connect_to_bridge(&gw_tun, "198.19.0.3/24", &vpc, "br1");
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    let bytes = vpc.exec("head", ["-c", "20971520", "/dev/urandom"]).stdout;
    fs::write(www.join("blob.bin"), &bytes).unwrap_or_else(|e| panic!("write blob: {e}"));
    let want = sha256_file(&www.join("blob.bin"));
    let http = http_server(&vpc, &www);
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci-1", "100.64.0.20/10", &["--groups", "ci"]);
    for (name, ip) in [("gw-user", "100.64.0.30/10"), ("gw-tun", "100.64.0.31/10")] {
        sign(&dir, "ca", name, ip, &["--subnets", "198.19.0.0/24"]);
    }
    let lh_proc = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    World {
        _lab: lab,
        dir,
        ci,
        gw_user,
        gw_tun,
        want,
        _keep: vec![http, lh_proc],
    }
}

fn curl_blob(ns: &Ns, url: &str, out: &std::path::Path) -> bool {
    ns.exec(
        "curl",
        ["-s", "--max-time", "30", "-o", &out.to_string_lossy(), url],
    )
    .status
    .success()
}

#[test]
fn a_tun_client_reaches_the_vpc_through_a_userspace_gateway() {
    let test = "userspace_gateway_tun_client";
    if !require_root(test) || !require_tools(test, &["curl", "python3"]) {
        return;
    }
    let _serial = serial();
    let w = world("usgw");
    let gw = start_node(
        &w.gw_user,
        &write_file(&w.dir, "gw-user.toml", &gateway("gw-user", true)),
        "node-gw-user",
    );
    gw.wait_for_log("userspace mode", Duration::from_secs(10));
    // The userspace gateway made no TUN device and changed nothing in its
    // namespace's kernel: no forwarding, no NAT rule.
    assert!(!w.gw_user.ip(["link"]).contains("tern0"), "no TUN device");
    let forwarding = w
        .gw_user
        .exec("sysctl", ["-n", "net.ipv4.ip_forward"])
        .stdout;
    assert_eq!(String::from_utf8_lossy(&forwarding).trim(), "0");
    // A TUN client names the subnet it reaches ([[routes]]), as the README
    // says: learned routes alone get no kernel route.
    let ci_config = format!(
        "{}[[routes]]\nsubnet = \"198.19.0.0/24\"\n",
        node_config_text("ci-1", "ca.crt")
    );
    let _ci = start_node(
        &w.ci,
        &write_file(&w.dir, "ci-1.toml", &ci_config),
        "node-ci",
    );
    wait_until(
        "the CI node routes the subnet into its TUN device",
        Duration::from_secs(20),
        || w.ci.ip(["route"]).contains("198.19.0.0/24 dev tern0"),
    );
    let out = w.dir.join("via-userspace-gw.bin");
    wait_until(
        "the vpc answers through the userspace gateway",
        Duration::from_secs(20),
        || curl_blob(&w.ci, &format!("http://{SERVER}:8080/blob.bin"), &out),
    );
    assert_eq!(sha256_file(&out), w.want, "20 MB intact");
    // The gateway's firewall still decides: port 9090 is not allowed.
    let denied = w.ci.exec(
        "curl",
        ["-s", "--max-time", "3", &format!("http://{SERVER}:9090/")],
    );
    assert!(!denied.status.success());
}

#[test]
fn a_userspace_client_reaches_the_vpc_through_a_tun_gateway() {
    let test = "userspace_client_tun_gateway";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables"]) {
        return;
    }
    let _serial = serial();
    let w = world("uscl");
    let _gw = start_node(
        &w.gw_tun,
        &write_file(&w.dir, "gw-tun.toml", &gateway("gw-tun", false)),
        "node-gw-tun",
    );
    let client = format!(
        "{}[[firewall.inbound]]\nproto = \"any\"\n[[forwards]]\nlisten = \"127.0.0.1:18080\"\ntarget = \"{SERVER}:8080\"\n",
        node_config_text("ci-1", "ca.crt").replace("[tun]\n", "[tun]\nmode = \"userspace\"\n")
    );
    let ci = start_node(&w.ci, &write_file(&w.dir, "ci-1.toml", &client), "node-ci");
    ci.wait_for_log("forwarding", Duration::from_secs(10));
    assert!(
        !w.ci.ip(["link"]).contains("tern0"),
        "no TUN device on the client"
    );
    let out = w.dir.join("via-forward.bin");
    wait_until(
        "the vpc answers through the forward",
        Duration::from_secs(20),
        || curl_blob(&w.ci, "http://127.0.0.1:18080/blob.bin", &out),
    );
    assert_eq!(sha256_file(&out), w.want, "20 MB intact");
}
