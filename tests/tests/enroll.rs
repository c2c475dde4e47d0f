//! Enrollment on loopback, no root: a lighthouse with an issuer, tokens from
//! `tern-lighthouse token create`, and CI nodes that join with `tern up
//! --userspace --enroll-token` and nothing but the CA on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::enroll_lab::{get, lab, lab_with, Down, Lab};
use tern_tests::{bin, free_tcp, free_udp, run, wait_until};

#[test]
fn a_ci_node_enrolls_with_a_token_reaches_the_private_service_and_the_token_is_spent() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let started = Instant::now();
    let (job, _forward) = lab.start_job("job", &token);
    eprintln!(
        "enrolled and through the gateway in {:?}",
        started.elapsed()
    );
    let log = job.log();
    assert!(log.contains("enrolled") && log.contains("ci-"), "{log}");
    // Nothing but the CA and configs on disk: no key was written.
    let keys: Vec<_> = fs::read_dir(lab.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ci-"))
        .collect();
    assert!(keys.is_empty(), "{keys:?}");
    // The token is spent: a second node is refused, exit 77, saying why.
    let again = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("job2", free_tcp()).to_string_lossy(),
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
}

#[test]
fn two_nodes_racing_with_one_single_use_token_get_one_certificate() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let racers: Vec<_> = (0..2)
        .map(|i| {
            let config = lab.ci_config(&format!("racer{i}"), free_tcp());
            Command::new(bin("tern"))
                .args([
                    "up",
                    "--config",
                    &config.to_string_lossy(),
                    "--enroll-token",
                    &token,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let mut refused = 0;
    let mut running = 0;
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
}

#[test]
fn enrollment_failures_have_their_own_exit_codes() {
    let lab = lab();
    // A token the lighthouse never made.
    let bogus = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("bogus", free_tcp()).to_string_lossy(),
            "--enroll-token",
            "tern1_0000",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(bogus.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&bogus.stderr).contains("unknown"));
    // (A token granting a group the issuer may not sign is refused when it
    // is made: tests/tokens.rs.)
    // No lighthouse answers: 69.
    let config = lab.ci_config("lost", free_tcp());
    let text = fs::read_to_string(&config).unwrap().replace(
        &format!(":{}\"", lab.lh_port),
        &format!(":{}\"", free_udp()),
    );
    fs::write(&config, text).unwrap();
    let lost = run(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            "x",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        lost.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&lost.stderr)
    );
    // A config with only the CA but no token says how to enroll.
    let none = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("none", free_tcp()).to_string_lossy(),
        ],
        Duration::from_secs(10),
    );
    assert!(String::from_utf8_lossy(&none.stderr).contains("--enroll-token"));
}

#[test]
fn the_readiness_gate_returns_once_the_target_answers_and_tern_down_leaves() {
    let lab = lab();
    let token = lab.token("3", "ci");
    let forward = free_tcp();
    let config = lab.ci_config("gated", forward);
    let sock = lab.dir.path().join("gated.sock");
    // If anything below fails, the background node is stopped all the same.
    let _down = Down(sock.clone());
    let started = Instant::now();
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            &token,
            "--wait-for",
            &format!("127.78.0.10:{}", lab.http_port),
            "--wait-timeout",
            "20s",
            "--log-file",
            &lab.dir.path().join("gated.log").to_string_lossy(),
        ],
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ready: 127.78.0.10:"), "{stdout}");
    eprintln!(
        "tern up --enroll-token --wait-for returned after {:?}",
        started.elapsed()
    );
    // Ready means ready: the first try goes through.
    assert!(get(forward).is_some_and(|r| r.contains("private hello")));
    // The node in the background got the token in its environment: no
    // process's command line shows it (ps shows them to every user).
    let shown: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&token))
        .collect();
    assert!(shown.is_empty(), "{shown:?}");
    // tern down: the node leaves, and the lighthouse forgets it at once.
    let down = run(
        "tern",
        &["down", "--socket", &sock.to_string_lossy()],
        Duration::from_secs(20),
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!sock.exists());
    wait_until(
        "the lighthouse forgets the job",
        Duration::from_secs(5),
        || !lab.registered().iter().any(|n| n.starts_with("ci-")),
    );
    // Each way of not being ready has its code. A job in group deploy meets
    // the gateway's default deny (only ci may in): the gateway itself says
    // so when asked, and the gate exits 71 at once rather than time out.
    let deploy = lab.token("1", "deploy");
    for (target, code, token) in [
        ("127.66.0.1:80".to_string(), 68, &token),
        (format!("127.78.0.10:{}", free_tcp()), 70, &token),
        (format!("127.78.0.10:{}", lab.http_port), 71, &deploy),
    ] {
        let config = lab.ci_config(&format!("gate{code}"), free_tcp());
        let out = run(
            "tern",
            &[
                "up",
                "--config",
                &config.to_string_lossy(),
                "--enroll-token",
                token,
                "--wait-for",
                &target,
                "--wait-timeout",
                "3s",
            ],
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{target}: {stderr}");
        if code == 71 {
            assert!(
                stderr.contains("denied by policy: gw's inbound default-deny"),
                "{stderr}"
            );
        }
    }
}

