//! The README, run as a user would paste it. Every ```sh block is a
//! command a user runs, and each is run here (`every_shell_block_is_run`
//! says which test covers which): the quickstart, then the lab the gateway,
//! runner and enrollment sections build on top of it, each section's blocks
//! in order as one bash script, with three changes only: the binaries
//! already built (no release build inside a test), a private directory for
//! `/tmp/tern`, and namespace names with this test's prefix (a test may
//! touch only namespaces it made). ```shell blocks are illustrations (they
//! need a database, a CI provider, a Kubernetes cluster). Needs root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tern_netns_tests::{require_root, require_tools, serial, workspace_bin};

/// One ```sh block: the section it is in (its `##`/`###` heading, as an
/// index into [`Readme::headings`]) and its text.
#[derive(Debug)]
struct ShellBlock {
    section: usize,
    text: String,
}

/// The README's section headings and ```sh blocks, in order.
#[derive(Debug)]
struct Readme {
    headings: Vec<String>,
    blocks: Vec<ShellBlock>,
}

impl Readme {
    fn parse(readme: &str) -> Readme {
        let mut headings = vec![String::new()];
        let mut blocks = Vec::new();
        let mut open: Option<(bool, String)> = None;
        for line in readme.lines() {
            match &mut open {
                None if line.starts_with("```") => open = Some((line == "```sh", String::new())),
                None if line.starts_with("## ") || line.starts_with("### ") => {
                    headings.push(line.to_string())
                }
                None => {}
                Some((is_sh, text)) => {
                    if line == "```" {
                        if *is_sh {
                            blocks.push(ShellBlock {
                                section: headings.len() - 1,
                                text: std::mem::take(text),
                            });
                        }
                        open = None;
                    } else {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
        }
        assert!(open.is_none(), "README.md ends inside a code block");
        Readme { headings, blocks }
    }

    fn heading(&self, heading: &str) -> usize {
        self.headings
            .iter()
            .position(|h| h == heading)
            .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"))
    }

    /// The blocks of the sections from the one headed `first` up to
    /// (without) the one headed `end`, joined in order.
    fn script(&self, first: &str, end: &str) -> String {
        let sections = self.heading(first)..self.heading(end);
        self.blocks
            .iter()
            .filter(|b| sections.contains(&b.section))
            .map(|b| b.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

const QUICKSTART: &str = "## Quickstart: a two-node mesh";
const LAB_FIRST: &str = "## Reaching a private network through a gateway";
/// The first section after the lab's (its blocks are YAML).
const LAB_END: &str = "### GitHub Action and GitLab CI";

/// Every whole word `from` (letters, digits, `_` and `-` around it end a
/// word: `gw-1` is not the namespace `gw`) replaced by `to`.
fn replace_word(text: &str, from: &str, to: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
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

/// Deletes the namespaces the scripts made (and stops what still runs in
/// them, which the scripts started), even when the test fails.
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
            let _ = fs::remove_dir_all(tern_netns_tests::etc_netns(ns));
        }
    }
}

/// Where the scripts run: `/tmp/tern` stands for `work`, the namespaces
/// get `prefix`, and the binaries are the workspace's.
struct Walk {
    dir: tempfile::TempDir,
    work: PathBuf,
    prefix: String,
    namespaces: Vec<&'static str>,
}

impl Walk {
    /// `script` as the user would run it here.
    fn adapt(&self, script: &str) -> String {
        let bin_dir = workspace_bin("tern")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut script = script
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
            .replace("/tmp/tern", &self.work.to_string_lossy());
        for n in &self.namespaces {
            script = replace_word(&script, n, &format!("{}{n}", self.prefix));
        }
        script
    }

    /// Runs `script` with bash -e in `work` (created first): its stdout and
    /// stderr, or a panic with both when it fails.
    fn run(&self, what: &str, script: &str, limit: Duration) -> (String, String) {
        fs::create_dir_all(&self.work).unwrap_or_else(|e| panic!("{e}"));
        let bin_dir = workspace_bin("tern")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let started = Instant::now();
        // Output to files, not pipes: daemons a script leaves behind when it
        // fails would hold a pipe open (the guard stops them).
        let out_path = self.dir.path().join(format!("{what}.stdout"));
        let err_path = self.dir.path().join(format!("{what}.stderr"));
        let file =
            |p: &Path| fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let status = Command::new("timeout")
            .arg(limit.as_secs().to_string())
            .args(["bash", "-e", "-c", script])
            .current_dir(&self.work)
            .env(
                "PATH",
                format!(
                    "{}:{}:/usr/local/sbin:/usr/sbin:/sbin",
                    bin_dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdout(file(&out_path))
            .stderr(file(&err_path))
            .status()
            .unwrap_or_else(|e| panic!("bash: {e}"));
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            status.success(),
            "the README's {what} failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
        eprintln!("{what}: {:?}", started.elapsed());
        (stdout, stderr)
    }

    /// Whether any of this walk's namespaces is still there.
    fn namespaces_left(&self) -> String {
        let left = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        String::from_utf8_lossy(&left)
            .lines()
            .filter(|l| l.starts_with(&self.prefix))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[test]
fn every_shell_block_is_run() {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let ci = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/run"))
        .unwrap_or_else(|e| panic!(".ci/run: {e}"));
    let readme = Readme::parse(&readme);
    let lab = readme.heading(LAB_FIRST)..readme.heading(LAB_END);
    for block in &readme.blocks {
        let section = &readme.headings[block.section];
        let covered = match section.as_str() {
            // tests/tests/userspace.rs runs `tern demo` from the build.
            "## First: `tern demo`" => {
                block.text == "cargo build --release --workspace\ntarget/release/tern demo\n"
            }
            // CI runs the README's test command, as written.
            "## Tests" => ci.contains(block.text.trim()),
            QUICKSTART => true,
            _ => lab.contains(&block.section),
        };
        assert!(
            covered,
            "a ```sh block under {:?} is run by no test: run it here, or make it a ```shell \
             illustration if it cannot run on one machine:\n{}",
            section, block.text
        );
    }
    assert!(readme.blocks.len() >= 10, "{readme:#?}");
}

#[test]
fn the_quickstart_and_the_lab_run_as_written() {
    let test = "readme_walk";
    if !require_root(test)
        || !require_tools(test, &["bash", "ping", "ip", "curl", "python3", "iptables"])
    {
        return;
    }
    let _serial = serial();
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let readme = Readme::parse(&readme);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let work = dir.path().join("tern");
    // Short: veth names are made of them (15 characters at most).
    let prefix = format!("rq{}", std::process::id() % 100_000);
    let namespaces = vec!["wan", "lh", "alice", "bob", "gw", "lan", "job"];
    let _cleanup = Namespaces(namespaces.iter().map(|n| format!("{prefix}{n}")).collect());
    let walk = Walk {
        dir,
        work,
        prefix,
        namespaces,
    };
    let prefix = walk.prefix.clone();

    // The quickstart.
    let quickstart = walk.adapt(&readme.script(QUICKSTART, LAB_FIRST));
    assert!(
        quickstart.contains(&format!("ip netns exec {prefix}alice ping -c3 100.64.0.6")),
        "the quickstart changed shape; update this test:\n{quickstart}"
    );
    let (stdout, _) = walk.run("quickstart", &quickstart, Duration::from_secs(120));
    assert_eq!(
        stdout.matches("3 packets transmitted, 3 received").count(),
        2,
        "alice pings bob, by address and by name:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("PING {prefix}bob.tern (100.64.0.6)")),
        "bob's name resolves to its overlay address:\n{stdout}"
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
    let left = walk.namespaces_left();
    assert!(left.is_empty(), "namespaces left behind: {left}");

    // The lab: gateway, runner, enrollment, leaving; on the quickstart's files.
    let lab = walk.adapt(&readme.script(LAB_FIRST, LAB_END));
    let (stdout, stderr) = walk.run("lab", &lab, Duration::from_secs(180));
    assert_eq!(
        stdout.matches("hello from the private network").count(),
        4,
        "alice through the gateway by address and by name, the pipeline's check on the \
         runner, the enrolled job through its forward:\n{stdout}"
    );
    assert!(
        stdout.contains("api.internal (NOERROR) from gateway gw-1 (zone internal)"),
        "tern resolve names the gateway that answered:\n{stdout}"
    );
    assert!(
        stdout.contains("refused: gw-1's firewall opens only 8080")
            && stderr.contains("Failed to connect to 198.19.0.20 port 8000"),
        "the gateway's reject rule answers port 8000 at once:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        stdout.matches("4 tests: 4 passed, 0 failed").count(),
        2,
        "tern policy test passes the README's tests:\n{stdout}"
    );
    assert!(
        stdout.contains("198.19.0.20:22/tcp denied by inbound rule-1 (gw-1.toml:")
            && stdout.contains("denied: exit 1"),
        "tern policy explain names the reject rule:\n{stdout}"
    );
    assert!(
        stdout.contains("198.19.0.0/24") && stdout.contains("gw-1"),
        "alice's status shows the route through gw-1:\n{stdout}"
    );
    assert!(
        !stdout.contains("no_gateway_drops"),
        "alice's first packets waited for the route's gateway, none was dropped:\n{stdout}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("deploying with ***")
            && !format!("{stdout}{stderr}").contains("s3cret"),
        "the pipeline's output, its secret masked:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("deployed"),
        "the artifact came back:\n{stdout}"
    );
    assert!(
        stdout.contains("ephemeral"),
        "the job in the lighthouse's status:\n{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.contains("198.19.0.20:8080/tcp")
            && l.contains("allow rule-0")
            && l.contains("token ")),
        "tern-lighthouse flows shows the job's request through gw-1, with its token:\n{stdout}"
    );
    let left = walk.namespaces_left();
    assert!(left.is_empty(), "namespaces left behind: {left}");
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
        replace_word("gw gw-1.toml lh-issuer pids lh", "gw", "p-gw"),
        "p-gw gw-1.toml lh-issuer pids lh"
    );
    assert_eq!(
        replace_word("for h in lh alice", "lh", "rq1lh"),
        "for h in rq1lh alice"
    );
}
