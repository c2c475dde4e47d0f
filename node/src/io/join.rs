//! Enrollment on the node: `tern up --enroll-token TOKEN` or `tern up
//! --enroll-oidc` with a config whose `[pki]` names only the CA. The node makes its key in memory (it is
//! never written anywhere), asks a lighthouse for a certificate over the
//! sealed exchange of [`tern_shared::enroll`], and verifies what it gets
//! against its own CA like any peer's certificate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tern_shared::cert::{CaPool, Cert, LIGHTHOUSE_GROUP};
use tern_shared::config::{LighthouseEntry, NodeConfig};
use tern_shared::enroll::{
    disabled_reason, enroll_hello, EnrollRequest, Sealer, ENROLL_REQUEST_MIN, MAX_ENROLL_REPLY_LEN,
    REFUSED_STORE_UNAVAILABLE, TYPE_ENROLL_CERT, TYPE_ENROLL_REPLY,
};
use tern_shared::identity::Identity;
use tern_shared::keys::NodeSecretKey;
use tern_shared::transport::{ProxyUrl, StreamTarget, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

/// How `tern up` ends when it cannot start: a documented exit code and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

/// What the node presents to enroll.
#[derive(Clone)]
pub enum Credential {
    /// A one-time token from `tern-lighthouse token create`.
    Token(String),
    /// An OIDC ID token from the CI provider.
    Oidc(String),
}

/// How `tern up` enrolls: the credential, and how long it keeps asking while
/// every lighthouse that answers says its store is unavailable.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub credential: Credential,
    pub patience: Duration,
}

/// Never printed: both are secrets.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Token(_) => "Token(..)",
            Credential::Oidc(_) => "Oidc(..)",
        })
    }
}

/// The environment variable `--enroll-oidc` reads a token from (GitLab CI's
/// `id_tokens` puts one there).
pub const OIDC_TOKEN_ENV: &str = "TERN_OIDC_TOKEN";

/// Where `--enroll-oidc` finds the job's ID token, in this order:
/// `--oidc-token-file`, the `TERN_OIDC_TOKEN` variable, and GitHub Actions'
/// token endpoint (`ACTIONS_ID_TOKEN_REQUEST_URL` and `_TOKEN`, present when
/// the job has `permissions: id-token: write`), asked for `audience`.
pub async fn oidc_token(
    file: Option<&std::path::Path>,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    let no_token = |why: String| exit(tern_shared::exit::NO_OIDC_TOKEN, why);
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| no_token(format!("--oidc-token-file {}: {e}", path.display())))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(no_token(format!(
                "--oidc-token-file {} is empty",
                path.display()
            )));
        }
        return Ok(token.to_string());
    }
    if let Ok(token) = std::env::var(OIDC_TOKEN_ENV) {
        if !token.trim().is_empty() {
            return Ok(token.trim().to_string());
        }
    }
    let (Ok(url), Ok(bearer)) = (
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL"),
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        return Err(no_token(format!(
            "--enroll-oidc found no ID token: in GitHub Actions give the job `permissions: id-token: write`; \
             in GitLab CI declare id_tokens with {OIDC_TOKEN_ENV}; elsewhere use --oidc-token-file FILE"
        )));
    };
    let audience = audience.map(str::to_string);
    tokio::task::spawn_blocking(move || github_id_token(&url, &bearer, audience.as_deref()))
        .await
        .map_err(|e| no_token(format!("asking GitHub Actions for an ID token: {e}")))?
        .map_err(no_token)
}

