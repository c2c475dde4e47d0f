//! The admin API, sans IO: what a request under `/api/v1/` asks for
//! ([`parse`]), the errors it can get (a stable kind, an HTTP status, a
//! message), and the pages of registered nodes ([`LighthouseCore::admin_nodes`],
//! bounded: a lighthouse with 100,000 nodes builds no 100,000-row reply).
//! The lighthouse's shell serves it over HTTP and runs the store's part.
//!
//! [`LighthouseCore::admin_nodes`]: crate::lighthouse::LighthouseCore::admin_nodes

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::registry::RunnerAd;

/// Where the API lives.
pub const API_PREFIX: &str = "/api/v1";
/// The largest request body read (a token or a revocation is a few hundred
/// bytes).
pub const MAX_BODY: usize = 16 * 1024;
/// Rows in a page when the caller gives no `limit`, and at most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// `GET /api/v1/nodes?after=IP&limit=N&q=TEXT&group=G&ephemeral=B`:
    /// registered nodes by overlay address, a page at a time, those the
    /// filter lets through.
    Nodes {
        after: Option<Ipv4Addr>,
        limit: usize,
        filter: NodeFilter,
    },
    /// `GET /api/v1/tokens`: enrollment tokens, without their secrets.
    Tokens,
    /// `POST /api/v1/tokens`: a new token; its secret is in the answer
    /// once and never again.
    CreateToken(NewTokenRequest),
    /// `DELETE /api/v1/tokens/ID`: the token with that id (or unique id
    /// prefix of at least 8 hex digits).
    DeleteToken { id: String },
    /// `GET /api/v1/revocations`: revoked certificates not expired yet.
    Revocations,
    /// `POST /api/v1/revocations`: revoke by fingerprint or by the name of
    /// certificates this lighthouse issued.
    Revoke(RevokeRequest),
    /// `GET /api/v1/gateways?after=IP&limit=N`: nodes advertising subnets
    /// or DNS zones, with them.
    Gateways {
        after: Option<Ipv4Addr>,
        limit: usize,
    },
    /// `GET /api/v1/runners?after=IP&limit=N`: runners, their labels and
    /// load.
    Runners {
        after: Option<Ipv4Addr>,
        limit: usize,
    },
    /// `GET /api/v1/issued?after=AT:FINGERPRINT&limit=N`: the issuance
    /// log, newest first (`after`: the `next` of the previous page).
    Issued {
        after: Option<(i64, String)>,
        limit: usize,
    },
    /// `GET /api/v1/flows?name=&fingerprint=&claim=K%3DV&dest=&since=&denied=&node=&limit=`:
    /// flow records, newest first, with how each caller enrolled.
    Flows(crate::flows::FlowQuery),
    /// `GET /api/v1/openapi.json`: the document describing all of this.
    OpenApi,
}

impl AdminRequest {
    /// Whether it changes anything (audited; needs the write groups).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            AdminRequest::CreateToken(_)
                | AdminRequest::DeleteToken { .. }
                | AdminRequest::Revoke(_)
        )
    }

    /// The action's name in the audit log.
    pub fn action(&self) -> &'static str {
        match self {
            AdminRequest::Nodes { .. } => "nodes.list",
            AdminRequest::Tokens => "tokens.list",
            AdminRequest::CreateToken(_) => "tokens.create",
            AdminRequest::DeleteToken { .. } => "tokens.delete",
            AdminRequest::Revocations => "revocations.list",
            AdminRequest::Revoke(_) => "revocations.create",
            AdminRequest::Gateways { .. } => "gateways.list",
            AdminRequest::Runners { .. } => "runners.list",
            AdminRequest::Issued { .. } => "issued.list",
            AdminRequest::Flows(_) => "flows.list",
            AdminRequest::OpenApi => "openapi",
        }
    }

    /// The object acted on, for the audit log.
    pub fn object(&self) -> String {
        match self {
            AdminRequest::CreateToken(t) => format!("groups={}", t.groups.join(",")),
            AdminRequest::DeleteToken { id } => id.clone(),
            AdminRequest::Revoke(r) => r.what.clone(),
            _ => String::new(),
        }
    }
}

/// Which nodes a list shows: those whose name or overlay address
/// contains `text` (any case), with `group` among their certificate's
/// groups, ephemeral (enrolled) or not. Empty: all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFilter {
    pub text: Option<String>,
    pub group: Option<String>,
    pub ephemeral: Option<bool>,
}

