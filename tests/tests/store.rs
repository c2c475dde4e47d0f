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
    let lh2_port = free_udp();
    let lh2 = fs::read_to_string(d.join("lh.toml"))
        .unwrap()
        .replace(&format!(":{}\"", lab.lh_port), &format!(":{lh2_port}\""))
        .replace("socket = \"lh.sock\"", "socket = \"lh2.sock\"");
    fs::write(d.join("lh2.toml"), lh2).unwrap();
    let _lh2 = Daemon::start(
        "tern-lighthouse",
        &["--config", &d.join("lh2.toml").to_string_lossy()],
        d.join("lh2.log"),
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
                    &d.join("lh2.sock").to_string_lossy(),
                    "--json",
                ],
                Duration::from_secs(5),
            )
            .status
            .success()
        },
    );
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
