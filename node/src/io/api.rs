//! The local API: a Unix socket where `tern status` (and later commands) ask
//! the running daemon questions. One JSON request per line, one JSON reply
//! per line. The socket is created 0660 in a 0755 directory: only root (or
//! the daemon's group) may ask.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
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

/// Binds the socket and serves it until the returned guard is dropped.
pub fn serve(path: &Path, calls: mpsc::Sender<ApiCall>) -> anyhow::Result<SocketGuard> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the API socket directory {}", dir.display()))?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from a crash; a live one
        // means another daemon uses this path.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another daemon already serves the API socket {}; stop it or set [api] socket to another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale API socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions on {}", path.display()))?;
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
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the daemon's API socket {} (is `tern up` running with this config?)",
            path.display()
        )
    })?;
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
