//! The console's pages: HTML from what the registry and the store say,
//! rendered by maud (every value escaped). Each page works without
//! script; `console.js` only makes the live parts update themselves and
//! the copy button copy. The live parts are rendered by the same functions
//! for the page and for its server-sent updates.

use maud::{html, Markup, DOCTYPE};
use tern_lighthouse_core::admin::{
    AdminNode, AdminOverview, NodeFilter, NodesPage, Page, REACHABLE_SECS,
};
use tern_lighthouse_core::registry::{GatewayEntry, RunnerEntry};

use crate::ops::{CreatedToken, IssuedEntry, IssuedPage, ListedRevocation, ListedToken};
use tern_lighthouse_core::flows::FlowQuery;
use tern_shared::flows::FlowView;

/// Who is looking, and what they may do.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub name: String,
    pub groups: Vec<String>,
    pub can_write: bool,
    /// The token this viewer's forms carry.
    pub csrf: String,
    /// Known by a certificate through the mesh (else: a local user on the
    /// API socket).
    pub by_certificate: bool,
}

/// The lighthouse serving the console.
#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    pub overlay_ip: std::net::Ipv4Addr,
}

/// The pages in the navigation: path and label.
const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/nodes", "Nodes"),
    ("/gateways", "Gateways"),
    ("/runners", "Runners"),
    ("/tokens", "Tokens"),
    ("/revocations", "Revocations"),
    ("/issued", "Issuance log"),
    ("/flows", "Flows"),
];

