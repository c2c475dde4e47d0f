//! `tern demo`: a throwaway mesh on this machine's loopback, without root or
//! config. It makes a CA and four certificates in a temporary directory,
//! starts a lighthouse, a rootless gateway in front of a small private HTTP
//! service (served by this process on 127.77.0.10), a runner and a client,
//! then shows a request reaching the private service through the mesh and a
//! pipeline running on the runner with live output.
//!
//! Every child is started by this process, logs to a file in the temporary
//! directory, and is stopped through its own `Child` handle whatever happens:
//! success, failure, SIGINT or SIGTERM. Every wait is bounded.

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::DirBuilderExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tern_shared::control::RunnerSelector;
use tern_shared::exit;
use tokio::signal::unix::{signal, SignalKind};

use crate::io::api::{self, ApiRequest};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the temporary directory (certificates, configs, logs) in place
    /// and print its path.
    #[arg(long)]
    pub keep: bool,
}

/// `tern demo`: 0 when both the request and the pipeline went through, 1 on
/// any failure (after the tail of every log), 130 when interrupted. The
/// children are stopped and the directory removed in every case.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let stop = watch_signals()?;
    let tern = std::env::current_exe().context("finding the tern executable")?;
    let lighthouse = tern.with_file_name("tern-lighthouse");
    if !lighthouse.is_file() {
        bail!(
            "{} not found: tern demo starts the lighthouse from the directory tern runs from; \
             build it with `cargo build --workspace` (or install tern-lighthouse next to tern)",
            lighthouse.display()
        );
    }
    let mut dir = DemoDir::create()?;
    let mut mesh = Mesh::default();
    let result = demo(&tern, &lighthouse, &dir.path, &mut mesh, &stop);
    let interrupted =
        stop.load(Ordering::SeqCst) || matches!(&result, Err(e) if e.is::<Interrupted>());
    if interrupted {
        eprintln!("\ninterrupted: stopping the demo");
    } else if result.is_err() {
        print_log_tails(&dir.path);
    }
    let stopped = match mesh.stop_all() {
        1 => "1 process".to_string(),
        n => format!("{n} processes"),
    };
    let cleanup = if args.keep {
        dir.keep = true;
        format!(
            "stopped {stopped}; kept {} (remove it with `rm -r`)",
            dir.path.display()
        )
    } else {
        match dir.remove() {
            Ok(()) => format!("stopped {stopped}, removed {}", dir.path.display()),
            Err(e) => format!(
                "stopped {stopped}; could not remove {}: {e}",
                dir.path.display()
            ),
        }
    };
    match result {
        _ if interrupted => {
            eprintln!("cleaned up: {cleanup}");
            Ok(ExitCode::from(exit::CANCELLED))
        }
        Ok(()) => {
            println!("\ncleaned up: {cleanup}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("cleaned up: {cleanup}");
            Err(e.context("tern demo failed (the logs of each process are above)"))
        }
    }
}

/// How long any one stage may take: starting, becoming ready, one request.
const STAGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the demo pipeline may run (it needs about a second).
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);
/// `tern run` attempts while the runner is not advertised yet (exit 69).
const RUN_ATTEMPTS: u32 = 10;
const LOG_TAIL_LINES: usize = 20;

/// The "private network" the gateway routes: part of 127.0.0.0/8, which
/// Linux delivers locally for any address, so binding needs no root.
const PRIVATE_SUBNET: &str = "127.77.0.0/24";
const PRIVATE_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 10);
const RUNNER_LABEL: &str = "demo";

const PIPELINE: &str = r#"name = "demo"

[[steps]]
name = "hello"
run = "echo hello from $TERN_RUNNER, job $TERN_JOB_ID, for $TERN_CALLER; uname -sr"

[[steps]]
name = "count"
run = "for i in 1 2 3; do echo tick $i; sleep 0.2; done"
"#;

