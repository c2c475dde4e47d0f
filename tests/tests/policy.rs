//! `tern policy test|explain` as a user runs it: the shipped examples pass,
//! a failing test names the rule that decided it, a broken tests file is
//! named with its line, and a caller may be a certificate file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_tests::run;

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name)
        .display()
        .to_string()
}

fn tern(args: &[&str]) -> (i32, String, String) {
    let out = run("tern", args, Duration::from_secs(30));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path.display().to_string()
}

#[test]
fn the_example_tests_pass_and_failures_name_their_rule() {
    let gateway = example("gateway.toml");
    let (code, stdout, stderr) = tern(&[
        "policy",
        "test",
        "--config",
        &gateway,
        &example("policy-tests.toml"),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("9 tests: 9 passed, 0 failed"), "{stdout}");
    assert!(
        !stdout.contains("PASS"),
        "quiet without --explain: {stdout}"
    );

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let tests = write(
        dir.path(),
        "wrong.toml",
        "[[test]]\nname = \"ssh is closed\"\ngroups = [\"ci\"]\nto = \"198.19.0.10:22/tcp\"\nexpect = \"deny\"\n\n[[test]]\ngroups = [\"ci\"]\nto = \"198.19.0.10:8080/tcp\"\nexpect = \"allow\"\n",
    );
    let (code, stdout, _) = tern(&["policy", "test", "--config", &gateway, &tests]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("FAIL  ssh is closed (")
            && stdout.contains("wrong.toml:1): a caller in groups [ci] to 198.19.0.10:22/tcp: expected deny, got allow")
            && stdout.contains("allowed by inbound rule-1 (gateway.toml:65: proto tcp, port 22, groups [ci], local_cidr 198.19.0.10/32, action allow)")
            && stdout.contains("2 tests: 1 passed, 1 failed"),
        "{stdout}"
    );
    let (code, stdout, _) = tern(&["policy", "test", "--explain", "--config", &gateway, &tests]);
    assert_eq!(code, 1);
    assert!(stdout.contains("PASS  test 2 ("), "{stdout}");
    assert!(
        stdout.contains("allowed by inbound rule-0 (gateway.toml:58"),
        "{stdout}"
    );
}

#[test]
fn broken_files_are_named_with_their_line() {
    let gateway = example("gateway.toml");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cases = [
        (
            "unknown.toml",
            "[[test]]\ngroups = [\"ci\"]\nto = \"198.19.0.10\"\n\nexpct = \"allow\"\n",
            ":5: unknown key `expct`",
        ),
        (
            "syntax.toml",
            "[[test]]\ngroups = [\"ci\"\nto = \"198.19.0.10\"\n",
            ":3: ",
        ),
        (
            "port.toml",
            "[[test]]\ngroups = [\"ci\"]\nto = \"198.19.0.10:99999/tcp\"\nexpect = \"allow\"\n",
            ":3: destination \"198.19.0.10:99999/tcp\"",
        ),
    ];
    for (name, text, expected) in cases {
        let tests = write(dir.path(), name, text);
        let (code, stdout, stderr) = tern(&["policy", "test", "--config", &gateway, &tests]);
        assert_eq!(code, 2, "{name}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("{name}{expected}")),
            "{name}: {stderr}"
        );
    }
    let (code, _, stderr) = tern(&[
        "policy",
        "test",
        "--config",
        &dir.path().join("missing.toml").display().to_string(),
        &example("policy-tests.toml"),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn a_certificate_is_a_caller_and_explain_answers_one_question() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = |f: &str| dir.path().join(f).display().to_string();
    let ok = |args: &[&str]| {
        let (code, stdout, stderr) = tern(args);
        assert_eq!(code, 0, "tern {args:?}: {stdout}{stderr}");
    };
    ok(&[
        "cert",
        "ca",
        "--name",
        "ca",
        "--out-crt",
        &d("ca.crt"),
        "--out-key",
        &d("ca.key"),
    ]);
    let (ca_crt, ca_key) = (d("ca.crt"), d("ca.key"));
    for (name, ip, groups) in [
        ("gw-1", "100.64.0.10/10", "infra"),
        ("admin-1", "100.64.0.7/10", "ops"),
    ] {
        let mut args = vec![
            "cert", "sign", "--ca-crt", &ca_crt, "--ca-key", &ca_key, "--name", name, "--ip", ip,
            "--groups", groups,
        ];
        let key = d(&format!("{name}.key"));
        let crt = d(&format!("{name}.crt"));
        args.extend(["--out-key", &key, "--out-crt", &crt]);
        if name == "gw-1" {
            args.extend(["--subnets", "198.19.0.0/24"]);
        }
        ok(&args);
    }
    let config = write(
        dir.path(),
        "gw-1.toml",
        "[pki]\nca = \"ca.crt\"\ncert = \"gw-1.crt\"\nkey = \"gw-1.key\"\n[gateway]\nsubnets = [\"198.19.0.0/24\"]\n\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"22\"\nhost = \"admin-1\"\ncidr = \"100.64.0.0/24\"\nlocal_cidr = \"198.19.0.0/24\"\n\n[[firewall.inbound]]\nproto = \"tcp\"\nport = \"9100\"\ngroups = [\"ops\"]\n",
    );
    let tests = write(
        dir.path(),
        "tests.toml",
        "[[test]]\ncert = \"admin-1.crt\"\nto = \"198.19.0.0/24:22/tcp\"\nexpect = \"allow\"\n\n[[test]]\ncert = \"admin-1.crt\"\nto = \"100.64.0.10:9100/tcp\"\nexpect = \"allow\"\nnode = \"gw-1\"\n\n[[test]]\ngroups = [\"ops\"]\ncaller = \"admin-1\"\nfrom = \"100.64.1.7\"\nto = \"198.19.0.5:22/tcp\"\nexpect = \"deny\"\n",
    );
    let (code, stdout, stderr) = tern(&["policy", "test", "--config", &config, &tests]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("3 tests: 3 passed"), "{stdout}");

    // Without the caller's name, a host rule cannot decide: said, not guessed.
    let (code, stdout, _) = tern(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--groups",
        "ops",
        "198.19.0.5:22/tcp",
    ]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("undecidable") && stdout.contains("names a host"),
        "{stdout}"
    );
    let (code, stdout, _) = tern(&[
        "policy",
        "explain",
        "--config",
        &config,
        "--cert",
        &d("admin-1.crt"),
        "198.19.0.5:22/tcp",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("admin-1 in groups [ops] from 100.64.0.7 to 198.19.0.5:22/tcp: allowed")
            && stdout.contains(
                "gw-1 (gw-1.toml): 198.19.0.5:22/tcp allowed by inbound rule-0 (gw-1.toml:8"
            ),
        "{stdout}"
    );
    let (code, stdout, _) = tern(&[
        "policy",
        "explain",
        "-c",
        &config,
        "--groups",
        "ops",
        "198.19.9.9/icmp",
    ]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("no node among the configs owns or routes 198.19.9.9/32"),
        "{stdout}"
    );
    let (code, _, stderr) = tern(&[
        "policy",
        "explain",
        "-c",
        &config,
        "--groups",
        "ops",
        "198.19.0.5:22/icmp",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("ICMP has no ports"), "{stderr}");
}
