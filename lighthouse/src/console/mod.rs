//! The admin console, sans IO: what a request for a page asks
//! ([`parse`]), who may send a state-changing form ([`Csrf`]) and from
//! where ([`check_origin`]), and the pages themselves (`pages.rs`, HTML
//! rendered by maud, escaped by construction). The shell
//! (`io/console.rs`) fetches what a page shows and serves it.
//!
//! The caller is the certificate the mesh verified, as for the API, so
//! there is no login and no cookie. What a browser adds to that is
//! ambient authority: any page the admin opens could make their browser
//! send a request through their node. Three things stop it: the `Host`
//! must be one of the lighthouse's own ([`AllowedHosts`]; a name of
//! someone else's pointed at the overlay address is refused, so no page
//! can read the console as same-origin), every form carries a token bound
//! to the caller's certificate and the hour ([`Csrf`]), and a browser's
//! `Origin` and `Sec-Fetch-Site` on a write must say same origin.

pub mod pages;

use std::net::Ipv4Addr;

use base64::Engine;
use tern_lighthouse_core::admin::{self, NewTokenRequest, NodeFilter, Params, MAX_BODY};

/// The console's static files, embedded in the binary.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/static/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("console.css"),
    },
    Asset {
        path: "/static/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("console.js"),
    },
];

/// The Content-Security-Policy of every page: its own script and style
/// only, no inline script, no framing, forms only to itself.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What a page request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Overview,
    Nodes {
        filter: NodeFilter,
        after: Option<Ipv4Addr>,
    },
    Node(Ipv4Addr),
    /// The page that asks "revoke this node's certificate?".
    ConfirmRevoke(Ipv4Addr),
    /// A revocation form: the certificate's fingerprint.
    Revoke {
        fingerprint: String,
    },
    Tokens,
    CreateToken(NewTokenRequest),
    DeleteToken {
        id: String,
    },
    Revocations,
    Issued {
        after: Option<(i64, String)>,
    },
    /// Flow records, filtered as `tern-lighthouse flows` filters them.
    Flows(tern_lighthouse_core::flows::FlowQuery),
    Gateways {
        after: Option<Ipv4Addr>,
    },
    Runners {
        after: Option<Ipv4Addr>,
    },
    /// Server-sent events re-rendering a live view.
    Events(LiveView),
    Asset(&'static Asset),
}

/// The parts of pages that update themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveView {
    Overview,
    Nodes {
        filter: NodeFilter,
        after: Option<Ipv4Addr>,
    },
}

impl Route {
    /// Whether it changes anything (a form; needs the write groups, a
    /// CSRF token and a same-origin browser).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Route::Revoke { .. } | Route::CreateToken(_) | Route::DeleteToken { .. }
        )
    }

    /// The action's name in the audit log (the API's names).
    pub fn action(&self) -> &'static str {
        match self {
            Route::Revoke { .. } => "revocations.create",
            Route::CreateToken(_) => "tokens.create",
            Route::DeleteToken { .. } => "tokens.delete",
            _ => "console.read",
        }
    }

    /// The object acted on, for the audit log.
    pub fn object(&self) -> String {
        match self {
            Route::Revoke { fingerprint } => fingerprint.clone(),
            Route::CreateToken(t) => format!("groups={}", t.groups.join(",")),
            Route::DeleteToken { id } => id.clone(),
            _ => String::new(),
        }
    }
}

/// A page request that cannot be served: the status and what to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageError {
    pub status: u16,
    pub title: &'static str,
    pub message: String,
}

