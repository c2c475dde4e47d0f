//! The admin API over HTTP/1.1 (hyper), on the lighthouse's overlay
//! address through the mesh ([`AdminListener`]: a userspace TCP/IP stack,
//! `tern-netstack`, fed by the core with TCP to `[admin] port` from a
//! peer's own address; the caller is that peer's verified certificate, its
//! groups checked against `[admin] groups` and `read_groups`), and on the
//! lighthouse's Unix API socket: a connection whose first byte is `{` speaks the old JSON lines
//! (`{"cmd":"status"}`, what `tern-lighthouse status` sends); any other
//! speaks HTTP, so `curl --unix-socket /run/tern-lighthouse.sock
//! http://lighthouse/api/v1/nodes` works on the lighthouse's host. The
//! socket's file permissions decide who may connect (`[api] group`);
//! whoever connects may read and act. What a request means is decided in
//! `tern_lighthouse_core::admin`; the registry's part is answered by the
//! event loop (the one owner of the core), the store's on a blocking
//! thread (`crate::ops`, what the command line does too). Every write is
//! audited: one JSON line in the log (target `tern_lighthouse::audit`).

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use ipnet::Ipv4Net;
use tern_lighthouse_core::admin::{self, AdminRequest, ApiError, ErrorKind, API_PREFIX};
use tern_lighthouse_core::lighthouse::LighthouseCore;
use tern_netstack::{Conn, Netstack};
use tern_shared::admin::{Access, AdminConfig};
use tern_udp::daemon::unix_now;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};

use super::console::{self as console_io, Body, Console, ConsoleData, ConsoleQuery};
use crate::ops;

/// What the API asks of the event loop, the core's one owner.
pub enum LoopCall {
    /// The status `tern-lighthouse status` prints.
    Status(oneshot::Sender<serde_json::Value>),
    /// A page of registered nodes, gateways or runners (the request says
    /// which), as JSON.
    List {
        request: AdminRequest,
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// What a console page shows of the registry.
    Console {
        query: ConsoleQuery,
        reply: oneshot::Sender<ConsoleData>,
    },
}

/// The OpenAPI document of the admin API (served as is; the tests hold
/// the real answers to it).
pub const OPENAPI: &str = include_str!("openapi.json");

/// The registry's part of a request, answered by the event loop (the core's
/// one owner): a page of what it asks for.
pub fn list(core: &LighthouseCore, request: &AdminRequest, now: Instant) -> serde_json::Value {
    match *request {
        AdminRequest::Nodes {
            after,
            limit,
            ref filter,
        } => to_value(&core.admin_nodes(filter, after, limit, now)),
        AdminRequest::Gateways { after, limit } => {
            to_value(&core.admin_gateways(after, limit, now))
        }
        AdminRequest::Runners { after, limit } => to_value(&core.admin_runners(after, limit, now)),
        _ => serde_json::Value::Null,
    }
}

/// Who is asking, for the access check and the audit log.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A process on the lighthouse's host, through the Unix socket (the
    /// socket's permissions let it in: it may read and act).
    Local { uid: Option<u32> },
    /// A peer through the mesh: the certificate this lighthouse verified
    /// for the session its connection came over.
    Peer {
        name: String,
        overlay_ip: Ipv4Addr,
        fingerprint: String,
        groups: Vec<String>,
        access: Access,
    },
}

impl Caller {
    pub(super) fn access(&self) -> Access {
        match self {
            Caller::Local { .. } => Access::Write,
            Caller::Peer { access, .. } => *access,
        }
    }

    fn audit_fields(&self) -> serde_json::Value {
        match self {
            Caller::Local { uid } => serde_json::json!({
                "caller": match uid {
                    Some(u) => format!("local uid {u}"),
                    None => "local".to_string(),
                },
                "via": "api socket",
            }),
            Caller::Peer {
                name,
                overlay_ip,
                fingerprint,
                groups,
                ..
            } => serde_json::json!({
                "caller": name,
                "overlay_ip": overlay_ip.to_string(),
                "fingerprint": fingerprint,
                "groups": groups,
                "via": "mesh",
            }),
        }
    }

    /// The 403 for a request this caller may not make, naming the groups
    /// that would let it.
    pub(super) fn refusal(&self, write: bool, config: &AdminConfig) -> ApiError {
        let (name, groups) = match self {
            Caller::Peer { name, groups, .. } => (name.as_str(), groups.join(",")),
            Caller::Local { .. } => ("local", String::new()),
        };
        let (what, key, needed) = if write {
            ("act on", "groups", config.groups.join(", "))
        } else {
            ("read", "read_groups", config.read_groups.join(", "))
        };
        let groups = if groups.is_empty() {
            "no groups".to_string()
        } else {
            format!("groups {groups}")
        };
        ApiError::new(
            ErrorKind::Forbidden,
            format!(
                "{name} ({groups}) may not {what} the admin API: it needs one of the groups {needed} ([admin] {key})"
            ),
        )
    }
}

