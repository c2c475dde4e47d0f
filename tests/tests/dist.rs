//! What `dist/` ships for running Tern as a service: the systemd units
//! (`systemd-analyze verify` on each, with its binaries pointed at the
//! built ones; their command lines run against the real CLI; the sandbox
//! they promise; `systemd-analyze security --offline=true` at most 3.0 for
//! the lighthouse and the userspace node), the Kubernetes manifests (the
//! locked-down security context, the Secret read-only, the config in the
//! ConfigMap parsed as a node config whose writable paths lie on emptyDirs)
//! and the Containerfile (built and run only where a docker daemon
//! answers). Nothing is installed on this machine and no unit is started.
//!
//! Tools: `systemd-analyze` (Debian: systemd) for the units; python3 with
//! PyYAML (python3-yaml) or kubectl to read the YAML. Missing, they fail
//! the test under `CI=true` and skip it with a message elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_shared::config::{NodeConfig, TunMode};
use tern_tests::{bin, output_text, repo_root, run_bounded, skip_or_fail, tool_on_path};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The units, and whether `systemd-analyze security` must rate each at
/// most [`EXPOSURE_LIMIT`] (the TUN node, with its capabilities and
/// /dev/net/tun, is only reported).
const UNITS: [(&str, bool); 3] = [
    ("tern@.service", false),
    ("tern-userspace@.service", true),
    ("tern-lighthouse.service", true),
];
const EXPOSURE_LIMIT: f64 = 3.0;
/// Where the units expect the binaries.
const INSTALLED_BIN: &str = "/usr/local/bin/";

fn repo() -> PathBuf {
    repo_root()
}

fn dist() -> PathBuf {
    repo().join("dist")
}

/// Straight to the stderr handle: libtest captures `eprintln!`, and a
/// skip or a score must be visible in a passing run.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `systemd-analyze`, or `None` after [`skip_or_fail`].
fn systemd_analyze(test: &str) -> Option<PathBuf> {
    let found = tool_on_path("systemd-analyze");
    if found.is_none() {
        skip_or_fail(
            test,
            "systemd-analyze is not installed (Debian package systemd)",
        );
    }
    found
}

fn unit_text(name: &str) -> String {
    let path = dist().join("systemd").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A unit's settings, key to values in order (comments and section
/// headers left out; a key given twice, such as SystemCallFilter=, keeps
/// both).
fn directives(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';', '[']) {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a setting: {line:?}"));
        map.entry(key.to_string())
            .or_default()
            .push(value.to_string());
    }
    map
}

fn one<'a>(d: &'a BTreeMap<String, Vec<String>>, key: &str, unit: &str) -> &'a str {
    match d.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{unit}: expected one {key}=, found {other:?}"),
    }
}

/// Where the built binaries are (`target/debug`, or `$TERN_BIN_DIR`).
fn bin_dir() -> PathBuf {
    let tern = bin("tern");
    bin("tern-lighthouse");
    tern.parent().unwrap().to_path_buf()
}

/// The units as `systemd-analyze` may check them here: copied into `dir`
/// with their binaries pointed at the built ones (verify wants every Exec
/// binary to exist), and each template also as an instance. Returns the
/// paths, each with its unit name.
fn units_for_analysis(dir: &Path) -> Vec<(String, PathBuf)> {
    let bins = format!("{}/", bin_dir().display());
    let mut out = Vec::new();
    for (name, _) in UNITS {
        let text = unit_text(name);
        assert!(
            text.contains(&format!("ExecStart={INSTALLED_BIN}")),
            "{name}: ExecStart= should run a binary from {INSTALLED_BIN}"
        );
        let text = text.replace(INSTALLED_BIN, &bins);
        let mut names = vec![name.to_string()];
        if name.ends_with("@.service") {
            names.push(name.replace("@.", "@dist-test."));
        }
        for n in names {
            let path = dir.join(&n);
            fs::write(&path, &text).unwrap();
            out.push((n, path));
        }
    }
    out
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let test = "units_pass_systemd_analyze_verify";
    let Some(analyze) = systemd_analyze(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in units_for_analysis(dir.path()) {
        let mut cmd = Command::new(&analyze);
        cmd.args(["verify", "--man=no", "--recursive-errors=no"])
            .arg(&path)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "");
        let out = run_bounded(cmd, "systemd-analyze verify", Duration::from_secs(60));
        // verify exits 0 after warnings such as an unknown key or a value
        // it ignores: any word from it is a failure.
        assert!(
            out.status.success() && output_text(&out).trim().is_empty(),
            "systemd-analyze verify {name} ({}): {}",
            out.status,
            output_text(&out)
        );
    }
}

