//! Helpers for network-namespace tests: build a lab topology out of Linux
//! network namespaces with `ip` (iproute2), run real processes inside it, and
//! tear everything down again, even when the test panics.
//!
//! # Driving it
//!
//! ```no_run
//! use std::time::Duration;
//! use tern_netns_tests::{require_root, serial, wait_until, Lab};
//!
//! if !require_root("my_test") {
//!     return; // skipped (outside CI) with a visible message
//! }
//! let _serial = serial(); // one netns test at a time
//! let lab = Lab::new("mytest");
//! lab.wan("wan");
//! let a = lab.add_ns("a");
//! let b = lab.add_ns("b");
//! lab.connect_to_wan(&a, "198.18.0.2/24");
//! lab.connect_to_wan(&b, "198.18.0.3/24");
//! wait_until("a pings b", Duration::from_secs(5), || {
//!     a.exec("ping", ["-c1", "-W1", "198.18.0.3"]).status.success()
//! });
//! // `lab` drops here: processes stopped, namespaces deleted, logs printed if
//! // the test is panicking.
//! ```
//!
//! # Rules the harness enforces
//!
//! - Addresses only from 198.18.0.0/16 (underlay), 198.19.0.0/16 (private
//!   nets) and 100.64.0.0/10 (overlay); anything else panics before `ip` runs.
//! - Nothing is added to the root namespace: veth pairs are created inside a
//!   lab namespace with the peer placed straight into another one.
//! - Namespaces are named `<prefix>-<pid>-<seq>-<name>`; a lab deletes only
//!   its own, plus stale ones of the same prefix whose creating process is gone.
//! - Processes are ended only if this harness started them, by PID, while
//!   their `Child` is not yet reaped (so the PID cannot have been reused).
//!
//! # Interface names
//!
//! The k-th veth end made in a namespace is called `eth<k>` (`eth0`, `eth1`,
//! ...), counting the wan bridge's ports as well; [`Lab::connect_to_wan`] and
//! [`Lab::link`] return the names so tests can use them in `iptables` rules.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How long [`Proc`]'s `Drop` (and [`Lab`]'s) waits after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// Default bound on [`Ns::exec`]; a command still running after this is
/// killed and the test panics.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the bridge [`Lab::wan`] creates in the wan namespace.
pub const WAN_BRIDGE: &str = "br0";

/// Address ranges a lab may use, as (network, prefix length).
pub const ALLOWED_RANGES: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(198, 18, 0, 0), 16),
    (Ipv4Addr::new(198, 19, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
];
/// The IPv6 range a lab may use: the documentation prefix 2001:db8::/32.
pub const ALLOWED_RANGE_V6: (std::net::Ipv6Addr, u8) =
    (std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32);

/// Returns true when the test can build a lab: running as root with `ip`
/// available. Otherwise, with `CI=true` in the environment it panics (CI must
/// not silently skip); elsewhere it prints a visible `SKIP <test>: ...` line
/// to stderr (past the test harness's output capture) and returns false.
pub fn require_root(test: &str) -> bool {
    let problem = if !is_root() {
        Some("needs root (CAP_NET_ADMIN) to create network namespaces; run as root, e.g. `sudo -E cargo test -p tern-netns-tests`".to_string())
    } else if !tool_works("ip", &["-V"]) {
        Some("needs `ip` from iproute2; install it with `apt-get install iproute2`".to_string())
    } else {
        None
    };
    match problem {
        None => true,
        Some(problem) => skip_or_fail(test, &problem),
    }
}

/// Like [`require_root`] for other tools a test runs (`ping`, `curl`,
/// `python3`, `iptables`...): true when every one is found on `PATH`.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| find_on_path(tool).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(
        test,
        &format!(
            "needs {} on PATH; install the Debian packages (iputils-ping, curl, iproute2, iptables, python3)",
            missing.join(", ")
        ),
    )
}