/// Whether `hay` contains `needle` (given in lower case), ASCII case
/// ignored.
fn contains_ignoring_case(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || hay.windows(needle.len()).any(|w| {
            w.iter()
                .zip(needle)
                .all(|(a, b)| a.to_ascii_lowercase() == *b)
        })
}

/// The longest search text taken (a name is at most 253 bytes).
pub const MAX_FILTER_TEXT: usize = 253;

impl NodeFilter {
    /// Lets every node through.
    pub fn is_empty(&self) -> bool {
        self.text.is_none() && self.group.is_none() && self.ephemeral.is_none()
    }

    /// Whether a node with these properties passes (`text` is compared in
    /// lower case: give it lower-cased, as [`NodeFilter::from_params`] does).
    pub fn matches(&self, name: &str, ip: Ipv4Addr, ephemeral: bool, groups: &[String]) -> bool {
        if self.ephemeral.is_some_and(|e| e != ephemeral) {
            return false;
        }
        if let Some(g) = &self.group {
            if !groups.iter().any(|have| have == g) {
                return false;
            }
        }
        match &self.text {
            None => true,
            Some(t) => {
                contains_ignoring_case(name.as_bytes(), t.as_bytes()) || {
                    // The address as text, without an allocation per node.
                    let mut buf = [0u8; 15];
                    let mut w = std::io::Cursor::new(&mut buf[..]);
                    let _ = std::io::Write::write_fmt(&mut w, format_args!("{ip}"));
                    let len = w.position() as usize;
                    contains_ignoring_case(&buf[..len], t.as_bytes())
                }
            }
        }
    }

    /// From the query's `q`, `group` and `ephemeral` (`true`, `false`, or
    /// empty for either); an empty value is no filter.
    pub fn from_params(
        q: Option<&str>,
        group: Option<&str>,
        ephemeral: Option<&str>,
    ) -> Result<NodeFilter, ApiError> {
        let text = q.map(str::trim).filter(|t| !t.is_empty());
        if let Some(t) = text {
            if t.len() > MAX_FILTER_TEXT {
                return Err(ApiError::bad_request(format!(
                    "q: at most {MAX_FILTER_TEXT} bytes (part of a name or an overlay address)"
                )));
            }
        }
        let group = group.map(str::trim).filter(|g| !g.is_empty());
        if let Some(g) = group {
            if !tern_shared::admin::is_group_name(g) {
                return Err(ApiError::bad_request(format!(
                    "group={g:?} is not a group name (letters, digits, '-', '_', '.')"
                )));
            }
        }
        let ephemeral = match ephemeral.map(str::trim).unwrap_or("") {
            "" | "any" => None,
            "true" => Some(true),
            "false" => Some(false),
            other => {
                return Err(ApiError::bad_request(format!(
                    "ephemeral={other:?}: give true, false or leave it out"
                )))
            }
        };
        Ok(NodeFilter {
            text: text.map(str::to_ascii_lowercase),
            group: group.map(str::to_string),
            ephemeral,
        })
    }
}

/// `POST /api/v1/revocations`'s body. Durations as `tern-lighthouse token
/// create` takes them ("1h", "30m").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewTokenRequest {
    pub groups: Vec<String>,
    #[serde(default = "one")]
    pub uses: u32,
    #[serde(default = "default_ttl")]
    pub ttl: String,
    #[serde(default = "default_cert_ttl")]
    pub cert_ttl: String,
}

fn one() -> u32 {
    1
}

fn default_ttl() -> String {
    "1h".into()
}

fn default_cert_ttl() -> String {
    "1h".into()
}

/// `POST /api/v1/revocations`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// A certificate fingerprint (64 hex digits) or an issued
    /// certificate's name.
    pub what: String,
}

/// An error's stable kind: what a script matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unavailable,
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

/// An error answer: `{"error": {"kind": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }
}