/// A whole page: head, navigation (the current page marked), who is
/// looking, `body` in `main`.
pub fn layout(
    site: &Site,
    viewer: Option<&Viewer>,
    current: &str,
    title: &str,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="same-origin";
                title { (title) " · " (site.name) " · Tern" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    p.brand { "Tern · " (site.name) " " span.addr { (site.overlay_ip) } }
                    @if viewer.is_some() {
                        nav aria-label="Console" {
                            ul {
                                @for (path, label) in NAV {
                                    li {
                                        @if *path == current {
                                            a href=(path) aria-current="page" { (label) }
                                        } @else {
                                            a href=(path) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if let Some(v) = viewer {
                        p.who {
                            @if v.by_certificate {
                                "You are " strong { (v.name) }
                                " (" (groups_text(&v.groups)) "), by your certificate; "
                            } @else {
                                "You are a local user on the lighthouse's host (its API socket); "
                            }
                            @if v.can_write { "you may read and act." } @else { "you may read." }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
                footer {
                    p { "Served by the lighthouse " (site.name) " through the mesh. "
                        a href="/api/v1/openapi.json" { "The admin API" } " has the same data as JSON." }
                }
            }
        }
    }
}

fn groups_text(groups: &[String]) -> String {
    if groups.is_empty() {
        "no groups".into()
    } else {
        format!("groups {}", groups.join(", "))
    }
}

/// "12 s ago", "3 min ago".
fn ago(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

fn reachable(last_seen_secs_ago: u64) -> Markup {
    if last_seen_secs_ago <= REACHABLE_SECS {
        html! { span.ok { "reachable" } }
    } else {
        html! { span.bad { "silent " (ago(last_seen_secs_ago)) } }
    }
}

/// The overview's live part: the counts, then gateways and runners.
pub fn overview_live(o: &AdminOverview, enrolled_last_hour: Option<u64>) -> Markup {
    html! {
        h2 { "The mesh now" }
        dl.stats {
            div { dt { "Nodes online" } dd #nodes-online { (o.nodes) } }
            div { dt { "CI jobs and other enrolled nodes" } dd { (o.ephemeral) } }
            div { dt { "Enrollments in the last hour" } dd {
                @match enrolled_last_hour { Some(n) => (n), None => "unknown" } } }
            div { dt { "Node pairs introduced for relaying here" } dd { (o.relayed_pairs) } }
            div { dt { "Nodes reaching it over TCP" } dd { (o.over_tcp) } }
        }
        p.note { "Pairs with no direct path are introduced for relaying; they leave the relay once a direct path works. All other paths are direct, or through a relay node." }
        h2 { "Gateways" }
        (gateways_table(&o.gateways.items))
        @if o.gateways.next.is_some() { p { a href="/gateways" { "All gateways" } } }
        h2 { "Runners" }
        (runners_table(&o.runners.items))
        @if o.runners.next.is_some() { p { a href="/runners" { "All runners" } } }
    }
}

/// The overview page.
pub fn overview(o: &AdminOverview, enrolled_last_hour: Option<u64>) -> Markup {
    html! {
        section data-live="/events?view=overview" aria-label="The mesh now, updated live" {
            (overview_live(o, enrolled_last_hour))
        }
    }
}

fn gateways_table(items: &[GatewayEntry]) -> Markup {
    html! {
        @if items.is_empty() {
            p { "No gateway is registered." }
        } @else {
            div.scroll {
                table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Address" } th scope="col" { "Subnets" }
                        th scope="col" { "Zones" } th scope="col" { "State" } } }
                    tbody {
                        @for g in items {
                            tr {
                                td { a href={ "/nodes/" (g.overlay_ip) } { (g.name) } }
                                td { (g.overlay_ip) }
                                td { (list_text(g.routes.iter())) }
                                td { (list_text(g.zones.iter())) }
                                td { (reachable(g.last_seen_secs_ago)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn runners_table(items: &[RunnerEntry]) -> Markup {
    html! {
        @if items.is_empty() {
            p { "No runner is registered." }
        } @else {
            div.scroll {
                table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Address" } th scope="col" { "Labels" }
                        th scope="col" { "Jobs running" } th scope="col" { "Queued" } th scope="col" { "Slots" } th scope="col" { "State" } } }
                    tbody {
                        @for r in items {
                            tr {
                                td { a href={ "/nodes/" (r.overlay_ip) } { (r.name) } }
                                td { (r.overlay_ip) }
                                td { (list_text(r.labels.iter())) }
                                td { (r.load.running) }
                                td { (r.load.queued) }
                                td { (r.load.concurrency) }
                                td { (reachable(r.last_seen_secs_ago)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn list_text<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let all: Vec<String> = items.map(|i| i.to_string()).collect();
    if all.is_empty() {
        "—".into()
    } else {
        all.join(", ")
    }
}

/// The query string of a node list (for links and the live view).
pub fn nodes_query(filter: &NodeFilter, after: Option<std::net::Ipv4Addr>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(t) = &filter.text {
        q.append_pair("q", t);
    }
    if let Some(g) = &filter.group {
        q.append_pair("group", g);
    }
    if let Some(e) = filter.ephemeral {
        q.append_pair("ephemeral", if e { "true" } else { "false" });
    }
    if let Some(a) = after {
        q.append_pair("after", &a.to_string());
    }
    q.finish()
}

/// The node list's live part: the count, the table, the next page.
pub fn nodes_live(page: &NodesPage, filter: &NodeFilter) -> Markup {
    html! {
        p #nodes-count { (page.total) @if page.total == 1 { " node" } @else { " nodes" }
            @if filter.is_empty() { " registered" } @else if page.total == 1 { " matches" } @else { " match" } "." }
        @if !page.nodes.is_empty() {
            div.scroll {
                table #nodes {
                    caption.visually-hidden { "Registered nodes" }
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Address" } th scope="col" { "Groups" }
                        th scope="col" { "Kind" } th scope="col" { "Path to lighthouse" } th scope="col" { "Last seen" } } }
                    tbody {
                        @for n in &page.nodes {
                            tr {
                                td { a href={ "/nodes/" (n.overlay_ip) } { (n.name) } }
                                td { (n.overlay_ip) }
                                td { (list_text(n.groups.iter())) }
                                td { @if n.ephemeral { "enrolled (ephemeral)" } @else { "long-lived" } }
                                td { (n.transport) @if !n.relayed_with.is_empty() { ", relay for " (n.relayed_with.len()) } }
                                td { (ago(n.last_seen_secs_ago)) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(next) = page.next {
            p { a rel="next" href={ "/nodes?" (nodes_query(filter, Some(next))) } { "Next page" } }
        }
    }
}

/// The node list with its search form.
pub fn nodes(page: &NodesPage, filter: &NodeFilter, after: Option<std::net::Ipv4Addr>) -> Markup {
    let kind = filter.ephemeral;
    html! {
        form.filters method="get" action="/nodes" role="search" {
            div { label for="q" { "Name or address contains" }
                input #q type="search" name="q" value=(filter.text.as_deref().unwrap_or("")) autocomplete="off"; }
            div { label for="group" { "In group" }
                input #group type="text" name="group" value=(filter.group.as_deref().unwrap_or("")) autocomplete="off"; }
            div { label for="ephemeral" { "Kind" }
                select #ephemeral name="ephemeral" {
                    option value="" selected[kind.is_none()] { "any" }
                    option value="true" selected[kind == Some(true)] { "enrolled (ephemeral)" }
                    option value="false" selected[kind == Some(false)] { "long-lived" }
                }
            }
            div { button type="submit" { "Filter" } }
        }
        section data-live={ "/events?view=nodes&" (nodes_query(filter, after)) } aria-label="Nodes, updated live" {
            (nodes_live(page, filter))
        }
    }
}

/// One node: its certificate, where it is, its paths, how it enrolled.
pub fn node(
    n: &AdminNode,
    issued: Option<&IssuedEntry>,
    flows: &[FlowView],
    viewer: &Viewer,
) -> Markup {
    html! {
        h2 { "Certificate" }
        dl.facts {
            dt { "Name" } dd { (n.name) }
            dt { "Overlay address" } dd { (n.overlay_ip) }
            dt { "Groups" } dd { (list_text(n.groups.iter())) }
            dt { "Fingerprint" } dd { code.fp { (n.fingerprint) } }
            dt { "Expires" } dd { (n.expires) }
            dt { "Kind" } dd { @if n.ephemeral { "enrolled (ephemeral)" } @else { "long-lived" }
                @if let Some(i) = &n.issued_by { ", issued by " (i) } }
        }
        h2 { "Where it is" }
        dl.facts {
            dt { "Registered from" } dd { (n.observed) " over " (n.transport) }
            dt { "Its own addresses" } dd { (list_text(n.local.iter())) }
            dt { "Registered" } dd { (ago(n.registered_secs_ago)) }
            dt { "Last seen" } dd { (ago(n.last_seen_secs_ago)) }
        }
        h2 { "Paths" }
        @if n.relayed_with.is_empty() {
            p { "It was introduced for relaying with no node here: its paths are direct (or through a relay node)." }
        } @else {
            p { "Introduced for relaying through this lighthouse with (it leaves the relay once a direct path works): "
                @for (i, ip) in n.relayed_with.iter().enumerate() {
                    @if i > 0 { ", " }
                    a href={ "/nodes/" (ip) } { (ip) }
                }
                "." }
        }
        @if !n.routes.is_empty() || !n.zones.is_empty() || n.runner.is_some() {
            h2 { "What it offers" }
            dl.facts {
                @if !n.routes.is_empty() { dt { "Subnets" } dd { (list_text(n.routes.iter())) } }
                @if !n.zones.is_empty() { dt { "DNS zones" } dd { (list_text(n.zones.iter())) } }
                @if let Some(r) = &n.runner {
                    dt { "Runner labels" } dd { (list_text(r.labels.iter())) }
                    dt { "Runner load" } dd { (r.load.running) " running, " (r.load.queued) " queued, " (r.load.concurrency) " slots" }
                }
            }
        }
        h2 { "Enrollment" }
        @match issued {
            Some(i) => dl.facts {
                dt { "Issued" } dd { (i.issued) }
                dt { "How" } dd { (i.how) }
                @if let Some(t) = &i.token { dt { "Token" } dd { code { (t) } } }
            },
            None => p { "This mesh's issuance log has no record of this certificate: it was signed by hand (tern cert sign)." },
        }
        @if let Some(i) = issued.filter(|i| !i.claims.is_empty()) {
            h3 { "Claims of the ID token it enrolled with" }
            div.scroll {
                table #claims {
                    thead { tr { th scope="col" { "Claim" } th scope="col" { "Value" } } }
                    tbody { @for (k, v) in &i.claims { tr { td { code { (k) } } td { (v) } } } }
                }
            }
        }
        h2 { "Flows" }
        @if flows.is_empty() {
            p { "No flow records of this certificate yet (a record is made when a flow ends)." }
        } @else {
            (flows_table(flows))
        }
        p { a href={ "/flows?fingerprint=" (n.fingerprint) } { "Every flow of this certificate" } }
        @if viewer.can_write {
            p { a.button.danger href={ "/nodes/" (n.overlay_ip) "/revoke" } { "Revoke this certificate…" } }
        }
    }
}

/// "Revoke NAME?" with the form that does it.
pub fn confirm_revoke(n: &AdminNode, viewer: &Viewer) -> Markup {
    html! {
        p { "Revoke the certificate of " strong { (n.name) } " (" (n.overlay_ip) ", fingerprint " code.fp { (n.fingerprint) } ")?" }
        p { "Every node and gateway refuses it from then on and ends its sessions. It cannot be undone: the node needs a new certificate." }
        form method="post" action="/revocations" {
            input type="hidden" name="csrf" value=(viewer.csrf);
            input type="hidden" name="fingerprint" value=(n.fingerprint);
            button.danger type="submit" { "Revoke " (n.name) }
            " "
            a href={ "/nodes/" (n.overlay_ip) } { "Cancel" }
        }
    }
}

/// What a revocation did.
pub fn revoked(done: &[crate::ops::Revoked]) -> Markup {
    html! {
        @for r in done {
            p role="status" { @if r.new { "Revoked " } @else { "Already revoked: " } strong { (r.name) } " (" code.fp { (r.fingerprint) } ")." }
        }
        p { a href="/revocations" { "All revocations" } " · " a href="/nodes" { "Nodes" } }
    }
}

/// The token list, each with a delete button, and the form for a new one.
pub fn tokens(list: &[ListedToken], viewer: &Viewer) -> Markup {
    html! {
        @if list.is_empty() {
            p { "No enrollment token is stored." }
        } @else {
            div.scroll {
                table #tokens {
                    caption.visually-hidden { "Enrollment tokens" }
                    thead { tr { th scope="col" { "Id" } th scope="col" { "Groups" } th scope="col" { "Uses left" }
                        th scope="col" { "Expires" } th scope="col" { "Certificate lifetime" } th scope="col" { "State" }
                        @if viewer.can_write { th scope="col" { span.visually-hidden { "Delete" } } } } }
                    tbody {
                        @for t in list {
                            tr {
                                td { code { (t.id) } }
                                td { (list_text(t.groups.iter())) }
                                td { (t.uses_left) }
                                td { (t.expires) }
                                td { (t.cert_ttl_secs) " s" }
                                td { @if t.expired { "expired" } @else if t.used_up { "used up" } @else { "live" } }
                                @if viewer.can_write {
                                    td {
                                        form method="post" action="/tokens/delete" {
                                            input type="hidden" name="csrf" value=(viewer.csrf);
                                            input type="hidden" name="id" value=(t.id);
                                            button type="submit" aria-label={ "Delete token " (t.id) } { "Delete" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if viewer.can_write {
            h2 { "New token" }
            form.create method="post" action="/tokens" {
                input type="hidden" name="csrf" value=(viewer.csrf);
                div { label for="groups" { "Groups of the certificates it buys" }
                    input #groups type="text" name="groups" required placeholder="ci" autocomplete="off"; }
                div { label for="uses" { "Enrollments it allows" }
                    input #uses type="number" name="uses" min="1" value="1"; }
                div { label for="ttl" { "Good for" }
                    input #ttl type="text" name="ttl" value="1h"; }
                div { label for="cert_ttl" { "Certificate lifetime" }
                    input #cert_ttl type="text" name="cert_ttl" value="1h"; }
                div { button type="submit" { "Create token" } }
            }
        }
    }
}

/// A token just made: its secret, this once.
pub fn token_created(t: &CreatedToken) -> Markup {
    html! {
        p role="status" { "Token " code { (t.id) } " for groups " (t.groups.join(", ")) ": "
            (t.uses) @if t.uses == 1 { " enrollment" } @else { " enrollments" } ", until " (tern_shared::cert::format_unix_time(t.expires)) "." }
        p.warn { strong { "Copy the secret now: it is shown this once." } " The lighthouse keeps only its hash." }
        div.secret {
            label for="secret" { "Secret" }
            input #secret type="text" readonly value=(t.token) size="48";
            button type="button" data-copy="secret" hidden { "Copy" }
        }
        p { "A CI job enrolls with it: " code { "tern up --config ci.toml --enroll-token \"$TOKEN\"" } "." }
        p { a href="/tokens" { "Back to the tokens" } }
    }
}

pub fn revocations(list: &[ListedRevocation]) -> Markup {
    html! {
        @if list.is_empty() {
            p { "No certificate is revoked." }
        } @else {
            div.scroll {
                table #revocations {
                    caption.visually-hidden { "Revoked certificates" }
                    thead { tr { th scope="col" { "#" } th scope="col" { "Fingerprint" } th scope="col" { "Until" } } }
                    tbody {
                        @for r in list {
                            tr {
                                td { (r.version) }
                                td { code.fp { (r.fingerprint) } }
                                td { @if r.not_after == u64::MAX { "for good" } @else { (tern_shared::cert::format_unix_time(r.not_after)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn issued(page: &IssuedPage) -> Markup {
    html! {
        @if page.items.is_empty() {
            p { "No certificate was issued." }
        } @else {
            div.scroll {
                table #issued {
                    caption.visually-hidden { "Issued certificates, newest first" }
                    thead { tr { th scope="col" { "Issued" } th scope="col" { "Name" } th scope="col" { "Address" }
                        th scope="col" { "Groups" } th scope="col" { "How" } th scope="col" { "Expires" } } }
                    tbody {
                        @for i in &page.items {
                            tr {
                                td { (i.issued) }
                                td { a href={ "/flows?fingerprint=" (i.fingerprint) } title="Its flows" { (i.name) } }
                                td { (i.overlay_ip) }
                                td { (list_text(i.groups.iter())) }
                                td { (i.how) }
                                td { (i.expires) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(next) = &page.next {
            p { a rel="next" href={ "/issued?after=" (next) } { "Older" } }
        }
    }
}

/// Flow records and the form that filters them (a GET: the URL is the
/// question, to bookmark or share).
pub fn flows(found: &[FlowView], q: &FlowQuery, dropped: &[crate::store::FlowSource]) -> Markup {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let claim = q
        .claim
        .as_ref()
        .map(|(k, v)| format!("{k}={v}"))
        .unwrap_or_default();
    let dest = q
        .dest
        .map(|(net, port)| match port {
            Some(p) => format!("{net}:{p}"),
            None => net.to_string(),
        })
        .unwrap_or_default();
    let since = q
        .since
        .map(tern_shared::duration::format_duration)
        .unwrap_or_default();
    html! {
        form.filters method="get" action="/flows" role="search" {
            div { label for="name" { "Caller" }
                input #name type="text" name="name" value=(text(&q.name)) autocomplete="off"; }
            div { label for="fingerprint" { "Fingerprint" }
                input #fingerprint type="text" name="fingerprint" value=(text(&q.fingerprint)) autocomplete="off"; }
            div { label for="claim" { "Enrolled with claim" }
                input #claim type="text" name="claim" value=(claim) placeholder="repository=org/repo" autocomplete="off"; }
            div { label for="dest" { "Destination" }
                input #dest type="text" name="dest" value=(dest) placeholder="198.19.0.0/24:5432" autocomplete="off"; }
            div { label for="since" { "Ended within" }
                input #since type="text" name="since" value=(since) placeholder="1h" autocomplete="off"; }
            div { label for="denied" { "Refusals only" }
                input #denied type="checkbox" name="denied" value="true" checked[q.denied]; }
            div { button type="submit" { "Show" } }
        }
        @for s in dropped {
            p.note { "Node " (s.node) " dropped " (s.dropped) " flow records since it started (its queues were full)." }
        }
        @if found.is_empty() {
            p { "No flow records match." }
        } @else {
            (flows_table(found))
        }
    }
}

/// Flow records as a table, newest first.
pub fn flows_table(found: &[FlowView]) -> Markup {
    html! {
        div.scroll {
            table #flows {
                caption.visually-hidden { "Flow records, newest first" }
                thead { tr {
                    th scope="col" { "Ended" } th scope="col" { "Node" } th scope="col" { "Caller" }
                    th scope="col" { "To" } th scope="col" { "Verdict" } th scope="col" { "Reason" }
                    th scope="col" { "In" } th scope="col" { "Out" } th scope="col" { "Enrolled with" }
                } }
                tbody {
                    @for f in found {
                        tr {
                            td { (f.end) }
                            td { (f.node) }
                            td { a href={ "/flows?fingerprint=" (f.fingerprint) } { (f.caller) } }
                            td { (f.dst) @if f.proto == "tcp" || f.proto == "udp" { ":" (f.dst_port)
                                @if let Some(l) = f.dst_port_last { "-" (l) } } "/" (f.proto) }
                            td { (f.verdict) @match f.rule { Some(r) => { " (rule-" (r) ")" }, None => { @if f.verdict == "deny" { " (no rule)" } } } }
                            td { (f.reason.as_str()) }
                            td { (f.bytes_in) " B, " (f.packets_in) " pkts" }
                            td { (f.bytes_out) " B, " (f.packets_out) " pkts" }
                            td { (crate::store::enrollment_summary(f.enrollment.as_ref())) }
                        }
                    }
                }
            }
        }
    }
}

pub fn gateways(page: &Page<GatewayEntry>) -> Markup {
    html! {
        (gateways_table(&page.items))
        @if let Some(next) = page.next { p { a rel="next" href={ "/gateways?after=" (next) } { "Next page" } } }
    }
}

pub fn runners(page: &Page<RunnerEntry>) -> Markup {
    html! {
        (runners_table(&page.items))
        @if let Some(next) = page.next { p { a rel="next" href={ "/runners?after=" (next) } { "Next page" } } }
        @for r in &page.items {
            h2 { "Jobs on " (r.name) }
            @if r.jobs.is_empty() {
                p { "No job since it started." }
            } @else {
                div.scroll {
                    table {
                        caption.visually-hidden { "The newest jobs on " (r.name) ", newest first" }
                        thead { tr { th scope="col" { "Job" } th scope="col" { "Pipeline" } th scope="col" { "Caller" }
                            th scope="col" { "Started" } th scope="col" { "State" } th scope="col" { "Took" } } }
                        tbody {
                            @for j in &r.jobs {
                                tr {
                                    td { code { (j.job_id) } }
                                    td { (j.pipeline) }
                                    td { (j.caller) }
                                    td { (tern_shared::cert::format_unix_time(j.started)) }
                                    td { (job_state(j)) }
                                    td { @match j.ended { Some(e) => { (e.saturating_sub(j.started)) " s" }, None => "—" } }
                                }
                            }
                        }
                    }
                }
            }
        }
        p.note { "A runner tells its six newest jobs; its audit log (" code { "[runner] audit_log" } ") has every one, with each step." }
    }
}

fn job_state(j: &tern_shared::control::RecentJob) -> Markup {
    use tern_shared::control::RecentJobState as S;
    html! {
        @match j.state {
            S::Succeeded => span.ok { "succeeded" },
            S::Failed => span.bad { "failed (exit " (j.exit_code) ")" },
            S::TimedOut | S::Error => span.bad { (j.state.as_str()) },
            S::Queued | S::Running | S::Cancelled => (j.state.as_str()),
        }
    }
}

/// An error page's body.
pub fn error(message: &str) -> Markup {
    html! {
        p role="alert" { (message) }
        p { a href="/" { "Overview" } }
    }
}

/// The page for a caller outside the groups: who they are, what they
/// lack.
pub fn forbidden(site: &Site, message: &str) -> Markup {
    layout(
        site,
        None,
        "",
        "Not allowed",
        html! {
            p role="alert" { (message) }
            p { "Ask an admin of this mesh for a certificate in one of those groups." }
        },
    )
}

/// The page for a request from somewhere else: a name that is not this
/// lighthouse's, or a form from another site's page.
pub fn refused_origin(site: &Site, message: &str) -> Markup {
    layout(
        site,
        None,
        "",
        "Refused",
        html! {
            p role="alert" { (message) "." }
            p { "The console acts with your certificate, so it takes forms only from its own pages: this keeps pages elsewhere from acting in your name. "
                "Open it at " a href={ "http://" (site.overlay_ip) "/" } { "http://" (site.overlay_ip) "/" } " and use its forms." }
        },
    )
}

/// A server-sent event carrying `fragment` (each line its own `data:`).
pub fn sse_event(fragment: &Markup) -> String {
    let mut out = String::from("event: update\n");
    for line in fragment.0.lines() {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}
