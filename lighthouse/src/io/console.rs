//! The admin console's shell: fetches what a page shows (the registry
//! from the event loop, the store on a blocking thread, as the API does),
//! renders it (`crate::console::pages`), and keeps live views live with
//! server-sent events that re-render when the registry changes. What a
//! request means, the CSRF tokens and the origin rules are in
//! `crate::console`.

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::Response;
use maud::Markup;
use tern_lighthouse_core::admin::{
    AdminNode, AdminOverview, NodeFilter, NodesPage, Page, DEFAULT_PAGE,
};
use tern_lighthouse_core::lighthouse::LighthouseCore;
use tern_lighthouse_core::registry::{GatewayEntry, RunnerEntry};
use tern_shared::admin::Access;
use tern_udp::daemon::unix_now;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::admin::{audit, on_store, permit, Admin, Caller, LoopCall};
use crate::console::pages::{self, Site, Viewer};
use crate::console::{self, AllowedHosts, Csrf, LiveView, PageError, Route};
use crate::ops;

/// A response body: a whole page, or a stream of events.
pub type Body = BoxBody<Bytes, Infallible>;

/// Live views open at once, at most (each holds a connection of the
/// admin listener's 64).
const MAX_LIVE_STREAMS: usize = 32;
/// A live view re-renders at most this often, however fast nodes come
/// and go.
const LIVE_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// A live view says something this often even when nothing changes (a
/// comment), so a closed connection is noticed.
const LIVE_KEEPALIVE: Duration = Duration::from_secs(15);
/// The enrollments-in-the-last-hour count is asked of the store at most
/// this often.
const ENROLLED_CACHE: Duration = Duration::from_secs(2);

/// What the console needs beyond the API's part of [`Admin`].
pub struct Console {
    pub csrf: Csrf,
    pub hosts: AllowedHosts,
    pub site: Site,
    changes: watch::Receiver<u64>,
    streams: Arc<Semaphore>,
    enrolled: Mutex<Option<EnrolledCount>>,
}

/// The store's last count of enrollments in the last hour.
#[derive(Debug, Clone, Copy)]
struct EnrolledCount {
    at: Instant,
    /// The registry's change count then.
    changes: u64,
    count: Option<u64>,
}

impl Console {
    pub fn new(
        site: Site,
        hosts: AllowedHosts,
        changes: watch::Receiver<u64>,
    ) -> anyhow::Result<Console> {
        Ok(Console {
            csrf: Csrf::new()
                .map_err(|_| anyhow::anyhow!("no randomness for the console's form tokens"))?,
            hosts,
            site,
            changes,
            streams: Arc::new(Semaphore::new(MAX_LIVE_STREAMS)),
            enrolled: Mutex::new(None),
        })
    }
}

/// What [`start_admin`] gives the event loop.
pub type AdminParts = (
    Arc<Admin>,
    mpsc::Receiver<LoopCall>,
    Option<super::admin::AdminListener>,
    watch::Sender<u64>,
);

/// The admin API and console: the shared state of their connections,
/// the event loop's end of their calls, the listener on the overlay
/// address (none with `[admin] port = 0`), and where the loop publishes
/// the registry's change count for the live views.
pub fn start_admin(
    core: &mut LighthouseCore,
    cert: &tern_shared::cert::VerifiedCert,
    config: &tern_shared::config::LighthouseConfig,
    config_path: &std::path::Path,
    seed: u64,
) -> anyhow::Result<AdminParts> {
    let (calls_tx, calls_rx) = mpsc::channel::<LoopCall>(16);
    let (changes_tx, changes_rx) = watch::channel(core.admin_changes());
    let console = Console::new(
        Site {
            name: cert.name().to_string(),
            overlay_ip: cert.overlay_ip(),
        },
        AllowedHosts::new(cert.overlay_ip(), cert.name(), &config.admin.hosts),
        changes_rx,
    )?;
    let admin = Admin::new(calls_tx, config_path, &config.admin, console);
    let listener =
        super::admin::AdminListener::start(core, cert.overlay_net(), &config.admin, seed);
    Ok((admin, calls_rx, listener, changes_tx))
}

/// Tells the live views the registry's change count (after every step of
/// the event loop; they wake only when it moved).
pub fn publish_changes(changes: &watch::Sender<u64>, core: &LighthouseCore) {
    let now = core.admin_changes();
    changes.send_if_modified(|seen| std::mem::replace(seen, now) != now);
}

/// What a page asks of the event loop (the registry's owner).
#[derive(Debug, Clone)]
pub enum ConsoleQuery {
    Overview,
    Nodes {
        filter: NodeFilter,
        after: Option<Ipv4Addr>,
    },
    Node(Ipv4Addr),
    Gateways(Option<Ipv4Addr>),
    Runners(Option<Ipv4Addr>),
}

