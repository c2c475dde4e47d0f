//! Who did what, on real kernels: a CI job enrolled with an OIDC ID token
//! (the test's issuer) reaches a private network through a TUN-mode
//! gateway with curl and psql (a real PostgreSQL server there), is refused
//! on ports its group may not use, and is revoked with a connection open.
//! The gateway's flow records reach the lighthouse with the job's claims,
//! byte counts that match what moved (within the packets' headers) and the
//! rules that decided; `tern policy explain` says what the gateway did for
//! each case; with the lighthouse gone and a tiny queue, records are
//! dropped and counted while every connection still gets through. Needs
//! root.

use std::time::{Duration, Instant};

use serde_json::Value;
use tern_lighthouse::store::testing::TestServer;
use tern_lighthouse_core::oidc::test_issuer::{github_like_claims, TestOidcIssuer};
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, workspace_bin, Ns};

const SERVER: &str = "198.19.0.10";
const ISSUER: &str = "https://token.actions.example.test";
const BLOB: usize = 1 << 20;

fn lighthouse_flows(dir: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["flows", "--json", "--config"])
        .arg(dir.join("lighthouse.toml"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tern-lighthouse flows: {e}"));
    assert!(
        out.status.success(),
        "tern-lighthouse flows {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// curl's exit code for a URL on the server (0 fetched, 7 refused, 28
/// timed out).
fn curl(ns: &Ns, url: &str, max_time: &str, out: &std::path::Path) -> i32 {
    ns.exec(
        "curl",
        [
            "-s",
            "--max-time",
            max_time,
            "-o",
            &out.to_string_lossy(),
            url,
        ],
    )
    .status
    .code()
    .unwrap_or(-1)
}

/// `tern policy explain` for group ci: true when it says allowed.
fn explain_allows(dir: &std::path::Path, destination: &str) -> bool {
    let out = std::process::Command::new(workspace_bin("tern"))
        .args(["policy", "explain", "--config"])
        .arg(dir.join("gw.toml"))
        .args(["--groups", "ci", destination])
        .output()
        .unwrap_or_else(|e| panic!("tern policy explain: {e}"));
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!(
            "tern policy explain {destination}: {other:?}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn a_ci_jobs_flows_through_a_gateway_reach_the_lighthouse_with_its_claims() {
    let test = "flows_netns";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables", "psql"]) {
        return;
    }
    let _serial = serial();
    let GatewayLab {
        lab,
        dir,
        lh,
        ci,
        gw,
        vpc,
    } = gateway_lab("flow", SERVER);
    let dev_ns = lab.add_ns("dev");
    lab.connect_to_wan(&dev_ns, "198.18.0.3/24");
    let blob = vec![7u8; BLOB];
    let _http = web_server(&vpc, &dir, SERVER, &[("blob.bin", &blob), ("hi", b"hi\n")]);
    let Some(pg) = TestServer::start_in(vpc.name(), SERVER) else {
        return;
    };
    let pg_port = pg
        .tcp_url("postgres")
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next().map(str::to_string))
        .unwrap_or_default();

    make_ca_and_lighthouse(&dir);
    sign(
        &dir,
        "ca",
        "gw",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign(&dir, "ca", "dev", "100.64.0.40/10", &["--groups", "ci"]);
    sign_issuer(&dir, "ca", "lh-issuer", "100.64.100.0/24", "ci,deploy");
    let signer = TestOidcIssuer::es256("flows-1").unwrap_or_else(|e| panic!("{e}"));
    let jwks = write_file(&dir, "jwks.json", &signer.jwks_json());
    let lighthouse_extra = format!(
        "[enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\nstore = \"lh.db\"\n\
         [[enroll.oidc]]\nissuer = \"{ISSUER}\"\naudience = \"tern-ci\"\njwks = \"{}\"\n\
         [[enroll.oidc.rules]]\nclaims = {{ repository = \"acme/app\" }}\ngroups = [\"ci\"]\ncert_ttl = \"15m\"\n\
         [flows]\nretain = \"1d\"\n",
        jwks.display()
    );
    let mut lh_proc = start_lighthouse_with(&lh, &dir, &lighthouse_extra);
    let gateway = format!(
        "{}[gateway]\nsubnets = [\"198.19.0.0/24\"]\nmasquerade = true\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"{SERVER}/32\"\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"{pg_port}\"\ngroups = [\"ci\"]\nlocal_cidr = \"{SERVER}/32\"\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"22\"\nlocal_cidr = \"198.19.0.0/24\"\naction = \"reject\"\n\
         [[firewall.inbound]]\nproto = \"icmp\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.0/24\"\n\
         [flows]\npath = \"gw-flows.jsonl\"\nqueue = 4\n",
        node_config_text("gw", "ca.crt")
    );
    let gw_proc = start_node(&gw, &write_file(&dir, "gw.toml", &gateway), "node-gw");
    let job_config = node_config_text("job", "ca.crt")
        .replace("cert = \"job.crt\"\n", "")
        .replace("key = \"job.key\"\n", "")
        + "[[routes]]\nsubnet = \"198.19.0.0/24\"\n";
    write_file(&dir, "job.toml", &job_config);
    let dev_config = node_config_text("dev", "ca.crt") + "[[routes]]\nsubnet = \"198.19.0.0/24\"\n";
    let dev_proc = start_node(
        &dev_ns,
        &write_file(&dir, "dev.toml", &dev_config),
        "node-dev",
    );
    wait_registered(&dir, "gw", Duration::from_secs(20));

    // The job enrolls with its ID token: repository acme/app, run 4242424242.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = github_like_claims(ISSUER, "tern-ci", "acme/app", "refs/heads/main", now);
    claims["jti"] = format!("flows-{now}").into();
    let token_file = write_file(&dir, "id-token", &signer.sign(&claims));
    let mut up = ci.command(workspace_bin("tern"));
    up.args(["up", "--config"])
        .arg(dir.join("job.toml"))
        .args([
            "--enroll-oidc",
            "--oidc-audience",
            "tern-ci",
            "--oidc-token-file",
        ])
        .arg(&token_file);
    let job = ci.spawn_command(up, "node-job");
    let out = dir.join("out");
    let url = |port: &str, path: &str| format!("http://{SERVER}:{port}/{path}");
    wait_until("the job reaches the vpc", Duration::from_secs(20), || {
        curl(&ci, &url("8080", "hi"), "2", &out) == 0
    });
    let name = status(&dir, "job")["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(name.starts_with("ci-"), "{name}");

    // What it does: a download, a query, two refused ports, a ping.
    assert_eq!(curl(&ci, &url("8080", "blob.bin"), "20", &out), 0);
    assert_eq!(
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0),
        BLOB as u64
    );
    let psql = |sql: &str| {
        ci.exec(
            "psql",
            [
                "-h", SERVER, "-p", &pg_port, "-U", "tern", "-d", "postgres", "-Atc", sql,
            ],
        )
    };
    let answer = psql("SELECT 40 + 2");
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&answer.stderr)
    );
    let started = Instant::now();
    let refused = curl(&ci, &url("22", ""), "5", &out);
    assert_eq!(
        refused, 7,
        "port 22 is refused (a TCP RST from the reject rule)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused at once"
    );
    assert_eq!(
        curl(&ci, &url("9999", ""), "2", &out),
        28,
        "no rule for 9999: dropped"
    );
    let pinged = ci.exec("ping", ["-c1", "-W2", SERVER]).status.success();
    assert!(pinged, "icmp is open to group ci");

    // The policy checker says what the gateway did, case by case.
    for (destination, did) in [
        (format!("{SERVER}:8080/tcp"), true),
        (format!("{SERVER}:{pg_port}/tcp"), true),
        (format!("{SERVER}:22/tcp"), false),
        (format!("{SERVER}:9999/tcp"), false),
        (format!("{SERVER}/icmp"), pinged),
    ] {
        assert_eq!(explain_allows(&dir, &destination), did, "{destination}");
    }

    // A query still running when the job is revoked.
    let mut long = ci.command("psql");
    long.args([
        "-h",
        SERVER,
        "-p",
        &pg_port,
        "-U",
        "tern",
        "-d",
        "postgres",
        "-c",
        "SELECT pg_sleep(30)",
    ]);
    let _long = ci.spawn_command(long, "psql-sleep");
    std::thread::sleep(Duration::from_millis(1500));
    let revoke = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["revoke", "--config"])
        .arg(dir.join("lighthouse.toml"))
        .arg(&name)
        .output()
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    wait_until("the job stops, revoked", Duration::from_secs(10), || {
        !job.is_running()
    });

    // At the lighthouse: every flow of the job, with its claims.
    let mut flows = Vec::new();
    wait_until(
        "the job's flows reach the lighthouse, its open one ended as revoked",
        Duration::from_secs(15),
        || {
            flows = lighthouse_flows(&dir, &["--name", &name]);
            flows.iter().any(|f| f["reason"] == "revoked")
                && flows.iter().any(|f| f["dst_port"] == 9999)
        },
    );
    let dump = serde_json::to_string_pretty(&flows).unwrap_or_default();
    let table = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["flows", "--config"])
        .arg(dir.join("lighthouse.toml"))
        .args(["--name", &name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    eprintln!("tern-lighthouse flows --name {name}:\n{table}");
    for f in &flows {
        assert_eq!(f["node"], "gw", "{dump}");
        assert_eq!(
            f["enrollment"]["claims"]["repository"], "acme/app",
            "{dump}"
        );
        assert_eq!(f["enrollment"]["claims"]["run_id"], "4242424242", "{dump}");
        assert_eq!(f["groups"], serde_json::json!(["ci"]), "{dump}");
    }
    let find = |port: u64, reason: &str| {
        flows
            .iter()
            .filter(|f| f["dst_port"] == port && f["reason"] == reason)
            .cloned()
            .collect::<Vec<_>>()
    };
    let download = find(8080, "closed")
        .into_iter()
        .find(|f| f["bytes_out"].as_u64().unwrap_or(0) >= BLOB as u64)
        .unwrap_or_else(|| panic!("no closed 8080 flow carried the blob: {dump}"));
    let (bytes_out, packets_out) = (
        download["bytes_out"].as_u64().unwrap_or(0),
        download["packets_out"].as_u64().unwrap_or(0),
    );
    // The body, HTTP's headers (under 400 bytes) and at most 60 bytes of
    // IP and TCP header per packet.
    assert!(
        bytes_out <= BLOB as u64 + 400 + 60 * packets_out,
        "{bytes_out} bytes in {packets_out} packets for a {BLOB}-byte body: {download}"
    );
    assert_eq!(
        (download["verdict"].as_str(), download["rule"].as_u64()),
        (Some("allow"), Some(0))
    );
    let pg_port_n: u64 = pg_port.parse().unwrap_or(0);
    let query = find(pg_port_n, "closed");
    assert!(
        !query.is_empty() && query.iter().all(|f| f["rule"] == 1),
        "{dump}"
    );
    let open = find(pg_port_n, "revoked");
    assert_eq!(open.len(), 1, "{dump}");
    let ssh = find(22, "denied");
    assert_eq!(
        (ssh.len(), ssh.first().map(|f| f["rule"].clone())),
        (1, Some(2.into())),
        "{dump}"
    );
    let other = find(9999, "denied");
    assert_eq!(other.len(), 1, "{dump}");
    assert!(
        other[0]["rule"].is_null() && other[0]["packets_in"].as_u64().unwrap_or(0) >= 1,
        "{dump}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["proto"] == "icmp" && f["verdict"] == "allow"),
        "{dump}"
    );
    // The same records by claim, by destination, and refusals only.
    let by_claim = lighthouse_flows(&dir, &["--claim", "repository=acme/app"]);
    assert_eq!(by_claim.len(), flows.len());
    assert!(lighthouse_flows(&dir, &["--claim", "repository=acme/other"]).is_empty());
    let denied = lighthouse_flows(&dir, &["--denied", "--dest", "198.19.0.0/24"]);
    assert!(
        denied.iter().all(|f| f["verdict"] == "deny") && denied.len() >= 2,
        "{denied:?}"
    );
    // The gateway's own file: JSON lines, private.
    let file = dir.join("gw-flows.jsonl");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{e}"))
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Written within a second (one write for many lines).
    wait_until(
        "the gateway's file has every record",
        Duration::from_secs(5),
        || {
            let lines = std::fs::read_to_string(&file).unwrap_or_default();
            lines.lines().count() >= flows.len()
        },
    );

    // The lighthouse goes away; the gateway's queue holds 4 records. A
    // node with a certificate of its own makes 80 short connections: all
    // get through; the records beyond the queue are dropped and counted.
    wait_until("dev reaches the vpc", Duration::from_secs(20), || {
        curl(&dev_ns, &url("8080", "hi"), "2", &out) == 0
    });
    assert_eq!(
        status(&dir, "gw")["flows"]["dropped"].as_u64(),
        Some(0),
        "nothing dropped while a lighthouse takes them"
    );
    lh_proc.kill_hard();
    // (8 messages in flight of 4 records each, and 4 waiting, are kept.)
    for i in 0..80 {
        assert_eq!(
            curl(&dev_ns, &url("8080", "hi"), "3", &out),
            0,
            "connection {i}"
        );
    }
    let dropped = || status(&dir, "gw")["flows"]["dropped"].as_u64().unwrap_or(0);
    wait_until(
        "the gateway counts dropped records",
        Duration::from_secs(5),
        || dropped() >= 10,
    );
    gw_proc.wait_for_log("flow records dropped", Duration::from_secs(15));
    lh_proc = start_lighthouse(&lh, &dir.join("lighthouse.toml"));
    wait_until(
        "the drop count reaches the lighthouse with the records kept",
        Duration::from_secs(30),
        || {
            let out = std::process::Command::new(workspace_bin("tern-lighthouse"))
                .args(["flows", "--config"])
                .arg(dir.join("lighthouse.toml"))
                .args(["--name", "dev"])
                .output();
            out.is_ok_and(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.contains("note: node gw dropped") && text.contains(" dev ")
            })
        },
    );
    let _ = (&dev_proc, &lh_proc, &lab);
}
