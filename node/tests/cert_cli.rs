//! Runs the real `tern` binary through the `tern cert` flows an admin uses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use tern_shared::cert::Cert;
use tern_shared::keys::NodeSecretKey;

fn tern(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run tern")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = tern(dir, args);
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with exit code 1; returns its stderr.
fn fails(dir: &Path, args: &[&str]) -> String {
    let out = tern(dir, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "tern {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn make_ca(dir: &Path, name: &str, extra: &[&str]) {
    let crt = format!("{name}.crt");
    let key = format!("{name}.key");
    let mut args = vec![
        "cert",
        "ca",
        "--name",
        name,
        "--out-crt",
        &crt,
        "--out-key",
        &key,
    ];
    args.extend_from_slice(extra);
    ok(dir, &args);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read_cert(path: &Path) -> Cert {
    Cert::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn full_flow_ca_keygen_sign_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(
        dir,
        "ca",
        &["--ips", "100.64.0.0/10", "--groups", "ci,db,lighthouse"],
    );
    ok(
        dir,
        &[
            "cert",
            "keygen",
            "--out-key",
            "node.key",
            "--out-pub",
            "node.pub",
        ],
    );
    ok(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "node-1",
            "--ip",
            "100.64.0.5/10",
            "--groups",
            "db,ci",
            "--subnets",
            "198.19.0.0/16,10.1.0.0/16",
            "--duration",
            "24h",
            "--in-pub",
            "node.pub",
            "--out-crt",
            "node.crt",
        ],
    );
    let out = ok(dir, &["cert", "verify", "--ca", "ca.crt", "node.crt"]);
    assert!(out.starts_with("valid: node-1 "), "{out}");
    assert!(out.contains("100.64.0.5/10"), "{out}");

    let cert = read_cert(&dir.join("node.crt"));
    let key =
        NodeSecretKey::from_pem(&std::fs::read_to_string(dir.join("node.key")).unwrap()).unwrap();
    assert_eq!(cert.body.public_key, key.public_bytes());
    assert_eq!(cert.body.groups, vec!["ci".to_string(), "db".to_string()]);
    assert_eq!(cert.body.not_after - cert.body.not_before, 24 * 3600);
    assert_eq!(
        cert.body.issuer,
        read_cert(&dir.join("ca.crt")).fingerprint()
    );

    let text = ok(dir, &["cert", "print", "node.crt"]);
    for needle in [
        "kind:        node",
        "name:        node-1",
        "groups:      ci, db",
        "198.19.0.0/16",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from\n{text}");
    }
    assert!(text.contains(&cert.fingerprint().to_string()), "{text}");
}

#[test]
fn sign_with_out_key_generates_the_node_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &["--duration", "48h"]);
    ok(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "ci-job",
            "--ip",
            "100.64.9.9/10",
            "--out-key",
            "job.key",
            "--out-crt",
            "job.crt",
        ],
    );
    let cert = read_cert(&dir.join("job.crt"));
    let key =
        NodeSecretKey::from_pem(&std::fs::read_to_string(dir.join("job.key")).unwrap()).unwrap();
    assert_eq!(cert.body.public_key, key.public_bytes());
    // Default validity: until one second before the CA expires.
    let ca = read_cert(&dir.join("ca.crt"));
    assert_eq!(cert.body.not_after, ca.body.not_after - 1);
    assert_eq!(mode(&dir.join("job.key")), 0o600);
    ok(dir, &["cert", "verify", "--ca", "ca.crt", "job.crt"]);
}

