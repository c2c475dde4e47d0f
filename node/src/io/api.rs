//! The local API: a Unix socket where `tern status` (and later commands) ask
//! the running daemon questions. One JSON request per line, one JSON reply
//! per line. The socket is created 0660 in a 0700 directory (0750 with
//! `[api] group`): only the daemon's user (or its group) may ask, and the
//! CLI refuses a directory another user could write to.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ApiRequest {
    Status,
    /// A control ping to a peer (overlay address or name); answered when the
    /// pong comes back or the ping times out.
    Ping {
        peer: String,
    },
    /// Runners by label or by name, asked of every lighthouse (`tern run`).
    FindRunners {
        selector: tern_shared::control::RunnerSelector,
    },
    /// Who offers the service `name` (empty: any), asked of every
    /// lighthouse (`tern services`, `tern kubeconfig`); answered with the
    /// merged offers and this node's own groups (`my_groups`).
    Services {
        #[serde(default)]
        name: String,
    },
    /// The verified identity behind a peer's overlay address: certificate
    /// name, groups, fingerprint (`null` when no such peer is in the table).
    Peer {
        overlay_ip: std::net::Ipv4Addr,
    },
    /// Whether an address is reachable at all: a peer's, or in a subnet a
    /// gateway routes (`tern forward` checks its targets with it).
    Route {
        ip: std::net::Ipv4Addr,
    },
    /// A TCP connection into the mesh: answered with `{"ok":true}` (or an
    /// error), after which this API connection carries the bytes both ways
    /// (`tern forward`, and `tern run` against a userspace node).
    Dial {
        target: std::net::SocketAddrV4,
    },
    /// Whether the peer in front of `target` (the peer, or the gateway in
    /// use) lets this node open TCP to it: answered with that peer's own
    /// verdict (`tern up --wait-for` tells "denied by policy" so).
    Policy {
        target: std::net::SocketAddrV4,
    },
    /// `tern down`: leave the mesh and stop.
    Shutdown,
    /// The node's Prometheus metrics, as `{"text": "..."}` (what
    /// `[metrics] listen` serves at /metrics).
    Metrics,
    /// `tern resolve`: a name's records of one type (A, AAAA, SRV, TXT,
    /// ...), through the mesh or the system's resolvers; answered with a
    /// [`ResolveReply`].
    Resolve {
        name: String,
        #[serde(default = "a_record")]
        rtype: String,
    },
    /// `Dial` to a host name (resolved as `Resolve` does, A records) and
    /// port (`tern forward LOCAL=NAME:PORT`).
    DialName {
        host: String,
        port: u16,
    },
    /// `Dial` to a `[[services]]` entry by name: to one of the nodes
    /// offering it that this node may call, spread and failed over (see
    /// `balance.rs`); `tern forward LOCAL=service:NAME`.
    DialService {
        name: String,
    },
    /// A forward that lives as long as the daemon (as `[[forwards]]` does):
    /// `listen` (loopback; port 0 or absent: any free port) to `target`
    /// (as `[[forwards]] target`). Asked again for the same target without
    /// `listen`, the one running is answered. Answered with a
    /// [`ForwardReply`]; `tern kubeconfig` asks for one.
    Forward {
        target: String,
        #[serde(default)]
        listen: Option<std::net::SocketAddr>,
    },
}

/// The answer to [`ApiRequest::Forward`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardReply {
    pub listen: std::net::SocketAddr,
    pub target: String,
    /// It ran already (asked before for the same target).
    pub existing: bool,
}

fn a_record() -> String {
    "A".into()
}

/// `tern resolve`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveReply {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    /// "NOERROR", "NXDOMAIN", "REFUSED", "SERVFAIL", ...
    pub rcode: String,
    pub records: Vec<tern_node_core::dns::RecordSummary>,
    /// Who answered: "gateway gw-1 (zone internal)", "mesh (certificate of
    /// gw-1)", "upstream 198.18.0.53:53".
    pub source: String,
    pub elapsed_ms: f64,
}

