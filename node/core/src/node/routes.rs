//! Gateway routes: the `[[routes]]` subnets and those gateways advertise
//! (read page by page from a lighthouse), the gateway chosen for each, the
//! packets waiting for a route's first gateway, failover from a gateway
//! that went silent, and which routes get kernel routes.

use super::*;

/// How often a node asks its lighthouses which gateways route what.
pub const ROUTES_INTERVAL: Duration = Duration::from_secs(3);

/// Most advertised routes a node takes in (pages of
/// [`MAX_ROUTES_IN_REPLY`] read one after the other).
pub const MAX_LEARNED_ROUTES: usize = 4096;

/// A gateway we keep sending to without hearing back for this long is asked
/// whether it is alive ...
pub const PROBE_AFTER: Duration = Duration::from_millis(1000);

/// ... and presumed gone when that goes unanswered this long; traffic moves
/// to another gateway for the subnet.
pub const GATEWAY_SILENCE: Duration = Duration::from_millis(1500);

/// How long a silent gateway is passed over.
pub(super) const GATEWAY_HOLD_DOWN: Duration = Duration::from_secs(30);

/// How long a gateway stays a candidate for a subnet after a lighthouse's
/// route list stops naming it. A lighthouse that has just restarted lists
/// only the gateways that registered with it again since (they do within
/// a few registration intervals); taking its list at its word would move
/// the route, and cut every connection through the gateway in use. A
/// gateway that really stopped advertising the subnet is dropped after
/// this. The zones list keeps a zone's gateways the same way (`zones.rs`).
pub const ROUTE_GRACE: Duration = Duration::from_secs(20);

/// A routed subnet as `tern status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteStatus {
    pub subnet: Ipv4Net,
    pub via: Option<String>,
    pub configured: bool,
    pub gateways: Vec<String>,
    pub active: Option<String>,
    /// Whether this node asked for a kernel route for it (TUN mode; the
    /// host keeps its own route if it has one).
    pub kernel_route: bool,
    /// Why a learned route gets no kernel route, when it is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// One reading of a lighthouse's route list.
pub(super) struct RoutesFetch {
    pub(super) lighthouse: PeerId,
    pub(super) lighthouse_ip: Ipv4Addr,
    /// The request whose answer is the next page.
    pub(super) request: u32,
    pub(super) routes: Vec<AdvertisedRoute>,
}

pub(super) struct RouteState {
    pub(super) subnet: Ipv4Net,
    pub(super) via: Option<String>,
    /// From `[[routes]]` (kept even when nobody advertises it).
    pub(super) configured: bool,
    /// A kernel route was asked for (AddRoute sent, RemoveRoute not yet).
    pub(super) kernel: bool,
    /// Why a learned route may not have a kernel route (logged once).
    pub(super) refused: Option<String>,
    pub(super) gateways: Vec<GatewayCandidate>,
    pub(super) active: Option<Ipv4Addr>,
    /// When we last asked the active gateway whether it is alive.
    pub(super) probe_sent: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(super) struct GatewayCandidate {
    pub(super) overlay_ip: Ipv4Addr,
    pub(super) name: String,
    pub(super) down_until: Option<Instant>,
    /// Since when the route lists no longer name it (see [`ROUTE_GRACE`]).
    pub(super) missing_since: Option<Instant>,
}

impl NodeCore {
    /// `[tun] accept_routes`: give learned routes kernel routes too, once
    /// a gateway's verified certificate covers them; never the default
    /// route, the overlay, or a prefix holding a lighthouse's or this
    /// node's underlay address (name those in `[[routes]]` if you mean it).
    pub fn set_accept_routes(&mut self, accept: bool) {
        self.routes.accept = accept;
    }

    /// The most specific route covering `dst`.
    pub(super) fn route_for(&self, dst: Ipv4Addr) -> Option<usize> {
        // Kept sorted most specific first.
        self.routes
            .list
            .iter()
            .position(|r| r.subnet.contains(&dst))
    }

    pub(super) fn sort_routes(&mut self) {
        self.routes.list.sort_by(|a, b| {
            b.subnet
                .prefix_len()
                .cmp(&a.subnet.prefix_len())
                .then(a.subnet.cmp(&b.subnet))
        });
    }