/// Every certificate: name, overlay address, groups, routed subnets.
const CERTS: [(&str, &str, &str, &str); 4] = [
    ("lh1", "100.64.0.1/10", "lighthouse", ""),
    ("gw", "100.64.0.2/10", "", PRIVATE_SUBNET),
    ("client", "100.64.0.3/10", "ci", ""),
    ("runner", "100.64.0.4/10", "runner", ""),
];

/// Returned (through anyhow) when SIGINT or SIGTERM arrived.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// The loopback ports, picked free at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    lighthouse: u16,
    gateway: u16,
    runner: u16,
    client: u16,
    forward: u16,
    socks: u16,
}

/// What a node does besides joining the mesh.
#[derive(Debug, Clone, Copy)]
enum Role {
    Gateway,
    Runner,
    Client {
        socks: u16,
        forward: u16,
        target: SocketAddrV4,
    },
}

fn demo(
    tern: &Path,
    lighthouse: &Path,
    dir: &Path,
    mesh: &mut Mesh,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "Starting a throwaway Tern mesh in {} (no root, no config)...",
        dir.display()
    );
    // The service binds first: its port then cannot be taken by the others.
    let service = TcpListener::bind((PRIVATE_IP, 0)).with_context(|| {
        format!("binding the private service on {PRIVATE_IP} (tern demo needs Linux, where all of 127.0.0.0/8 is local)")
    })?;
    let service_addr = match service.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => bail!("the private service bound {a}, not an IPv4 address"),
    };
    serve_private(service, service_addr)?;
    let ports = pick_ports()?;

    make_certs(tern, dir, stop)?;
    let nodes = write_configs(dir, &ports, service_addr)?;
    println!("   a CA and certificates for lh1, gw, client and runner: done");

    mesh.spawn("lighthouse", lighthouse, &["--config", "lh.toml"], dir)?;
    wait_until("the lighthouse's API socket", stop, mesh, || {
        if dir.join("lh.sock").exists() {
            Ok(())
        } else {
            Err(anyhow!("lh.sock not there yet"))
        }
    })?;
    for (name, _, _) in nodes {
        let config = format!("{name}.toml");
        mesh.spawn(name, tern, &["up", "--config", &config], dir)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client_api = dir.join("client.sock");
    let ask = |request: ApiRequest| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(3), api::call(&client_api, &request))
                .await
                .map_err(|_| anyhow!("the client's API did not answer within 3 s"))?
        })
    };
    wait_until(
        &format!("the client learning the route to {PRIVATE_SUBNET}"),
        stop,
        mesh,
        || {
            let status = ask(ApiRequest::Status)?;
            if route_has_gateway(&status, PRIVATE_SUBNET) {
                Ok(())
            } else {
                Err(anyhow!("no gateway for {PRIVATE_SUBNET} in its routes yet"))
            }
        },
    )?;
    wait_until(
        &format!("the runner's label {RUNNER_LABEL:?} being found"),
        stop,
        mesh,
        || {
            let reply = ask(ApiRequest::FindRunners {
                selector: RunnerSelector::Label(RUNNER_LABEL.to_string()),
            })?;
            match reply["runners"].as_array() {
                Some(r) if !r.is_empty() => Ok(()),
                _ => Err(anyhow!("not advertised yet: {reply}")),
            }
        },
    )?;
    println!(
        "   lighthouse, gateway, runner and client up and introduced: {:.1} s\n",
        started.elapsed().as_secs_f64()
    );

    let forward = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.forward));
    println!(
        "1. A request to the private service {service_addr}, through the forward {forward} \
         (client → gateway, both without root):"
    );
    let body = wait_until("the request through the forward", stop, mesh, || {
        let mut stream = connect(forward)?;
        http_exchange(&mut stream, service_addr)
    })?;
    print_indented(&body);
    let socks = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.socks));
    println!("   The same through the client's SOCKS5 proxy {socks}:");
    let body = wait_until("the request through SOCKS5", stop, mesh, || {
        let mut stream = connect(socks)?;
        socks5_connect(&mut stream, service_addr)?;
        http_exchange(&mut stream, service_addr)
    })?;
    print_indented(&body);

    println!("\n2. A pipeline on the runner, streamed live:");
    println!("   $ tern run demo.toml --on {RUNNER_LABEL} --socket client.sock");
    run_pipeline(tern, dir, &client_api, stop)?;
    mesh.check_alive()?;

    println!("\nWhat ran (no root, no TUN device: every node in userspace mode):");
    println!(
        "   tern-lighthouse  lh1     100.64.0.1  UDP 127.0.0.1:{}",
        ports.lighthouse
    );
    println!(
        "   tern up          gw      100.64.0.2  UDP 127.0.0.1:{}, gateway into {PRIVATE_SUBNET} (group ci may reach it)",
        ports.gateway
    );
    println!(
        "   tern up          runner  100.64.0.4  UDP 127.0.0.1:{}, label {RUNNER_LABEL:?}, runs jobs for group ci",
        ports.runner
    );
    println!(
        "   tern up          client  100.64.0.3  UDP 127.0.0.1:{}, forward {forward} → {service_addr}, SOCKS5 {socks}",
        ports.client
    );
    println!("   the private service {service_addr} was served by this demo process");
    println!(
        "Certificates, configs and logs: {} ({:.1} s in all)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The configs of the lighthouse, the three nodes and the pipeline; the
/// nodes' names, ports and roles.
fn write_configs(
    dir: &Path,
    ports: &Ports,
    service_addr: SocketAddrV4,
) -> anyhow::Result<[(&'static str, u16, Role); 3]> {
    fs::write(dir.join("lh.toml"), lighthouse_config(ports.lighthouse))
        .context("writing lh.toml")?;
    let nodes = [
        ("gw", ports.gateway, Role::Gateway),
        ("runner", ports.runner, Role::Runner),
        (
            "client",
            ports.client,
            Role::Client {
                socks: ports.socks,
                forward: ports.forward,
                target: service_addr,
            },
        ),
    ];
    for (name, port, role) in nodes {
        let file = format!("{name}.toml");
        fs::write(
            dir.join(&file),
            node_config(name, port, ports.lighthouse, role),
        )
        .with_context(|| format!("writing {file}"))?;
    }
    fs::write(dir.join("demo.toml"), PIPELINE).context("writing demo.toml")?;
    Ok(nodes)
}

/// `tern run demo.toml` on the runner, again while the runner is not
/// advertised yet (a few times).
fn run_pipeline(
    tern: &Path,
    dir: &Path,
    client_api: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        let mut cmd = Command::new(tern);
        cmd.args(["run", "demo.toml", "--on", RUNNER_LABEL, "--socket"])
            .arg(client_api)
            .current_dir(dir)
            .stdin(Stdio::null());
        let status = run_to_end(&mut cmd, "tern run", PIPELINE_TIMEOUT, stop)?;
        match status.code() {
            Some(0) => return Ok(()),
            Some(code) if code == i32::from(exit::UNAVAILABLE) && attempt < RUN_ATTEMPTS => {
                println!("   (the runner is not advertised yet; retrying)");
                attempt += 1;
                pause(Duration::from_secs(1), stop)?;
            }
            _ => bail!("the pipeline did not pass: `tern run` {status}"),
        }
    }
}

/// Sets the returned flag on SIGINT or SIGTERM, from then on for the whole
/// process. Handlers rather than a blocked mask: a blocked mask would be
/// inherited by the children (and they would ignore our SIGTERM), while
/// handlers reset to the default on exec.
fn watch_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal watcher's runtime")?;
    let (mut sigint, mut sigterm) = {
        let _entered = rt.enter();
        (
            signal(SignalKind::interrupt()).context("handling SIGINT")?,
            signal(SignalKind::terminate()).context("handling SIGTERM")?,
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = sigint.recv() => {}
                    _ = sigterm.recv() => {}
                }
            });
            flag.store(true, Ordering::SeqCst);
            // The handlers stay installed: a second Ctrl-C does not cut the
            // cleanup short.
        })
        .context("starting the signal watcher")?;
    Ok(stop)
}