/// The event loop's answer.
#[derive(Debug)]
pub enum ConsoleData {
    Overview(AdminOverview),
    Nodes(NodesPage),
    Node(Option<Box<AdminNode>>),
    Gateways(Page<GatewayEntry>),
    Runners(Page<RunnerEntry>),
}

/// Answers a query from the registry (run by the event loop).
pub fn answer(core: &LighthouseCore, query: &ConsoleQuery, now: Instant) -> ConsoleData {
    match query {
        ConsoleQuery::Overview => ConsoleData::Overview(core.admin_overview(now)),
        ConsoleQuery::Nodes { filter, after } => {
            ConsoleData::Nodes(core.admin_nodes(filter, *after, DEFAULT_PAGE, now))
        }
        ConsoleQuery::Node(ip) => ConsoleData::Node(core.admin_node(*ip, now).map(Box::new)),
        ConsoleQuery::Gateways(after) => {
            ConsoleData::Gateways(core.admin_gateways(*after, DEFAULT_PAGE, now))
        }
        ConsoleQuery::Runners(after) => {
            ConsoleData::Runners(core.admin_runners(*after, DEFAULT_PAGE, now))
        }
    }
}

fn stopping() -> PageError {
    PageError::new(
        503,
        "Stopping",
        "The lighthouse is stopping; try again in a moment.",
    )
}

async fn ask(admin: &Admin, query: ConsoleQuery) -> Result<ConsoleData, PageError> {
    let (reply, rx) = oneshot::channel();
    admin
        .calls
        .send(LoopCall::Console { query, reply })
        .await
        .map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())
}

/// A store operation on a blocking thread.
async fn store<T: Send + 'static>(
    admin: &Admin,
    op: impl FnOnce(&std::path::Path) -> Result<T, ops::OpError> + Send + 'static,
) -> Result<T, PageError> {
    on_store(admin, op).await.map_err(|api| {
        let title = match api.status() {
            400 => "Bad request",
            404 => "Not found",
            503 => "Not available",
            _ => "Internal error",
        };
        PageError::new(api.status(), title, api.message)
    })
}

/// Enrollments in the last hour, asked of the store again when the
/// registry changed (an enrollment is followed by its registration) or
/// the answer is [`ENROLLED_CACHE`] old, and at most every
/// [`LIVE_MIN_INTERVAL`]; None when the store cannot say.
async fn enrolled_last_hour(admin: &Admin) -> Option<u64> {
    let changes = *admin.console.changes.borrow();
    if let Ok(cached) = admin.console.enrolled.lock() {
        if let Some(c) = *cached {
            let age = c.at.elapsed();
            let fresh = age < ENROLLED_CACHE && c.changes == changes;
            if fresh || age < LIVE_MIN_INTERVAL {
                return c.count;
            }
        }
    }
    let since = unix_now().saturating_sub(3600) as i64;
    let count = store(admin, move |p| ops::issued_since(p, since))
        .await
        .ok();
    if let Ok(mut cached) = admin.console.enrolled.lock() {
        *cached = Some(EnrolledCount {
            at: Instant::now(),
            changes,
            count,
        });
    }
    count
}

/// Who a caller is for the forms' tokens.
fn who(caller: &Caller) -> String {
    match caller {
        Caller::Peer { fingerprint, .. } => fingerprint.clone(),
        Caller::Local { uid } => format!("local {uid:?}"),
    }
}

fn viewer(admin: &Admin, caller: &Caller) -> Viewer {
    let (name, groups) = match caller {
        Caller::Peer { name, groups, .. } => (name.clone(), groups.clone()),
        Caller::Local { .. } => ("a local user".to_string(), Vec::new()),
    };
    Viewer {
        name,
        groups,
        can_write: caller.access() == Access::Write,
        csrf: admin.console.csrf.token(&who(caller), unix_now()),
        by_certificate: matches!(caller, Caller::Peer { .. }),
    }
}