    /// The gateway in use for a route: the active one while it lives, else
    /// the `via` one, else the first by name that is not held down.
    pub(super) fn choose_gateway(&mut self, route: usize, now: Instant) -> Option<Ipv4Addr> {
        let r = self.routes.list.get_mut(route)?;
        let usable = |g: &GatewayCandidate| g.down_until.is_none_or(|t| t <= now);
        if let Some(a) = r.active {
            if r.gateways.iter().any(|g| g.overlay_ip == a && usable(g)) {
                return Some(a);
            }
        }
        let pick = r
            .gateways
            .iter()
            .filter(|g| usable(g))
            .find(|g| r.via.as_deref() == Some(g.name.as_str()))
            .or_else(|| r.gateways.iter().find(|g| usable(g)))
            // Everything held down: a gateway that may be back beats none.
            .or_else(|| r.gateways.first())?;
        let (ip, name) = (pick.overlay_ip, pick.name.clone());
        if r.active != Some(ip) {
            tracing::info!(subnet = %r.subnet, gateway = %name, "route via gateway");
            r.active = Some(ip);
        }
        Some(ip)
    }

    /// A gateway said it is leaving: routes through it move to another
    /// gateway at once (it is passed over like a silent one), instead of
    /// after the probe finds it silent.
    pub(super) fn gateway_left(&mut self, gateway: Ipv4Addr, now: Instant) {
        for r in &mut self.routes.list {
            let listed = r.gateways.iter().any(|g| g.overlay_ip == gateway);
            for g in r.gateways.iter_mut().filter(|g| g.overlay_ip == gateway) {
                g.down_until = Some(now + GATEWAY_HOLD_DOWN);
            }
            if listed && r.active == Some(gateway) {
                tracing::info!(subnet = %r.subnet, %gateway, "gateway left; failing over");
                r.active = None;
                r.probe_sent = None;
                self.counters.gateway_failovers += 1;
            }
        }
    }

    pub(super) fn refuse_gateway(&mut self, gateway: Ipv4Addr, dst: Ipv4Addr) {
        self.counters.unauthorized_gateways += 1;
        tracing::warn!(%gateway, destination = %dst, "gateway's certificate does not authorize this subnet; not routing through it");
        for r in &mut self.routes.list {
            r.gateways.retain(|g| g.overlay_ip != gateway);
            if r.active == Some(gateway) {
                r.active = None;
            }
        }
    }

    /// A packet for `route`, which has no gateway yet: held while the
    /// route list is asked for (at once, then every [`QUERY_RETRY`] while
    /// packets wait), up to [`LOOKUP_TIMEOUT`] as for a lookup.
    pub(super) fn wait_for_gateway(&mut self, route: usize, packet: &[u8], now: Instant) {
        if self
            .routes
            .list
            .get(route)
            .is_none_or(|r| !r.gateways.is_empty())
        {
            self.counters.no_gateway_drops += 1;
            return;
        }
        if self.routes.waiting.len() >= MAX_WAITING_PACKETS {
            self.routes.waiting.pop_front();
            self.counters.no_gateway_drops += 1;
        }
        self.routes.waiting.push_back((now, packet.to_vec()));
        self.ask_routes_for_waiting(now);
    }

    pub(super) fn ask_routes_for_waiting(&mut self, now: Instant) {
        if !self.routes.waiting.is_empty()
            && self
                .routes
                .asked
                .is_none_or(|t| now.saturating_duration_since(t) >= QUERY_RETRY)
        {
            self.routes.asked = Some(now);
            self.ask_routes(now);
        }
    }

    /// Starts reading the route list from a registered lighthouse (a
    /// reading still unfinished is dropped: a page was lost; this one
    /// starts over).
    pub(super) fn ask_routes(&mut self, now: Instant) {
        if let Some((lighthouse, lighthouse_ip)) = self.registered_lighthouses().first().copied() {
            let request = self.request_id();
            self.routes.fetch = Some(RoutesFetch {
                lighthouse,
                lighthouse_ip,
                request,
                routes: Vec::new(),
            });
            let query = ControlMessage::RoutesQuery {
                id: request,
                after: None,
            };
            self.send_control(lighthouse, lighthouse_ip, &query, now);
        }
    }

    /// The packets that waited for a route's gateways, once a route list
    /// came: each goes on as if just read (to its gateway, or to wait for
    /// its gateway's lookup); those whose route still has no gateway wait
    /// on; those whose route is gone are dropped.
    pub(super) fn release_gateway_waiting(&mut self, now: Instant) {
        for (since, packet) in std::mem::take(&mut self.routes.waiting) {
            let Some(route) = ipv4_addrs(&packet).and_then(|(_, dst)| self.route_for(dst)) else {
                self.counters.no_gateway_drops += 1;
                continue;
            };
            match self.choose_gateway(route, now) {
                None => self.routes.waiting.push_back((since, packet)),
                Some(gateway) => match self.mesh.peer_by_overlay(gateway) {
                    Some(peer) => self.send_waiting(peer, &packet, now),
                    None => self.wait_for_lookup(gateway, &packet, now),
                },
            }
        }
    }