const GH_ISSUER: &str = "https://token.actions.example.test";

/// What GitHub Actions offers a job, on loopback: the provider's keys at
/// `/jwks`, and at `/token` an ID token for the `audience` asked, to
/// whoever shows the runner's bearer token. Serves until the test ends.
struct FakeGithub {
    port: u16,
    _server: std::thread::JoinHandle<()>,
}

const RUNNER_BEARER: &str = "runner-bearer-secret";

impl FakeGithub {
    fn start(
        signer: tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer,
        repo: &'static str,
    ) -> FakeGithub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Write};
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line);
                }
                let path = head
                    .first()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("/")
                    .to_string();
                let authorized = head.iter().any(|h| {
                    h.to_ascii_lowercase().starts_with("authorization:")
                        && h.contains(&format!("Bearer {RUNNER_BEARER}"))
                });
                let (status, body) = if path == "/jwks" {
                    ("200 OK", signer.jwks_json())
                } else if path.starts_with("/token") && authorized {
                    let audience = path
                        .split(['?', '&'])
                        .find_map(|kv| kv.strip_prefix("audience="))
                        .unwrap_or("https://github.com/acme")
                        .to_string();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let mut claims = tern_lighthouse_core::oidc::test_issuer::github_like_claims(
                        GH_ISSUER,
                        &audience,
                        repo,
                        "refs/heads/main",
                        now,
                    );
                    claims["jti"] = format!("jti-{}", rand_tail()).into();
                    (
                        "200 OK",
                        serde_json::json!({ "value": signer.sign(&claims) }).to_string(),
                    )
                } else {
                    ("401 Unauthorized", "{}".to_string())
                };
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeGithub {
            port,
            _server: server,
        }
    }
}

fn rand_tail() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

