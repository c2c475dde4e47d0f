//! The readiness gate: `tern up ... --wait-for HOST:PORT` starts the node in
//! the background and returns only when a TCP connection to HOST:PORT
//! through the mesh succeeded — so the CI step after it can use the target
//! at once — or with a documented exit code saying what is missing.
//! `tern down` stops the node (it deregisters as it goes).

use std::net::SocketAddrV4;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use tern_shared::dns::ForwardTarget;
use tern_shared::exit;

use crate::io::api::{self, ApiRequest};

/// The node already answering on `socket`, if any: its name and overlay
/// address, for a message.
pub fn running_node(socket: &Path) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let reply = runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                api::call(socket, &ApiRequest::Status),
            )
            .await
        })
        .ok()?
        .ok()?;
    // Whatever answers there is a node, even one of another version whose
    // status reads differently.
    match api::decode::<api::StatusReply>(reply) {
        Ok(Ok(s)) => Some(format!(
            "node {} ({}, pid {})",
            s.status.name, s.status.overlay_ip, s.pid
        )),
        _ => Some("a node".to_string()),
    }
}

/// Refuses to start a second node on a socket another one answers on: it
/// would fail to bind after enrolling (spending a token), and a readiness
/// gate would talk to the wrong node.
pub fn refuse_taken_socket(socket: &Path) -> Option<ExitCode> {
    let running = running_node(socket)?;
    eprintln!(
        "tern up: {running} already runs on the API socket {socket}; stop it with `tern down --socket {socket}`, or give this node another [api] socket",
        socket = socket.display()
    );
    Some(ExitCode::from(exit::SOCKET_TAKEN))
}

/// Longest single connection attempt: after one fails or hangs this long,
/// the gate asks whether policy is what stands in the way.
const ATTEMPT: Duration = Duration::from_secs(3);

/// Asks the node whether the peer in front of `target` denies it by
/// policy: `Some(why)` when it says so, `None` when it allows it or cannot
/// tell yet (no session, no answer).
fn denied_by_policy(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    target: SocketAddrV4,
) -> Option<(bool, String)> {
    let reply = runtime
        .block_on(api::ask(socket, &ApiRequest::Policy { target }))
        .ok()?
        .ok()?;
    api::policy_verdict(&reply)
}

/// The node's arguments without the gate's own, and the enrollment token
/// taken out of them (it is handed over in the environment).
pub fn child_args(args: &[String]) -> (Vec<String>, Option<String>) {
    let mut out = Vec::new();
    let mut token = None;
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--wait-for" | "--wait-timeout" | "--log-file" => {
                args.next();
            }
            // The token goes to the node in its environment, not on its
            // command line, where any user could read it (ps).
            "--enroll-token" => token = args.next().cloned(),
            s if s.starts_with("--enroll-token=") => {
                token = s.strip_prefix("--enroll-token=").map(str::to_string)
            }
            s if s.starts_with("--wait-for=")
                || s.starts_with("--wait-timeout=")
                || s.starts_with("--log-file=") => {}
            _ => out.push(a.clone()),
        }
    }
    (out, token)
}