    /// Asks for advertised routes now and then, and fails over from a
    /// gateway that went silent while we kept sending to it.
    pub(super) fn drive_routes(&mut self, now: Instant) {
        if self.routes.next_query <= now {
            self.routes.next_query = now + ROUTES_INTERVAL;
            self.ask_routes(now);
        }
        let expired = self
            .routes
            .waiting
            .iter()
            .take_while(|(since, _)| now.saturating_duration_since(*since) >= LOOKUP_TIMEOUT)
            .count();
        self.routes.waiting.drain(..expired);
        self.counters.no_gateway_drops += expired as u64;
        self.ask_routes_for_waiting(now);
        self.install_accepted_routes();
        for i in 0..self.routes.list.len() {
            let Some(active) = self.routes.list[i].active else {
                continue;
            };
            let Some(peer) = self.mesh.peer_by_overlay(active) else {
                continue;
            };
            let Some((last_rx, last_tx)) = self.mesh.peer_activity(peer) else {
                continue;
            };
            // Sending but not hearing back proves nothing by itself (the
            // gateway's firewall may drop that flow), so ask: a live gateway
            // answers a ping on its control port at once.
            let waiting = match (last_tx, last_rx) {
                (Some(tx), Some(rx)) => tx > rx && now.saturating_duration_since(rx) >= PROBE_AFTER,
                (Some(tx), None) => now.saturating_duration_since(tx) >= PROBE_AFTER,
                _ => false,
            };
            if !waiting {
                self.routes.list[i].probe_sent = None;
                continue;
            }
            match self.routes.list[i].probe_sent {
                Some(sent)
                    if last_rx.is_none_or(|rx| rx < sent)
                        && now.saturating_duration_since(sent) >= GATEWAY_SILENCE => {}
                Some(_) => continue,
                None => {
                    self.routes.list[i].probe_sent = Some(now);
                    let id = self.request_id();
                    self.send_control(peer, active, &ControlMessage::Ping { id }, now);
                    continue;
                }
            }
            let alternatives = self.routes.list[i]
                .gateways
                .iter()
                .filter(|g| g.overlay_ip != active)
                .count();
            let r = &mut self.routes.list[i];
            r.probe_sent = None;
            if alternatives > 0 {
                tracing::warn!(subnet = %r.subnet, gateway = %active, "gateway stopped answering; failing over");
                for g in r.gateways.iter_mut().filter(|g| g.overlay_ip == active) {
                    g.down_until = Some(now + GATEWAY_HOLD_DOWN);
                }
                r.active = None;
                self.counters.gateway_failovers += 1;
                self.mesh.remove_peer(peer);
            }
        }
    }

    /// One page of a lighthouse's route list: kept until the last page,
    /// then the whole list replaces what we knew. Pages must go forward
    /// (each route after the one before), and the list is bounded.
    pub(super) fn routes_page(
        &mut self,
        from: PeerId,
        id: u32,
        page: Vec<AdvertisedRoute>,
        complete: bool,
        now: Instant,
    ) {
        let Some(fetch) = self.routes.fetch.as_mut() else {
            return;
        };
        if fetch.lighthouse != from || fetch.request != id {
            return;
        }
        let key = |a: &AdvertisedRoute| (a.subnet, a.gateway);
        let mut last = fetch.routes.last().map(key);
        for route in page.into_iter().take(MAX_ROUTES_IN_REPLY) {
            if last.is_some_and(|l| key(&route) <= l) {
                self.counters.bad_control_messages += 1;
                tracing::warn!("a lighthouse's route list went backwards; reading it again later");
                self.routes.fetch = None;
                return;
            }
            last = Some(key(&route));
            fetch.routes.push(route);
        }
        let full = fetch.routes.len() >= MAX_LEARNED_ROUTES;
        if complete || full {
            if full && !complete {
                tracing::warn!("more than {MAX_LEARNED_ROUTES} advertised routes; using the first {MAX_LEARNED_ROUTES}");
            }
            let routes = std::mem::take(&mut fetch.routes);
            self.routes.fetch = None;
            self.handle_routes(routes, now);
            return;
        }
        let (lighthouse, lighthouse_ip, after) = (fetch.lighthouse, fetch.lighthouse_ip, last);
        let request = self.request_id();
        if let Some(f) = self.routes.fetch.as_mut() {
            f.request = request;
        }
        let query = ControlMessage::RoutesQuery { id: request, after };
        self.send_control(lighthouse, lighthouse_ip, &query, now);
    }

