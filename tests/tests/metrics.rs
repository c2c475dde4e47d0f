//! Metrics and JSON logs, on loopback, no root: a lighthouse with `[enroll]`
//! and a userspace gateway that also runs a runner, both with `[metrics]`
//! and `--log-format json`. A CI job enrolls with a token, fetches through
//! the gateway, is denied once by its firewall and runs a pipeline on its
//! runner; the counters move accordingly. Every scrape passes `promtool
//! check metrics`; the names served and docs/metrics.md's table are the
//! same set; every log line is a JSON object and no log holds the token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tern_tests::enroll_lab::{get, lab_custom, Down, LabExtra};
use tern_tests::{bin, free_tcp, need_tool, repo_root, wait_until, Daemon};

/// `GET /metrics` on 127.0.0.1:`port`: the body of a 200, else None.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_string())
}

/// The value of one sample, e.g. `tern_handshakes_total` or
/// `tern_drops_total{reason="no_route"}`; 0 when absent.
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == sample).then(|| v.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// The metric names a scrape declares (`# TYPE name kind`).
fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// The names docs/metrics.md's tables document.
fn documented() -> BTreeSet<String> {
    let doc = fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("tern_"))
        .map(str::to_string)
        .collect()
}

fn promtool_check(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics ({what}): {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every line of a daemon's log is a JSON object with the fields a log
/// pipeline needs.
fn json_log(path: &Path) -> usize {
    let log = fs::read_to_string(path).unwrap();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", path.display()));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(
                v.get(field).is_some(),
                "{}: no {field}: {line}",
                path.display()
            );
        }
        lines += 1;
    }
    lines
}

