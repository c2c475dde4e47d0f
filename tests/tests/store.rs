//! Lighthouses on PostgreSQL, on loopback: a lighthouse whose `[store] url`
//! names a database (a real PostgreSQL server this test starts) enrolls a
//! job with a token made by `tern-lighthouse token create` on that
//! database; a second lighthouse on the same database refuses the spent
//! token, and of a single-use token raced at both, one job gets a
//! certificate. Skipped without PostgreSQL or root (failing under CI=true).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use tern_lighthouse::store::testing::TestServer;
use tern_tests::enroll_lab::lab_with;
use tern_tests::{bin, free_tcp, free_udp, run, wait_until, Daemon};

#[test]
fn two_lighthouses_on_one_postgresql_database_spend_each_token_once() {
    let Some(server) = TestServer::start() else {
        return;
    };
    server.create_db("tern");
    let store = format!("[store]\nurl = \"{}\"\n", server.tcp_url("tern"));
    let lab = lab_with("127.76.0", &store);
    let d = lab.dir.path();

    // The token is made on the database, and spent there.
    let token = lab.token("1", "ci");
    let (job, _forward) = lab.start_job("job", &token);

    // A second lighthouse on the same database.
    let (_lh2, lh2_port) = second_lighthouse(&lab, "lh2", None);
    let at_lh2 = |name: &str| {
        let path = lab.ci_config(name, free_tcp());
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace(&format!(":{}\"", lab.lh_port), &format!(":{lh2_port}\""));
        fs::write(&path, text).unwrap();
        path
    };
    let again = run(
        "tern",
        &[
            "up",
            "--config",
            &at_lh2("job2").to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        Duration::from_secs(20),
    );
    assert_eq!(
        again.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("used up"));

    // One single-use token raced at both lighthouses: one certificate.
    let raced = lab.token("1", "ci");
    let racers: Vec<_> = [lab.ci_config("racer-a", free_tcp()), at_lh2("racer-b")]
        .into_iter()
        .map(|config| {
            Command::new(bin("tern"))
                .args([
                    "up",
                    "--config",
                    &config.to_string_lossy(),
                    "--enroll-token",
                    &raced,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let (mut running, mut refused) = (0, 0);
    for mut r in racers {
        match r.try_wait().unwrap() {
            Some(status) => {
                assert_eq!(status.code(), Some(77));
                refused += 1;
            }
            None => {
                running += 1;
                let _ = r.kill();
            }
        }
        let _ = r.wait();
    }
    assert_eq!((running, refused), (1, 1));

    // A revocation made at the second lighthouse ends the first job, which
    // registered with the first: told through it within seconds.
    let name = lab.node_status("job")["name"].as_str().unwrap().to_string();
    let out = run(
        "tern-lighthouse",
        &[
            "revoke",
            "--config",
            &d.join("lh2.toml").to_string_lossy(),
            &name,
        ],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = std::time::Instant::now();
    let mut job = job;
    let mut code = None;
    wait_until(
        "the job revoked at the other lighthouse stops",
        Duration::from_secs(5),
        || {
            code = job.child.try_wait().unwrap().and_then(|s| s.code());
            code.is_some()
        },
    );
    assert_eq!(code, Some(76), "{}", job.log());
    eprintln!(
        "revoked at lh2 → the job on lh1 stopped in {:?}",
        revoked_at.elapsed()
    );
}

/// Another lighthouse, `dir/<name>.toml`: the lab's config with another
/// port and socket, and this `[store] url` if given; once it answers, with
/// its port.
fn second_lighthouse(
    lab: &tern_tests::enroll_lab::Lab,
    name: &str,
    store_url: Option<&str>,
) -> (Daemon, u16) {
    let d = lab.dir.path();
    let port = free_udp();
    let text = fs::read_to_string(d.join("lh.toml"))
        .unwrap()
        .replace(&format!(":{}\"", lab.lh_port), &format!(":{port}\""))
        .replace("socket = \"lh.sock\"", &format!("socket = \"{name}.sock\""))
        + &store_url.map_or(String::new(), |url| format!("[store]\nurl = \"{url}\"\n"));
    fs::write(d.join(format!("{name}.toml")), text).unwrap();
    let daemon = Daemon::start(
        "tern-lighthouse",
        &[
            "--config",
            &d.join(format!("{name}.toml")).to_string_lossy(),
        ],
        d.join(format!("{name}.log")),
    );
    wait_until(
        "the second lighthouse answers",
        Duration::from_secs(20),
        || {
            run(
                "tern-lighthouse",
                &[
                    "status",
                    "--socket",
                    &d.join(format!("{name}.sock")).to_string_lossy(),
                    "--json",
                ],
                Duration::from_secs(5),
            )
            .status
            .success()
        },
    );
    (daemon, port)
}

/// `tern up --enroll-token` (and `extra` arguments) for a job whose only
/// lighthouse listens on `port`: its exit code and stderr if it ended
/// within `within`, else (it enrolled and runs) None, after stopping it.
fn enroll_once(
    lab: &tern_tests::enroll_lab::Lab,
    name: &str,
    port: u16,
    token: &str,
    extra: &[&str],
    within: Duration,
) -> Option<(Option<i32>, String)> {
    let path = lab.ci_config(name, free_tcp());
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace(&format!(":{}\"", lab.lh_port), &format!(":{port}\""));
    fs::write(&path, text).unwrap();
    let log = lab.dir.path().join(format!("{name}.err"));
    let mut child = Command::new(bin("tern"))
        .args([
            "up",
            "--config",
            &path.to_string_lossy(),
            "--enroll-token",
            token,
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status.code(), fs::read_to_string(&log).unwrap_or_default()));
        }
        // Enrolled: its API answers with a certificate.
        if lab.node_status(name)["name"].is_string() {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{name} neither enrolled nor ended in {within:?}");
}

#[test]
fn a_lighthouse_moves_to_postgresql_with_store_copy_and_rides_out_a_database_outage() {
    let Some(server) = TestServer::start() else {
        return;
    };
    server.create_db("shared");
    // A single lighthouse on its SQLite file, with a token made there.
    let lab = lab_with("127.74.0", "store = \"one.db\"\n");
    let d = lab.dir.path();
    let token = lab.token("2", "ci");
    let shared = server.tcp_url("shared");

    // Its state moves into the shared database.
    let sqlite = format!("sqlite:{}", d.join("one.db").display());
    let copy = run(
        "tern-lighthouse",
        &["store", "copy", "--from", &sqlite, "--to", &shared],
        Duration::from_secs(20),
    );
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let said = String::from_utf8_lossy(&copy.stdout);
    assert!(said.contains("copied 1 tokens"), "{said}");
    // Twice: refused, the database is not empty.
    let again = run(
        "tern-lighthouse",
        &["store", "copy", "--from", &sqlite, "--to", &shared],
        Duration::from_secs(20),
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // A lighthouse on the database enrolls with the copied token.
    let (_lh2, port) = second_lighthouse(&lab, "lh2", Some(&shared));
    let migrate = run(
        "tern-lighthouse",
        &[
            "store",
            "migrate",
            "--config",
            &d.join("lh2.toml").to_string_lossy(),
        ],
        Duration::from_secs(20),
    );
    assert!(
        String::from_utf8_lossy(&migrate.stdout).contains("up to date"),
        "{}{}",
        String::from_utf8_lossy(&migrate.stdout),
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert_eq!(
        enroll_once(&lab, "moved", port, &token, &[], Duration::from_secs(20)),
        None
    );

    // The database goes away: enrollment is refused as "store unavailable"
    // (75), spending nothing ...
    server.stop();
    let (code, stderr) = enroll_once(
        &lab,
        "during",
        port,
        &token,
        &["--enroll-patience", "0s"],
        Duration::from_secs(20),
    )
    .expect("refused while the database is down");
    assert_eq!(code, Some(75), "{stderr}");
    assert!(stderr.contains("store unavailable"), "{stderr}");
    // ... and a job that keeps asking (--enroll-patience, 10 s by default)
    // enrolls once the database is back: the lighthouse connects again by
    // itself, and the token's last use is there.
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        server.start_again();
        server
    });
    assert_eq!(
        enroll_once(&lab, "after", port, &token, &[], Duration::from_secs(20)),
        None
    );
    let _server = back.join().unwrap();
    let (code, stderr) = enroll_once(&lab, "third", port, &token, &[], Duration::from_secs(20))
        .expect("the token is used up");
    assert_eq!(code, Some(77), "{stderr}");
    assert!(stderr.contains("used up"), "{stderr}");
}
