//! Questions the shell asks on behalf of the CLI, answered later: pings,
//! runner finds (and this node's own runner advert), and policy queries to
//! the peer in front of a target.

use super::*;
use tern_shared::control::{RecentJob, MAX_RECENT_JOBS};

/// How long [`NodeCore::find_runners`] waits for every lighthouse to answer.
pub const FIND_RUNNERS_TIMEOUT: Duration = Duration::from_secs(2);

/// A control ping (`tern ping`, liveness checks) unanswered this long is lost.
/// Long enough for a lookup, a handshake and a relay fallback.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The answer to [`NodeCore::ping`], or its timeout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingResult {
    pub id: u32,
    pub overlay_ip: Ipv4Addr,
    /// The peer's certificate name, once known.
    pub name: Option<String>,
    /// None: no answer within [`PING_TIMEOUT`].
    pub rtt_ms: Option<f64>,
    /// The path the answer came back on.
    pub path: Option<tern_mesh::PathKind>,
    pub endpoint: Option<SocketAddr>,
    pub relay: Option<SocketAddr>,
    /// The transport of that path (the node's shell says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<tern_shared::transport::PathTransport>,
    /// Every lighthouse said it does not know the address: no answer can
    /// come.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl PingResult {
    /// No lighthouse knows the address: no answer can come.
    pub(super) fn unknown(id: u32, overlay_ip: Ipv4Addr) -> PingResult {
        PingResult {
            id,
            overlay_ip,
            name: None,
            rtt_ms: None,
            path: None,
            endpoint: None,
            relay: None,
            transport: None,
            unknown: true,
        }
    }
}

/// The answer to [`NodeCore::find_runners`]: what the lighthouses that
/// answered know, least busy first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnersResult {
    pub id: u32,
    pub runners: Vec<RunnerInfo>,
    pub asked: usize,
    pub answered: usize,
}

pub(super) struct PendingFind {
    pub(super) sent: Instant,
    /// Request ids still unanswered, one per lighthouse asked.
    pub(super) waiting: Vec<u32>,
    pub(super) asked: usize,
    pub(super) runners: Vec<RunnerInfo>,
}

/// The runner this node offers, as advertised to lighthouses.
pub(super) struct RunnerAdvert {
    pub(super) labels: Vec<String>,
    pub(super) load: RunnerLoad,
    /// Its newest jobs, sent after the advert when there are any.
    pub(super) jobs: Vec<RecentJob>,
}

pub(super) struct PendingPing {
    pub(super) overlay_ip: Ipv4Addr,
    pub(super) sent: Instant,
    /// Somebody (the API) waits for the result.
    pub(super) report: bool,
}

/// A [`ControlMessage::PolicyQuery`] waiting for its answer.
pub(super) struct PendingPolicy {
    /// Whom we asked: only its answer counts.
    pub(super) asked: Ipv4Addr,
    pub(super) sent: Instant,
}

/// What [`NodeCore::ask_policy`] learned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyResult {
    pub id: u32,
    /// The name of the peer that answered.
    pub asked: Option<String>,
    /// `None`: no answer in time.
    pub answer: Option<PolicyAnswer>,
}

impl NodeCore {
    /// Advertises a runner with these labels to every lighthouse (after
    /// each registration, and at once when its load changes).
    pub fn set_runner(&mut self, labels: Vec<String>, load: RunnerLoad, now: Instant) {
        self.queries.runner = Some(RunnerAdvert {
            labels,
            load,
            jobs: Vec::new(),
        });
        self.advertise_runner(None, now);
    }

    pub fn set_runner_load(&mut self, load: RunnerLoad, now: Instant) {
        if let Some(r) = &mut self.queries.runner {
            if r.load != load {
                r.load = load;
                self.advertise_runner(None, now);
            }
        }
    }

    /// The runner's newest jobs changed (newest first; at most
    /// [`MAX_RECENT_JOBS`] are told): tells every lighthouse.
    pub fn set_runner_jobs(&mut self, mut jobs: Vec<RecentJob>, now: Instant) {
        jobs.truncate(MAX_RECENT_JOBS);
        if let Some(r) = &mut self.queries.runner {
            if r.jobs != jobs {
                r.jobs = jobs;
                self.advertise_runner(None, now);
            }
        }
    }

    /// Sends the runner advert (and its jobs) to one lighthouse peer, or to
    /// all registered.
    pub(super) fn advertise_runner(&mut self, only: Option<PeerId>, now: Instant) {
        let Some(r) = &self.queries.runner else {
            return;
        };
        let (labels, load, jobs) = (r.labels.clone(), r.load, r.jobs.clone());
        let targets = self.registered_lighthouses();
        for (peer, ip) in targets
            .into_iter()
            .filter(|(p, _)| only.is_none_or(|o| o == *p))
        {
            let id = self.request_id();
            let msg = ControlMessage::RunnerAdvert {
                id,
                labels: labels.clone(),
                load,
            };
            self.send_control(peer, ip, &msg, now);
            if !jobs.is_empty() {
                let id = self.request_id();
                let msg = ControlMessage::RunnerJobs {
                    id,
                    jobs: jobs.clone(),
                };
                self.send_control(peer, ip, &msg, now);
            }
        }
    }