#[test]
fn counters_move_endpoints_pass_promtool_and_match_the_docs_and_logs_are_json() {
    let check = need_tool("metrics", "promtool", "prometheus");
    let (lh_metrics, gw_metrics) = (free_tcp(), free_tcp());
    let lh_head = format!("[metrics]\nlisten = \"127.0.0.1:{lh_metrics}\"\n");
    let gw = format!(
        "[metrics]\nlisten = \"127.0.0.1:{gw_metrics}\"\n\
         [[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\ngroups = [\"ci\"]\n\
         [runner]\nallow_groups = [\"ci\"]\nwork_dir = \"jobs\"\naudit_log = \"audit.jsonl\"\n\
         [[services]]\nname = \"api\"\nlisten = 9000\nupstream = \"http://127.81.0.10:1\"\naudit_log = \"services.jsonl\"\n"
    );
    let lab = lab_custom(
        "127.81.0",
        &LabExtra {
            lh_head: &lh_head,
            gw: &gw,
            args: &["--log-format", "json"],
            ..LabExtra::default()
        },
    );
    let d = lab.dir.path();
    wait_until("both endpoints answer", Duration::from_secs(20), || {
        scrape(lh_metrics).is_some() && scrape(gw_metrics).is_some()
    });
    wait_until("the gateway registers", Duration::from_secs(20), || {
        lab.registered().iter().any(|n| n == "gw")
    });
    let lh0 = scrape(lh_metrics).unwrap();
    let gw0 = scrape(gw_metrics).unwrap();
    assert_eq!(
        value(&lh0, "tern_lighthouse_registered_nodes"),
        1.0,
        "{lh0}"
    );
    assert_eq!(
        value(&lh0, "tern_lighthouse_enrollments_total{result=\"issued\"}"),
        0.0
    );
    assert!(
        value(&lh0, "tern_cert_expiry_timestamp_seconds") > 1.7e9,
        "{lh0}"
    );
    assert_eq!(
        value(&gw0, "tern_lighthouses{state=\"registered\"}"),
        1.0,
        "{gw0}"
    );

    // A CI job: enrolls (a JSON log too), reaches the private service
    // through the gateway, and one connection the gateway's firewall denies
    // (TCP to the gateway's own address: only its subnet is allowed).
    let token = lab.token("1", "ci");
    let (forward, denied) = (free_tcp(), free_tcp());
    let service = format!("{}:{}", lab.service_ip, lab.http_port);
    let ci = lab.ci_config_to("ci", &[(forward, &service), (denied, "100.64.0.2:9")]);
    let _down = Down(d.join("ci.sock"));
    let _job = Daemon::start(
        "tern",
        &[
            "up",
            "--config",
            &ci.to_string_lossy(),
            "--enroll-token",
            &token,
            "--log-format",
            "json",
        ],
        d.join("ci.log"),
    );
    wait_until(
        "the job reaches the private service",
        Duration::from_secs(20),
        || get(forward).is_some_and(|r| r.contains("private hello")),
    );
    let _ = get(denied);

    // A pipeline on the gateway's runner.
    fs::write(
        d.join("p.toml"),
        "name = \"p\"\n[[steps]]\nname = \"hello\"\nrun = \"echo hello\"\n",
    )
    .unwrap();
    let run = Command::new(bin("tern"))
        .current_dir(d)
        .args(["run", "p.toml", "--node", "gw", "--socket", "ci.sock"])
        .env_remove("GITHUB_ACTIONS")
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    let mut gw1 = String::new();
    wait_until(
        "the gateway counts the denial",
        Duration::from_secs(10),
        || {
            gw1 = scrape(gw_metrics).unwrap_or_default();
            value(
                &gw1,
                "tern_firewall_denied_total{rule=\"inbound/default-deny\"}",
            ) >= 1.0
        },
    );
    let lh1 = scrape(lh_metrics).unwrap();
    assert_eq!(
        value(&lh1, "tern_lighthouse_enrollments_total{result=\"issued\"}"),
        1.0,
        "{lh1}"
    );
    assert_eq!(
        value(&lh1, "tern_lighthouse_registered_nodes"),
        2.0,
        "{lh1}"
    );
    assert!(
        value(&lh1, "tern_lighthouse_registrations_total")
            > value(&lh0, "tern_lighthouse_registrations_total")
    );
    assert!(value(&gw1, "tern_handshakes_total") >= 1.0, "{gw1}");
    assert!(
        value(&gw1, "tern_packets_total{direction=\"in\"}")
            > value(&gw0, "tern_packets_total{direction=\"in\"}"),
        "{gw1}"
    );
    assert!(
        value(&gw1, "tern_bytes_total{direction=\"out\"}") > 0.0,
        "{gw1}"
    );
    assert!(
        value(&gw1, "tern_firewall_flows_allowed_total") >= 2.0,
        "{gw1}"
    );
    assert_eq!(
        value(&gw1, "tern_peers{path=\"direct\"}")
            + value(&gw1, "tern_peers{path=\"relayed\"}")
            + value(&gw1, "tern_peers{path=\"probing\"}"),
        2.0,
        "the lighthouse and the job: {gw1}"
    );
    assert_eq!(
        value(&gw1, "tern_runner_jobs_total{result=\"succeeded\"}"),
        1.0,
        "{gw1}"
    );
    assert_eq!(value(&gw1, "tern_runner_job_duration_seconds_count"), 1.0);
    assert_eq!(value(&gw1, "tern_runner_jobs{state=\"running\"}"), 0.0);

    // promtool, and the documented set of names is the served set.
    if check {
        promtool_check("lighthouse", &lh1);
        promtool_check("gateway with a runner", &gw1);
    }
    let served: BTreeSet<String> = names(&lh1).union(&names(&gw1)).cloned().collect();
    let documented = documented();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served, not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in docs/metrics.md, not served: {unserved:?}"
    );

    // Logs: JSON lines, and the token in none of them.
    for log in ["lh.log", "gw.log", "ci.log"] {
        let path = d.join(log);
        assert!(json_log(&path) > 0, "{log} is empty");
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "{log} holds the token");
        let secret = token.split('_').nth(1).unwrap_or(&token);
        assert!(!text.contains(secret), "{log} holds the token's secret");
    }
}
