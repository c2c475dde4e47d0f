//! kubectl through the mesh, on real kernels: a TUN-mode gateway offers a
//! `kind = "kubernetes"` service, configured by a kubeconfig file of its own
//! (server over https, the CA inline, a token), whose upstream is the
//! API-server stand-in
//! written for these tests (`fixtures/kube_apiserver_standin.py`: there is
//! no real API server on these machines; it answers the discovery,
//! resource, watch, log, exec and port-forward requests kubectl makes, and
//! records every request with its headers). A CI job holding no credential
//! writes a kubeconfig with `tern kubeconfig` and runs `kubectl get`,
//! `apply`, `get -w`, `logs -f`, `exec` and `port-forward` with it. The
//! stand-in refuses any `Authorization` but the gateway's token; what
//! reached it is the gateway's token and the job impersonated, never a
//! credential of the caller's. Needs root, kubectl, curl and python3.

use std::path::Path;
use std::time::Duration;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, workspace_bin, Ns};

const SERVER: &str = "198.19.0.10";
const GW_OVERLAY: &str = "100.64.0.30";
const TOKEN: &str = "cluster-sa-token-91c2";
/// What the pod's port-forward reaches: a file served in the vpc.
const PAGE: &str = "served inside the private network\n";

/// `kubectl ARGS` in `ns` with the job's kubeconfig and a home of its own.
fn kubectl(ns: &Ns, dir: &Path, args: &[&str]) -> (bool, String) {
    let home = format!("HOME={}", dir.join("home").display());
    let kubeconfig = dir.join("kubeconfig.yaml");
    let mut all = vec![
        home.as_str(),
        "kubectl",
        "--kubeconfig",
        kubeconfig.to_str().unwrap_or_default(),
        "--request-timeout",
        "20s",
    ];
    all.extend_from_slice(args);
    let out = ns.exec("env", &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn spawn_kubectl(ns: &Ns, dir: &Path, args: &[&str], log: &str) -> tern_netns_tests::Proc {
    let kubeconfig = dir.join("kubeconfig.yaml").to_string_lossy().into_owned();
    let mut cmd = ns.command("kubectl");
    cmd.env("HOME", dir.join("home"))
        .args(["--kubeconfig", &kubeconfig])
        .args(args);
    ns.spawn_command(cmd, log)
}

/// The stand-in's record: one JSON object per request.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("record.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A CA and the API server's certificate for its address
/// (`apiserver.pem`, `apiserver.key` in `dir`); returns the CA's PEM.
fn api_server_certificate(dir: &Path) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut ca =
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "cluster CA");
    let ca = ca.self_signed(&ca_key).unwrap_or_else(|e| panic!("{e}"));
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = rcgen::CertificateParams::new(vec![SERVER.to_string()])
        .and_then(|p| p.signed_by(&key, &ca, &ca_key))
        .unwrap_or_else(|e| panic!("{e}"));
    write_file(dir, "apiserver.pem", &cert.pem());
    write_file(dir, "apiserver.key", &key.serialize_pem());
    ca.pem()
}

/// Standard base64, as kubeconfigs carry certificates inline.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const CONFIGMAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: NAME\n  namespace: default\ndata:\n  release: \"42\"\n";

