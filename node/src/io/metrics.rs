//! The node's Prometheus metrics (`[metrics] listen`): built by the event
//! loop, the one owner of the core, at each scrape (an [`ApiRequest::Metrics`]
//! from the HTTP task), from the same counters `tern status` shows. The
//! names are documented in docs/metrics.md.
//!
//! [`ApiRequest::Metrics`]: super::api::ApiRequest::Metrics

use tern_node_core::node::NodeCore;
use tern_runner::metrics::JobMetrics;
use tern_shared::control::RunnerLoad;
use tern_udp::metrics::{self as m, Exposition};

/// The runner's part, when this node runs one.
pub struct RunnerPart<'a> {
    pub jobs: &'a JobMetrics,
    pub load: RunnerLoad,
}

/// Every metric of a node, in Prometheus' text format.
pub fn render(
    core: &NodeCore,
    cert_not_after: u64,
    runner: Option<RunnerPart<'_>>,
    services: &[super::services::RunningService],
) -> String {
    let status = core.status();
    let n = &status.node_counters;
    let mut e = Exposition::new();
    m::identity(&mut e, "node", cert_not_after);
    m::mesh(
        &mut e,
        &status.mesh_counters,
        core.mesh().peer_paths(),
        &[
            ("no_route", n.no_route_drops),
            ("no_gateway", n.no_gateway_drops),
            ("lookup_queue_full", n.lookup_queue_drops),
            ("not_for_this_node", n.not_for_us_drops),
            ("bad_control_message", n.bad_control_messages),
        ],
    );
    // A node with `[relay]` serves the same relay metrics as a lighthouse.
    if let Some(r) = &status.relaying {
        m::relay(&mut e, r);
    }
    let registered = status.lighthouses.iter().filter(|l| l.registered).count();
    e.gauge_by(
        "tern_lighthouses",
        "Lighthouses this node lists, by whether it is registered with them now.",
        "state",
        &[
            ("registered", registered as f64),
            (
                "unregistered",
                (status.lighthouses.len() - registered) as f64,
            ),
        ],
    );
    e.gauge(
        "tern_revocations_awaited",
        "1 while no lighthouse has brought its revocation list since the node started: \
         sessions with other nodes wait for it (handshakes held: tern_handshakes_held_total).",
        f64::from(u8::from(status.awaiting_revocations)),
    );
    e.counter_by(
        "tern_lookups_total",
        "Overlay addresses asked of the lighthouses that found no node, by outcome.",
        "outcome",
        &[
            ("timeout", n.lookup_timeouts),
            ("unknown", n.lookups_unknown),
            ("lying_answer", n.lying_lighthouse_answers),
        ],
    );
    let fw = &status.firewall;
    let denied: Vec<(&str, u64)> = fw.denied.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    e.counter_by(
        "tern_firewall_denied_total",
        "Packets the firewall denied, by rule or reason (direction/rule-N/action, \
         direction/default-deny, outbound/flow-table-full).",
        "rule",
        &denied,
    );
    e.counter(
        "tern_firewall_flows_allowed_total",
        "New flows the firewall let through (in and out; gateway flows among them).",
        fw.allowed_new_flows,
    );
    e.gauge(
        "tern_firewall_flows",
        "Flows the firewall tracks now (a gateway's flows into its subnets among them).",
        fw.flows as f64,
    );
    flow_records(&mut e, &status.flows);
    e.counter(
        "tern_gateway_failovers_total",
        "Routed subnets moved to another gateway because the one in use stopped answering or left.",
        n.gateway_failovers,
    );
    e.counter(
        "tern_peers_left_total",
        "Peers that said they were leaving (a stopping daemon), forgotten at once.",
        n.peers_left,
    );
    e.counter(
        "tern_gateways_unauthorized_total",
        "Gateways that advertised subnets their certificates do not carry (ignored).",
        n.unauthorized_gateways,
    );
    e.counter(
        "tern_revocations_learned_total",
        "Revoked certificates learned from the lighthouses.",
        n.revocations_learned,
    );
    let d = &status.dns.counters;
    e.counter_by(
        "tern_dns_queries_total",
        "DNS questions this node was asked, by how they were answered.",
        "answer",
        &[
            ("mesh", d.mesh_answers),
            ("gateway", d.forwarded_to_gateways),
            (
                "other",
                d.queries
                    .saturating_sub(d.mesh_answers + d.forwarded_to_gateways),
            ),
        ],
    );
    e.counter_by(
        "tern_dns_errors_total",
        "DNS questions that failed, by reason.",
        "reason",
        &[
            ("malformed", d.malformed),
            ("timeout", d.timeouts),
            ("bad_answer", d.bad_answers),
            ("forged_zone", d.forged_zone_adverts),
        ],
    );
    if let Some(r) = runner {
        e.gauge_by(
            "tern_runner_jobs",
            "Jobs on this runner now: running, or queued for a slot.",
            "state",
            &[
                ("running", f64::from(r.load.running)),
                ("queued", f64::from(r.load.queued)),
            ],
        );
        for c in r.jobs.collectors() {
            e.collector(c);
        }
    }
    services_part(&mut e, services);
    e.render()
}

/// `[[services]]`: requests by service and result.
fn services_part(e: &mut Exposition, services: &[super::services::RunningService]) {
    if !services.is_empty() {
        use std::sync::atomic::Ordering::Relaxed;
        let by = |f: fn(&super::services::ServiceCounters) -> u64| -> Vec<(&str, u64)> {
            services
                .iter()
                .map(|s| (s.name.as_str(), f(&s.counters)))
                .collect()
        };
        e.counter_by(
            "tern_service_requests_total",
            "Requests a [[services]] entry forwarded upstream, by service.",
            "service",
            &by(|c| c.forwarded.load(Relaxed)),
        );
        e.counter_by(
        "tern_service_denied_total",
        "Requests refused (403) because the caller's certificate lacks the service's groups, by service.",
        "service",
        &by(|c| c.denied.load(Relaxed)),
    );
        e.counter_by(
            "tern_service_upstream_errors_total",
            "Requests whose upstream did not answer (502), by service.",
            "service",
            &by(|c| c.upstream_errors.load(Relaxed)),
        );
    }
}

/// What became of the flow records the firewall made.
fn flow_records(e: &mut Exposition, flows: &tern_node_core::node::FlowLogStatus) {
    e.counter(
        "tern_flow_records_total",
        "Flow records made (a flow a peer started ended, or a sum of refusals).",
        flows.recorded,
    );
    e.counter(
        "tern_flow_records_dropped_total",
        "Flow records dropped because a queue was full (the data path never waits for them).",
        flows.dropped,
    );
    e.counter(
        "tern_flow_records_shipped_total",
        "Flow records a lighthouse acknowledged.",
        flows.shipped,
    );
    e.gauge(
        "tern_flow_records_waiting",
        "Flow records waiting for a lighthouse (sent and not yet acknowledged among them).",
        flows.waiting as f64,
    );
}
