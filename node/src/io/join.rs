//! Enrollment on the node: `tern up --enroll-token TOKEN` or `tern up
//! --enroll-oidc` with a config whose `[pki]` names only the CA. The node makes its key in memory (it is
//! never written anywhere), asks a lighthouse for a certificate over the
//! sealed exchange of [`tern_shared::enroll`], and verifies what it gets
//! against its own CA like any peer's certificate.

use std::net::SocketAddr;
use std::time::Duration;

use tern_shared::cert::{CaPool, Cert, LIGHTHOUSE_GROUP};
use tern_shared::config::NodeConfig;
use tern_shared::enroll::{
    disabled_reason, enroll_hello, EnrollRequest, Sealer, ENROLL_REQUEST_MIN, MAX_ENROLL_REPLY_LEN,
    REFUSED_STORE_UNAVAILABLE, TYPE_ENROLL_CERT, TYPE_ENROLL_REPLY,
};
use tern_shared::identity::Identity;
use tern_shared::keys::NodeSecretKey;
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
        offers.spawn(async move {
            let hello = enroll_hello();
            let offer = async {
                // A socket of the lighthouse's own family.
                let any: SocketAddr = if endpoint.is_ipv6() {
                    SocketAddr::from(([0u16; 8], 0))
                } else {
                    SocketAddr::from(([0, 0, 0, 0], 0))
                };
                let socket = UdpSocket::bind(any).await?;
                let offer = ask(&socket, endpoint, &hello, &hello, TYPE_ENROLL_CERT).await?;
                anyhow::Ok((socket, offer))
            };
            (endpoint, offer.await)
        });
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
            Ok((socket, offer)) => {
                enroll_with(
                    &socket, endpoint, &offer, pinned, &pool, credential, now_unix,
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

/// Sends `first` and waits for an answer of type `ty` from `to`, repeating
/// `repeat` a few times.
async fn ask(
    socket: &UdpSocket,
    to: SocketAddr,
    first: &[u8],
    repeat: &[u8],
    ty: u8,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    for attempt in 0..TRIES {
        let datagram = if attempt == 0 { first } else { repeat };
        socket.send_to(datagram, to).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
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
    socket: &UdpSocket,
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
    let answer = ask(socket, endpoint, &first, &repeat, TYPE_ENROLL_REPLY).await?;
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
