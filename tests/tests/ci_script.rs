//! The CI integration script, `ci/tern-ci.sh` (behind action.yml and
//! ci/gitlab-ci.yml): its own tests with a fake `tern` (ci/test-tern-ci.sh),
//! and end to end on loopback, no root: the real `tern` and a real lighthouse
//! with `[enroll]`, a token from `tern-lighthouse token create`, a userspace
//! node that waits for a private TCP service behind a userspace gateway, and
//! `down`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tern_tests::enroll_lab::{get, lab_with, Down, Lab};
use tern_tests::{bin, free_tcp, run_bounded, wait_until};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `bash ci/tern-ci.sh CMD` with exactly these TERN_*/GITHUB_* variables:
/// whatever a CI system around the tests set is removed first.
fn script(cmd: &str, env: &[(&str, String)]) -> Output {
    let mut c = Command::new("bash");
    c.arg(repo().join("ci/tern-ci.sh")).arg(cmd);
    for (key, _) in std::env::vars() {
        if ["TERN_", "GITHUB_", "ACTIONS_", "RUNNER_"]
            .iter()
            .any(|p| key.starts_with(p))
        {
            c.env_remove(key);
        }
    }
    for (key, value) in env {
        c.env(key, value);
    }
    run_bounded(c, &format!("tern-ci.sh {cmd}"), Duration::from_secs(30))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lab, its private network 127.79.0.0/24 (the enrollment tests use
/// 127.78.0.0/24).
fn lab() -> Lab {
    lab_with("127.79.0", "")
}

/// The script's inputs for a userspace CI job with this token.
fn inputs(lab: &Lab, state: &Path, token: &str) -> Vec<(&'static str, String)> {
    let ca = fs::read_to_string(lab.dir.path().join("ca.crt")).unwrap();
    vec![
        // A name, as users give it: the script resolves it.
        ("TERN_LIGHTHOUSE", format!("localhost:{}", lab.lh_port)),
        ("TERN_CA", ca),
        ("TERN_TOKEN", token.to_string()),
        ("TERN_MODE", "userspace".to_string()),
        ("TERN_WAIT_TIMEOUT", "10s".to_string()),
        ("TERN_STATE_DIR", state.to_string_lossy().into_owned()),
        ("TERN_BIN", bin("tern").to_string_lossy().into_owned()),
    ]
}

#[test]
fn the_script_passes_its_own_tests_with_a_fake_tern() {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("ci/test-tern-ci.sh"));
    for (key, _) in std::env::vars() {
        if key.starts_with("GITHUB_") || key.starts_with("TERN_") {
            cmd.env_remove(key);
        }
    }
    let out = run_bounded(cmd, "ci/test-tern-ci.sh", Duration::from_secs(120));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn the_script_joins_a_real_mesh_waits_for_a_service_and_leaves() {
    let lab = lab();
    let d = lab.dir.path();
    let target = format!("{}:{}", lab.service_ip, lab.http_port);

    // 1. up with a token, waiting for the private service behind the gateway,
    //    a forward to it, GitHub's output files.
    let token = lab.token("1", "ci");
    let state = d.join("job");
    let sock = state.join("api/tern.sock");
    let _down = Down(sock.clone());
    let forward = free_tcp();
    let (gh_output, gh_env) = (d.join("github_output"), d.join("github_env"));
    let mut env = inputs(&lab, &state, &token);
    env.extend([
        ("TERN_WAIT_FOR", target.clone()),
        ("TERN_FORWARDS", format!("127.0.0.1:{forward}={target}")),
        ("GITHUB_ACTIONS", "true".to_string()),
        ("GITHUB_OUTPUT", gh_output.to_string_lossy().into_owned()),
        ("GITHUB_ENV", gh_env.to_string_lossy().into_owned()),
    ]);
    let started = Instant::now();
    let up = script("up", &env);
    let (stdout, stderr) = text(&up);
    eprintln!(
        "tern-ci.sh up returned after {:?}:\n{stdout}{stderr}",
        started.elapsed()
    );
    assert_eq!(up.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("ready: {target}")), "{stdout}");
    assert!(
        stderr.contains("tern-ci: joined the mesh as ci-"),
        "{stderr}"
    );
    assert!(!stdout.contains(&token) && !stderr.contains(&token));
    let config = state.join("node.toml");
    let written = fs::read_to_string(&config).unwrap();
    assert!(
        written.contains(&format!("endpoint = \"127.0.0.1:{}\"", lab.lh_port)),
        "{written}"
    );
    assert!(fs::read_to_string(&gh_output)
        .unwrap()
        .contains(&format!("config={}", config.display())));
    assert!(fs::read_to_string(&gh_env)
        .unwrap()
        .contains(&format!("TERN_CONFIG={}", config.display())));
    // Registered with the lighthouse, and the way in works at once.
    assert!(sock.exists());
    let nodes = lab.registered();
    assert!(nodes.iter().any(|n| n.starts_with("ci-")), "{nodes:?}");
    assert!(get(forward).is_some_and(|r| r.contains("private hello")));

    // 2. The same (used up) token again: 77, explained, no token shown.
    let spent = d.join("spent");
    let mut env = inputs(&lab, &spent, &token);
    env.push(("TERN_WAIT_FOR", target.clone()));
    let again = script("up", &env);
    let (stdout, stderr) = text(&again);
    assert_eq!(again.status.code(), Some(77), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("tern-ci: the lighthouse refused the enrollment; check"),
        "{stderr}"
    );
    assert!(stderr.contains("used up"), "{stderr}");
    assert!(!stdout.contains(&token) && !stderr.contains(&token));
    let cleanup = script(
        "down",
        &[("TERN_STATE_DIR", spent.to_string_lossy().into_owned())],
    );
    assert_eq!(cleanup.status.code(), Some(0));
    assert!(!spent.exists());

    // 3. Without TERN_WAIT_FOR: the node in the background, ready once
    //    registered.
    let token2 = lab.token("1", "ci");
    let bg = d.join("bg");
    let bg_sock = bg.join("api/tern.sock");
    let _down_bg = Down(bg_sock.clone());
    let up = script("up", &inputs(&lab, &bg, &token2));
    let (stdout, stderr) = text(&up);
    assert_eq!(up.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("tern-ci: joined the mesh as ci-"),
        "{stderr}"
    );
    assert!(bg_sock.exists());

    // 4. down: both nodes leave, their state directories go.
    for (state, sock) in [(&state, &sock), (&bg, &bg_sock)] {
        let down = script(
            "down",
            &[("TERN_STATE_DIR", state.to_string_lossy().into_owned())],
        );
        let (stdout, stderr) = text(&down);
        assert_eq!(down.status.code(), Some(0), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("tern-ci: the node left the mesh"),
            "{stderr}"
        );
        assert!(!sock.exists());
        assert!(!state.exists());
    }
    wait_until(
        "the lighthouse forgets the jobs",
        Duration::from_secs(5),
        || !lab.registered().iter().any(|n| n.starts_with("ci-")),
    );
    // A second down (a post step after a failed up, say) is fine too.
    let again = script(
        "down",
        &[("TERN_STATE_DIR", state.to_string_lossy().into_owned())],
    );
    assert_eq!(again.status.code(), Some(0));
    eprintln!("the whole test took {:?}", started.elapsed());
}