/// Reads a request: `method` and `path` as they came, `query` without its
/// `?`, `content_type` if given, `body` already bounded by the caller to
/// [`MAX_BODY`] (a longer one is the caller's 413).
pub fn parse(
    method: &str,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<AdminRequest, ApiError> {
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no such resource {path:?}: the API is under {API_PREFIX}/"),
        ));
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let allow = |allowed: &str| {
        ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("{method} is not allowed on {path}; allowed: {allowed}"),
        )
    };
    let by_address = |extra: &[&str]| -> Result<(Option<Ipv4Addr>, usize, Params), ApiError> {
        let (after, limit, params) = page_params(query, extra)?;
        let after = after
            .map(|a| {
                a.parse::<Ipv4Addr>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "after={a:?} is not an overlay address (give the `next` of the previous page)"
                    ))
                })
            })
            .transpose()?;
        Ok((after, limit, params))
    };
    match segments.as_slice() {
        [list @ ("nodes" | "gateways" | "runners")] => match method {
            "GET" => {
                let extra: &[&str] = if *list == "nodes" {
                    &["q", "group", "ephemeral"]
                } else {
                    &[]
                };
                let (after, limit, params) = by_address(extra)?;
                Ok(match *list {
                    "nodes" => AdminRequest::Nodes {
                        after,
                        limit,
                        filter: NodeFilter::from_params(
                            params.get("q"),
                            params.get("group"),
                            params.get("ephemeral"),
                        )?,
                    },
                    "gateways" => AdminRequest::Gateways { after, limit },
                    _ => AdminRequest::Runners { after, limit },
                })
            }
            _ => Err(allow("GET")),
        },
        ["issued"] => match method {
            "GET" => {
                let (after, limit, _) = page_params(query, &[])?;
                let after = after.map(|a| issued_cursor(&a)).transpose()?;
                Ok(AdminRequest::Issued { after, limit })
            }
            _ => Err(allow("GET")),
        },
        ["flows"] => match method {
            "GET" => {
                let keys = [
                    "name",
                    "fingerprint",
                    "claim",
                    "dest",
                    "since",
                    "denied",
                    "node",
                ];
                let (after, limit, params) = page_params(query, &keys)?;
                if after.is_some() {
                    return Err(ApiError::bad_request(
                        "flows take no `after`: narrow them with since, or more filters",
                    ));
                }
                let limit = limit.to_string();
                let q = crate::flows::FlowQuery::from_params(
                    params.get("name"),
                    params.get("fingerprint"),
                    params.get("claim"),
                    params.get("dest"),
                    params.get("since"),
                    params.get("denied"),
                    params.get("node"),
                    Some(&limit),
                )
                .map_err(ApiError::bad_request)?;
                Ok(AdminRequest::Flows(q))
            }
            _ => Err(allow("GET")),
        },
        ["openapi.json"] => match method {
            "GET" => Ok(AdminRequest::OpenApi),
            _ => Err(allow("GET")),
        },
        ["tokens"] => match method {
            "GET" => Ok(AdminRequest::Tokens),
            "POST" => Ok(AdminRequest::CreateToken(json_body(content_type, body)?)),
            _ => Err(allow("GET, POST")),
        },
        ["tokens", id] => match method {
            "DELETE" => {
                let ok =
                    id.len() >= 8 && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
                if !ok {
                    return Err(ApiError::bad_request(format!(
                        "{id:?} is not a token id (8 to 64 hex digits, from the token list)"
                    )));
                }
                Ok(AdminRequest::DeleteToken {
                    id: id.to_ascii_lowercase(),
                })
            }
            _ => Err(allow("DELETE")),
        },
        ["revocations"] => match method {
            "GET" => Ok(AdminRequest::Revocations),
            "POST" => {
                let r: RevokeRequest = json_body(content_type, body)?;
                if r.what.is_empty() || r.what.len() > 253 {
                    return Err(ApiError::bad_request(
                        "what: give a certificate fingerprint (64 hex digits) or an issued certificate's name",
                    ));
                }
                Ok(AdminRequest::Revoke(r))
            }
            _ => Err(allow("GET, POST")),
        },
        _ => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no such resource {path:?}; {API_PREFIX}/openapi.json lists them"),
        )),
    }
}

/// The issuance log's cursor, `AT:FINGERPRINT` (the `next` of a page).
pub fn issued_cursor(a: &str) -> Result<(i64, String), ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "after={a:?} is not an issuance log cursor (give the `next` of the previous page, AT:FINGERPRINT)"
        ))
    };
    let (at, fp) = a.split_once(':').ok_or_else(bad)?;
    let at = at.parse::<i64>().map_err(|_| bad())?;
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((at, fp.to_ascii_lowercase()))
}