/// The temporary directory; removed on drop unless kept.
struct DemoDir {
    path: PathBuf,
    keep: bool,
}

impl DemoDir {
    fn create() -> anyhow::Result<Self> {
        let base = std::env::temp_dir();
        let pid = std::process::id();
        for n in 0..100u32 {
            let name = match n {
                0 => format!("tern-demo-{pid}"),
                n => format!("tern-demo-{pid}-{n}"),
            };
            let path = base.join(name);
            // Unix socket paths hold at most 107 bytes.
            if path.join("runner.sock").as_os_str().len() > 100 {
                bail!(
                    "{} is too long a path for the API sockets: run with TMPDIR=/tmp",
                    path.display()
                );
            }
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!(
            "could not create a fresh tern-demo-{pid} directory in {}",
            base.display()
        )
    }

    fn remove(&mut self) -> std::io::Result<()> {
        self.keep = true; // done: nothing left for drop
        fs::remove_dir_all(&self.path)
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// The long-running children; stopped on drop.
#[derive(Default)]
struct Mesh {
    daemons: Vec<(&'static str, Child)>,
}

impl Mesh {
    /// Starts a daemon in its own process group (so a Ctrl-C on the terminal
    /// reaches only the demo, which then stops it), logging to `<name>.log`.
    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[&str],
        dir: &Path,
    ) -> anyhow::Result<()> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the {name}: {}", program.display()))?;
        self.daemons.push((name, child));
        Ok(())
    }

    /// Fails if a daemon has exited: nothing will work without it.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.daemons {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("checking on the {name}"))?
            {
                bail!("the {name} exited early ({status}); see {name}.log above");
            }
        }
        Ok(())
    }