/// A request and where its answer goes, handed to the event loop.
pub type ApiCall = (ApiRequest, oneshot::Sender<serde_json::Value>);

/// The socket path: the configured one, else `/run/tern/<tun name>.sock`.
pub fn socket_path(configured: Option<&Path>, tun_name: &str) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("/run/tern/{tun_name}.sock")))
}

/// The socket path for a node config: `[api] socket`, else
/// `/run/tern/<tun name>.sock`, except for a userspace node run without
/// root, which cannot write there: `$XDG_RUNTIME_DIR/tern/<tun name>.sock`
/// or `/tmp/tern-<uid>/<tun name>.sock`.
pub fn socket_path_for(config: &tern_shared::config::NodeConfig) -> PathBuf {
    if config.api.socket.is_none()
        && config.tun.mode == tern_shared::config::TunMode::Userspace
        && !nix::unistd::geteuid().is_root()
    {
        return user_socket_dir().join(format!("{}.sock", config.tun.name));
    }
    socket_path(config.api.socket.as_deref(), &config.tun.name)
}

/// Where a userspace node run without root keeps its socket:
/// `$XDG_RUNTIME_DIR/tern`, else `/tmp/tern-<uid>`.
fn user_socket_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("tern"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/tern-{}", nix::unistd::geteuid())))
}

/// The socket a command given neither `--socket` nor `--config` talks to:
/// the one a node started without `[api] socket` chose for this user. Root
/// finds `/run/tern/tern0.sock`; another user finds its own rootless
/// userspace node (see [`socket_path_for`]) if one runs, else a root
/// node's `/run/tern/tern0.sock` (open to it with `[api] group`), else
/// names its own (the error then says no node runs there).
pub fn default_socket_path() -> PathBuf {
    choose_default_socket(
        nix::unistd::geteuid().is_root(),
        &user_socket_dir().join("tern0.sock"),
        |p| p.exists(),
    )
}

fn choose_default_socket(root: bool, user: &Path, exists: impl Fn(&Path) -> bool) -> PathBuf {
    let system = socket_path(None, "tern0");
    if root {
        system
    } else if exists(user) || !exists(&system) {
        user.to_path_buf()
    } else {
        system
    }
}

/// How the API server opens connections into the mesh (`Dial`,
/// `DialName`, `DialService`) and runs the forwards it is asked for.
#[derive(Clone)]
pub struct Dialing {
    pub dialer: super::proxy::Dialer,
    pub names: super::names::NameService,
    pub services: super::balance::ServiceDialer,
    /// Forwards started through the API, by target: where they listen.
    forwards:
        std::sync::Arc<tokio::sync::Mutex<std::collections::HashMap<String, std::net::SocketAddr>>>,
}

impl Dialing {
    pub fn new(
        dialer: super::proxy::Dialer,
        names: super::names::NameService,
        services: super::balance::ServiceDialer,
    ) -> Dialing {
        Dialing {
            dialer,
            names,
            services,
            forwards: Default::default(),
        }
    }

    /// A connection to `target` in the mesh.
    pub async fn connect(
        &self,
        target: &tern_shared::dns::ForwardTarget,
    ) -> Result<Box<dyn super::proxy::ByteStream>, ApiError> {
        use tern_shared::dns::ForwardTarget;
        let addr = match target {
            ForwardTarget::Addr(a) => *a,
            ForwardTarget::Name { host, port } => match self.names.lookup_v4(host).await {
                Ok(ip) => std::net::SocketAddrV4::new(ip, *port),
                Err(why) => return Err(ApiError::new(ErrorKind::NotResolved, why)),
            },
            ForwardTarget::Service { name } => {
                return self.services.connect(name).await.map(|(stream, _)| stream)
            }
        };
        self.dialer
            .connect(addr)
            .await
            .map_err(|e| ApiError::new(dial_error_kind(&e), e.to_string()))
    }