impl PageError {
    pub fn new(status: u16, title: &'static str, message: impl Into<String>) -> PageError {
        PageError {
            status,
            title,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> PageError {
        PageError::new(400, "Bad request", message)
    }

    fn not_found(path: &str) -> PageError {
        PageError::new(
            404,
            "Not found",
            format!("There is no page {path:?}. The links above lead to every page."),
        )
    }
}

/// What a page request asks for, and the CSRF token a form carried.
/// `content_type` and `body` matter for POST only.
pub fn parse(
    method: &str,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(Route, Option<String>), PageError> {
    let q = Params::parse(query.unwrap_or("").as_bytes());
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = method == "GET" || method == "HEAD";
    if !get && method != "POST" {
        return Err(PageError::new(
            405,
            "Method not allowed",
            format!("{method} is not used by the console: pages are read with GET, forms sent with POST"),
        ));
    }
    if get {
        if let Some(asset) = ASSETS.iter().find(|a| a.path == path) {
            return Ok((Route::Asset(asset), None));
        }
        let route = match segments.as_slice() {
            [] => Route::Overview,
            ["nodes"] => Route::Nodes {
                filter: node_filter(&q)?,
                after: address(q.get("after"), "after")?,
            },
            ["nodes", ip] => Route::Node(
                address(Some(ip), "the node's address")?
                    .ok_or_else(|| PageError::not_found(path))?,
            ),
            ["nodes", ip, "revoke"] => Route::ConfirmRevoke(
                address(Some(ip), "the node's address")?
                    .ok_or_else(|| PageError::not_found(path))?,
            ),
            ["tokens"] => Route::Tokens,
            ["revocations"] => Route::Revocations,
            ["issued"] => Route::Issued {
                after: q
                    .get("after")
                    .filter(|a| !a.is_empty())
                    .map(issued_cursor)
                    .transpose()?,
            },
            ["flows"] => Route::Flows(flow_query(&q)?),
            ["gateways"] => Route::Gateways {
                after: address(q.get("after"), "after")?,
            },
            ["runners"] => Route::Runners {
                after: address(q.get("after"), "after")?,
            },
            ["events"] => Route::Events(match q.get("view").unwrap_or("") {
                "overview" => LiveView::Overview,
                "nodes" => LiveView::Nodes {
                    filter: node_filter(&q)?,
                    after: address(q.get("after"), "after")?,
                },
                other => {
                    return Err(PageError::bad(format!(
                        "view={other:?}: the live views are overview and nodes"
                    )))
                }
            }),
            _ => return Err(PageError::not_found(path)),
        };
        return Ok((route, None));
    }
    let form = content_type
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| {
            c.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(PageError::new(
            415,
            "Unsupported form",
            "The console's forms are sent as application/x-www-form-urlencoded; the JSON API is under /api/v1/.",
        ));
    }
    if body.len() > MAX_BODY {
        return Err(PageError::new(
            413,
            "Form too large",
            format!("A form is at most {MAX_BODY} bytes."),
        ));
    }
    let f = Params::parse(body);
    let csrf = f.get("csrf").map(str::to_string);
    let route = match segments.as_slice() {
        ["revocations"] => {
            let fp = f
                .get("fingerprint")
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PageError::bad("fingerprint: the certificate's fingerprint, 64 hex digits (the node's page has a revoke button that fills it in)"));
            }
            Route::Revoke { fingerprint: fp }
        }
        ["tokens"] => {
            let groups: Vec<String> = f
                .get("groups")
                .unwrap_or("")
                .split([',', ' '])
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect();
            if groups.is_empty() {
                return Err(PageError::bad(
                    "groups: name at least one group for the certificates this token buys, e.g. ci",
                ));
            }
            let uses = match f.get("uses").map(str::trim).filter(|u| !u.is_empty()) {
                None => 1,
                Some(u) => u.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    PageError::bad(format!(
                        "uses={u:?}: give a whole number of enrollments, 1 or more"
                    ))
                })?,
            };
            let text = |key: &str| {
                f.get(key)
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .unwrap_or("1h")
                    .to_string()
            };
            Route::CreateToken(NewTokenRequest {
                groups,
                uses,
                ttl: text("ttl"),
                cert_ttl: text("cert_ttl"),
            })
        }
        ["tokens", "delete"] => {
            let id = f.get("id").unwrap_or("").trim().to_ascii_lowercase();
            if id.len() < 8 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PageError::bad(
                    "id: the token's id from the token list (8 to 64 hex digits)",
                ));
            }
            Route::DeleteToken { id }
        }
        _ => return Err(PageError::not_found(path)),
    };
    Ok((route, csrf))
}

/// The Flows page's question, from its URL.
fn flow_query(q: &Params) -> Result<tern_lighthouse_core::flows::FlowQuery, PageError> {
    tern_lighthouse_core::flows::FlowQuery::from_params(
        q.get("name"),
        q.get("fingerprint"),
        q.get("claim"),
        q.get("dest"),
        q.get("since"),
        q.get("denied"),
        q.get("node"),
        q.get("limit"),
    )
    .map_err(PageError::bad)
}

fn node_filter(q: &Params) -> Result<NodeFilter, PageError> {
    NodeFilter::from_params(q.get("q"), q.get("group"), q.get("ephemeral"))
        .map_err(|e| PageError::bad(e.message))
}

fn address(text: Option<&str>, what: &str) -> Result<Option<Ipv4Addr>, PageError> {
    match text.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t
            .parse()
            .map(Some)
            .map_err(|_| PageError::bad(format!("{what}: {t:?} is not an overlay address"))),
    }
}