    /// The lighthouse's list of advertised routes replaces what we knew:
    /// configured routes keep their kernel route, learned ones come and go.
    pub(super) fn handle_routes(&mut self, advertised: Vec<AdvertisedRoute>, now: Instant) {
        let mut by_subnet: BTreeMap<Ipv4Net, Vec<&AdvertisedRoute>> = BTreeMap::new();
        for a in &advertised {
            if a.gateway != self.overlay_ip && !self.gateway_subnets.contains(&a.subnet) {
                by_subnet.entry(a.subnet).or_default().push(a);
            }
        }
        for r in &mut self.routes.list {
            let fresh = by_subnet.remove(&r.subnet).unwrap_or_default();
            let old = std::mem::take(&mut r.gateways);
            let mut gateways: Vec<GatewayCandidate> = fresh
                .iter()
                .map(|a| GatewayCandidate {
                    overlay_ip: a.gateway,
                    name: a.name.clone(),
                    down_until: old
                        .iter()
                        .find(|g| g.overlay_ip == a.gateway)
                        .and_then(|g| g.down_until),
                    missing_since: None,
                })
                .collect();
            // Those the list no longer names stay a while (ROUTE_GRACE),
            // after the ones it names.
            for g in old {
                if gateways.iter().any(|n| n.overlay_ip == g.overlay_ip) {
                    continue;
                }
                let since = g.missing_since.unwrap_or(now);
                if now.saturating_duration_since(since) < ROUTE_GRACE {
                    gateways.push(GatewayCandidate {
                        missing_since: Some(since),
                        ..g
                    });
                }
            }
            r.gateways = gateways;
            if r.active
                .is_some_and(|a| !r.gateways.iter().any(|g| g.overlay_ip == a))
            {
                tracing::info!(subnet = %r.subnet, "gateway no longer advertises the subnet");
                r.active = None;
            }
        }
        let mut gone = Vec::new();
        self.routes.list.retain(|r| {
            let keep = r.configured || !r.gateways.is_empty();
            if !keep {
                gone.push((r.subnet, r.kernel));
            }
            keep
        });
        for (subnet, kernel) in gone {
            tracing::info!(%subnet, "no gateway advertises the subnet any more; route removed");
            if kernel {
                self.events.push(NodeEvent::RemoveRoute(subnet));
            }
        }
        let mut look_up = Vec::new();
        for (subnet, gws) in by_subnet {
            tracing::info!(%subnet, gateways = %list(gws.iter().map(|g| &g.name)), "learned route");
            let refused = self.refuse_learned(subnet);
            if self.routes.accept {
                match &refused {
                    Some(why) => {
                        tracing::warn!(%subnet, reason = %why, "learned route gets no kernel route")
                    }
                    // Its gateways' certificates decide: look them up.
                    None => look_up.extend(gws.iter().map(|g| g.gateway)),
                }
            }
            self.routes.list.push(RouteState {
                subnet,
                via: None,
                configured: false,
                kernel: false,
                refused,
                probe_sent: None,
                gateways: gws
                    .iter()
                    .map(|a| GatewayCandidate {
                        overlay_ip: a.gateway,
                        name: a.name.clone(),
                        down_until: None,
                        missing_since: None,
                    })
                    .collect(),
                active: None,
            });
        }
        self.sort_routes();
        for gateway in look_up {
            if self.mesh.peer_by_overlay(gateway).is_none() {
                self.look_up(gateway, now);
            }
        }
        self.install_accepted_routes();
        self.release_gateway_waiting(now);
    }

    /// Why a learned subnet may not get a kernel route, whatever its
    /// gateway's certificate says: it would take the host's default route,
    /// the overlay itself, or the way to a lighthouse or out of this host.
    pub(super) fn refuse_learned(&self, subnet: Ipv4Net) -> Option<String> {
        if subnet.prefix_len() == 0 {
            return Some("it is the default route".into());
        }
        if subnet.contains(&self.overlay_net.network())
            || self.overlay_net.contains(&subnet.network())
        {
            return Some(format!("it overlaps the overlay {}", self.overlay_net));
        }
        let underlay = self
            .links
            .iter()
            .flat_map(|l| [Some(l.target.endpoint), l.observed])
            .flatten()
            .map(|e| (e, "a lighthouse's or this node's public address"))
            .chain(
                self.local_endpoints
                    .iter()
                    .map(|e| (*e, "this node's own underlay address")),
            );
        for (endpoint, what) in underlay {
            if let std::net::IpAddr::V4(ip) = endpoint.ip() {
                if subnet.contains(&ip) {
                    return Some(format!("it covers {ip}, {what}"));
                }
            }
        }
        None
    }

