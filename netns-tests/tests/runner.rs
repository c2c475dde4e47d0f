//! The runner on real kernels: a CI node hands pipelines to a runner node
//! across the mesh with `tern run` and sees their output live; authorization
//! by certificate group; secrets masked; the audit log. Needs root.

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

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
    let socket = dir.join(format!("{}.sock", ns.short_name()));
    cmd.current_dir(dir)
        .args(["run", pipeline, "--node", RUNNER_IP, "--socket"])
        .arg(socket)
        .args(extra)
        .env_remove("GITHUB_ACTIONS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap_or_else(|e| panic!("tern run: {e}"))
}

struct World {
    _lab: Lab,
    dir: std::path::PathBuf,
    ci: Ns,
    web: Ns,
    runner_proc: tern_netns_tests::Proc,
    _guards: Vec<tern_netns_tests::Proc>,
}

/// A lighthouse, a runner (concurrency 2) and two callers: `ci` (group ci,
/// allowed) and `web` (group web, not allowed); all registered.
fn world(prefix: &str) -> World {
    let lab = Lab::new(prefix);
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
    sign(
        &dir,
        "ca",
        "runner",
        &format!("{RUNNER_IP}/10"),
        &["--groups", "runner"],
    );
    let guards = vec![
        start_lighthouse(&lh, &write_lighthouse_config(&dir)),
        start_node(&ci, &write_node_config(&dir, "ci", "ca.crt"), "node-ci"),
        start_node(&web, &write_node_config(&dir, "web", "ca.crt"), "node-web"),
    ];
    let runner_proc = start_node(
        &runner,
        &write_file(&dir, "runner.toml", &runner_config()),
        "node-runner",
    );
    runner_proc.wait_for_log("runner up", Duration::from_secs(10));
    wait_until("all three register", Duration::from_secs(15), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 3)
    });
    World {
        _lab: lab,
        dir,
        ci,
        web,
        runner_proc,
        _guards: guards,
    }
}

/// `tern run` in the background, its output in the lab's logs.
fn tern_run_bg(w: &World, pipeline: &str, log: &str) -> tern_netns_tests::Proc {
    let mut cmd = w.ci.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(&w.dir)
        .args(["run", pipeline, "--node", RUNNER_IP, "--socket", "ci.sock"])
        .env_remove("GITHUB_ACTIONS");
    w.ci.spawn_command(cmd, log)
}

/// Live (not zombie) processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = after.split_whitespace().collect();
        if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" {
            if let Ok(pid) = e.file_name().to_string_lossy().parse() {
                out.push(pid);
            }
        }
    }
    out
}

fn wait_exit(p: &tern_netns_tests::Proc, within: Duration) -> Option<i32> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(status) = p.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigint_cancels_and_no_process_of_the_job_survives() {
    if !require_root("runner_cancel") || !require_tools("runner_cancel", &["bash", "kill"]) {
        return;
    }
    let _serial = serial();
    let w = world("runcancel");
    let marker = w.dir.join("step.pgid");
    write_file(
        &w.dir,
        "long.toml",
        &format!(
            "name = \"long\"\n[[steps]]\nname = \"sleepy\"\nrun = \"(trap '' TERM; sleep 300) & echo $$ > {}; echo started; wait\"\n",
            marker.display()
        ),
    );
    let run = tern_run_bg(&w, "long.toml", "tern-run-cancel");
    wait_until("the step started", Duration::from_secs(15), || {
        run.log().contains("[sleepy] started") && marker.exists()
    });
    let pgid: i32 = fs::read_to_string(&marker)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        pgid > 0 && !group_members(pgid).is_empty(),
        "the step's group runs"
    );
    let _ = std::process::Command::new("kill")
        .args(["-INT", &run.pid().to_string()])
        .status();
    let code = wait_exit(&run, Duration::from_secs(15));
    assert_eq!(code, Some(130), "cancelled: {}", run.log());
    assert!(
        group_members(pgid).is_empty(),
        "processes of the cancelled step survive: {:?}",
        group_members(pgid)
    );
    let audit = fs::read_to_string(w.dir.join("audit.jsonl")).unwrap_or_default();
    assert!(audit.contains("\"result\":\"cancelled\""), "{audit}");
}

