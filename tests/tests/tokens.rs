//! `tern-lighthouse token create | list | revoke` on loopback, no root: a
//! token the issuer would refuse is refused when it is made, the list shows
//! ids and never the secret, a revoked token no longer enrolls, and a
//! config without `[enroll]` (or a lighthouse started without it) is named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::process::Output;
use std::time::Duration;

use tern_shared::enroll::token_hash;
use tern_tests::enroll_lab::{lab_with, Lab};
use tern_tests::{free_tcp, free_udp, run, wait_until, Daemon};

/// This file's private network (each test file its own).
const SUBNET: &str = "127.82.0";

fn lab() -> Lab {
    lab_with(SUBNET, "")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `tern-lighthouse token ARGS --config CONFIG`, from the lab's directory.
fn token_cmd(config: &std::path::Path, args: &[&str]) -> Output {
    let config = config.to_string_lossy();
    let mut all = vec!["token"];
    all.extend_from_slice(&args[..1]);
    all.extend(["--config", &config]);
    all.extend_from_slice(&args[1..]);
    run("tern-lighthouse", &all, Duration::from_secs(10))
}

fn lh_toml(lab: &Lab) -> std::path::PathBuf {
    lab.dir.path().join("lh.toml")
}

/// `token create` with these groups and certificate lifetime (1 h, 3 uses).
fn create(lab: &Lab, groups: &str, cert_ttl: &str) -> Output {
    token_cmd(
        &lh_toml(lab),
        &[
            "create",
            "--groups",
            groups,
            "--ttl",
            "1h",
            "--uses",
            "3",
            "--cert-ttl",
            cert_ttl,
        ],
    )
}

/// `token list --json` of the lab's store.
fn listed(lab: &Lab) -> Vec<serde_json::Value> {
    let out = token_cmd(&lh_toml(lab), &["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_token_for_a_group_the_issuer_may_not_sign_is_refused_and_nothing_is_created() {
    let lab = lab();
    let out = create(&lab, "ci,admin", "30m");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("group \"admin\"") && err.contains("\"lh-issuer\""),
        "names the group and the issuer: {err}"
    );
    assert!(err.contains("no token was created"), "{err}");
    assert!(out.stdout.is_empty(), "no token on stdout");
    assert!(listed(&lab).is_empty(), "nothing stored");
}

#[test]
fn a_cert_ttl_beyond_the_issuers_maximum_is_refused_and_nothing_is_created() {
    let lab = lab();
    let out = create(&lab, "ci", "5h");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--cert-ttl 5h") && err.contains("at most 1h") && err.contains("lh-issuer"),
        "names the limit and the issuer: {err}"
    );
    assert!(out.stdout.is_empty(), "no token on stdout");
    assert!(listed(&lab).is_empty(), "nothing stored");
    // The maximum itself is fine.
    assert!(create(&lab, "ci", "1h").status.success());
    assert_eq!(listed(&lab).len(), 1);
}

#[test]
fn token_list_shows_a_created_token_with_its_groups_and_uses_but_never_the_secret() {
    let lab = lab();
    // Once the lighthouse answers, and enrolls: no warning then.
    wait_until("the lighthouse enrolls", Duration::from_secs(10), || {
        lab.lighthouse_status().get("enrollment").is_some()
    });
    let out = create(&lab, "ci,deploy", "30m");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(text(&out.stdout), format!("{token}\n"), "the token alone");
    let hash = token_hash(&token);
    let id = &hash[..12];
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "token id {id}, groups ci,deploy, 3 uses, expires "
        )),
        "{err}"
    );
    assert!(!err.contains(&token), "{err}");
    assert!(!err.contains("warning"), "this lighthouse enrolls: {err}");

    let list = listed(&lab);
    assert_eq!(list.len(), 1, "{list:?}");
    let t = &list[0];
    assert_eq!(t["id"], id);
    assert_eq!(t["groups"], serde_json::json!(["ci", "deploy"]));
    assert_eq!(t["uses_left"], 3);
    assert_eq!(t["cert_ttl_secs"], 1800);
    assert_eq!(
        (t["expired"].as_bool(), t["used_up"].as_bool()),
        (Some(false), Some(false))
    );
    for when in ["expires", "created"] {
        let at = t[when].as_str().unwrap();
        assert!(
            at.len() == 20 && at.ends_with('Z') && at.contains('T'),
            "{when} {at}"
        );
    }

    let table = token_cmd(&lh_toml(&lab), &["list"]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    let shown = format!("{}{}", text(&table.stdout), text(&table.stderr));
    let row = shown
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        row.contains("ci,deploy") && row.contains(" 3 ") && row.contains("valid"),
        "{row}"
    );
    // Neither the token nor the hash beyond its id, in either form.
    let json = text(&token_cmd(&lh_toml(&lab), &["list", "--json"]).stdout);
    for out in [&shown, &json] {
        assert!(!out.contains(&token[6..18]), "{out}");
        assert!(!out.contains(&hash[..13]), "{out}");
    }
}

