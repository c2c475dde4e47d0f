//! The Prometheus endpoint both daemons serve (`[metrics] listen`): an
//! [`Exposition`] built afresh from the daemon's counters at every scrape
//! (the counters stay with their one owner, the event loop; nothing here
//! keeps a second copy), written in Prometheus' text format by the
//! `prometheus` crate, and a small HTTP/1.1 server (hyper) answering
//! `GET /metrics`.
//!
//! Every metric is named `tern_*` and documented in docs/metrics.md; a test
//! holds the two together. Labels take values from fixed sets (a reason, a
//! direction, a firewall rule of the config), never a peer or a flow.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::core::Collector;
use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;

/// The content type of Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One scrape's metrics, built from a snapshot and then rendered.
#[derive(Default)]
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    fn register(&mut self, collector: Box<dyn Collector>) {
        // Two metrics of one name are a bug of the caller, not of the
        // scrape: the second is left out and logged (tests check the
        // documented set is served whole).
        if let Err(e) = self.registry.register(collector) {
            tracing::error!(error = %e, "metric left out of the exposition");
        }
    }

    /// A counter: `value` since the daemon started.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        if let Ok(c) = IntCounter::new(name, help) {
            c.inc_by(value);
            self.register(Box::new(c));
        }
    }

    /// A counter with one label, a sample per value of it.
    pub fn counter_by(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
        if let Ok(c) = IntCounterVec::new(Opts::new(name, help), &[label]) {
            for (value, n) in samples {
                c.with_label_values(&[value]).inc_by(*n);
            }
            self.register(Box::new(c));
        }
    }

    /// A gauge: a value now.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        if let Ok(g) = Gauge::new(name, help) {
            g.set(value);
            self.register(Box::new(g));
        }
    }

    /// A gauge with one label, a sample per value of it.
    pub fn gauge_by(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, f64)]) {
        if let Ok(g) = GaugeVec::new(Opts::new(name, help), &[label]) {
            for (value, v) in samples {
                g.with_label_values(&[value]).set(*v);
            }
            self.register(Box::new(g));
        }
    }

    /// An info metric: a gauge of 1 whose labels carry the facts.
    pub fn info(&mut self, name: &str, help: &str, labels: &[(&str, &str)]) {
        let mut opts = Opts::new(name, help);
        for (k, v) in labels {
            opts = opts.const_label(*k, *v);
        }
        if let Ok(g) = Gauge::with_opts(opts) {
            g.set(1.0);
            self.register(Box::new(g));
        }
    }

    /// A metric that lives longer than a scrape (a histogram its owner
    /// observes into): cloned in, it shares its owner's values.
    pub fn collector(&mut self, collector: Box<dyn Collector>) {
        self.register(collector);
    }

    /// Prometheus' text format, metrics ordered by name.
    pub fn render(self) -> String {
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Binds `[metrics] listen`, with an error that says what to change.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, String> {
    if !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "[metrics] listen is not a loopback address: the endpoint has no authentication, so whoever reaches it reads this daemon's counters; make sure only the scraper can"
        );
    }
    TcpListener::bind(listen).await.map_err(|e| {
        format!("[metrics] listen = \"{listen}\": {e}; choose a free address, or remove [metrics]")
    })
}

/// Serves `GET /metrics` on `listener` until the task is dropped (aborted):
/// each request awaits `scrape` (None: the daemon is stopping, 503).
/// Other paths are 404, other methods 405.
pub fn serve<F, Fut>(listener: TcpListener, scrape: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Option<String>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let scrape = scrape.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let scrape = scrape.clone();
                    async move { Ok::<_, Infallible>(answer(req, scrape).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(%from, error = %e, "metrics: connection ended with an error");
                }
            });
        }
    })
}