#[test]
fn kubectl_works_through_the_mesh_with_the_gateways_credential_and_the_jobs_identity() {
    if !require_root("kubernetes") || !require_tools("kubernetes", &["kubectl", "curl", "python3"])
    {
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
    } = gateway_lab("k8s", SERVER);
    std::fs::create_dir_all(dir.join("home")).unwrap_or_else(|e| panic!("{e}"));
    let token_file = write_file(&dir, "sa.token", &format!("{TOKEN}\n"));
    // The API server's certificate, from a CA of the cluster's; the
    // gateway's kubeconfig carries that CA inline and the token.
    let ca_pem = api_server_certificate(&dir);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
         clusters:\n- name: lab\n  cluster:\n    server: https://{SERVER}:6443\n    certificate-authority-data: {}\n\
         contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: tern-gateway\n\
         users:\n- name: tern-gateway\n  user:\n    token: {TOKEN}\n",
        base64(ca_pem.as_bytes())
    );
    let gw_kubeconfig = write_file(&dir, "gw-kubeconfig.yaml", &kubeconfig);
    std::fs::set_permissions(
        &gw_kubeconfig,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap_or_else(|e| panic!("chmod: {e}"));

    // The private network: the API server (stand-in) and, behind the pod's
    // port, a web server with one page.
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap_or_else(|e| panic!("{e}"));
    write_file(&site, "page.txt", PAGE);
    let mut web = vpc.command("python3");
    web.args(["-m", "http.server", "--bind", SERVER, "8081", "--directory"])
        .arg(&site);
    let _web = vpc.spawn_command(web, "web");
    let standin = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube_apiserver_standin.py");
    let mut api = vpc.command("python3");
    api.arg(&standin)
        .args(["--listen", &format!("{SERVER}:6443"), "--token-file"])
        .arg(&token_file)
        .arg("--record")
        .arg(dir.join("record.jsonl"))
        .args(["--portforward-target", &format!("{SERVER}:8081")])
        .arg("--tls-cert")
        .arg(dir.join("apiserver.pem"))
        .arg("--tls-key")
        .arg(dir.join("apiserver.key"));
    let api = vpc.spawn_command(api, "apiserver-standin");
    api.wait_for_log("ready", Duration::from_secs(15));

    make_ca_and_lighthouse(&dir);
    sign(&dir, "ca", "gw", &format!("{GW_OVERLAY}/10"), &[]);
    sign(&dir, "ca", "job", "100.64.0.5/10", &["--groups", "ci"]);
    let _lh = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    let gateway = node_config_text("gw", "ca.crt")
        + "[[firewall.inbound]]\nproto = \"tcp\"\nport = \"6443\"\n\
           [[services]]\nname = \"k8s\"\nkind = \"kubernetes\"\nlisten = 6443\n\
           kubeconfig = \"gw-kubeconfig.yaml\"\ngroups = [\"ci\"]\n\
           audit_log = \"k8s-audit.jsonl\"\n";
    let gw_node = start_node(&gw, &write_file(&dir, "gw.toml", &gateway), "node-gw");
    gw_node.wait_for_log("service forwarding", Duration::from_secs(15));
    let _job = start_node(
        &ci,
        &write_file(&dir, "job.toml", &node_config_text("job", "ca.crt")),
        "node-job",
    );
    let socket = dir.join("job.sock").to_string_lossy().into_owned();
    wait_until(
        "the job learns of the service",
        Duration::from_secs(20),
        || {
            std::process::Command::new(workspace_bin("tern"))
                .args(["services", "k8s", "--socket", &socket])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("allowed"))
        },
    );
    tern(
        &dir,
        &[
            "kubeconfig",
            "k8s",
            "--socket",
            &socket,
            "--out",
            &dir.join("kubeconfig.yaml").to_string_lossy(),
        ],
    );

    // get
    let mut pods = String::new();
    wait_until("kubectl get pods", Duration::from_secs(20), || {
        let (ok, text) = kubectl(&ci, &dir, &["get", "pods"]);
        pods = text;
        ok
    });
    assert!(pods.contains("web-1") && pods.contains("Running"), "{pods}");

    // get -w, while apply creates and then changes a ConfigMap
    let watch = spawn_kubectl(&ci, &dir, &["get", "configmaps", "-w"], "kubectl-watch");
    // (No ConfigMap yet, so nothing printed: wait for its watch request.)
    wait_until("kubectl watches", Duration::from_secs(15), || {
        records(&dir).iter().any(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/configmaps"))
                && r["query"].as_str().is_some_and(|q| q.contains("watch="))
        })
    });
    let manifest = write_file(&dir, "cm.yaml", &CONFIGMAP.replace("NAME", "ci-release"));
    let (ok, applied) = kubectl(&ci, &dir, &["apply", "-f", &manifest.to_string_lossy()]);
    assert!(
        ok && applied.contains("configmap/ci-release created"),
        "{applied}"
    );
    write_file(
        &dir,
        "cm.yaml",
        &CONFIGMAP
            .replace("NAME", "ci-release")
            .replace("\"42\"", "\"43\""),
    );
    let (ok, applied) = kubectl(&ci, &dir, &["apply", "-f", &manifest.to_string_lossy()]);
    assert!(
        ok && applied.contains("configmap/ci-release configured"),
        "{applied}"
    );
    let (ok, shown) = kubectl(
        &ci,
        &dir,
        &[
            "get",
            "configmap",
            "ci-release",
            "-o",
            "jsonpath={.data.release}",
        ],
    );
    assert!(ok && shown.trim() == "43", "{shown}");
    watch.wait_for_log("ci-release", Duration::from_secs(15));
    drop(watch);

    // logs -f: five lines as they are written, then the end
    let (ok, logs) = kubectl(&ci, &dir, &["logs", "-f", "web-1"]);
    assert!(
        ok && logs.contains("log line 1") && logs.contains("log line 5"),
        "{logs}"
    );

    // exec: a WebSocket upgrade both ways (stdin in, stdout out)
    let (ok, out) = kubectl(&ci, &dir, &["exec", "web-1", "--", "echo", "hello"]);
    assert!(ok && out.contains("echo hello"), "{out}");
    let kube = dir.join("kubeconfig.yaml").to_string_lossy().into_owned();
    let piped = ci.exec(
        "sh",
        [
            "-c",
            &format!(
                "printf 'abc\\n' | HOME={} kubectl --kubeconfig {kube} exec -i web-1 -- cat",
                dir.join("home").display()
            ),
        ],
    );
    let piped_out = String::from_utf8_lossy(&piped.stdout).into_owned();
    assert!(
        piped.status.success() && piped_out.contains("cat\nabc"),
        "{piped_out}{}",
        String::from_utf8_lossy(&piped.stderr)
    );

    // port-forward: SPDY inside a WebSocket, to the pod's port (the page)
    let forward = spawn_kubectl(
        &ci,
        &dir,
        &["port-forward", "pod/web-1", "18081:80"],
        "kubectl-port-forward",
    );
    forward.wait_for_log("Forwarding from 127.0.0.1:18081", Duration::from_secs(15));
    let page = ci.exec(
        "curl",
        ["-s", "--max-time", "10", "http://127.0.0.1:18081/page.txt"],
    );
    assert_eq!(String::from_utf8_lossy(&page.stdout), PAGE);
    drop(forward);

    // A caller's own credential never reaches the API server: sent, it is
    // replaced by the gateway's (and the stand-in refuses any other).
    let direct = gw.exec(
        "curl",
        [
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Authorization: Bearer not-the-token",
            "-k",
            &format!("https://{SERVER}:6443/api"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "401");
    let through = ci.exec(
        "curl",
        [
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Authorization: Bearer caller-own-token",
            &format!("http://{GW_OVERLAY}:6443/api"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&through.stdout), "200");

    // What reached the API server: every request through the mesh carried
    // the gateway's token and the job impersonated; exec and port-forward
    // were upgrades (101).
    let seen = records(&dir);
    let from_mesh: Vec<&serde_json::Value> = seen
        .iter()
        .filter(|r| r["headers"]["impersonate-user"].is_string())
        .collect();
    assert!(from_mesh.len() >= 10, "{seen:?}");
    for r in &from_mesh {
        assert_eq!(
            r["headers"]["authorization"],
            format!("Bearer {TOKEN}"),
            "{r}"
        );
        assert_eq!(r["headers"]["impersonate-user"], "tern:job", "{r}");
        assert_eq!(r["headers"]["impersonate-group"], "tern:ci", "{r}");
        assert_ne!(r["status"], 401, "{r}");
    }
    let upgraded = |what: &str| {
        from_mesh
            .iter()
            .any(|r| r["path"].as_str().is_some_and(|p| p.ends_with(what)) && r["status"] == 101)
    };
    assert!(upgraded("/exec"), "exec was an upgrade: {seen:?}");
    assert!(
        upgraded("/portforward"),
        "port-forward was an upgrade: {seen:?}"
    );
    let text = std::fs::read_to_string(dir.join("record.jsonl")).unwrap_or_default();
    assert!(!text.contains("caller-own-token"), "{text}");
    // Only the one direct request without the mesh was refused.
    assert_eq!(seen.iter().filter(|r| r["status"] == 401).count(), 1);
    // The token is in no log of the gateway's, nor in its audit log.
    let audit = std::fs::read_to_string(dir.join("k8s-audit.jsonl")).unwrap_or_default();
    assert!(audit.lines().count() >= from_mesh.len(), "{audit}");
    assert!(!audit.contains(TOKEN) && !gw_node.log().contains(TOKEN));
}