#[test]
fn unit_command_lines_match_the_cli() {
    let scratch = tempfile::tempdir().unwrap();
    let bins = format!("{}/", bin_dir().display());
    let etc = scratch.path().join("etc-tern");
    for (name, _) in UNITS {
        let unit = unit_text(name);
        let d = directives(&unit);
        let exec = one(&d, "ExecStart", name);
        assert!(
            exec.contains("/etc/tern/"),
            "{name}: the config should be under /etc/tern/: {exec}"
        );
        // The unit's command line with its config missing: the CLI must
        // take every argument (clap would exit 2, naming one it does not
        // know) and fail reading that config (1), nothing else.
        let line = exec
            .replace(INSTALLED_BIN, &bins)
            .replace("/etc/tern/", &format!("{}/", etc.display()))
            .replace("%i", "dist-test");
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut cmd = Command::new(words[0]);
        cmd.args(&words[1..]);
        let out = run_bounded(cmd, &line, Duration::from_secs(30));
        let said = output_text(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: `{line}` should fail on its missing config, got {}: {said}",
            out.status
        );
        assert!(
            said.contains("reading config") && said.contains(&etc.display().to_string()),
            "{name}: `{line}` should name its missing config: {said}"
        );
        assert_eq!(
            one(&d, "ExecReload", name),
            "/bin/kill -HUP $MAINPID",
            "{name}"
        );
    }
}

