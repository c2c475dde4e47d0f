//! Two lighthouses on one PostgreSQL database, on real kernels: a real
//! PostgreSQL server in a namespace of its own, two lighthouses with the
//! same issuer in theirs, a TUN-mode gateway in front of a private network
//! (python's http.server) registered with both, and CI jobs in namespaces
//! of their own enrolling with tokens through either lighthouse. A token
//! raced at both buys one certificate; a revocation made at one lighthouse
//! stops a job registered only with the other within 1 s; with one
//! lighthouse killed, jobs enroll and meet the gateway through the other;
//! with PostgreSQL stopped, enrollment is refused as "store unavailable"
//! (exit 75) while registrations go on, and once it is back the same token
//! enrolls, once. Needs root and Debian's postgresql.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_lighthouse::store::testing::TestServer;
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, workspace_bin, Ns, Proc};

const SERVER: &str = "198.19.0.10";
const LH2_UNDERLAY: &str = "198.18.0.6";
const DB_UNDERLAY: &str = "198.18.0.5";

fn lh1() -> String {
    format!("{LH_UNDERLAY}:4242")
}

fn lh2() -> String {
    format!("{LH2_UNDERLAY}:4242")
}

/// A job's config: the CA only (the key is made in memory, the certificate
/// enrolled), these lighthouses, a route to the private network.
fn write_job_config(dir: &Path, name: &str, lighthouses: &[String]) -> PathBuf {
    let mut text = node_config_text(name, "ca.crt")
        .replace(&format!("cert = \"{name}.crt\"\n"), "")
        .replace(&format!("key = \"{name}.key\"\n"), "")
        .replace(&format!("[[lighthouses]]\nendpoint = \"{}\"\n", lh1()), "");
    for lh in lighthouses {
        text.push_str(&format!("[[lighthouses]]\nendpoint = \"{lh}\"\n"));
    }
    text.push_str("[[routes]]\nsubnet = \"198.19.0.0/24\"\n");
    write_file(dir, &format!("{name}.toml"), &text)
}

