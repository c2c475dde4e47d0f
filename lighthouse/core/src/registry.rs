//! The registry of live nodes: soft state that nodes refresh by registering.
//!
//! Entries are keyed by the overlay address of the certificate that
//! authenticated the registering session, never by anything a message says.
//! After a restart it is empty and fills again as nodes re-register.
//!
//! Every query costs its answer, not a walk of every node: the advertised
//! routes and zones, the names and the runners are kept in indexes beside
//! the entries, and silent nodes are found from a queue of when each may
//! fall silent. A lighthouse holds 100,000 nodes, each of which reads the
//! route and zone lists every few seconds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Bound;
use std::time::{Duration, Instant};
use tern_shared::control::{AdvertisedService, RecentJob, ServiceEntry, SERVICES_PAGE_BUDGET};
use tern_shared::transport::is_stream_endpoint;

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
    /// Every advertised route, by subnet then gateway.
    routes: BTreeSet<(Ipv4Net, Ipv4Addr)>,
    /// Every advertised zone, by zone then gateway.
    zones: BTreeSet<(String, Ipv4Addr)>,
    /// Certificate names in lower case (names are matched in any case).
    names: BTreeSet<(Box<str>, Ipv4Addr)>,
    /// The nodes that advertised a runner.
    runners: BTreeSet<Ipv4Addr>,
    /// Every advertised `[[services]]` entry, by name then node.
    services: BTreeSet<(String, Ipv4Addr)>,
    /// Each entry's last registration as last looked at, oldest first: an
    /// entry refreshed since is queued again with its newer time when it
    /// comes up (the sequence number tells the entry's one live item from
    /// those of an entry removed and registered again).
    silence: BinaryHeap<Reverse<(Instant, u64, Ipv4Addr)>>,
    next_seq: u64,
    expiry: Duration,
    max_entries: usize,
    /// Counts every change a watcher would see (a node in or out, a new
    /// certificate, routes, zones or a runner changed): the console's live
    /// views follow it.
    changes: u64,
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
    /// Its runner's newest jobs, as it last told.
    runner_jobs: Vec<RecentJob>,
    /// The `[[services]]` it offers.
    services: Vec<AdvertisedService>,
    /// The issuer that signed its certificate: an enrolled, short-lived node.
    issued_by: Option<String>,
    registered: Instant,
    last_seen: Instant,
    /// Its item in `Registry::silence`.
    silence_seq: u64,
}

/// A registered node in brief, for a pass over the registry.
#[derive(Debug, Clone, Copy)]
pub struct NodeBrief<'a> {
    pub overlay_ip: Ipv4Addr,
    pub name: &'a str,
    pub ephemeral: bool,
    pub peer: PeerId,
    pub observed: SocketAddr,
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

/// A name as the index keeps it.
fn name_key(name: &str) -> Box<str> {
    name.to_ascii_lowercase().into_boxed_str()
}