#[test]
fn two_at_once_five_submitted_all_finish_and_the_queue_shows() {
    if !require_root("runner_queue") || !require_tools("runner_queue", &["bash", "date"]) {
        return;
    }
    let _serial = serial();
    let w = world("runqueue");
    let spans = w.dir.join("spans");
    write_file(
        &w.dir,
        "short.toml",
        &format!(
            "name = \"short\"\n[[steps]]\nname = \"work\"\nrun = \"echo start $(date +%s.%N) >> {s}; sleep 1; echo end $(date +%s.%N) >> {s}\"\n",
            s = spans.display()
        ),
    );
    let runs: Vec<_> = (0..5)
        .map(|i| tern_run_bg(&w, "short.toml", &format!("tern-run-{i}")))
        .collect();
    for r in &runs {
        assert_eq!(
            wait_exit(r, Duration::from_secs(30)),
            Some(0),
            "{}",
            r.log()
        );
    }
    assert!(
        runs.iter().any(|r| r.log().contains("queued (position")),
        "some caller waited and saw its position"
    );
    // At no moment were more than two jobs running.
    let mut events: Vec<(f64, i32)> = fs::read_to_string(&spans)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (kind, t) = l.split_once(' ')?;
            Some((t.parse().ok()?, if kind == "start" { 1 } else { -1 }))
        })
        .collect();
    assert_eq!(events.len(), 10);
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut running = 0;
    for (_, d) in events {
        running += d;
        assert!(running <= 2, "more than two jobs at once");
    }
}

#[test]
fn runner_killed_mid_job_is_reported_lost() {
    if !require_root("runner_lost") || !require_tools("runner_lost", &["bash"]) {
        return;
    }
    let _serial = serial();
    let w = world("runlost");
    write_file(
        &w.dir,
        "long.toml",
        "name = \"long\"\n[[steps]]\nname = \"sleepy\"\nrun = \"echo started; sleep 60\"\n",
    );
    let run = tern_run_bg(&w, "long.toml", "tern-run-lost");
    wait_until("the step started", Duration::from_secs(15), || {
        run.log().contains("[sleepy] started")
    });
    let killed = Instant::now();
    w.runner_proc.kill_hard();
    let code = wait_exit(&run, Duration::from_secs(15));
    assert_eq!(code, Some(75), "runner lost: {}", run.log());
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "reported within seconds, not {:?}",
        killed.elapsed()
    );
}