/// `tern-lighthouse status --json` through the API socket `dir/<sock>`.
fn lighthouse_status_at(dir: &Path, sock: &str) -> serde_json::Value {
    let out = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["status", "--json", "--socket"])
        .arg(dir.join(sock))
        .output()
        .unwrap_or_else(|e| panic!("tern-lighthouse status: {e}"));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn registered(dir: &Path, sock: &str, name: &str) -> Option<serde_json::Value> {
    lighthouse_status_at(dir, sock)["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
}

/// A `tern-lighthouse` command run in the lighthouse's namespace (the
/// database is reachable only there).
fn lighthouse_cli(ns: &Ns, args: &[&str]) -> std::process::Output {
    ns.exec_timeout(
        &workspace_bin("tern-lighthouse").to_string_lossy(),
        args.iter().map(|a| a.to_string()),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| panic!("tern-lighthouse {args:?} did not finish"))
}

fn token(ns: &Ns, config: &Path, uses: &str) -> String {
    let out = lighthouse_cli(
        ns,
        &[
            "token",
            "create",
            "--config",
            &config.to_string_lossy(),
            "--groups",
            "ci",
            "--uses",
            uses,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn enroll(ns: &Ns, dir: &Path, name: &str, token: &str) -> Proc {
    let mut cmd = ns.command(workspace_bin("tern"));
    cmd.args(["up", "--config"])
        .arg(dir.join(format!("{name}.toml")))
        .args(["--enroll-token", token]);
    ns.spawn_command(cmd, &format!("node-{name}"))
}

/// `tern up` expected to end (asking once: `--enroll-patience 0s`): its
/// exit code and stderr.
fn enroll_refused(ns: &Ns, dir: &Path, name: &str, token: &str) -> (Option<i32>, String) {
    let out = ns
        .exec_timeout(
            &workspace_bin("tern").to_string_lossy(),
            [
                "up".to_string(),
                "--config".to_string(),
                dir.join(format!("{name}.toml"))
                    .to_string_lossy()
                    .into_owned(),
                "--enroll-token".to_string(),
                token.to_string(),
                "--enroll-patience".to_string(),
                "0s".to_string(),
            ],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("{name}: tern up did not end"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn curl(ns: &Ns, out: &Path) -> bool {
    ns.exec(
        "curl",
        [
            "-s",
            "--fail",
            "--max-time",
            "2",
            "-o",
            &out.to_string_lossy(),
            &format!("http://{SERVER}:8080/hi"),
        ],
    )
    .status
    .success()
}

#[test]
fn two_lighthouses_on_one_postgresql_database_survive_a_lighthouse_and_a_database_outage() {
    let test = "ha_netns";
    if !require_root(test) || !require_tools(test, &["curl", "python3", "iptables"]) {
        return;
    }
    let _serial = serial();
    let lab = tern_netns_tests::Lab::new("ha");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let db = lab.add_ns("db");
    let lh1_ns = lab.add_ns("lh1");
    let lh2_ns = lab.add_ns("lh2");
    let gw = lab.add_ns("gw");
    let vpc = lab.add_ns("vpc");
    let jobs: Vec<Ns> = ["ja", "jb", "jc", "jd", "je"]
        .iter()
        .map(|n| lab.add_ns(n))
        .collect();
    lab.connect_to_wan(&lh1_ns, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&lh2_ns, &format!("{LH2_UNDERLAY}/24"));
    lab.connect_to_wan(&db, &format!("{DB_UNDERLAY}/24"));
    lab.connect_to_wan(&gw, "198.18.0.4/24");
    for (i, ns) in jobs.iter().enumerate() {
        lab.connect_to_wan(ns, &format!("198.18.0.{}/24", 20 + i));
    }
    lab.bridge(&vpc, "br1", &format!("{SERVER}/24"));
    lab.connect_to_bridge(&gw, "198.19.0.2/24", &vpc, "br1");
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir www: {e}"));
    fs::write(www.join("hi"), "hi\n").unwrap_or_else(|e| panic!("write hi: {e}"));
    let mut cmd = vpc.command("python3");
    cmd.args(["-m", "http.server", "--bind", SERVER, "8080", "--directory"])
        .arg(&www);
    let _http = vpc.spawn_command(cmd, "http");

    // The database, in its own namespace.
    let Some(pg) = TestServer::start_in(db.name(), DB_UNDERLAY) else {
        return;
    };
    pg.create_db("tern");
    let store = pg.tcp_url("tern");

    make_ca(&dir, "ca");
    for (name, ip) in [("lh1", "100.64.0.1/10"), ("lh2", "100.64.0.2/10")] {
        sign(&dir, "ca", name, ip, &["--groups", "lighthouse"]);
    }
    sign(
        &dir,
        "ca",
        "gw",
        "100.64.0.30/10",
        &["--subnets", "198.19.0.0/24"],
    );
    sign_issuer(&dir, "ca", "lh-issuer", "100.64.100.0/24", "ci");
    let base = fs::read_to_string(write_lighthouse_config(&dir)).unwrap_or_default();
    let lh_config = |name: &str| {
        let text = base.replace("lh1", name)
            + "[enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\n"
            + &format!("[store]\nurl = \"{store}\"\n");
        write_file(&dir, &format!("{name}.toml"), &text)
    };
    let (lh1_config, lh2_config) = (lh_config("lh1"), lh_config("lh2"));
    let lh1_proc = start_lighthouse(&lh1_ns, &lh1_config);
    let _lh2_proc = start_lighthouse(&lh2_ns, &lh2_config);

    let gateway = format!(
        "{}[[lighthouses]]\nendpoint = \"{}\"\n[gateway]\nsubnets = [\"198.19.0.0/24\"]\nmasquerade = true\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.0/24\"\n",
        node_config_text("gw", "ca.crt"),
        lh2()
    );
    let _gw_proc = start_node(&gw, &write_file(&dir, "gw.toml", &gateway), "node-gw");
    wait_until(
        "the gateway registers with both lighthouses",
        Duration::from_secs(20),
        || {
            registered(&dir, "lh1.sock", "gw").is_some()
                && registered(&dir, "lh2.sock", "gw").is_some()
        },
    );
    write_job_config(&dir, "ja", &[lh1()]);
    write_job_config(&dir, "jb", &[lh1()]);
    write_job_config(&dir, "jc", &[lh2()]);
    write_job_config(&dir, "jd", &[lh1(), lh2()]);
    write_job_config(&dir, "je", &[lh1(), lh2()]);
    write_job_config(&dir, "je2", &[lh2()]);

    // 1. A job registered with the first lighthouse only reaches the vpc.
    let a = enroll(&jobs[0], &dir, "ja", &token(&lh1_ns, &lh1_config, "1"));
    let out = dir.join("a.out");
    wait_until("job a reaches the vpc", Duration::from_secs(20), || {
        curl(&jobs[0], &out)
    });
    let a_name = status(&dir, "ja")["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // 2. One single-use token raced at both lighthouses: one certificate.
    let raced = token(&lh2_ns, &lh2_config, "1");
    let b = enroll(&jobs[1], &dir, "jb", &raced);
    let c = enroll(&jobs[2], &dir, "jc", &raced);
    wait_until("one racer is refused", Duration::from_secs(20), || {
        !b.is_running() || !c.is_running()
    });
    let (loser, winner) = if b.is_running() { (&c, &b) } else { (&b, &c) };
    assert_eq!(
        loser.try_wait().and_then(|s| s.code()),
        Some(77),
        "{}",
        loser.log()
    );
    assert!(loser.log().contains("used up"), "{}", loser.log());
    winner.wait_for_log("enrolled", Duration::from_secs(10));
    winner.terminate_and_wait(Duration::from_secs(10));

    // 3. Revoked at the second lighthouse, the job registered only with the
    // first is told through the first and stops within 1 s.
    assert!(registered(&dir, "lh2.sock", &a_name).is_none());
    let revoked_at = Instant::now();
    let out = lighthouse_cli(
        &lh2_ns,
        &["revoke", "--config", &lh2_config.to_string_lossy(), &a_name],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the revoked job stops", Duration::from_secs(5), || {
        !a.is_running()
    });
    let took = revoked_at.elapsed();
    eprintln!("revoked at lh2 → job a (registered with lh1) stopped in {took:?}");
    assert_eq!(a.try_wait().and_then(|s| s.code()), Some(76), "{}", a.log());
    assert!(took <= Duration::from_secs(1), "{took:?}");

    // 4. The first lighthouse dies: a job listing both enrolls through the
    // second and meets the gateway through it.
    lh1_proc.kill_hard();
    let started = Instant::now();
    let _d = enroll(&jobs[3], &dir, "jd", &token(&lh2_ns, &lh2_config, "1"));
    let out_d = dir.join("d.out");
    wait_until(
        "job d reaches the vpc through the second lighthouse",
        Duration::from_secs(20),
        || curl(&jobs[3], &out_d),
    );
    eprintln!(
        "lh1 down: tern up → first byte through the gateway in {:?}",
        started.elapsed()
    );

    // 5. The database stops: enrollment is refused with its own reason and
    // exit code, spending nothing; registrations and meetings go on.
    let last = token(&lh2_ns, &lh2_config, "1");
    pg.stop();
    let (code, stderr) = enroll_refused(&jobs[4], &dir, "je", &last);
    assert_eq!(code, Some(75), "{stderr}");
    assert!(stderr.contains("store unavailable"), "{stderr}");
    std::thread::sleep(Duration::from_secs(5));
    let gw_at_lh2 = registered(&dir, "lh2.sock", "gw").unwrap_or_default();
    assert!(
        gw_at_lh2["last_seen_secs_ago"]
            .as_u64()
            .is_some_and(|s| s <= 5),
        "{gw_at_lh2}"
    );
    assert!(curl(&jobs[3], &out_d), "job d still reaches the vpc");

    // 6. Back: the lighthouse connects again by itself; the token enrolls
    // once.
    pg.start_again();
    // Its next attempt is at most half a second away.
    std::thread::sleep(Duration::from_secs(1));
    let e = enroll(&jobs[4], &dir, "je", &last);
    e.wait_for_log("enrolled", Duration::from_secs(15));
    let out_e = dir.join("e.out");
    wait_until("job e reaches the vpc", Duration::from_secs(20), || {
        curl(&jobs[4], &out_e)
    });
    e.terminate_and_wait(Duration::from_secs(10));
    let (code, stderr) = enroll_refused(&jobs[4], &dir, "je2", &last);
    assert_eq!(code, Some(77), "{stderr}");
    assert!(stderr.contains("used up"), "{stderr}");
    drop(pg);
}