/// Serializes netns tests within one test binary: hold the guard for the
/// whole test. (Cargo runs test binaries one after another, so this is enough
/// for `cargo test`.) A test that panicked while holding it does not poison
/// the tests after it.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `f` every 50 ms until it returns true; panics with
/// `timed out after <timeout>: <what>` if it does not within `timeout`.
/// `f` is always tried at least once.
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?}: {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Path of a workspace binary (`tern`, `tern-lighthouse`): in `$TERN_BIN_DIR`
/// if set, else next to the running test's `deps/` directory
/// (`target/<profile>/`). Panics, saying how to build it, if it is missing.
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("TERN_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()
                .unwrap_or_else(|e| panic!("cannot find the running test executable: {e}"));
            let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.file_name() == Some(OsStr::new("deps")) {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary {} not found; run `cargo build --workspace` first (same profile as the tests), \
             or set TERN_BIN_DIR to the directory holding it",
            path.display()
        );
    }
    path
}

/// A lab: a set of network namespaces, the processes started in them and a
/// temporary directory for their logs and files. Dropping it stops the
/// processes, deletes the namespaces and the directory; if the thread is
/// panicking it first prints every process's log.
///
/// Methods panic with a clear message when `ip` fails: a broken lab is a
/// failed test.
pub struct Lab {
    prefix: String,
    /// `<prefix>-<pid>-<seq>`: the start of every namespace name of this lab.
    tag: String,
    shared: Arc<Shared>,
    state: Mutex<LabState>,
    dir: tempfile::TempDir,
}

/// A network namespace of a [`Lab`]. Cheap to clone; it stays usable only as
/// long as its lab lives.
#[derive(Clone)]
pub struct Ns {
    name: String,
    short: String,
    shared: Arc<Shared>,
}

/// A process started with [`Ns::spawn`]. Dropping it sends SIGTERM, waits up
/// to [`TERM_GRACE`], then sends SIGKILL; the lab does the same for any
/// process still running when the lab is dropped.
pub struct Proc {
    inner: Arc<ProcInner>,
}

impl Lab {
    /// A new, empty lab. `prefix` names the test (lower-case letters and
    /// digits, 1 to 12 characters). Stale namespaces of an earlier run with the
    /// same prefix whose process is gone are deleted first.
    pub fn new(prefix: &str) -> Lab {
        let valid = (1..=12).contains(&prefix.len())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        assert!(
            valid,
            "lab prefix {prefix:?} must be 1 to 12 lower-case letters or digits"
        );
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{prefix}-{}-{seq}", std::process::id());
        sweep_stale(prefix);
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-lab-{tag}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create the lab's temporary directory: {e}"));
        let logs = dir.path().join("logs");
        let scratch = dir.path().join("exec");
        for d in [&logs, &scratch] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        Lab {
            prefix: prefix.to_string(),
            tag,
            shared: Arc::new(Shared {
                logs,
                scratch,
                procs: Mutex::new(Vec::new()),
                counter: AtomicUsize::new(0),
            }),
            state: Mutex::new(LabState::default()),
            dir,
        }
    }