#[test]
fn units_sandbox_the_daemons() {
    for (name, _) in UNITS {
        let d = directives(&unit_text(name));
        for (key, want) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("Restart", "on-failure"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectControlGroups", "yes"),
            ("RestrictNamespaces", "yes"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("SystemCallArchitectures", "native"),
        ] {
            assert_eq!(one(&d, key, name), want, "{name}: {key}=");
        }
        assert!(
            d.get("SystemCallFilter")
                .is_some_and(|v| v.iter().any(|f| f == "@system-service")),
            "{name}: SystemCallFilter=@system-service"
        );
        let user = one(&d, "User", name);
        assert!(
            !user.is_empty() && user != "root" && user != "0",
            "{name}: runs as a user of its own"
        );
        assert!(
            !one(&d, "StateDirectory", name).is_empty()
                && !one(&d, "RuntimeDirectory", name).is_empty(),
            "{name}: StateDirectory= and RuntimeDirectory="
        );
        for family in one(&d, "RestrictAddressFamilies", name).split_whitespace() {
            assert!(
                ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"].contains(&family),
                "{name}: RestrictAddressFamilies= allows {family}"
            );
        }
        let exec = one(&d, "ExecStart", name);
        let (bounding, ambient) = (
            one(&d, "CapabilityBoundingSet", name),
            one(&d, "AmbientCapabilities", name),
        );
        match name {
            "tern@.service" => {
                // TUN mode: CAP_NET_ADMIN, and port 53 for mesh names;
                // nothing more, and nothing in the bounding set unused.
                assert_eq!(bounding, "CAP_NET_ADMIN CAP_NET_BIND_SERVICE", "{name}");
                assert_eq!(ambient, bounding, "{name}");
                assert_eq!(one(&d, "DevicePolicy", name), "closed", "{name}");
                assert_eq!(one(&d, "DeviceAllow", name), "/dev/net/tun rw", "{name}");
                assert!(
                    exec.ends_with(" up --config /etc/tern/%i.toml"),
                    "{name}: {exec}"
                );
            }
            "tern-userspace@.service" => {
                assert_eq!((bounding, ambient), ("", ""), "{name}: no capability");
                assert_eq!(one(&d, "PrivateDevices", name), "yes", "{name}");
                assert!(
                    exec.ends_with(" up --userspace --config /etc/tern/%i.toml"),
                    "{name}: {exec}"
                );
            }
            _ => {
                assert_eq!((bounding, ambient), ("", ""), "{name}: no capability");
                assert_eq!(one(&d, "PrivateDevices", name), "yes", "{name}");
                assert!(
                    exec.ends_with("/tern-lighthouse --config /etc/tern/lighthouse.toml"),
                    "{name}: {exec}"
                );
            }
        }
    }
}

/// ProtectSystem=strict leaves a daemon only its StateDirectory=,
/// LogsDirectory= and RuntimeDirectory= to write to: the paths it writes by
/// default (a node) or with the settings the unit documents (the
/// lighthouse) must lie there.
#[test]
fn units_let_the_daemons_write_where_they_do() {
    let dir = |d: &BTreeMap<String, Vec<String>>, key: &str, base: &str, unit: &str| {
        Path::new(base).join(one(d, key, unit))
    };
    // A node with every default: its API socket, a runner's workspaces and
    // audit log.
    let node = NodeConfig::parse(
        "[pki]\nca = \"ca.crt\"\ncert = \"n.crt\"\nkey = \"n.key\"\n[runner]\nallow_groups = [\"ci\"]\n",
        Path::new("/etc/tern/n.toml"),
    )
    .unwrap();
    let runner = node.runner.as_ref().unwrap();
    for name in ["tern@.service", "tern-userspace@.service"] {
        let d = directives(&unit_text(name));
        assert!(
            runner
                .work_dir
                .starts_with(dir(&d, "StateDirectory", "/var/lib", name)),
            "{name}: [runner] work_dir {}",
            runner.work_dir.display()
        );
        assert!(
            runner
                .audit_log
                .starts_with(dir(&d, "LogsDirectory", "/var/log", name)),
            "{name}: [runner] audit_log {}",
            runner.audit_log.display()
        );
    }
    // TUN mode: /run/tern/<tun name>.sock.
    let d = directives(&unit_text("tern@.service"));
    let socket = tern_node::io::api::socket_path_for(&node);
    assert_eq!(
        socket.parent(),
        Some(dir(&d, "RuntimeDirectory", "/run", "tern@.service").as_path()),
        "tern@.service: the default API socket {}",
        socket.display()
    );
    // Userspace mode without root: $XDG_RUNTIME_DIR/tern/<tun name>.sock.
    let d = directives(&unit_text("tern-userspace@.service"));
    assert_eq!(
        one(&d, "RuntimeDirectory", "tern-userspace@.service"),
        "tern"
    );
    assert_eq!(
        one(&d, "Environment", "tern-userspace@.service"),
        "XDG_RUNTIME_DIR=%t"
    );

    // The lighthouse: the settings its unit documents in its comments.
    let name = "tern-lighthouse.service";
    let unit = unit_text(name);
    let d = directives(&unit);
    let documented: String = unit
        .lines()
        .skip_while(|l| *l != "#   [api]")
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    assert!(
        documented.contains("[store]"),
        "{name}: the [api] and [store] settings in its comments"
    );
    let config = tern_shared::config::LighthouseConfig::parse(
        &format!("[pki]\nca = \"ca.crt\"\ncert = \"lh.crt\"\nkey = \"lh.key\"\n{documented}"),
        Path::new("/etc/tern/lighthouse.toml"),
    )
    .unwrap_or_else(|e| panic!("{name}: the documented settings: {e}"));
    let socket = config.api.socket.clone().unwrap();
    assert_eq!(
        socket.parent(),
        Some(dir(&d, "RuntimeDirectory", "/run", name).as_path()),
        "{name}: the API socket {}",
        socket.display()
    );
    match config
        .store
        .location(
            PathBuf::from("/etc/tern/lighthouse.db"),
            Path::new("/etc/tern"),
        )
        .unwrap()
    {
        tern_shared::store::StoreLocation::Sqlite(path) => assert!(
            path.starts_with(dir(&d, "StateDirectory", "/var/lib", name)),
            "{name}: the store {}",
            path.display()
        ),
        other => panic!("{name}: the documented store is {other}, not SQLite"),
    }
}

#[test]
fn units_exposure_is_low() {
    let test = "units_exposure_is_low";
    let Some(analyze) = systemd_analyze(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_analysis(dir.path());
    let mut too_high = Vec::new();
    for (name, limited) in UNITS {
        let path = &units.iter().find(|(n, _)| n == name).unwrap().1;
        let mut cmd = Command::new(&analyze);
        cmd.args(["security", "--offline=true", "--no-pager"])
            .arg(path)
            .env("SYSTEMD_COLORS", "0");
        let out = run_bounded(cmd, "systemd-analyze security", Duration::from_secs(60));
        let said = output_text(&out);
        let score = exposure(&said).unwrap_or_else(|| {
            panic!(
                "systemd-analyze security {name} ({}) gave no overall exposure level: {said}",
                out.status
            )
        });
        say(&format!(
            "systemd-analyze security --offline=true {name}: {score:.1}"
        ));
        if limited && score > EXPOSURE_LIMIT {
            too_high.push(format!("{name}: {score:.1}\n{said}"));
        }
    }
    assert!(
        too_high.is_empty(),
        "exposure above {EXPOSURE_LIMIT}: {}",
        too_high.join("\n")
    );
}

/// The number in `→ Overall exposure level for NAME: 1.2 OK 🙂`.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn exposure_is_read_from_the_report() {
    let report = "✗ PrivateNetwork=   Service has access to the host's network   0.5\n\
                  \n→ Overall exposure level for tern@dist-test.service: 1.8 OK 🙂\n";
    assert_eq!(exposure(report), Some(1.8));
    assert_eq!(exposure("nothing here"), None);
}

// --- Kubernetes --------------------------------------------------------------

/// The documents of a YAML file as JSON, read by python3's PyYAML, else by
/// `kubectl label --local` (no cluster needed); `None` after
/// [`skip_or_fail`] when neither is there.
fn yaml_documents(test: &str, path: &Path) -> Option<Vec<Value>> {
    let python_yaml = tool_on_path("python3").is_some()
        && Command::new("python3")
            .args(["-c", "import yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let cmd = if python_yaml {
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import json, sys, yaml\n\
             for d in yaml.safe_load_all(open(sys.argv[1])):\n\
             \x20   if d is not None:\n\
             \x20       print(json.dumps(d))",
        ])
        .arg(path);
        c
    } else if tool_on_path("kubectl").is_some() {
        let mut c = Command::new("kubectl");
        c.args(["label", "--local", "-o", "json", "-f"])
            .arg(path)
            .arg("tern-dist-test=1")
            .env("KUBECONFIG", "/dev/null");
        c
    } else {
        skip_or_fail(
            test,
            "no YAML reader: python3 with PyYAML (Debian package python3-yaml) or kubectl",
        );
        return None;
    };
    let out = run_bounded(cmd, "reading YAML", Duration::from_secs(60));
    assert!(
        out.status.success(),
        "reading {}: {}",
        path.display(),
        output_text(&out)
    );
    // One JSON value per document (kubectl prints them one after another).
    let docs: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: not JSON documents: {e}", path.display()));
    Some(docs)
}