/// A query's (or a form's) parameters, decoded (the last of each name
/// counts).
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// All the parameters of `text` (`a=1&b=x+y`), percent-decoded.
    pub fn parse(text: &[u8]) -> Params {
        Params(
            form_urlencoded::parse(text)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `after` and `limit` from a query string, and the parameters named in
/// `extra`; nothing else is accepted. Values are percent-decoded.
fn page_params(
    query: Option<&str>,
    extra: &[&str],
) -> Result<(Option<String>, usize, Params), ApiError> {
    let (mut after, mut limit, mut params) = (None, DEFAULT_PAGE, Params::default());
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "after" => after = Some(value.into_owned()),
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit={value:?}: give 1 to {MAX_PAGE}"))
                    })?;
            }
            k if extra.contains(&k) => params.0.push((key.into_owned(), value.into_owned())),
            other => {
                let takes = ["after", "limit"]
                    .iter()
                    .chain(extra)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (this list takes {takes})"
                )));
            }
        }
    }
    Ok((after, limit, params))
}

/// A JSON body of type `T`, unknown fields refused.
fn json_body<T: serde::de::DeserializeOwned>(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<T, ApiError> {
    let json = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !json {
        return Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the JSON body: {e}")))
}

/// One registered node, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminNode {
    pub name: String,
    pub overlay_ip: Ipv4Addr,
    pub groups: Vec<String>,
    /// The certificate's fingerprint (hex) and when it expires (Unix
    /// seconds and RFC 3339).
    pub fingerprint: String,
    pub not_after: u64,
    pub expires: String,
    /// Enrolled through an issuer (short-lived), and which.
    pub ephemeral: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_by: Option<String>,
    /// Where it registered from, and the addresses it offered.
    pub observed: SocketAddr,
    pub local: Vec<SocketAddr>,
    /// `udp`, or `tcp` for a node that reaches the lighthouse over a TCP
    /// link.
    pub transport: &'static str,
    pub routes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerAd>,
    /// The nodes this lighthouse relays this node's traffic with (its
    /// path to them is relayed, not direct); empty when it relays none.
    pub relayed_with: Vec<Ipv4Addr>,
    /// How its certificate was bought, from the issuance log (the shell
    /// fills it in from the store; none for a certificate signed by hand).
    pub enrollment: Option<NodeEnrollment>,
    pub registered_secs_ago: u64,
    pub last_seen_secs_ago: u64,
}

/// A node's record in the issuance log: when and how its certificate was
/// bought, with which token or which OIDC claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeEnrollment {
    pub issued: String,
    pub how: String,
    pub token: Option<String>,
    pub claims: std::collections::BTreeMap<String, String>,
}

/// What the console's overview shows, from the registry: counts, the
/// first gateways and runners, and the registry's change count (the live
/// views re-render when it moves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminOverview {
    pub nodes: usize,
    pub ephemeral: usize,
    pub over_tcp: usize,
    /// Pairs of nodes this lighthouse may relay for now (their path is
    /// relayed, not direct).
    pub relayed_pairs: usize,
    pub gateways: Page<crate::registry::GatewayEntry>,
    pub runners: Page<crate::registry::RunnerEntry>,
    pub changes: u64,
}

/// A gateway or runner counts as reachable while its registrations keep
/// coming (nodes register every 25 s or so; a node silent longer is late).
pub const REACHABLE_SECS: u64 = 60;

/// Gateways and runners the overview lists (their own pages list all).
pub const OVERVIEW_ROWS: usize = 20;

/// A page of gateways or runners: `next` is the `after` of the next
/// page, none at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Ipv4Addr>,
}

/// A page of nodes: `next` is the `after` of the next page, none at the
/// end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodesPage {
    pub nodes: Vec<AdminNode>,
    pub total: usize,
    pub next: Option<Ipv4Addr>,
}

/// Packets queued for the shell's stack before it takes them; past this
/// they are dropped (TCP sends again).
pub const MAX_QUEUED_PACKETS: usize = 4096;

/// The admin listener's packets between the mesh and the shell's TCP/IP
/// stack: TCP to the lighthouse's overlay address on the admin port, from
/// a peer's own overlay address (never a subnet it routes: the caller is
/// the certificate), in; the stack's answers, to such a peer, out.
#[derive(Debug, Default)]
pub struct AdminPlane {
    port: Option<u16>,
    inbound: std::collections::VecDeque<Vec<u8>>,
    /// Packets for the stack dropped because it fell behind.
    pub dropped: u64,
    /// Packets the stack sent that were not to a peer's own address from
    /// the admin port (dropped).
    pub refused_out: u64,
}