    /// [`ApiRequest::Forward`]: starts it (or finds it running).
    async fn forward(
        &self,
        target: &str,
        listen: Option<std::net::SocketAddr>,
    ) -> Result<ForwardReply, ApiError> {
        let parsed: tern_shared::dns::ForwardTarget = target
            .parse()
            .map_err(|e: String| ApiError::new(ErrorKind::Other, e))?;
        let mut forwards = self.forwards.lock().await;
        if let (None, Some(listen)) = (listen, forwards.get(target)) {
            return Ok(ForwardReply {
                listen: *listen,
                target: target.to_string(),
                existing: true,
            });
        }
        let listen = listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        if !listen.ip().is_loopback() {
            return Err(ApiError::new(
                ErrorKind::Other,
                format!("{listen} is not a loopback address; forwards serve this machine only"),
            ));
        }
        let listener = super::proxy::bind(listen, "forward")
            .await
            .map_err(|e| ApiError::new(ErrorKind::Other, format!("{e:#}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| ApiError::new(ErrorKind::Other, e.to_string()))?;
        tracing::info!(listen = %bound, %target, "forwarding (asked through the API)");
        tokio::spawn(super::proxy::serve_forward(listener, parsed, self.clone()));
        forwards.insert(target.to_string(), bound);
        Ok(ForwardReply {
            listen: bound,
            target: target.to_string(),
            existing: false,
        })
    }
}

/// Binds the socket (mode 0660, and `group`'s when given) and serves it
/// until the returned guard is dropped. `Dial` requests are served here,
/// with `dialing`; everything else goes to the event loop.
pub fn serve(
    path: &Path,
    group: Option<&str>,
    calls: mpsc::Sender<ApiCall>,
    dialing: Dialing,
) -> anyhow::Result<SocketGuard> {
    let listener = tern_udp::api_socket::bind(path, group)?;
    // A node runs here now: what the last one said when it stopped is old.
    let _ = std::fs::remove_file(stop_note_path(path));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let calls = calls.clone();
            let dialing = dialing.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, calls, dialing).await {
                    tracing::debug!(error = %e, "API connection failed");
                }
            });
        }
    });
    Ok(SocketGuard {
        path: path.to_path_buf(),
        task,
    })
}

async fn answer(
    stream: UnixStream,
    calls: mpsc::Sender<ApiCall>,
    dialing: Dialing,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line.len() > 4096 {
            anyhow::bail!("request too long");
        }
        let request = serde_json::from_str::<ApiRequest>(&line);
        if let Ok(ApiRequest::Resolve { name, rtype }) = &request {
            let reply = resolve(&dialing.names, name, rtype).await;
            let mut bytes = serde_json::to_vec(&reply)?;
            bytes.push(b'\n');
            write.write_all(&bytes).await?;
            continue;
        }
        if let Ok(ApiRequest::Forward { target, listen }) = &request {
            let reply = match dialing.forward(target, *listen).await {
                Ok(r) => serde_json::to_value(r).unwrap_or_default(),
                Err(e) => e.to_value(),
            };
            let mut bytes = serde_json::to_vec(&reply)?;
            bytes.push(b'\n');
            write.write_all(&bytes).await?;
            continue;
        }
        use tern_shared::dns::ForwardTarget;
        let target = match request {
            Ok(ApiRequest::Dial { target }) => Some(ForwardTarget::Addr(target)),
            Ok(ApiRequest::DialName { ref host, port }) => Some(ForwardTarget::Name {
                host: host.clone(),
                port,
            }),
            Ok(ApiRequest::DialService { ref name }) => {
                Some(ForwardTarget::Service { name: name.clone() })
            }
            _ => None,
        };
        if let Some(target) = target {
            let remote = match dialing.connect(&target).await {
                Ok(r) => r,
                Err(e) => {
                    let reply = e.to_value();
                    let mut bytes = serde_json::to_vec(&reply)?;
                    bytes.push(b'\n');
                    write.write_all(&bytes).await?;
                    return Ok(());
                }
            };
            write.write_all(b"{\"ok\":true}\n").await?;
            // What the client sent after its request line belongs to the target.
            let early = reader.buffer().to_vec();
            let stream = reader.into_inner().reunite(write)?;
            let mut remote = remote;
            if !early.is_empty() {
                remote.write_all(&early).await?;
            }
            super::proxy::splice(stream, remote).await;
            return Ok(());
        }
        let reply = match request {
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                calls.send((req, tx)).await.ok();
                rx.await.unwrap_or_else(|_| {
                    ApiError::new(ErrorKind::Stopping, "daemon is stopping").to_value()
                })
            }
            Err(e) => ApiError::new(ErrorKind::Other, format!("bad request: {e}")).to_value(),
        };
        let mut bytes = serde_json::to_vec(&reply)?;
        bytes.push(b'\n');
        write.write_all(&bytes).await?;
    }
}