fn oidc_section(jwks: &str, repo_pattern: &str) -> String {
    format!(
        "[[enroll.oidc]]\nissuer = \"{GH_ISSUER}\"\naudience = \"tern-ci\"\njwks = \"{jwks}\"\n[[enroll.oidc.rules]]\nclaims = {{ repository = \"{repo_pattern}\", ref = \"refs/heads/main\" }}\ngroups = [\"ci\"]\ncert_ttl = \"15m\"\n"
    )
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_github_job_enrolls_with_its_oidc_id_token_and_the_gate_opens_once_the_target_answers() {
    let signer = tern_lighthouse_core::oidc::test_issuer::TestOidcIssuer::rs256("gh-1").unwrap();
    let github = FakeGithub::start(signer, "acme/app");
    // The lighthouse fetches the provider's keys from its URL.
    let lab = lab_with(
        "127.78.0",
        &oidc_section(&format!("http://127.0.0.1:{}/jwks", github.port), "acme/*"),
    );
    let forward = free_tcp();
    let config = lab.ci_config("gh", forward);
    let sock = lab.dir.path().join("gh.sock");
    let _down = Down(sock.clone());
    let started = Instant::now();
    let out = Command::new(bin("tern"))
        .args(["up", "--config"])
        .arg(&config)
        .args(["--enroll-oidc", "--oidc-audience", "tern-ci", "--wait-for"])
        .arg(format!("127.78.0.10:{}", lab.http_port))
        .args(["--wait-timeout", "20s", "--log-file"])
        .arg(lab.dir.path().join("gh.log"))
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("http://127.0.0.1:{}/token?api-version=2.0", github.port),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", RUNNER_BEARER)
        .env_remove("TERN_OIDC_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(lab.dir.path().join("gh.log")).unwrap_or_default()
    );
    eprintln!(
        "tern up --enroll-oidc --wait-for returned after {:?}",
        started.elapsed()
    );
    assert!(get(forward).is_some_and(|r| r.contains("private hello")));
    // The lighthouse lists the job as ephemeral, issued by its issuer.
    let status = lab.lighthouse_status();
    let job = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"].as_str().unwrap_or("").starts_with("ci-"))
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(job["ephemeral"], true);
    assert_eq!(job["issued_by"], "lh-issuer");
    // The admin API lists it with the claims it enrolled with.
    let page = lab.admin_get("/api/v1/nodes?ephemeral=true");
    let enrollment = &page["nodes"][0]["enrollment"];
    assert_eq!(enrollment["claims"]["repository"], "acme/app", "{page}");
    assert_eq!(enrollment["claims"]["ref"], "refs/heads/main", "{page}");
    assert!(enrollment["claims"]["run_id"].is_string(), "{page}");
    assert!(enrollment["token"].is_null(), "{page}");
    assert!(
        enrollment["how"].as_str().unwrap().starts_with("oidc "),
        "{page}"
    );
    // The userspace gateway recorded the job's flows (the gate's
    // connection and the GET); the lighthouse keeps them with its claims,
    // as its OpenAPI document says.
    let mut flows = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        flows = lab.admin_get("/api/v1/flows?claim=repository%3Dacme%2Fapp");
        if flows["flows"].as_array().is_some_and(|f| f.len() >= 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = flows["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("{flows}"));
    assert!(listed.len() >= 2, "{flows}");
    for f in listed {
        assert_eq!(
            (f["node"].as_str(), f["verdict"].as_str()),
            (Some("gw"), Some("allow")),
            "{f}"
        );
        assert_eq!(f["enrollment"]["claims"]["repository"], "acme/app", "{f}");
        assert!(
            f["bytes_in"].as_u64().unwrap_or(0) > 0 && f["packets_out"].as_u64().unwrap_or(0) > 0,
            "{f}"
        );
    }
    let doc = lab.admin_get("/api/v1/openapi.json");
    if let Err(e) = tern_tests::openapi::check(&doc, "/flows", "GET", 200, &flows) {
        panic!("the answer does not match the OpenAPI document: {e}\n{flows}");
    }
    // The key never touched the disk; the token never reached a log.
    let log = fs::read_to_string(lab.dir.path().join("gh.log")).unwrap();
    assert!(!log.contains("eyJ"), "an ID token in the node's log");
    let lh_log = fs::read_to_string(lab.dir.path().join("lh.log")).unwrap();
    assert!(!lh_log.contains("eyJ") && !lh_log.contains(RUNNER_BEARER));
    // Without the runner's bearer token GitHub says no, and tern says why.
    let denied = Command::new(bin("tern"))
        .args(["up", "--config"])
        .arg(lab.ci_config("gh2", free_tcp()))
        .args(["--enroll-oidc", "--oidc-audience", "tern-ci"])
        .env(
            "ACTIONS_ID_TOKEN_REQUEST_URL",
            format!("http://127.0.0.1:{}/token?api-version=2.0", github.port),
        )
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "wrong")
        .env_remove("TERN_OIDC_TOKEN")
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("id-token: write"));
}

#[test]
fn oidc_tokens_with_the_wrong_audience_issuer_expiry_signature_or_claims_are_each_refused() {
    use tern_lighthouse_core::oidc::test_issuer::{github_like_claims, TestOidcIssuer};
    let signer = TestOidcIssuer::es256("gl-1").unwrap();
    let keys = tempfile::tempdir().unwrap();
    let jwks = keys.path().join("jwks.json");
    fs::write(&jwks, signer.jwks_json()).unwrap();
    let lab = lab_with(
        "127.78.0",
        &oidc_section(&jwks.to_string_lossy(), "acme/app"),
    );
    let now = now_unix();
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = github_like_claims(GH_ISSUER, "tern-ci", "acme/app", "refs/heads/main", now);
        c["jti"] = format!("jti-{}", rand_tail()).into();
        f(&mut c);
        c
    };
    let impostor = TestOidcIssuer::es256("gl-1").unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong audience",
            signer.sign(&claims(&|c| c["aud"] = "other".into())),
            "audience",
        ),
        (
            "wrong issuer",
            signer.sign(&claims(&|c| c["iss"] = "https://evil.test".into())),
            "does not accept",
        ),
        (
            "expired",
            signer.sign(&claims(&|c| c["exp"] = (now - 900).into())),
            "expired",
        ),
        (
            "bad signature",
            impostor.sign(&claims(&|_| {})),
            "signature",
        ),
        (
            "unmatched claims",
            signer.sign(&claims(&|c| c["repository"] = "acme/other".into())),
            "matches no",
        ),
    ];
    let up = |name: &str, token: Option<&str>, via_env: bool| {
        let file = lab.dir.path().join(format!("{name}.jwt"));
        let mut cmd = Command::new(bin("tern"));
        cmd.args(["up", "--config"])
            .arg(lab.ci_config(name, free_tcp()))
            .arg("--enroll-oidc")
            .env_remove("ACTIONS_ID_TOKEN_REQUEST_URL")
            .env_remove("TERN_OIDC_TOKEN");
        match (token, via_env) {
            (Some(t), true) => {
                cmd.env("TERN_OIDC_TOKEN", t);
            }
            (Some(t), false) => {
                fs::write(&file, format!("{t}\n")).unwrap();
                cmd.arg("--oidc-token-file").arg(&file);
            }
            (None, _) => {}
        }
        cmd.args([
            "--wait-for",
            &format!("127.78.0.10:{}", lab.http_port),
            "--wait-timeout",
            "20s",
        ]);
        cmd.arg("--log-file")
            .arg(lab.dir.path().join(format!("{name}.log")));
        let out = cmd.output().unwrap();
        let log =
            fs::read_to_string(lab.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        (
            out.status.code(),
            format!("{}{log}", String::from_utf8_lossy(&out.stderr)),
        )
    };
    for (i, (what, token, reason)) in cases.iter().enumerate() {
        let (code, text) = up(&format!("bad{i}"), Some(token), false);
        assert_eq!(code, Some(77), "{what}: {text}");
        assert!(text.contains(reason), "{what}: wanted {reason:?} in {text}");
        assert!(
            !text.contains(token.as_str()),
            "{what}: the token was printed"
        );
    }
    // A good one, from a file and from the variable; a used one is refused.
    let good = signer.sign(&claims(&|_| {}));
    let sock = lab.dir.path().join("good.sock");
    let _down = Down(sock.clone());
    let (code, text) = up("good", Some(&good), false);
    assert_eq!(code, Some(0), "{text}");
    assert!(get_through(&lab, "good"));
    let (code, text) = up("again", Some(&good), true);
    assert_eq!(code, Some(77), "{text}");
    assert!(text.contains("used to enroll already"), "{text}");
    let env_sock = lab.dir.path().join("env.sock");
    let _down_env = Down(env_sock);
    let (code, text) = up("env", Some(&signer.sign(&claims(&|_| {}))), true);
    assert_eq!(code, Some(0), "{text}");
    // No token anywhere: 78, saying where one could come from.
    let (code, text) = up("none", None, false);
    assert_eq!(code, Some(78), "{text}");
    assert!(text.contains("--oidc-token-file"), "{text}");
}