/// Serves a console request (anything not under `/api/v1/`).
pub async fn handle(
    admin: &Arc<Admin>,
    caller: &Caller,
    method: &str,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let (route, csrf) = match console::parse(method, path, query, content_type, body) {
        Ok(r) => r,
        Err(e) => return error_page(admin, caller, &e),
    };
    if let Route::Asset(a) = route {
        return respond(200, a.content_type, Bytes::from_static(a.body.as_bytes()));
    }
    if let Err(refusal) = permit(
        admin,
        caller,
        route.is_write(),
        route.action(),
        &route.object(),
    ) {
        return html(
            403,
            &pages::forbidden(&admin.console.site, &refusal.message),
        );
    }
    if route.is_write() {
        let good = csrf
            .as_deref()
            .is_some_and(|t| admin.console.csrf.verify(&who(caller), t, unix_now()));
        if !good {
            admin.refused.fetch_add(1, Ordering::Relaxed);
            audit(caller, route.action(), &route.object(), "403 csrf");
            let e = PageError::new(
                403,
                "Form refused",
                "This form's token is missing, out of date or not yours: reload the page and send the form again.",
            );
            return error_page(admin, caller, &e);
        }
    }
    if let Route::Events(view) = route {
        return live(admin, view);
    }
    let viewer = viewer(admin, caller);
    let result = page(admin, &route, &viewer).await;
    if route.is_write() {
        let result_text = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{} {}", e.status, e.title),
        };
        audit(caller, route.action(), &route.object(), &result_text);
    }
    match result {
        Ok((status, title, current, body)) => {
            let page = pages::layout(&admin.console.site, Some(&viewer), current, &title, body);
            html(status, &page)
        }
        Err(e) => error_page(admin, caller, &e),
    }
}

