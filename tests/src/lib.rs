//! Helpers for loopback integration tests: locate the built binaries, run
//! them, and stop what we started.

pub mod enroll_lab;

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
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