/// `tern resolve` in the daemon: the answer and who gave it, timed.
async fn resolve(names: &super::names::NameService, name: &str, rtype: &str) -> serde_json::Value {
    let qtype = match tern_node_core::dns::record_type(rtype) {
        Ok(t) => t,
        Err(e) => return ApiError::new(ErrorKind::Other, e).to_value(),
    };
    let started = std::time::Instant::now();
    let resolved = match names.resolve(name, qtype).await {
        Ok(r) => r,
        Err(e) => return ApiError::new(ErrorKind::NotResolved, e).to_value(),
    };
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let Some(summary) = tern_node_core::dns::summarize(&resolved.answer) else {
        return ApiError::new(
            ErrorKind::NotResolved,
            format!(
                "{} answered with something that is not a DNS answer",
                resolved.source
            ),
        )
        .to_value();
    };
    serde_json::to_value(ResolveReply {
        name: name.to_string(),
        rtype: qtype.to_string(),
        rcode: summary.rcode,
        records: summary.records,
        source: resolved.source,
        elapsed_ms,
    })
    .unwrap_or_default()
}

/// Client side of `Dial`: a connection to `target` through the daemon, as a
/// byte stream.
pub async fn dial(path: &Path, target: std::net::SocketAddrV4) -> anyhow::Result<UnixStream> {
    dial_request(path, &ApiRequest::Dial { target }).await
}

/// Client side of `DialService`: as [`dial`], to a node offering the
/// service `name`.
pub async fn dial_service(path: &Path, name: &str) -> anyhow::Result<UnixStream> {
    let request = ApiRequest::DialService {
        name: name.to_string(),
    };
    dial_request(path, &request).await
}

/// Client side of `DialName`: as [`dial`], to a host name the daemon
/// resolves for this connection.
pub async fn dial_name(path: &Path, host: &str, port: u16) -> anyhow::Result<UnixStream> {
    let request = ApiRequest::DialName {
        host: host.to_string(),
        port,
    };
    dial_request(path, &request).await
}

async fn dial_request(path: &Path, request: &ApiRequest) -> anyhow::Result<UnixStream> {
    let mut stream = connect(path).await?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    // Read the answer a byte at a time: what follows it is the target's.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await?;
        if n == 0 {
            anyhow::bail!("the daemon closed the connection without answering");
        }
        if byte[0] == b'\n' {
            break;
        }
        answer.push(byte[0]);
        if answer.len() > 4096 {
            anyhow::bail!("the daemon's answer is too long");
        }
    }
    let reply: serde_json::Value = serde_json::from_slice(&answer)?;
    if reply.get("error").is_some() {
        let refusal: ApiError = serde_json::from_value(reply)?;
        return Err(refusal.into());
    }
    Ok(stream)
}

/// What kind of refusal an API reply carries (its `kind` field), so that a
/// client decides by kind, not by reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The target answered with a RST.
    Refused,
    /// No answer in time.
    TimedOut,
    /// Nothing routes there: no peer, no gateway's subnet (or no socket
    /// could be bound to the TUN device).
    NoRoute,
    /// The address is this node's own.
    ThisNode,
    /// Not in the overlay network.
    NotInOverlay,
    /// No peer by that name in the table.
    UnknownName,
    /// No lighthouse connected yet.
    NoLighthouse,
    /// No usable gateway, or no session with the peer in front.
    NoSession,
    /// The daemon is stopping.
    Stopping,
    /// A name did not resolve (no gateway serves its zone, no answer).
    NotResolved,
    /// This node's certificate lacks a group the target requires (a
    /// service's `groups`).
    Denied,
    #[default]
    Other,
}