fn issued_cursor(a: &str) -> Result<(i64, String), PageError> {
    admin::issued_cursor(a).map_err(|_| {
        PageError::bad(format!(
            "after={a:?} is not a position in the issuance log (follow the page's Next link)"
        ))
    })
}

/// The host names the console answers to (see the module's words).
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    overlay_ip: Ipv4Addr,
    names: Vec<String>,
}

impl AllowedHosts {
    /// The overlay address, loopback, `name`, `name.tern`, and `extra`
    /// (`[admin] hosts`).
    pub fn new(overlay_ip: Ipv4Addr, name: &str, extra: &[String]) -> AllowedHosts {
        let mut names = vec![
            name.to_ascii_lowercase(),
            format!("{}.tern", name.to_ascii_lowercase()),
        ];
        names.extend(
            extra
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase()),
        );
        AllowedHosts { overlay_ip, names }
    }

    /// Whether a `Host` header (with or without a port) names this
    /// lighthouse.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim();
        let name = if let Some(rest) = host.strip_prefix('[') {
            // [v6]:port
            match rest.split_once(']') {
                Some((ip, port)) if port.is_empty() || valid_port(port.strip_prefix(':')) => ip,
                _ => return false,
            }
        } else {
            match host.rsplit_once(':') {
                Some((h, port)) if valid_port(Some(port)) => h,
                Some(_) => return false,
                None => host,
            }
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return ip == std::net::IpAddr::V4(self.overlay_ip) || ip.is_loopback();
        }
        name == "localhost" || self.names.contains(&name)
    }
}

fn valid_port(p: Option<&str>) -> bool {
    p.is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok())
}

/// Whether a request may come from where it says: its `Host` is this
/// lighthouse's, and a write from a browser says it comes from the same
/// origin. A write without `Origin` (curl, a script) passes here; forms
/// still need their CSRF token.
pub fn check_origin(
    write: bool,
    host: Option<&str>,
    origin: Option<&str>,
    fetch_site: Option<&str>,
    allowed: &AllowedHosts,
) -> Result<(), String> {
    let Some(host) = host.filter(|h| allowed.allows(h)) else {
        return Err(format!(
            "Host {:?} is not this lighthouse: open the console by its overlay address, or add the name to [admin] hosts",
            host.unwrap_or("")
        ));
    };
    if !write {
        return Ok(());
    }
    if let Some(site) = fetch_site {
        if site != "same-origin" && site != "none" {
            return Err(format!(
                "A write from another site's page (Sec-Fetch-Site: {site}) is refused"
            ));
        }
    }
    if let Some(origin) = origin {
        let same = origin
            .strip_prefix("http://")
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Err(format!(
                "A write from a page of {origin:?} is refused: only pages of http://{host} may send one"
            ));
        }
    }
    Ok(())
}

/// Tokens in forms, bound to the caller's certificate and the hour they
/// were made, signed with a key the lighthouse makes at start (so a
/// restart invalidates open forms; reloading the page gives a new one).
pub struct Csrf {
    key: ring::hmac::Key,
}

/// Hours a form's token stays good.
pub const CSRF_HOURS: u64 = 12;

impl Csrf {
    pub fn new() -> Result<Csrf, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(Csrf {
            key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)?,
        })
    }

    /// What a token signs: its purpose, its hour, its caller.
    fn message(who: &str, hour: u64) -> String {
        format!("tern-console-csrf\n{hour}\n{who}")
    }

    /// A token for forms shown to `who` (a certificate fingerprint) at
    /// `now` (Unix seconds).
    pub fn token(&self, who: &str, now: u64) -> String {
        let hour = now / 3600;
        let tag = ring::hmac::sign(&self.key, Self::message(who, hour).as_bytes());
        format!(
            "{hour}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// Whether `token` was made by this lighthouse for `who` in the last
    /// [`CSRF_HOURS`] hours.
    pub fn verify(&self, who: &str, token: &str, now: u64) -> bool {
        let Some((hour, tag)) = token.split_once('.') else {
            return false;
        };
        let (Ok(hour), Ok(tag)) = (
            hour.parse::<u64>(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tag),
        ) else {
            return false;
        };
        let current = now / 3600;
        if hour > current || current - hour >= CSRF_HOURS {
            return false;
        }
        ring::hmac::verify(&self.key, Self::message(who, hour).as_bytes(), &tag).is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