/// A volume as the container mounts it.
struct Mount {
    path: PathBuf,
    kind: &'static str,
    read_only: bool,
    /// The ConfigMap's name, for a configMap volume.
    config_map: Option<String>,
}

/// Checks one manifest's Deployment; returns its node config, parsed, and
/// its container's mounts.
fn check_manifest(file: &str, docs: &[Value]) -> (NodeConfig, Vec<Mount>) {
    let of_kind =
        |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == kind).collect() };
    let deployments = of_kind("Deployment");
    assert_eq!(deployments.len(), 1, "{file}: one Deployment");
    let deployment = deployments[0];
    // One certificate is one node: never two pods with the same identity.
    assert_eq!(deployment["spec"]["replicas"], 1, "{file}: replicas");
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "Recreate",
        "{file}: strategy"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(pod[host], true, "{file}: {host}");
    }
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "{file}: automountServiceAccountToken"
    );
    let pod_security = &pod["securityContext"];
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect();
    assert_eq!(containers.len(), 1, "{file}: one container");
    let container = containers[0];
    let security = &container["securityContext"];
    // The container's settings win over the pod's.
    let effective = |key: &str| -> &Value {
        if security[key].is_null() {
            &pod_security[key]
        } else {
            &security[key]
        }
    };
    assert_eq!(effective("runAsNonRoot"), true, "{file}: runAsNonRoot");
    let uid = effective("runAsUser")
        .as_u64()
        .unwrap_or_else(|| panic!("{file}: runAsUser should be a fixed uid"));
    assert!(uid > 0, "{file}: runAsUser {uid}");
    assert_eq!(
        effective("seccompProfile")["type"],
        "RuntimeDefault",
        "{file}: seccompProfile"
    );
    assert_eq!(
        security["allowPrivilegeEscalation"], false,
        "{file}: allowPrivilegeEscalation"
    );
    assert_eq!(
        security["readOnlyRootFilesystem"], true,
        "{file}: readOnlyRootFilesystem"
    );
    assert_ne!(security["privileged"], true, "{file}: privileged");
    let dropped: Vec<&str> = security["capabilities"]["drop"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(dropped.contains(&"ALL"), "{file}: capabilities drop ALL");
    assert!(
        security["capabilities"]["add"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{file}: no capability added"
    );

    // Volumes: the ConfigMap, the Secret, emptyDirs; nothing of the host's.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap_or_else(|| panic!("{file}: no volumes"))
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap();
        let volume = volumes
            .get(name)
            .unwrap_or_else(|| panic!("{file}: a mount of unknown volume {name}"));
        let kind = ["configMap", "secret", "emptyDir"]
            .into_iter()
            .find(|k| !volume[*k].is_null())
            .unwrap_or_else(|| {
                panic!("{file}: volume {name} is not a configMap, secret or emptyDir: {volume}")
            });
        let read_only = m["readOnly"] == true;
        if kind == "secret" {
            assert!(
                read_only,
                "{file}: the Secret {name} must be mounted readOnly"
            );
            // Kubernetes' default is 0644: readable by every uid.
            let mode = volume["secret"]["defaultMode"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: the Secret {name} needs a defaultMode"));
            assert_eq!(
                mode & 0o227,
                0,
                "{file}: the Secret's defaultMode {mode:o}: read-only, nothing for others"
            );
        }
        if kind == "configMap" {
            assert!(read_only, "{file}: the ConfigMap {name} mounted readOnly");
        }
        mounts.push(Mount {
            path: PathBuf::from(m["mountPath"].as_str().unwrap()),
            kind,
            read_only,
            config_map: volume["configMap"]["name"].as_str().map(str::to_string),
        });
    }
    assert!(
        mounts.iter().any(|m| m.kind == "secret"),
        "{file}: the key and certificate come from a Secret"
    );

    // The command line: `up --userspace --config FILE`, FILE a key of the
    // ConfigMap in this file.
    let args: Vec<&str> = ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"up") && args.contains(&"--userspace"),
        "{file}: `tern up --userspace`: {args:?}"
    );
    let config_path = Path::new(
        args.iter()
            .position(|a| *a == "--config")
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("{file}: no --config: {args:?}")),
    );
    let mount = mounts
        .iter()
        .find(|m| m.kind == "configMap" && config_path.parent() == Some(m.path.as_path()))
        .unwrap_or_else(|| {
            panic!(
                "{file}: --config {} is not on a ConfigMap mount",
                config_path.display()
            )
        });
    let config_map = of_kind("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str() == mount.config_map.as_deref())
        .unwrap_or_else(|| {
            panic!(
                "{file}: the ConfigMap {:?} is not in the file",
                mount.config_map
            )
        });
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let toml = config_map["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: the ConfigMap has no key {key}"));
    let config = NodeConfig::parse(toml, config_path)
        .unwrap_or_else(|e| panic!("{file}: {}: {e}", config_path.display()));
    assert_eq!(config.tun.mode, TunMode::Userspace, "{file}: [tun] mode");

    // The key and certificates from the Secret.
    for (what, p) in [
        ("ca", &config.pki.ca),
        ("cert", &config.pki.cert),
        ("key", &config.pki.key),
    ] {
        assert!(
            mounts
                .iter()
                .any(|m| m.kind == "secret" && p.starts_with(&m.path)),
            "{file}: [pki] {what} {} is not on the Secret",
            p.display()
        );
    }
    // The API socket on an emptyDir, in a directory below its root: an
    // emptyDir is 0777, and the node refuses a socket directory others may
    // write to (udp/src/api_socket.rs); one it makes itself is 0700.
    let socket =
        config.api.socket.clone().unwrap_or_else(|| {
            panic!("{file}: [api] socket (the default is on the read-only root)")
        });
    let socket_dir = socket.parent().unwrap();
    assert!(
        writable(&mounts, socket_dir) && mounts.iter().all(|m| m.path != socket_dir),
        "{file}: [api] socket {} should be in a directory below an emptyDir's root",
        socket.display()
    );
    (config, mounts)
}

