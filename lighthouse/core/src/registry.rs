//! The registry of live nodes: soft state that nodes refresh by registering.
//!
//! Entries are keyed by the overlay address of the certificate that
//! authenticated the registering session, never by anything a message says.
//! After a restart it is empty and fills again as nodes re-register.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::Serialize;
use tern_mesh::PeerId;
use tern_shared::control::{
    AdvertisedRoute, AdvertisedZone, PeerInfo, RunnerInfo, RunnerLoad, RunnerSelector,
    MAX_ENDPOINTS, MAX_ROUTES_IN_REPLY, MAX_RUNNERS_IN_REPLY, MAX_ZONES_IN_REPLY,
    ZONES_PAGE_BUDGET,
};

/// Live nodes by overlay address. Drive with `register`, `lookup` and `expire(now)`.
pub struct Registry {
    entries: BTreeMap<Ipv4Addr, Entry>,
    /// Which node registered from which address: how a relay knows who
    /// sent a relay request.
    by_observed: HashMap<SocketAddr, Ipv4Addr>,
    expiry: Duration,
    max_entries: usize,
}

struct Entry {
    name: String,
    cert: Vec<u8>,
    peer: PeerId,
    observed: SocketAddr,
    local: Vec<SocketAddr>,
    /// Subnets it routes, already checked against its certificate.
    routes: Vec<Ipv4Net>,
    /// Subnets it advertised that its certificate does not carry.
    refused: Vec<Ipv4Net>,
    /// DNS zones it answers for, already checked against its certificate.
    zones: Vec<String>,
    /// The runner it offers (only from a certificate in the runner group).
    runner: Option<RunnerAd>,
    /// The issuer that signed its certificate: an enrolled, short-lived node.
    issued_by: Option<String>,
    registered: Instant,
    last_seen: Instant,
}

/// What a runner node advertised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerAd {
    pub labels: Vec<String>,
    pub load: RunnerLoad,
}

/// One registered node, as the lighthouse's status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RegisteredNode {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub observed: SocketAddr,
    pub local: Vec<SocketAddr>,
    pub routes: Vec<Ipv4Net>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerAd>,
    /// An enrolled node (its certificate comes from an issuer): short-lived,
    /// gone when it leaves or falls silent; its address returns to the pool
    /// only when its certificate expires.
    pub ephemeral: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_by: Option<String>,
    pub registered_secs_ago: u64,
    pub last_seen_secs_ago: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry full ({0} nodes)")]
    Full(usize),
}

impl Registry {
    pub fn new(expiry: Duration, max_entries: usize) -> Self {
        Registry {
            entries: BTreeMap::new(),
            by_observed: HashMap::new(),
            expiry,
            max_entries,
        }
    }