    /// The test prefix given to [`Lab::new`].
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's temporary directory (deleted with the lab): put configs,
    /// keys and other per-test files here. Logs live in its `logs/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates namespace `<prefix>-<pid>-<seq>-<name>` with `lo` up. `name`
    /// is 1 to 20 characters from `a-z 0-9 -` and unique within the lab.
    pub fn add_ns(&self, name: &str) -> Ns {
        let valid = (1..=20).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        assert!(
            valid,
            "namespace name {name:?} must be 1 to 20 characters from a-z, 0-9 and '-'"
        );
        let full = format!("{}-{name}", self.tag);
        {
            let mut state = self.lock_state();
            assert!(
                !state.namespaces.iter().any(|n| n == &full),
                "namespace {name:?} already exists in this lab"
            );
            run_ok("ip", ["netns", "add", full.as_str()]);
            state.namespaces.push(full.clone());
        }
        // A resolv.conf of its own, as a real host has: `ip netns exec`
        // bind-mounts it over /etc/resolv.conf, so a node that points the
        // system's resolver at itself changes this file, never the host's.
        let etc = etc_netns(&full);
        fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("cannot create {}: {e}", etc.display()));
        fs::write(
            etc.join("resolv.conf"),
            format!("# {full}: a lab host; no resolver unless its test starts one\n"),
        )
        .unwrap_or_else(|e| panic!("cannot write {}/resolv.conf: {e}", etc.display()));
        let ns = Ns {
            name: full,
            short: name.to_string(),
            shared: Arc::clone(&self.shared),
        };
        ns.ip(["link", "set", "lo", "up"]);
        ns
    }

    /// Creates the "internet" namespace `name`: a bridge [`WAN_BRIDGE`]
    /// (`br0`) that [`Lab::connect_to_wan`] plugs namespaces into, with IPv4
    /// forwarding on so the wan can also route if a test gives it addresses.
    /// One per lab.
    pub fn wan(&self, name: &str) -> Ns {
        assert!(
            self.lock_state().wan.is_none(),
            "this lab already has a wan namespace"
        );
        let wan = self.add_ns(name);
        wan.ip(["link", "add", WAN_BRIDGE, "type", "bridge"]);
        wan.ip(["link", "set", WAN_BRIDGE, "up"]);
        wan.sysctl("net.ipv4.ip_forward", "1");
        self.lock_state().wan = Some(wan.clone());
        wan
    }

    /// The wan namespace made by [`Lab::wan`], if any.
    pub fn wan_ns(&self) -> Option<Ns> {
        self.lock_state().wan.clone()
    }

    /// Plugs `ns` into the wan bridge with a veth pair, gives the `ns` end the
    /// address `addr_cidr` (e.g. `"198.18.0.2/24"`, or `"2001:db8::2/64"`,
    /// usable at once: no duplicate address detection) and brings both ends
    /// up. Returns the interface name inside `ns`.
    pub fn connect_to_wan(&self, ns: &Ns, addr_cidr: &str) -> String {
        check_lab_cidr(addr_cidr);
        let wan = self
            .wan_ns()
            .unwrap_or_else(|| panic!("call lab.wan(..) before lab.connect_to_wan(..)"));
        assert!(ns.name != wan.name, "cannot connect the wan to itself");
        let (inside, port) = self.veth(ns, &wan);
        wan.ip(["link", "set", port.as_str(), "master", WAN_BRIDGE]);
        wan.ip(["link", "set", port.as_str(), "up"]);
        if addr_cidr.contains(':') {
            ns.ip([
                "-6",
                "addr",
                "add",
                addr_cidr,
                "dev",
                inside.as_str(),
                "nodad",
            ]);
        } else {
            ns.ip(["addr", "add", addr_cidr, "dev", inside.as_str()]);
        }
        ns.ip(["link", "set", inside.as_str(), "up"]);
        inside
    }

    /// A point-to-point veth pair between `a` and `b`, addressed `a_cidr` and
    /// `b_cidr`, both ends up. Returns the interface names in `a` and in `b`.
    pub fn link(&self, a: &Ns, a_cidr: &str, b: &Ns, b_cidr: &str) -> (String, String) {
        check_lab_cidr(a_cidr);
        check_lab_cidr(b_cidr);
        assert!(a.name != b.name, "cannot link a namespace to itself");
        let (a_if, b_if) = self.veth(a, b);
        a.ip(["addr", "add", a_cidr, "dev", a_if.as_str()]);
        b.ip(["addr", "add", b_cidr, "dev", b_if.as_str()]);
        a.ip(["link", "set", a_if.as_str(), "up"]);
        b.ip(["link", "set", b_if.as_str(), "up"]);
        (a_if, b_if)
    }

    /// Creates a Linux bridge `bridge` in `ns` with the address `addr_cidr`
    /// (a simulated private network, e.g. `"198.19.0.10/24"`), up.
    pub fn bridge(&self, ns: &Ns, bridge: &str, addr_cidr: &str) {
        check_lab_cidr(addr_cidr);
        ns.ip(["link", "add", bridge, "type", "bridge"]);
        ns.ip(["addr", "add", addr_cidr, "dev", bridge]);
        ns.ip(["link", "set", bridge, "up"]);
    }

    /// Plugs `ns` into the bridge `bridge` of `bridge_ns` (see [`Lab::bridge`])
    /// with a veth pair; the `ns` end gets `addr_cidr`. Returns its name.
    pub fn connect_to_bridge(
        &self,
        ns: &Ns,
        addr_cidr: &str,
        bridge_ns: &Ns,
        bridge: &str,
    ) -> String {
        check_lab_cidr(addr_cidr);
        assert!(
            ns.name != bridge_ns.name,
            "cannot connect a namespace to its own bridge"
        );
        let (inside, port) = self.veth(ns, bridge_ns);
        bridge_ns.ip(["link", "set", port.as_str(), "master", bridge]);
        bridge_ns.ip(["link", "set", port.as_str(), "up"]);
        ns.ip(["addr", "add", addr_cidr, "dev", inside.as_str()]);
        ns.ip(["link", "set", inside.as_str(), "up"]);
        inside
    }

    /// Full names of the lab's namespaces, in creation order.
    pub fn namespace_names(&self) -> Vec<String> {
        self.lock_state().namespaces.clone()
    }

    /// Prints every process log of this lab to stderr (each framed with its
    /// name). Called automatically when a lab is dropped during a panic.
    pub fn dump_logs(&self) {
        let mut entries: Vec<PathBuf> = match fs::read_dir(&self.shared.logs) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                eprintln!("(cannot list {}: {e})", self.shared.logs.display());
                return;
            }
        };
        entries.sort();
        eprintln!("===== logs of lab {} =====", self.tag);
        for path in entries {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            eprintln!("----- {name} -----");
            match fs::read(&path) {
                Ok(bytes) if bytes.is_empty() => eprintln!("(empty)"),
                Ok(bytes) => eprintln!("{}", String::from_utf8_lossy(&bytes).trim_end()),
                Err(e) => eprintln!("(cannot read: {e})"),
            }
        }
        eprintln!("===== end of logs of lab {} =====", self.tag);
    }

    /// Creates a veth pair from inside `a` with its peer placed directly in
    /// `b`, so no interface ever appears in the root namespace.
    fn veth(&self, a: &Ns, b: &Ns) -> (String, String) {
        let (a_if, b_if) = {
            let mut state = self.lock_state();
            (state.next_ifname(&a.name), state.next_ifname(&b.name))
        };
        a.ip([
            "link",
            "add",
            a_if.as_str(),
            "type",
            "veth",
            "peer",
            "name",
            b_if.as_str(),
            "netns",
            b.name.as_str(),
        ]);
        (a_if, b_if)
    }

    fn lock_state(&self) -> MutexGuard<'_, LabState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        let procs: Vec<Arc<ProcInner>> = std::mem::take(
            &mut *self
                .shared
                .procs
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for proc in &procs {
            proc.stop(TERM_GRACE);
        }
        if panicking {
            self.dump_logs();
        }
        let namespaces = std::mem::take(&mut self.lock_state().namespaces);
        for name in namespaces.iter().rev() {
            let leftover = pids_in(name);
            if !leftover.is_empty() {
                eprintln!(
                    "warning: processes {leftover:?} (not started by the harness) still run in \
                     namespace {name}; it disappears when they exit"
                );
            }
            if let Err(e) = run_quiet("ip", ["netns", "del", name.as_str()]) {
                eprintln!("warning: could not delete namespace {name}: {e}");
            }
            let _ = fs::remove_dir_all(etc_netns(name));
        }
    }
}