impl AdminPlane {
    /// Listens on `port` of the overlay address (None: not at all).
    pub fn set_port(&mut self, port: Option<u16>) {
        self.port = port;
        if port.is_none() {
            self.inbound.clear();
        }
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Takes `packet` if it is for the admin listener: TCP from
    /// `peer_ip` (the sender's certificate's address) to `own_ip`'s admin
    /// port.
    pub fn take(&mut self, packet: &[u8], own_ip: Ipv4Addr, peer_ip: Ipv4Addr) -> bool {
        let Some(port) = self.port else {
            return false;
        };
        // Every control message passes here: only TCP is parsed further.
        if packet.get(9) != Some(&tern_shared::packet::PROTO_TCP) {
            return false;
        }
        let Some(flow) = tern_shared::packet::flow_of(packet) else {
            return false;
        };
        let ours = flow.proto == tern_shared::packet::PROTO_TCP
            && !flow.fragment
            && flow.dst == own_ip
            && flow.dst_port == port
            && flow.src == peer_ip;
        if !ours {
            return false;
        }
        if self.inbound.len() >= MAX_QUEUED_PACKETS {
            self.dropped += 1;
        } else {
            self.inbound.push_back(packet.to_vec());
        }
        true
    }

    pub fn poll(&mut self) -> Option<Vec<u8>> {
        self.inbound.pop_front()
    }

    /// Whether the stack's `packet` may leave: TCP from `own_ip`'s admin
    /// port; its destination, the caller checks, a peer's own address.
    pub fn may_send(&mut self, packet: &[u8], own_ip: Ipv4Addr) -> Option<Ipv4Addr> {
        let flow = tern_shared::packet::flow_of(packet);
        let ok = self.port.is_some_and(|port| {
            flow.is_some_and(|f| {
                f.proto == tern_shared::packet::PROTO_TCP && f.src == own_ip && f.src_port == port
            })
        });
        if !ok {
            self.refused_out += 1;
            return None;
        }
        flow.map(|f| f.dst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn get(path: &str, query: Option<&str>) -> Result<AdminRequest, ApiError> {
        parse("GET", path, query, None, b"")
    }

    fn post(path: &str, body: &str) -> Result<AdminRequest, ApiError> {
        parse(
            "POST",
            path,
            None,
            Some("application/json"),
            body.as_bytes(),
        )
    }

    #[test]
    fn a_node_filter_matches_name_any_case_address_group_and_kind() {
        let f = NodeFilter::from_params(Some(" CI-Vm "), None, None).unwrap();
        let ip = Ipv4Addr::new(100, 64, 100, 17);
        let groups = vec!["ci".to_string()];
        assert!(f.matches("ci-vm-1a", ip, true, &groups));
        assert!(f.matches("build-CI-VM", ip, false, &[]));
        assert!(!f.matches("gw-1", ip, false, &groups));
        let by_ip = NodeFilter::from_params(Some("100.17"), None, None).unwrap();
        assert!(by_ip.matches("gw", ip, false, &[]));
        assert!(!by_ip.matches("gw", Ipv4Addr::new(100, 64, 100, 18), false, &[]));
        let g = NodeFilter::from_params(None, Some("ci"), Some("true")).unwrap();
        assert!(g.matches("x", ip, true, &groups));
        assert!(!g.matches("x", ip, false, &groups), "not enrolled");
        assert!(!g.matches("x", ip, true, &[]), "not in the group");
        assert!(NodeFilter::from_params(Some(""), Some(""), Some(""))
            .unwrap()
            .is_empty());
        for (q, group, eph) in [
            (Some("x".repeat(300)), None, None),
            (None, Some("a b".to_string()), None),
            (None, None, Some("yes".to_string())),
        ] {
            let e = NodeFilter::from_params(q.as_deref(), group.as_deref(), eph.as_deref())
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest);
        }
    }

    #[test]
    fn every_resource_and_its_methods() {
        assert_eq!(
            get("/api/v1/nodes", Some("after=100.64.0.9&limit=5")).unwrap(),
            AdminRequest::Nodes {
                after: Some(Ipv4Addr::new(100, 64, 0, 9)),
                limit: 5,
                filter: NodeFilter::default(),
            }
        );
        assert_eq!(
            get("/api/v1/nodes/", None).unwrap(),
            AdminRequest::Nodes {
                after: None,
                limit: DEFAULT_PAGE,
                filter: NodeFilter::default(),
            }
        );
        assert_eq!(get("/api/v1/tokens", None).unwrap(), AdminRequest::Tokens);
        assert_eq!(
            post("/api/v1/tokens", r#"{"groups":["ci"]}"#).unwrap(),
            AdminRequest::CreateToken(NewTokenRequest {
                groups: vec!["ci".into()],
                uses: 1,
                ttl: "1h".into(),
                cert_ttl: "1h".into()
            })
        );
        assert_eq!(
            parse("DELETE", "/api/v1/tokens/ABCDEF0123", None, None, b"").unwrap(),
            AdminRequest::DeleteToken {
                id: "abcdef0123".into()
            }
        );
        assert_eq!(
            get("/api/v1/revocations", None).unwrap(),
            AdminRequest::Revocations
        );
        let r = post("/api/v1/revocations", r#"{"what":"ci-job-1"}"#).unwrap();
        assert!(r.is_write());
        assert_eq!(r.action(), "revocations.create");
        assert_eq!(r.object(), "ci-job-1");
    }

    #[test]
    fn the_issuance_log_takes_its_cursor() {
        let fp = "ab".repeat(32);
        assert_eq!(
            get(
                "/api/v1/issued",
                Some(&format!("after=1700000000:{fp}&limit=20"))
            )
            .unwrap(),
            AdminRequest::Issued {
                after: Some((1_700_000_000, fp.clone())),
                limit: 20
            }
        );
        for bad in [
            "x".to_string(),
            "1:zz".to_string(),
            format!("x:{fp}"),
            format!("1{fp}"),
        ] {
            let e = get("/api/v1/issued", Some(&format!("after={bad}"))).unwrap_err();
            assert!(e.message.contains("cursor"), "{e:?}");
        }
    }

    #[test]
    fn bad_requests_get_a_kind_and_a_message_naming_what_is_wrong() {
        let cases: &[(Result<AdminRequest, ApiError>, ErrorKind, &str)] = &[
            (get("/nope", None), ErrorKind::NotFound, "/api/v1/"),
            (
                get("/api/v1/secrets", None),
                ErrorKind::NotFound,
                "no such resource",
            ),
            (
                parse("PUT", "/api/v1/nodes", None, None, b""),
                ErrorKind::MethodNotAllowed,
                "allowed: GET",
            ),
            (
                get("/api/v1/nodes", Some("limit=0")),
                ErrorKind::BadRequest,
                "limit",
            ),
            (
                get("/api/v1/nodes", Some("limit=5000")),
                ErrorKind::BadRequest,
                "1 to 1000",
            ),
            (
                get("/api/v1/nodes", Some("after=nope")),
                ErrorKind::BadRequest,
                "overlay address",
            ),
            (
                get("/api/v1/nodes", Some("sort=name")),
                ErrorKind::BadRequest,
                "unknown query parameter",
            ),
            (
                post("/api/v1/tokens", "{"),
                ErrorKind::BadRequest,
                "JSON body",
            ),
            (
                post("/api/v1/tokens", r#"{"groups":["ci"],"admin":true}"#),
                ErrorKind::BadRequest,
                "unknown field",
            ),
            (
                parse("POST", "/api/v1/tokens", None, Some("text/plain"), b"{}"),
                ErrorKind::UnsupportedMediaType,
                "application/json",
            ),
            (
                parse("DELETE", "/api/v1/tokens/xyz", None, None, b""),
                ErrorKind::BadRequest,
                "token id",
            ),
            (
                post("/api/v1/revocations", r#"{"what":""}"#),
                ErrorKind::BadRequest,
                "fingerprint",
            ),
        ];
        for (got, kind, says) in cases {
            let e = got.as_ref().unwrap_err();
            assert_eq!(e.kind, *kind, "{e:?}");
            assert!(e.message.contains(says), "{e:?} should say {says:?}");
            assert!(e.to_json()["error"]["kind"].is_string());
        }
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(
            method in "[A-Z]{0,8}",
            path in "(/api/v1/)?[a-z/0-9.%]{0,40}",
            query in proptest::option::of("[a-z=&0-9.]{0,40}"),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let _ = parse(&method, &path, query.as_deref(), Some("application/json"), &body);
        }
    }
}
