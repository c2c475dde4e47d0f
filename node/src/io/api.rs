//! The local API: a Unix socket where `tern status` (and later commands) ask
//! the running daemon questions. One JSON request per line, one JSON reply
//! per line. The socket is created 0660 in a 0755 directory: only root (or
//! the daemon's group) may ask.

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
    /// The verified identity behind a peer's overlay address: certificate
    /// name, groups, fingerprint (`null` when no such peer is in the table).
    Peer {
        overlay_ip: std::net::Ipv4Addr,
    },
}

/// A request and where its answer goes, handed to the event loop.
pub type ApiCall = (ApiRequest, oneshot::Sender<serde_json::Value>);

/// The socket path: the configured one, else `/run/tern/<tun name>.sock`.
pub fn socket_path(configured: Option<&Path>, tun_name: &str) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("/run/tern/{tun_name}.sock")))
}

/// Binds the socket (mode 0660, and `group`'s when given) and serves it
/// until the returned guard is dropped.
pub fn serve(
    path: &Path,
    group: Option<&str>,
    calls: mpsc::Sender<ApiCall>,
) -> anyhow::Result<SocketGuard> {
    let listener = tern_udp::api_socket::bind(path, group)?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, calls).await {
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

async fn answer(stream: UnixStream, calls: mpsc::Sender<ApiCall>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        if line.len() > 4096 {
            anyhow::bail!("request too long");
        }
        let reply = match serde_json::from_str::<ApiRequest>(&line) {
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                calls.send((req, tx)).await.ok();
                rx.await
                    .unwrap_or_else(|_| serde_json::json!({"error": "daemon is stopping"}))
            }
            Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
        };
        let mut bytes = serde_json::to_vec(&reply)?;
        bytes.push(b'\n');
        write.write_all(&bytes).await?;
    }
    Ok(())
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

/// Client side: sends one request and returns the reply.
pub async fn call(path: &Path, request: &ApiRequest) -> anyhow::Result<serde_json::Value> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
            "the daemon's API socket {} is not open to this user ({e}); run as root, or set \
             [api] group in the node's config to a group of this user and restart the node",
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                "connecting to the daemon's API socket {} (is `tern up` running with this config?)",
                path.display()
            )
            })
        }
    };
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