#[test]
fn ip_without_a_prefix_takes_the_cas_network_or_says_to_give_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &["--ips", "100.64.0.0/10"]);
    make_ca(dir, "open", &[]);
    let sign = |ca: &str, ip: &str| {
        let (crt, key) = (format!("{ca}.crt"), format!("{ca}.key"));
        tern(
            dir,
            &[
                "cert",
                "sign",
                "--ca-crt",
                &crt,
                "--ca-key",
                &key,
                "--name",
                "n",
                "--ip",
                ip,
                "--out-key",
                "n.key",
                "--out-crt",
                "n.crt",
                "--force",
            ],
        )
    };
    // The CA's one network holding the address gives the prefix, and says so.
    let out = sign("ca", "100.64.0.5");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("/10") && err.contains("100.64.0.0/10"),
        "{err}"
    );
    assert_eq!(
        read_cert(&dir.join("n.crt")).body.ips,
        vec!["100.64.0.5/10".parse().unwrap()]
    );
    // A CA that constrains nothing has no prefix to give.
    let out = sign("open", "100.64.0.5");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ip 100.64.0.5: give the mesh prefix too, e.g. 100.64.0.5/10"),
        "{err}"
    );
    // Neither an address nor a network: the usage error says what is wanted.
    let out = sign("ca", "100.64.0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("with the mesh prefix, e.g. 100.64.0.5/10"),
        "{err}"
    );
}

#[test]
fn sign_needs_exactly_one_of_in_pub_and_out_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &[]);
    ok(
        dir,
        &["cert", "keygen", "--out-key", "n.key", "--out-pub", "n.pub"],
    );
    let base = [
        "cert",
        "sign",
        "--ca-crt",
        "ca.crt",
        "--ca-key",
        "ca.key",
        "--name",
        "n",
        "--ip",
        "100.64.0.7/10",
        "--out-crt",
        "n.crt",
    ];
    for extra in [
        &[][..],
        &["--in-pub", "n.pub", "--out-key", "other.key"][..],
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = tern(dir, &args);
        assert!(!out.status.success(), "{extra:?}");
        assert!(!dir.join("n.crt").exists());
    }
}

#[test]
fn verify_with_a_different_ca_fails_with_unknown_issuer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &[]);
    make_ca(dir, "other", &[]);
    ok(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "node-1",
            "--ip",
            "100.64.0.5/10",
            "--out-key",
            "n.key",
            "--out-crt",
            "n.crt",
        ],
    );
    let err = fails(dir, &["cert", "verify", "--ca", "other.crt", "n.crt"]);
    assert!(err.starts_with("invalid: "), "{err}");
    assert!(err.contains("unknown"), "{err}");

    // A bundle holding both CAs accepts it.
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("other.crt")).unwrap(),
        std::fs::read_to_string(dir.join("ca.crt")).unwrap()
    );
    std::fs::write(dir.join("bundle.crt"), bundle).unwrap();
    ok(dir, &["cert", "verify", "--ca", "bundle.crt", "n.crt"]);
}

#[test]
fn expired_cert_is_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &[]);
    ok(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "short",
            "--ip",
            "100.64.0.5/10",
            "--duration",
            "1s",
            "--out-key",
            "n.key",
            "--out-crt",
            "n.crt",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let err = fails(dir, &["cert", "verify", "--ca", "ca.crt", "n.crt"]);
    assert!(err.contains("invalid: certificate expired at "), "{err}");
}

#[test]
fn ip_outside_ca_constraint_is_refused_at_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &["--ips", "100.64.0.0/10", "--groups", "ci"]);
    let err = fails(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "n",
            "--ip",
            "10.0.0.5/8",
            "--out-key",
            "n.key",
            "--out-crt",
            "n.crt",
        ],
    );
    assert!(
        err.contains("10.0.0.5/8") && err.contains("outside"),
        "{err}"
    );
    assert!(!dir.join("n.crt").exists() && !dir.join("n.key").exists());

    let err = fails(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "n",
            "--ip",
            "100.64.0.5/10",
            "--groups",
            "admin",
            "--out-key",
            "n.key",
            "--out-crt",
            "n.crt",
        ],
    );
    assert!(err.contains("\"admin\""), "{err}");
}