    /// SIGTERM to every daemon, then up to [`STOP_GRACE`] for all of them
    /// together before the stragglers are killed. Returns how many were
    /// stopped.
    fn stop_all(&mut self) -> usize {
        let mut daemons = std::mem::take(&mut self.daemons);
        for (_, child) in &mut daemons {
            send_sigterm(child);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (_, child) in &mut daemons {
            wait_or_kill(child, deadline);
        }
        daemons.len()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Signals a child that has not been reaped yet: its pid cannot have been
/// reused, since an unreaped child keeps it.
fn send_sigterm(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}

fn wait_or_kill(child: &mut Child, deadline: Instant) {
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(POLL),
            Ok(Some(_)) => return,
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn terminate(child: &mut Child) {
    send_sigterm(child);
    wait_or_kill(child, Instant::now() + STOP_GRACE);
}

/// Runs a command to its end, within `timeout`, stopping it on a signal.
fn run_to_end(
    cmd: &mut Command,
    what: &str,
    timeout: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<ExitStatus> {
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if stop.load(Ordering::SeqCst) {
            terminate(&mut child);
            return Err(Interrupted.into());
        }
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                terminate(&mut child);
                bail!("{what} did not finish within {} s", timeout.as_secs());
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                terminate(&mut child);
                return Err(e).with_context(|| format!("waiting for {what}"));
            }
        }
    }
}

/// Polls `probe` until it succeeds, for at most [`STAGE_TIMEOUT`], while
/// every daemon stays up and no signal arrives.
fn wait_until<T>(
    what: &str,
    stop: &AtomicBool,
    mesh: &mut Mesh,
    mut probe: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + STAGE_TIMEOUT;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        mesh.check_alive()?;
        match probe() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("waiting {} s for {what}", STAGE_TIMEOUT.as_secs())))
            }
            Err(_) => pause(Duration::from_millis(200), stop)?,
        }
    }
}