async fn answer<F, Fut>(req: Request<Incoming>, scrape: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let plain = |status: StatusCode, text: &str| {
        let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match scrape().await {
        Some(text) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        None => plain(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping\n"),
    }
}

/// What both daemons report first: the build, and when their certificate
/// expires.
/// What a relay forwarded and refused: a lighthouse's relay, or a node's
/// with `[relay]`.
pub fn relay(e: &mut Exposition, r: &tern_mesh::relay::RelayCounters) {
    e.counter_by(
        "tern_relay_forwarded_total",
        "WireGuard messages relayed between nodes, by message type.",
        "message",
        &[
            ("handshake_initiation", r.forwarded_handshake_initiation),
            ("handshake_response", r.forwarded_handshake_response),
            ("cookie_reply", r.forwarded_cookie_reply),
            ("data", r.forwarded_data),
        ],
    );
    e.counter(
        "tern_relay_bytes_total",
        "Bytes of the WireGuard messages relayed.",
        r.forwarded_bytes,
    );
    e.counter_by(
        "tern_relay_refusals_total",
        "Relay requests refused, by reason.",
        "reason",
        &[
            ("unregistered_sender", r.refused_unregistered_sender),
            ("unregistered_target", r.refused_unregistered_target),
            ("not_introduced", r.refused_not_introduced),
            ("malformed", r.refused_malformed),
            ("rate_limited", r.refused_rate_limited),
        ],
    );
}

pub fn identity(e: &mut Exposition, daemon: &str, cert_not_after: u64) {
    e.info(
        "tern_build_info",
        "The running build: its version and which daemon this is (always 1).",
        &[("version", env!("CARGO_PKG_VERSION")), ("daemon", daemon)],
    );
    e.gauge(
        "tern_cert_expiry_timestamp_seconds",
        "When this daemon's certificate expires, in seconds since the Unix epoch.",
        cert_not_after as f64,
    );
}

/// The mesh's part, the same in both daemons: peers by path, handshakes,
/// traffic, and drops (`more_drops`: the daemon's own reasons beside the
/// mesh's).
pub fn mesh(
    e: &mut Exposition,
    c: &tern_mesh::MeshCounters,
    paths: tern_mesh::PeerPaths,
    more_drops: &[(&str, u64)],
) {
    e.gauge_by(
        "tern_peers",
        "Peers in the table, by how packets reach them now (probing: no path proven yet).",
        "path",
        &[
            ("direct", paths.direct as f64),
            ("relayed", paths.relayed as f64),
            ("probing", paths.probing as f64),
        ],
    );
    e.counter(
        "tern_handshakes_total",
        "WireGuard handshakes completed (a response accepted, or an initiation answered).",
        c.handshakes,
    );
    e.counter_by(
        "tern_handshake_failures_total",
        "Handshake messages and hellos refused, by reason.",
        "reason",
        &[
            ("certificate_rejected", c.rejected_certs),
            ("unknown_key", c.unknown_handshake_keys),
            ("rate_limited", c.rate_limited),
            ("wireguard_error", c.wireguard_errors),
            ("cookie_reply", c.cookie_replies),
            ("cookie_withheld", c.cookie_replies_withheld),
        ],
    );
    e.counter(
        "tern_handshakes_held_total",
        "Handshakes with nodes, either way, held until a lighthouse brought the revocation list \
         (a node just started): answered or sent once it did.",
        c.held_handshakes,
    );
    e.counter_by(
        "tern_packets_total",
        "IP packets through the tunnels: in = decrypted and delivered, out = encrypted toward a peer.",
        "direction",
        &[("in", c.packets_in), ("out", c.packets_out)],
    );
    e.counter_by(
        "tern_bytes_total",
        "Bytes of the IP packets through the tunnels (inner packets: in after decryption, out before encryption).",
        "direction",
        &[("in", c.bytes_in), ("out", c.bytes_out)],
    );
    let mut drops = vec![
        ("unknown_datagram", c.unknown_datagrams),
        ("malformed_hello", c.malformed_hellos),
        ("unknown_session", c.unknown_session_index),
        ("spoofed_source", c.spoofed_source_drops),
        ("not_ipv4", c.non_ipv4_drops),
        ("relay", c.relay_drops),
    ];
    drops.extend_from_slice(more_drops);
    e.counter_by(
        "tern_drops_total",
        "Datagrams and packets dropped, by reason.",
        "reason",
        &drops,
    );
    e.counter_by(
        "tern_peers_removed_total",
        "Peers taken out of the table, by reason.",
        "reason",
        &[("expired", c.expired_peers), ("revoked", c.revoked_peers)],
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_exposition_renders_each_kind_in_text_format() {
        let mut e = Exposition::new();
        e.counter("tern_test_total", "A counter.", 3);
        e.counter_by(
            "tern_test_drops_total",
            "By reason.",
            "reason",
            &[("a", 1), ("b", 0)],
        );
        e.gauge("tern_test_peers", "A gauge.", 2.0);
        e.info("tern_test_build_info", "Facts.", &[("version", "1.2.3")]);
        // A second metric of a name already there is left out, not a panic.
        e.gauge("tern_test_peers", "Again.", 9.0);
        let text = e.render();
        assert!(
            text.contains("# TYPE tern_test_total counter\ntern_test_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_test_drops_total{reason=\"a\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_test_drops_total{reason=\"b\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tern_test_peers gauge\ntern_test_peers 2\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_test_build_info{version=\"1.2.3\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains(" 9\n"), "{text}");
    }

    #[tokio::test]
    async fn the_endpoint_answers_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = serve(listener, || async {
            let mut e = Exposition::new();
            e.counter("tern_test_total", "A counter.", 1);
            Some(e.render())
        });
        let get = |path: &'static str, method: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics", "GET").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("tern_test_total 1"), "{ok}");
        assert!(get("/", "GET").await.starts_with("HTTP/1.1 404"));
        assert!(get("/metrics", "POST").await.starts_with("HTTP/1.1 405"));
        // Garbage instead of HTTP: the connection ends, the server goes on.
        {
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
        }
        assert!(get("/metrics", "GET").await.starts_with("HTTP/1.1 200"));
        task.abort();
    }
}