#[test]
fn existing_file_without_force_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        dir,
        &["cert", "keygen", "--out-key", "n.key", "--out-pub", "n.pub"],
    );
    let before = std::fs::read(dir.join("n.key")).unwrap();
    let err = fails(
        dir,
        &[
            "cert",
            "keygen",
            "--out-key",
            "n.key",
            "--out-pub",
            "n2.pub",
        ],
    );
    assert!(err.contains("n.key") && err.contains("--force"), "{err}");
    assert!(
        !dir.join("n2.pub").exists(),
        "nothing is written when refused"
    );
    assert_eq!(std::fs::read(dir.join("n.key")).unwrap(), before);

    // --force overwrites, and tightens the mode of a file that was too open.
    std::fs::set_permissions(dir.join("n.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    ok(
        dir,
        &[
            "cert",
            "keygen",
            "--out-key",
            "n.key",
            "--out-pub",
            "n.pub",
            "--force",
        ],
    );
    assert_ne!(std::fs::read(dir.join("n.key")).unwrap(), before);
    assert_eq!(mode(&dir.join("n.key")), 0o600);

    make_ca(dir, "ca", &[]);
    let err = fails(
        dir,
        &[
            "cert",
            "ca",
            "--name",
            "x",
            "--out-crt",
            "ca.crt",
            "--out-key",
            "new.key",
        ],
    );
    assert!(err.contains("ca.crt") && err.contains("--force"), "{err}");
    assert!(!dir.join("new.key").exists());
}

#[test]
fn key_files_are_private_and_certs_public() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &[]);
    ok(
        dir,
        &["cert", "keygen", "--out-key", "n.key", "--out-pub", "n.pub"],
    );
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("n.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.crt")), 0o644);
    assert_eq!(mode(&dir.join("n.pub")), 0o644);
}

#[test]
fn print_json_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca", &["--groups", "ci"]);
    ok(
        dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "node-1",
            "--ip",
            "100.64.0.5/10",
            "--groups",
            "ci",
            "--out-key",
            "n.key",
            "--out-crt",
            "n.crt",
        ],
    );
    let out = ok(dir, &["cert", "print", "--json", "n.crt"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "node");
    assert_eq!(v["name"], "node-1");
    assert_eq!(v["ips"][0], "100.64.0.5/10");
    assert_eq!(v["groups"][0], "ci");
    let cert = read_cert(&dir.join("n.crt"));
    assert_eq!(v["fingerprint"], cert.fingerprint().to_string());
    assert_eq!(v["issuer"], cert.body.issuer.to_string());
    assert!(v["not_after"].as_str().unwrap().ends_with('Z'));

    // A file with several certs prints one object per line.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
        std::fs::read_to_string(dir.join("n.crt")).unwrap()
    );
    std::fs::write(dir.join("both.crt"), both).unwrap();
    let out = ok(dir, &["cert", "print", "--json", "both.crt"]);
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["ca", "node"]);
}

