//! The lighthouse's Prometheus metrics (`[metrics] listen`): built by the
//! event loop, the core's one owner, at each scrape, from counters only
//! (no list of nodes is copied, however many are registered). The names
//! are documented in docs/metrics.md.

use tern_lighthouse_core::lighthouse::LighthouseCore;
use tern_udp::metrics::{self as m, Exposition};

use super::enrollment::{EnrollResults, EnrollmentHandle};

/// Every metric of a lighthouse, in Prometheus' text format.
pub fn render(
    core: &LighthouseCore,
    cert_not_after: u64,
    enrollment: Option<&EnrollmentHandle>,
    results: &EnrollResults,
    links: &tern_udp::stream::Streams,
    admin: &super::admin::Admin,
    flows: &super::flows::FlowStore,
) -> String {
    let s = core.metrics();
    let c = s.counters;
    let mut e = Exposition::new();
    m::identity(&mut e, "lighthouse", cert_not_after);
    m::mesh(
        &mut e,
        s.mesh_counters,
        s.peer_paths,
        &[
            ("not_control", c.non_control_drops),
            ("bad_control_message", c.bad_control_messages),
        ],
    );
    let (dropped, refused_out) = core.admin_packet_drops();
    e.counter_by(
        "tern_lighthouse_admin_refused_total",
        "Admin API requests refused because the caller's groups do not allow them (403), \
         and the admin listener's packets dropped (the stack behind, or an answer to no peer's own address).",
        "what",
        &[
            (
                "request",
                admin.refused.load(std::sync::atomic::Ordering::Relaxed),
            ),
            ("packet_in", dropped),
            ("packet_out", refused_out),
        ],
    );
    e.gauge(
        "tern_lighthouse_registered_nodes",
        "Nodes registered with this lighthouse now.",
        s.registered as f64,
    );
    e.gauge(
        "tern_lighthouse_tcp_links",
        "Nodes connected over TCP ([listen] tcp) now.",
        links.links() as f64,
    );
    e.counter(
        "tern_lighthouse_tcp_link_drops_total",
        "Datagrams to or from TCP links dropped because a queue was full.",
        links.dropped(),
    );
    e.counter(
        "tern_lighthouse_registrations_total",
        "Registrations received (each node re-registers every few seconds).",
        c.registrations,
    );
    e.counter_by(
        "tern_lighthouse_lookups_total",
        "Lookups of a node by overlay address, by outcome (unanswered: no such node registered).",
        "outcome",
        &[
            ("answered", c.queries.saturating_sub(c.queries_unanswered)),
            ("unanswered", c.queries_unanswered),
        ],
    );
    e.counter(
        "tern_lighthouse_lookups_answered_late_total",
        "Unanswered lookups answered when their node registered a moment later.",
        c.queries_answered_late,
    );
    e.counter(
        "tern_lighthouse_name_queries_total",
        "Lookups of a node by name (mesh DNS).",
        c.name_queries,
    );
    e.counter(
        "tern_lighthouse_punches_total",
        "Introductions sent so that two nodes punch toward each other.",
        c.punches,
    );
    e.counter_by(
        "tern_lighthouse_refusals_total",
        "What registered nodes asked for and were refused, by what.",
        "what",
        &[
            ("routes", c.routes_refused),
            ("zones", c.zones_refused),
            ("runner_advert", c.runner_adverts_refused),
            ("registry_full", c.registry_full),
        ],
    );
    e.counter_by(
        "tern_lighthouse_enrollments_total",
        "Enrollment requests decided, by result (zero when [enroll] is off).",
        "result",
        &results.snapshot(),
    );
    let (hellos, requests) = enrollment.map_or((0, 0), |h| {
        let c = h.counters();
        (
            c.hellos.limited_per_source + c.hellos.limited_total,
            c.requests.limited_per_source + c.requests.limited_total + c.undersized,
        )
    });
    e.counter_by(
        "tern_lighthouse_enrollment_drops_total",
        "Enrollment datagrams dropped before any work (over a rate, or shorter than their padding).",
        "message",
        &[("hello", hellos), ("request", requests)],
    );
    e.gauge(
        "tern_lighthouse_revocation_version",
        "The version of the revocation list this lighthouse serves (the store's sequence).",
        f64::from(s.revocations_version),
    );
    e.gauge(
        "tern_lighthouse_revoked_certificates",
        "Certificates revoked and not yet expired.",
        s.revoked as f64,
    );
    flow_records(&mut e, c, flows);
    let r = s.relay;
    e.gauge(
        "tern_lighthouse_relay_nodes",
        "Nodes that offered to relay for others within the last 10 s.",
        s.relay_nodes as f64,
    );
    e.counter(
        "tern_lighthouse_relay_node_introductions_total",
        "Pairs handed to a relay node instead of this lighthouse's relay.",
        c.relay_node_introductions,
    );
    e.gauge(
        "tern_relay_introductions",
        "Pairs of nodes this lighthouse may relay for now (0 when relaying is off).",
        s.relay_introductions as f64,
    );
    m::relay(&mut e, r);
    e.render()
}

/// What became of the flow records nodes sent.
fn flow_records(
    e: &mut Exposition,
    c: &tern_lighthouse_core::lighthouse::LighthouseCounters,
    flows: &super::flows::FlowStore,
) {
    let (stored, failed, pruned) = flows.counts();
    e.counter_by(
        "tern_lighthouse_flow_records_total",
        "Flow records nodes sent, by what became of them.",
        "outcome",
        &[
            ("received", c.flow_records_received),
            ("stored", stored),
            ("failed", failed),
            ("pruned", pruned),
        ],
    );
    e.counter(
        "tern_lighthouse_flow_batches_refused_total",
        "Messages of flow records not acknowledged because the store's queue was full (the node sends them again).",
        c.flow_batches_refused,
    );
}
