//! A gateway whose certificate the lighthouse renews (`[pki] renew`), on
//! real kernels: an issuer that only renews (`[[enroll.renew]]`, beside
//! the lighthouse's enrollment issuer) delegates the vpc's subnet, the
//! gateway's 90-second certificate is renewed two thirds into its life
//! while a hash-checked transfer through it runs, and past the first
//! certificate's end the CI node still reaches the vpc through the gateway,
//! holding the renewed certificate. Real curl and python's http.server.
//! Needs root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until};

const SERVER: &str = "198.19.0.10";
/// The gateway certificate's lifetime: renewed at two thirds (60 s).
const LIFETIME_SECS: u64 = 90;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn cert_json(dir: &std::path::Path, file: &str) -> Value {
    let out = tern(dir, &["cert", "print", file, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cert print {file}: {e}: {out}"))
}

fn unix_field(cert: &Value, field: &str) -> u64 {
    cert[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {cert}"))
}

fn peer_not_after(dir: &std::path::Path, node: &str, peer: &str) -> Option<u64> {
    status(dir, node)["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == peer)
        .and_then(|p| p["cert_not_after"].as_u64())
}

#[test]
fn a_gateway_renewed_by_the_lighthouse_keeps_its_transfer_and_outlives_its_first_certificate() {
    let test = "renewal";
    if !require_root(test) || !require_tools(test, &["curl", "python3"]) {
        return;
    }
    let _serial = serial();
    let GatewayLab {
        lab: _lab,
        dir,
        lh,
        ci,
        gw,
        vpc,
    } = gateway_lab("renw", SERVER);

    // 12 MiB served at 160 KiB/s: about 77 s, across the renewal.
    let bytes = vpc.exec("head", ["-c", "12582912", "/dev/urandom"]).stdout;
    let _http = web_server(&vpc, &dir, SERVER, &[("blob.bin", &bytes), ("hi", b"hi\n")]);
    let want = sha256_file(&dir.join("www/blob.bin"));

    // The root signs the lighthouse and the CI node; an issuer for
    // gateways, delegating the vpc's networks and a DNS zone, signs the
    // gateway. Enrollment has an issuer of its own.
    make_ca_and_lighthouse(&dir);
    sign(&dir, "ca", "ci-1", "100.64.0.20/10", &["--groups", "ci"]);
    tern(
        &dir,
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
            "gw-issuer.key",
            "--out-crt",
            "gw-issuer.crt",
        ],
    );
    tern(
        &dir,
        &[
            "cert",
            "sign",
            "--ca-crt",
            "gw-issuer.crt",
            "--ca-key",
            "gw-issuer.key",
            "--name",
            "gw-1",
            "--ip",
            "100.64.200.2/10",
            "--subnets",
            "198.19.0.0/24",
            "--dns-zones",
            "db.internal",
            "--duration",
            &format!("{LIFETIME_SECS}s"),
            "--out-key",
            "gw-1.key",
            "--out-crt",
            "gw-1.crt",
        ],
    );
    sign_issuer(&dir, "ca", "lh-issuer", "100.64.100.0/24", "ci");
    let first = cert_json(&dir, "gw-1.crt");
    let first_until = unix_field(&first, "not_after_unix");

    let lh_proc = start_lighthouse_with(
        &lh,
        &dir,
        "[enroll]\nissuer_cert = \"lh-issuer.crt\"\nissuer_key = \"lh-issuer.key\"\nstore = \"lh.db\"\n\
         [[enroll.renew]]\nissuer_cert = \"gw-issuer.crt\"\nissuer_key = \"gw-issuer.key\"\n",
    );

    let gateway = gateway_8080_config(&node_config_text("gw-1", "ca.crt").replacen(
        "key = \"gw-1.key\"\n",
        "key = \"gw-1.key\"\nrenew = true\n",
        1,
    ));
    let gw_proc = start_node(&gw, &write_file(&dir, "gw-1.toml", &gateway), "node-gw-1");
    let _ci_proc = start_node(
        &ci,
        &write_file(
            &dir,
            "ci-1.toml",
            &format!(
                "{}[[routes]]\nsubnet = \"198.19.0.0/24\"\n",
                node_config_text("ci-1", "ca.crt")
            ),
        ),
        "node-ci-1",
    );

    let hi = format!("http://{SERVER}:8080/hi");
    let reaches = || {
        ci.exec("curl", ["-sS", "--max-time", "3", &hi])
            .status
            .success()
    };
    wait_until(
        "ci-1 reaches the vpc through gw-1",
        Duration::from_secs(30),
        reaches,
    );

    // Two thirds into its life the gateway asks for a renewal. A slow
    // transfer starts shortly before, so it runs across it, and is
    // hash-checked at the end.
    let from = unix_field(&first, "not_before_unix");
    let due = from + (first_until - from) * 2 / 3;
    std::thread::sleep(Duration::from_secs(
        due.saturating_sub(15).saturating_sub(unix_now()),
    ));
    let got = dir.join("got.bin");
    let mut transfer = ci.command("curl");
    transfer
        .args(["-sS", "--max-time", "150", "--limit-rate", "160K", "-o"])
        .arg(&got)
        .arg(format!("http://{SERVER}:8080/blob.bin"));
    let transfer = ci.spawn_command(transfer, "slow-transfer");

    // Renewed by the lighthouse, written over gw-1.crt (mode 0600), and
    // swapped in while the transfer runs.
    let deadline = Duration::from_secs(due.saturating_sub(unix_now()) + 20);
    wait_until("gw-1's certificate is renewed", deadline, || {
        gw_proc
            .log()
            .contains("certificate renewed; every peer re-handshakes with it")
    });
    assert!(
        unix_now() < first_until,
        "renewed before the first certificate expired"
    );
    assert!(
        transfer.is_running(),
        "the transfer was in flight during the renewal (it ended with {:?} after {} of {} bytes)",
        transfer.try_wait(),
        fs::metadata(&got).map(|m| m.len()).unwrap_or(0),
        bytes.len()
    );
    let renewed = cert_json(&dir, "gw-1.crt");
    let until = unix_field(&renewed, "not_after_unix");
    assert!(until > first_until, "{renewed}");
    for field in [
        "name",
        "ips",
        "groups",
        "subnets",
        "dns_zones",
        "public_key",
        "issued_by",
    ] {
        assert_eq!(renewed[field], first[field], "{field} kept");
    }
    assert_eq!(
        fs::metadata(dir.join("gw-1.crt"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0),
        0o600
    );
    let verified = tern(&dir, &["cert", "verify", "--ca", "ca.crt", "gw-1.crt"]);
    assert!(
        verified.contains("subnets=198.19.0.0/24") && verified.contains("dns_zones=db.internal"),
        "{verified}"
    );
    assert!(
        lh_proc.log().contains("certificate renewed"),
        "{}",
        lh_proc.log()
    );

    // The transfer ends whole.
    wait_until("the transfer ends", Duration::from_secs(120), || {
        !transfer.is_running()
    });
    assert_eq!(sha256_file(&got), want, "the transfer arrived whole");

    // Past the first certificate's end, ci-1 still reaches the vpc and
    // holds the renewed certificate for gw-1.
    let past = (first_until + 3).saturating_sub(unix_now());
    std::thread::sleep(Duration::from_secs(past));
    wait_until(
        "ci-1 still reaches the vpc",
        Duration::from_secs(15),
        reaches,
    );
    // The renewed certificate, or a later renewal of it (one falls due
    // two thirds into the renewed one's life, which a slow machine reaches
    // before this point).
    let held = peer_not_after(&dir, "ci-1", "gw-1");
    assert!(
        held.is_some_and(|t| t >= until),
        "ci-1 holds a renewed certificate: {held:?}, the first renewal lasts until {until}"
    );
}