#[test]
fn ci_node_runs_a_pipeline_on_the_runner_and_sees_it_live() {
    let test = "runner";
    if !require_root(test) || !require_tools(test, &["bash", "ping"]) {
        return;
    }
    let _serial = serial();
    let w = world("runner");
    let (dir, ci, web) = (&w.dir, &w.ci, &w.web);
    // Three steps: one passes, one fails but may, one fails; a fourth never runs.
    write_file(
        dir,
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
        ci,
        dir,
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
    let denied = tern_run(web, dir, "pipeline.toml", &[], &[]);
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
    write_file(dir, "bad.toml", "name = \"x\"\n[[steps]]\nname = \"s\"\nrun = \"true\"\nworking_directory = \"../escape\"\n");
    let bad = tern_run(ci, dir, "bad.toml", &[], &[]);
    assert_eq!(bad.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bad.toml:5"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Two runners labelled `linux` (one job at once each) and an ordinary node
/// claiming the labels `linux` and `gpu` without the runner group; a CI
/// caller. Returns the lab, its directory, the CI namespace and the procs.
fn labelled_world(prefix: &str) -> (Lab, std::path::PathBuf, Ns, Vec<tern_netns_tests::Proc>) {
    let lab = Lab::new(prefix);
    let dir = lab.dir().to_path_buf();
    lab.wan("wan");
    let lh = lab.add_ns("lh");
    let ci = lab.add_ns("ci");
    lab.connect_to_wan(&lh, &format!("{LH_UNDERLAY}/24"));
    lab.connect_to_wan(&ci, "198.18.0.2/24");
    make_ca(&dir, "ca");
    sign(
        &dir,
        "ca",
        "lh1",
        "100.64.0.1/10",
        &["--groups", "lighthouse"],
    );
    sign(&dir, "ca", "ci", "100.64.0.5/10", &["--groups", "ci"]);
    let mut procs = vec![
        start_lighthouse(&lh, &write_lighthouse_config(&dir)),
        start_node(&ci, &write_node_config(&dir, "ci", "ca.crt"), "node-ci"),
    ];
    for (i, (name, groups, labels)) in [
        ("runner-a", "runner", "\"linux\""),
        ("runner-b", "runner", "\"linux\""),
        ("imposter", "ci", "\"linux\", \"gpu\""),
    ]
    .into_iter()
    .enumerate()
    {
        let ns = lab.add_ns(name);
        lab.connect_to_wan(&ns, &format!("198.18.0.{}/24", 10 + i));
        sign(
            &dir,
            "ca",
            name,
            &format!("100.64.0.{}/10", 20 + i),
            &["--groups", groups],
        );
        let config = format!(
            "{}[[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\n[runner]\nlabels = [{labels}]\nallow_groups = [\"ci\"]\nconcurrency = 1\nwork_dir = \"jobs-{name}\"\naudit_log = \"audit-{name}.jsonl\"\n",
            node_config_text(name, "ca.crt")
        );
        let p = start_node(
            &ns,
            &write_file(&dir, &format!("{name}.toml"), &config),
            &format!("node-{name}"),
        );
        p.wait_for_log("runner up", Duration::from_secs(10));
        procs.push(p);
    }
    wait_until("all four register", Duration::from_secs(15), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 4)
    });
    wait_until("both runners advertised", Duration::from_secs(10), || {
        lighthouse_status(&dir)["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().filter(|x| x["runner"].is_object()).count() == 2)
    });
    (lab, dir, ci, procs)
}

fn tern_run_with(ci: &Ns, dir: &Path, args: &[&str], log: &str) -> tern_netns_tests::Proc {
    let mut cmd = ci.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(dir)
        .arg("run")
        .args(args)
        .args(["--socket", "ci.sock"])
        .env_remove("GITHUB_ACTIONS");
    ci.spawn_command(cmd, log)
}

/// The runner a `tern run` log says its job started on.
fn started_on(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        l.strip_prefix("job ")?
            .split_once(" started on ")
            .map(|(_, r)| r.trim().to_string())
    })
}

#[test]
fn a_label_picks_the_least_busy_runner_and_a_name_picks_that_one() {
    let test = "runner_labels";
    if !require_root(test) || !require_tools(test, &["bash"]) {
        return;
    }
    let _serial = serial();
    let (_lab, dir, ci, _procs) = labelled_world("runlabel");
    write_file(
        &dir,
        "long.toml",
        "name = \"long\"\n[[steps]]\nname = \"hold\"\nrun = \"echo holding; sleep 20\"\n",
    );
    write_file(
        &dir,
        "short.toml",
        "name = \"short\"\n[[steps]]\nname = \"where\"\nrun = \"echo on $TERN_RUNNER\"\n",
    );
    // The first job takes one runner's only slot ...
    let first = tern_run_with(&ci, &dir, &["long.toml", "--on", "linux"], "run-first");
    wait_until("the first job runs", Duration::from_secs(20), || {
        first.log().contains("[hold] holding")
    });
    let busy = started_on(&first.log()).unwrap_or_default();
    assert!(busy.starts_with("runner-"), "{}", first.log());
    // ... so the second goes to the other, idle one, without queueing.
    let second = tern_run_with(&ci, &dir, &["short.toml", "--on", "linux"], "run-second");
    assert_eq!(
        wait_exit(&second, Duration::from_secs(20)),
        Some(0),
        "{}",
        second.log()
    );
    let idle = started_on(&second.log()).unwrap_or_default();
    assert!(
        idle.starts_with("runner-") && idle != busy,
        "least busy: first on {busy}, second on {idle}\n{}",
        second.log()
    );
    assert!(
        !second.log().contains("queued (position"),
        "{}",
        second.log()
    );
    assert!(
        second.log().contains(&format!("[where] on {idle}")),
        "{}",
        second.log()
    );
    // By name: exactly that runner.
    let named = tern_run_with(&ci, &dir, &["short.toml", "--node", &idle], "run-named");
    assert_eq!(
        wait_exit(&named, Duration::from_secs(20)),
        Some(0),
        "{}",
        named.log()
    );
    assert_eq!(started_on(&named.log()).as_deref(), Some(idle.as_str()));
    // The imposter's claims are ignored: its certificate lacks the runner group.
    let gpu = tern_run_with(&ci, &dir, &["short.toml", "--on", "gpu"], "run-gpu");
    assert_eq!(
        wait_exit(&gpu, Duration::from_secs(20)),
        Some(69),
        "{}",
        gpu.log()
    );
    assert!(
        gpu.log().contains("no runner with label \"gpu\""),
        "{}",
        gpu.log()
    );
    let none = tern_run_with(&ci, &dir, &["short.toml", "--node", "nobody"], "run-nobody");
    assert_eq!(
        wait_exit(&none, Duration::from_secs(20)),
        Some(69),
        "{}",
        none.log()
    );
    let _ = first.terminate_and_wait(Duration::from_secs(10));
}

