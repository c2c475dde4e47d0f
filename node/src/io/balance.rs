//! Connections to a `[[services]]` entry by name (`service:NAME`
//! forwards, and `tern kubeconfig` when several nodes offer one): who
//! offers it is asked of the lighthouses and kept a few seconds; each
//! connection goes to the node with the fewest open connections, turns
//! taken among equals; a node that refuses or does not answer is passed
//! over for a while and the next one dialled, so a node that stops (or
//! drains: its service stops taking connections first) costs the caller
//! at most one short wait, never a failed connection while another node
//! offers the service.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use super::api::{ApiCall, ApiError, ApiRequest, ErrorKind, ServicesReply};
use super::proxy::{ByteStream, Dialer};
use tern_shared::services::authorize;

/// Who offers a service is asked again after this long.
const OFFERS_KEPT: Duration = Duration::from_secs(5);
/// A node dialled for a service answers within this (the mesh's round
/// trip is milliseconds; a stopped node never answers).
const NODE_DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// A node that did not answer is passed over for this long.
const PASSED_OVER_FOR: Duration = Duration::from_secs(10);

/// Opens connections to services by name; clones share what they learned.
#[derive(Clone)]
pub struct ServiceDialer {
    state: Arc<Mutex<State>>,
    calls: mpsc::Sender<ApiCall>,
    dialer: Dialer,
}

#[derive(Default)]
struct State {
    offers: HashMap<String, (Instant, Vec<SocketAddrV4>)>,
    nodes: HashMap<SocketAddrV4, NodeHealth>,
    turn: usize,
}

/// What the dialer knows of one offering node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeHealth {
    /// Connections to it open now.
    pub open: usize,
    /// Passed over until then (it did not answer).
    pub down_until: Option<Instant>,
}

/// The order in which to try `offers`: nodes not passed over first, the
/// fewest open connections first, equals rotated by `turn`; then those
/// passed over (when every node is, one may be back).
pub fn dial_order(
    offers: &[SocketAddrV4],
    health: &HashMap<SocketAddrV4, NodeHealth>,
    turn: usize,
    now: Instant,
) -> Vec<SocketAddrV4> {
    let n = offers.len().max(1);
    let mut order: Vec<(bool, usize, usize, SocketAddrV4)> = offers
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let h = health.get(addr).copied().unwrap_or_default();
            let down = h.down_until.is_some_and(|t| t > now);
            (down, h.open, (i + n - turn % n) % n, *addr)
        })
        .collect();
    order.sort();
    order.into_iter().map(|(.., addr)| addr).collect()
}

impl ServiceDialer {
    pub fn new(calls: mpsc::Sender<ApiCall>, dialer: Dialer) -> ServiceDialer {
        ServiceDialer {
            state: Arc::default(),
            calls,
            dialer,
        }
    }

    /// A connection to a node offering `name` that this node may call,
    /// and that node's address.
    pub async fn connect(
        &self,
        name: &str,
    ) -> Result<(Box<dyn ByteStream>, SocketAddrV4), ApiError> {
        let offers = self.offers(name).await?;
        let order = {
            let mut state = self.lock();
            state.turn = state.turn.wrapping_add(1);
            dial_order(&offers, &state.nodes, state.turn, Instant::now())
        };
        let mut last = None;
        for addr in order {
            let dial = tokio::time::timeout(NODE_DIAL_TIMEOUT, self.dialer.connect(addr)).await;
            match dial {
                Ok(Ok(stream)) => {
                    let mut state = self.lock();
                    let node = state.nodes.entry(addr).or_default();
                    node.open += 1;
                    node.down_until = None;
                    let counted = Counted {
                        inner: stream,
                        addr,
                        state: self.state.clone(),
                    };
                    return Ok((Box::new(counted), addr));
                }
                Ok(Err(e)) => {
                    tracing::debug!(service = name, node = %addr, error = %e, "service node passed over");
                    last = Some(format!("{addr}: {e}"));
                }
                Err(_) => {
                    tracing::debug!(service = name, node = %addr, "service node did not answer; passed over");
                    last = Some(format!(
                        "{addr}: no answer within {} s",
                        NODE_DIAL_TIMEOUT.as_secs()
                    ));
                }
            }
            let mut state = self.lock();
            state.nodes.entry(addr).or_default().down_until =
                Some(Instant::now() + PASSED_OVER_FOR);
        }
        // Every node failed: ask the lighthouses afresh next time.
        self.lock().offers.remove(name);
        Err(ApiError::new(
            ErrorKind::NoRoute,
            format!(
                "no node offering service {name:?} answered ({})",
                last.unwrap_or_default()
            ),
        ))
    }