impl Ns {
    /// The namespace's full name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The short name given to [`Lab::add_ns`].
    pub fn short_name(&self) -> &str {
        &self.short
    }

    /// A `Command` that runs `program` inside this namespace
    /// (`ip netns exec <ns> program`), for callers that need env, cwd or
    /// stdin; run it with [`Ns::spawn_command`] or std's own methods.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(&self.name).arg(program);
        cmd
    }

    /// Runs `program args...` inside the namespace and waits for it, bounded
    /// by [`EXEC_TIMEOUT`]. Returns its output whatever the exit status;
    /// panics if it cannot be started or does not finish in time.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        let shown = describe(&cmd);
        self.exec_command(cmd, EXEC_TIMEOUT)
            .unwrap_or_else(|| panic!("timed out after {EXEC_TIMEOUT:?}: {shown}"))
    }

    /// Like [`Ns::exec`] with a chosen bound: `None` if the command was still
    /// running after `timeout` (it has then been killed).
    pub fn exec_timeout<I, S>(&self, program: &str, args: I, timeout: Duration) -> Option<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        self.exec_command(cmd, timeout)
    }

    /// Runs `program args...` inside the namespace and returns its stdout;
    /// panics with the command, status, stdout and stderr if it fails.
    pub fn run<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        let shown = describe(&cmd);
        let out = self
            .exec_command(cmd, EXEC_TIMEOUT)
            .unwrap_or_else(|| panic!("timed out after {EXEC_TIMEOUT:?}: {shown}"));
        if !out.status.success() {
            panic!(
                "`{shown}` failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim_end(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip args...` inside the namespace; panics if it fails.
    /// Addresses in `args` are not checked: use lab addresses only.
    pub fn ip<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run("ip", args)
    }

    /// Sets a sysctl of this namespace (only `net.*` keys are per-namespace),
    /// e.g. `ns.sysctl("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) {
        assert!(
            key.starts_with("net.") && !key.contains(['/', ' ']),
            "only per-namespace net.* sysctls may be set, not {key:?}"
        );
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run("sh", ["-c", &format!("echo {value} > {path}")]);
    }

    /// Starts `program args...` inside the namespace with stdout and stderr
    /// going to `<lab dir>/logs/<log_name>.log`.
    pub fn spawn<I, S>(&self, program: &str, args: I, log_name: &str) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        self.spawn_command(cmd, log_name)
    }

    /// Starts a command made by [`Ns::command`] (with env, cwd... set),
    /// logging stdout and stderr like [`Ns::spawn`]. Its stdin is null.
    pub fn spawn_command(&self, mut cmd: Command, log_name: &str) -> Proc {
        let log = self.shared.log_path(log_name);
        let out = File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create log {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot reopen log {}: {e}", log.display()));
        let shown = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}"));
        let inner = Arc::new(ProcInner {
            name: log_name.to_string(),
            pid: child.id(),
            log,
            state: Mutex::new(ProcState {
                child,
                status: None,
            }),
        });
        self.shared
            .procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&inner));
        Proc { inner }
    }

    /// Runs `cmd` to completion with its output in files of the lab's scratch
    /// directory (never pipes, so a background grandchild holding them cannot
    /// block us).
    fn exec_command(&self, mut cmd: Command, timeout: Duration) -> Option<Output> {
        let n = self.shared.counter.fetch_add(1, Ordering::Relaxed);
        let out_path = self.shared.scratch.join(format!("{n}.out"));
        let err_path = self.shared.scratch.join(format!("{n}.err"));
        let create = |p: &Path| {
            File::create(p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()))
        };
        let shown = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(create(&out_path))
            .stderr(create(&err_path))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}"));
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            // Our own child, not yet reaped: its PID is still ours.
            let _ = child.kill();
            let _ = child.wait();
        }
        let read = |p: &Path| fs::read(p).unwrap_or_default();
        let output = status.map(|status| Output {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        });
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        output
    }
}

