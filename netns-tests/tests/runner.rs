//! The runner on real kernels: a CI node hands pipelines to a runner node
//! across the mesh with `tern run` and sees their output live; authorization
//! by certificate group; secrets masked; the audit log. Needs root.

use std::fs;
use std::path::Path;
use std::process::Output;

use tern_netns_tests::tern::*;
use tern_netns_tests::{require_root, require_tools, serial, wait_until, Lab, Ns};

const RUNNER_IP: &str = "100.64.0.20";

fn runner_config() -> String {
    format!(
        "{}[[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\n[runner]\nlabels = [\"linux\"]\nallow_groups = [\"ci\"]\nconcurrency = 2\nwork_dir = \"jobs\"\naudit_log = \"audit.jsonl\"\n",
        node_config_text("runner", "ca.crt")
    )
}

fn tern_run(ns: &Ns, dir: &Path, pipeline: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = ns.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(dir)
        .args(["run", pipeline, "--node", RUNNER_IP])
        .args(extra)
        .env_remove("GITHUB_ACTIONS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("tern run: {e}"))
}

#[test]
fn ci_node_runs_a_pipeline_on_the_runner_and_sees_it_live() {
    let test = "runner";
    if !require_root(test) || !require_tools(test, &["bash", "ping"]) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new("runner");
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let ci = lab.add_ns("ci");
    let web = lab.add_ns("web");
    let runner = lab.add_ns("runner");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&ci, "198.18.0.2/24");
    lab.connect_to_wan(&web, "198.18.0.3/24");
    lab.connect_to_wan(&runner, "198.18.0.4/24");
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci", "100.64.0.5/10", &["--groups", "ci"]);
    sign(&dir, "ca", "web", "100.64.0.6/10", &["--groups", "web"]);
    sign(&dir, "ca", "runner", &format!("{RUNNER_IP}/10"), &[]);
    let _lh = start_lighthouse(&lh, &write_lighthouse_config(&dir));
    let _ci = start_node(&ci, &write_node_config(&dir, "ci", "ca.crt"), "node-ci");
    let _web = start_node(&web, &write_node_config(&dir, "web", "ca.crt"), "node-web");
    let runner_proc = start_node(
        &runner,
        &write_file(&dir, "runner.toml", &runner_config()),
        "node-runner",
    );
    runner_proc.wait_for_log("runner up", std::time::Duration::from_secs(10));
    wait_until(
        "all three register",
        std::time::Duration::from_secs(15),
        || {
            lighthouse_status(&dir)["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3)
        },
    );

    // Three steps: one passes, one fails but may, one fails; a fourth never runs.
    write_file(
        &dir,
        "pipeline.toml",
        r#"name = "three steps"
[env]
GREETING = "hello"
[[steps]]
name = "greet"
run = "echo $GREETING from $TERN_CALLER; for i in 1 2 3; do echo line $i; done; echo to-stderr >&2"
[[steps]]
name = "flaky"
run = "echo token is $TOKEN; exit 4"
continue_on_error = true
[[steps]]
name = "fails"
run = "echo about to fail; exit 5"
[[steps]]
name = "never"
run = "echo must not run"
"#,
    );
    let out = tern_run(
        &ci,
        &dir,
        "pipeline.toml",
        &["--secret", "TOKEN"],
        &[("TOKEN", "hunter2-s3cr3t")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(5),
        "the failing step's code: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| *l == needle)
            .unwrap_or_else(|| panic!("no line {needle:?} in:\n{stdout}"))
    };
    let order = [
        pos("[greet] hello from ci"),
        pos("[greet] line 1"),
        pos("[greet] line 2"),
        pos("[greet] line 3"),
        pos("[flaky] token is ***"),
        pos("[fails] about to fail"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order:\n{stdout}");
    assert!(lines.contains(&"[greet] to-stderr"), "{stdout}");
    assert!(stdout.contains("✗ flaky (exit 4"), "{stdout}");
    assert!(stdout.contains("✗ fails (exit 5"), "{stdout}");
    assert!(!stdout.contains("must not run"), "{stdout}");
    assert!(!stdout.contains("hunter2-s3cr3t"), "the secret never shows");

    // A caller outside allow_groups is refused, and nothing runs.
    let denied = tern_run(&web, &dir, "pipeline.toml", &[], &[]);
    assert_eq!(
        denied.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(String::from_utf8_lossy(&denied.stderr).contains("web may not run pipelines here"));

    // The audit log: the job and the refusal, and never the secret.
    let audit =
        fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_else(|e| panic!("audit log: {e}"));
    assert!(!audit.contains("hunter2-s3cr3t"), "{audit}");
    let records: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect();
    assert_eq!(records.len(), 2, "{audit}");
    assert_eq!(records[0]["caller"]["name"], "ci");
    assert_eq!(records[0]["result"], "failed");
    assert_eq!(records[0]["exit_code"], 5);
    assert_eq!(records[0]["steps"].as_array().map(|s| s.len()), Some(3));
    assert_eq!(records[1]["caller"]["name"], "web");
    assert!(records[1]["message"]
        .as_str()
        .is_some_and(|m| m.contains("may not run")));

    // A bad pipeline never leaves the CI node.
    write_file(&dir, "bad.toml", "name = \"x\"\n[[steps]]\nname = \"s\"\nrun = \"true\"\nworking_directory = \"../escape\"\n");
    let bad = tern_run(&ci, &dir, "bad.toml", &[], &[]);
    assert_eq!(bad.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bad.toml:5"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