/// The answer to [`ApiRequest::Services`]: the offers every lighthouse
/// asked gave, merged, and this node's own groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServicesReply {
    pub services: Vec<tern_shared::control::ServiceEntry>,
    pub asked: usize,
    pub answered: usize,
    #[serde(default)]
    pub incomplete: bool,
    #[serde(default)]
    pub my_groups: Vec<String>,
}

/// A reply the daemon refused with: `{"error": MESSAGE, "kind": KIND}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{error}")]
pub struct ApiError {
    pub error: String,
    #[serde(default)]
    pub kind: ErrorKind,
}

impl ApiError {
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> ApiError {
        ApiError {
            error: error.into(),
            kind,
        }
    }

    /// The reply as the API sends it.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

impl From<tern_node_core::node::CoreError> for ApiError {
    fn from(e: tern_node_core::node::CoreError) -> ApiError {
        use tern_node_core::node::CoreError as E;
        let kind = match &e {
            E::ThisNode(_) => ErrorKind::ThisNode,
            E::NotInOverlay { .. } => ErrorKind::NotInOverlay,
            E::UnknownName(_) => ErrorKind::UnknownName,
            E::NoLighthouse => ErrorKind::NoLighthouse,
            E::NoRoute(_) | E::Unreachable { .. } => ErrorKind::NoRoute,
            E::NoGateway(_) | E::NoSession { .. } => ErrorKind::NoSession,
            E::Encode(_) => ErrorKind::Other,
        };
        ApiError::new(kind, e.to_string())
    }
}

/// The answer to [`ApiRequest::Status`]: the core's status, and which
/// mode and process answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReply {
    #[serde(flatten)]
    pub status: tern_node_core::node::NodeStatus,
    pub mode: tern_shared::config::TunMode,
    /// `tern up --wait-for` reports only the node it started.
    pub pid: u32,
}

/// The answer to [`ApiRequest::Route`]: there is a way, in this mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteReply {
    pub ok: bool,
    pub mode: tern_shared::config::TunMode,
}

/// A reply that is `T`, or the daemon's refusal.
pub fn decode<T: serde::de::DeserializeOwned>(
    reply: serde_json::Value,
) -> anyhow::Result<Result<T, ApiError>> {
    if reply.get("error").is_some() {
        return Ok(Err(
            serde_json::from_value(reply).context("the daemon's refusal does not read as one")?
        ));
    }
    serde_json::from_value(reply).map(Ok).context(
        "the daemon's answer does not read as expected (is it the same version as this tern?)",
    )
}

/// Client side: one request, its typed answer or the daemon's refusal.
pub async fn ask<T: serde::de::DeserializeOwned>(
    path: &Path,
    request: &ApiRequest,
) -> anyhow::Result<Result<T, ApiError>> {
    decode(call(path, request).await?)
}

/// Removes the socket file when the daemon stops.
pub struct SocketGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    // What goes over this socket (a pipeline's secrets too) must not reach
    // a socket another user put in place of the daemon's.
    if let Err(e) = tern_udp::api_socket::check_before_connect(path) {
        let missing = e.kind() == std::io::ErrorKind::NotFound;
        return Err(e).with_context(|| {
            if missing {
                format!(
                    "connecting to the daemon's API socket {} (is `tern up` running with this config?)",
                    path.display()
                )
            } else {
                format!("the daemon's API socket {}", path.display())
            }
        });
    }
    match UnixStream::connect(path).await {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "the daemon's API socket {} is not open to this user ({e}); run as root, or set \
             [api] group in the node's config to a group of this user and restart the node",
            path.display()
        ),
        Err(e) => {
            if let Some(note) = read_stop_note(path) {
                anyhow::bail!(
                    "no node runs on the API socket {}: the last one stopped at {} with exit code {}: {}",
                    path.display(),
                    note.stopped_at,
                    note.exit_code,
                    note.reason
                );
            }
            Err(e).with_context(|| {
                format!(
                    "connecting to the daemon's API socket {} (is `tern up` running with this config?)",
                    path.display()
                )
            })
        }
    }
}