#[test]
fn a_hundred_megabytes_of_output_arrive_intact_and_in_order() {
    let test = "runner_big_output";
    if !require_root(test) || !require_tools(test, &["bash", "seq", "sha256sum"]) {
        return;
    }
    let _serial = serial();
    let w = world("runbig");
    const LINES: u64 = 13_000_000; // 1..13e6, one per line: 105,888,897 bytes
    write_file(
        &w.dir,
        "big.toml",
        &format!("name = \"big\"\n[[steps]]\nname = \"gen\"\nrun = \"seq 1 {LINES}\"\n"),
    );
    let out = tern_run(&w.ci, &w.dir, "big.toml", &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = Vec::with_capacity(110_000_000);
    for line in out.stdout.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"[gen] ") {
            got.extend_from_slice(rest);
            got.push(b'\n');
        }
    }
    let expected = std::process::Command::new("seq")
        .args(["1", &LINES.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("seq: {e}"))
        .stdout;
    assert!(expected.len() > 100_000_000);
    assert_eq!(got.len(), expected.len(), "every byte arrived");
    assert!(got == expected, "in order and intact");
}

#[test]
fn an_upload_is_built_on_the_runner_and_the_artifact_comes_back() {
    let test = "runner_artifacts";
    if !require_root(test) || !require_tools(test, &["bash", "sha256sum", "head", "gzip"]) {
        return;
    }
    let _serial = serial();
    let w = world("runart");
    let ws = w.dir.join("ci-workspace");
    fs::create_dir_all(ws.join("src/lib")).unwrap_or_else(|e| panic!("{e}"));
    write_file(&ws, "src/main.txt", "fn main() {}\n");
    write_file(&ws, "src/lib/util.txt", "pub fn util() {}\n");
    // 20 MB of noise both ways, to check the bytes and not only the names.
    let noise: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(ws.join("src/noise.bin"), &noise).unwrap_or_else(|e| panic!("{e}"));
    write_file(
        &ws,
        "build.sh",
        "set -e\nmkdir -p dist\ncat src/main.txt src/lib/util.txt > dist/program.txt\ngzip -n -c src/noise.bin > dist/noise.gz\nprintf '#!/bin/sh\\necho built\\n' > dist/run.sh\nchmod +x dist/run.sh\n",
    );
    write_file(
        &ws,
        "build.toml",
        "name = \"build\"\nupload = [\"src\", \"build.sh\"]\nartifacts = [\"dist\", \"missing.log\"]\n[[steps]]\nname = \"build\"\nrun = \"bash build.sh && ls -R dist\"\n",
    );
    let mut cmd = w.ci.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(&ws)
        .args([
            "run",
            "build.toml",
            "--node",
            RUNNER_IP,
            "--artifacts-dir",
            "out",
            "--socket",
        ])
        .arg(w.dir.join("ci.sock"))
        .env_remove("GITHUB_ACTIONS");
    let out = cmd.output().unwrap_or_else(|e| panic!("tern run: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("uploaded 4 files"), "{stdout}");
    assert!(stdout.contains("artifacts: 3 files"), "{stdout}");
    assert!(stderr.contains("missing.log: not found"), "{stderr}");
    let art = ws.join("out/dist");
    assert_eq!(
        fs::read_to_string(art.join("program.txt")).unwrap_or_default(),
        "fn main() {}\npub fn util() {}\n"
    );
    // The compressed noise, made on the runner, is what gzip makes here.
    let local = std::process::Command::new("gzip")
        .args(["-n", "-c"])
        .arg(ws.join("src/noise.bin"))
        .output()
        .unwrap_or_else(|e| panic!("gzip: {e}"))
        .stdout;
    assert_eq!(sha256_file(&art.join("noise.gz")), {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&local))
    });
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(art.join("run.sh"))
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    assert!(mode & 0o100 != 0, "executable bit kept: {mode:o}");
    // The workspace on the runner is gone, and the audit log counts the bytes.
    let jobs: Vec<_> = fs::read_dir(w.dir.join("jobs"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(jobs.is_empty(), "workspace removed: {jobs:?}");
    let audit = fs::read_to_string(w.dir.join("audit.jsonl")).unwrap_or_default();
    let record: serde_json::Value =
        serde_json::from_str(audit.lines().last().unwrap_or("{}")).unwrap_or_default();
    assert_eq!(record["upload"]["files"], 4, "{audit}");
    assert_eq!(record["artifacts"]["files"], 3, "{audit}");

    // Without --artifacts-dir: ./tern-artifacts/<job id>.
    let mut cmd = w.ci.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(&ws)
        .args(["run", "build.toml", "--node", RUNNER_IP, "--socket"])
        .arg(w.dir.join("ci.sock"))
        .env_remove("GITHUB_ACTIONS");
    let out = cmd.output().unwrap_or_else(|e| panic!("tern run: {e}"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job = started_on_job(&stdout).unwrap_or_else(|| panic!("no job id in {stdout}"));
    assert!(
        ws.join("tern-artifacts")
            .join(&job)
            .join("dist/program.txt")
            .exists(),
        "{stdout}"
    );

    // An upload path that does not exist is refused before anything is sent.
    write_file(
        &ws,
        "bad.toml",
        "name = \"bad\"\nupload = [\"src\", \"nope\"]\n[[steps]]\nname = \"s\"\nrun = \"true\"\n",
    );
    let mut cmd = w.ci.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(&ws)
        .args(["run", "bad.toml", "--node", RUNNER_IP]);
    let out = cmd.output().unwrap_or_else(|e| panic!("tern run: {e}"));
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn started_on_job(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        l.strip_prefix("job ")?
            .split_once(" started on ")
            .map(|(j, _)| j.to_string())
    })
}

/// The packets iptables counted for `rule` (an OUTPUT rule) in `ns`.
fn counted(ns: &Ns, rule: &[&str]) -> u64 {
    let mut args = vec!["-C", "OUTPUT"];
    args.extend_from_slice(rule);
    let listing = ns.run("iptables", ["-L", "OUTPUT", "-v", "-x", "-n"]);
    assert!(
        ns.exec("iptables", &args).status.success(),
        "the counting rule is gone:\n{listing}"
    );
    listing
        .lines()
        .filter(|l| l.contains("100.64.0.0/10"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `tern run` from a shell whose network routes the overlay somewhere else
/// (here: to a trap that would answer as HTTP) goes through its node all
/// the same, and nothing of it crosses the shell's own network; a mesh
/// peer that answers on the runner's port with HTTP gets a clear protocol
/// error, and nothing of the job is sent to it.
#[test]
fn tern_run_never_leaves_the_mesh_and_tells_a_runner_from_an_http_server() {
    let test = "runner_mesh_only";
    if !require_root(test) || !require_tools(test, &["bash", "iptables", "python3"]) {
        return;
    }
    let _serial = serial();
    let w = world("runmesh");
    let dir = &w.dir;
    write_file(
        dir,
        "secret.toml",
        "name = \"secret\"\n[[steps]]\nname = \"s\"\nrun = \"echo got $TOKEN\"\n",
    );
    // A shell with no Tern device whose overlay route leads to a trap: an
    // HTTP server on the runner's overlay address and port.
    let shell = w._lab.add_ns("shell");
    let trap = w._lab.add_ns("trap");
    let (shell_if, _) = w._lab.link(&shell, "198.18.9.1/24", &trap, "198.18.9.2/24");
    shell.ip(["route", "add", "100.64.0.0/10", "via", "198.18.9.2"]);
    trap.ip(["addr", "add", &format!("{RUNNER_IP}/32"), "dev", "lo"]);
    trap.ip(["route", "add", "100.64.0.0/10", "via", "198.18.9.1"]);
    let rule = [
        "-o",
        shell_if.as_str(),
        "-d",
        "100.64.0.0/10",
        "-j",
        "ACCEPT",
    ];
    let mut add = vec!["-A", "OUTPUT"];
    add.extend_from_slice(&rule);
    shell.run("iptables", &add);
    let http = trap.spawn(
        "python3",
        ["-m", "http.server", "4245", "--bind", RUNNER_IP],
        "trap-http",
    );
    let mut in_shell = shell.command(tern_netns_tests::workspace_bin("tern"));
    in_shell
        .current_dir(dir)
        .args([
            "run",
            "secret.toml",
            "--node",
            RUNNER_IP,
            "--socket",
            "ci.sock",
            "--secret",
            "TOKEN",
        ])
        .env("TOKEN", "hunter2-s3cr3t")
        .env_remove("GITHUB_ACTIONS");
    let out = in_shell
        .output()
        .unwrap_or_else(|e| panic!("tern run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("[s] got ***"),
        "ran on the runner, through ci's node:\n{stdout}"
    );
    assert_eq!(
        counted(&shell, &rule),
        0,
        "packets to the overlay left through the shell's own network"
    );
    assert!(
        !http.log().contains("HTTP/"),
        "the trap heard from tern run:\n{}",
        http.log()
    );

    // Without a node to go through (no --socket, and none at the default
    // path), tern run refuses at once and still sends nothing.
    let mut alone = shell.command(tern_netns_tests::workspace_bin("tern"));
    alone
        .current_dir(dir)
        .args(["run", "secret.toml", "--node", RUNNER_IP, "--socket"])
        .arg(dir.join("no-node-here/tern0.sock"))
        .args(["--secret", "TOKEN"])
        .env("TOKEN", "hunter2-s3cr3t")
        .env_remove("GITHUB_ACTIONS");
    let out = alone.output().unwrap_or_else(|e| panic!("tern run: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("only through the local node"), "{stderr}");
    assert_eq!(
        counted(&shell, &rule),
        0,
        "packets to the overlay left through the shell's own network"
    );
    assert!(
        !http.log().contains("HTTP/"),
        "the trap heard from tern run:\n{}",
        http.log()
    );

    // A mesh peer whose overlay port 4245 is an HTTP server.
    let decoy = w._lab.add_ns("decoy");
    w._lab.connect_to_wan(&decoy, "198.18.0.7/24");
    sign(dir, "ca", "decoy", "100.64.0.7/10", &[]);
    let decoy_cfg = format!(
        "{}[[firewall.inbound]]\nproto = \"tcp\"\nport = 4245\n",
        node_config_text("decoy", "ca.crt")
    );
    let _decoy_node = start_node(
        &decoy,
        &write_file(dir, "decoy.toml", &decoy_cfg),
        "node-decoy",
    );
    wait_registered(dir, "decoy", Duration::from_secs(15));
    let decoy_http = decoy.spawn(
        "python3",
        ["-m", "http.server", "4245", "--bind", "100.64.0.7"],
        "decoy-http",
    );
    let mut cmd = w.ci.command(tern_netns_tests::workspace_bin("tern"));
    cmd.current_dir(dir)
        .args([
            "run",
            "secret.toml",
            "--node",
            "100.64.0.7",
            "--socket",
            "ci.sock",
            "--secret",
            "TOKEN",
        ])
        .env("TOKEN", "hunter2-s3cr3t")
        .env_remove("GITHUB_ACTIONS");
    let mut tries = 0;
    let (code, stderr) = loop {
        // The first try may come before the server is up.
        let out = cmd.output().unwrap_or_else(|e| panic!("tern run: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        tries += 1;
        if stderr.contains("not a Tern runner") || tries == 5 {
            break (out.status.code(), stderr);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains("not a Tern runner") && !stderr.contains("frame of"),
        "{stderr}"
    );
    let heard = decoy_http.log();
    assert!(
        !heard.contains("hunter2") && !heard.contains("secret"),
        "the job reached the HTTP server:\n{heard}"
    );
}
