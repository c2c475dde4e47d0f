//! The core mesh on real kernels: a lighthouse and nodes, each in its own
//! network namespace on a 198.18.0.0/24 "internet", real TUN devices, real
//! ping, curl and python's http.server across the overlay.
//! Needs root; skipped elsewhere (fails instead when `CI=true`).

use std::fs;
use std::time::Duration;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, workspace_bin, Lab};

/// The whole life of a small mesh: meet, ping, move 50 MB, refuse a stranger
/// and a spoofer, lose the lighthouse, get it back.
#[test]
fn lighthouse_and_two_nodes_ping_transfer_and_survive_the_lighthouse() {
    let test = "lighthouse_and_two_nodes";
    if !require_root(test) || !require_tools(test, &["ping", "curl", "python3"]) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("mesh");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let a = lab.add_ns("a");
    let b = lab.add_ns("b");
    lab.connect_to_wan(&lh, "198.18.0.1/24");
    lab.connect_to_wan(&a, "198.18.0.2/24");
    lab.connect_to_wan(&b, "198.18.0.3/24");

    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "a", "100.64.0.5/10", &["--groups", "ci"]);
    sign(&dir, "ca", "b", "100.64.0.6/10", &[]);
    let lh_config = write_lighthouse_config(&dir);
    let mut lighthouse = start_lighthouse(&lh, &lh_config);
    let _a = start_node(&a, &write_node_config(&dir, "a", "ca.crt"), "node-a");
    // b reads and writes its TUN device one packet at a time, a with
    // offloads: the transfers below cross both data paths.
    let b_config = write_node_config(&dir, "b", "ca.crt");
    set_tun_offload(&b_config, false);
    let _b = start_node(&b, &b_config, "node-b");

    // 1. Both register; a reaches b's overlay address by ping.
    wait_until(
        "a and b register with the lighthouse",
        Duration::from_secs(15),
        || {
            dir.join("a.sock").exists()
                && dir.join("b.sock").exists()
                && status(&dir, "a")["lighthouses"][0]["registered"] == true
                && status(&dir, "b")["lighthouses"][0]["registered"] == true
        },
    );
    wait_until(
        "a pings b over the overlay",
        Duration::from_secs(15),
        || pings(&a, "100.64.0.6"),
    );
    assert!(pings(&b, "100.64.0.5"), "b pings a back");
    let sa = status(&dir, "a");
    let peer_b = sa["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "b"))
        .unwrap_or_else(|| panic!("b missing from a's peers: {sa}"));
    assert_eq!(peer_b["endpoint"], "198.18.0.3:4242");
    assert!(peer_b["last_handshake_secs"].is_number());

    // 2. 50 MB over TCP, served by python's http.server, fetched by curl, hashed.
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    let blob = www.join("blob.bin");
    let out = a.exec("head", ["-c", "52428800", "/dev/urandom"]);
    fs::write(&blob, &out.stdout).unwrap_or_else(|e| panic!("write blob: {e}"));
    assert_eq!(out.stdout.len(), 52_428_800);
    let mut server = b.command("python3");
    server
        .args([
            "-m",
            "http.server",
            "--bind",
            "100.64.0.6",
            "8080",
            "--directory",
        ])
        .arg(&www);
    let _server = b.spawn_command(server, "http-server");
    wait_until(
        "http server on b's overlay address",
        Duration::from_secs(10),
        || {
            a.exec(
                "curl",
                [
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "2",
                    "http://100.64.0.6:8080/",
                ],
            )
            .status
            .success()
        },
    );
    let got = dir.join("got.bin");
    let fetched = a.exec(
        "curl",
        [
            "-sS",
            "--max-time",
            "120",
            "-o",
            &got.to_string_lossy(),
            "http://100.64.0.6:8080/blob.bin",
        ],
    );
    assert!(
        fetched.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert_eq!(
        sha256_file(&got),
        sha256_file(&blob),
        "50 MB arrived intact"
    );
    fs::remove_file(&got).ok();

    // 3. Spoofed inner source: a's kernel sends from an address a's cert does
    //    not carry; b drops it and counts it.
    a.ip(["addr", "add", "100.64.0.99/32", "dev", "tern0"]);
    let spoofed_before = counter(&status(&dir, "b"), "mesh_counters", "spoofed_source_drops");
    let spoof = a.exec(
        "ping",
        ["-c3", "-i0.2", "-W1", "-I", "100.64.0.99", "100.64.0.6"],
    );
    assert!(
        !spoof.status.success(),
        "b must not answer a spoofed source"
    );
    wait_until(
        "b counts the spoofed packets",
        Duration::from_secs(5),
        || {
            counter(&status(&dir, "b"), "mesh_counters", "spoofed_source_drops")
                >= spoofed_before + 3
        },
    );
    a.ip(["addr", "del", "100.64.0.99/32", "dev", "tern0"]);

    // 4. A node with a certificate from another CA reaches no one. It trusts
    //    our CA too, so only our side's checks keep it out; besides the real
    //    lighthouse it knocks directly on a's underlay address.
    make_ca(&dir, "rogue-ca");
    sign(&dir, "rogue-ca", "rogue", "100.64.0.66/10", &[]);
    let both = fs::read_to_string(dir.join("ca.crt")).unwrap_or_default()
        + &fs::read_to_string(dir.join("rogue-ca.crt")).unwrap_or_default();
    fs::write(dir.join("both-cas.crt"), both).unwrap_or_else(|e| panic!("write both-cas: {e}"));
    let r = lab.add_ns("r");
    lab.connect_to_wan(&r, "198.18.0.66/24");
    let a_rejected_before = counter(&status(&dir, "a"), "mesh_counters", "rejected_certs");
    let rogue_config = write_node_config_with(&dir, "rogue", "both-cas.crt", &["198.18.0.2:4242"]);
    let rogue = start_node(&r, &rogue_config, "node-rogue");
    wait_until(
        "the lighthouse and a refuse the stranger's certificate",
        Duration::from_secs(10),
        || {
            lighthouse_status(&dir)["mesh_counters"]["rejected_certs"]
                .as_u64()
                .unwrap_or(0)
                > 0
                && counter(&status(&dir, "a"), "mesh_counters", "rejected_certs")
                    > a_rejected_before
        },
    );
    assert!(
        !pings(&r, "100.64.0.5"),
        "a stranger's ping must not arrive"
    );
    assert!(!pings(&r, "100.64.0.6"));
    let rs = status(&dir, "rogue");
    assert!(
        rs["lighthouses"]
            .as_array()
            .is_some_and(|l| l.iter().all(|l| l["registered"] == false)),
        "{rs}"
    );
    assert!(rs["peers"].as_array().is_some_and(|p| p.is_empty()), "{rs}");
    let lh_status = lighthouse_status(&dir);
    assert!(
        lh_status["nodes"].as_array().is_some_and(|n| n.len() == 2),
        "{lh_status}"
    );
    drop(rogue);

    // 5. The lighthouse dies: the established tunnel keeps working.
    lighthouse.kill_hard();
    assert!(pings(&a, "100.64.0.6"), "tunnel survives the lighthouse");
    let fetched = a.exec(
        "curl",
        [
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "http://100.64.0.6:8080/blob.bin",
        ],
    );
    assert!(fetched.status.success());

    // 6. It comes back: old nodes re-register by themselves, and a new pair
    //    of nodes meets through it.
    lighthouse = start_lighthouse(&lh, &lh_config);
    wait_until(
        "a and b re-register after the restart",
        Duration::from_secs(20),
        || {
            lighthouse_status(&dir)["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2)
        },
    );
    sign(&dir, "ca", "c", "100.64.0.7/10", &[]);
    sign(&dir, "ca", "d", "100.64.0.8/10", &[]);
    let c = lab.add_ns("c");
    let d = lab.add_ns("d");
    lab.connect_to_wan(&c, "198.18.0.4/24");
    lab.connect_to_wan(&d, "198.18.0.5/24");
    let _c = start_node(&c, &write_node_config(&dir, "c", "ca.crt"), "node-c");
    let _d = start_node(&d, &write_node_config(&dir, "d", "ca.crt"), "node-d");
    wait_until(
        "new node c pings new node d",
        Duration::from_secs(20),
        || pings(&c, "100.64.0.8"),
    );
    wait_until(
        "new node c pings the old node a",
        Duration::from_secs(10),
        || pings(&c, "100.64.0.5"),
    );
    assert!(lighthouse.is_running());
}

/// Certificates that expire: a node refuses to start with its own expired
/// certificate, and a peer whose certificate expires while connected is
/// disconnected and refused afterwards.
#[test]
fn expired_certificates_are_refused() {
    let test = "expired_certificates_are_refused";
    if !require_root(test) || !require_tools(test, &["ping"]) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("expiry");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let a = lab.add_ns("a");
    let s = lab.add_ns("s");
    lab.connect_to_wan(&lh, "198.18.0.1/24");
    lab.connect_to_wan(&a, "198.18.0.2/24");
    lab.connect_to_wan(&s, "198.18.0.3/24");
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "a", "100.64.0.5/10", &[]);
    sign(&dir, "ca", "short", "100.64.0.9/10", &["--duration", "12s"]);
    let _lh = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    let _a = start_node(&a, &write_node_config(&dir, "a", "ca.crt"), "node-a");
    let short_config = write_node_config(&dir, "short", "ca.crt");
    let short = start_node(&s, &short_config, "node-short");

    wait_until("short-lived node pings a", Duration::from_secs(10), || {
        pings(&s, "100.64.0.5")
    });
    wait_until(
        "a disconnects the expired peer",
        Duration::from_secs(20),
        || counter(&status(&dir, "a"), "mesh_counters", "expired_peers") >= 1,
    );
    assert!(
        !pings(&s, "100.64.0.5"),
        "an expired certificate reaches no one"
    );
    let peers = status(&dir, "a")["peers"].clone();
    assert!(
        peers
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| p["name"] != "short")),
        "{peers}"
    );
    drop(short);

    // Restarting with the expired certificate fails with a clear reason.
    let out = s.exec(
        &workspace_bin("tern").to_string_lossy(),
        ["up", "--config", &short_config.to_string_lossy()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired"), "error names the expiry: {err}");
}
