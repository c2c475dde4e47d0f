//! Tern-specific helpers for the netns tests: certificates through the real
//! `tern cert` CLI, config files, starting daemons, reading their status.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{workspace_bin, Ns, Proc};

pub const LH_UNDERLAY: &str = "198.18.0.1";

/// Runs `tern` (certificate commands need no namespace) and returns stdout.
pub fn tern(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(workspace_bin("tern"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running tern {args:?}: {e}"));
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tern cert ca` arguments for a CA `name` (name.crt, name.key).
pub fn ca_args(name: &str) -> Vec<String> {
    strings(&[
        "cert",
        "ca",
        "--name",
        name,
        "--out-crt",
        &format!("{name}.crt"),
        "--out-key",
        &format!("{name}.key"),
    ])
}

/// `tern cert sign` arguments for node `name` under CA `ca` (name.crt,
/// name.key), with `extra` flags.
pub fn sign_args(ca: &str, name: &str, ip: &str, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "cert",
        "sign",
        "--ca-crt",
        &format!("{ca}.crt"),
        "--ca-key",
        &format!("{ca}.key"),
        "--name",
        name,
        "--ip",
        ip,
        "--out-key",
        &format!("{name}.key"),
        "--out-crt",
        &format!("{name}.crt"),
    ]);
    args.extend(strings(extra));
    args
}

/// `tern cert sign --issuer` arguments: issuer `name` under CA `ca` for the
/// address pool `ips` and `groups`, at most an hour (name.crt, name.key).
pub fn issuer_args(ca: &str, name: &str, ips: &str, groups: &str) -> Vec<String> {
    strings(&[
        "cert",
        "sign",
        "--issuer",
        "--ca-crt",
        &format!("{ca}.crt"),
        "--ca-key",
        &format!("{ca}.key"),
        "--name",
        name,
        "--ips",
        ips,
        "--groups",
        groups,
        "--max-duration",
        "1h",
        "--out-key",
        &format!("{name}.key"),
        "--out-crt",
        &format!("{name}.crt"),
    ])
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn tern_with(dir: &Path, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tern(dir, &args);
}

pub fn make_ca(dir: &Path, name: &str) {
    tern_with(dir, &ca_args(name));
}

pub fn sign(dir: &Path, ca: &str, name: &str, ip: &str, extra: &[&str]) {
    tern_with(dir, &sign_args(ca, name, ip, extra));
}

/// An issuer (`tern cert sign --issuer`) for a lighthouse's `[enroll]`.
pub fn sign_issuer(dir: &Path, ca: &str, name: &str, ips: &str, groups: &str) {
    tern_with(dir, &issuer_args(ca, name, ips, groups));
}

/// A node config whose firewall lets every peer in.
pub fn write_node_config(dir: &Path, name: &str, ca_file: &str) -> PathBuf {
    write_node_config_with(dir, name, ca_file, &[])
}

/// A node config listing extra "lighthouse" endpoints besides the real one;
/// its firewall lets every peer in.
pub fn write_node_config_with(
    dir: &Path,
    name: &str,
    ca_file: &str,
    extra_lighthouses: &[&str],
) -> PathBuf {
    let extra: String = extra_lighthouses
        .iter()
        .map(|e| format!("[[lighthouses]]\nendpoint = \"{e}\"\n"))
        .collect();
    let text = format!(
        "{}{extra}[[firewall.inbound]]\nproto = \"any\"\n",
        node_config_text(name, ca_file)
    );
    write_file(dir, &format!("{name}.toml"), &text)
}

/// The common part of a node config: pki, listen, the lab's lighthouse, tun,
/// api socket, debug logs. Tables and arrays of tables may follow.
/// Sets `[tun] offload` in a config written by [`write_node_config`].
pub fn set_tun_offload(config: &Path, on: bool) {
    let text = std::fs::read_to_string(config)
        .unwrap_or_else(|e| panic!("reading {}: {e}", config.display()));
    assert!(text.contains("[tun]\n"), "no [tun] in {}", config.display());
    let text = text.replacen("[tun]\n", &format!("[tun]\noffload = {on}\n"), 1);
    std::fs::write(config, text).unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
}

pub fn node_config_text(name: &str, ca_file: &str) -> String {
    format!(
        r#"[pki]
ca = "{ca_file}"
cert = "{name}.crt"
key = "{name}.key"
[listen]
addr = "0.0.0.0:4242"
[tun]
name = "tern0"
mtu = 1420
[api]
socket = "{name}.sock"
[log]
level = "debug"
[[lighthouses]]
endpoint = "{LH_UNDERLAY}:4242"
"#
    )
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

pub fn write_lighthouse_config(dir: &Path) -> PathBuf {
    let path = dir.join("lighthouse.toml");
    let text = r#"[pki]
ca = "ca.crt"
cert = "lh1.crt"
key = "lh1.key"
[listen]
addr = "0.0.0.0:4242"
[api]
socket = "lh1.sock"
[log]
level = "debug"
"#;
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

pub fn start_node(ns: &Ns, config: &Path, name: &str) -> Proc {
    let bin = workspace_bin("tern");
    let config = config.to_string_lossy().into_owned();
    ns.spawn(&bin.to_string_lossy(), ["up", "--config", &config], name)
}

pub fn start_lighthouse(ns: &Ns, config: &Path) -> Proc {
    let bin = workspace_bin("tern-lighthouse");
    let config = config.to_string_lossy().into_owned();
    ns.spawn(&bin.to_string_lossy(), ["--config", &config], "lighthouse")
}

/// `tern status --json` of the node whose API socket is `dir/name.sock`.
pub fn status(dir: &Path, name: &str) -> Value {
    let socket = dir.join(format!("{name}.sock"));
    let out = tern(
        dir,
        &["status", "--socket", &socket.to_string_lossy(), "--json"],
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("status of {name} is not JSON ({e}): {out}"))
}

pub fn pings(ns: &Ns, ip: &str) -> bool {
    ns.exec("ping", ["-c1", "-W1", ip]).status.success()
}

pub fn sha256_file(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    format!("{:x}", Sha256::digest(&bytes))
}

pub fn counter(status: &Value, group: &str, name: &str) -> u64 {
    status[group][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {group}.{name} in {status}"))
}

pub fn lighthouse_status(dir: &Path) -> Value {
    let out = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["status", "--socket"])
        .arg(dir.join("lh1.sock"))
        .arg("--json")
        .output()
        .unwrap_or_else(|e| panic!("tern-lighthouse status: {e}"));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Waits until the node `name` is registered with the lighthouse whose API
/// socket is in `dir`.
pub fn wait_registered(dir: &Path, name: &str, timeout: std::time::Duration) {
    crate::wait_until(&format!("{name} registers"), timeout, || {
        lighthouse_status(dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["name"] == name))
    });
}

/// The usual gateway topology: a lighthouse ([`LH_UNDERLAY`]), a CI host
/// (198.18.0.2) and a gateway (198.18.0.4) on the wan; the gateway also on
/// the vpc's bridge (198.19.0.2/24), where the vpc holds `server`/24 and no
/// route to the overlay.
pub struct GatewayLab {
    pub lab: crate::Lab,
    pub dir: PathBuf,
    pub lh: Ns,
    pub ci: Ns,
    pub gw: Ns,
    pub vpc: Ns,
}

pub fn gateway_lab(prefix: &str, server: &str) -> GatewayLab {
    let lab = crate::Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let ci = lab.add_ns("ci");
    let gw = lab.add_ns("gw");
    let vpc = lab.add_ns("vpc");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&ci, "198.18.0.2/24");
    lab.connect_to_wan(&gw, "198.18.0.4/24");
    lab.bridge(&vpc, "br1", &format!("{server}/24"));
    lab.connect_to_bridge(&gw, "198.19.0.2/24", &vpc, "br1");
    GatewayLab {
        lab,
        dir,
        lh,
        ci,
        gw,
        vpc,
    }
}

/// The flat topology: a lighthouse ([`LH_UNDERLAY`]), a (198.18.0.2) and
/// b (198.18.0.3) on one wan, no NAT between them.
pub struct FlatLab {
    pub lab: crate::Lab,
    pub dir: PathBuf,
    pub lh: Ns,
    pub a: Ns,
    pub b: Ns,
}

pub fn flat_lab(prefix: &str) -> FlatLab {
    let lab = crate::Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let a = lab.add_ns("a");
    let b = lab.add_ns("b");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&a, "198.18.0.2/24");
    lab.connect_to_wan(&b, "198.18.0.3/24");
    FlatLab { lab, dir, lh, a, b }
}

/// python's http.server in `ns` on `server`:8080, serving `files` (name,
/// contents) from `dir`/www.
pub fn web_server(ns: &Ns, dir: &Path, server: &str, files: &[(&str, &[u8])]) -> Proc {
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir {}: {e}", www.display()));
    for (name, contents) in files {
        fs::write(www.join(name), contents).unwrap_or_else(|e| panic!("write www/{name}: {e}"));
    }
    let mut cmd = ns.command("python3");
    cmd.args(["-m", "http.server", "--bind", server, "8080", "--directory"])
        .arg(&www);
    ns.spawn_command(cmd, "http")
}

/// The CA (ca.crt, ca.key) and, under it, the lighthouse lh1 (100.64.0.1,
/// group lighthouse).
pub fn make_ca_and_lighthouse(dir: &Path) {
    make_ca(dir, "ca");
    sign(
        dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
}

/// The lighthouse config of [`write_lighthouse_config`] with `extra`
/// appended (an `[enroll]`, say), started in `ns`.
pub fn start_lighthouse_with(ns: &Ns, dir: &Path, extra: &str) -> Proc {
    let config = write_lighthouse_config(dir);
    let mut text = fs::read_to_string(&config).unwrap_or_default();
    text.push_str(extra);
    fs::write(&config, text).unwrap_or_else(|e| panic!("write lighthouse config: {e}"));
    start_lighthouse(ns, &config)
}

/// A TUN-mode gateway `name`'s config: routes 198.19.0.0/24 with
/// masquerade and lets group ci reach port 8080 there.
pub fn gateway_8080_config(node_text: &str) -> String {
    format!(
        "{node_text}[gateway]\nsubnets = [\"198.19.0.0/24\"]\nmasquerade = true\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = \"8080\"\ngroups = [\"ci\"]\nlocal_cidr = \"198.19.0.0/24\"\n"
    )
}

/// `tern-lighthouse token create` against the lighthouse config `config`:
/// a one-time token for group ci (valid 1 h, certificates of 30 min).
pub fn create_token(config: &Path) -> String {
    let out = std::process::Command::new(workspace_bin("tern-lighthouse"))
        .args(["token", "create", "--config"])
        .arg(config)
        .args([
            "--groups",
            "ci",
            "--ttl",
            "1h",
            "--uses",
            "1",
            "--cert-ttl",
            "30m",
        ])
        .output()
        .unwrap_or_else(|e| panic!("token create: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