fn pause(duration: Duration, stop: &AtomicBool) -> anyhow::Result<()> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn make_certs(tern: &Path, dir: &Path, stop: &AtomicBool) -> anyhow::Result<()> {
    let log = dir.join("certs.log");
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut commands = vec![vec![
        "cert",
        "ca",
        "--name",
        "demo-ca",
        "--out-crt",
        "ca.crt",
        "--out-key",
        "ca.key",
    ]];
    let files: Vec<(String, String)> = CERTS
        .iter()
        .map(|(name, ..)| (format!("{name}.key"), format!("{name}.crt")))
        .collect();
    for ((name, ip, groups, subnets), (key, crt)) in CERTS.iter().zip(&files) {
        let mut args = vec![
            "cert",
            "sign",
            "--ca-crt",
            "ca.crt",
            "--ca-key",
            "ca.key",
            "--name",
            name,
            "--ip",
            ip,
            "--out-key",
            key,
            "--out-crt",
            crt,
        ];
        if !groups.is_empty() {
            args.extend(["--groups", groups]);
        }
        if !subnets.is_empty() {
            args.extend(["--subnets", subnets]);
        }
        commands.push(args);
    }
    for args in commands {
        let what = format!("tern {}", args.join(" "));
        let mut cmd = Command::new(tern);
        cmd.args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("opening certs.log")?)
            .stderr(out.try_clone().context("opening certs.log")?)
            .process_group(0);
        let status = run_to_end(&mut cmd, &what, STAGE_TIMEOUT, stop)?;
        if !status.success() {
            bail!("`{what}` failed ({status}); see certs.log above");
        }
    }
    Ok(())
}

/// Free loopback ports: all held at once so they differ, then released for
/// the daemons to bind.
fn pick_ports() -> anyhow::Result<Ports> {
    let udp = (0..4)
        .map(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("finding free UDP ports on 127.0.0.1")?;
    let tcp = (0..2)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("finding free TCP ports on 127.0.0.1")?;
    let udp_port = |i: usize| -> anyhow::Result<u16> { Ok(udp[i].local_addr()?.port()) };
    let tcp_port = |i: usize| -> anyhow::Result<u16> { Ok(tcp[i].local_addr()?.port()) };
    Ok(Ports {
        lighthouse: udp_port(0)?,
        gateway: udp_port(1)?,
        runner: udp_port(2)?,
        client: udp_port(3)?,
        forward: tcp_port(0)?,
        socks: tcp_port(1)?,
    })
}

fn lighthouse_config(port: u16) -> String {
    format!(
        r#"# tern demo: the lighthouse.
[pki]
ca = "ca.crt"
cert = "lh1.crt"
key = "lh1.key"

[listen]
addr = "127.0.0.1:{port}"

[api]
socket = "lh.sock"

[log]
level = "info"
"#
    )
}

fn node_config(name: &str, port: u16, lighthouse_port: u16, role: Role) -> String {
    let mut text = format!(
        r#"# tern demo: the {name}.
[pki]
ca = "ca.crt"
cert = "{name}.crt"
key = "{name}.key"

[listen]
addr = "127.0.0.1:{port}"

[[lighthouses]]
endpoint = "127.0.0.1:{lighthouse_port}"

[tun]
mode = "userspace"

[api]
socket = "{name}.sock"

[log]
level = "info"
"#
    );
    let extra = match role {
        Role::Gateway => format!(
            r#"
[gateway]
subnets = ["{PRIVATE_SUBNET}"]

[[firewall.inbound]]
proto = "tcp"
local_cidr = "{PRIVATE_SUBNET}"
groups = ["ci"]
"#
        ),
        Role::Runner => format!(
            r#"
[[firewall.inbound]]
proto = "tcp"
port = {}

[runner]
labels = ["{RUNNER_LABEL}"]
allow_groups = ["ci"]
work_dir = "jobs"
audit_log = "audit.jsonl"
"#,
            tern_runner::protocol::RUNNER_PORT
        ),
        Role::Client {
            socks,
            forward,
            target,
        } => format!(
            r#"
[proxy]
socks5 = "127.0.0.1:{socks}"

[[forwards]]
listen = "127.0.0.1:{forward}"
target = "{target}"
"#
        ),
    };
    text.push_str(&extra);
    text
}

/// Whether the node's status shows a gateway for `subnet`.
fn route_has_gateway(status: &serde_json::Value, subnet: &str) -> bool {
    status["routes"].as_array().into_iter().flatten().any(|r| {
        r["subnet"].as_str() == Some(subnet)
            && r["gateways"].as_array().is_some_and(|g| !g.is_empty())
    })
}

/// Serves every connection on its own thread for the rest of the process.
fn serve_private(listener: TcpListener, addr: SocketAddrV4) -> anyhow::Result<()> {
    let body = format!("hello from the private service at {addr}, reached through the mesh\n");
    std::thread::Builder::new()
        .name("demo-service".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let response = http_response(&body);
                let _ = std::thread::Builder::new()
                    .name("demo-service-conn".into())
                    .spawn(move || answer(stream, response.as_bytes()));
            }
        })
        .context("starting the private service")?;
    Ok(())
}