impl Proc {
    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The `log_name` it was started with.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Path of its log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// Everything it has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.inner.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until its log contains `needle`; panics (showing the log) after
    /// `timeout`, or early if the process exits first.
    /// Waits until the log holds `needle` more often than `seen` times
    /// (what it held before a signal, say).
    pub fn wait_for_another_log(&self, needle: &str, seen: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log().matches(needle).count() <= seen {
            assert!(
                Instant::now() < deadline && self.is_running(),
                "{} logged {needle:?} no more than {seen} times; its log:\n{}",
                self.inner.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.try_wait() {
                if self.log().contains(needle) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.inner.name,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?}: {} to log {needle:?}; its log:\n{}",
                    self.inner.name,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its exit status if it has exited, `None` while it runs.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.inner.lock().poll()
    }

    /// True while it runs.
    pub fn is_running(&self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit. Returns the
    /// exit status, or `None` if it still runs (it is then left running; drop
    /// the `Proc` or call [`Proc::kill_hard`]).
    pub fn terminate_and_wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut state = self.inner.lock();
        if let Some(status) = state.poll() {
            return Some(status);
        }
        state.signal(sys::SIGTERM);
        state.wait_for(timeout)
    }

    /// Sends SIGKILL (a crash, as far as the process is concerned) and reaps it.
    pub fn kill_hard(&self) -> Option<ExitStatus> {
        let mut state = self.inner.lock();
        if let Some(status) = state.poll() {
            return Some(status);
        }
        let _ = state.child.kill();
        state.reap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.inner.stop(TERM_GRACE);
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.inner.name)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

impl std::fmt::Debug for Ns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Ns").field(&self.name).finish()
    }
}

// ---------------------------------------------------------------------------
// Helpers below.

/// State shared by a lab and its namespaces.
struct Shared {
    logs: PathBuf,
    scratch: PathBuf,
    procs: Mutex<Vec<Arc<ProcInner>>>,
    counter: AtomicUsize,
}

impl Shared {
    /// A fresh log path for `log_name` (made file-name safe, never reused).
    fn log_path(&self, log_name: &str) -> PathBuf {
        let safe: String = log_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut path = self.logs.join(format!("{safe}.log"));
        let mut n = 1;
        while path.exists() {
            path = self.logs.join(format!("{safe}.{n}.log"));
            n += 1;
        }
        path
    }
}

#[derive(Default)]
struct LabState {
    namespaces: Vec<String>,
    wan: Option<Ns>,
    /// Veth ends made so far per namespace (full name), for `eth<k>` names.
    interfaces: HashMap<String, usize>,
}

impl LabState {
    fn next_ifname(&mut self, ns: &str) -> String {
        let k = self.interfaces.entry(ns.to_string()).or_insert(0);
        let name = format!("eth{k}");
        *k += 1;
        name
    }
}

struct ProcInner {
    name: String,
    pid: u32,
    log: PathBuf,
    state: Mutex<ProcState>,
}

struct ProcState {
    child: Child,
    /// Set once the child is reaped; after that its PID is never signalled.
    status: Option<ExitStatus>,
}

impl ProcInner {
    fn lock(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; idempotent.
    fn stop(&self, grace: Duration) {
        let mut state = self.lock();
        if state.poll().is_some() {
            return;
        }
        state.signal(sys::SIGTERM);
        if state.wait_for(grace).is_none() {
            let _ = state.child.kill();
            state.reap();
        }
    }
}

impl ProcState {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// Sends `signal` to the child, only while it is unreaped (so the PID is
    /// still ours).
    fn signal(&mut self, signal: i32) {
        if self.poll().is_none() {
            sys::kill(self.child.id(), signal);
        }
    }

    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.poll().is_none() {
            if let Some(status) = wait_timeout(&mut self.child, timeout) {
                self.status = Some(status);
            }
        }
        self.status
    }