/// What every connection's requests need.
pub struct Admin {
    pub(super) calls: mpsc::Sender<LoopCall>,
    pub(super) config_path: PathBuf,
    pub(super) config: AdminConfig,
    pub(super) console: Console,
    /// Requests refused because the caller's groups do not allow them.
    pub refused: AtomicU64,
}

impl Admin {
    pub fn new(
        calls: mpsc::Sender<LoopCall>,
        config_path: &Path,
        config: &AdminConfig,
        console: Console,
    ) -> Arc<Admin> {
        Arc::new(Admin {
            calls,
            config_path: config_path.to_path_buf(),
            config: config.clone(),
            console,
            refused: AtomicU64::new(0),
        })
    }
}

/// Connections to the overlay address's admin port, through the mesh:
/// the stack that terminates them, fed by the core.
pub struct AdminListener {
    stack: Netstack,
    conns: mpsc::Receiver<Conn>,
    wake: Arc<Notify>,
}

/// Bytes each way per admin connection, and most at once: an admin API
/// needs little, and the lighthouse's memory is for its nodes.
const ADMIN_TCP_BUFFER: usize = 64 * 1024;
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The stack's MTU: a node's default TUN MTU.
const ADMIN_MTU: u16 = 1420;

impl AdminListener {
    /// Listens on `[admin] port` of `overlay` (the lighthouse's address and
    /// the mesh's prefix); None when the port is 0. The connections come
    /// out of the returned receiver.
    pub fn start(
        core: &mut LighthouseCore,
        overlay: Ipv4Net,
        config: &AdminConfig,
        seed: u64,
    ) -> Option<AdminListener> {
        if config.port == 0 {
            core.set_admin_port(None);
            return None;
        }
        let mut stack = Netstack::new(overlay, ADMIN_MTU, Vec::new(), seed)
            .with_limits(ADMIN_TCP_BUFFER, ADMIN_MAX_CONNECTIONS);
        let conns = stack.listen(config.port);
        core.set_admin_port(Some(config.port));
        tracing::info!(address = %overlay.addr(), port = config.port, groups = %config.groups.join(","), read_groups = %config.read_groups.join(","), "admin API on the overlay address, through the mesh");
        let wake = stack.wake();
        Some(AdminListener { stack, conns, wake })
    }

    /// Moves packets both ways between the core and the stack.
    pub fn pump(&mut self, core: &mut LighthouseCore, now: Instant) {
        while let Some(p) = core.poll_admin_packet() {
            self.stack.handle_inbound(&p, now);
        }
        self.stack.poll(now, &|_| Ok(()));
        while let Some(p) = self.stack.poll_outbound() {
            core.send_admin_packet(&p, now);
        }
    }

    /// When the stack wants polling again (its timers).
    pub fn poll_delay(&mut self) -> Option<Duration> {
        self.stack.poll_delay()
    }
}

/// What the event loop waits for from the admin listener: a new
/// connection, or the stack having work (None; the loop pumps it after
/// every step). Never, without a listener.
pub async fn next_event(listener: Option<&mut AdminListener>) -> Option<Conn> {
    let Some(l) = listener else {
        return std::future::pending().await;
    };
    tokio::select! {
        conn = l.conns.recv() => conn,
        () = l.wake.notified() => None,
    }
}

/// A connection through the mesh: who it is from, then its requests.
pub fn accept(admin: &Arc<Admin>, core: &LighthouseCore, conn: Conn) {
    let ip = *conn.peer.ip();
    let Some(cert) = core.peer_identity(ip) else {
        tracing::debug!(%ip, "admin connection from an address with no verified certificate; closed");
        return;
    };
    let groups = cert.groups().to_vec();
    let caller = Caller::Peer {
        name: cert.name().to_string(),
        overlay_ip: ip,
        fingerprint: cert.fingerprint().to_string(),
        access: admin.config.access(&groups),
        groups,
    };
    tokio::spawn(serve_http(admin.clone(), caller, conn.into_stream()));
}