    /// `tern run --on LABEL | --node NAME`: asks every registered
    /// lighthouse which runners match. The merged answer comes out of
    /// [`NodeEvent::Runners`] with the returned id once all have
    /// answered or [`FIND_RUNNERS_TIMEOUT`] passed.
    pub fn find_runners(
        &mut self,
        selector: RunnerSelector,
        now: Instant,
    ) -> Result<u32, CoreError> {
        let waiting = self.ask_lighthouses(
            |request| ControlMessage::RunnersQuery {
                id: request,
                selector: selector.clone(),
            },
            now,
        )?;
        let id = self.request_id();
        self.queries.finds.insert(
            id,
            PendingFind {
                sent: now,
                asked: waiting.len(),
                waiting,
                runners: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Sends `question(request id)` to every registered lighthouse; the
    /// request ids, one per lighthouse asked.
    pub(super) fn ask_lighthouses(
        &mut self,
        question: impl Fn(u32) -> ControlMessage,
        now: Instant,
    ) -> Result<Vec<u32>, CoreError> {
        let targets = self.registered_lighthouses();
        if targets.is_empty() {
            return Err(CoreError::NoLighthouse);
        }
        let mut requests = Vec::with_capacity(targets.len());
        for (peer, ip) in targets {
            let request = self.request_id();
            requests.push(request);
            self.send_control(peer, ip, &question(request), now);
        }
        Ok(requests)
    }

    pub(super) fn runners_reply(&mut self, request: u32, runners: Vec<RunnerInfo>) {
        let Some((&id, find)) = self
            .queries
            .finds
            .iter_mut()
            .find(|(_, f)| f.waiting.contains(&request))
        else {
            return;
        };
        find.waiting.retain(|&r| r != request);
        for r in runners {
            // Lighthouses may disagree on the load; keep the first answer.
            if !find.runners.iter().any(|x| x.overlay_ip == r.overlay_ip) {
                find.runners.push(r);
            }
        }
        if find.waiting.is_empty() {
            self.finish_find(id);
        }
    }

    pub(super) fn finish_find(&mut self, id: u32) {
        let Some(find) = self.queries.finds.remove(&id) else {
            return;
        };
        let mut runners = find.runners;
        tern_shared::control::sort_least_busy(&mut runners);
        self.events.runners(RunnersResult {
            id,
            answered: find.asked - find.waiting.len(),
            asked: find.asked,
            runners,
        });
    }

    pub(super) fn drive_finds(&mut self, now: Instant) {
        let late: Vec<u32> = self
            .queries
            .finds
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.sent) >= FIND_RUNNERS_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.finish_find(id);
        }
    }

    /// `tern ping`: a control ping to `target` (an overlay address, or the
    /// name of a peer in the table), looked up first when the peer is not
    /// known yet. The answer, or its absence, comes out of
    /// [`NodeEvent::Ping`] with the returned id.
    pub fn ping(&mut self, target: &str, now: Instant) -> Result<u32, CoreError> {
        let overlay_ip = match target.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => self
                .mesh
                .peer_statuses()
                .into_iter()
                .find(|p| p.name == target)
                .map(|p| p.overlay_ip)
                .ok_or_else(|| CoreError::UnknownName(target.to_string()))?,
        };
        if overlay_ip == self.overlay_ip {
            return Err(CoreError::ThisNode(overlay_ip));
        }
        if !self.overlay_net.contains(&overlay_ip) {
            return Err(CoreError::NotInOverlay {
                ip: overlay_ip,
                overlay: self.overlay_net,
            });
        }
        let id = self.request_id();
        if self.mesh.peer_by_overlay(overlay_ip).is_none() && self.known_unknown(overlay_ip) {
            self.events.ping(PingResult::unknown(id, overlay_ip));
            return Ok(id);
        }
        self.queries.pings.insert(
            id,
            PendingPing {
                overlay_ip,
                sent: now,
                report: true,
            },
        );
        match self.mesh.peer_by_overlay(overlay_ip) {
            Some(peer) => self.send_control(peer, overlay_ip, &ControlMessage::Ping { id }, now),
            None => {
                let payload = ControlMessage::Ping { id }
                    .encode()
                    .map_err(|e| CoreError::Encode(e.to_string()))?;
                let packet = build_udp_ipv4(
                    self.overlay_ip,
                    overlay_ip,
                    CONTROL_PORT,
                    CONTROL_PORT,
                    &payload,
                );
                self.wait_for_lookup(overlay_ip, &packet, now);
            }
        }
        Ok(id)
    }

