//! Self-test of the netns harness: a wan bridge and two namespaces on
//! 198.18.0.0/24, ping and HTTP across, and nothing left behind afterwards.
//! Needs root; skipped elsewhere (fails instead when `CI=true`).

use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tern_netns_tests::{list_namespaces, require_root, require_tools, serial, wait_until, Lab};

const BODY: &str = "hello from the lab\n";

#[test]
fn ping_http_and_cleanup() {
    let test = "ping_http_and_cleanup";
    if !require_root(test) || !require_tools(test, &["ping", "curl", "python3"]) {
        return;
    }
    let _serial = serial();

    let root_before = root_links();
    let (names, pid) = {
        let lab = Lab::new("harness");
        lab.wan("wan");
        let a = lab.add_ns("a");
        let b = lab.add_ns("b");
        let a_if = lab.connect_to_wan(&a, "198.18.0.2/24");
        let b_if = lab.connect_to_wan(&b, "198.18.0.3/24");
        assert_eq!((a_if.as_str(), b_if.as_str()), ("eth0", "eth0"));

        // Nothing of the lab is visible in the root namespace.
        assert_eq!(
            root_links(),
            root_before,
            "lab interfaces leaked into the root namespace"
        );
        assert!(
            !root_addrs().contains("198.18."),
            "lab address in the root namespace"
        );
        assert!(a
            .ip(["-o", "addr", "show", "dev", "eth0"])
            .contains("198.18.0.2/24"));

        wait_until("a answers ping from b", Duration::from_secs(5), || {
            b.exec("ping", ["-c1", "-W1", "198.18.0.2"])
                .status
                .success()
        });
        assert!(a
            .exec("ping", ["-c1", "-W1", "198.18.0.3"])
            .status
            .success());

        let www = lab.dir().join("www");
        fs::create_dir_all(&www).unwrap_or_else(|e| panic!("mkdir {}: {e}", www.display()));
        fs::write(www.join("hello.txt"), BODY).unwrap_or_else(|e| panic!("write hello.txt: {e}"));
        let mut cmd = a.command("python3");
        cmd.args(["-m", "http.server", "--bind", "198.18.0.2", "8000"])
            .current_dir(&www);
        let server = a.spawn_command(cmd, "http-server");

        let url = "http://198.18.0.2:8000/hello.txt";
        wait_until(
            "the HTTP server in a answers b",
            Duration::from_secs(15),
            || {
                assert!(
                    server.is_running(),
                    "http server exited early:\n{}",
                    server.log()
                );
                b.exec("curl", ["-sf", "--max-time", "1", url])
                    .status
                    .success()
            },
        );
        let body = b.run("curl", ["-sf", "--max-time", "5", url]);
        assert_eq!(body, BODY);
        // The server runs in `a` only: `b`'s own loopback has none.
        assert!(!b
            .exec("curl", ["-sf", "--max-time", "1", "http://127.0.0.1:8000/"])
            .status
            .success());
        wait_until(
            "the request shows in the server log",
            Duration::from_secs(5),
            || server.log().contains("GET /hello.txt"),
        );

        let names = lab.namespace_names();
        assert_eq!(names.len(), 3);
        let listed = list_namespaces();
        for name in &names {
            assert!(listed.contains(name), "{name} missing from ip netns list");
        }
        (names, server.pid())
        // `server` and `lab` drop here, in that order.
    };

    assert_cleaned_up(&names);
    assert!(
        !process_alive_with(pid, "http.server"),
        "the http server (pid {pid}) survived the lab"
    );
}

#[test]
fn cleanup_happens_on_panic_too() {
    let test = "cleanup_happens_on_panic_too";
    if !require_root(test) || !require_tools(test, &["sleep"]) {
        return;
    }
    let _serial = serial();

    let mut facts: Option<(u32, Vec<String>)> = None;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new("harness");
        lab.wan("wan");
        let c = lab.add_ns("c");
        lab.connect_to_wan(&c, "198.18.0.4/24");
        let sleeper = c.spawn("sleep", ["600"], "sleeper");
        facts = Some((sleeper.pid(), lab.namespace_names()));
        // Leak the Proc handle: the lab alone must stop the process.
        std::mem::forget(sleeper);
        panic!("deliberate failure inside a lab");
    }));
    assert!(outcome.is_err());
    let (pid, names) = facts.unwrap_or_else(|| panic!("the lab was not built"));
    assert_eq!(names.len(), 2);

    assert_cleaned_up(&names);
    assert!(
        !process_alive_with(pid, "sleep"),
        "sleep (pid {pid}) survived the panicking lab"
    );
}

#[test]
fn stale_sweep_deletes_only_dead_owners_of_its_prefix() {
    let test = "stale_sweep_deletes_only_dead_owners_of_its_prefix";
    if !require_root(test) || !require_tools(test, &["true"]) {
        return;
    }
    let _serial = serial();

    // A PID that has just exited (and that we reaped) stands for a test run
    // killed before its Drop.
    let mut child = Command::new("true")
        .spawn()
        .unwrap_or_else(|e| panic!("spawn true: {e}"));
    let dead = child.id();
    let _ = child.wait();
    let alive = std::process::id();

    let stale = format!("harness-{dead}-0-old");
    let live = format!("harness-{alive}-999-mine");
    let foreign = format!("harnessx-{dead}-0-old");
    for name in [&stale, &live, &foreign] {
        ip_netns(&["add", name]);
    }

    let lab = Lab::new("harness");
    let listed = list_namespaces();
    let stale_gone = !listed.contains(&stale);
    let live_kept = listed.contains(&live);
    let foreign_kept = listed.contains(&foreign);
    drop(lab);
    // Remove what this test made before asserting, so a failure leaks nothing.
    for name in [&stale, &live, &foreign] {
        if list_namespaces().contains(name) {
            ip_netns(&["del", name]);
        }
    }
    assert!(stale_gone, "{stale} (dead pid {dead}) was not swept");
    assert!(live_kept, "{live} (live pid) was swept");
    assert!(foreign_kept, "{foreign} (other prefix) was swept");
}

fn assert_cleaned_up(names: &[String]) {
    let listed = list_namespaces();
    for name in names {
        assert!(!listed.contains(name), "{name} left behind: {listed:?}");
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "/run/netns/{name} left behind"
        );
    }
}

/// True if `pid` is a live (not zombie) process whose command line contains
/// `needle`; a reused PID running something else does not count.
fn process_alive_with(pid: u32, needle: &str) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if status.is_empty() || status.contains("State:\tZ") {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(needle)
}

fn root_links() -> Vec<String> {
    root_ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().to_string())
        .collect()
}

fn root_addrs() -> String {
    root_ip(&["-o", "addr", "show"])
}

/// Reads (never changes) the root namespace's state.
fn root_ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_netns(args: &[&str]) {
    let status = Command::new("ip")
        .arg("netns")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("ip netns {args:?}: {e}"));
    assert!(status.success(), "ip netns {args:?} failed");
}