    /// Records (or refreshes) a node. `observed` is the address its session's
    /// packets come from; `local` is what the node reports about itself.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        overlay_ip: Ipv4Addr,
        name: &str,
        cert: &[u8],
        peer: PeerId,
        observed: SocketAddr,
        local: &[SocketAddr],
        now: Instant,
    ) -> Result<(), RegistryError> {
        if !self.entries.contains_key(&overlay_ip) && self.entries.len() >= self.max_entries {
            return Err(RegistryError::Full(self.max_entries));
        }
        let local: Vec<SocketAddr> = local
            .iter()
            .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
            .take(MAX_ENDPOINTS)
            .copied()
            .collect();
        let entry = self.entries.entry(overlay_ip).or_insert_with(|| Entry {
            name: name.to_string(),
            cert: cert.to_vec(),
            peer,
            observed,
            local: Vec::new(),
            routes: Vec::new(),
            refused: Vec::new(),
            zones: Vec::new(),
            runner: None,
            issued_by: None,
            registered: now,
            last_seen: now,
        });
        if entry.cert != cert {
            entry.cert = cert.to_vec();
            entry.name = name.to_string();
            entry.registered = now;
            entry.runner = None;
            entry.zones.clear();
        }
        entry.peer = peer;
        if entry.observed != observed && self.by_observed.get(&entry.observed) == Some(&overlay_ip)
        {
            self.by_observed.remove(&entry.observed);
        }
        entry.observed = observed;
        entry.local = local;
        entry.last_seen = now;
        // The newest registration from an address owns it (a NAT may hand
        // a departed node's mapping to another).
        self.by_observed.insert(observed, overlay_ip);
        Ok(())
    }

    /// Sets the subnets a registered node routes, and those it advertised
    /// without authority; true when either changed.
    pub fn set_routes(
        &mut self,
        overlay_ip: Ipv4Addr,
        routes: Vec<Ipv4Net>,
        refused: Vec<Ipv4Net>,
    ) -> bool {
        match self.entries.get_mut(&overlay_ip) {
            Some(e) if e.routes != routes || e.refused != refused => {
                e.routes = routes;
                e.refused = refused;
                true
            }
            _ => false,
        }
    }

    /// Sets the DNS zones a registered node answers for (already checked
    /// against its certificate); true when they changed.
    pub fn set_zones(&mut self, overlay_ip: Ipv4Addr, zones: Vec<String>) -> bool {
        match self.entries.get_mut(&overlay_ip) {
            Some(e) if e.zones != zones => {
                e.zones = zones;
                true
            }
            _ => false,
        }
    }

    /// One page of the advertised zones, by zone then gateway address:
    /// those after `after`, as many as fit a control message (at most
    /// [`MAX_ZONES_IN_REPLY`]), and whether that was the last page.
    pub fn zones_after(&self, after: Option<&(String, Ipv4Addr)>) -> (Vec<AdvertisedZone>, bool) {
        let mut all: Vec<AdvertisedZone> = self
            .entries
            .iter()
            .flat_map(|(ip, e)| {
                e.zones.iter().map(move |zone| AdvertisedZone {
                    zone: zone.clone(),
                    gateway: *ip,
                    name: e.name.clone(),
                })
            })
            .filter(|z| after.is_none_or(|(zone, gw)| (&z.zone, z.gateway) > (zone, *gw)))
            .collect();
        all.sort();
        let mut page = Vec::new();
        let mut used = 0;
        for z in &all {
            if page.len() == MAX_ZONES_IN_REPLY || used + z.encoded_len() > ZONES_PAGE_BUDGET {
                break;
            }
            used += z.encoded_len();
            page.push(z.clone());
        }
        let complete = page.len() == all.len();
        (page, complete)
    }

    /// The node whose certificate has this name, any case (the most
    /// recently registered when several share it).
    pub fn by_name(&self, name: &str) -> Option<PeerInfo> {
        let (ip, _) = self
            .entries
            .iter()
            .filter(|(_, e)| e.name.eq_ignore_ascii_case(name))
            .max_by_key(|(_, e)| e.registered)?;
        self.lookup(*ip)
    }

    /// Marks a registered node as enrolled under `issuer` (or not).
    pub fn set_issued_by(&mut self, overlay_ip: Ipv4Addr, issuer: Option<&str>) {
        if let Some(e) = self.entries.get_mut(&overlay_ip) {
            if e.issued_by.as_deref() != issuer {
                e.issued_by = issuer.map(str::to_string);
            }
        }
    }

    /// Every registered node's overlay address and session.
    pub fn peers(&self) -> Vec<(Ipv4Addr, PeerId)> {
        self.entries.iter().map(|(ip, e)| (*ip, e.peer)).collect()
    }

    /// Records the runner a registered node offers; false when the node is
    /// not registered.
    pub fn set_runner(&mut self, overlay_ip: Ipv4Addr, ad: RunnerAd) -> bool {
        match self.entries.get_mut(&overlay_ip) {
            Some(e) => {
                e.runner = Some(ad);
                true
            }
            None => false,
        }
    }

    /// Runners matching `selector`, least busy first (then by name), at
    /// most [`MAX_RUNNERS_IN_REPLY`]. By name, any registered node with
    /// that certificate name matches, runner or not (`load` then `None`).
    pub fn runners(&self, selector: &RunnerSelector) -> Vec<RunnerInfo> {
        let mut out: Vec<RunnerInfo> = self
            .entries
            .iter()
            .filter(|(_, e)| match selector {
                RunnerSelector::Label(l) => e.runner.as_ref().is_some_and(|r| r.labels.contains(l)),
                RunnerSelector::Name(n) => &e.name == n,
            })
            .map(|(ip, e)| RunnerInfo {
                overlay_ip: *ip,
                name: e.name.clone(),
                load: e.runner.as_ref().map(|r| r.load),
            })
            .collect();
        tern_shared::control::sort_least_busy(&mut out);
        out.truncate(MAX_RUNNERS_IN_REPLY);
        out
    }

    /// One page of the advertised routes, by subnet then gateway address:
    /// those after `after`, at most [`MAX_ROUTES_IN_REPLY`], and whether
    /// that was the last page. Every gateway's routes are listed (each
    /// advertises at most [`tern_shared::control::MAX_ADVERTISED`]): none
    /// can push another's out of the list.
    pub fn routes_after(&self, after: Option<(Ipv4Net, Ipv4Addr)>) -> (Vec<AdvertisedRoute>, bool) {
        let mut out: Vec<AdvertisedRoute> = self
            .entries
            .iter()
            .flat_map(|(ip, e)| {
                e.routes
                    .iter()
                    .filter(move |subnet| after.is_none_or(|a| (**subnet, *ip) > a))
                    .map(|subnet| AdvertisedRoute {
                        subnet: *subnet,
                        gateway: *ip,
                        name: e.name.clone(),
                    })
            })
            .collect();
        out.sort();
        let complete = out.len() <= MAX_ROUTES_IN_REPLY;
        out.truncate(MAX_ROUTES_IN_REPLY);
        (out, complete)
    }

    /// Where the node is: the observed address first, then its local ones.
    pub fn lookup(&self, overlay_ip: Ipv4Addr) -> Option<PeerInfo> {
        let e = self.entries.get(&overlay_ip)?;
        let mut endpoints = vec![e.observed];
        for l in &e.local {
            if !endpoints.contains(l) && endpoints.len() < MAX_ENDPOINTS {
                endpoints.push(*l);
            }
        }
        Some(PeerInfo {
            cert: e.cert.clone(),
            endpoints,
        })
    }

    /// The mesh peer through which the node registered.
    pub fn peer(&self, overlay_ip: Ipv4Addr) -> Option<PeerId> {
        self.entries.get(&overlay_ip).map(|e| e.peer)
    }

    pub fn remove(&mut self, overlay_ip: Ipv4Addr) -> bool {
        match self.entries.remove(&overlay_ip) {
            Some(e) => {
                if self.by_observed.get(&e.observed) == Some(&overlay_ip) {
                    self.by_observed.remove(&e.observed);
                }
                true
            }
            None => false,
        }
    }

    /// A registered node's authenticated packet came from `observed`: it
    /// moved (a new address, a NAT that forgot it). Relay requests are
    /// recognized from the new address at once.
    pub fn moved(&mut self, overlay_ip: Ipv4Addr, observed: SocketAddr) {
        let Some(e) = self.entries.get_mut(&overlay_ip) else {
            return;
        };
        if e.observed == observed {
            return;
        }
        if self.by_observed.get(&e.observed) == Some(&overlay_ip) {
            self.by_observed.remove(&e.observed);
        }
        e.observed = observed;
        self.by_observed.insert(observed, overlay_ip);
    }

    /// The node that registered from `observed`, if any.
    pub fn node_at(&self, observed: SocketAddr) -> Option<Ipv4Addr> {
        self.by_observed.get(&observed).copied()
    }

    /// The address the node registered from.
    pub fn observed(&self, overlay_ip: Ipv4Addr) -> Option<SocketAddr> {
        self.entries.get(&overlay_ip).map(|e| e.observed)
    }

    /// Drops nodes silent for longer than the expiry; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<(Ipv4Addr, PeerId)> {
        let expiry = self.expiry;
        let gone: Vec<(Ipv4Addr, PeerId)> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) > expiry)
            .map(|(ip, e)| (*ip, e.peer))
            .collect();
        for (ip, _) in &gone {
            self.remove(*ip);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn nodes(&self, now: Instant) -> Vec<RegisteredNode> {
        self.entries
            .iter()
            .map(|(ip, e)| RegisteredNode {
                name: e.name.clone(),
                overlay_ip: *ip,
                observed: e.observed,
                local: e.local.clone(),
                routes: e.routes.clone(),
                zones: e.zones.clone(),
                runner: e.runner.clone(),
                ephemeral: e.issued_by.is_some(),
                issued_by: e.issued_by.clone(),
                registered_secs_ago: now.saturating_duration_since(e.registered).as_secs(),
                last_seen_secs_ago: now.saturating_duration_since(e.last_seen).as_secs(),
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Reads every page, as a node does.
    fn all_routes(r: &Registry) -> Vec<AdvertisedRoute> {
        let (mut all, mut after) = (Vec::new(), None);
        for _ in 0..100 {
            let (page, complete) = r.routes_after(after);
            assert!(page.len() <= MAX_ROUTES_IN_REPLY);
            after = page.last().map(|a| (a.subnet, a.gateway));
            all.extend(page);
            if complete {
                return all;
            }
        }
        panic!("the pages never ended");
    }

    #[test]
    fn every_route_of_every_gateway_is_listed_page_by_page() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 1000);
        // 100 gateways with a /24 each ...
        for i in 0..100u8 {
            let ip = Ipv4Addr::new(100, 64, 1, i);
            r.register(
                ip,
                &format!("gw-{i}"),
                b"c",
                PeerId(u32::from(i)),
                addr(&format!("198.18.0.{i}:4242")),
                &[],
                t0,
            )
            .unwrap();
            r.set_routes(
                ip,
                vec![format!("198.19.{i}.0/24").parse().unwrap()],
                vec![],
            );
        }
        // ... and one whose /16 lets it advertise sixteen /32s, which sort
        // before all of them.
        let greedy = Ipv4Addr::new(100, 64, 2, 1);
        r.register(
            greedy,
            "greedy",
            b"c",
            PeerId(999),
            addr("198.18.1.1:4242"),
            &[],
            t0,
        )
        .unwrap();
        let small: Vec<Ipv4Net> = (0..16u8)
            .map(|i| format!("198.19.0.{i}/32").parse().unwrap())
            .collect();
        r.set_routes(greedy, small, vec![]);
        let all = all_routes(&r);
        assert_eq!(all.len(), 116);
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, all, "in order, none twice");
        for i in 0..100u8 {
            assert!(
                all.iter().any(|a| a.name == format!("gw-{i}")),
                "gw-{i} missing"
            );
        }
        // A page after the last route is empty and complete.
        let last = all.last().map(|a| (a.subnet, a.gateway));
        assert_eq!(r.routes_after(last), (vec![], true));
    }

    #[test]
    fn register_lookup_and_expire_on_a_fake_clock() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 10);
        let ip = Ipv4Addr::new(100, 64, 0, 5);
        r.register(
            ip,
            "a",
            b"cert",
            PeerId(1),
            addr("198.18.0.2:4242"),
            &[addr("198.18.1.2:4242"), addr("0.0.0.0:4242")],
            t0,
        )
        .unwrap();
        let info = r.lookup(ip).unwrap();
        assert_eq!(info.cert, b"cert");
        assert_eq!(
            info.endpoints,
            vec![addr("198.18.0.2:4242"), addr("198.18.1.2:4242")],
            "observed first, unspecified dropped"
        );
        assert!(r.expire(t0 + Duration::from_secs(30)).is_empty());
        // Re-registering refreshes.
        r.register(
            ip,
            "a",
            b"cert",
            PeerId(1),
            addr("198.18.0.9:4242"),
            &[],
            t0 + Duration::from_secs(20),
        )
        .unwrap();
        assert!(r.expire(t0 + Duration::from_secs(45)).is_empty());
        assert_eq!(
            r.lookup(ip).unwrap().endpoints,
            vec![addr("198.18.0.9:4242")],
            "roamed"
        );
        assert_eq!(
            r.expire(t0 + Duration::from_secs(51)),
            vec![(ip, PeerId(1))]
        );
        assert!(r.lookup(ip).is_none());
    }

    #[test]
    fn bounded() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 2);
        for i in 0..2u8 {
            r.register(
                Ipv4Addr::new(100, 64, 0, i),
                "n",
                b"c",
                PeerId(i as u32),
                addr("198.18.0.2:1"),
                &[],
                t0,
            )
            .unwrap();
        }
        assert_eq!(
            r.register(
                Ipv4Addr::new(100, 64, 0, 9),
                "n",
                b"c",
                PeerId(9),
                addr("198.18.0.2:1"),
                &[],
                t0
            ),
            Err(RegistryError::Full(2))
        );
        // An existing node may still refresh.
        assert!(r
            .register(
                Ipv4Addr::new(100, 64, 0, 1),
                "n",
                b"c",
                PeerId(1),
                addr("198.18.0.2:1"),
                &[],
                t0
            )
            .is_ok());
    }

    #[test]
    fn runners_by_label_least_busy_first_and_by_name() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 10);
        let load = |running, queued| RunnerLoad {
            running,
            queued,
            concurrency: 2,
        };
        for (i, name, labels, l) in [
            (1u8, "busy", vec!["linux"], load(2, 1)),
            (2, "idle", vec!["linux", "gpu"], load(0, 0)),
            (3, "half", vec!["linux"], load(1, 0)),
        ] {
            let ip = Ipv4Addr::new(100, 64, 0, i);
            r.register(
                ip,
                name,
                b"c",
                PeerId(i.into()),
                addr("198.18.0.2:1"),
                &[],
                t0,
            )
            .unwrap();
            assert!(r.set_runner(
                ip,
                RunnerAd {
                    labels: labels.into_iter().map(String::from).collect(),
                    load: l,
                }
            ));
        }
        r.register(
            Ipv4Addr::new(100, 64, 0, 9),
            "db",
            b"c",
            PeerId(9),
            addr("198.18.0.2:1"),
            &[],
            t0,
        )
        .unwrap();
        let names = |v: Vec<RunnerInfo>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(r.runners(&RunnerSelector::Label("linux".into()))),
            vec!["idle", "half", "busy"]
        );
        assert_eq!(
            names(r.runners(&RunnerSelector::Label("gpu".into()))),
            vec!["idle"]
        );
        assert!(r.runners(&RunnerSelector::Label("arm".into())).is_empty());
        let db = r.runners(&RunnerSelector::Name("db".into()));
        assert_eq!(db.len(), 1);
        assert_eq!(db[0].load, None, "found by name, no runner advertised");
        assert!(!r.set_runner(
            Ipv4Addr::new(100, 64, 0, 77),
            RunnerAd {
                labels: vec![],
                load: load(0, 0)
            }
        ));
        // A new certificate at the same address drops the old claim.
        r.register(
            Ipv4Addr::new(100, 64, 0, 2),
            "idle",
            b"other",
            PeerId(2),
            addr("198.18.0.2:1"),
            &[],
            t0,
        )
        .unwrap();
        assert_eq!(
            names(r.runners(&RunnerSelector::Label("gpu".into()))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn endpoints_capped() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 2);
        let many: Vec<SocketAddr> = (1..30).map(|p| addr(&format!("198.18.1.2:{p}"))).collect();
        let ip = Ipv4Addr::new(100, 64, 0, 5);
        r.register(ip, "n", b"c", PeerId(1), addr("198.18.0.2:1"), &many, t0)
            .unwrap();
        assert_eq!(r.lookup(ip).unwrap().endpoints.len(), MAX_ENDPOINTS);
    }
}