/// Serves one connection on the API socket: JSON lines or HTTP, told by
/// its first byte.
pub async fn serve_socket_connection(admin: Arc<Admin>, stream: UnixStream) {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let first = match read.fill_buf().await {
        Ok([]) | Err(_) => return,
        Ok(bytes) => bytes[0],
    };
    if first == b'{' {
        let mut lines = read.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let reply = if line.contains("\"status\"") {
                let (tx, rx) = oneshot::channel();
                admin.calls.send(LoopCall::Status(tx)).await.ok();
                rx.await.unwrap_or_default()
            } else {
                serde_json::json!({"error": "unknown request; send {\"cmd\":\"status\"}, or HTTP (the admin API under /api/v1/)"})
            };
            let mut bytes = serde_json::to_vec(&reply).unwrap_or_default();
            bytes.push(b'\n');
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
        return;
    }
    let stream = tokio::io::join(read, write);
    serve_http(admin, Caller::Local { uid }, stream).await;
}

/// Serves HTTP/1.1 on `stream` for `caller` until it closes.
pub async fn serve_http<S>(admin: Arc<Admin>, caller: Caller, stream: S)
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (admin, caller) = (admin.clone(), caller.clone());
        async move { Ok::<_, Infallible>(handle(&admin, &caller, req).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "admin API connection ended");
    }
}

async fn handle(admin: &Arc<Admin>, caller: &Caller, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(hyper::header::CONTENT_TYPE);
    let api = path == API_PREFIX || path.starts_with(&format!("{API_PREFIX}/"));
    // Through the mesh, a browser is a confused deputy waiting to happen:
    // only this lighthouse's own names, and writes from its own pages.
    if let Caller::Peer { .. } = caller {
        let write = !matches!(method.as_str(), "GET" | "HEAD");
        let checked = crate::console::check_origin(
            write,
            header(hyper::header::HOST).as_deref(),
            header(hyper::header::ORIGIN).as_deref(),
            header(hyper::header::HeaderName::from_static("sec-fetch-site")).as_deref(),
            &admin.console.hosts,
        );
        if let Err(message) = checked {
            admin.refused.fetch_add(1, Ordering::Relaxed);
            if write {
                audit(caller, "request", &path, &format!("403 origin: {message}"));
            }
            return if api {
                error(&ApiError::new(ErrorKind::Forbidden, message))
            } else {
                console_io::refused_origin(admin, &message)
            };
        }
    }
    let body = match Limited::new(req.into_body(), admin::MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(&ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("the body is over {} bytes", admin::MAX_BODY),
            ))
        }
    };
    if !api {
        return console_io::handle(
            admin,
            caller,
            &method,
            &path,
            query.as_deref(),
            content_type.as_deref(),
            &body,
        )
        .await;
    }
    let request = match admin::parse(
        &method,
        &path,
        query.as_deref(),
        content_type.as_deref(),
        &body,
    ) {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    if let Err(refusal) = permit(
        admin,
        caller,
        request.is_write(),
        request.action(),
        &request.object(),
    ) {
        return error(&refusal);
    }
    let result = answer(admin, &request).await;
    if request.is_write() {
        audit(
            caller,
            request.action(),
            &request.object(),
            &outcome(&result),
        );
    }
    match result {
        Ok((status, value)) => json(status, &value),
        Err(e) => error(&e),
    }
}

/// Does what `request` asks: the registry through the event loop, the
/// store on a blocking thread.
async fn answer(
    admin: &Admin,
    request: &AdminRequest,
) -> Result<(u16, serde_json::Value), ApiError> {
    let unavailable = || ApiError::new(ErrorKind::Unavailable, "the lighthouse is stopping");
    match request {
        AdminRequest::Nodes { .. }
        | AdminRequest::Gateways { .. }
        | AdminRequest::Runners { .. } => {
            let (reply, rx) = oneshot::channel();
            admin
                .calls
                .send(LoopCall::List {
                    request: request.clone(),
                    reply,
                })
                .await
                .map_err(|_| unavailable())?;
            let mut page = rx.await.map_err(|_| unavailable())?;
            if matches!(request, AdminRequest::Nodes { .. }) {
                with_enrollments(admin, &mut page).await;
            }
            return Ok((200, page));
        }
        AdminRequest::OpenApi => {
            let doc = serde_json::from_str(OPENAPI).map_err(|_| {
                ApiError::new(ErrorKind::Internal, "the OpenAPI document is broken")
            })?;
            return Ok((200, doc));
        }
        _ => {}
    }
    let request = request.clone();
    on_store(admin, move |path| store_op(path, &request)).await
}

/// A store operation (`crate::ops`) on a blocking thread, for the API and
/// the console alike: its answer, or the API's error for why not (a
/// failure's detail goes to the log).
pub(super) async fn on_store<T: Send + 'static>(
    admin: &Admin,
    op: impl FnOnce(&Path) -> Result<T, ops::OpError> + Send + 'static,
) -> Result<T, ApiError> {
    let path = admin.config_path.clone();
    let done = tokio::task::spawn_blocking(move || op(&path))
        .await
        .map_err(|_| ApiError::new(ErrorKind::Internal, "the store's thread failed"))?;
    done.map_err(|e| {
        if let ops::OpError::Failed(err) = &e {
            tracing::error!(error = %format!("{err:#}"), "admin: the store failed");
        }
        e.to_api()
    })
}