/// Whether `path` lies on a writable emptyDir.
fn writable(mounts: &[Mount], path: &Path) -> bool {
    mounts
        .iter()
        .any(|m| m.kind == "emptyDir" && !m.read_only && path.starts_with(&m.path))
}

#[test]
fn k8s_manifests_are_locked_down() {
    let test = "k8s_manifests_are_locked_down";
    let k8s = dist().join("k8s");
    let Some(gateway) = yaml_documents(test, &k8s.join("gateway.yaml")) else {
        return;
    };
    let (config, _) = check_manifest("gateway.yaml", &gateway);
    assert!(
        config.gateway.is_some_and(|g| !g.subnets.is_empty()),
        "gateway.yaml: [gateway] subnets"
    );

    let runner = yaml_documents(test, &k8s.join("runner.yaml")).unwrap();
    let (config, mounts) = check_manifest("runner.yaml", &runner);
    let r = config
        .runner
        .unwrap_or_else(|| panic!("runner.yaml: no [runner]"));
    assert!(
        writable(&mounts, &r.work_dir),
        "runner.yaml: work_dir {} is not on an emptyDir",
        r.work_dir.display()
    );
    assert!(
        writable(&mounts, r.audit_log.parent().unwrap()),
        "runner.yaml: audit_log {} is not on an emptyDir",
        r.audit_log.display()
    );
    assert!(
        writable(&mounts, Path::new("/tmp")),
        "runner.yaml: the steps get a writable /tmp"
    );

    // The ClusterRole for kubernetes services: impersonation of users and
    // groups, nothing more, bound to the gateway's ServiceAccount.
    let rbac = yaml_documents(test, &k8s.join("impersonate.yaml")).unwrap();
    let role = rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap_or_else(|| panic!("impersonate.yaml: no ClusterRole"));
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{role}");
    assert_eq!(
        rules[0]["verbs"],
        serde_json::json!(["impersonate"]),
        "{role}"
    );
    assert_eq!(
        rules[0]["resources"],
        serde_json::json!(["users", "groups"]),
        "{role}"
    );
    let binding = rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap_or_else(|| panic!("impersonate.yaml: no ClusterRoleBinding"));
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "tern-gateway");
}

