//! The lighthouse's admin API (`/api/v1/`), with curl, on loopback, no
//! root. Through the mesh (userspace nodes forwarding to the lighthouse's
//! overlay address, port 80): the caller is its certificate, admins read
//! and act, auditors only read, a CI node gets 403 naming the groups it
//! lacks. On the Unix API socket: the registered nodes a page at a time with
//! what their certificates say; a token made through the API (its secret
//! shown once) enrolls a CI job, which then appears in the list, and is
//! gone from the token list once deleted; a revocation made through the
//! API ends the job's session at the gateway; garbage gets a 4xx with a
//! stable kind, never a crash; `tern-lighthouse status` (JSON lines on the
//! same socket) keeps working; every write is audited in the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tern_tests::enroll_lab::{lab_with, sign_by_root, Lab};
use tern_tests::{free_tcp, need_tool, run_bounded, wait_until, Daemon};

/// This file's private network (each test file its own).
const SUBNET: &str = "127.84.0";

/// `curl` against the lab's lighthouse socket: the status and the body.
fn curl(lab: &Lab, method: &str, path: &str, body: Option<&str>, extra: &[&str]) -> (u16, String) {
    let socket = lab.dir.path().join("lh.sock");
    let socket = socket.to_string_lossy();
    let mut args = vec!["--unix-socket", &*socket];
    args.extend_from_slice(extra);
    let (code, answer) = curl_at("http://lighthouse", method, path, body, &args);
    // Every answer under /api/v1/ is held to the OpenAPI document.
    if path.starts_with("/api/v1/") && !path.ends_with("openapi.json") && code != 0 {
        conforms(lab, method, path, code, &answer);
    }
    (code, answer)
}