/// Whether `caller` may make a request (a write, or a read); a refusal is
/// counted, audited when it was a write, and answered with the groups
/// that would let the caller in.
pub(super) fn permit(
    admin: &Admin,
    caller: &Caller,
    write: bool,
    action: &str,
    object: &str,
) -> Result<(), ApiError> {
    let allowed = match caller.access() {
        Access::Write => true,
        Access::Read => !write,
        Access::None => false,
    };
    if allowed {
        return Ok(());
    }
    admin.refused.fetch_add(1, Ordering::Relaxed);
    let refusal = caller.refusal(write, &admin.config);
    if write {
        audit(caller, action, object, &outcome(&Err(refusal.clone())));
    }
    Err(refusal)
}

/// Fills in each node's `enrollment` from the issuance log (one query
/// for the page); a store that cannot answer leaves them null, logged.
async fn with_enrollments(admin: &Admin, page: &mut serde_json::Value) {
    let Some(nodes) = page["nodes"].as_array_mut() else {
        return;
    };
    let fingerprints: Vec<String> = nodes
        .iter()
        .filter_map(|n| n["fingerprint"].as_str().map(str::to_string))
        .collect();
    let found = on_store(admin, move |path| ops::issued_records(path, &fingerprints)).await;
    let Ok(records) = found else {
        tracing::warn!(
            "admin API: the issuance log could not be read; nodes listed without their enrollment"
        );
        return;
    };
    let by_fingerprint: std::collections::HashMap<&str, &ops::IssuedEntry> = records
        .iter()
        .map(|r| (r.fingerprint.as_str(), r))
        .collect();
    for n in nodes {
        if let Some(r) = n["fingerprint"]
            .as_str()
            .and_then(|f| by_fingerprint.get(f))
        {
            n["enrollment"] = to_value(&r.enrollment());
        }
    }
}

fn store_op(path: &Path, request: &AdminRequest) -> Result<(u16, serde_json::Value), ops::OpError> {
    let now = unix_now();
    Ok(match request {
        AdminRequest::Tokens => (
            200,
            serde_json::json!({ "tokens": ops::list_tokens(path, now)? }),
        ),
        AdminRequest::CreateToken(t) => {
            let created = ops::create_token(path, &t.groups, &t.ttl, t.uses, &t.cert_ttl, now)?;
            (201, to_value(&created))
        }
        AdminRequest::DeleteToken { id } => {
            let id = ops::delete_token(path, id)?;
            (200, serde_json::json!({ "deleted": id }))
        }
        AdminRequest::Revocations => (
            200,
            serde_json::json!({ "revocations": ops::list_revocations(path, now)? }),
        ),
        AdminRequest::Issued { after, limit } => (
            200,
            to_value(&ops::issued_page(path, after.as_ref(), *limit)?),
        ),
        AdminRequest::Revoke(r) => (
            201,
            serde_json::json!({ "revoked": ops::revoke(path, &r.what, now)? }),
        ),
        AdminRequest::Flows(q) => {
            let (flows, sources) = ops::flows(path, q)?;
            let dropped: Vec<_> = sources.into_iter().filter(|s| s.dropped > 0).collect();
            (
                200,
                serde_json::json!({ "flows": flows, "dropped": dropped }),
            )
        }
        AdminRequest::Nodes { .. }
        | AdminRequest::Gateways { .. }
        | AdminRequest::Runners { .. }
        | AdminRequest::OpenApi => (500, serde_json::Value::Null),
    })
}

/// How an API write ended, for the audit log.
fn outcome(result: &Result<(u16, serde_json::Value), ApiError>) -> String {
    match result {
        Ok((status, _)) => format!("ok {status}"),
        Err(e) => format!(
            "{} {}",
            e.status(),
            serde_json::to_value(e.kind)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("")
        ),
    }
}

/// One JSON line per write (API or console): when, who, what, on what,
/// and how it ended.
pub(super) fn audit(caller: &Caller, action: &str, object: &str, result: &str) {
    let mut line = caller.audit_fields();
    line["time"] = tern_shared::cert::format_unix_time(unix_now()).into();
    line["action"] = action.into();
    line["object"] = object.into();
    line["result"] = result.into();
    tracing::info!(target: "tern_lighthouse::audit", audit = %line, "admin write");
}

fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn error(e: &ApiError) -> Response<Body> {
    json(e.status(), &e.to_json())
}

fn json(status: u16, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("x-content-type-options", "nosniff")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
