//! CI enrollment on real kernels: a CI node whose config names only the CA
//! enrolls with a one-time token, reaches a server in a private network
//! through a TUN-mode gateway (real curl and python's http.server), is
//! revoked, and leaves; a spent token is refused; two nodes racing with one
//! single-use token get one certificate. Needs root.

use std::time::{Duration, Instant};

use tern_netns_tests::tern::*;
use tern_netns_tests::{
    require_root, require_tools, serial, wait_until, workspace_bin, Lab, Ns, Proc,
};

const SERVER: &str = "198.19.0.10";

struct World {
    lab: Lab,
    dir: std::path::PathBuf,
    ci: Ns,
    ci2: Ns,
    gw: Ns,
    want: String,
    _keep: Vec<Proc>,
}

/// A lighthouse with an issuer, a TUN-mode gateway with masquerade in front
/// of the vpc (198.19.0.0/24) that lets group ci reach port 8080, and two
/// empty CI hosts.
fn world() -> World {
    let GatewayLab {
        lab,
        dir,
        lh,
        ci,
        gw,
        vpc,
    } = gateway_lab("enrl", SERVER);
    let ci2 = lab.add_ns("ci2");
    lab.connect_to_wan(&ci2, "198.18.0.3/24");
    let bytes = vpc.exec("head", ["-c", "5242880", "/dev/urandom"]).stdout;
    let http = web_server(&vpc, &dir, SERVER, &[("blob.bin", &bytes), ("hi", b"hi\n")]);
    let want = sha256_file(&dir.join("www/blob.bin"));

    make_ca_and_lighthouse(&dir);
    sign(
        &dir,
        "ca",
        "gw",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign_issuer(&dir, "ca", "lh-issuer", "100.64.100.0/24", "ci,deploy");
    let lh_proc = start_lighthouse_with(
        &lh,
        &dir,
        "[enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\nstore = \"lh.db\"\n",
    );
    let gateway = gateway_8080_config(&node_config_text("gw", "ca.crt"));
    let gw_proc = start_node(&gw, &write_file(&dir, "gw.toml", &gateway), "node-gw");
    for name in ["job", "job2"] {
        // Only the CA: the key is made in memory, the certificate enrolled.
        let text = node_config_text(name, "ca.crt")
            .replace(&format!("cert = \"{name}.crt\"\n"), "")
            .replace(&format!("key = \"{name}.key\"\n"), "")
            + "[[routes]]\nsubnet = \"198.19.0.0/24\"\n";
        write_file(&dir, &format!("{name}.toml"), &text);
    }
    wait_registered(&dir, "gw", Duration::from_secs(20));
    World {
        lab,
        dir,
        ci,
        ci2,
        gw,
        want,
        _keep: vec![http, lh_proc, gw_proc],
    }
}

impl World {
    fn token(&self) -> String {
        create_token(&self.dir.join("lighthouse.toml"))
    }

    fn enroll(&self, ns: &Ns, name: &str, token: &str) -> Proc {
        let mut cmd = ns.command(workspace_bin("tern"));
        cmd.args(["up", "--config"])
            .arg(self.dir.join(format!("{name}.toml")))
            .args(["--enroll-token", token]);
        ns.spawn_command(cmd, &format!("node-{name}"))
    }

    fn curl(&self, ns: &Ns, path: &str, out: &std::path::Path, max_time: &str) -> bool {
        ns.exec(
            "curl",
            [
                "-s",
                "--fail",
                "--max-time",
                max_time,
                "-o",
                &out.to_string_lossy(),
                &format!("http://{SERVER}:8080/{path}"),
            ],
        )
        .status
        .success()
    }

    fn gateway_peers(&self) -> Vec<String> {
        status(&self.dir, "gw")["peers"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn down(&self, ns: &Ns, name: &str) -> bool {
        ns.exec_timeout(
            &workspace_bin("tern").to_string_lossy(),
            [
                "down".to_string(),
                "--socket".to_string(),
                self.dir
                    .join(format!("{name}.sock"))
                    .to_string_lossy()
                    .into_owned(),
            ],
            Duration::from_secs(15),
        )
        .is_some_and(|o| o.status.success())
    }
}

#[test]
fn a_ci_node_enrolls_reaches_the_vpc_is_revoked_and_its_token_cannot_be_reused() {
    let test = "enroll_token_netns";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables"]) {
        return;
    }
    let _serial = serial();
    let w = world();
    let token = w.token();
    let started = Instant::now();
    let job = w.enroll(&w.ci, "job", &token);
    let first = w.dir.join("hi.out");
    wait_until(
        "the enrolled job reaches the vpc",
        Duration::from_secs(20),
        || w.curl(&w.ci, "hi", &first, "2"),
    );
    eprintln!(
        "tern up --enroll-token → first byte from the vpc through the gateway: {:?}",
        started.elapsed()
    );
    let blob = w.dir.join("blob.out");
    assert!(w.curl(&w.ci, "blob.bin", &blob, "30"));
    assert_eq!(sha256_file(&blob), w.want, "5 MB intact");
    let name = status(&w.dir, "job")["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(name.starts_with("ci-"), "{name}");
    let listed = lighthouse_status(&w.dir)["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == name.as_str()).cloned())
        .unwrap_or_default();
    assert_eq!(listed["ephemeral"], true, "{listed}");
    // No key on disk: the job's directory holds only what the test wrote.
    assert!(!w.dir.join(format!("{name}.key")).exists());

    // The spent token: the second host is refused, exit 77, saying why.
    let again = w
        .ci2
        .exec_timeout(
            &workspace_bin("tern").to_string_lossy(),
            [
                "up".to_string(),
                "--config".to_string(),
                w.dir.join("job2.toml").to_string_lossy().into_owned(),
                "--enroll-token".to_string(),
                token.clone(),
            ],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("tern up with a spent token did not finish"));
    assert_eq!(
        again.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("used up"));

    // Revoked: the gateway ends its session at once and the job is out.
    assert!(w.gateway_peers().contains(&name));
    let revoked_at = Instant::now();
    let out = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["revoke", "--config"])
        .arg(w.dir.join("lighthouse.toml"))
        .arg(&name)
        .output()
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the gateway drops the revoked job",
        Duration::from_secs(5),
        || !w.gateway_peers().contains(&name),
    );
    eprintln!(
        "revoked → the gateway's session gone in {:?}",
        revoked_at.elapsed()
    );
    assert!(
        !w.curl(&w.ci, "hi", &first, "3"),
        "the revoked job still reaches the vpc"
    );

    // The job was told, first: it stops by itself with its own exit code,
    // its TUN device gone with it.
    wait_until("the revoked job stops", Duration::from_secs(10), || {
        !job.is_running()
    });
    assert_eq!(
        job.try_wait().and_then(|s| s.code()),
        Some(76),
        "{}",
        job.log()
    );
    assert!(
        job.log().contains("this node's certificate is revoked"),
        "{}",
        job.log()
    );
    assert!(
        !w.ci.ip(["link"]).contains("tern0"),
        "the TUN device is gone"
    );
    let _ = &w.gw;
    let _ = &w.lab;
}

#[test]
fn two_ci_nodes_racing_with_one_single_use_token_get_one_certificate() {
    let test = "enroll_race_netns";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables"]) {
        return;
    }
    let _serial = serial();
    let w = world();
    let token = w.token();
    let a = w.enroll(&w.ci, "job", &token);
    let b = w.enroll(&w.ci2, "job2", &token);
    wait_until("one of the two is refused", Duration::from_secs(20), || {
        !a.is_running() || !b.is_running()
    });
    let (loser, winner, winner_ns, winner_name) = if a.is_running() {
        (&b, &a, &w.ci, "job")
    } else {
        (&a, &b, &w.ci2, "job2")
    };
    assert_eq!(
        loser.try_wait().and_then(|s| s.code()),
        Some(77),
        "{}",
        loser.log()
    );
    assert!(loser.log().contains("used up"), "{}", loser.log());
    winner.wait_for_log("enrolled", Duration::from_secs(10));
    let out = w.dir.join("race.out");
    wait_until(
        "the winner reaches the vpc",
        Duration::from_secs(20),
        || w.curl(winner_ns, "hi", &out, "2"),
    );
    // It leaves, and the lighthouse forgets it at once.
    assert!(w.down(winner_ns, winner_name));
    wait_until("the winner exits", Duration::from_secs(10), || {
        !winner.is_running()
    });
    assert_eq!(winner.try_wait().and_then(|s| s.code()), Some(0));
    wait_until("the lighthouse forgets it", Duration::from_secs(3), || {
        lighthouse_status(&w.dir)["nodes"]
            .as_array()
            .is_some_and(|n| {
                n.iter()
                    .all(|n| !n["name"].as_str().unwrap_or("").starts_with("ci-"))
            })
    });
}