/// GitHub Actions' ID token endpoint: a GET with the runner's bearer token;
/// the answer is `{"value": "<JWT>"}`.
fn github_id_token(url: &str, bearer: &str, audience: Option<&str>) -> Result<String, String> {
    if !url.starts_with("https://") && !tern_shared::config::http_url_is_loopback(url) {
        return Err("ACTIONS_ID_TOKEN_REQUEST_URL is not an https URL; refusing to send the runner's token over it".into());
    }
    let mut url = url.to_string();
    if let Some(aud) = audience {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("audience=");
        url.push_str(&percent_encode(aud));
    }
    let answer = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .get(&url)
        .set("Authorization", &format!("Bearer {bearer}"))
        .set("Accept", "application/json")
        .call()
        .map_err(|e| match e {
            ureq::Error::Status(code, _) => format!(
                "GitHub Actions' ID token endpoint answered HTTP {code}; does the job have `permissions: id-token: write`?"
            ),
            other => format!("asking GitHub Actions for an ID token: {other}"),
        })?;
    let body: serde_json::Value = answer
        .into_json()
        .map_err(|e| format!("GitHub Actions' ID token answer is not JSON: {e}"))?;
    body.get("value")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or_else(|| "GitHub Actions' ID token answer has no \"value\"".into())
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const TRIES: usize = 5;
const WAIT: Duration = Duration::from_millis(800);

fn exit(code: u8, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// Trades the credential for an identity with the first lighthouse that
/// answers. While every lighthouse that answers says its store is
/// unavailable (a database failing over; nothing was spent), asks again,
/// 1 s, 2 s, 4 s ... apart, until `patience` has passed.
pub async fn enroll(config: &NodeConfig, enrollment: &Enrollment) -> anyhow::Result<Identity> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        match enroll_once(config, &enrollment.credential, unix_now()).await {
            Err(e)
                if e.downcast_ref::<Exit>()
                    .is_some_and(|x| x.code == tern_shared::exit::STORE_UNAVAILABLE) =>
            {
                let left = enrollment.patience.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(e);
                }
                let pause_now = pause.min(left);
                tracing::warn!(
                    "{e}; asking again in {:.0?} (for up to {:.0?} more)",
                    pause_now,
                    left
                );
                tokio::time::sleep(pause_now).await;
                pause *= 2;
            }
            other => return other,
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One round of [`enroll`]: every lighthouse asked once.
async fn enroll_once(
    config: &NodeConfig,
    credential: &Credential,
    now_unix: u64,
) -> anyhow::Result<Identity> {
    let ca_text = std::fs::read_to_string(&config.pki.ca)
        .map_err(|e| anyhow::anyhow!("reading [pki] ca {}: {e}", config.pki.ca.display()))?;
    let cas = Cert::all_from_pem(&ca_text)
        .map_err(|e| anyhow::anyhow!("[pki] ca {}: {e}", config.pki.ca.display()))?;
    let pool = CaPool::new(cas).map_err(|e| anyhow::anyhow!("[pki] ca: {e}"))?;
    if config.lighthouses.is_empty() {
        anyhow::bail!("enrolling needs a lighthouse: add [[lighthouses]] to the config");
    }
    // Every lighthouse is greeted at once, each from a socket of its own,
    // and asked in the order they answer: one that is down costs nothing
    // when another is up. The request (which spends the credential) goes
    // to one lighthouse at a time.
    let mut offers = tokio::task::JoinSet::new();
    for lh in &config.lighthouses {
        let endpoint = lh.endpoint;
        let route = Route::of(lh)?;
        offers.spawn(async move { (endpoint, route.offer(endpoint).await) });
    }
    let mut last = String::from("no lighthouse answered");
    let mut not_enrolling = Vec::new();
    let mut store_unavailable = Vec::new();
    while let Some(joined) = offers.join_next().await {
        let Ok((endpoint, offer)) = joined else {
            continue;
        };
        let pinned = config
            .lighthouses
            .iter()
            .find(|l| l.endpoint == endpoint)
            .and_then(|l| l.name.as_deref());
        let result = match offer {
            Ok((mut channel, offer)) => {
                enroll_with(
                    &mut channel,
                    endpoint,
                    &offer,
                    pinned,
                    &pool,
                    credential,
                    now_unix,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(identity) => return Ok(identity),
            Err(e)
                if e.downcast_ref::<Exit>()
                    .is_some_and(|x| x.code == tern_shared::exit::REFUSED) =>
            {
                return Err(e)
            }
            Err(e) => {
                tracing::warn!(lighthouse = %endpoint, "enrollment: {e:#}");
                last = format!("{endpoint}: {e:#}");
                if e.downcast_ref::<NotEnrolling>().is_some() {
                    not_enrolling.push(last.clone());
                }
                if let Some(StoreUnavailable(why)) = e.downcast_ref() {
                    store_unavailable.push(why.clone());
                }
            }
        }
    }
    // A lighthouse whose store is down spent nothing: try again shortly.
    if !store_unavailable.is_empty() {
        return Err(exit(
            tern_shared::exit::STORE_UNAVAILABLE,
            format!(
                "store unavailable: no lighthouse could enroll this node now ({}); nothing was spent, so the same credential may be tried again shortly",
                store_unavailable.join("; ")
            ),
        ));
    }
    // Every lighthouse that answered said it does not enroll: a refusal
    // with its reason, not "unreachable".
    if !not_enrolling.is_empty() {
        return Err(exit(
            tern_shared::exit::REFUSED,
            format!("no lighthouse enrolls nodes: {}", not_enrolling.join("; ")),
        ));
    }
    Err(exit(
        tern_shared::exit::UNAVAILABLE,
        format!("could not enroll with any lighthouse ({last}); check [[lighthouses]] and that the lighthouse has [enroll]"),
    ))
}

/// A lighthouse answered that it does not enroll, and why.
#[derive(Debug, thiserror::Error)]
#[error("it does not enroll nodes: {0}")]
struct NotEnrolling(String);

/// A lighthouse refused because it could not reach its store: nothing was
/// spent, another lighthouse may enroll.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StoreUnavailable(String);

/// How enrollment reaches one lighthouse: UDP, its TCP listener (through
/// the environment's proxy), or UDP first and TCP when UDP stays silent.
struct Route {
    transport: Transport,
    tcp: Option<(StreamTarget, Option<ProxyUrl>)>,
}

/// A lighthouse silent over UDP this long is asked over TCP as well.
const UDP_PATIENCE: Duration = Duration::from_millis(1000);

impl Route {
    fn of(lh: &LighthouseEntry) -> anyhow::Result<Route> {
        let tcp = match (&lh.tcp, lh.transport) {
            (Some(target), Transport::Auto | Transport::Tcp) => {
                match tern_udp::stream::proxy_from_env(target) {
                    Ok(proxy) => Some((target.clone(), proxy)),
                    Err(e) if lh.transport == Transport::Tcp => anyhow::bail!("{e}"),
                    Err(e) => {
                        tracing::warn!(lighthouse = %lh.endpoint, "{e}; enrolling over UDP only");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Route {
            transport: lh.transport,
            tcp,
        })
    }

    /// The lighthouse's answer to a hello, and the channel it came on.
    async fn offer(self, endpoint: SocketAddr) -> anyhow::Result<(Channel, Vec<u8>)> {
        let hello = enroll_hello();
        let udp = async {
            let mut channel = Channel::udp(endpoint).await?;
            let offer = ask(&mut channel, endpoint, &hello, &hello, TYPE_ENROLL_CERT).await?;
            anyhow::Ok((channel, offer))
        };
        let Some((target, proxy)) = self.tcp else {
            return udp.await;
        };
        let tcp = async {
            let link = tern_udp::stream::dial(&target, proxy.as_ref())
                .await
                .with_context(|| format!("TCP {target}"))?;
            let mut channel = Channel::Link(Box::new(link));
            let offer = ask(&mut channel, endpoint, &hello, &hello, TYPE_ENROLL_CERT).await?;
            tracing::info!(lighthouse = %endpoint, "enrolling over TCP {target}");
            anyhow::Ok((channel, offer))
        };
        if self.transport == Transport::Tcp {
            return tcp.await;
        }
        // UDP first; TCP too once UDP has been silent a moment. The first
        // answer wins; both failing is the UDP failure with TCP's beside it.
        let tcp = async {
            tokio::time::sleep(UDP_PATIENCE).await;
            tcp.await
        };
        tokio::pin!(udp, tcp);
        let mut udp_error = None;
        let mut tcp_error = None;
        loop {
            tokio::select! {
                r = &mut udp, if udp_error.is_none() => match r {
                    Ok(found) => return Ok(found),
                    Err(e) => udp_error = Some(e),
                },
                r = &mut tcp, if tcp_error.is_none() => match r {
                    Ok(found) => return Ok(found),
                    Err(e) => tcp_error = Some(e),
                },
            }
            if let (Some(u), Some(t)) = (&udp_error, &tcp_error) {
                anyhow::bail!("over UDP: {u:#}; over TCP: {t:#}");
            }
        }
    }
}

/// A lighthouse's UDP socket, or a TCP link carrying the same datagrams.
enum Channel {
    Udp(UdpSocket),
    Link(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Channel {
    /// A socket of the lighthouse's own family.
    async fn udp(endpoint: SocketAddr) -> std::io::Result<Channel> {
        let any: SocketAddr = if endpoint.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        Ok(Channel::Udp(UdpSocket::bind(any).await?))
    }

    async fn send(&mut self, datagram: &[u8], to: SocketAddr) -> std::io::Result<()> {
        match self {
            Channel::Udp(socket) => socket.send_to(datagram, to).await.map(drop),
            Channel::Link(link) => {
                let header =
                    tern_shared::transport::frame_header(datagram.len()).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, "datagram too long")
                    })?;
                link.write_all(&header).await?;
                link.write_all(datagram).await?;
                link.flush().await
            }
        }
    }

    /// One datagram and its source (over a link: the lighthouse, `to`).
    async fn recv(
        &mut self,
        buf: &mut [u8],
        to: SocketAddr,
    ) -> std::io::Result<(usize, SocketAddr)> {
        match self {
            Channel::Udp(socket) => socket.recv_from(buf).await,
            Channel::Link(link) => loop {
                let len = usize::from(link.read_u16().await?);
                let mut frame = vec![0u8; len];
                link.read_exact(&mut frame).await?;
                if len == 0 {
                    continue;
                }
                let n = len.min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                return Ok((n, to));
            },
        }
    }
}

/// Sends `first` and waits for an answer of type `ty` from `to`, repeating
/// `repeat` a few times.
async fn ask(
    channel: &mut Channel,
    to: SocketAddr,
    first: &[u8],
    repeat: &[u8],
    ty: u8,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    // A link loses nothing, so asks once and waits as long as all the UDP
    // tries (and a wait cut short mid-frame leaves the link unusable, so
    // it is never cut short and then read again).
    let (tries, wait) = match channel {
        Channel::Udp(_) => (TRIES, WAIT),
        Channel::Link(_) => (1, WAIT * TRIES as u32),
    };
    for attempt in 0..tries {
        let datagram = if attempt == 0 { first } else { repeat };
        channel.send(datagram, to).await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, channel.recv(&mut buf, to)).await {
                Ok(Ok((n, from))) if from == to && buf.first() == Some(&ty) => {
                    return Ok(buf[..n].to_vec())
                }
                Ok(Ok((n, from))) if from == to => {
                    if let Some(reason) = disabled_reason(&buf[..n]) {
                        return Err(NotEnrolling(reason).into());
                    }
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
    }
    anyhow::bail!("no answer from {to}")
}

/// Enrolls with the lighthouse at `endpoint`, whose answer to the hello
/// (padded: a lighthouse never answers more than it received) was
/// `offer`: its certificate, verified here like any peer's.
async fn enroll_with(
    channel: &mut Channel,
    endpoint: SocketAddr,
    offer: &[u8],
    pinned: Option<&str>,
    pool: &CaPool,
    credential: &Credential,
    now_unix: u64,
) -> anyhow::Result<Identity> {
    let lh = pool
        .verify_bytes(&offer[1..], now_unix)
        .map_err(|e| anyhow::anyhow!("its certificate does not verify against [pki] ca: {e}"))?;
    if !lh.has_group(LIGHTHOUSE_GROUP) {
        anyhow::bail!(
            "{} is not a lighthouse (no '{LIGHTHOUSE_GROUP}' group)",
            lh.name()
        );
    }
    if let Some(name) = pinned {
        if lh.name() != name {
            anyhow::bail!(
                "its certificate is {:?}, not the pinned {name:?}",
                lh.name()
            );
        }
    }
    // A key made here, for this run only.
    let key = NodeSecretKey::generate();
    let sealer = Sealer::new(
        x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng),
        lh.public_key(),
    );
    let (token, oidc) = match credential {
        Credential::Token(t) => (Some(t.trim().to_string()), None),
        Credential::Oidc(t) => (None, Some(t.trim().to_string())),
    };
    let request = EnrollRequest {
        token,
        oidc,
        public_key: key.public_bytes(),
        name_hint: hostname(),
    };
    // The first try fits a typical answer; repeats fit any (the lighthouse
    // keeps the answer for this enrollment, so a repeat spends nothing).
    let first = sealer.seal_request(&request, ENROLL_REQUEST_MIN)?;
    let repeat = sealer.seal_request(&request, MAX_ENROLL_REPLY_LEN)?;
    let answer = ask(channel, endpoint, &first, &repeat, TYPE_ENROLL_REPLY).await?;
    let reply = sealer.open_reply(&answer)?;
    if reply.cert.is_none() && reply.code.as_deref() == Some(REFUSED_STORE_UNAVAILABLE) {
        return Err(StoreUnavailable(format!(
            "lighthouse {}: {}",
            lh.name(),
            reply.refused.unwrap_or_else(|| "store unavailable".into())
        ))
        .into());
    }
    let Some(pem) = reply.cert else {
        return Err(exit(
            tern_shared::exit::REFUSED,
            format!(
                "lighthouse {} refused the enrollment: {}",
                lh.name(),
                reply.refused.unwrap_or_else(|| "no reason given".into())
            ),
        ));
    };
    let cert = Cert::from_pem(&pem)?;
    let cert = pool
        .verify(&cert, now_unix)
        .map_err(|e| anyhow::anyhow!("the certificate the lighthouse sent does not verify: {e}"))?;
    if cert.public_key() != key.public_bytes() {
        anyhow::bail!("the certificate the lighthouse sent is for another key");
    }
    tracing::info!(name = cert.name(), overlay_ip = %cert.overlay_ip(), groups = %tern_shared::show::list(cert.groups()), expires = %tern_shared::cert::format_unix_time(cert.not_after()), issued_by = %tern_shared::show::or_none(cert.issued_by()), "enrolled");
    Ok(Identity {
        ca: pool.clone(),
        cert,
        key,
    })
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