/// Why the last node on a socket stopped, when it stopped for a reason a
/// person must act on (its certificate revoked): written beside the socket
/// as `<socket name>.stopped` (mode 0600) as it stops, read by every
/// command that finds no node there (`tern status` says "revoked"), and
/// removed when a node binds the socket again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopNote {
    /// RFC 3339.
    pub stopped_at: String,
    pub exit_code: u8,
    pub reason: String,
}

fn stop_note_path(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".stopped");
    socket.with_file_name(name)
}

/// Leaves `note` beside the socket (best effort: the node is stopping, and
/// its log says the same).
pub fn write_stop_note(socket: &Path, note: &StopNote) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = stop_note_path(socket);
    let _ = std::fs::remove_file(&path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            let mut bytes = serde_json::to_vec(note).unwrap_or_default();
            bytes.push(b'\n');
            f.write_all(&bytes)
        });
    if let Err(e) = written {
        tracing::debug!(path = %path.display(), error = %e, "stop note not written");
    }
}

/// The note the last node left, if any and if it reads as one (a file of
/// another shape, or one larger than a note can be, is ignored).
fn read_stop_note(socket: &Path) -> Option<StopNote> {
    let path = stop_note_path(socket);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > 4096 {
        return None;
    }
    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
}

/// Reads the answer to [`ApiRequest::Policy`]: whether the peer in front of
/// the target lets this node in, and who decided by which rule ("gw-1's
/// inbound rule-2/reject"). `None` when the answer says neither (no
/// session yet, no answer in time).
pub fn policy_verdict(reply: &tern_node_core::node::PolicyResult) -> Option<(bool, String)> {
    let answer = reply.answer.as_ref()?;
    let who = reply.asked.as_deref().unwrap_or("the peer");
    Some((answer.allowed, format!("{who}'s {}", answer.reason)))
}

/// Client side: sends one request and returns the reply.
pub async fn call(path: &Path, request: &ApiRequest) -> anyhow::Result<serde_json::Value> {
    let stream = connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = BufReader::new(read).lines();
    let reply = lines
        .next_line()
        .await?
        .context("the daemon closed the API connection without answering")?;
    Ok(serde_json::from_str(&reply)?)
}

