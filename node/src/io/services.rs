//! `[[services]]`: HTTP APIs in the private network that this node
//! forwards to from its overlay address, with its own credential. The
//! caller is the peer whose certificate the mesh verified for the
//! connection's overlay source address; its `Authorization` never reaches
//! the upstream, which is told who is asking instead (`Tern-Caller-Name`,
//! `Tern-Caller-Groups`). A caller outside the service's groups gets 403
//! naming them, and nothing reaches the upstream. Streaming responses pass
//! as they come, and HTTP/1.1 upgrades (WebSocket) become a byte tunnel
//! both ways. Every request is one JSON line in the audit log (the path
//! without its query, never a credential). `kind = "kubernetes"`: the node
//! is its pod's ServiceAccount and impersonates the caller instead
//! (`Impersonate-User`/`-Group`, prefixed); whatever `Impersonate-*` a
//! caller sends is removed for every kind.

use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tern_runner::scheduler::Caller;
use tern_runner::server::{IdentityQuery, Incoming as Conn, Listener};
use tern_shared::services::{
    authorize, ServiceConfig, ServiceKind, Upstream, IN_CLUSTER_CA, IN_CLUSTER_TOKEN,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How long connecting to the upstream may take.
mod credentials;
use credentials::{upstream_tls, Credential, CredentialSource, TlsMaterial};

const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that belong to one hop, never forwarded as they are.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Requests by result, for the node's metrics.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub forwarded: AtomicU64,
    pub denied: AtomicU64,
    pub upstream_errors: AtomicU64,
}

/// One service, ready to forward.
struct Service {
    config: ServiceConfig,
    upstream: Upstream,
    /// The `Authorization` value the node sends upstream, if any.
    credential: Option<Credential>,
    name_header: HeaderName,
    groups_header: HeaderName,
    audit: Mutex<std::fs::File>,
    identities: mpsc::Sender<IdentityQuery>,
    counters: Arc<ServiceCounters>,
    /// For an https upstream: offering HTTP/2 and HTTP/1.1, and HTTP/1.1
    /// alone (for upgrades, which HTTP/2 carries differently).
    tls: Option<(tokio_rustls::TlsConnector, tokio_rustls::TlsConnector)>,
}