/// Whether the node behind `<name>.sock` reaches the private service (over
/// the API's Dial, as `tern forward` does).
fn get_through(lab: &Lab, name: &str) -> bool {
    lab.node_status(name)["peers"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["name"] == "gw"))
}

#[test]
fn revoking_an_enrolled_node_ends_its_sessions_within_seconds() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let (mut job, forward) = lab.start_job("doomed", &token);
    let name = lab.node_status("doomed")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let gw_has_job = || {
        lab.node_status("gw")["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == name.as_str()))
    };
    assert!(gw_has_job());
    let revoked_at = Instant::now();
    let out = run(
        "tern-lighthouse",
        &[
            "revoke",
            "--config",
            &lab.dir.path().join("lh.toml").to_string_lossy(),
            &name,
        ],
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("revoked {name}")), "{said}");
    // The expiry in RFC 3339, like every other time the tools print.
    assert!(
        said.contains("until it expires at 20") && !said.contains("unix"),
        "{said}"
    );
    wait_until(
        "the gateway drops the revoked job",
        Duration::from_secs(5),
        || !gw_has_job(),
    );
    eprintln!(
        "revoked → the gateway's session gone in {:?}",
        revoked_at.elapsed()
    );
    // The job itself was told, first: it says so once and stops with its
    // own exit code.
    let mut code = None;
    wait_until("the revoked job stops", Duration::from_secs(5), || {
        code = job.child.try_wait().ok().flatten().and_then(|s| s.code());
        code.is_some()
    });
    assert_eq!(code, Some(76), "{}", job.log());
    assert_eq!(
        job.log()
            .matches("this node's certificate is revoked")
            .count(),
        1,
        "{}",
        job.log()
    );
    // `tern status` on its socket says so, with the same exit code.
    let sock = lab.dir.path().join("doomed.sock");
    let out = run(
        "tern",
        &["status", "--socket", &sock.to_string_lossy()],
        Duration::from_secs(10),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("the last one stopped at 20")
            && said.contains("with exit code 76: this node's certificate was revoked"),
        "{said}"
    );
    // And it stays out: the job's traffic no longer reaches the service.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!gw_has_job());
    assert!(!get(forward).is_some_and(|r| r.contains("private hello")));
    // Unknown names are an error that says what to give instead.
    let out = run(
        "tern-lighthouse",
        &[
            "revoke",
            "--config",
            &lab.dir.path().join("lh.toml").to_string_lossy(),
            "ci-nobody",
        ],
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fingerprint"));
}