/// `curl` to `base` + `path`: the status and the body.
fn curl_at(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra: &[&str],
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.args(extra);
    cmd.arg(format!("{base}{path}"));
    let out = run_bounded(cmd, "curl", Duration::from_secs(15));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The path as the OpenAPI document names it.
fn doc_path(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let path = path.strip_prefix("/api/v1").unwrap_or(path);
    match path.strip_prefix("/tokens/") {
        Some(_) => "/tokens/{id}".to_string(),
        None => path.to_string(),
    }
}

/// Holds an answer to the lighthouse's own OpenAPI document (fetched once
/// per lab).
fn conforms(lab: &Lab, method: &str, path: &str, code: u16, body: &str) {
    let (_, doc) = curl(lab, "GET", "/api/v1/openapi.json", None, &[]);
    let doc = json(&doc);
    let documented = !doc["paths"][doc_path(path)][method.to_ascii_lowercase()].is_null();
    let result = if documented {
        tern_tests::openapi::check(&doc, &doc_path(path), method, code, &json(body))
    } else {
        tern_tests::openapi::check_error(&doc, &json(body))
    };
    if let Err(e) = result {
        panic!("the answer does not match the OpenAPI document: {e}\n{body}");
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn node_names(lab: &Lab) -> Vec<String> {
    let (code, body) = curl(lab, "GET", "/api/v1/nodes", None, &[]);
    assert_eq!(code, 200, "{body}");
    json(&body)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

fn lighthouse_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir.path().join("lh.log")).unwrap_or_default()
}

#[test]
fn an_admin_lists_nodes_makes_a_token_that_enrolls_a_job_and_revokes_the_job() {
    if !need_tool("admin_api", "curl", "curl") {
        return;
    }
    let lab = lab_with(SUBNET, "");
    wait_until("the gateway registered", Duration::from_secs(20), || {
        node_names(&lab).contains(&"gw".to_string())
    });

    // The nodes, with what the gateway's certificate says.
    let (code, body) = curl(&lab, "GET", "/api/v1/nodes?limit=10", None, &[]);
    assert_eq!(code, 200, "{body}");
    let page = json(&body);
    assert_eq!(page["total"], 1);
    assert!(page["next"].is_null());
    let gw = &page["nodes"][0];
    assert_eq!(gw["name"], "gw");
    assert_eq!(gw["transport"], "udp");
    assert_eq!(gw["fingerprint"].as_str().unwrap().len(), 64);
    assert_eq!(gw["ephemeral"], false);
    assert_eq!(gw["routes"][0], format!("{SUBNET}.0/24"));

    // A token through the API: the secret once, in the answer.
    let (code, body) = curl(
        &lab,
        "POST",
        "/api/v1/tokens",
        Some(r#"{"groups":["ci"],"uses":1,"ttl":"10m","cert_ttl":"10m"}"#),
        &[],
    );
    assert_eq!(code, 201, "{body}");
    let created = json(&body);
    let token = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    let (code, body) = curl(&lab, "GET", "/api/v1/tokens", None, &[]);
    assert_eq!(code, 200);
    assert!(body.contains(&id), "{body}");
    assert!(!body.contains(&token), "the secret never again: {body}");

    // The job enrolls with it and appears in the list, ephemeral.
    let (_job, forward) = lab.start_job("job", &token);
    wait_until(
        "the job reached the private service",
        Duration::from_secs(20),
        || tern_tests::enroll_lab::get(forward).is_some(),
    );
    let (_, body) = curl(&lab, "GET", "/api/v1/nodes", None, &[]);
    let nodes = json(&body);
    let job = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["ephemeral"] == true)
        .unwrap_or_else(|| panic!("the job is listed: {body}"))
        .clone();
    assert_eq!(job["issued_by"], "lh-issuer");
    assert_eq!(job["groups"][0], "ci");
    // With which token it enrolled.
    assert_eq!(job["enrollment"]["token"], id.as_str(), "{body}");
    assert_eq!(job["enrollment"]["claims"], serde_json::json!({}), "{body}");
    // The issuance log says how it was bought.
    let (code, body) = curl(&lab, "GET", "/api/v1/issued?limit=5", None, &[]);
    assert_eq!(code, 200, "{body}");
    let issued = json(&body);
    assert_eq!(issued["items"][0]["name"], job["name"]);
    assert_eq!(issued["items"][0]["fingerprint"], job["fingerprint"]);
    assert_eq!(
        issued["items"][0]["how"],
        format!("token {id}"),
        "bought with a token: {body}"
    );
    assert_eq!(issued["items"][0]["token"], id.as_str(), "{body}");
    // Used up: deleting it works once, then it is not found.
    let (code, body) = curl(&lab, "DELETE", &format!("/api/v1/tokens/{id}"), None, &[]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(&lab, "DELETE", &format!("/api/v1/tokens/{id}"), None, &[]);
    assert_eq!(code, 404, "{body}");
    assert_eq!(json(&body)["error"]["kind"], "not_found");

    // Revoked through the API by its name: its session at the gateway ends.
    let name = job["name"].as_str().unwrap();
    let (code, body) = curl(
        &lab,
        "POST",
        "/api/v1/revocations",
        Some(&format!(r#"{{"what":"{name}"}}"#)),
        &[],
    );
    assert_eq!(code, 201, "{body}");
    assert_eq!(json(&body)["revoked"][0]["new"], true);
    wait_until(
        "the gateway dropped the job",
        Duration::from_secs(10),
        || {
            !node_names(&lab).contains(&name.to_string())
                && tern_tests::enroll_lab::get(forward).is_none()
        },
    );
    let (_, body) = curl(&lab, "GET", "/api/v1/revocations", None, &[]);
    assert!(
        body.contains(job["fingerprint"].as_str().unwrap()),
        "{body}"
    );

    // Gateways with their subnets; no runner here.
    let (code, body) = curl(&lab, "GET", "/api/v1/gateways", None, &[]);
    assert_eq!(code, 200, "{body}");
    let gateways = json(&body);
    assert_eq!(gateways["items"][0]["name"], "gw");
    assert_eq!(gateways["items"][0]["routes"][0], format!("{SUBNET}.0/24"));
    let (code, body) = curl(&lab, "GET", "/api/v1/runners", None, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["items"], serde_json::json!([]));

    // Every write is audited.
    let log = lighthouse_log(&lab);
    for action in ["tokens.create", "tokens.delete", "revocations.create"] {
        assert!(log.contains(action), "audited {action}: {log}");
    }
    // The old status lines still work on the same socket.
    let status = lab.lighthouse_status();
    assert!(status["nodes"].is_array(), "{status}");
}

#[test]
fn garbage_gets_a_4xx_with_a_kind_and_the_lighthouse_goes_on() {
    if !need_tool("admin_api", "curl", "curl") {
        return;
    }
    let lab = lab_with(SUBNET, "");
    let huge = "x".repeat(100_000);
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/api/v1", None, 404, "not_found"),
        ("GET", "/api/v1/secrets", None, 404, "not_found"),
        (
            "GET",
            "/api/v1/nodes?ephemeral=maybe",
            None,
            400,
            "bad_request",
        ),
        ("GET", "/api/v1/nodes?sort=name", None, 400, "bad_request"),
        ("PUT", "/api/v1/nodes", None, 405, "method_not_allowed"),
        ("GET", "/api/v1/nodes?limit=0", None, 400, "bad_request"),
        (
            "POST",
            "/api/v1/tokens",
            Some("{not json"),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/tokens",
            Some(r#"{"groups":["ci"],"admin":true}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/tokens",
            Some(r#"{"groups":["root"]}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/api/v1/tokens",
            Some(&huge),
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/api/v1/revocations",
            Some(r#"{"what":"nobody"}"#),
            404,
            "not_found",
        ),
        ("DELETE", "/api/v1/tokens/zz", None, 400, "bad_request"),
    ];
    for (method, path, body, want, kind) in cases {
        let (code, answer) = curl(&lab, method, path, body, &[]);
        assert_eq!(code, want, "{method} {path}: {answer}");
        assert_eq!(
            json(&answer)["error"]["kind"],
            kind,
            "{method} {path}: {answer}"
        );
        assert!(json(&answer)["error"]["message"].as_str().unwrap().len() > 10);
    }
    // Not JSON at all, not HTTP at all: the connection closes, nothing
    // breaks.
    let socket = lab.dir.path().join("lh.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(&mut s, b"\x00\x01garbage\r\n\r\n").unwrap();
    drop(s);
    let (code, _) = curl(&lab, "GET", "/api/v1/nodes", None, &[]);
    assert_eq!(code, 200, "the API still answers");
    assert!(Path::new(&socket).exists());
}

/// A node with a certificate of the lab's root CA (`groups`), in userspace
/// mode, with a local forward to the lighthouse's admin port through the
/// mesh; returns it and the forward's port.
fn node_to_the_lighthouse(lab: &Lab, name: &str, ip: &str, groups: &str) -> (Daemon, u16) {
    let d = lab.dir.path();
    sign_by_root(d, name, ip, groups);
    let forward = free_tcp();
    let config = lab.ci_config_to(name, &[(forward, "100.64.0.1:80")]);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[pki]\nca = \"ca.crt\"\n",
        &format!("[pki]\nca = \"ca.crt\"\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\n"),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let node = Daemon::start(
        "tern",
        &["up", "--config", &config.to_string_lossy()],
        d.join(format!("{name}.log")),
    );
    (node, forward)
}

#[test]
fn through_the_mesh_the_caller_is_its_certificate_admins_act_auditors_read_others_get_403() {
    if !need_tool("admin_api", "curl", "curl") {
        return;
    }
    let lab = lab_with(SUBNET, "");
    let (_admin, admin_port) = node_to_the_lighthouse(&lab, "admin-1", "100.64.0.9/10", "admin");
    let (_auditor, auditor_port) =
        node_to_the_lighthouse(&lab, "audit-1", "100.64.0.10/10", "auditor");
    let (_ci, ci_port) = node_to_the_lighthouse(&lab, "ci-1", "100.64.0.11/10", "ci");
    let at = |port: u16| format!("http://127.0.0.1:{port}");
    wait_until(
        "the admin reaches the API through the mesh",
        Duration::from_secs(20),
        || curl_at(&at(admin_port), "GET", "/api/v1/nodes", None, &[]).0 == 200,
    );

    // The admin reads and acts.
    let (code, body) = curl_at(&at(admin_port), "GET", "/api/v1/nodes?limit=2", None, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["nodes"].as_array().unwrap().len(), 2);
    let (code, body) = curl_at(
        &at(admin_port),
        "POST",
        "/api/v1/tokens",
        Some(r#"{"groups":["ci"]}"#),
        &[],
    );
    assert_eq!(code, 201, "{body}");
    // The auditor reads, and may not act.
    let (code, body) = curl_at(&at(auditor_port), "GET", "/api/v1/tokens", None, &[]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl_at(
        &at(auditor_port),
        "POST",
        "/api/v1/revocations",
        Some(r#"{"what":"ci-1"}"#),
        &[],
    );
    assert_eq!(code, 403, "{body}");
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("audit-1") && message.contains("admin"),
        "{message}"
    );
    // The CI node may do nothing, and is told which groups would let it.
    wait_until(
        "the CI node reaches the lighthouse",
        Duration::from_secs(20),
        || curl_at(&at(ci_port), "GET", "/api/v1/nodes", None, &[]).0 != 0,
    );
    let (code, body) = curl_at(&at(ci_port), "GET", "/api/v1/nodes", None, &[]);
    assert_eq!(code, 403, "{body}");
    assert_eq!(json(&body)["error"]["kind"], "forbidden");
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("ci-1 (groups ci)") && message.contains("auditor"),
        "{message}"
    );
    conforms(&lab, "GET", "/api/v1/nodes", code, &body);
    // The refused write is audited with the caller's certificate.
    let log = lighthouse_log(&lab);
    let line = log
        .lines()
        .find(|l| l.contains("revocations.create") && l.contains("audit-1"))
        .unwrap_or_else(|| panic!("the refused write is audited: {log}"));
    assert!(line.contains("403") && line.contains("mesh"), "{line}");
    let refused = lab.lighthouse_status()["admin"]["refused"]
        .as_u64()
        .unwrap();
    assert!(refused >= 2, "refusals are counted: {refused}");
}

/// The value of the first `<input>` with `name="NAME"` (or `id="NAME"`)
/// in a page.
fn form_value(page: &str, name: &str) -> String {
    let at = page
        .find(&format!("name=\"{name}\""))
        .or_else(|| page.find(&format!("id=\"{name}\"")))
        .unwrap_or_else(|| panic!("no {name} in {page}"));
    let page = &page[at..];
    let key = "value=\"";
    let at = page
        .find(key)
        .unwrap_or_else(|| panic!("no {name} in {page}"));
    let rest = &page[at + key.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

#[test]
fn the_console_is_for_the_groups_only_and_its_forms_only_from_its_own_pages() {
    if !need_tool("admin_api", "curl", "curl") {
        return;
    }
    let lab = lab_with(SUBNET, "");
    let (_admin, admin_port) = node_to_the_lighthouse(&lab, "admin-1", "100.64.0.9/10", "admin");
    let (_ci, ci_port) = node_to_the_lighthouse(&lab, "ci-1", "100.64.0.11/10", "ci");
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_until(
        "the admin reaches the console through the mesh",
        Duration::from_secs(20),
        || curl_at(&admin, "GET", "/", None, &[]).0 == 200,
    );
    // The overview, with the page's security headers.
    let out = run_bounded(
        {
            let mut c = Command::new("curl");
            c.args(["-sS", "--max-time", "10", "-D", "-", &format!("{admin}/")]);
            c
        },
        "curl",
        Duration::from_secs(15),
    );
    let page = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        page.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{page}"
    );
    assert!(page.contains("x-frame-options: deny") && page.contains("cache-control: no-store"));
    assert!(
        page.contains("you are <strong>admin-1</strong> (groups admin)"),
        "{page}"
    );
    // The node list filters by group; the API does too.
    let (code, page) = curl_at(&admin, "GET", "/nodes?group=ci", None, &[]);
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains(">ci-1<") && !page.contains("/nodes/100.64.0.9"),
        "{page}"
    );
    let (code, body) = curl_at(
        &admin,
        "GET",
        "/api/v1/nodes?group=admin&q=ADMIN",
        None,
        &[],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["total"], 1, "{body}");
    assert_eq!(json(&body)["nodes"][0]["name"], "admin-1");
    conforms(&lab, "GET", "/api/v1/nodes", code, &body);

    // A CI node gets a 403 page naming what it lacks.
    wait_until(
        "the CI node reaches the lighthouse",
        Duration::from_secs(20),
        || {
            curl_at(
                &format!("http://127.0.0.1:{ci_port}"),
                "GET",
                "/",
                None,
                &[],
            )
            .0 != 0
        },
    );
    let (code, page) = curl_at(
        &format!("http://127.0.0.1:{ci_port}"),
        "GET",
        "/tokens",
        None,
        &[],
    );
    assert_eq!(code, 403, "{page}");
    assert!(
        page.contains("ci-1 (groups ci) may not read") && page.contains("auditor"),
        "{page}"
    );
    assert!(!page.contains("<form"), "{page}");

    // A form needs the token its page carried, from a page of this origin.
    let (_, tokens) = curl_at(&admin, "GET", "/tokens", None, &[]);
    let csrf = form_value(&tokens, "csrf");
    let form = |extra: &[&str], body: &str| {
        let mut args = vec![
            "-H",
            "Content-Type: application/x-www-form-urlencoded",
            "--data-binary",
            body,
        ];
        args.extend_from_slice(extra);
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
        ])
        .args(&args)
        .arg(format!("{admin}/tokens"));
        let out = run_bounded(cmd, "curl", Duration::from_secs(15));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse::<u16>().unwrap(), body.to_string())
    };
    let good = format!("csrf={csrf}&groups=ci&uses=1");
    let (code, page) = form(&["-H", "Origin: http://evil.example"], &good);
    assert_eq!(code, 403, "a cross-origin POST is refused: {page}");
    let (code, page) = form(&["-H", "Sec-Fetch-Site: cross-site"], &good);
    assert_eq!(code, 403, "{page}");
    let (code, page) = form(&["-H", "Host: lh.evil.example"], &good);
    assert_eq!(code, 403, "a name of someone else's is refused: {page}");
    let (code, page) = form(&[], "groups=ci&uses=1");
    assert_eq!(code, 403, "no token: {page}");
    assert!(page.contains("reload the page"), "{page}");
    let (code, page) = form(&[], &format!("csrf={}x&groups=ci", &csrf[..csrf.len() - 1]));
    assert_eq!(code, 403, "a forged token: {page}");
    let origin = format!("Origin: http://127.0.0.1:{admin_port}");
    let (code, page) = form(&["-H", &origin, "-H", "Sec-Fetch-Site: same-origin"], &good);
    assert_eq!(code, 201, "{page}");
    let secret = form_value(&page, "secret");
    assert!(secret.len() > 20, "{secret}");
    // The secret is on that page only.
    let (_, tokens) = curl_at(&admin, "GET", "/tokens", None, &[]);
    assert!(!tokens.contains(&secret));
    // A CSRF token is the admin's own: another caller's page cannot use it
    // (the CI node is refused before that, by its groups).
    let log = lighthouse_log(&lab);
    assert!(
        log.lines()
            .any(|l| l.contains("tokens.create") && l.contains("403 csrf")),
        "the refused form is audited: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("tokens.create") && l.contains("\"result\":\"ok\"")),
        "the form's write is audited: {log}"
    );
}