fn stop(child: &mut Child) {
    // Our own child: its PID is ours to signal.
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn fail(child: &mut Child, code: u8, message: String, log: &Path) -> anyhow::Result<ExitCode> {
    stop(child);
    eprintln!("tern up: {message} (the node's log: {})", log.display());
    Ok(ExitCode::from(code))
}

/// Starts the node in the background and waits, within `timeout`, for its
/// registration and then for `target` to accept a connection through it.
/// The background node's log: `log` (the caller's to place and share), else
/// beside its API socket, `<socket name>.log`, mode 0600 — it may name
/// peers, addresses and why an enrollment was refused.
fn open_log(
    socket: &Path,
    group: Option<&str>,
    log: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let (log, private) = match log {
        Some(log) => (log, false),
        None => {
            let dir = tern_udp::api_socket::prepare_dir(socket, group)?;
            let name = socket.file_stem().unwrap_or_default().to_string_lossy();
            (dir.join(format!("{name}.log")), true)
        }
    };
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let out = options
        .open(&log)
        .and_then(|f| {
            if private {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(f)
        })
        .map_err(|e| anyhow::anyhow!("creating the node's log {}: {e}", log.display()))?;
    Ok((log, out))
}

/// The node's log goes to `log`, else beside its API socket (a directory
/// of its user's alone), as `<socket name>.log`, mode 0600.
pub fn up_and_wait(
    socket: &Path,
    group: Option<&str>,
    target: ForwardTarget,
    timeout: Duration,
    log: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (log, out) = open_log(socket, group, log)?;
    let err = out.try_clone()?;
    let (node_args, token) = child_args(&args);
    let mut node = Command::new(std::env::current_exe()?);
    node.args(node_args);
    if let Some(token) = token {
        node.env(super::daemon::ENROLL_TOKEN_ENV, token);
    }
    let child = node
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: the CI step's Ctrl-C or end does not reach it.
        .process_group(0)
        .spawn()?;
    let unresolved = |port| SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port);
    let (target, name, service) = match target {
        ForwardTarget::Addr(a) => (a, None, None),
        ForwardTarget::Name { host, port } => (unresolved(port), Some(host), None),
        ForwardTarget::Service { name } => (unresolved(0), None, Some(name)),
    };
    let mut gate = Gate {
        socket,
        target,
        name,
        service,
        timeout,
        started,
        deadline: started + timeout,
        child,
        log,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    if let Some(code) = gate.wait_registered()? {
        return Ok(code);
    }
    if let Some(code) = gate.resolve_name()? {
        return Ok(code);
    }
    if let Some(code) = gate.find_service()? {
        return Ok(code);
    }
    gate.wait_for_target()
}

/// The readiness gate around the node it started.
struct Gate<'a> {
    socket: &'a Path,
    /// The address dialled (a name's once it resolved).
    target: SocketAddrV4,
    /// `--wait-for NAME:PORT`: the name, resolved through the node.
    name: Option<String>,
    /// `--wait-for service:NAME`: a node offering it, asked through the node.
    service: Option<String>,
    timeout: Duration,
    started: Instant,
    deadline: Instant,
    child: std::process::Child,
    log: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Gate<'_> {
    /// First, registered with a lighthouse, or the node stopped (its code
    /// says why), or no registration in time. `None`: registered.
    fn wait_registered(&mut self) -> anyhow::Result<Option<ExitCode>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                let code = status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1);
                let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
                let last = tail
                    .lines()
                    .rev()
                    .find(|l| l.contains("error"))
                    .unwrap_or("");
                eprintln!("tern up: the node stopped before it was ready: {last}");
                return Ok(Some(ExitCode::from(code.max(1))));
            }
            let status = self
                .runtime
                .block_on(api::ask::<api::StatusReply>(
                    self.socket,
                    &ApiRequest::Status,
                ))
                .ok()
                .and_then(Result::ok);
            // Only the node this gate started counts: another one answering on
            // the socket meanwhile is not ours to report on.
            let registered = status.is_some_and(|s| {
                s.pid == self.child.id() && s.status.lighthouses.iter().any(|l| l.registered)
            });
            if registered {
                return Ok(None);
            }
            if Instant::now() >= self.deadline {
                let why = format!(
                    "no lighthouse registered the node within {} s",
                    self.timeout.as_secs()
                );
                return fail(&mut self.child, exit::UNAVAILABLE, why, &self.log).map(Some);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// With a name: it resolves through the node (a mesh name, or one
    /// under a gateway's zone, which may need a moment to be learned), or
    /// no path. `None`: resolved, the target set.
    fn resolve_name(&mut self) -> anyhow::Result<Option<ExitCode>> {
        let Some(name) = self.name.clone() else {
            return Ok(None);
        };
        loop {
            let request = ApiRequest::Resolve {
                name: name.clone(),
                rtype: "A".into(),
            };
            let why = match self
                .runtime
                .block_on(api::ask::<api::ResolveReply>(self.socket, &request))
            {
                Ok(Ok(reply)) => {
                    let ip = reply
                        .records
                        .iter()
                        .filter(|r| r.rtype == "A")
                        .find_map(|r| r.data.parse().ok());
                    match ip {
                        Some(ip) => {
                            self.target = SocketAddrV4::new(ip, self.target.port());
                            return Ok(None);
                        }
                        None => format!("{} ({}, from {})", name, reply.rcode, reply.source),
                    }
                }
                Ok(Err(refusal)) => refusal.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= self.deadline {
                let why = format!("{name} did not resolve: {why}");
                return fail(&mut self.child, exit::NO_PATH, why, &self.log).map(Some);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// With a service: some node offers it to this one (one that joins
    /// later may need a moment to advertise), or no path. `None`: found,
    /// the target set to the first offering node.
    fn find_service(&mut self) -> anyhow::Result<Option<ExitCode>> {
        let Some(name) = self.service.clone() else {
            return Ok(None);
        };
        loop {
            let request = ApiRequest::Services { name: name.clone() };
            let why = match self
                .runtime
                .block_on(api::ask::<api::ServicesReply>(self.socket, &request))
            {
                Ok(Ok(reply)) => match crate::io::balance::allowed_offers(&reply, &name) {
                    Ok(offers) if !offers.is_empty() => {
                        self.target = offers[0];
                        return Ok(None);
                    }
                    Ok(_) => format!("no node offers service {name:?}"),
                    // Not in its groups: asking again will not change that.
                    Err(refusal) if refusal.kind == api::ErrorKind::Denied => {
                        return fail(
                            &mut self.child,
                            exit::DENIED_BY_POLICY,
                            refusal.to_string(),
                            &self.log,
                        )
                        .map(Some);
                    }
                    Err(refusal) => refusal.to_string(),
                },
                Ok(Err(refusal)) => refusal.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= self.deadline {
                return fail(&mut self.child, exit::NO_PATH, why, &self.log).map(Some);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Then, the target answers through the mesh: routed, then dialled
    /// until it answers, refuses for good, is denied by the firewall in
    /// front of it, or time runs out.
    fn wait_for_target(&mut self) -> anyhow::Result<ExitCode> {
        let (socket, target) = (self.socket, self.target);
        let mut refused = false;
        let mut policy_allows = false;
        loop {
            if let Err(why) = self.routed() {
                if Instant::now() >= self.deadline {
                    let why = format!("no path to {target}: {why}");
                    return fail(&mut self.child, exit::NO_PATH, why, &self.log);
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            let dial = self.runtime.block_on(async {
                tokio::time::timeout(left.min(ATTEMPT), api::dial(socket, target)).await
            });
            let failed = !matches!(dial, Ok(Ok(_)));
            if failed && !policy_allows {
                // Refused or silent: is it the firewall in front of the target?
                match denied_by_policy(&self.runtime, socket, target) {
                    Some((false, why)) => {
                        let why = format!("{target} is denied by policy: {why}");
                        return fail(&mut self.child, exit::DENIED_BY_POLICY, why, &self.log);
                    }
                    Some((true, _)) => policy_allows = true,
                    None => {}
                }
            }
            let timed_out = Instant::now() >= self.deadline;
            let (code, why) = match dial {
                Ok(Ok(_stream)) => {
                    println!(
                        "ready: {target} answered through the mesh {:.2} s after start; the node runs in the background (pid {}, log {})",
                        self.started.elapsed().as_secs_f64(),
                        self.child.id(),
                        self.log.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(Err(e)) => {
                    refused = e
                        .downcast_ref::<api::ApiError>()
                        .is_some_and(|d| d.kind == api::ErrorKind::Refused);
                    if !timed_out {
                        if refused {
                            // A target that refuses is not going to be ready by
                            // asking faster; but it may still be starting.
                            std::thread::sleep(Duration::from_millis(250));
                        }
                        continue;
                    }
                    let code = if refused {
                        exit::TARGET_REFUSED
                    } else {
                        exit::TIMED_OUT
                    };
                    (code, format!("{target}: {e:#}"))
                }
                // This attempt ran out of time; there is time for another.
                Err(_) if !timed_out => continue,
                // Out of time: what the last attempt said decides.
                Err(_) if refused => (
                    exit::TARGET_REFUSED,
                    format!(
                        "{target} refused every connection for {} s",
                        self.timeout.as_secs()
                    ),
                ),
                Err(_) => (
                    exit::TIMED_OUT,
                    format!(
                        "no answer from {target} within {} s",
                        self.timeout.as_secs()
                    ),
                ),
            };
            return fail(&mut self.child, code, why, &self.log);
        }
    }

    /// Whether the daemon has a way to the target (a peer, or a gateway's
    /// route), or why not.
    fn routed(&self) -> Result<(), String> {
        let ip = *self.target.ip();
        match self.runtime.block_on(api::ask::<api::RouteReply>(
            self.socket,
            &ApiRequest::Route { ip },
        )) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(refusal)) => Err(refusal.to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_s_own_arguments_are_not_passed_to_the_node() {
        let args: Vec<String> = [
            "up",
            "--config",
            "ci.toml",
            "--wait-for",
            "198.19.0.10:5432",
            "--userspace",
            "--wait-timeout=10s",
            "--log-file",
            "x.log",
            "--enroll-token",
            "t",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (node_args, token) = child_args(&args);
        assert_eq!(node_args, ["up", "--config", "ci.toml", "--userspace"]);
        assert_eq!(token.as_deref(), Some("t"), "moved to the environment");
        let equals: Vec<String> = ["up", "--enroll-token=t2", "--wait-for=1.2.3.4:5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            child_args(&equals),
            (vec!["up".to_string()], Some("t2".to_string()))
        );
    }
}
