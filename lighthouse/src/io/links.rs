//! `[listen] tcp`: the lighthouse's TCP listener for nodes whose networks
//! drop UDP. Each connection is TLS (the configured certificate, or a
//! self-signed one), then framed datagrams, attached to the UDP socket's
//! [`Outer`](tern_udp::Outer) under an address of its own
//! (`tern_shared::transport::stream_endpoint`): the core registers, relays
//! and answers the node there as if it were a UDP source.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tern_shared::config::ListenConfig;
use tern_udp::stream::Streams;
use tokio::net::TcpListener;

/// Most TCP links at once.
const MAX_LINKS: usize = 50_000;
/// Most TCP links from one IP address (many CI jobs may sit behind one
/// NAT or proxy; one source still cannot take every slot).
const LINKS_PER_SOURCE: usize = 1024;
/// How long a connection may take to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's task; stops when dropped.
pub(crate) struct LinkListener(tokio::task::JoinHandle<()>);

impl Drop for LinkListener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `[listen] tcp` (when set) and serves links into `streams`.
pub(crate) async fn start(
    listen: &ListenConfig,
    name: &str,
    streams: Arc<Streams>,
) -> anyhow::Result<Option<LinkListener>> {
    let Some(addr) = listen.tcp else {
        return Ok(None);
    };
    let tls = server_tls(listen, name)?;
    let listener = bind(addr)
        .await
        .with_context(|| format!("binding TCP {addr} ([listen] tcp)"))?;
    tracing::info!(listen = %listener.local_addr()?, "TCP links (TLS) for nodes without UDP");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(Some(LinkListener(tokio::spawn(serve(
        listener, acceptor, streams,
    )))))
}

/// A listener on `addr`; `[::]` takes IPv4 connections too.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The configured certificate and key, or a self-signed certificate for
/// `name` made now (nodes do not check it: they authenticate the
/// lighthouse inside the link).
fn server_tls(listen: &ListenConfig, name: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (chain, key) = match (&listen.tls_cert, &listen.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "[listen] tls_cert {}: {e}; give a PEM certificate chain",
                        cert.display()
                    )
                })?;
            if chain.is_empty() {
                anyhow::bail!("[listen] tls_cert {}: no certificate in it", cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                anyhow::anyhow!(
                    "[listen] tls_key {}: {e}; give a PEM private key",
                    key.display()
                )
            })?;
            (chain, key)
        }
        _ => {
            let made = rcgen::generate_simple_self_signed(vec![name.to_string()])
                .context("making a self-signed TLS certificate for [listen] tcp")?;
            let key = PrivateKeyDer::try_from(made.key_pair.serialize_der())
                .map_err(|e| anyhow::anyhow!("the self-signed TLS key: {e}"))?;
            (vec![made.cert.der().clone()], key)
        }
    };
    tern_udp::stream::server_tls(chain, key)
        .context("[listen] tls_cert and tls_key do not make a TLS server")
}

async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, streams: Arc<Streams>) {
    let per_source: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut next_id: u64 = 1;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = peer.ip().to_canonical();
        {
            let mut counts = per_source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let from_source = counts.entry(source).or_default();
            if *from_source >= LINKS_PER_SOURCE || streams.links() >= MAX_LINKS {
                tracing::debug!(%peer, "TCP link refused: too many");
                continue;
            }
            *from_source += 1;
        }
        let id = next_id;
        next_id += 1;
        let acceptor = acceptor.clone();
        let streams = streams.clone();
        let per_source = per_source.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let link = tern_shared::transport::stream_endpoint(id);
                    tracing::debug!(%peer, %link, "TCP link up");
                    let _ = streams.attach(link, tls).await;
                    tracing::debug!(%peer, %link, "TCP link down");
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
            let mut counts = per_source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&source);
                }
            }
        });
    }
}
