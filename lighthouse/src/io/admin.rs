//! The admin API over HTTP/1.1 (hyper), on the lighthouse's Unix API
//! socket: a connection whose first byte is `{` speaks the old JSON lines
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
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tern_lighthouse_core::admin::{self, AdminRequest, ApiError, ErrorKind, NodesPage};
use tern_udp::daemon::unix_now;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::ops;

/// What the API asks of the event loop, the core's one owner.
pub enum LoopCall {
    /// The status `tern-lighthouse status` prints.
    Status(oneshot::Sender<serde_json::Value>),
    /// A page of registered nodes.
    Nodes {
        after: Option<Ipv4Addr>,
        limit: usize,
        reply: oneshot::Sender<NodesPage>,
    },
}

/// Who is asking, for the audit log.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A process on the lighthouse's host, through the Unix socket.
    Local { uid: Option<u32> },
}

impl Caller {
    fn audit_fields(&self) -> serde_json::Value {
        match self {
            Caller::Local { uid } => serde_json::json!({
                "caller": match uid {
                    Some(u) => format!("local uid {u}"),
                    None => "local".to_string(),
                },
                "via": "api socket",
            }),
        }
    }
}

/// What every connection's requests need.
pub struct Admin {
    calls: mpsc::Sender<LoopCall>,
    config_path: PathBuf,
}

impl Admin {
    pub fn new(calls: mpsc::Sender<LoopCall>, config_path: &Path) -> Arc<Admin> {
        Arc::new(Admin {
            calls,
            config_path: config_path.to_path_buf(),
        })
    }
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

async fn handle(admin: &Admin, caller: &Caller, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
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
    let result = answer(admin, &request).await;
    if request.is_write() {
        audit(caller, &request, &result);
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
    if let AdminRequest::Nodes { after, limit } = request {
        let (reply, rx) = oneshot::channel();
        admin
            .calls
            .send(LoopCall::Nodes {
                after: *after,
                limit: *limit,
                reply,
            })
            .await
            .map_err(|_| unavailable())?;
        let page = rx.await.map_err(|_| unavailable())?;
        return Ok((200, to_value(&page)));
    }
    let path = admin.config_path.clone();
    let request = request.clone();
    let done = tokio::task::spawn_blocking(move || store_op(&path, &request))
        .await
        .map_err(|_| ApiError::new(ErrorKind::Internal, "the store's thread failed"))?;
    done.map_err(|e| {
        if let ops::OpError::Failed(err) = &e {
            tracing::error!(error = %format!("{err:#}"), "admin API: the store failed");
        }
        e.to_api()
    })
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
        AdminRequest::Revoke(r) => (
            201,
            serde_json::json!({ "revoked": ops::revoke(path, &r.what, now)? }),
        ),
        AdminRequest::Nodes { .. } => (500, serde_json::Value::Null),
    })
}

/// One JSON line per write: when, who, what, on what, and how it ended.
fn audit(
    caller: &Caller,
    request: &AdminRequest,
    result: &Result<(u16, serde_json::Value), ApiError>,
) {
    let mut line = caller.audit_fields();
    line["time"] = tern_shared::cert::format_unix_time(unix_now()).into();
    line["action"] = request.action().into();
    line["object"] = request.object().into();
    line["result"] = match result {
        Ok((status, _)) => format!("ok {status}").into(),
        Err(e) => format!(
            "{} {}",
            e.status(),
            serde_json::to_value(e.kind)
                .unwrap_or_default()
                .as_str()
                .unwrap_or("")
        )
        .into(),
    };
    tracing::info!(target: "tern_lighthouse::audit", audit = %line, "admin write");
}

fn to_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn error(e: &ApiError) -> Response<Full<Bytes>> {
    json(e.status(), &e.to_json())
}

fn json(status: u16, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("x-content-type-options", "nosniff")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
