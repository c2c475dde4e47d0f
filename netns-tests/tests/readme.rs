//! The README's quickstart, run as a user would paste it: its shell block is
//! taken from README.md and run with bash, with three changes only: the
//! binaries already built (no release build inside a test), a private
//! directory for `/tmp/tern`, and namespace names with this test's prefix
//! (a test may touch only namespaces it made). Needs root.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tern_netns_tests::{require_root, require_tools, serial, workspace_bin};

/// The first ```sh block after `heading` in the README.
fn shell_block(readme: &str, heading: &str) -> String {
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README.md has no {heading:?}"))
        .1;
    let start = section
        .find("```sh\n")
        .unwrap_or_else(|| panic!("no sh block after {heading:?}"))
        + "```sh\n".len();
    let len = section[start..]
        .find("\n```")
        .unwrap_or_else(|| panic!("unterminated sh block after {heading:?}"));
    section[start..start + len].to_string()
}

/// Every whole word `from` (letters, digits and `_` around it end a word)
/// replaced by `to`.
fn replace_word(text: &str, from: &str, to: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + from.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(is_word) || after.is_some_and(is_word) {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[i + from.len()..];
    }
    out.push_str(rest);
    out
}

/// Deletes the namespaces the script made (and stops what still runs in
/// them, which the script started), even when the test fails.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let pids = Command::new("ip").args(["netns", "pids", ns]).output();
            if let Ok(out) = pids {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[test]
fn the_quickstart_runs_as_written() {
    let test = "readme_quickstart";
    if !require_root(test) || !require_tools(test, &["bash", "ping", "ip"]) {
        return;
    }
    let _serial = serial();
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let block = shell_block(&readme, "## Quickstart");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let work = dir.path().join("tern");
    let bin_dir = workspace_bin("tern")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Short: veth names are made of them (15 characters at most).
    let prefix = format!("rq{}", std::process::id() % 100_000);
    let names = ["wan", "lh", "alice", "bob"];
    let _cleanup = Namespaces(names.iter().map(|n| format!("{prefix}{n}")).collect());
    let mut script = block
        .lines()
        .filter(|l| l.trim() != "cargo build --release --workspace")
        .map(|l| {
            if l.trim_start().starts_with("export PATH=") {
                format!("export PATH=\"{}:$PATH\"", bin_dir.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/tmp/tern", &work.to_string_lossy());
    for n in names {
        script = replace_word(&script, n, &format!("{prefix}{n}"));
    }
    assert!(
        script.contains(&format!("ip netns exec {prefix}alice ping -c3 100.64.0.6")),
        "the quickstart changed shape; update this test:\n{script}"
    );
    let started = Instant::now();
    // Output to files, not pipes: daemons the script leaves behind when it
    // fails would hold a pipe open (the guard stops them).
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let file = |p: &Path| fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let status = Command::new("timeout")
        .args(["120", "bash", "-e", "-c", &script])
        .env(
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/sbin:/sbin",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .status()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    let (stdout, stderr) = (
        fs::read_to_string(&out_path).unwrap_or_default(),
        fs::read_to_string(&err_path).unwrap_or_default(),
    );
    assert!(
        status.success(),
        "the quickstart failed:\n{stdout}\n{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(
        stdout.contains("3 packets transmitted, 3 received"),
        "alice pings bob:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("{prefix}bob")) && stdout.contains("direct 198.18.0.3:4242"),
        "tern status shows bob, direct:\n{stdout}"
    );
    assert!(stdout.contains("valid: "), "tern cert verify:\n{stdout}");
    assert!(
        !stdout.contains("wireguard_errors"),
        "a fresh, healthy mesh counts no WireGuard errors:\n{stdout}"
    );
    // Its last step deleted its namespaces.
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| o.stdout);
    let left = String::from_utf8_lossy(&left.unwrap_or_default()).to_string();
    assert!(!left.contains(&prefix), "namespaces left behind: {left}");
}

#[test]
fn words_are_replaced_whole() {
    assert_eq!(
        replace_word(
            "lh alice.toml lighthouse $n.toml --name alice wan-x alice2",
            "alice",
            "p-alice"
        ),
        "lh p-alice.toml lighthouse $n.toml --name p-alice wan-x alice2"
    );
    assert_eq!(
        replace_word("for h in lh alice", "lh", "rq1lh"),
        "for h in rq1lh alice"
    );
}