    /// Asks the peer in front of `dst` (the peer itself, or the gateway in
    /// use for its subnet) whether its inbound firewall lets this node open
    /// TCP to `dst:port`. The answer (or its absence after 2 s) comes out of
    /// [`NodeEvent::Policy`] with the returned id.
    pub fn ask_policy(&mut self, dst: Ipv4Addr, port: u16, now: Instant) -> Result<u32, CoreError> {
        let asked = if self.overlay_net.contains(&dst) {
            dst
        } else {
            let route = self.route_for(dst).ok_or(CoreError::NoRoute(dst))?;
            self.choose_gateway(route, now)
                .ok_or(CoreError::NoGateway(dst))?
        };
        let peer = self
            .mesh
            .peer_by_overlay(asked)
            .filter(|p| self.mesh.is_connected(*p))
            .ok_or(CoreError::NoSession { peer: asked, dst })?;
        let id = self.request_id();
        self.queries
            .policies
            .insert(id, PendingPolicy { asked, sent: now });
        self.send_control(
            peer,
            asked,
            &ControlMessage::PolicyQuery { id, dst, port },
            now,
        );
        Ok(id)
    }

    pub(super) fn drive_policies(&mut self, now: Instant) {
        let lost: Vec<u32> = self
            .queries
            .policies
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= PING_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.queries.policies.remove(&id);
            self.events.policy(PolicyResult {
                id,
                asked: None,
                answer: None,
            });
        }
    }

    pub(super) fn pong(&mut self, peer: PeerId, id: u32, now: Instant) {
        let Some(cert) = self.mesh.peer_cert(peer) else {
            return;
        };
        let (ip, name) = (cert.overlay_ip(), cert.name().to_string());
        let Some(pending) = self.queries.pings.get(&id) else {
            return;
        };
        if pending.overlay_ip != ip {
            return;
        }
        let Some(pending) = self.queries.pings.remove(&id) else {
            return;
        };
        let rtt = now.saturating_duration_since(pending.sent);
        self.queries.rtts.insert(ip, rtt);
        if pending.report {
            let path = self.mesh.peer_path(peer);
            self.events.ping(PingResult {
                id,
                overlay_ip: ip,
                name: Some(name),
                rtt_ms: Some(rtt.as_secs_f64() * 1000.0),
                path: path.map(|(kind, _)| kind),
                endpoint: self.mesh.peer_endpoint(peer),
                relay: path.and_then(|(_, relay)| relay),
                transport: None,
                unknown: false,
            });
        }
    }

    pub(super) fn drive_pings(&mut self, now: Instant) {
        let lost: Vec<u32> = self
            .queries
            .pings
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= PING_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let Some(p) = self.queries.pings.remove(&id) else {
                continue;
            };
            if p.report {
                let name = self
                    .mesh
                    .peer_by_overlay(p.overlay_ip)
                    .and_then(|peer| self.mesh.peer_cert(peer))
                    .map(|c| c.name().to_string());
                self.events.ping(PingResult {
                    id,
                    overlay_ip: p.overlay_ip,
                    name,
                    rtt_ms: None,
                    path: None,
                    endpoint: None,
                    relay: None,
                    transport: None,
                    unknown: false,
                });
            }
        }
    }
}

/// Questions asked on the shell's behalf, waiting for their answers.
#[derive(Default)]
pub(super) struct Queries {
    pub(super) pings: HashMap<u32, PendingPing>,
    /// The last round trip measured to each peer.
    pub(super) rtts: HashMap<Ipv4Addr, Duration>,
    /// This node's own runner, advertised to the lighthouses.
    pub(super) runner: Option<RunnerAdvert>,
    pub(super) finds: HashMap<u32, PendingFind>,
    pub(super) policies: HashMap<u32, PendingPolicy>,
}

impl Queries {
    /// When a ping, a runner find or a policy query times out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let pings = self.pings.values().map(|p| p.sent + PING_TIMEOUT);
        let finds = self.finds.values().map(|f| f.sent + FIND_RUNNERS_TIMEOUT);
        let policies = self.policies.values().map(|p| p.sent + PING_TIMEOUT);
        pings.chain(finds).chain(policies).min()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_first_query_to_time_out_is_the_deadline() {
        let now = Instant::now();
        let mut queries = Queries::default();
        assert_eq!(queries.deadline(), None);
        queries.finds.insert(
            1,
            PendingFind {
                sent: now,
                waiting: vec![2],
                asked: 1,
                runners: Vec::new(),
            },
        );
        assert_eq!(queries.deadline(), Some(now + FIND_RUNNERS_TIMEOUT));
        queries.pings.insert(
            3,
            PendingPing {
                overlay_ip: Ipv4Addr::new(100, 64, 0, 9),
                sent: now - Duration::from_secs(4),
                report: true,
            },
        );
        assert_eq!(
            queries.deadline(),
            Some((now - Duration::from_secs(4) + PING_TIMEOUT).min(now + FIND_RUNNERS_TIMEOUT))
        );
        queries.policies.insert(
            4,
            PendingPolicy {
                asked: Ipv4Addr::new(100, 64, 0, 10),
                sent: now - PING_TIMEOUT,
            },
        );
        assert_eq!(queries.deadline(), Some(now), "an overdue query: at once");
    }
}