/// A page's status, title, navigation entry and body.
type PageResult = Result<(u16, String, &'static str, Markup), PageError>;

async fn page(admin: &Admin, route: &Route, viewer: &Viewer) -> PageResult {
    let now = unix_now();
    Ok(match route.clone() {
        Route::Overview => {
            let ConsoleData::Overview(o) = ask(admin, ConsoleQuery::Overview).await? else {
                return Err(stopping());
            };
            let enrolled = enrolled_last_hour(admin).await;
            (200, "Overview".into(), "/", pages::overview(&o, enrolled))
        }
        Route::Nodes { filter, after } => {
            let query = ConsoleQuery::Nodes {
                filter: filter.clone(),
                after,
            };
            let ConsoleData::Nodes(p) = ask(admin, query).await? else {
                return Err(stopping());
            };
            (
                200,
                "Nodes".into(),
                "/nodes",
                pages::nodes(&p, &filter, after),
            )
        }
        Route::Node(ip) | Route::ConfirmRevoke(ip) => {
            let ConsoleData::Node(n) = ask(admin, ConsoleQuery::Node(ip)).await? else {
                return Err(stopping());
            };
            let n = n.ok_or_else(|| {
                PageError::new(
                    404,
                    "Not found",
                    format!("No node is registered at {ip} now: it may have left. The issuance log keeps what was issued."),
                )
            })?;
            if matches!(route, Route::ConfirmRevoke(_)) {
                let title = format!("Revoke {}?", n.name);
                return Ok((200, title, "/nodes", pages::confirm_revoke(&n, viewer)));
            }
            let fp = n.fingerprint.clone();
            let issued = store(admin, move |p| ops::issued_record(p, &fp)).await?;
            let query = tern_lighthouse_core::flows::FlowQuery {
                fingerprint: Some(n.fingerprint.clone()),
                limit: 20,
                ..Default::default()
            };
            let (flows, _) = store(admin, move |p| ops::flows(p, &query)).await?;
            let title = format!("Node {}", n.name);
            (
                200,
                title,
                "/nodes",
                pages::node(&n, issued.as_ref(), &flows, viewer),
            )
        }
        Route::Revoke { fingerprint } => {
            let done = store(admin, move |p| ops::revoke(p, &fingerprint, now)).await?;
            (200, "Revoked".into(), "/revocations", pages::revoked(&done))
        }
        Route::Tokens => {
            let list = store(admin, move |p| ops::list_tokens(p, now)).await?;
            (
                200,
                "Enrollment tokens".into(),
                "/tokens",
                pages::tokens(&list, viewer),
            )
        }
        Route::CreateToken(t) => {
            let made = store(admin, move |p| {
                ops::create_token(p, &t.groups, &t.ttl, t.uses, &t.cert_ttl, now)
            })
            .await?;
            (
                201,
                "Token created".into(),
                "/tokens",
                pages::token_created(&made),
            )
        }
        Route::DeleteToken { id } => {
            store(admin, move |p| ops::delete_token(p, &id)).await?;
            let list = store(admin, move |p| ops::list_tokens(p, now)).await?;
            (
                200,
                "Enrollment tokens".into(),
                "/tokens",
                pages::tokens(&list, viewer),
            )
        }
        Route::Revocations => {
            let list = store(admin, move |p| ops::list_revocations(p, now)).await?;
            (
                200,
                "Revocations".into(),
                "/revocations",
                pages::revocations(&list),
            )
        }
        Route::Flows(query) => {
            let q = query.clone();
            let (flows, sources) = store(admin, move |p| ops::flows(p, &q)).await?;
            let dropped: Vec<_> = sources.into_iter().filter(|s| s.dropped > 0).collect();
            (
                200,
                "Flows".into(),
                "/flows",
                pages::flows(&flows, &query, &dropped),
            )
        }
        Route::Issued { after } => {
            let page = store(admin, move |p| {
                ops::issued_page(p, after.as_ref(), DEFAULT_PAGE)
            })
            .await?;
            (200, "Issuance log".into(), "/issued", pages::issued(&page))
        }
        Route::Gateways { after } => {
            let ConsoleData::Gateways(p) = ask(admin, ConsoleQuery::Gateways(after)).await? else {
                return Err(stopping());
            };
            (200, "Gateways".into(), "/gateways", pages::gateways(&p))
        }
        Route::Runners { after } => {
            let ConsoleData::Runners(p) = ask(admin, ConsoleQuery::Runners(after)).await? else {
                return Err(stopping());
            };
            (200, "Runners".into(), "/runners", pages::runners(&p))
        }
        Route::Events(_) | Route::Asset(_) => {
            return Err(PageError::new(500, "Internal error", "not a page"))
        }
    })
}

/// A live view's part, rendered now.
async fn render_live(admin: &Admin, view: &LiveView) -> Result<Markup, PageError> {
    match view {
        LiveView::Overview => {
            let ConsoleData::Overview(o) = ask(admin, ConsoleQuery::Overview).await? else {
                return Err(stopping());
            };
            Ok(pages::overview_live(&o, enrolled_last_hour(admin).await))
        }
        LiveView::Nodes { filter, after } => {
            let query = ConsoleQuery::Nodes {
                filter: filter.clone(),
                after: *after,
            };
            let ConsoleData::Nodes(p) = ask(admin, query).await? else {
                return Err(stopping());
            };
            Ok(pages::nodes_live(&p, filter))
        }
    }
}

/// Server-sent events for a live view: its part re-rendered whenever the
/// registry changes (at most every [`LIVE_MIN_INTERVAL`]), sent when it
/// differs from the last one sent.
fn live(admin: &Arc<Admin>, view: LiveView) -> Response<Body> {
    let Ok(permit) = admin.console.streams.clone().try_acquire_owned() else {
        let e = PageError::new(503, "Busy", format!("{MAX_LIVE_STREAMS} live views are open already; this page still works, it just will not update itself."));
        return respond(503, "text/plain; charset=utf-8", Bytes::from(e.message));
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let admin = admin.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut changes = admin.console.changes.clone();
        let mut last = String::new();
        if tx
            .send(Bytes::from_static(b"retry: 3000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let Ok(part) = render_live(&admin, &view).await else {
                return;
            };
            if part.0 != last {
                let event = pages::sse_event(&part);
                last = part.0;
                if tx.send(Bytes::from(event)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(LIVE_KEEPALIVE) => {
                    if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(LIVE_MIN_INTERVAL).await;
        }
    });
    let mut response = respond(200, "text/event-stream", Bytes::new());
    *response.body_mut() = EventStream(rx).boxed();
    response
}

/// A body that is whatever the live view's task sends, until it stops.
struct EventStream(mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn error_page(admin: &Admin, caller: &Caller, e: &PageError) -> Response<Body> {
    let viewer = (caller.access() != Access::None).then(|| viewer(admin, caller));
    let page = pages::layout(
        &admin.console.site,
        viewer.as_ref(),
        "",
        e.title,
        pages::error(&e.message),
    );
    html(e.status, &page)
}

/// The 403 page for a request whose `Host` or `Origin` is not this
/// lighthouse's.
pub fn refused_origin(admin: &Admin, message: &str) -> Response<Body> {
    html(403, &pages::forbidden(&admin.console.site, message))
}

fn html(status: u16, page: &Markup) -> Response<Body> {
    respond(
        status,
        "text/html; charset=utf-8",
        Bytes::from(page.0.clone()),
    )
}

/// A response with the console's security headers.
fn respond(status: u16, content_type: &str, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header("content-security-policy", console::CSP)
        .header("x-frame-options", "DENY")
        .header("x-content-type-options", "nosniff")
        // Not no-referrer: with it a browser sends `Origin: null` on a form
        // POST, and the origin check could not tell its own pages.
        .header("referrer-policy", "same-origin")
        .header("cross-origin-opener-policy", "same-origin")
        .header("cross-origin-resource-policy", "same-origin")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(body).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}