#[test]
fn an_issuer_signs_short_lived_ci_identities_only_within_its_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(
        d,
        "ca",
        &["--ips", "100.64.0.0/10", "--groups", "ci,deploy,db"],
    );
    let out = ok(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "lh-issuer",
            "--ips",
            "100.64.100.0/24",
            "--groups",
            "ci,deploy",
            "--max-duration",
            "1h",
            "--out-key",
            "issuer.key",
            "--out-crt",
            "issuer.crt",
        ],
    );
    assert!(out.contains("names ci-*"), "{out}");
    assert_eq!(mode(&d.join("issuer.key")), 0o600);
    let issuer = read_cert(&d.join("issuer.crt"));
    assert_eq!(issuer.body.kind, tern_shared::cert::CertKind::Issuer);
    assert_eq!(issuer.body.max_lifetime, 3600);
    // A node under it: default lifetime is the issuer's maximum.
    let sign = |name: &str, ip: &str, extra: &[&str]| {
        let mut args = vec![
            "cert",
            "sign",
            "--ca-crt",
            "issuer.crt",
            "--ca-key",
            "issuer.key",
            "--name",
            name,
            "--ip",
            ip,
            "--out-key",
        ];
        let key = format!("{name}.key");
        let crt = format!("{name}.crt");
        args.extend_from_slice(&[key.as_str(), "--out-crt", crt.as_str()]);
        args.extend_from_slice(extra);
        tern(d, &args)
    };
    let good = sign("ci-job-1", "100.64.100.5/10", &["--groups", "ci"]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let job = read_cert(&d.join("ci-job-1.crt"));
    assert!(job.body.not_after - job.body.not_before <= 3600);
    // Peers trust only the root, and the chain verifies.
    let verified = ok(d, &["cert", "verify", "--ca", "ca.crt", "ci-job-1.crt"]);
    assert!(verified.starts_with("valid: ci-job-1"), "{verified}");
    let printed = ok(d, &["cert", "print", "ci-job-1.crt"]);
    assert!(printed.contains("issued by:   lh-issuer"), "{printed}");
    // Everything outside the issuer's constraints is refused, saying why.
    for (name, ip, extra, why) in [
        ("ci-job-2", "100.64.0.5/10", &[][..], "outside its pool"),
        (
            "ci-job-3",
            "100.64.100.6/10",
            &["--groups", "db"][..],
            "not among its groups",
        ),
        (
            "prod-db",
            "100.64.100.7/10",
            &[][..],
            "does not start with \"ci-\"",
        ),
        (
            "ci-job-4",
            "100.64.100.8/10",
            &["--duration", "2h"][..],
            "longer than its maximum",
        ),
        (
            "ci-job-5",
            "100.64.100.9/10",
            &["--subnets", "198.19.0.0/24"][..],
            "delegates no subnets",
        ),
    ] {
        let out = sign(name, ip, extra);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{name}: {err}");
    }
    // An issuer wider than the root is refused; so is one signed by an issuer.
    let err = fails(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "wide",
            "--ips",
            "100.128.0.0/16",
            "--max-duration",
            "1h",
            "--out-key",
            "w.key",
            "--out-crt",
            "w.crt",
        ],
    );
    assert!(err.contains("outside the CA"), "{err}");
    let err = fails(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "issuer.crt",
            "--ca-key",
            "issuer.key",
            "--name",
            "sub",
            "--ips",
            "100.64.100.0/25",
            "--max-duration",
            "1h",
            "--out-key",
            "s.key",
            "--out-crt",
            "s.crt",
        ],
    );
    assert!(err.contains("signed by a root CA"), "{err}");
    // --issuer without its constraints is a usage error.
    let out = tern(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "x",
            "--out-key",
            "x.key",
            "--out-crt",
            "x.crt",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_issuer_with_subnets_and_zones_signs_gateways_inside_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca", &["--ips", "100.64.0.0/10"]);
    let out = ok(
        d,
        &[
            "cert",
            "sign",
            "--issuer",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            "gw-issuer",
            "--ips",
            "100.64.200.0/24",
            "--subnets",
            "198.19.0.0/16",
            "--dns-zones",
            "internal",
            "--name-prefix",
            "gw-",
            "--max-duration",
            "720h",
            "--out-key",
            "gwi.key",
            "--out-crt",
            "gwi.crt",
        ],
    );
    assert!(
        out.contains("delegating subnets 198.19.0.0/16, delegating DNS zones internal"),
        "{out}"
    );
    let printed = ok(d, &["cert", "print", "gwi.crt"]);
    assert!(printed.contains("subnets:     198.19.0.0/16"), "{printed}");
    let sign = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "cert",
            "sign",
            "--ca-crt",
            "gwi.crt",
            "--ca-key",
            "gwi.key",
            "--name",
            name,
            "--ip",
            "100.64.200.2/10",
            "--duration",
            "2m",
            "--out-key",
            "gw.key",
            "--out-crt",
            "gw.crt",
            "--force",
        ];
        args.extend_from_slice(extra);
        tern(d, &args)
    };
    let good = sign(
        "gw-1",
        &["--subnets", "198.19.1.0/24", "--dns-zones", "db.internal"],
    );
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let verified = ok(d, &["cert", "verify", "--ca", "ca.crt", "gw.crt"]);
    assert!(
        verified.contains("subnets=198.19.1.0/24") && verified.contains("dns_zones=db.internal"),
        "{verified}"
    );
    for (extra, why) in [
        (
            &["--subnets", "198.18.0.0/24"][..],
            "outside the subnets it delegates (198.19.0.0/16)",
        ),
        (
            &["--dns-zones", "example.org"][..],
            "not under the zones it delegates (internal)",
        ),
    ] {
        let out = sign("gw-1", extra);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
}