impl Registry {
    pub fn new(expiry: Duration, max_entries: usize) -> Self {
        Registry {
            entries: BTreeMap::new(),
            by_observed: HashMap::new(),
            routes: BTreeSet::new(),
            zones: BTreeSet::new(),
            names: BTreeSet::new(),
            runners: BTreeSet::new(),
            services: BTreeSet::new(),
            silence: BinaryHeap::new(),
            next_seq: 0,
            expiry,
            max_entries,
            changes: 0,
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
        let entry = match self.entries.entry(overlay_ip) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                self.changes += 1;
                self.next_seq += 1;
                self.silence.push(Reverse((now, self.next_seq, overlay_ip)));
                self.names.insert((name_key(name), overlay_ip));
                v.insert(Entry {
                    name: name.to_string(),
                    cert: cert.to_vec(),
                    peer,
                    observed,
                    local: Vec::new(),
                    routes: Vec::new(),
                    refused: Vec::new(),
                    zones: Vec::new(),
                    runner: None,
                    runner_jobs: Vec::new(),
                    services: Vec::new(),
                    issued_by: None,
                    registered: now,
                    last_seen: now,
                    silence_seq: self.next_seq,
                })
            }
        };
        if entry.cert != cert {
            self.changes += 1;
            entry.cert = cert.to_vec();
            if entry.name != name {
                self.names.remove(&(name_key(&entry.name), overlay_ip));
                self.names.insert((name_key(name), overlay_ip));
                entry.name = name.to_string();
            }
            entry.registered = now;
            if entry.runner.take().is_some() {
                self.runners.remove(&overlay_ip);
            }
            entry.runner_jobs.clear();
            for zone in entry.zones.drain(..) {
                self.zones.remove(&(zone, overlay_ip));
            }
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
                for subnet in &e.routes {
                    self.routes.remove(&(*subnet, overlay_ip));
                }
                for subnet in &routes {
                    self.routes.insert((*subnet, overlay_ip));
                }
                e.routes = routes;
                e.refused = refused;
                self.changes += 1;
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
                for zone in e.zones.drain(..) {
                    self.zones.remove(&(zone, overlay_ip));
                }
                for zone in &zones {
                    self.zones.insert((zone.clone(), overlay_ip));
                }
                e.zones = zones;
                self.changes += 1;
                true
            }
            _ => false,
        }
    }

    /// One page of the advertised zones, by zone then gateway address:
    /// those after `after`, as many as fit a control message (at most
    /// [`MAX_ZONES_IN_REPLY`]), and whether that was the last page.
    pub fn zones_after(&self, after: Option<&(String, Ipv4Addr)>) -> (Vec<AdvertisedZone>, bool) {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut page = Vec::new();
        let mut used = 0;
        for (zone, gateway) in self
            .zones
            .range::<(String, Ipv4Addr), _>((from, Bound::Unbounded))
        {
            let z = AdvertisedZone {
                zone: zone.clone(),
                gateway: *gateway,
                name: self.name_of(*gateway),
            };
            if page.len() == MAX_ZONES_IN_REPLY || used + z.encoded_len() > ZONES_PAGE_BUDGET {
                return (page, false);
            }
            used += z.encoded_len();
            page.push(z);
        }
        (page, true)
    }

    /// The node whose certificate has this name, any case (the most
    /// recently registered when several share it).
    pub fn by_name(&self, name: &str) -> Option<PeerInfo> {
        let ip = self
            .named(name)
            .filter_map(|ip| self.entries.get(&ip).map(|e| (ip, e)))
            .max_by_key(|(_, e)| e.registered)
            .map(|(ip, _)| ip)?;
        self.lookup(ip)
    }

    /// The addresses of the nodes with this name (any case), in order.
    fn named(&self, name: &str) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let key = name_key(name);
        let from = (key.clone(), Ipv4Addr::UNSPECIFIED);
        let to = (key, Ipv4Addr::BROADCAST);
        self.names.range(from..=to).map(|(_, ip)| *ip)
    }

    fn name_of(&self, overlay_ip: Ipv4Addr) -> String {
        self.entries
            .get(&overlay_ip)
            .map(|e| e.name.clone())
            .unwrap_or_default()
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

    /// Records the services a registered node offers (replacing what it
    /// offered before).
    pub fn set_services(&mut self, overlay_ip: Ipv4Addr, services: Vec<AdvertisedService>) {
        let Some(e) = self.entries.get_mut(&overlay_ip) else {
            return;
        };
        if e.services == services {
            return;
        }
        for s in e.services.drain(..) {
            self.services.remove(&(s.name, overlay_ip));
        }
        for s in &services {
            self.services.insert((s.name.clone(), overlay_ip));
        }
        e.services = services;
    }

    /// The offers of the service `name` (empty: every service), by name
    /// then node, as many as fit in one reply; whether that was all.
    pub fn services(&self, name: &str) -> (Vec<ServiceEntry>, bool) {
        let mut out = Vec::new();
        let mut used = 0;
        let from = (name.to_string(), Ipv4Addr::UNSPECIFIED);
        for (n, ip) in self.services.range(from..) {
            if !name.is_empty() && n != name {
                break;
            }
            let Some(e) = self.entries.get(ip) else {
                continue;
            };
            let Some(service) = e.services.iter().find(|s| &s.name == n) else {
                continue;
            };
            let entry = ServiceEntry {
                service: service.clone(),
                node: *ip,
                node_name: e.name.clone(),
            };
            used += entry.encoded_len();
            if used > SERVICES_PAGE_BUDGET {
                return (out, false);
            }
            out.push(entry);
        }
        (out, true)
    }

    /// Records the runner a registered node offers; false when the node is
    /// not registered.
    pub fn set_runner(&mut self, overlay_ip: Ipv4Addr, ad: RunnerAd) -> bool {
        match self.entries.get_mut(&overlay_ip) {
            Some(e) => {
                if e.runner.as_ref() != Some(&ad) {
                    self.changes += 1;
                }
                e.runner = Some(ad);
                self.runners.insert(overlay_ip);
                true
            }
            None => false,
        }
    }

    /// Sets the newest jobs of a registered runner (a node that advertised
    /// one); false, keeping nothing, for any other node.
    pub fn set_runner_jobs(&mut self, overlay_ip: Ipv4Addr, jobs: Vec<RecentJob>) -> bool {
        match self.entries.get_mut(&overlay_ip) {
            Some(e) if e.runner.is_some() => {
                if e.runner_jobs != jobs {
                    self.changes += 1;
                    e.runner_jobs = jobs;
                }
                true
            }
            _ => false,
        }
    }

    /// Runners matching `selector`, least busy first (then by name), at
    /// most [`MAX_RUNNERS_IN_REPLY`]. By name, any registered node with
    /// that certificate name matches, runner or not (`load` then `None`).
    pub fn runners(&self, selector: &RunnerSelector) -> Vec<RunnerInfo> {
        let candidates: Vec<Ipv4Addr> = match selector {
            RunnerSelector::Label(_) => self.runners.iter().copied().collect(),
            RunnerSelector::Name(n) => self.named(n).collect(),
        };
        let mut out: Vec<RunnerInfo> = candidates
            .into_iter()
            .filter_map(|ip| self.entries.get(&ip).map(|e| (ip, e)))
            .filter(|(_, e)| match selector {
                RunnerSelector::Label(l) => e.runner.as_ref().is_some_and(|r| r.labels.contains(l)),
                RunnerSelector::Name(n) => &e.name == n,
            })
            .map(|(ip, e)| RunnerInfo {
                overlay_ip: ip,
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
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut them = self.routes.range((from, Bound::Unbounded));
        let out: Vec<AdvertisedRoute> = them
            .by_ref()
            .take(MAX_ROUTES_IN_REPLY)
            .map(|&(subnet, gateway)| AdvertisedRoute {
                subnet,
                gateway,
                name: self.name_of(gateway),
            })
            .collect();
        (out, them.next().is_none())
    }

    /// Where the node is: the observed address first, then its local ones.
    /// A node registered over a TCP link has no observed address another
    /// node could send to (its link's address is this lighthouse's alone).
    pub fn lookup(&self, overlay_ip: Ipv4Addr) -> Option<PeerInfo> {
        let e = self.entries.get(&overlay_ip)?;
        let mut endpoints = Vec::with_capacity(1 + e.local.len());
        if !is_stream_endpoint(&e.observed) {
            endpoints.push(e.observed);
        }
        for l in &e.local {
            if !is_stream_endpoint(l) && !endpoints.contains(l) && endpoints.len() < MAX_ENDPOINTS {
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
        let Some(e) = self.entries.remove(&overlay_ip) else {
            return false;
        };
        self.changes += 1;
        if self.by_observed.get(&e.observed) == Some(&overlay_ip) {
            self.by_observed.remove(&e.observed);
        }
        for subnet in &e.routes {
            self.routes.remove(&(*subnet, overlay_ip));
        }
        for zone in e.zones {
            self.zones.remove(&(zone, overlay_ip));
        }
        self.names.remove(&(name_key(&e.name), overlay_ip));
        if e.runner.is_some() {
            self.runners.remove(&overlay_ip);
        }
        for s in e.services {
            self.services.remove(&(s.name, overlay_ip));
        }
        // Its item in `silence` goes when it comes up.
        true
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

    /// Drops nodes silent for longer than the expiry; returns them, by
    /// address. Looks only at the entries whose time may be up.
    pub fn expire(&mut self, now: Instant) -> Vec<(Ipv4Addr, PeerId)> {
        self.expire_some(now, usize::MAX)
    }

    /// [`Registry::expire`], looking at no more than `max` entries: nodes
    /// that registered at once come up at once, and a caller that runs
    /// this often (a lighthouse: at each of its timer slices) spreads
    /// them over several calls.
    pub fn expire_some(&mut self, now: Instant, max: usize) -> Vec<(Ipv4Addr, PeerId)> {
        let mut gone = Vec::new();
        for _ in 0..max {
            let Some(&Reverse((seen, seq, ip))) = self.silence.peek() else {
                break;
            };
            if now.saturating_duration_since(seen) <= self.expiry {
                break;
            }
            self.silence.pop();
            let Some(e) = self.entries.get_mut(&ip).filter(|e| e.silence_seq == seq) else {
                continue; // removed since
            };
            if now.saturating_duration_since(e.last_seen) > self.expiry {
                gone.push((ip, e.peer));
            } else {
                // Registered again since: its turn comes at its new time.
                self.next_seq += 1;
                e.silence_seq = self.next_seq;
                self.silence.push(Reverse((e.last_seen, self.next_seq, ip)));
            }
        }
        gone.sort();
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
            .map(|(ip, e)| shown(*ip, e, now))
            .collect()
    }

    /// How many changes a watcher would see there have been (see
    /// `changes`); equal counts, same registry as far as the console shows.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The nodes with overlay addresses after `after`, in order, lazily,
    /// each in brief (no copies).
    pub fn scan_after(&self, after: Option<Ipv4Addr>) -> impl Iterator<Item = NodeBrief<'_>> + '_ {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.entries
            .range((from, Bound::Unbounded))
            .map(|(ip, e)| NodeBrief {
                overlay_ip: *ip,
                name: &e.name,
                ephemeral: e.issued_by.is_some(),
                peer: e.peer,
                observed: e.observed,
            })
    }

    /// One node as the admin API shows it, with its session.
    pub fn node(&self, ip: Ipv4Addr, now: Instant) -> Option<(RegisteredNode, PeerId)> {
        self.entries.get(&ip).map(|e| (shown(ip, e, now), e.peer))
    }

    /// At most `limit` nodes with overlay addresses after `after`, in
    /// order, each with its session, and the `after` of the next page
    /// (none at the end): a page costs its rows, not the registry.
    pub fn nodes_after(
        &self,
        after: Option<Ipv4Addr>,
        limit: usize,
        now: Instant,
    ) -> (Vec<(RegisteredNode, PeerId)>, Option<Ipv4Addr>) {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = self.entries.range((from, Bound::Unbounded));
        let page: Vec<(RegisteredNode, PeerId)> = range
            .by_ref()
            .take(limit)
            .map(|(ip, e)| (shown(*ip, e, now), e.peer))
            .collect();
        let next = if range.next().is_some() {
            page.last().map(|(n, _)| n.overlay_ip)
        } else {
            None
        };
        (page, next)
    }
}

/// A gateway as the admin API lists it: the subnets and zones it
/// advertises (already checked against its certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayEntry {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub routes: Vec<Ipv4Net>,
    pub zones: Vec<String>,
    pub last_seen_secs_ago: u64,
}

/// A runner as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerEntry {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub labels: Vec<String>,
    pub load: RunnerLoad,
    /// Its newest jobs, newest first, as it last told.
    pub jobs: Vec<RecentJob>,
    pub last_seen_secs_ago: u64,
}

impl Registry {
    /// At most `limit` gateways (nodes advertising routes or zones) with
    /// addresses after `after`, and the next page's `after`. Costs the
    /// advertised routes and zones, never the registry.
    pub fn gateways_after(
        &self,
        after: Option<Ipv4Addr>,
        limit: usize,
        now: Instant,
    ) -> (Vec<GatewayEntry>, Option<Ipv4Addr>) {
        let all: BTreeSet<Ipv4Addr> = self
            .routes
            .iter()
            .map(|(_, g)| *g)
            .chain(self.zones.iter().map(|(_, g)| *g))
            .collect();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut them = all.range((from, Bound::Unbounded));
        let page: Vec<GatewayEntry> = them
            .by_ref()
            .take(limit)
            .filter_map(|ip| {
                let e = self.entries.get(ip)?;
                Some(GatewayEntry {
                    name: e.name.clone(),
                    overlay_ip: *ip,
                    routes: e.routes.clone(),
                    zones: e.zones.clone(),
                    last_seen_secs_ago: now.saturating_duration_since(e.last_seen).as_secs(),
                })
            })
            .collect();
        let next = them.next().and(page.last().map(|g| g.overlay_ip));
        (page, next)
    }

    /// At most `limit` runners with addresses after `after`, and the next
    /// page's `after`.
    pub fn runners_after(
        &self,
        after: Option<Ipv4Addr>,
        limit: usize,
        now: Instant,
    ) -> (Vec<RunnerEntry>, Option<Ipv4Addr>) {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut them = self.runners.range((from, Bound::Unbounded));
        let page: Vec<RunnerEntry> = them
            .by_ref()
            .take(limit)
            .filter_map(|ip| {
                let e = self.entries.get(ip)?;
                let r = e.runner.as_ref()?;
                Some(RunnerEntry {
                    name: e.name.clone(),
                    overlay_ip: *ip,
                    labels: r.labels.clone(),
                    load: r.load,
                    jobs: e.runner_jobs.clone(),
                    last_seen_secs_ago: now.saturating_duration_since(e.last_seen).as_secs(),
                })
            })
            .collect();
        let next = them.next().and(page.last().map(|r| r.overlay_ip));
        (page, next)
    }
}

/// A registry entry as status and the admin API show it.
fn shown(ip: Ipv4Addr, e: &Entry, now: Instant) -> RegisteredNode {
    RegisteredNode {
        name: e.name.clone(),
        overlay_ip: ip,
        observed: e.observed,
        local: e.local.clone(),
        routes: e.routes.clone(),
        zones: e.zones.clone(),
        runner: e.runner.clone(),
        ephemeral: e.issued_by.is_some(),
        issued_by: e.issued_by.clone(),
        registered_secs_ago: now.saturating_duration_since(e.registered).as_secs(),
        last_seen_secs_ago: now.saturating_duration_since(e.last_seen).as_secs(),
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
    fn gateways_are_listed_a_page_at_a_time_with_their_routes() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 1000);
        for i in 0..30u8 {
            let ip = Ipv4Addr::new(100, 64, 2, i);
            let observed = addr(&format!("198.18.2.{i}:4242"));
            r.register(
                ip,
                &format!("n-{i}"),
                b"c",
                PeerId(u32::from(i)),
                observed,
                &[],
                t0,
            )
            .unwrap();
            // Every third node is a gateway.
            if i % 3 == 0 {
                r.set_routes(
                    ip,
                    vec![format!("198.19.{i}.0/24").parse().unwrap()],
                    vec![],
                );
            }
        }
        let (first, next) = r.gateways_after(None, 4, t0);
        assert_eq!(first.len(), 4);
        assert_eq!(first[1].name, "n-3");
        assert_eq!(first[1].routes[0].to_string(), "198.19.3.0/24");
        let (rest, end) = r.gateways_after(next, 100, t0);
        assert_eq!(rest.len(), 6);
        assert!(end.is_none());
        assert_eq!(r.runners_after(None, 10, t0), (vec![], None));
    }

    #[test]
    fn nodes_are_listed_a_page_at_a_time_each_once() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 1000);
        for i in 0..250u16 {
            let ip = Ipv4Addr::new(100, 64, (i / 200) as u8, (i % 200) as u8);
            let observed = addr(&format!("198.18.{}.{}:4242", i / 200, i % 200));
            r.register(
                ip,
                &format!("n-{i}"),
                b"c",
                PeerId(u32::from(i)),
                observed,
                &[],
                t0,
            )
            .unwrap();
        }
        let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (page, next) = r.nodes_after(after, 100, t0);
            assert!(page.len() <= 100);
            pages += 1;
            seen.extend(page.iter().map(|(n, _)| n.overlay_ip));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 250);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order, none twice");
        let (page, next) = r.nodes_after(Some(Ipv4Addr::new(100, 64, 1, 49)), 10, t0);
        assert!(page.is_empty() && next.is_none(), "past the last node");
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

    /// Services are listed by name then node, replaced by a new advert and
    /// gone with their node.
    #[test]
    fn services_by_name_until_their_node_goes() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 4);
        let svc = |name: &str| AdvertisedService {
            name: name.into(),
            kind: "http".into(),
            port: 9000,
            groups: vec!["ci".into()],
        };
        for (i, ip) in [Ipv4Addr::new(100, 64, 0, 5), Ipv4Addr::new(100, 64, 0, 6)]
            .into_iter()
            .enumerate()
        {
            r.register(
                ip,
                &format!("gw-{i}"),
                b"c",
                PeerId(i as u32),
                addr(&format!("198.18.0.{}:1", i + 2)),
                &[],
                t0,
            )
            .unwrap();
            r.set_services(ip, vec![svc("api"), svc("k8s")]);
        }
        let (api, complete) = r.services("api");
        assert!(complete);
        assert_eq!(
            api.iter().map(|e| e.node_name.as_str()).collect::<Vec<_>>(),
            ["gw-0", "gw-1"]
        );
        assert_eq!(r.services("").0.len(), 4);
        assert!(r.services("nope").0.is_empty());
        r.set_services(Ipv4Addr::new(100, 64, 0, 5), vec![svc("k8s")]);
        assert_eq!(r.services("api").0.len(), 1);
        r.remove(Ipv4Addr::new(100, 64, 0, 6));
        assert!(r.services("api").0.is_empty());
        assert_eq!(r.services("k8s").0.len(), 1);
    }

    /// A node on a TCP link is found, but its link's address is never
    /// handed out as a place to punch to; its local addresses are.
    #[test]
    fn a_tcp_link_is_no_endpoint_for_others() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 2);
        let ip = Ipv4Addr::new(100, 64, 0, 5);
        let link = tern_shared::transport::stream_endpoint(3);
        let local = [
            addr("198.18.1.2:4242"),
            tern_shared::transport::stream_endpoint(4),
        ];
        r.register(ip, "n", b"c", PeerId(1), link, &local, t0)
            .unwrap();
        assert_eq!(r.lookup(ip).unwrap().endpoints, vec![local[0]]);
        assert_eq!(r.observed(ip), Some(link));
        assert_eq!(r.node_at(link), Some(ip));
    }

    #[test]
    fn indexes_follow_removals_and_new_certificates() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 10);
        let gw = Ipv4Addr::new(100, 64, 0, 7);
        r.register(gw, "Gw-1", b"c1", PeerId(7), addr("198.18.0.7:1"), &[], t0)
            .unwrap();
        r.set_routes(gw, vec!["198.19.0.0/24".parse().unwrap()], vec![]);
        r.set_zones(gw, vec!["internal".into()]);
        r.set_runner(
            gw,
            RunnerAd {
                labels: vec!["linux".into()],
                load: RunnerLoad {
                    running: 0,
                    queued: 0,
                    concurrency: 1,
                },
            },
        );
        assert_eq!(r.routes_after(None).0.len(), 1);
        assert_eq!(r.zones_after(None).0.len(), 1);
        assert!(r.by_name("gw-1").is_some(), "any case");
        assert_eq!(r.runners(&RunnerSelector::Label("linux".into())).len(), 1);
        // A new certificate at the address: its zones and runner go, and
        // its new name is the one found.
        r.register(gw, "gw-2", b"c2", PeerId(7), addr("198.18.0.7:1"), &[], t0)
            .unwrap();
        assert_eq!(r.zones_after(None), (vec![], true));
        assert!(r.runners(&RunnerSelector::Label("linux".into())).is_empty());
        assert!(r.by_name("gw-1").is_none());
        assert!(r.by_name("GW-2").is_some());
        assert_eq!(r.routes_after(None).0.len(), 1, "routes stay until set");
        assert!(r.remove(gw));
        assert_eq!(r.routes_after(None), (vec![], true));
        assert!(r.by_name("gw-2").is_none());
        assert!(r.runners(&RunnerSelector::Name("gw-2".into())).is_empty());
    }

    #[test]
    fn by_name_finds_the_most_recent_of_a_name_in_any_case() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 10);
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 9), Ipv4Addr::new(100, 64, 0, 3));
        r.register(a, "web", b"a", PeerId(1), addr("198.18.0.9:1"), &[], t0)
            .unwrap();
        r.register(
            b,
            "WEB",
            b"b",
            PeerId(2),
            addr("198.18.0.3:1"),
            &[],
            t0 + Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(r.by_name("Web").unwrap().cert, b"b");
        assert_eq!(
            r.runners(&RunnerSelector::Name("web".into()))
                .iter()
                .map(|x| x.overlay_ip)
                .collect::<Vec<_>>(),
            vec![a],
            "by name, exactly"
        );
    }

    #[test]
    fn a_node_removed_and_registered_again_expires_once_on_its_new_time() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 10);
        let ip = Ipv4Addr::new(100, 64, 0, 5);
        let at = |s| t0 + Duration::from_secs(s);
        r.register(ip, "a", b"c", PeerId(1), addr("198.18.0.2:1"), &[], t0)
            .unwrap();
        assert!(r.remove(ip));
        r.register(ip, "a", b"c", PeerId(2), addr("198.18.0.2:1"), &[], at(10))
            .unwrap();
        assert!(r.expire(at(35)).is_empty(), "silent 25 s only");
        r.register(ip, "a", b"c", PeerId(2), addr("198.18.0.2:1"), &[], at(36))
            .unwrap();
        assert!(r.expire(at(50)).is_empty());
        assert_eq!(r.expire(at(67)), vec![(ip, PeerId(2))]);
        assert!(r.expire(at(200)).is_empty(), "gone once");
        assert!(r.silence.is_empty(), "nothing left queued");
    }

    #[test]
    fn nodes_that_fall_silent_together_go_a_slice_per_call() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(30), 100);
        for i in 0..10u8 {
            r.register(
                Ipv4Addr::new(100, 64, 0, i),
                "n",
                b"c",
                PeerId(i.into()),
                addr("198.18.0.2:1"),
                &[],
                t0,
            )
            .unwrap();
        }
        let later = t0 + Duration::from_secs(31);
        assert_eq!(r.expire_some(later, 4).len(), 4);
        assert_eq!(r.expire_some(later, 4).len(), 4);
        assert_eq!(r.expire_some(later, 4).len(), 2);
        assert!(r.is_empty());
    }
}
