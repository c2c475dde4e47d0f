//! An IPv6 underlay on real kernels: a lighthouse and two nodes whose only
//! addresses are in the documentation prefix 2001:db8::/32 (no IPv4 on
//! the wire at all), listening dual-stack on `[::]:4242`, with the
//! lighthouse named by an IPv6 literal (a) or a host name whose IPv6
//! address is preferred (b). The nodes meet over IPv6 and carry
//! 20 MB between them, hash-checked (real curl and python's http.server on
//! the overlay), and a third enrolls with a token over IPv6. Needs root.

use std::fs;
use std::time::Duration;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, workspace_bin, Lab};

const LH_V6: &str = "2001:db8::1";
const B_OVERLAY: &str = "100.64.0.6";

/// A node's config for the IPv6 lab: dual-stack listen, the lighthouse by
/// its IPv6 literal, every peer let in.
fn v6_node_config(name: &str) -> String {
    node_config_text(name, "ca.crt")
        .replace("addr = \"0.0.0.0:4242\"", "addr = \"[::]:4242\"")
        .replace(
            &format!("endpoint = \"{LH_UNDERLAY}:4242\""),
            &format!("endpoint = \"[{LH_V6}]:4242\""),
        )
        + "[dns]\nconfigure_system = false\n[[firewall.inbound]]\nproto = \"any\"\n"
}

#[test]
fn nodes_on_an_ipv6_only_underlay_meet_and_carry_twenty_megabytes() {
    let test = "ipv6_underlay";
    if !require_root(test) || !require_tools(test, &["curl", "python3"]) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("v6");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let a = lab.add_ns("a");
    let b = lab.add_ns("b");
    let c = lab.add_ns("c");
    lab.connect_to_wan(&lh, &format!("{LH_V6}/64"));
    lab.connect_to_wan(&a, "2001:db8::2/64");
    lab.connect_to_wan(&b, "2001:db8::3/64");
    lab.connect_to_wan(&c, "2001:db8::4/64");
    for ns in [&lh, &a, &b, &c] {
        let v4 = ns.ip(["-4", "addr", "show", "scope", "global"]);
        assert!(v4.trim().is_empty(), "no IPv4 underlay: {v4}");
    }

    make_ca_and_lighthouse(&dir);
    sign(&dir, "ca", "a", "100.64.0.5/10", &[]);
    sign(&dir, "ca", "b", "100.64.0.6/10", &[]);
    sign_issuer(&dir, "ca", "lh-issuer", "100.64.100.0/24", "ci");
    let lh_config = write_lighthouse_config(&dir);
    let text = fs::read_to_string(&lh_config).unwrap_or_default();
    fs::write(
        &lh_config,
        text.replace("addr = \"0.0.0.0:4242\"", "addr = \"[::]:4242\"")
            + "[enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\nstore = \"lh.db\"\n",
    )
    .unwrap_or_else(|e| panic!("write lighthouse config: {e}"));
    let _lh = start_lighthouse(&lh, &lh_config);
    let _a = start_node(
        &a,
        &write_file(&dir, "a.toml", &v6_node_config("a")),
        "node-a",
    );
    // b knows the lighthouse by name (its /etc/hosts), with IPv4 too.
    b.write_hosts(&format!(
        "{LH_V6} lighthouse.lab.test\n198.18.0.99 lighthouse.lab.test\n"
    ));
    let b_config = v6_node_config("b").replace(
        &format!("endpoint = \"[{LH_V6}]:4242\""),
        "endpoint = \"lighthouse.lab.test:4242\"",
    );
    let b_node = start_node(&b, &write_file(&dir, "b.toml", &b_config), "node-b");

    wait_until("a pings b over IPv6", Duration::from_secs(15), || {
        pings(&a, B_OVERLAY)
    });
    // 20 MB served on b's overlay address (there once b's TUN device is).
    let bytes = b.exec("head", ["-c", "20000000", "/dev/urandom"]).stdout;
    let _http = web_server(&b, &dir, B_OVERLAY, &[("blob.bin", &bytes)]);
    let want = sha256_file(&dir.join("www/blob.bin"));
    let url = format!("http://{B_OVERLAY}:8080/");
    wait_until("b's web server answers", Duration::from_secs(10), || {
        a.exec("curl", ["-sS", "-o", "/dev/null", "--max-time", "2", &url])
            .status
            .success()
    });
    let got = dir.join("got.bin");
    let out = a.exec(
        "curl",
        [
            "-sS",
            "-f",
            "--max-time",
            "60",
            "-o",
            &got.to_string_lossy(),
            &format!("http://{B_OVERLAY}:8080/blob.bin"),
        ],
    );
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&got), want, "20 MB arrived whole");

    // The path is direct, to b's IPv6 address; the lighthouse saw both
    // nodes at theirs.
    let peers = status(&dir, "a")["peers"].clone();
    let to_b = peers
        .as_array()
        .and_then(|p| p.iter().find(|p| p["overlay_ip"] == B_OVERLAY))
        .unwrap_or_else(|| panic!("a has no peer b: {peers}"));
    assert_eq!(to_b["path"], "direct", "{to_b}");
    assert_eq!(to_b["endpoint"], "[2001:db8::3]:4242", "{to_b}");
    assert!(
        b_node.log().contains(&format!(
            "lighthouse resolved lighthouse=lighthouse.lab.test endpoint=[{LH_V6}]:4242"
        )),
        "b resolved the lighthouse's name to its IPv6 address"
    );
    let nodes = lighthouse_status(&dir)["nodes"].to_string();
    assert!(
        nodes.contains("2001:db8::2") && nodes.contains("2001:db8::3"),
        "{nodes}"
    );

    // c has only the CA: it enrolls with a one-time token, over IPv6.
    let token = create_token(&lh_config);
    let c_config = v6_node_config("c")
        .replace("cert = \"c.crt\"\n", "")
        .replace("key = \"c.key\"\n", "");
    let mut cmd = c.command(workspace_bin("tern"));
    cmd.args(["up", "--config"])
        .arg(write_file(&dir, "c.toml", &c_config))
        .args(["--enroll-token", &token]);
    let _c = c.spawn_command(cmd, "node-c");
    wait_until("c enrolls and pings a", Duration::from_secs(20), || {
        pings(&c, "100.64.0.5")
    });
}