/// A running service: its name and counters; the task stops when dropped.
pub struct RunningService {
    pub name: String,
    pub counters: Arc<ServiceCounters>,
    task: tokio::task::JoinHandle<()>,
    /// HTTP connections open now (not counting upgraded tunnels).
    open: Arc<AtomicUsize>,
    /// Set when the node stops: open connections finish the request in
    /// flight and close.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl RunningService {
    /// The node is stopping: take no new connection (callers' forwards
    /// then go to another node offering the service), finish the requests
    /// in flight, close idle connections. Returns how many are open.
    pub fn stop_accepting(&self) -> usize {
        self.task.abort();
        let _ = self.stopping.send(true);
        self.open_connections()
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the lighthouses are told this node offers.
pub fn adverts(services: &[ServiceConfig]) -> Vec<tern_shared::control::AdvertisedService> {
    services
        .iter()
        .map(|s| tern_shared::control::AdvertisedService {
            name: s.name.clone(),
            kind: match s.kind {
                ServiceKind::Http => "http",
                ServiceKind::Kubernetes => "kubernetes",
            }
            .into(),
            port: s.listen,
            groups: s
                .groups
                .iter()
                .take(tern_shared::control::MAX_SERVICE_GROUPS)
                .cloned()
                .collect(),
        })
        .collect()
}

/// Starts every configured service on `overlay_ip`, each taking
/// connections from `listener(port)`.
pub async fn start(
    services: &[ServiceConfig],
    overlay_ip: Ipv4Addr,
    identities: &mpsc::Sender<IdentityQuery>,
    mut listener: impl FnMut(u16) -> Listener,
) -> anyhow::Result<Vec<RunningService>> {
    let mut running = Vec::new();
    for config in services {
        let service = Arc::new(
            Service::new(config, identities.clone())
                .with_context(|| format!("[[services]] {}", config.name))?,
        );
        let addr = SocketAddr::new(IpAddr::V4(overlay_ip), config.listen);
        let accept = match listener(config.listen) {
            Listener::Kernel => Accept::Kernel(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("[[services]] {}: binding {addr}", config.name))?,
            ),
            Listener::Streams(conns) => Accept::Streams(conns),
        };
        tracing::info!(service = %config.name, %addr, upstream = %service.upstream.authority(), tls = service.upstream.tls, groups = %tern_shared::show::list(&config.groups), "service forwarding");
        let counters = service.counters.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let (stopping, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(accept, service, open.clone(), stop));
        running.push(RunningService {
            name: config.name.clone(),
            counters,
            task,
            open,
            stopping,
        });
    }
    Ok(running)
}

enum Accept {
    Kernel(TcpListener),
    Streams(mpsc::Receiver<Conn>),
}

/// Counts one open connection while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(
    mut accept: Accept,
    service: Arc<Service>,
    open: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, peer): Conn = match &mut accept {
            Accept::Kernel(l) => match l.accept().await {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    (Box::new(s), peer)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "service accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Accept::Streams(conns) => match conns.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        let IpAddr::V4(peer_ip) = peer.ip() else {
            continue;
        };
        let service = service.clone();
        open.fetch_add(1, Ordering::Relaxed);
        let counted = OpenConnection(open.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let handler = hyper::service::service_fn(move |req| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service.handle(peer_ip, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async {
                    if stop.wait_for(|s| *s).await.is_err() {
                        // The service is gone: the connection may finish.
                        std::future::pending::<()>().await;
                    }
                } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

impl Service {
    fn new(
        config: &ServiceConfig,
        identities: mpsc::Sender<IdentityQuery>,
    ) -> anyhow::Result<Service> {
        let kubernetes = config.kind == ServiceKind::Kubernetes;
        let mut tls_material = TlsMaterial::from_config(config);
        let mut upstream_url = config.upstream.clone();
        let credential = match (&config.kubeconfig, &config.bearer_token_file, &config.basic_auth_file) {
            (Some(path), ..) => {
                let access = credentials::read_kubeconfig(path, config.kubeconfig_context.as_deref())?;
                if upstream_url.is_empty() {
                    upstream_url = access.server.clone();
                }
                tls_material.ca = access.ca.clone();
                match access.auth {
                    Some(tern_shared::kubeconfig::KubeAuth::ClientCert { cert, key }) => {
                        tls_material.client = Some((cert, key));
                        None
                    }
                    Some(_) => Some(Credential::load(CredentialSource::Kubeconfig {
                        path: path.clone(),
                        context: config.kubeconfig_context.clone(),
                    })?),
                    None => None,
                }
            }
            (None, Some(path), _) => Some(Credential::load(CredentialSource::File {
                path: path.clone(),
                basic: false,
            })?),
            (None, None, Some(path)) => Some(Credential::load(CredentialSource::File {
                path: path.clone(),
                basic: true,
            })?),
            // In a pod: its ServiceAccount.
            (None, None, None) if kubernetes => Some(
                Credential::load(CredentialSource::File {
                    path: IN_CLUSTER_TOKEN.into(),
                    basic: false,
                })
                .context(
                    "a kubernetes service without bearer_token_file or kubeconfig uses the pod's ServiceAccount token",
                )?,
            ),
            (None, None, None) => None,
        };
        let upstream = Upstream::parse(&upstream_url)
            .map_err(|e| anyhow::anyhow!("upstream {upstream_url:?}: {e}"))?;
        if let Some(dir) = config.audit_log.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the audit log's directory {}", dir.display()))?;
        }
        let audit = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&config.audit_log)
                .with_context(|| format!("opening the audit log {}", config.audit_log.display()))?
        };
        let tls = if upstream.tls {
            if kubernetes
                && config.kubeconfig.is_none()
                && tls_material.ca.is_none()
                && Path::new(IN_CLUSTER_CA).exists()
            {
                tls_material.ca = Some(tern_shared::kubeconfig::Pem::File(IN_CLUSTER_CA.into()));
            }
            Some((
                upstream_tls(&tls_material, &[b"h2", b"http/1.1"])?,
                upstream_tls(&tls_material, &[b"http/1.1"])?,
            ))
        } else {
            None
        };
        Ok(Service {
            tls,
            upstream,
            credential,
            name_header: HeaderName::try_from(config.caller_name_header.as_str())?,
            groups_header: HeaderName::try_from(config.caller_groups_header.as_str())?,
            audit: Mutex::new(audit),
            identities,
            counters: Arc::default(),
            config: config.clone(),
        })
    }

    async fn caller(&self, ip: Ipv4Addr) -> Option<Caller> {
        let (tx, rx) = oneshot::channel();
        self.identities.send((ip, tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    async fn handle(
        self: Arc<Self>,
        peer: Ipv4Addr,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut record = AuditRecord {
            service: self.config.name.clone(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            caller: None,
            started,
        };
        let Some(caller) = self.caller(peer).await else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            let why = format!("no verified certificate for {peer}");
            self.audit(&record, 403, 0, Some(&why));
            return text(StatusCode::FORBIDDEN, &why);
        };
        record.caller = Some(caller.clone());
        if let Err(why) = authorize(&self.config.groups, &caller.groups) {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            self.audit(&record, 403, 0, Some(&why));
            return text(StatusCode::FORBIDDEN, &why);
        }
        let upgrade = req.headers().get(hyper::header::UPGRADE).cloned();
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let upstream_req = match self.upstream_request(req, &caller, upgrade) {
            Ok(r) => r,
            Err(e) => {
                self.audit(&record, 400, 0, Some(&e));
                return text(StatusCode::BAD_REQUEST, &e);
            }
        };
        let mut resp = match self.send(upstream_req).await {
            Ok(r) => r,
            Err(e) => {
                self.counters
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                let why = format!(
                    "the upstream of service {} did not answer: {e}",
                    self.config.name
                );
                tracing::warn!(service = %self.config.name, error = %e, "upstream failed");
                self.audit(&record, 502, 0, Some(&why));
                return text(StatusCode::BAD_GATEWAY, &why);
            }
        };
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let status = resp.status();
        let mut out = Response::builder().status(status);
        if let Some(headers) = out.headers_mut() {
            copy_end_to_end(resp.headers(), headers);
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(headers) = out.headers_mut() {
                for h in [hyper::header::UPGRADE, hyper::header::CONNECTION] {
                    if let Some(v) = resp.headers().get(&h) {
                        headers.insert(h, v.clone());
                    }
                }
            }
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let service = self.clone();
            tokio::spawn(async move {
                let bytes = match (client_upgrade, upstream_upgrade.await) {
                    (Some(client), Ok(upstream)) => match client.await {
                        Ok(client) => tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(upstream),
                        )
                        .await
                        .map(|(up, down)| up + down)
                        .unwrap_or(0),
                        Err(_) => 0,
                    },
                    _ => 0,
                };
                service.audit(&record, 101, bytes, None);
            });
            return out
                .body(empty())
                .unwrap_or_else(|_| text(StatusCode::BAD_GATEWAY, "bad upstream answer"));
        }
        let body = AuditedBody {
            inner: resp.into_body(),
            bytes: 0,
            done: Some((self.clone(), record, status.as_u16())),
        };
        out.body(body.boxed())
            .unwrap_or_else(|_| text(StatusCode::BAD_GATEWAY, "bad upstream answer"))
    }

    /// The request as the upstream gets it: its path under the upstream's,
    /// end-to-end headers only, the caller's credentials and identity
    /// claims removed, ours added.
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        caller: &Caller,
        upgrade: Option<HeaderValue>,
    ) -> Result<Request<Incoming>, String> {
        let (parts, body) = req.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("{}{}", self.upstream.base_path, path_and_query);
        let mut out = Request::builder()
            .method(parts.method)
            .uri(uri)
            .version(hyper::Version::HTTP_11);
        let headers = out
            .headers_mut()
            .ok_or_else(|| "the request could not be rebuilt".to_string())?;
        copy_end_to_end(&parts.headers, headers);
        for h in [&self.name_header, &self.groups_header] {
            headers.remove(h);
        }
        headers.remove(hyper::header::AUTHORIZATION);
        headers.remove(hyper::header::COOKIE);
        // Whoever the caller claims to be is not who it is.
        let claims: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("impersonate-"))
            .cloned()
            .collect();
        for k in claims {
            headers.remove(k);
        }
        if let Ok(host) = HeaderValue::from_str(&self.upstream.authority()) {
            headers.insert(hyper::header::HOST, host);
        }
        if let Some(c) = &self.credential {
            headers.insert(hyper::header::AUTHORIZATION, c.value(&self.config.name));
        }
        let header = |v: String| {
            HeaderValue::from_str(&v).map_err(|_| format!("{v:?} is not a header value"))
        };
        match self.config.kind {
            ServiceKind::Http => {
                headers.insert(self.name_header.clone(), header(caller.name.clone())?);
                headers.insert(self.groups_header.clone(), header(caller.groups.join(","))?);
            }
            ServiceKind::Kubernetes => {
                let prefix = &self.config.impersonate_prefix;
                headers.insert(
                    HeaderName::from_static("impersonate-user"),
                    header(format!("{prefix}{}", caller.name))?,
                );
                for g in &caller.groups {
                    headers.append(
                        HeaderName::from_static("impersonate-group"),
                        header(format!("{prefix}{g}"))?,
                    );
                }
            }
        }
        if let Some(u) = upgrade {
            headers.insert(hyper::header::UPGRADE, u);
            headers.insert(
                hyper::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
        }
        out.body(body).map_err(|e| e.to_string())
    }

    /// Sends `req` on a new connection to the upstream: HTTP/2 when an
    /// https upstream offers it (not for an upgrade), else HTTP/1.1.
    async fn send(&self, mut req: Request<Incoming>) -> anyhow::Result<Response<Incoming>> {
        let tcp = tokio::time::timeout(
            UPSTREAM_CONNECT_TIMEOUT,
            TcpStream::connect((self.upstream.host.as_str(), self.upstream.port)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no connection within {UPSTREAM_CONNECT_TIMEOUT:?}"))??;
        let _ = tcp.set_nodelay(true);
        let Some((tls_any, tls_h1)) = &self.tls else {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            return Ok(sender.send_request(req).await?);
        };
        let name = match self.upstream.host.parse::<IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls::pki_types::ServerName::try_from(self.upstream.host.clone())?,
        };
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let tls = if upgrade { tls_h1 } else { tls_any };
        let stream = tls.connect(name, tcp).await?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            // HTTP/2: the authority in the URI, no Host header.
            let uri = format!(
                "https://{}{}",
                self.upstream.authority(),
                req.uri().path_and_query().map_or("/", |p| p.as_str())
            );
            *req.uri_mut() = uri.parse()?;
            *req.version_mut() = hyper::Version::HTTP_2;
            req.headers_mut().remove(hyper::header::HOST);
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(sender.send_request(req).await?);
        }
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender.send_request(req).await?)
    }

    /// One line in the audit log.
    fn audit(&self, r: &AuditRecord, status: u16, bytes: u64, refused: Option<&str>) {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut line = serde_json::json!({
            "time": tern_shared::cert::format_unix_time(unix),
            "service": r.service,
            "caller": r.caller.as_ref().map(|c| c.name.clone()),
            "groups": r.caller.as_ref().map(|c| c.groups.clone()),
            "fingerprint": r.caller.as_ref().map(|c| c.fingerprint.clone()),
            "method": r.method,
            "path": r.path,
            "status": status,
            "bytes": bytes,
            "duration_ms": r.started.elapsed().as_millis() as u64,
        });
        if let (Some(why), Some(obj)) = (refused, line.as_object_mut()) {
            obj.insert("refused".into(), why.into());
        }
        let mut text = line.to_string();
        text.push('\n');
        let mut file = self
            .audit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = file.write_all(text.as_bytes()) {
            tracing::warn!(service = %self.config.name, error = %e, "writing the audit log failed");
        }
    }
}

/// What the audit line says about a request, gathered as it goes.
struct AuditRecord {
    service: String,
    method: String,
    path: String,
    caller: Option<Caller>,
    started: Instant,
}

/// A response body passed on frame by frame as the upstream sends it,
/// counted; its audit line is written when it ends or is dropped.
struct AuditedBody {
    inner: Incoming,
    bytes: u64,
    done: Option<(Arc<Service>, AuditRecord, u16)>,
}

impl Body for AuditedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        if let Some((service, record, status)) = self.done.take() {
            service.audit(&record, status, self.bytes, None);
        }
    }
}