/// The lighthouse's enrollment port answers sources nobody verified: it
/// must not reflect more bytes than it receives, nor answer a flood faster
/// than its buckets allow, and a job must still enroll meanwhile.
#[test]
fn enrollment_answers_no_more_than_it_receives_and_a_flood_does_not_keep_a_job_out() {
    use std::net::UdpSocket;
    use tern_shared::enroll::{enroll_hello, ENROLL_HELLO_LEN, TYPE_ENROLL_CERT};

    const RATE: u64 = 20;
    let lab = lab_with("127.78.0", &format!("per_source_per_sec = {RATE}\n"));
    let lh = std::net::SocketAddr::from(([127, 0, 0, 1], lab.lh_port));
    // The flood comes from another /24 than the job (127.0.0.1).
    let flood = UdpSocket::bind("127.1.0.1:0").unwrap();
    flood.connect(lh).unwrap();
    let answered = |sock: &UdpSocket, wait: Duration| {
        sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 2048];
        sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    };
    // A full-size hello is answered with the certificate, in fewer bytes.
    let mut answer = None;
    wait_until(
        "a padded hello is answered",
        Duration::from_secs(10),
        || {
            let _ = flood.send(&enroll_hello());
            answer = answered(&flood, Duration::from_millis(200));
            answer.is_some()
        },
    );
    let answer = answer.unwrap();
    // Answers to earlier tries, if any, are not the undersized ones'.
    while answered(&flood, Duration::from_millis(300)).is_some() {}
    assert_eq!(answer[0], TYPE_ENROLL_CERT);
    assert!(answer.len() <= ENROLL_HELLO_LEN);
    // Undersized hellos and requests (any length short of the padding) get
    // nothing at all.
    for datagram in [
        vec![0x13],
        vec![0x13; ENROLL_HELLO_LEN - 1],
        vec![0x15; 200],
        vec![0x15; 1199],
    ] {
        flood.send(&datagram).unwrap();
        assert_eq!(
            answered(&flood, Duration::from_millis(300)),
            None,
            "{} bytes of type {:#x} were answered",
            datagram.len(),
            datagram[0]
        );
    }

    // A flood of padded hellos from one source for about two seconds (at
    // most 5000), counted by a thread, while a job enrolls.
    let counter = flood.try_clone().unwrap();
    let count = std::thread::spawn(move || {
        let mut n = 0u64;
        while answered(&counter, Duration::from_millis(1500)).is_some() {
            n += 1;
        }
        n
    });
    let token = lab.token("1", "ci");
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let hello = enroll_hello();
        for i in 0..5000u32 {
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
            let _ = flood.send(&hello);
            if i % 25 == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        started.elapsed()
    });
    let (_job, _forward) = lab.start_job("job", &token);
    let enrolled_in = started.elapsed();
    let flooded_for = sender.join().unwrap();
    let flood_answers = count.join().unwrap();
    eprintln!("flood: {flood_answers} answers over {flooded_for:?}; the job got through in {enrolled_in:?}");
    // A full bucket and its refill over the flood, no more (one answer of
    // slack for timing).
    let allowed = RATE + (RATE as f64 * flooded_for.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        flood_answers <= allowed,
        "{flood_answers} answers to the flood; the bucket allows {allowed}"
    );
    assert!(
        flood_answers >= RATE / 2,
        "the flood's source was shut out entirely"
    );
    let status = lab.lighthouse_status();
    let limited = status["enrollment"]["hellos"]["limited_per_source"]
        .as_u64()
        .unwrap_or(0);
    assert!(limited > 100, "{status}");
    assert!(
        status["enrollment"]["undersized"].as_u64() >= Some(4),
        "{status}"
    );
}