// --- The container image -------------------------------------------------------

fn docker_answers() -> bool {
    tool_on_path("docker").is_some()
        && Command::new("docker")
            .arg("info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn arch() -> String {
    let out = Command::new("uname").arg("-m").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `docker ARGS`, which must succeed; its stdout, trimmed.
fn docker(args: &[&str], timeout: Duration) -> String {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    let what = format!("docker {}", args.join(" "));
    let out = run_bounded(cmd, &what, timeout);
    assert!(out.status.success(), "{what}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn container_image_builds_and_runs_as_non_root() {
    let test = "container_image_builds_and_runs_as_non_root";
    let containerfile = dist().join("Containerfile");
    let file = fs::read_to_string(&containerfile).unwrap();
    // Every stage drops to the fixed non-root uid the manifests name, and
    // takes the binaries from the release archive's layout.
    let stages = file.lines().filter(|l| l.starts_with("FROM ")).count();
    let users = file
        .lines()
        .filter(|l| l.trim() == "USER 65532:65532")
        .count();
    assert!(
        stages >= 2 && users == stages,
        "Containerfile: USER 65532:65532 in each of its {stages} stages"
    );
    assert!(
        file.contains(
            "COPY tern-${VERSION}-${ARCH}-linux/bin/tern tern-${VERSION}-${ARCH}-linux/bin/tern-lighthouse /usr/local/bin/"
        ),
        "Containerfile: the binaries from the unpacked release archive"
    );

    if !docker_answers() {
        say(&format!(
            "{test}: skipped: no docker daemon (`docker info` failed); the Containerfile was not built"
        ));
        return;
    }
    // The build context: the release archive unpacked, with the built
    // binaries in its place.
    let ctx = tempfile::tempdir().unwrap();
    let arch = arch();
    let bins = ctx.path().join(format!("tern-{VERSION}-{arch}-linux/bin"));
    fs::create_dir_all(&bins).unwrap();
    for b in ["tern", "tern-lighthouse"] {
        fs::copy(bin(b), bins.join(b)).unwrap();
    }
    let tag = format!("tern-dist-test-{}", std::process::id());
    let (version_arg, arch_arg) = (format!("VERSION={VERSION}"), format!("ARCH={arch}"));
    for target in ["tern", "runner"] {
        let image = format!("{tag}-{target}");
        docker(
            &[
                "build",
                "-f",
                containerfile.to_str().unwrap(),
                "--target",
                target,
                "--build-arg",
                &version_arg,
                "--build-arg",
                &arch_arg,
                "-t",
                &image,
                ctx.path().to_str().unwrap(),
            ],
            Duration::from_secs(900),
        );
        let user = docker(
            &["image", "inspect", "-f", "{{.Config.User}}", &image],
            Duration::from_secs(60),
        );
        assert_eq!(user, "65532:65532", "{target}: the image's user");
        for entrypoint in ["/usr/local/bin/tern", "/usr/local/bin/tern-lighthouse"] {
            let said = docker(
                &[
                    "run",
                    "--rm",
                    "--read-only",
                    "--cap-drop",
                    "ALL",
                    "--security-opt",
                    "no-new-privileges",
                    "--entrypoint",
                    entrypoint,
                    &image,
                    "--version",
                ],
                Duration::from_secs(120),
            );
            assert!(
                said.ends_with(VERSION),
                "{target}: {entrypoint} --version said {said:?}"
            );
        }
        // The default image has no shell; the runner's steps need bash.
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--rm", "--entrypoint", "bash", &image, "-c", "true"]);
        let shell = run_bounded(cmd, "docker run bash", Duration::from_secs(120));
        if target == "tern" {
            assert!(!shell.status.success(), "the default image has a shell");
        } else {
            assert!(
                shell.status.success(),
                "the runner image has no bash: {}",
                output_text(&shell)
            );
        }
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &image])
            .output();
    }
}