    fn reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

/// The only unsafe code of the harness: signalling and asking for our uid.
#[allow(unsafe_code)]
mod sys {
    pub const SIGTERM: i32 = libc::SIGTERM;

    /// Sends `signal` to `pid`. Callers pass only PIDs of their own unreaped
    /// children.
    pub fn kill(pid: u32, signal: i32) {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return;
        };
        if pid <= 0 {
            return; // never a process group or "every process"
        }
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    pub fn euid() -> u32 {
        // SAFETY: geteuid(2) cannot fail and touches no memory of ours.
        unsafe { libc::geteuid() }
    }
}

fn is_root() -> bool {
    sys::euid() == 0
}

fn skip_or_fail(test: &str, problem: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {problem} (CI=true, so this is a failure, not a skip)");
    }
    // Straight to the stderr handle: libtest captures `eprintln!`, and a
    // skip must be visible in a passing run.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {problem}");
    false
}

fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Waits for `child` up to `timeout`, polling; `None` if it still runs.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return child.wait().ok(),
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs a root-namespace command (only `ip netns ...` management), panicking
/// on failure.
fn run_ok<I, S>(program: &str, args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    if let Err(e) = run_quiet(program, args) {
        panic!("{e}");
    }
}

/// Runs a command, bounded by [`EXEC_TIMEOUT`]; `Err` describes a failure.
fn run_quiet<I, S>(program: &str, args: I) -> Result<String, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let shown = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{shown}`: {e}"))?;
    // `ip` writes little: the pipes cannot fill up before it exits.
    let Some(status) = wait_timeout(&mut child, EXEC_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("timed out after {EXEC_TIMEOUT:?}: `{shown}`"));
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{shown}`: {e}"))?;
    if status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{shown}` failed ({status}): {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// PIDs of processes inside namespace `name` (empty if none or unknown).
fn pids_in(name: &str) -> Vec<u32> {
    run_quiet("ip", ["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Namespace names as `ip netns list` shows them (first word of each line).
pub fn list_namespaces() -> Vec<String> {
    run_quiet("ip", ["netns", "list"])
        .map(|out| {
            out.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes namespaces `<prefix>-<pid>-...` whose `<pid>` is no longer a live
/// process: left behind by a test run that was killed before its `Drop`.
/// Names of other prefixes, or of live processes, are never touched.
fn sweep_stale(prefix: &str) {
    for name in list_namespaces() {
        let Some(pid) = stale_pid(&name, prefix) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match run_quiet("ip", ["netns", "del", name.as_str()]) {
            Ok(_) => eprintln!("deleted stale namespace {name} (process {pid} is gone)"),
            Err(e) => eprintln!("warning: could not delete stale namespace {name}: {e}"),
        }
        let _ = fs::remove_dir_all(etc_netns(&name));
    }
}

/// `/etc/netns/<namespace>`: files `ip netns exec` bind-mounts over
/// `/etc` inside the namespace (the namespace's own resolv.conf).
pub fn etc_netns(namespace: &str) -> PathBuf {
    Path::new("/etc/netns").join(namespace)
}

impl Ns {
    /// This namespace's own resolv.conf (what programs in it read as
    /// `/etc/resolv.conf`).
    pub fn resolv_conf(&self) -> PathBuf {
        etc_netns(&self.name).join("resolv.conf")
    }

    /// Gives this namespace an /etc/hosts of its own with `lines` (what
    /// programs in it read as `/etc/hosts`; removed with the lab).
    pub fn write_hosts(&self, lines: &str) {
        let path = etc_netns(&self.name).join("hosts");
        fs::write(
            &path,
            format!("127.0.0.1 localhost\n::1 localhost\n{lines}"),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// The creating PID encoded in a lab namespace name of `prefix`, if `name`
/// has the exact shape `<prefix>-<pid>-<seq>-<short>`.
fn stale_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let seq = parts.next()?;
    let short = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(seq) || short.is_empty() {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Panics unless `cidr` is `a.b.c.d/len` inside one of [`ALLOWED_RANGES`],
/// or an IPv6 address with a prefix length inside [`ALLOWED_RANGE_V6`].
fn check_lab_cidr(cidr: &str) {
    if cidr.contains(':') {
        let (net, net_len) = ALLOWED_RANGE_V6;
        let inside = cidr.split_once('/').is_some_and(|(addr, len)| {
            let mask = u128::MAX << (128 - u32::from(net_len));
            addr.parse::<std::net::Ipv6Addr>()
                .is_ok_and(|a| u128::from(a) & mask == u128::from(net))
                && len
                    .parse::<u8>()
                    .is_ok_and(|l| (net_len..=128).contains(&l))
        });
        assert!(
            inside,
            "{cidr} is outside the lab's IPv6 range 2001:db8::/32"
        );
        return;
    }
    let parsed = cidr.split_once('/').and_then(|(addr, len)| {
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
        Some((addr, len))
    });
    let Some((addr, len)) = parsed else {
        panic!("{cidr:?} is not an IPv4 address with a prefix length, e.g. \"198.18.0.2/24\"");
    };
    let inside = ALLOWED_RANGES.iter().any(|&(net, net_len)| {
        let mask = u32::MAX << (32 - u32::from(net_len));
        len >= net_len && (u32::from(addr) & mask) == u32::from(net)
    });
    assert!(
        inside,
        "{cidr} is outside the lab ranges 198.18.0.0/16, 198.19.0.0/16 and 100.64.0.0/10"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_are_parsed_strictly() {
        assert_eq!(stale_pid("harness-123-0-wan", "harness"), Some(123));
        assert_eq!(stale_pid("harness-123-4-nat-a", "harness"), Some(123));
        assert_eq!(stale_pid("harness2-123-0-wan", "harness"), None);
        assert_eq!(stale_pid("harness-x-123-0-wan", "harness"), None);
        assert_eq!(stale_pid("harness-123-0-", "harness"), None);
        assert_eq!(stale_pid("harness-123-wan", "harness"), None);
        assert_eq!(stale_pid("harness-0-0-wan", "harness"), None);
        assert_eq!(stale_pid("other-123-0-wan", "harness"), None);
    }

    #[test]
    fn lab_cidrs_are_checked() {
        for good in [
            "198.18.0.1/24",
            "198.19.255.1/16",
            "100.64.0.5/10",
            "100.127.1.1/32",
            "2001:db8::1/64",
            "2001:db8:ffff::9/128",
        ] {
            check_lab_cidr(good);
        }
        for bad in [
            "10.0.0.1/8",
            "172.16.0.1/12",
            "192.168.1.1/24",
            "100.128.0.1/10",
            "198.20.0.1/24",
            "198.18.0.1/15",
            "198.18.0.1",
            "198.18.0.1/33",
            "2001:db9::1/64",
            "fe80::1/64",
            "2001:db8::1/16",
            "2001:db8::1",
        ] {
            let result = std::panic::catch_unwind(|| check_lab_cidr(bad));
            assert!(result.is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn wait_until_times_out_with_the_reason() {
        let result = std::panic::catch_unwind(|| {
            wait_until("the moon turns blue", Duration::from_millis(120), || false)
        });
        let payload = result.err().unwrap_or_else(|| panic!("did not time out"));
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.starts_with("timed out after") && message.ends_with(": the moon turns blue"),
            "{message}"
        );
        let mut calls = 0;
        wait_until("third call", Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
    }

    #[test]
    fn interface_names_count_per_namespace() {
        let mut state = LabState::default();
        assert_eq!(state.next_ifname("a"), "eth0");
        assert_eq!(state.next_ifname("b"), "eth0");
        assert_eq!(state.next_ifname("a"), "eth1");
    }
}
pub mod console_load;
pub mod nat;
pub mod report;
pub mod soak;
pub mod tern;