/// What kind of failure a dial through the userspace stack was, as the
/// API tells a client.
fn dial_error_kind(e: &super::userspace::DialError) -> ErrorKind {
    use super::userspace::DialError;
    match e {
        DialError::Refused(_) => ErrorKind::Refused,
        DialError::TimedOut(..) => ErrorKind::TimedOut,
        DialError::NoRoute(_) => ErrorKind::NoRoute,
        DialError::Stopped => ErrorKind::Stopping,
        DialError::TooMany => ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode_as_their_types_and_refusals_keep_their_kind() {
        let route = serde_json::json!({ "ok": true, "mode": "userspace" });
        let route = decode::<RouteReply>(route)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(route.ok);
        let refusal = ApiError::from(tern_node_core::node::CoreError::NoLighthouse).to_value();
        let err = decode::<RouteReply>(refusal)
            .unwrap_or_else(|e| panic!("{e}"))
            .err()
            .unwrap_or_else(|| panic!("a refusal"));
        assert_eq!(err.kind, ErrorKind::NoLighthouse);
        assert!(
            err.error.contains("no lighthouse is connected yet"),
            "{err}"
        );
        // An older daemon's refusal, without a kind, is still one.
        let old = serde_json::json!({ "error": "daemon is stopping" });
        let err = decode::<RouteReply>(old)
            .unwrap_or_else(|e| panic!("{e}"))
            .err()
            .unwrap_or_else(|| panic!("a refusal"));
        assert_eq!(err.kind, ErrorKind::Other);
        // A reply of another shape is an error that says so, not a panic.
        let odd = serde_json::json!({ "ok": "yes" });
        let e = decode::<RouteReply>(odd)
            .err()
            .unwrap_or_else(|| panic!("odd"));
        assert!(
            format!("{e:#}").contains("does not read as expected"),
            "{e:#}"
        );
    }

    #[test]
    fn a_command_without_config_finds_the_node_this_user_would_have_started() {
        let user = Path::new("/run/user/1000/tern/tern0.sock");
        let system = Path::new("/run/tern/tern0.sock");
        let only = |there: Vec<&'static Path>| move |p: &Path| there.contains(&p);
        // Root: the system socket, whatever else exists.
        assert_eq!(choose_default_socket(true, user, only(vec![user])), system);
        // Another user: its own rootless node first...
        assert_eq!(
            choose_default_socket(false, user, only(vec![user, system])),
            user
        );
        // ... else a root node's socket (open with [api] group) ...
        assert_eq!(
            choose_default_socket(false, user, only(vec![system])),
            system
        );
        // ... else its own, which the error names.
        assert_eq!(choose_default_socket(false, user, only(vec![])), user);
    }

    #[tokio::test]
    async fn a_command_finding_no_node_says_why_the_last_one_stopped() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = tmp.path().join("run/tern0.sock");
        tern_udp::api_socket::prepare_dir(&path, None).unwrap_or_else(|e| panic!("{e}"));
        let err = format!(
            "{:#}",
            call(&path, &ApiRequest::Status)
                .await
                .err()
                .unwrap_or_else(|| panic!("answered"))
        );
        assert!(err.contains("is `tern up` running"), "{err}");
        let note = StopNote {
            stopped_at: "2026-12-06T16:00:00Z".into(),
            exit_code: 76,
            reason: "this node's certificate was revoked".into(),
        };
        write_stop_note(&path, &note);
        assert_eq!(read_stop_note(&path), Some(note));
        let err = format!(
            "{:#}",
            call(&path, &ApiRequest::Status)
                .await
                .err()
                .unwrap_or_else(|| panic!("answered"))
        );
        assert!(err.contains("the last one stopped at 2026-12-06T16:00:00Z with exit code 76: this node's certificate was revoked"), "{err}");
        // Garbage in the file is no note.
        std::fs::write(stop_note_path(&path), b"\x00{not json").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_stop_note(&path), None);
        write_stop_note(
            &path,
            &StopNote {
                stopped_at: "x".into(),
                exit_code: 76,
                reason: "r".into(),
            },
        );
        // A node binding the socket again removes it.
        let (calls, _rx) = mpsc::channel(1);
        let (dns_calls, _dns_rx) = mpsc::channel(1);
        let dialer = super::super::proxy::Dialer::Kernel {
            device: "tern-test0".into(),
        };
        let services = super::super::balance::ServiceDialer::new(calls.clone(), dialer.clone());
        let names = super::super::names::NameService::new(dns_calls, Default::default());
        let guard = serve(&path, None, calls, Dialing::new(dialer, names, services));
        let _guard = guard.unwrap_or_else(|e| panic!("{e}"));
        assert!(!stop_note_path(&path).exists());
    }

    #[tokio::test]
    async fn call_refuses_a_socket_in_a_directory_others_can_write() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path().join("tern-1000");
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("{e}"));
        // Someone else's listener, waiting for what the CLI sends.
        let path = dir.join("tern0.sock");
        let _planted = tokio::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            call(&path, &ApiRequest::Status),
        );
        let err = match answer.await {
            Err(_) => panic!("the request went to the planted socket"),
            Ok(Ok(reply)) => panic!("answered through a planted socket: {reply}"),
            Ok(Err(e)) => format!("{e:#}"),
        };
        assert!(err.contains("refusing the API socket directory"), "{err}");
        assert!(err.contains(&format!("{}", dir.display())), "{err}");
        assert!(err.contains("writable by group or others"), "{err}");
    }
}
