//! The zones list: which gateways answer for which DNS zones, read page
//! by page from a lighthouse (every [`ZONES_INTERVAL`], at the first
//! registration, and when a lighthouse says it changed), and the adverts
//! ignored because the gateway's verified certificate lacks the zone.

use super::*;
use tern_shared::control::AdvertisedZone;

/// The zones list being read from a lighthouse, page by page.
pub(super) struct ZonesFetch {
    pub(super) lighthouse: PeerId,
    pub(super) lighthouse_ip: Ipv4Addr,
    pub(super) request: u32,
    pub(super) zones: Vec<AdvertisedZone>,
}

impl NodeCore {
    /// Starts reading the zones list from a registered lighthouse.
    pub(super) fn ask_zones(&mut self, now: Instant) {
        if let Some((lighthouse, lighthouse_ip)) = self.registered_lighthouses().first().copied() {
            let request = self.request_id();
            self.names.fetch = Some(ZonesFetch {
                lighthouse,
                lighthouse_ip,
                request,
                zones: Vec::new(),
            });
            let query = ControlMessage::ZonesQuery {
                id: request,
                after: None,
            };
            self.send_control(lighthouse, lighthouse_ip, &query, now);
        }
    }

    /// One page of a lighthouse's zones list: kept until the last page,
    /// then the whole list replaces what we knew.
    pub(super) fn zones_page(
        &mut self,
        from: PeerId,
        id: u32,
        page: Vec<AdvertisedZone>,
        complete: bool,
        now: Instant,
    ) {
        let Some(fetch) = self.names.fetch.as_mut() else {
            return;
        };
        if fetch.lighthouse != from || fetch.request != id {
            return;
        }
        let mut last = fetch.zones.last().map(|z| (z.zone.clone(), z.gateway));
        for z in page {
            let key = (z.zone.clone(), z.gateway);
            if last.as_ref().is_some_and(|l| &key <= l) {
                self.counters.bad_control_messages += 1;
                tracing::warn!("a lighthouse's zones list went backwards; reading it again later");
                self.names.fetch = None;
                return;
            }
            last = Some(key);
            fetch.zones.push(z);
        }
        let full = fetch.zones.len() >= MAX_LEARNED_ZONES;
        if complete || full {
            let zones = std::mem::take(&mut fetch.zones);
            self.names.fetch = None;
            self.handle_zones(zones, now);
            return;
        }
        let (lighthouse, lighthouse_ip) = (fetch.lighthouse, fetch.lighthouse_ip);
        let request = self.request_id();
        if let Some(f) = self.names.fetch.as_mut() {
            f.request = request;
        }
        let query = ControlMessage::ZonesQuery {
            id: request,
            after: last,
        };
        self.send_control(lighthouse, lighthouse_ip, &query, now);
    }

    /// The lighthouse's zones list replaces what we knew; gateways keep
    /// their hold-downs. A gateway the list no longer names stays, after
    /// those it names, for [`ROUTE_GRACE`]: a lighthouse that has just
    /// restarted lists only the gateways registered with it again, and a
    /// zone forgotten sends its names to the system's resolvers. This
    /// node's own zones are not listed (it answers them itself).
    fn handle_zones(&mut self, advertised: Vec<AdvertisedZone>, now: Instant) {
        let mut zones: BTreeMap<String, Vec<GatewayCandidate>> = BTreeMap::new();
        for a in advertised {
            if a.gateway == self.overlay_ip {
                continue;
            }
            // A gateway whose certificate we hold decides now; one we do
            // not know yet is checked before it is asked anything.
            let known = self
                .mesh
                .peer_by_overlay(a.gateway)
                .and_then(|p| self.mesh.peer_cert(p))
                .cloned();
            match known {
                Some(cert) if !cert.answers_for(&a.zone) || cert.overlay_ip() != a.gateway => {
                    self.forged_zone(&a.zone, a.gateway, &cert);
                    continue;
                }
                Some(_) => {
                    self.names.ignored.remove(&(a.zone.clone(), a.gateway));
                }
                None if self.names.ignored.contains(&(a.zone.clone(), a.gateway)) => continue,
                None => {}
            }
            let down_until = self
                .names
                .zones
                .get(&a.zone)
                .and_then(|gws| gws.iter().find(|g| g.overlay_ip == a.gateway))
                .and_then(|g| g.down_until);
            zones.entry(a.zone).or_default().push(GatewayCandidate {
                overlay_ip: a.gateway,
                name: a.name,
                down_until,
                missing_since: None,
            });
        }
        for (zone, old) in &self.names.zones {
            for g in old {
                let gws = zones.entry(zone.clone()).or_default();
                if gws.iter().any(|n| n.overlay_ip == g.overlay_ip) {
                    continue;
                }
                let since = g.missing_since.unwrap_or(now);
                if now.saturating_duration_since(since) < ROUTE_GRACE {
                    gws.push(GatewayCandidate {
                        missing_since: Some(since),
                        ..g.clone()
                    });
                }
            }
        }
        zones.retain(|_, gws| !gws.is_empty());
        for (zone, gws) in &zones {
            if !self.names.zones.contains_key(zone) {
                tracing::info!(%zone, gateways = %list(gws.iter().map(|g| &g.name)), "learned DNS zone");
            }
        }
        for zone in self.names.zones.keys() {
            if !zones.contains_key(zone) {
                tracing::info!(%zone, "no gateway advertises the DNS zone any more");
            }
        }
        self.names.zones = zones;
    }

    /// A lighthouse listed `gateway` for `zone`, but its certificate does
    /// not carry the zone: the advert is ignored from now on.
    pub(super) fn forged_zone(&mut self, zone: &str, gateway: Ipv4Addr, cert: &VerifiedCert) {
        if !self.names.ignored.insert((zone.to_string(), gateway)) {
            return;
        }
        self.names.counters.forged_zone_adverts += 1;
        tracing::warn!(%zone, gateway = cert.name(), %gateway, carries = %list(cert.dns_zones()), "a gateway is advertised for a DNS zone its certificate does not carry; ignored");
        if let Some(gws) = self.names.zones.get_mut(zone) {
            gws.retain(|g| g.overlay_ip != gateway);
            if gws.is_empty() {
                self.names.zones.remove(zone);
            }
        }
    }
}