/// The readiness gate reports only the node it started: with another node
/// already on the config's API socket, `tern up` refuses at once (73),
/// naming the socket and that node, and spends no token; a node whose
/// enrollment fails is never reported ready (77). Without --log-file the
/// background node's log lies beside its socket, readable by its user only.
#[test]
fn the_readiness_gate_never_reports_a_node_it_did_not_start() {
    use std::os::unix::fs::PermissionsExt;
    let lab = lab();
    let token = lab.token("1", "ci");
    let (_job, _forward) = lab.start_job("busy", &token);
    let busy = lab.dir.path().join("busy.sock");
    let _down = Down(busy.clone());
    let target = format!("127.78.0.10:{}", lab.http_port);
    // The same config again (same socket), with the spent token.
    let config = lab.dir.path().join("busy.toml");
    let started = Instant::now();
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &config.to_string_lossy(),
            "--enroll-token",
            &token,
            "--wait-for",
            &target,
            "--wait-timeout",
            "10s",
        ],
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(73), "{stdout}\n{stderr}");
    assert!(!stdout.contains("ready"), "{stdout}");
    assert!(
        stderr.contains(&busy.to_string_lossy().to_string())
            && stderr.contains("node ci-")
            && stderr.contains("already runs on the API socket"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );

    // Another socket, the spent token: the enrollment fails, and the gate
    // says so with the node's own code, never "ready".
    let spent = lab.ci_config("spent", free_tcp());
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &spent.to_string_lossy(),
            "--enroll-token",
            &token,
            "--wait-for",
            &target,
            "--wait-timeout",
            "10s",
        ],
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(77), "{stdout}");
    assert!(!stdout.contains("ready"), "{stdout}");
    // Its log, beside its socket, is its user's alone.
    let log = lab.dir.path().join("spent.log");
    let mode = fs::metadata(&log).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "{}", log.display());
    assert!(fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("used up"));
}

/// A lighthouse without `[enroll]` says so to a node that tries to
/// enroll, which exits 77 with that reason at once instead of waiting for
/// an answer that never comes.
#[test]
fn a_lighthouse_that_does_not_enroll_says_so() {
    use tern_tests::enroll_lab::tern;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tern(
        d,
        &[
            "cert",
            "ca",
            "--name",
            "root",
            "--out-crt",
            "ca.crt",
            "--out-key",
            "ca.key",
        ],
    );
    tern(
        d,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "lh1",
            "--ip",
            "100.64.0.1/10",
            "--groups",
            "lighthouse",
            "--out-key",
            "lh1.key",
            "--out-crt",
            "lh1.crt",
        ],
    );
    let port = free_udp();
    fs::write(
        d.join("lh.toml"),
        format!("[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{port}\"\n[api]\nsocket = \"lh.sock\"\n"),
    )
    .unwrap();
    let _lh = tern_tests::Daemon::start(
        "tern-lighthouse",
        &["--config", &d.join("lh.toml").to_string_lossy()],
        d.join("lh.log"),
    );
    fs::write(
        d.join("ci.toml"),
        format!("[pki]\nca = \"ca.crt\"\n[listen]\naddr = \"127.0.0.1:{}\"\n[[lighthouses]]\nendpoint = \"127.0.0.1:{port}\"\n[tun]\nmode = \"userspace\"\n[api]\nsocket = \"ci.sock\"\n", free_udp()),
    )
    .unwrap();
    wait_until("the lighthouse listens", Duration::from_secs(10), || {
        d.join("lh.sock").exists()
    });
    let started = Instant::now();
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &d.join("ci.toml").to_string_lossy(),
            "--enroll-token",
            "tern1_x",
        ],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(
        stderr.contains("enrollment is not enabled on this lighthouse"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "at once: {:?}",
        started.elapsed()
    );
}