#[test]
fn a_revoked_token_is_refused_at_enrollment_with_77() {
    let lab = lab();
    let token = lab.token("1", "ci");
    let other = lab.token("1", "ci");
    let id = token_hash(&token)[..12].to_string();
    let config = lh_toml(&lab);

    let short = token_cmd(&config, &["revoke", &id[..7]]);
    assert!(!short.status.success());
    assert!(
        text(&short.stderr).contains("too short"),
        "{}",
        text(&short.stderr)
    );

    let out = token_cmd(&config, &["revoke", &id[..8]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("revoked token {id}")),
        "{}",
        text(&out.stdout)
    );
    let left: Vec<_> = listed(&lab).iter().map(|t| t["id"].clone()).collect();
    assert_eq!(left, [serde_json::json!(token_hash(&other)[..12])]);

    let again = token_cmd(&config, &["revoke", &id]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("no token has an id starting with"),
        "{}",
        text(&again.stderr)
    );

    let job = run(
        "tern",
        &[
            "up",
            "--config",
            &lab.ci_config("revoked", free_tcp()).to_string_lossy(),
            "--enroll-token",
            &token,
        ],
        Duration::from_secs(20),
    );
    let err = text(&job.stderr);
    assert_eq!(job.status.code(), Some(77), "{err}");
    assert!(err.contains("unknown"), "{err}");
}

#[test]
fn token_create_refuses_a_config_without_enroll_and_warns_about_a_lighthouse_started_without_it() {
    let lab = lab();
    let d = lab.dir.path();
    // A second lighthouse, from a config without [enroll].
    let config = d.join("plain.toml");
    fs::write(
        &config,
        format!(
            "[pki]\nca = \"ca.crt\"\ncert = \"lh1.crt\"\nkey = \"lh1.key\"\n[listen]\naddr = \"127.0.0.1:{}\"\n[api]\nsocket = \"plain.sock\"\n",
            free_udp()
        ),
    )
    .unwrap();
    let plain = Daemon::start(
        "tern-lighthouse",
        &["--config", &config.to_string_lossy()],
        d.join("plain.log"),
    );
    wait_until(
        "the plain lighthouse answers",
        Duration::from_secs(10),
        || {
            run(
                "tern-lighthouse",
                &["status", "--json", "--config", &config.to_string_lossy()],
                Duration::from_secs(5),
            )
            .status
            .success()
        },
    );
    let args = ["create", "--groups", "ci", "--cert-ttl", "30m"];
    let out = token_cmd(&config, &args);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("has no [enroll] section")
            && err.contains("config/lighthouse.toml")
            && err.contains("restart the lighthouse"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // [enroll] added to the file, the lighthouse not restarted: the token
    // is made (the store is the config's), with a warning.
    let mut text_now = fs::read_to_string(&config).unwrap();
    text_now.push_str(
        "[enroll]\nissuer_cert = \"issuer.crt\"\nissuer_key = \"issuer.key\"\nstore = \"plain.db\"\n",
    );
    fs::write(&config, text_now).unwrap();
    let out = token_cmd(&config, &args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(text(&out.stdout).trim().starts_with("tern1_"));
    assert!(
        err.contains("warning: the lighthouse running on")
            && err.contains("started without [enroll]")
            && err.contains("until it reloads"),
        "{err}"
    );

    // No lighthouse answering: no warning (it may not run yet).
    drop(plain);
    let out = token_cmd(&config, &args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
}
