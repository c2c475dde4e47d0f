//! Helpers for loopback integration tests: locate the built binaries, run
//! them, and stop what we started.

pub mod enroll_lab;
pub mod openapi;

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The built binary `name` (`tern`, `tern-lighthouse`): `$TERN_BIN_DIR/name`
/// if set, else next to this test's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("TERN_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let deps = exe.parent()?;
            Some(deps.parent()?.to_path_buf())
        })
        .unwrap_or_else(|| PathBuf::from("target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace` before the tests (or set TERN_BIN_DIR)",
        path.display()
    );
    path
}

/// Runs a binary to completion with a time limit.
pub fn run(name: &str, args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(bin(name))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                panic!("{name} {args:?} did not finish within {timeout:?}");
            }
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("collecting {name} output: {e}"))
}

/// Runs `cmd` with a time limit, collecting its output.
#[allow(clippy::unwrap_used)]
pub fn run_bounded(mut cmd: Command, what: &str, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    // Drain the pipes while waiting, so that a chatty child cannot block.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().unwrap() {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {timeout:?}");
            }
        }
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// The repository's root (for its scripts and files).
pub fn repo_root() -> PathBuf {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    tests.parent().map(PathBuf::from).unwrap_or(tests)
}

/// A process's stdout and stderr, as text, one after the other.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tool`'s path, if it is on PATH.
pub fn tool_on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Something a test needs is missing: a failure under `CI=true` (CI
/// installs it), a skip with a message elsewhere (written straight to
/// stderr, so that a passing run shows it).
pub fn skip_or_fail(test: &str, problem: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {problem} (CI=true, so this is a failure, not a skip)"
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("{test}: skipped: {problem}\n").as_bytes(),
    );
}

/// Whether `tool` is on PATH; when not, [`skip_or_fail`] with `package`
/// named.
pub fn need_tool(test: &str, tool: &str, package: &str) -> bool {
    let there = tool_on_path(tool).is_some();
    if !there {
        skip_or_fail(
            test,
            &format!("{tool} is not installed (Debian package {package})"),
        );
    }
    there
}

/// A daemon started by a test; killed (by its PID, which we own) on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, args: &[&str], log: PathBuf) -> Daemon {
        let file =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("log {}: {e}", log.display()));
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("log clone: {e}"));
        let child = Command::new(bin(name))
            .args(args)
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Daemon { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.log.display(), self.log());
        }
    }
}

/// Polls `f` every 50 ms until it holds, or panics naming `what`.
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?}: {what}");
}

/// A UDP port free on loopback now (for a daemon's `[listen]`).
pub fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free UDP port: {e}"))
}

/// `N` TCP ports free on loopback now, all different (each listener is
/// held until all are chosen: ports picked one at a time can repeat).
pub fn free_tcp_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("no free TCP port: {e}"))
        })
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free TCP port: {e}"))
    })
}

/// A TCP port free on loopback now (for a forward or a test server).
pub fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free TCP port: {e}"))
}

/// `GET path` of a lighthouse's admin API on its Unix socket (plain
/// HTTP/1.1): the JSON answer, or null when there is none (yet).
pub fn admin_get(socket: &std::path::Path, path: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return serde_json::Value::Null;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lighthouse\r\nConnection: close\r\n\r\n"
    );
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_default()
}