    /// With `accept_routes`: a kernel route for each learned subnet that a
    /// gateway's verified certificate covers whole.
    pub(super) fn install_accepted_routes(&mut self) {
        if !self.routes.accept {
            return;
        }
        for i in 0..self.routes.list.len() {
            let r = &self.routes.list[i];
            if r.kernel || r.configured || r.refused.is_some() {
                continue;
            }
            let covered_by = r.gateways.iter().find_map(|g| {
                let cert = self
                    .mesh
                    .peer_cert(self.mesh.peer_by_overlay(g.overlay_ip)?)?;
                covers(cert, r.subnet).then(|| cert.name().to_string())
            });
            if let Some(gateway) = covered_by {
                let r = &mut self.routes.list[i];
                tracing::info!(subnet = %r.subnet, %gateway, "learned route accepted ([tun] accept_routes)");
                r.kernel = true;
                self.events.push(NodeEvent::AddRoute(r.subnet));
            }
        }
    }
}

/// Whether the certificate authorizes the whole subnet.
pub(super) fn covers(cert: &VerifiedCert, subnet: Ipv4Net) -> bool {
    cert.subnets()
        .iter()
        .any(|n| matches!(n, IpNet::V4(n) if n.contains(&subnet)))
}

/// The gateway routes this node knows, and the reading of them.
pub(super) struct RouteTable {
    pub(super) list: Vec<RouteState>,
    /// When the route list is next asked for (every [`ROUTES_INTERVAL`]).
    pub(super) next_query: Instant,
    /// Packets for a configured route whose gateways are not known yet (the
    /// route list is being asked for): sent once it comes, as packets for
    /// a peer wait for its lookup, instead of dropped (which would cost a
    /// TCP connection its first SYN, a second).
    pub(super) waiting: VecDeque<(Instant, Vec<u8>)>,
    /// When the route list was last asked for because packets wait on it.
    pub(super) asked: Option<Instant>,
    /// The list of routes being read from a lighthouse, page by page.
    pub(super) fetch: Option<RoutesFetch>,
    /// `[tun] accept_routes`: learned routes get kernel routes too (once a
    /// verified certificate covers them), not only `[[routes]]`.
    pub(super) accept: bool,
}

impl RouteTable {
    pub(super) fn new(now: Instant) -> RouteTable {
        RouteTable {
            list: Vec::new(),
            next_query: now,
            waiting: VecDeque::new(),
            asked: None,
            fetch: None,
            accept: false,
        }
    }

    /// When the route list is next asked for, or a packet waiting for a
    /// route's gateway is asked for again or dropped. (Whether an active
    /// gateway went silent is checked on the mesh's own tick: it exists
    /// only while the gateway is a peer.)
    pub(super) fn deadline(&self) -> Instant {
        let waiting = self.waiting.front().map(|(since, _)| {
            let expiry = *since + LOOKUP_TIMEOUT;
            match self.asked {
                Some(asked) => expiry.min(asked + QUERY_RETRY),
                None => expiry,
            }
        });
        waiting.map_or(self.next_query, |w| w.min(self.next_query))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_route_list_and_packets_waiting_for_a_gateway_set_the_deadline() {
        let now = Instant::now();
        let mut table = RouteTable::new(now);
        assert_eq!(
            table.deadline(),
            now,
            "the first route list is asked at once"
        );
        table.next_query = now + ROUTES_INTERVAL;
        assert_eq!(table.deadline(), now + ROUTES_INTERVAL);
        // A packet waits: asked again a second after the last time, dropped
        // after LOOKUP_TIMEOUT.
        table.waiting.push_back((now, vec![0u8; 20]));
        table.asked = Some(now);
        assert_eq!(table.deadline(), now + QUERY_RETRY);
        table.asked = Some(now + LOOKUP_TIMEOUT);
        table.next_query = now + LOOKUP_TIMEOUT + ROUTES_INTERVAL;
        assert_eq!(table.deadline(), now + LOOKUP_TIMEOUT);
    }
}