/// SIGHUP reloads a running lighthouse: enrollment goes off and on with
/// `[enroll]`, a file that does not parse changes nothing, and the
/// lighthouse lives through it all, saying what it did.
#[test]
fn sighup_reloads_the_lighthouse_and_a_bad_file_changes_nothing() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let lh_toml = lab.dir.path().join("lh.toml");
    let original = fs::read_to_string(&lh_toml).unwrap();
    let pid = lab.lighthouse_status()["pid"]
        .as_u64()
        .expect("the lighthouse's pid") as i32;
    let log = || fs::read_to_string(lab.dir.path().join("lh.log")).unwrap_or_default();
    let hup = |expect: &str| {
        let before = log().matches(expect).count();
        // Our own child's pid, from its own status.
        let sent = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        wait_until(expect, Duration::from_secs(10), || {
            log().matches(expect).count() > before
        });
    };
    // Without [enroll]: enrollment off; a job is told so at once (77).
    let without = original.split("[enroll]").next().unwrap().to_string();
    fs::write(&lh_toml, &without).unwrap();
    hup("config reloaded");
    assert!(log().contains("[enroll] (enrollment off)"), "{}", log());
    let ci = lab.ci_config("job", free_tcp());
    let out = run(
        "tern",
        &[
            "up",
            "--config",
            &ci.to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains("not enabled"), "{stderr}");
    // A broken file: refused, nothing changes, the lighthouse lives.
    fs::write(&lh_toml, "[pki\nthis is not toml").unwrap();
    hup("config not reloaded");
    assert!(
        lab.lighthouse_status()["pid"].as_u64().is_some(),
        "the lighthouse still answers"
    );
    // [enroll] back, and a log level: the same (unspent) token enrolls now.
    fs::write(&lh_toml, format!("[log]\nlevel = \"debug\"\n{original}")).unwrap();
    hup("config reloaded");
    assert!(log().contains("[log] level"), "{}", log());
    let (_job, _forward) = lab.start_job("job2", &token);
}

/// `tern ping` says at once when no lighthouse knows an address (68), and
/// finds a node by its certificate name through the lighthouses when it
/// is not in the table yet.
#[test]
fn ping_knows_unknown_addresses_at_once_and_finds_names_through_the_lighthouse() {
    let lab = lab();
    let (_a, _) = lab.start_job("pinger", &lab.token("1", "ci"));
    let mine = lab.node_status("pinger")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (_b, _) = lab.start_job("other", &lab.token("1", "ci"));
    let other = lab
        .registered()
        .into_iter()
        .find(|n| n.starts_with("ci-") && *n != mine)
        .expect("the other job's name");
    let socket = lab.dir.path().join("pinger.sock");
    let ping = |peer: &str| {
        run(
            "tern",
            &[
                "ping",
                "--socket",
                &socket.to_string_lossy(),
                "-n",
                "1",
                peer,
            ],
            Duration::from_secs(20),
        )
    };
    let started = Instant::now();
    let out = ping("100.64.55.55");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(68), "{stderr}");
    assert!(
        stderr.contains("no lighthouse knows 100.64.55.55"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "at once: {:?}",
        started.elapsed()
    );
    let out = ping("no-such-node");
    assert_eq!(
        out.status.code(),
        Some(68),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // By name, never met before.
    let out = ping(&other);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("answer from {other}")), "{stdout}");
}