/// Reads the request head (bounded in size and time), then answers.
fn answer(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < 8192 && !contains(&head, b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(response);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn http_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// A GET on an open stream; the body of a 200 answer, read to EOF within
/// [`STAGE_TIMEOUT`].
fn http_exchange(stream: &mut TcpStream, host: SocketAddrV4) -> anyhow::Result<String> {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .context("sending the request")?;
    let deadline = Instant::now() + STAGE_TIMEOUT;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if raw.len() + n <= 1 << 20 => raw.extend_from_slice(&buf[..n]),
            Ok(_) => bail!("the answer is over 1 MiB"),
            Err(e) => return Err(e).context("reading the answer"),
        }
        if Instant::now() >= deadline {
            bail!(
                "the answer did not end within {} s",
                STAGE_TIMEOUT.as_secs()
            );
        }
    }
    http_body(&raw)
}

fn http_body(raw: &[u8]) -> anyhow::Result<String> {
    if raw.is_empty() {
        bail!("the connection closed without an answer");
    }
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("the answer has no end of headers: {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    match status.split_whitespace().collect::<Vec<_>>().as_slice() {
        [version, "200", ..] if version.starts_with("HTTP/1.") => Ok(body.to_string()),
        _ => bail!("the answer was {status:?}, not 200 OK"),
    }
}

/// A SOCKS5 CONNECT without authentication (RFC 1928).
fn socks5_connect(stream: &mut TcpStream, target: SocketAddrV4) -> anyhow::Result<()> {
    stream.write_all(&[5, 1, 0])?;
    let mut choice = [0u8; 2];
    stream
        .read_exact(&mut choice)
        .context("reading the proxy's method choice")?;
    if choice != [5, 0] {
        bail!("the SOCKS5 proxy refused no-authentication: {choice:?}");
    }
    stream.write_all(&socks5_request(target))?;
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .context("reading the proxy's reply")?;
    if head[0] != 5 || head[1] != 0 {
        bail!("the SOCKS5 proxy answered CONNECT with code {}", head[1]);
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len)?;
            usize::from(len[0]) + 2
        }
        t => bail!("the SOCKS5 reply has address type {t}"),
    };
    let mut bound = vec![0u8; rest];
    stream.read_exact(&mut bound)?;
    Ok(())
}

fn socks5_request(target: SocketAddrV4) -> [u8; 10] {
    let [a, b, c, d] = target.ip().octets();
    let [hi, lo] = target.port().to_be_bytes();
    [5, 1, 0, 1, a, b, c, d, hi, lo]
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}

/// The last lines of every log in the directory, to stderr.
fn print_log_tails(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let name = log.file_name().unwrap_or_default().to_string_lossy();
        eprintln!("--- {name} (last {LOG_TAIL_LINES} lines) ---");
        for line in tail(&text, LOG_TAIL_LINES) {
            eprintln!("{line}");
        }
    }
}

fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_shared::config::{LighthouseConfig, NodeConfig, TunMode};

    const PORTS: Ports = Ports {
        lighthouse: 40001,
        gateway: 40002,
        runner: 40003,
        client: 40004,
        forward: 40005,
        socks: 40006,
    };

    fn parse(role: Role, name: &str, port: u16) -> NodeConfig {
        let text = node_config(name, port, PORTS.lighthouse, role);
        NodeConfig::parse(&text, Path::new("/tmp/d/x.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn lighthouse_config_parses_with_the_port() {
        let text = lighthouse_config(PORTS.lighthouse);
        let config = LighthouseConfig::parse(&text, Path::new("/tmp/d/lh.toml")).unwrap();
        assert_eq!(
            config.listen.addr,
            "127.0.0.1:40001".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.pki.cert, Path::new("/tmp/d/lh1.crt"));
        assert_eq!(config.api.socket.unwrap(), Path::new("/tmp/d/lh.sock"));
    }

    #[test]
    fn gateway_config_routes_the_private_subnet_for_ci() {
        let config = parse(Role::Gateway, "gw", PORTS.gateway);
        assert_eq!(config.tun.mode, TunMode::Userspace);
        assert_eq!(config.listen.addr.port(), PORTS.gateway);
        assert_eq!(config.lighthouses[0].endpoint.port(), PORTS.lighthouse);
        let gateway = config.gateway.unwrap();
        assert_eq!(gateway.subnets, vec![PRIVATE_SUBNET.parse().unwrap()]);
        assert_eq!(config.firewall.inbound.len(), 1);
        assert_eq!(config.log.level, "info");
    }

    #[test]
    fn runner_config_serves_ci_under_the_demo_label() {
        let config = parse(Role::Runner, "runner", PORTS.runner);
        let runner = config.runner.unwrap();
        assert_eq!(runner.labels, vec![RUNNER_LABEL.to_string()]);
        assert_eq!(runner.allow_groups, vec!["ci".to_string()]);
        assert_eq!(runner.work_dir, Path::new("/tmp/d/jobs"));
        assert_eq!(config.api.socket.unwrap(), Path::new("/tmp/d/runner.sock"));
    }

    #[test]
    fn client_config_has_the_forward_and_the_proxy() {
        let target = SocketAddrV4::new(PRIVATE_IP, 8080);
        let role = Role::Client {
            socks: PORTS.socks,
            forward: PORTS.forward,
            target,
        };
        let config = parse(role, "client", PORTS.client);
        assert_eq!(config.proxy.socks5.unwrap().port(), PORTS.socks);
        assert_eq!(config.forwards[0].listen.port(), PORTS.forward);
        assert_eq!(
            config.forwards[0].target,
            tern_shared::dns::ForwardTarget::Addr(target)
        );
        assert!(config.gateway.is_none() && config.runner.is_none());
    }

    #[test]
    fn the_pipeline_parses() {
        let pipeline =
            tern_runner::pipeline::Pipeline::parse(PIPELINE, Path::new("demo.toml")).unwrap();
        let json = serde_json::to_value(&pipeline).unwrap();
        assert_eq!(json["steps"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn http_answers_round_trip_and_non_200_is_an_error() {
        let response = http_response("hi\n");
        assert!(response.contains("Content-Length: 3\r\n"));
        assert_eq!(http_body(response.as_bytes()).unwrap(), "hi\n");
        assert!(http_body(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").is_err());
        assert!(http_body(b"").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn socks5_request_is_connect_to_ipv4() {
        let request = socks5_request(SocketAddrV4::new(PRIVATE_IP, 0x1f90));
        assert_eq!(request, [5, 1, 0, 1, 127, 77, 0, 10, 0x1f, 0x90]);
    }

    #[test]
    fn route_needs_a_gateway() {
        let status = serde_json::json!({"routes": [
            {"subnet": "10.0.0.0/8", "gateways": ["100.64.0.9"]},
            {"subnet": PRIVATE_SUBNET, "gateways": []},
        ]});
        assert!(!route_has_gateway(&status, PRIVATE_SUBNET));
        let status = serde_json::json!({"routes": [
            {"subnet": PRIVATE_SUBNET, "gateways": ["100.64.0.2"]},
        ]});
        assert!(route_has_gateway(&status, PRIVATE_SUBNET));
        assert!(!route_has_gateway(&serde_json::json!({}), PRIVATE_SUBNET));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(tail("a", 5), vec!["a"]);
        assert!(tail("", 3).is_empty());
    }
}