/// `from`'s headers but those of one hop.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|h| h == n) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        from.insert("x-secret-hop", HeaderValue::from_static("1"));
        from.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        from.insert("accept", HeaderValue::from_static("application/json"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.len(), 1);
        assert_eq!(to["accept"], "application/json");
    }

    /// An https upstream that speaks HTTP/2 (hyper's server, behind TLS
    /// with a CA of the test's own) gets the request over HTTP/2, with the
    /// node's token and the caller's name, from an HTTP/1.1 caller.
    #[tokio::test]
    async fn an_https_upstream_offering_http2_gets_http2() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "h2-token").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

        // The upstream: HTTP/2 only, answering with what it saw.
        let mut server_tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        server_tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_port = upstream.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = upstream.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let answer = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let seen = format!(
                            "{:?} {} auth={} caller={}",
                            req.version(),
                            req.uri(),
                            req.headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-"),
                            req.headers()
                                .get("tern-caller-name")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-"),
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(seen))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(tls), answer)
                    .await;
                });
            }
        });

        let config: ServiceConfig = toml::from_str(&format!(
            "name = \"api\"\nlisten = 9000\nupstream = \"https://127.0.0.1:{upstream_port}/base\"\n\
             bearer_token_file = \"{}\"\nupstream_ca = \"{}\"\naudit_log = \"{}\"\n",
            token.display(),
            dir.path().join("ca.pem").display(),
            dir.path().join("audit.jsonl").display()
        ))
        .unwrap();
        let (identities, mut asked) = mpsc::channel::<IdentityQuery>(4);
        tokio::spawn(async move {
            while let Some((_, reply)) = asked.recv().await {
                let _ = reply.send(Some(Caller {
                    name: "job-1".into(),
                    groups: vec!["ci".into()],
                    fingerprint: "00".repeat(32),
                }));
            }
        });
        let service = Arc::new(Service::new(&config, identities).unwrap());
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = proxy.local_addr().unwrap().port();
        let (_stopping, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(Accept::Kernel(proxy), service, Arc::default(), stop));

        let mut caller = TcpStream::connect(("127.0.0.1", proxy_port)).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        caller
            .write_all(b"GET /v1/x?y=2 HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer mine\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), caller.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains(&format!("HTTP/2.0 https://127.0.0.1:{upstream_port}/base/v1/x?y=2 auth=Bearer h2-token caller=job-1")),
            "{answer}"
        );
    }
}