    /// The addresses of the nodes offering `name` to this node: kept, or
    /// asked of the lighthouses through the event loop.
    async fn offers(&self, name: &str) -> Result<Vec<SocketAddrV4>, ApiError> {
        if let Some((at, offers)) = self.lock().offers.get(name) {
            if at.elapsed() < OFFERS_KEPT && !offers.is_empty() {
                return Ok(offers.clone());
            }
        }
        let (tx, rx) = oneshot::channel();
        let request = ApiRequest::Services {
            name: name.to_string(),
        };
        if self.calls.send((request, tx)).await.is_err() {
            return Err(ApiError::new(ErrorKind::Stopping, "daemon is stopping"));
        }
        let value = rx
            .await
            .map_err(|_| ApiError::new(ErrorKind::Stopping, "daemon is stopping"))?;
        let reply = match super::api::decode::<ServicesReply>(value) {
            Ok(Ok(r)) => r,
            Ok(Err(refusal)) => return Err(refusal),
            Err(e) => return Err(ApiError::new(ErrorKind::Other, format!("{e:#}"))),
        };
        let offers = allowed_offers(&reply, name)?;
        self.lock()
            .offers
            .insert(name.to_string(), (Instant::now(), offers.clone()));
        Ok(offers)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The nodes offering `name` whose groups let this node in, or why none.
pub fn allowed_offers(reply: &ServicesReply, name: &str) -> Result<Vec<SocketAddrV4>, ApiError> {
    let named: Vec<_> = reply
        .services
        .iter()
        .filter(|e| e.service.name == name)
        .collect();
    let Some(first) = named.first() else {
        return Err(ApiError::new(
            ErrorKind::NotResolved,
            format!(
                "no node offers a service named {name:?} ({} of {} lighthouses answered); `tern services` lists what is offered",
                reply.answered, reply.asked
            ),
        ));
    };
    let allowed: Vec<SocketAddrV4> = named
        .iter()
        .filter(|e| authorize(&e.service.groups, &reply.my_groups).is_ok())
        .map(|e| SocketAddrV4::new(e.node, e.service.port))
        .collect();
    if allowed.is_empty() {
        let why = authorize(&first.service.groups, &reply.my_groups)
            .err()
            .unwrap_or_default();
        return Err(ApiError::new(
            ErrorKind::Denied,
            format!("service {name:?}: {why}"),
        ));
    }
    Ok(allowed)
}

/// A connection to an offering node, counted as open until dropped.
struct Counted {
    inner: Box<dyn ByteStream>,
    addr: SocketAddrV4,
    state: Arc<Mutex<State>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = state.nodes.get_mut(&self.addr) {
            node.open = node.open.saturating_sub(1);
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_shared::control::{AdvertisedService, ServiceEntry};

    fn addr(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(std::net::Ipv4Addr::new(100, 64, 0, last), 8080)
    }

    #[test]
    fn turns_spread_equals_and_fewest_open_goes_first() {
        let offers = [addr(1), addr(2), addr(3)];
        let now = Instant::now();
        let mut health = HashMap::new();
        let firsts: Vec<_> = (0..6)
            .map(|turn| dial_order(&offers, &health, turn, now)[0])
            .collect();
        for a in offers {
            assert_eq!(firsts.iter().filter(|f| **f == a).count(), 2, "{firsts:?}");
        }
        health.insert(
            addr(1),
            NodeHealth {
                open: 0,
                down_until: None,
            },
        );
        health.insert(
            addr(2),
            NodeHealth {
                open: 3,
                down_until: None,
            },
        );
        health.insert(
            addr(3),
            NodeHealth {
                open: 1,
                down_until: None,
            },
        );
        for turn in 0..3 {
            assert_eq!(
                dial_order(&offers, &health, turn, now),
                vec![addr(1), addr(3), addr(2)]
            );
        }
    }

    #[test]
    fn a_node_passed_over_comes_last_until_its_time_is_up() {
        let offers = [addr(1), addr(2)];
        let now = Instant::now();
        let mut health = HashMap::new();
        health.insert(
            addr(1),
            NodeHealth {
                open: 0,
                down_until: Some(now + PASSED_OVER_FOR),
            },
        );
        health.insert(
            addr(2),
            NodeHealth {
                open: 9,
                down_until: None,
            },
        );
        for turn in 0..4 {
            assert_eq!(
                dial_order(&offers, &health, turn, now),
                vec![addr(2), addr(1)]
            );
        }
        let later = now + PASSED_OVER_FOR + Duration::from_millis(1);
        assert_eq!(dial_order(&offers, &health, 0, later)[0], addr(1));
        assert!(dial_order(&[], &health, 5, now).is_empty());
    }

    fn entry(name: &str, last: u8, groups: &[&str]) -> ServiceEntry {
        ServiceEntry {
            service: AdvertisedService {
                name: name.into(),
                kind: "http".into(),
                port: 8080,
                groups: groups.iter().map(|g| g.to_string()).collect(),
            },
            node: *addr(last).ip(),
            node_name: format!("gw-{last}"),
        }
    }

    #[test]
    fn only_offers_this_node_may_call_and_a_refusal_names_the_group() {
        let reply = ServicesReply {
            services: vec![
                entry("api", 1, &["ci"]),
                entry("api", 2, &["ops"]),
                entry("other", 3, &[]),
            ],
            asked: 1,
            answered: 1,
            incomplete: false,
            my_groups: vec!["ci".into()],
        };
        assert_eq!(allowed_offers(&reply, "api").unwrap(), vec![addr(1)]);
        assert_eq!(allowed_offers(&reply, "other").unwrap(), vec![addr(3)]);
        let none = allowed_offers(&reply, "db").unwrap_err();
        assert_eq!(none.kind, ErrorKind::NotResolved);
        assert!(none.error.contains("no node offers"), "{none}");
        let denied = ServicesReply {
            my_groups: vec!["dev".into()],
            ..reply
        };
        let refusal = allowed_offers(&denied, "api").unwrap_err();
        assert_eq!(refusal.kind, ErrorKind::Denied);
        assert!(refusal.error.contains("ci"), "{refusal}");
    }
}
