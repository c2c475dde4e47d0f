//! Config types for the node (`tern`) and the lighthouse (`tern-lighthouse`).
//!
//! This module does no IO: a daemon reads its config file itself and hands the
//! text to [`NodeConfig::parse`] or [`LighthouseConfig::parse`] together with the
//! file's path. The path is used only to name the file in errors and to resolve
//! relative paths inside the config (`pki.*`, `api.socket`) against the file's
//! directory, so a config works the same whatever the daemon's working directory.
//!
//! The annotated examples in `config/node.toml` and `config/lighthouse.toml`
//! document every key; tests in this module parse them so they never rot.
//!
//! Every table rejects unknown keys: a misspelt key is an error naming the key,
//! the file and the line, never silently ignored.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::duration::parse_duration;
use crate::policy::{validate_routes, FirewallConfig, GatewayConfig, RouteConfig};
pub use crate::toml_error::{position, Position};
use crate::toml_error::{Mistake, Place, TomlError};

/// UDP port both daemons listen on unless `listen.addr` says otherwise.
pub const DEFAULT_PORT: u16 = 4242;
/// Default `listen.addr`: every IPv4 address, port [`DEFAULT_PORT`].
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_PORT));
/// Default `tun.name`.
pub const DEFAULT_TUN_NAME: &str = "tern0";
/// Default `tun.mtu`: 1500 minus the IPv6 + UDP + WireGuard overhead (80 bytes).
pub const DEFAULT_MTU: u16 = 1420;
/// Smallest accepted `tun.mtu` (the IPv4 minimum datagram size).
pub const MIN_MTU: u16 = 576;
/// Largest accepted `tun.mtu` (jumbo frames).
pub const MAX_MTU: u16 = 9000;
/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_TUN_NAME_LEN: usize = 15;
/// Default `log.level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Accepted `log.level` values, quietest first.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// Default `peers.keepalive`.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(25);
/// Default `peers.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `registry.expiry`.
pub const DEFAULT_REGISTRY_EXPIRY: Duration = Duration::from_secs(30);

/// Configuration of a node (`tern`).
///
/// A node may list zero lighthouses: the config is valid and the daemon starts,
/// but such a node can neither find peers nor be found by them until a
/// lighthouse is configured. Daemons should warn about it at startup.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// CA, certificate and key files (required).
    pub pki: PkiConfig,
    /// The UDP socket shared by WireGuard and control traffic.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Lighthouses to register with; the node registers with all of them.
    #[serde(default)]
    pub lighthouses: Vec<LighthouseEntry>,
    /// The TUN device.
    #[serde(default)]
    pub tun: TunConfig,
    /// The local API the CLI talks to.
    #[serde(default)]
    pub api: ApiConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: crate::ops::MetricsConfig,
    /// Timers for peer sessions.
    #[serde(default)]
    pub peers: PeersConfig,
    /// Relaying for other nodes (off by default; needs the `relay` group
    /// in this node's certificate).
    #[serde(default)]
    pub relay: NodeRelayConfig,
    /// What may come in and go out (reloaded on SIGHUP).
    #[serde(default)]
    pub firewall: FirewallConfig,
    /// Present on a gateway: the private subnets it forwards into.
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    /// Subnets to reach through gateways.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Present on a runner: pipelines callers may run here.
    #[serde(default)]
    pub runner: Option<RunnerConfig>,
    /// Local SOCKS5 and HTTP CONNECT proxies into the mesh.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Local ports forwarded to targets in the mesh.
    #[serde(default)]
    pub forwards: Vec<ForwardConfig>,
    /// HTTP APIs this node forwards to with its own credential, for
    /// callers in the mesh (`crate::services`).
    #[serde(default)]
    pub services: Vec<crate::services::ServiceConfig>,
    /// Mesh names and where this node answers DNS.
    #[serde(default)]
    pub dns: crate::dns::DnsConfig,
    /// Records of the flows peers start through its inbound rules.
    #[serde(default)]
    pub flows: crate::flows::FlowsConfig,
}

/// `[runner]`: this node runs pipelines for callers across the mesh
/// (`tern run`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// Labels callers pick runners by (`tern run --on LABEL`): 1 to 64
    /// characters from `a-z 0-9 . _ -`, at most 16.
    #[serde(default)]
    pub labels: Vec<String>,
    /// A caller's certificate must carry one of these groups (required: a
    /// runner without it would refuse everyone).
    pub allow_groups: Vec<String>,
    /// Jobs run at once; more wait in a queue. 1 to 256, default 1.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Where job workspaces are made (one fresh directory per job).
    /// Default [`DEFAULT_RUNNER_WORK_DIR`].
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// No job runs longer, whatever its pipeline asks. Default 1h, at most 24h.
    #[serde(default = "default_max_job", deserialize_with = "duration")]
    pub max_job_duration: Duration,
    /// Keep each job's workspace after it ends (for debugging). Default false.
    #[serde(default)]
    pub keep_workspaces: bool,
    /// The JSON-lines audit file, one line per job (and per refusal).
    /// Default [`DEFAULT_RUNNER_AUDIT_LOG`].
    #[serde(default = "default_audit_log")]
    pub audit_log: PathBuf,
}

/// Default `runner.work_dir`.
pub const DEFAULT_RUNNER_WORK_DIR: &str = "/var/lib/tern/jobs";
/// Default `runner.audit_log`.
pub const DEFAULT_RUNNER_AUDIT_LOG: &str = "/var/log/tern/audit.jsonl";

fn one() -> u32 {
    1
}
fn default_work_dir() -> PathBuf {
    PathBuf::from(DEFAULT_RUNNER_WORK_DIR)
}
fn default_audit_log() -> PathBuf {
    PathBuf::from(DEFAULT_RUNNER_AUDIT_LOG)
}
fn default_max_job() -> Duration {
    Duration::from_secs(3600)
}

impl RunnerConfig {
    fn resolve(&mut self, base: &Path) {
        self.work_dir = resolve(base, &self.work_dir);
        self.audit_log = resolve(base, &self.audit_log);
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let name_ok = |s: &str| {
            (1..=64).contains(&s.len())
                && s.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        };
        if self.labels.len() > crate::control::MAX_LABELS {
            return Err(invalid(
                file,
                "runner.labels",
                format!("at most {} labels", crate::control::MAX_LABELS),
            ));
        }
        if let Some(bad) = self.labels.iter().find(|l| !name_ok(l)) {
            return Err(invalid(
                file,
                "runner.labels",
                format!("{bad:?}: use 1 to 64 characters from a-z 0-9 . _ -"),
            ));
        }
        if self.allow_groups.is_empty() {
            return Err(invalid(
                file,
                "runner.allow_groups",
                "list at least one group whose members may run pipelines here, e.g. [\"ci\"]",
            ));
        }
        if let Some(bad) = self.allow_groups.iter().find(|g| !name_ok(g)) {
            return Err(invalid(
                file,
                "runner.allow_groups",
                format!("{bad:?} is not a group name: 1 to 64 characters from a-z 0-9 . _ -"),
            ));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(invalid(
                file,
                "runner.concurrency",
                format!("{} is out of range; use 1 to 256", self.concurrency),
            ));
        }
        if self.max_job_duration.is_zero() || self.max_job_duration > Duration::from_secs(86_400) {
            return Err(invalid(
                file,
                "runner.max_job_duration",
                "use more than zero and at most \"24h\", e.g. \"1h\"",
            ));
        }
        for (key, path) in [
            ("runner.work_dir", &self.work_dir),
            ("runner.audit_log", &self.audit_log),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(file, key, "must not be empty"));
            }
        }
        Ok(())
    }
}

/// Configuration of a lighthouse (`tern-lighthouse`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LighthouseConfig {
    /// CA, certificate and key files (required). The certificate must carry
    /// the `lighthouse` group for nodes to talk control to it.
    pub pki: PkiConfig,
    /// The UDP socket nodes register at. Its port must not be 0: nodes need a
    /// fixed endpoint in their own configs.
    #[serde(default)]
    pub listen: ListenConfig,
    /// The local API the CLI talks to.
    #[serde(default)]
    pub api: ApiConfig,
    /// The admin API on the overlay address, through the mesh.
    #[serde(default)]
    pub admin: crate::admin::AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: crate::ops::MetricsConfig,
    /// The registry of live nodes.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Relaying WireGuard messages between registered nodes that find no
    /// direct path.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Enrollment of CI nodes with tokens, signed by an issuer.
    #[serde(default)]
    pub enroll: Option<EnrollConfig>,
    /// Where the lasting state lives: SQLite (the default) or a PostgreSQL
    /// database several lighthouses share.
    #[serde(default)]
    pub store: crate::store::StoreConfig,
    /// How long flow records nodes send are kept.
    #[serde(default)]
    pub flows: crate::flows::LighthouseFlowsConfig,
}

/// `[pki]`: where the daemon's identity lives. All keys are required; relative
/// paths are resolved against the config file's directory by `parse`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// One or more trusted CA certificates (a file may hold several).
    pub ca: PathBuf,
    /// This daemon's certificate. A node that enrolls (`tern up
    /// --enroll-token`) has none: leave both `cert` and `key` out.
    #[serde(default)]
    pub cert: PathBuf,
    /// This daemon's private key.
    #[serde(default)]
    pub key: PathBuf,
    /// A node whose certificate a lighthouse's `[enroll]` issuer signed asks
    /// a lighthouse for a fresh one (same name, address, groups, subnets,
    /// zones and lifetime) at two thirds of its lifetime, writes it over `cert` and
    /// swaps it in without dropping a session. Nodes only. Default false.
    #[serde(default)]
    pub renew: bool,
}

impl PkiConfig {
    /// A node config without `cert` and `key`: it gets its identity by
    /// enrolling.
    pub fn enrolls(&self) -> bool {
        self.cert.as_os_str().is_empty() && self.key.as_os_str().is_empty()
    }
}

/// `[enroll]` of a lighthouse: it signs short-lived certificates for nodes
/// that present a token (`tern-lighthouse token create`), with an issuer
/// certificate (`tern cert sign --issuer`), never the root key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    /// The issuer's certificate.
    pub issuer_cert: PathBuf,
    /// The issuer's private key.
    pub issuer_key: PathBuf,
    /// The state that survives restarts (token hashes and uses, leased
    /// addresses, issued certificates): a SQLite file. Default
    /// "lighthouse.db" beside the config file.
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// The addresses enrollment leases, inside the issuer's pool. Default:
    /// the whole pool. Certificates signed by hand under the issuer
    /// (gateways and runners with `[pki] renew`) take addresses outside it,
    /// so no enrolling node is ever leased one of theirs.
    #[serde(default)]
    pub pool: Vec<ipnet::Ipv4Net>,
    /// `[[enroll.renew]]`: issuers that only renew (`[pki] renew` on their
    /// nodes) and never enroll, such as one that delegates subnets to
    /// long-lived gateways: its key never signs a token's or an ID token's
    /// certificate.
    #[serde(default)]
    pub renew: Vec<RenewIssuerConfig>,
    /// `[[enroll.oidc]]`: CI providers whose OIDC ID tokens are traded for
    /// certificates (no stored secret in the job).
    #[serde(default)]
    pub oidc: Vec<OidcProviderConfig>,
    /// Enrollment hellos, and requests, answered per second from one source
    /// prefix (an IPv4 /24, an IPv6 /48), each a bucket one second deep.
    /// Must be positive. Default [`DEFAULT_ENROLL_PER_SOURCE`].
    #[serde(default = "default_enroll_per_source")]
    pub per_source_per_sec: u32,
    /// The same from all sources together. Must be positive. Default
    /// [`DEFAULT_ENROLL_TOTAL`].
    #[serde(default = "default_enroll_total")]
    pub total_per_sec: u32,
}

/// One `[[enroll.renew]]`: an issuer whose certificates this lighthouse
/// renews, and nothing else.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewIssuerConfig {
    /// The issuer's certificate (`tern cert sign --issuer`).
    pub issuer_cert: PathBuf,
    /// The issuer's private key.
    pub issuer_key: PathBuf,
}

/// Default `[enroll] per_source_per_sec`: room for a burst of CI jobs that
/// leave through one NAT.
pub const DEFAULT_ENROLL_PER_SOURCE: u32 = 50;
/// Default `[enroll] total_per_sec`: about half of what one lighthouse
/// core can sign (BENCHMARKS.md), so a flood leaves room for the rest.
pub const DEFAULT_ENROLL_TOTAL: u32 = 2000;

fn default_enroll_per_source() -> u32 {
    DEFAULT_ENROLL_PER_SOURCE
}

fn default_enroll_total() -> u32 {
    DEFAULT_ENROLL_TOTAL
}

/// One `[[enroll.oidc]]`: an OIDC identity provider (GitHub Actions, GitLab
/// CI, ...) whose ID tokens enroll nodes when their claims match a rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcProviderConfig {
    /// The token's `iss`, exactly (e.g.
    /// `https://token.actions.githubusercontent.com`).
    pub issuer: String,
    /// The `aud` the token must carry (the job asks for it).
    pub audience: String,
    /// The provider's signing keys (a JWKS document): an https URL (fetched
    /// at start and again when a token names an unknown key), or a file path.
    pub jwks: String,
    /// Claim patterns mapped to groups and a lifetime; the first rule whose
    /// every pattern matches decides. A token that matches none is refused.
    pub rules: Vec<OidcRuleConfig>,
}

/// One `[[enroll.oidc.rules]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcRuleConfig {
    /// Claim name → pattern, all of which must match (a claim that is absent
    /// or not a string, number or boolean does not match). `*` in a pattern
    /// matches any run of characters: `repository = "acme/*"`.
    pub claims: std::collections::BTreeMap<String, String>,
    /// Groups the certificate gets (the issuer must be allowed to sign them).
    pub groups: Vec<String>,
    /// Lifetime of the certificate (capped by the issuer's maximum). Default
    /// the issuer's maximum.
    #[serde(default, deserialize_with = "optional_duration")]
    pub cert_ttl: Option<Duration>,
}

impl OidcProviderConfig {
    /// Whether `jwks` names a URL to fetch rather than a file.
    pub fn jwks_is_url(&self) -> bool {
        self.jwks.starts_with("https://") || self.jwks.starts_with("http://")
    }
}

fn default_store() -> PathBuf {
    PathBuf::from("lighthouse.db")
}

/// `[listen]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// UDP address, shared by WireGuard and control traffic. Default
    /// [`DEFAULT_LISTEN`] (`0.0.0.0:4242`).
    pub addr: SocketAddr,
    /// Lighthouse only: a TCP address (e.g. `0.0.0.0:443`) carrying the
    /// same datagrams in TLS, for nodes whose networks drop UDP.
    pub tcp: Option<SocketAddr>,
    /// Lighthouse only: the TLS certificate chain (PEM) the TCP listener
    /// shows; without it, a self-signed one made at start (nodes
    /// authenticate the lighthouse inside, by its Tern certificate).
    pub tls_cert: Option<PathBuf>,
    /// The key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
}

impl ListenConfig {
    fn resolve(&mut self, base: &Path) {
        for p in [&mut self.tls_cert, &mut self.tls_key]
            .into_iter()
            .flatten()
        {
            *p = resolve(base, p);
        }
    }

    /// The lighthouse's keys; `tcp` on a node is refused by the node.
    fn validate_lighthouse(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(tcp) = self.tcp {
            if tcp.port() == 0 {
                return Err(invalid(
                    file,
                    "listen.tcp",
                    "port 0 picks a random port, but nodes need a fixed one; set one, e.g. \"0.0.0.0:443\"",
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key, self.tcp) {
            (Some(_), None, _) | (None, Some(_), _) => Err(invalid(
                file,
                if self.tls_cert.is_some() { "listen.tls_key" } else { "listen.tls_cert" },
                "tls_cert and tls_key go together; give both, or neither for a self-signed certificate",
            )),
            (Some(_), Some(_), None) => Err(invalid(
                file,
                "listen.tls_cert",
                "a TLS certificate without [listen] tcp is unused; add tcp = \"0.0.0.0:443\" or remove it",
            )),
            _ => Ok(()),
        }
    }
}

/// One `[[lighthouses]]` entry of a node config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "LighthouseEntryText")]
pub struct LighthouseEntry {
    /// The lighthouse's underlay UDP endpoint (required). Written as a
    /// host name, it is `0.0.0.0` with the port until the node resolves
    /// [`host`](Self::host) ([`LighthouseEntry::resolved`]) at start.
    pub endpoint: SocketAddr,
    /// The host name `endpoint` was written with, if it was one.
    pub host: Option<String>,
    /// Optional pin: when set, only a lighthouse certificate with exactly this
    /// name is accepted at this endpoint.
    #[serde(default)]
    pub name: Option<String>,
    /// The lighthouse's TCP listener (`HOST:PORT`, a name allowed), used
    /// when UDP gets no answer, through `HTTPS_PROXY` when that is set.
    #[serde(default)]
    pub tcp: Option<crate::transport::StreamTarget>,
    /// `auto` (UDP, TCP while UDP gets no answer), `udp` or `tcp`.
    #[serde(default)]
    pub transport: crate::transport::Transport,
}

/// A `[[lighthouses]]` entry as written: its endpoint an address or a
/// host name, with the port.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LighthouseEntryText {
    endpoint: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tcp: Option<crate::transport::StreamTarget>,
    #[serde(default)]
    transport: crate::transport::Transport,
}

impl TryFrom<LighthouseEntryText> for LighthouseEntry {
    type Error = String;

    fn try_from(t: LighthouseEntryText) -> Result<Self, String> {
        let (endpoint, host) = match t.endpoint.trim().parse::<SocketAddr>() {
            Ok(addr) => (addr, None),
            Err(_) => match crate::transport::StreamTarget::parse(&t.endpoint) {
                Ok(target) if target.ip().is_none() => (
                    SocketAddr::from(([0, 0, 0, 0], target.port)),
                    Some(target.host.to_ascii_lowercase()),
                ),
                _ => {
                    return Err(format!(
                        "[[lighthouses]] endpoint {:?} is neither ADDRESS:PORT nor HOST:PORT; write e.g. \"198.18.0.1:{DEFAULT_PORT}\", \"[2001:db8::1]:{DEFAULT_PORT}\" or \"lighthouse.example.com:{DEFAULT_PORT}\"",
                        t.endpoint
                    ))
                }
            },
        };
        Ok(LighthouseEntry {
            endpoint,
            host,
            name: t.name,
            tcp: t.tcp,
            transport: t.transport,
        })
    }
}

impl LighthouseEntry {
    /// What `endpoint` names: the address itself, or the host name with
    /// its port (to resolve).
    pub fn written(&self) -> String {
        match &self.host {
            Some(host) => format!("{host}:{}", self.endpoint.port()),
            None => self.endpoint.to_string(),
        }
    }

    /// This entry with its host name resolved to `addr`.
    pub fn resolved(&self, addr: SocketAddr) -> LighthouseEntry {
        LighthouseEntry {
            endpoint: SocketAddr::new(addr.ip().to_canonical(), self.endpoint.port()),
            ..self.clone()
        }
    }
}

/// `[tun]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunConfig {
    /// Interface name: 1 to 15 characters from `A-Z a-z 0-9 _ . -`.
    /// Default [`DEFAULT_TUN_NAME`].
    pub name: String,
    /// MTU of the TUN device in bytes, [`MIN_MTU`]..=[`MAX_MTU`].
    /// Default [`DEFAULT_MTU`].
    pub mtu: u16,
    /// Segmentation and receive offloads on the TUN device (`IFF_VNET_HDR`,
    /// TSO/USO): the kernel hands the daemon up to 64 KiB of one flow per
    /// read and takes as much per write. Default true; false reads and
    /// writes one packet per system call.
    pub offload: bool,
    /// `"tun"` (a kernel TUN device; needs root or CAP_NET_ADMIN) or
    /// `"userspace"` (an in-process TCP/IP stack; no root, no kernel
    /// routes). Default `"tun"`.
    pub mode: TunMode,
    /// Give subnets that gateways advertise (and whose gateways' verified
    /// certificates cover them) kernel routes into the TUN device, as
    /// Tailscale's accept-routes does; never the default route, the
    /// overlay, or a prefix holding a lighthouse's or this node's underlay
    /// address. Default false: only `[[routes]]` get kernel routes.
    pub accept_routes: bool,
}

/// `[tun] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunMode {
    #[default]
    Tun,
    Userspace,
}

/// `[proxy]`: local proxies into the mesh (both modes).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// A SOCKS5 listener (CONNECT and UDP ASSOCIATE, no authentication),
    /// e.g. "127.0.0.1:1080". Loopback addresses only.
    pub socks5: Option<SocketAddr>,
    /// An HTTP CONNECT proxy, e.g. "127.0.0.1:8080". Loopback only.
    pub http: Option<SocketAddr>,
}

/// One `[[forwards]]` entry: a local TCP port whose connections go to a
/// target in the mesh (as `tern forward LISTEN=TARGET` does).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Local address to listen on, e.g. "127.0.0.1:15432". Loopback only.
    pub listen: SocketAddr,
    /// A peer's overlay address or an address a gateway routes, or a host
    /// name (a mesh name, or one under a gateway's zone), with port.
    pub target: crate::dns::ForwardTarget,
}

/// Listeners into the mesh are for this machine only: anything else would
/// open the mesh to whoever can reach the address.
pub(crate) fn loopback_only(file: &Path, key: &str, addr: &SocketAddr) -> Result<(), ConfigError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(invalid(
            file,
            key,
            format!(
                "{addr} is not a loopback address; listeners into the mesh serve this machine only, \
                 e.g. \"127.0.0.1:{}\"",
                addr.port()
            ),
        ))
    }
}

/// `[api]`: the local Unix-socket API.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Socket path; `None` lets the daemon use its built-in default. Relative
    /// paths are resolved against the config file's directory.
    pub socket: Option<PathBuf>,
    /// The group the socket (mode 0660) is given to, so its members may
    /// use the CLI without root, e.g. a CI job's user running `tern run
    /// --on` after `sudo tern up`. `None`: the daemon's own group.
    pub group: Option<String>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One of [`LOG_LEVELS`], stored lower-case (the file may use any case).
    /// Default [`DEFAULT_LOG_LEVEL`].
    pub level: String,
    /// `text` (the default) or `json`; `--log-format` overrides it.
    pub format: crate::ops::LogFormat,
}

/// `[peers]` of a node config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// WireGuard persistent keepalive toward peers, whole seconds up to
    /// 65535 s; zero disables it. Default [`DEFAULT_KEEPALIVE`].
    #[serde(deserialize_with = "duration")]
    pub keepalive: Duration,
    /// A peer with no traffic for this long is forgotten. Must be positive.
    /// Default [`DEFAULT_IDLE_TIMEOUT`].
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A peer with no direct path this long after the first attempt is
    /// reached through a relay (a lighthouse that offers relaying) while
    /// punching goes on; zero: at once, so the first packet never waits for
    /// punching (the session moves to a direct path when one is proven).
    /// Default [`DEFAULT_RELAY_AFTER`] (zero).
    #[serde(deserialize_with = "duration")]
    pub relay_after: Duration,
}

/// Default `peers.relay_after`: none, the relay carries the first packets
/// while punching runs.
pub const DEFAULT_RELAY_AFTER: Duration = Duration::ZERO;

/// `[registry]` of a lighthouse config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// A node that has not re-registered for this long is dropped from the
    /// registry. Must be positive. Default [`DEFAULT_REGISTRY_EXPIRY`].
    #[serde(deserialize_with = "duration")]
    pub expiry: Duration,
}

/// `[relay]` of a lighthouse config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Offer relaying to registered nodes. Default true.
    pub enabled: bool,
    /// WireGuard messages one node may have relayed per second (burst as
    /// large). Must be positive. Default [`DEFAULT_RELAY_PACKETS_PER_SEC`].
    pub packets_per_sec: u32,
}

/// Default `[relay] packets_per_sec`: about 1.1 Gbit/s of full-size packets
/// per node.
pub const DEFAULT_RELAY_PACKETS_PER_SEC: u32 = 100_000;

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            enabled: true,
            packets_per_sec: DEFAULT_RELAY_PACKETS_PER_SEC,
        }
    }
}

/// `[relay]` of a node config: relay WireGuard messages between pairs of
/// other nodes that a lighthouse hands to this node (a node on a public
/// address, a gateway say), so that not all relayed traffic goes through
/// the lighthouses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeRelayConfig {
    /// Offer to relay. Default false.
    pub enabled: bool,
    /// WireGuard messages one node may have relayed per second (burst as
    /// large). Must be positive. Default [`DEFAULT_RELAY_PACKETS_PER_SEC`].
    pub packets_per_sec: u32,
}

impl Default for NodeRelayConfig {
    fn default() -> Self {
        NodeRelayConfig {
            enabled: false,
            packets_per_sec: DEFAULT_RELAY_PACKETS_PER_SEC,
        }
    }
}

/// Why a config was refused. Every variant names the file; the message says
/// what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid TOML, or has a type error not tied to one key.
    #[error("{}: invalid TOML: {message}", Place { file, at, unnamed: "" })]
    Syntax {
        file: PathBuf,
        at: Option<Position>,
        message: String,
    },
    /// A key the config does not know (often a typo).
    #[error(
        "{}: unknown key `{key}` ({expected}); remove it or correct its spelling",
        Place { file, at, unnamed: "" }
    )]
    UnknownKey {
        file: PathBuf,
        at: Option<Position>,
        /// Dotted path of the key, e.g. `tun.nmae`, as far as it could be told.
        key: String,
        /// What serde expected instead, e.g. "expected `name` or `mtu`".
        expected: String,
    },
    /// A required key is absent.
    #[error("{}: missing required key `{key}`; add it", file.display())]
    Missing { file: PathBuf, key: String },
    /// A key has a value of the wrong type or form (e.g. a bad duration).
    #[error("{}: bad value for `{key}`: {message}", Place { file, at, unnamed: "" })]
    BadValue {
        file: PathBuf,
        at: Option<Position>,
        key: String,
        message: String,
    },
    /// The TOML is well-formed but a value breaks a rule.
    #[error("{}: invalid `{key}`: {message}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl NodeConfig {
    /// Parses and validates a node config. `file` is the path the text was
    /// read from: used in errors and to resolve relative paths, never read.
    pub fn parse(text: &str, file: &Path) -> Result<NodeConfig, ConfigError> {
        let mut config: NodeConfig = from_toml(text, file)?;
        let base = base_dir(file);
        config.pki.resolve(&base);
        config.api.resolve(&base);
        if let Some(runner) = &mut config.runner {
            runner.resolve(&base);
        }
        for service in &mut config.services {
            service.resolve(&base);
        }
        config.flows.resolve(&base);
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        self.pki.validate(file, true)?;
        self.flows.validate(file)?;
        if self.listen.tcp.is_some()
            || self.listen.tls_cert.is_some()
            || self.listen.tls_key.is_some()
        {
            return Err(invalid(
                file,
                "listen.tcp",
                "only a lighthouse listens on TCP; a node reaches a lighthouse's TCP listener with [[lighthouses]] tcp = \"HOST:443\"",
            ));
        }
        // `[::ffff:198.18.0.1]:4242` is 198.18.0.1:4242: one lighthouse, one
        // address, however it was written (datagrams arrive as plain IPv4).
        for entry in &mut self.lighthouses {
            entry.endpoint =
                SocketAddr::new(entry.endpoint.ip().to_canonical(), entry.endpoint.port());
        }
        for (i, entry) in self.lighthouses.iter().enumerate() {
            entry.validate(file, i)?;
            if let Some(first) = self.lighthouses[..i]
                .iter()
                .position(|e| e.written() == entry.written())
            {
                return Err(invalid(
                    file,
                    format!("lighthouses[{i}].endpoint"),
                    format!(
                        "{} is listed twice (also lighthouses[{first}]); remove the duplicate entry",
                        entry.written()
                    ),
                ));
            }
        }
        self.tun.validate(file)?;
        self.api.validate(file)?;
        self.log.validate(file)?;
        self.peers.validate(file)?;
        if self.relay.packets_per_sec == 0 {
            return Err(invalid(
                file,
                "relay.packets_per_sec",
                "0 would relay nothing; give a positive rate or set enabled = false",
            ));
        }
        self.firewall.validate(file)?;
        if let Some(gateway) = &mut self.gateway {
            gateway.validate(file)?;
        }
        self.dns.validate(file)?;
        if let Some(runner) = &self.runner {
            runner.validate(file)?;
        }
        if let Some(a) = &self.proxy.socks5 {
            loopback_only(file, "proxy.socks5", a)?;
        }
        if let Some(a) = &self.proxy.http {
            loopback_only(file, "proxy.http", a)?;
        }
        for (i, f) in self.forwards.iter().enumerate() {
            loopback_only(file, &format!("forwards[{i}].listen"), &f.listen)?;
        }
        crate::services::validate_all(&self.services, file)?;
        validate_routes(&self.routes, file)
    }
}

impl LighthouseConfig {
    /// Parses and validates a lighthouse config. `file` is the path the text
    /// was read from: used in errors and to resolve relative paths, never read.
    pub fn parse(text: &str, file: &Path) -> Result<LighthouseConfig, ConfigError> {
        let mut config: LighthouseConfig = from_toml(text, file)?;
        let base = base_dir(file);
        config.pki.resolve(&base);
        if let Some(p) = &mut config.store.password_file {
            *p = resolve(&base, p);
        }
        config.api.resolve(&base);
        config.listen.resolve(&base);
        if let Some(enroll) = &mut config.enroll {
            enroll.resolve(&base);
            enroll.validate(file)?;
        }
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        self.pki.validate(file, false)?;
        self.store.validate(file)?;
        if self.listen.addr.port() == 0 {
            return Err(invalid(
                file,
                "listen.addr",
                format!(
                    "port 0 picks a random port, but nodes need a fixed lighthouse endpoint; \
                     set a port, e.g. \"0.0.0.0:{DEFAULT_PORT}\""
                ),
            ));
        }
        self.listen.validate_lighthouse(file)?;
        self.api.validate(file)?;
        self.admin.validate(file)?;
        self.log.validate(file)?;
        self.registry.validate(file)?;
        if self.flows.retain < Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                key: "flows.retain".into(),
                message: "keep flow records at least a minute (e.g. \"30d\")".into(),
            });
        }
        if self.relay.packets_per_sec == 0 {
            return Err(invalid(
                file,
                "relay.packets_per_sec",
                format!(
                    "0 would refuse every relayed packet; set enabled = false to turn relaying off, \
                     or a positive rate (default {DEFAULT_RELAY_PACKETS_PER_SEC})"
                ),
            ));
        }
        Ok(())
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addr: DEFAULT_LISTEN,
            tcp: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig {
            name: DEFAULT_TUN_NAME.to_string(),
            mtu: DEFAULT_MTU,
            offload: true,
            mode: TunMode::Tun,
            accept_routes: false,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: DEFAULT_LOG_LEVEL.to_string(),
            format: crate::ops::LogFormat::default(),
        }
    }
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            keepalive: DEFAULT_KEEPALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            relay_after: DEFAULT_RELAY_AFTER,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            expiry: DEFAULT_REGISTRY_EXPIRY,
        }
    }
}

impl PkiConfig {
    fn resolve(&mut self, base: &Path) {
        for path in [&mut self.ca, &mut self.cert, &mut self.key] {
            if !path.as_os_str().is_empty() {
                *path = resolve(base, path);
            }
        }
    }

    /// `may_enroll`: a node may leave out both `cert` and `key`.
    fn validate(&self, file: &Path, may_enroll: bool) -> Result<(), ConfigError> {
        if self.renew && !may_enroll {
            return Err(invalid(
                file,
                "pki.renew",
                "renewal is for nodes; a lighthouse's certificate is replaced by hand (SIGHUP reloads it)",
            ));
        }
        if self.renew && self.enrolls() {
            return Err(invalid(
                file,
                "pki.renew",
                "an enrolling node gets a new certificate each time it enrolls; renew is for a node with [pki] cert and key",
            ));
        }
        if may_enroll && self.enrolls() && !self.ca.as_os_str().is_empty() {
            return Ok(());
        }
        if self.ca.as_os_str().is_empty() {
            return Err(invalid(
                file,
                "pki.ca",
                "the path is empty; give a file path",
            ));
        }
        // Left out (or empty): a node that does not enroll needs both.
        for (key, path) in [("pki.cert", &self.cert), ("pki.key", &self.key)] {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::Missing {
                    file: file.to_path_buf(),
                    key: key.into(),
                });
            }
        }
        Ok(())
    }
}

impl EnrollConfig {
    fn resolve(&mut self, base: &Path) {
        for path in [&mut self.issuer_cert, &mut self.issuer_key, &mut self.store] {
            *path = resolve(base, path);
        }
        for renewing in &mut self.renew {
            for path in [&mut renewing.issuer_cert, &mut renewing.issuer_key] {
                *path = resolve(base, path);
            }
        }
        for provider in &mut self.oidc {
            if !provider.jwks_is_url() && !provider.jwks.is_empty() {
                provider.jwks = resolve(base, Path::new(&provider.jwks))
                    .to_string_lossy()
                    .into_owned();
            }
        }
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(net) = self.pool.iter().find(|n| n.trunc() != **n) {
            return Err(invalid(
                file,
                "enroll.pool".to_string(),
                format!("{net} has host bits set; did you mean {}?", net.trunc()),
            ));
        }
        for (key, value) in [
            ("enroll.per_source_per_sec", self.per_source_per_sec),
            ("enroll.total_per_sec", self.total_per_sec),
        ] {
            if value == 0 {
                return Err(invalid(
                    file,
                    key.to_string(),
                    "must be positive: it is how many enrollment datagrams are answered per second",
                ));
            }
        }
        for (i, p) in self.oidc.iter().enumerate() {
            let key = |k: &str| format!("enroll.oidc[{i}].{k}");
            for (k, v) in [
                ("issuer", &p.issuer),
                ("audience", &p.audience),
                ("jwks", &p.jwks),
            ] {
                if v.trim().is_empty() {
                    return Err(invalid(
                        file,
                        key(k),
                        "is empty; every [[enroll.oidc]] needs issuer, audience and jwks",
                    ));
                }
            }
            if p.jwks.starts_with("http://") && !http_url_is_loopback(&p.jwks) {
                return Err(invalid(
                    file,
                    key("jwks"),
                    "plain http would let anyone on the path forge tokens; use the provider's https URL or a file",
                ));
            }
            if p.rules.is_empty() {
                return Err(invalid(
                    file,
                    key("rules"),
                    "no rules: add [[enroll.oidc.rules]] with the claims a job must carry (e.g. repository) and the groups it gets",
                ));
            }
            for (j, rule) in p.rules.iter().enumerate() {
                let rkey = |k: &str| format!("enroll.oidc[{i}].rules[{j}].{k}");
                // Every token from a public CI provider carries the provider's
                // issuer: a rule without a claim that narrows it down would
                // admit every job of every user of that provider.
                if !rule
                    .claims
                    .values()
                    .any(|pat| pat.chars().any(|c| c != '*'))
                {
                    return Err(invalid(
                        file,
                        rkey("claims"),
                        "no claim narrows the rule down, so any job anywhere on this provider would enroll; \
                         name at least one, e.g. claims = { repository = \"acme/app\" }",
                    ));
                }
                if rule.groups.is_empty() {
                    return Err(invalid(
                        file,
                        rkey("groups"),
                        "is empty; name the groups the job gets, e.g. [\"ci\"]",
                    ));
                }
                if rule.cert_ttl.is_some_and(|d| d.is_zero()) {
                    return Err(invalid(file, rkey("cert_ttl"), "is zero; give a lifetime such as \"30m\", or leave it out for the issuer's maximum"));
                }
            }
        }
        Ok(())
    }
}

/// Whether an `http://` URL's host is a loopback address (tests and local
/// proxies may serve plain http there; nothing else may).
pub fn http_url_is_loopback(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl LighthouseEntry {
    fn validate(&self, file: &Path, index: usize) -> Result<(), ConfigError> {
        if (self.host.is_none() && self.endpoint.ip().is_unspecified()) || self.endpoint.port() == 0
        {
            return Err(invalid(
                file,
                format!("lighthouses[{index}].endpoint"),
                format!(
                    "{} cannot be dialled; give the lighthouse's reachable address and port, \
                     e.g. \"198.18.0.1:{DEFAULT_PORT}\"",
                    self.endpoint
                ),
            ));
        }
        if let Some(name) = &self.name {
            if name.trim().is_empty() {
                return Err(invalid(
                    file,
                    format!("lighthouses[{index}].name"),
                    "the name is empty; give the lighthouse certificate's name or remove the key",
                ));
            }
        }
        if self.transport == crate::transport::Transport::Tcp && self.tcp.is_none() {
            return Err(invalid(
                file,
                format!("lighthouses[{index}].transport"),
                "transport = \"tcp\" needs the lighthouse's TCP listener: add tcp = \"HOST:443\"",
            ));
        }
        Ok(())
    }
}

impl TunConfig {
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let name = &self.name;
        let len = name.chars().count();
        if len == 0 || len > MAX_TUN_NAME_LEN {
            return Err(invalid(
                file,
                "tun.name",
                format!(
                    "{name:?} has {len} characters; an interface name needs 1 to \
                     {MAX_TUN_NAME_LEN}, e.g. \"{DEFAULT_TUN_NAME}\""
                ),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(invalid(
                file,
                "tun.name",
                format!("{name:?} contains {bad:?}; use only letters, digits, '_', '.' and '-'"),
            ));
        }
        if name == "." || name == ".." {
            return Err(invalid(
                file,
                "tun.name",
                format!("{name:?} is not a valid interface name; use e.g. \"{DEFAULT_TUN_NAME}\""),
            ));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(invalid(
                file,
                "tun.mtu",
                format!(
                    "{} is out of range; use {MIN_MTU} to {MAX_MTU} bytes (default {DEFAULT_MTU})",
                    self.mtu
                ),
            ));
        }
        Ok(())
    }
}

impl ApiConfig {
    fn resolve(&mut self, base: &Path) {
        if let Some(socket) = &mut self.socket {
            *socket = resolve(base, socket);
        }
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(group) = &self.group {
            if group.is_empty()
                || group.len() > 64
                || group
                    .chars()
                    .any(|c| c.is_control() || c == ':' || c.is_whitespace())
            {
                return Err(invalid(
                    file,
                    "api.group",
                    format!("{group:?} is not a group name; give the name of a group on this machine, or remove the key"),
                ));
            }
        }
        match &self.socket {
            Some(path) if path.as_os_str().is_empty() => Err(invalid(
                file,
                "api.socket",
                "the path is empty; give a socket path or remove the key for the default",
            )),
            _ => Ok(()),
        }
    }
}

impl LogConfig {
    fn validate(&mut self, file: &Path) -> Result<(), ConfigError> {
        let level = self.level.to_ascii_lowercase();
        if !LOG_LEVELS.contains(&level.as_str()) {
            return Err(invalid(
                file,
                "log.level",
                format!(
                    "{:?} is not a level; use one of {}",
                    self.level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        self.level = level;
        Ok(())
    }
}

impl PeersConfig {
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let keepalive = self.keepalive;
        if keepalive.subsec_nanos() != 0 || keepalive.as_secs() > u64::from(u16::MAX) {
            return Err(invalid(
                file,
                "peers.keepalive",
                format!(
                    "{} is not a whole number of seconds up to {}s (WireGuard's limit); \
                     use e.g. \"25s\", or \"0s\" to disable",
                    crate::duration::format_duration(keepalive),
                    u16::MAX
                ),
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(invalid(
                file,
                "peers.idle_timeout",
                "must be longer than zero, e.g. \"5m\"",
            ));
        }
        Ok(())
    }
}

impl RegistryConfig {
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if self.expiry.is_zero() {
            return Err(invalid(
                file,
                "registry.expiry",
                "must be longer than zero (nodes would be dropped at once), e.g. \"30s\"",
            ));
        }
        Ok(())
    }
}

/// `serde(deserialize_with)` helper: a duration written as a string like
/// `"25s"`, `"5m"` or `"1h30m"` (see [`parse_duration`]).
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"25s\", \"5m\" or \"1h30m\"")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }
    }

    deserializer.deserialize_str(DurationVisitor)
}

/// `serde(deserialize_with)` helper: an optional [`duration`] (the key may be
/// left out, with `#[serde(default)]`).
fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// Deserializes `text` and turns toml's errors into [`ConfigError`]s that
/// name the file, the position and, where it can be told, the dotted key.
fn from_toml<T: serde::de::DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|err| classify(text, file, &err))
}

fn classify(text: &str, file: &Path, err: &toml::de::Error) -> ConfigError {
    let file = file.to_path_buf();
    let err = TomlError::read(err);
    let at = err.at(text);
    let TomlError {
        message,
        span,
        mistake,
    } = err;
    match mistake {
        Mistake::UnknownKey { name, expected } => {
            let key = match &span {
                Some(s) => key_path_at(text, s.start, &name),
                None => name,
            };
            return ConfigError::UnknownKey {
                file,
                at,
                key,
                expected,
            };
        }
        Mistake::Missing { name } => {
            // toml points a missing field at the table that lacks it, or at an
            // empty span for the top level.
            let table = span
                .filter(|s| !s.is_empty())
                .and_then(|s| header_path_at_or_before(text, s.start));
            let key = match table {
                Some(table) => format!("{table}.{name}"),
                None => name,
            };
            return ConfigError::Missing { file, key };
        }
        Mistake::BadValue => {
            if let Some(key) = span.and_then(|s| value_key_path_at(text, s.start)) {
                let mut message = message;
                if message.starts_with("invalid socket address") {
                    message.push_str(
                        "; write address:port, e.g. \"198.18.0.1:4242\" or \"[2001:db8::1]:4242\"",
                    );
                }
                if message.ends_with("expected a sequence") && key == "lighthouses" {
                    message.push_str("; write each entry as [[lighthouses]] (double brackets)");
                }
                return ConfigError::BadValue {
                    file,
                    at,
                    key,
                    message,
                };
            }
        }
        Mistake::Syntax => {}
    }
    ConfigError::Syntax { file, at, message }
}

pub(crate) fn invalid(
    file: &Path,
    key: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.into(),
        message: message.into(),
    }
}

fn base_dir(file: &Path) -> PathBuf {
    file.parent().map(Path::to_path_buf).unwrap_or_default()
}

pub(crate) fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() || path.as_os_str().is_empty() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// The line containing byte `offset`: (start offset, text).
fn line_at(text: &str, offset: usize) -> (usize, &str) {
    let offset = offset.min(text.len());
    let start = text.as_bytes()[..offset]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = text.as_bytes()[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |i| start + i);
    (start, text.get(start..end).unwrap_or(""))
}

/// The dotted path of the table header (`[a.b]` or `[[a]]`) governing the
/// line that holds byte `offset`, including that line itself if it is a header.
fn header_path_at_or_before(text: &str, offset: usize) -> Option<&str> {
    let (start, line) = line_at(text, offset);
    let end = (start + line.len()).min(text.len());
    let upto = text.get(..end)?;
    upto.lines().rev().find_map(|l| {
        let l = l.trim();
        if !l.starts_with('[') {
            return None;
        }
        let inner = l.trim_start_matches('[').split(']').next().unwrap_or("");
        Some(inner.trim())
    })
}

/// Best-effort dotted path of an unknown key named `name` whose span starts at
/// `offset`: the governing table header plus any dotted prefix on the line.
/// Falls back to the bare name when the layout is not the plain
/// `[table]` / `key = value` kind (inline tables, quoted keys).
fn key_path_at(text: &str, offset: usize, name: &str) -> String {
    let (start, _) = line_at(text, offset);
    let prefix = text.get(start..offset.min(text.len())).unwrap_or("").trim();
    let mut parts: Vec<&str> = Vec::new();
    if let Some(inner) = prefix.strip_prefix('[') {
        // The unknown name is part of a table header such as `[tunnel]`.
        parts.extend(dotted(inner.trim_start_matches('[')));
    } else {
        if let Some(header) = header_path_at_or_before(text, offset) {
            parts.extend(dotted(header));
        }
        parts.extend(dotted(prefix));
    }
    if parts.iter().all(|p| is_bare_key(p)) {
        parts.push(name);
        parts.join(".")
    } else {
        name.to_string()
    }
}

/// Best-effort dotted path of the key whose value starts at byte `offset`.
fn value_key_path_at(text: &str, offset: usize) -> Option<String> {
    let (start, line) = line_at(text, offset);
    if line.trim_start().starts_with('[') {
        // toml points at the header of a table whose type is wrong.
        return header_path_at_or_before(text, offset)
            .filter(|h| dotted(h).all(is_bare_key))
            .map(str::to_string);
    }
    let upto = text.get(start..offset.min(text.len()))?;
    let (key, _) = upto.split_once('=')?;
    let mut parts: Vec<&str> = header_path_at_or_before(text, start)
        .map(dotted)
        .into_iter()
        .flatten()
        .collect();
    let own: Vec<&str> = dotted(key).collect();
    if own.is_empty() {
        return None;
    }
    parts.extend(own);
    if parts.iter().all(|p| is_bare_key(p)) {
        Some(parts.join("."))
    } else {
        None
    }
}

/// The non-empty segments of a dotted key, trimmed.
fn dotted(key: &str) -> impl Iterator<Item = &str> {
    key.split('.').map(str::trim).filter(|p| !p.is_empty())
}

fn is_bare_key(part: &str) -> bool {
    !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINIMAL_NODE: &str = "[pki]\nca = \"ca.crt\"\ncert = \"node.crt\"\nkey = \"node.key\"\n";

    fn file() -> PathBuf {
        PathBuf::from("/etc/tern/node.toml")
    }

    fn node(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, &file())
    }

    fn lighthouse(text: &str) -> Result<LighthouseConfig, ConfigError> {
        LighthouseConfig::parse(text, Path::new("/etc/tern/lighthouse.toml"))
    }

    fn node_with(extra: &str) -> Result<NodeConfig, ConfigError> {
        node(&format!("{MINIMAL_NODE}{extra}"))
    }

    #[test]
    fn lighthouse_endpoints_by_name() {
        let config = node_with(
            "[[lighthouses]]\nendpoint = \"LH.example.com:4242\"\n[[lighthouses]]\nendpoint = \"[2001:db8::1]:4242\"\n",
        )
        .unwrap();
        let named = &config.lighthouses[0];
        assert_eq!(named.host.as_deref(), Some("lh.example.com"));
        assert_eq!(named.written(), "lh.example.com:4242");
        assert_eq!(named.endpoint.port(), 4242);
        let resolved = named.resolved("[::ffff:198.18.0.1]:1".parse().unwrap());
        assert_eq!(resolved.endpoint, "198.18.0.1:4242".parse().unwrap());
        assert_eq!(config.lighthouses[1].host, None);
        let twice = "[[lighthouses]]\nendpoint = \"lh.example.com:4242\"\n".repeat(2);
        assert_eq!(invalid_key(node_with(&twice)), "lighthouses[1].endpoint");
        for bad in [
            "lh.example.com",
            "lh.example.com:0",
            "lh example:4242",
            "198.18.0.1",
        ] {
            let err = node_with(&format!("[[lighthouses]]\nendpoint = \"{bad}\"\n")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("HOST:PORT") || text.contains("cannot be dialled"),
                "{bad}: {text}"
            );
            assert!(text.contains("lighthouses"), "{bad}: {text}");
        }
    }

    #[test]
    fn a_node_may_relay() {
        assert!(!node_with("").unwrap().relay.enabled);
        let config = node_with("[relay]\nenabled = true\npackets_per_sec = 5000\n").unwrap();
        assert_eq!(
            config.relay,
            NodeRelayConfig {
                enabled: true,
                packets_per_sec: 5000
            }
        );
        assert_eq!(
            invalid_key(node_with("[relay]\nenabled = true\npackets_per_sec = 0\n")),
            "relay.packets_per_sec"
        );
    }

    #[test]
    fn tcp_transport_keys() {
        let lh = lighthouse(&format!(
            "{MINIMAL_NODE}[listen]\naddr = \"[::]:4242\"\ntcp = \"0.0.0.0:443\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n"
        ))
        .unwrap();
        assert_eq!(lh.listen.tcp, Some("0.0.0.0:443".parse().unwrap()));
        assert_eq!(lh.listen.tls_cert, Some(PathBuf::from("/etc/tern/tls.crt")));
        for (extra, key) in [
            ("tcp = \"0.0.0.0:0\"\n", "listen.tcp"),
            (
                "tcp = \"0.0.0.0:443\"\ntls_cert = \"c\"\n",
                "listen.tls_key",
            ),
            ("tls_cert = \"c\"\ntls_key = \"k\"\n", "listen.tls_cert"),
        ] {
            let err = lighthouse(&format!("{MINIMAL_NODE}[listen]\n{extra}")).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if k == key),
                "{extra}: {err}"
            );
        }
        let node = node_with(
            "[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\ntcp = \"lh.example.com:443\"\ntransport = \"tcp\"\n",
        )
        .unwrap();
        let entry = &node.lighthouses[0];
        assert_eq!(entry.transport, crate::transport::Transport::Tcp);
        assert_eq!(
            entry.tcp.as_ref().unwrap().to_string(),
            "lh.example.com:443"
        );
        let err =
            node_with("[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\ntransport = \"tcp\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("tcp = \"HOST:443\""), "{err}");
        let err = node_with("[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\ntcp = \"lh\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
        let err =
            node_with("[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\ntransport = \"quic\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("auto"), "{err}");
        let err = node_with("[listen]\ntcp = \"0.0.0.0:443\"\n").unwrap_err();
        assert!(err.to_string().contains("only a lighthouse"), "{err}");
    }

    #[test]
    fn renew_is_for_nodes_with_a_certificate_of_their_own() {
        let renewing =
            MINIMAL_NODE.replace("key = \"node.key\"\n", "key = \"node.key\"\nrenew = true\n");
        assert!(node(&renewing).unwrap().pki.renew);
        assert!(!node(MINIMAL_NODE).unwrap().pki.renew);
        let enrolling = "[pki]\nca = \"ca.crt\"\nrenew = true\n";
        assert_eq!(invalid_key(node(enrolling)), "pki.renew");
        let lh = "[pki]\nca = \"ca.crt\"\ncert = \"lh.crt\"\nkey = \"lh.key\"\nrenew = true\n[listen]\naddr = \"0.0.0.0:4242\"\n";
        match LighthouseConfig::parse(lh, Path::new("/etc/tern/lighthouse.toml")) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "pki.renew"),
            other => panic!("expected pki.renew refused, got {other:?}"),
        }
    }

    fn invalid_key(result: Result<NodeConfig, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn node_defaults() {
        let config = node(MINIMAL_NODE).unwrap();
        assert_eq!(config.listen.addr, "0.0.0.0:4242".parse().unwrap());
        assert!(config.lighthouses.is_empty());
        assert_eq!(config.tun.name, "tern0");
        assert_eq!(config.tun.mtu, 1420);
        assert_eq!(config.api.socket, None);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.peers.keepalive, Duration::from_secs(25));
        assert_eq!(config.peers.idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn lighthouse_defaults() {
        let config = lighthouse(MINIMAL_NODE).unwrap();
        assert_eq!(config.listen, ListenConfig::default());
        assert_eq!(config.api, ApiConfig::default());
        assert_eq!(config.admin, crate::admin::AdminConfig::default());
        assert_eq!(config.admin.port, 80);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.registry.expiry, Duration::from_secs(30));
    }

    #[test]
    fn node_every_key() {
        let text = r#"
            [pki]
            ca = "/pki/ca.crt"
            cert = "/pki/node.crt"
            key = "/pki/node.key"
            [listen]
            addr = "198.18.1.5:5000"
            [[lighthouses]]
            endpoint = "198.18.0.1:4242"
            name = "lh-1"
            [[lighthouses]]
            endpoint = "198.18.0.3:4242"
            [tun]
            name = "ci.tun-0_a"
            mtu = 1280
            [api]
            socket = "/run/tern/api.sock"
            [log]
            level = "DEBUG"
            [peers]
            keepalive = "0s"
            idle_timeout = "1h30m"
        "#;
        let config = node(text).unwrap();
        assert_eq!(
            config,
            NodeConfig {
                pki: PkiConfig {
                    ca: "/pki/ca.crt".into(),
                    cert: "/pki/node.crt".into(),
                    key: "/pki/node.key".into(),
                    renew: false,
                },
                listen: ListenConfig {
                    addr: "198.18.1.5:5000".parse().unwrap(),
                    ..ListenConfig::default()
                },
                lighthouses: vec![
                    LighthouseEntry {
                        endpoint: "198.18.0.1:4242".parse().unwrap(),
                        name: Some("lh-1".into()),
                        host: None,
                        tcp: None,
                        transport: Default::default(),
                    },
                    LighthouseEntry {
                        endpoint: "198.18.0.3:4242".parse().unwrap(),
                        name: None,
                        host: None,
                        tcp: None,
                        transport: Default::default(),
                    },
                ],
                tun: TunConfig {
                    name: "ci.tun-0_a".into(),
                    mtu: 1280,
                    offload: true,
                    mode: TunMode::Tun,
                    accept_routes: false,
                },
                api: ApiConfig {
                    socket: Some("/run/tern/api.sock".into()),
                    group: None,
                },
                log: LogConfig {
                    level: "debug".into(),
                    format: crate::ops::LogFormat::Text,
                },
                metrics: crate::ops::MetricsConfig::default(),
                peers: PeersConfig {
                    keepalive: Duration::ZERO,
                    idle_timeout: Duration::from_secs(5400),
                    relay_after: DEFAULT_RELAY_AFTER,
                },
                relay: NodeRelayConfig::default(),
                firewall: FirewallConfig::default(),
                gateway: None,
                routes: vec![],
                runner: None,
                proxy: ProxyConfig::default(),
                forwards: vec![],
                services: vec![],
                dns: crate::dns::DnsConfig::default(),
                flows: crate::flows::FlowsConfig::default(),
            }
        );
    }

    #[test]
    fn lighthouse_every_key() {
        let text = r#"
            [pki]
            ca = "ca.crt"
            cert = "lh.crt"
            key = "lh.key"
            [listen]
            addr = "198.18.0.1:4242"
            [api]
            socket = "run/lh.sock"
            [admin]
            port = 8080
            groups = ["net-admin"]
            read_groups = ["auditor"]
            [log]
            level = "trace"
            [registry]
            expiry = "45s"
        "#;
        let config = lighthouse(text).unwrap();
        assert_eq!(config.admin.port, 8080);
        assert_eq!(config.admin.groups, vec!["net-admin"]);
        assert_eq!(config.admin.read_groups, vec!["auditor"]);
        assert_eq!(config.pki.cert, PathBuf::from("/etc/tern/lh.crt"));
        assert_eq!(config.listen.addr, "198.18.0.1:4242".parse().unwrap());
        assert_eq!(
            config.api.socket,
            Some(PathBuf::from("/etc/tern/run/lh.sock"))
        );
        assert_eq!(config.log.level, "trace");
        assert_eq!(config.registry.expiry, Duration::from_secs(45));
    }

    #[test]
    fn unknown_top_level_key_names_key_file_and_line() {
        let err = node(&format!("{MINIMAL_NODE}colour = \"blue\"\n")).unwrap_err();
        match &err {
            ConfigError::UnknownKey {
                file: f, at, key, ..
            } => {
                assert_eq!(f, &file());
                // After the keys of [pki], TOML puts `colour` inside [pki].
                assert_eq!(*at, Some(Position { line: 5, col: 1 }));
                assert_eq!(key, "pki.colour");
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }

        let err = node(&format!("colour = \"blue\"\n{MINIMAL_NODE}")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/etc/tern/node.toml:1:1"), "{text}");
        assert!(text.contains("unknown key `colour`"), "{text}");
        assert!(text.contains("`pki`"), "lists the expected keys: {text}");
    }

    #[test]
    fn runner_section_defaults_and_refusals() {
        let config =
            node_with("[runner]\nlabels = [\"linux\", \"vpc-a\"]\nallow_groups = [\"ci\"]\n")
                .unwrap();
        let runner = config.runner.unwrap();
        assert_eq!(runner.labels, vec!["linux", "vpc-a"]);
        assert_eq!(runner.concurrency, 1);
        assert_eq!(runner.max_job_duration, Duration::from_secs(3600));
        assert!(!runner.keep_workspaces);
        assert_eq!(runner.work_dir, PathBuf::from(DEFAULT_RUNNER_WORK_DIR));
        let relative =
            node_with("[runner]\nallow_groups = [\"ci\"]\nwork_dir = \"jobs\"\n").unwrap();
        assert_eq!(
            relative.runner.unwrap().work_dir,
            PathBuf::from("/etc/tern/jobs")
        );
        for (text, key) in [
            ("[runner]\nlabels = [\"x\"]\n", "allow_groups"),
            ("[runner]\nallow_groups = []\n", "runner.allow_groups"),
            (
                "[runner]\nallow_groups = [\"CI!\"]\n",
                "runner.allow_groups",
            ),
            (
                "[runner]\nallow_groups = [\"ci\"]\nlabels = [\"Bad Label\"]\n",
                "runner.labels",
            ),
            (
                "[runner]\nallow_groups = [\"ci\"]\nconcurrency = 0\n",
                "runner.concurrency",
            ),
            (
                "[runner]\nallow_groups = [\"ci\"]\nmax_job_duration = \"48h\"\n",
                "runner.max_job_duration",
            ),
            ("[runner]\nallow_groups = [\"ci\"]\ncolour = 1\n", "colour"),
        ] {
            let err = node_with(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn tun_offload_defaults_on_and_can_be_turned_off() {
        let on = node_with("[tun]\nname = \"tern0\"\n").unwrap();
        assert!(on.tun.offload);
        let off = node_with("[tun]\noffload = false\n").unwrap();
        assert!(!off.tun.offload);
        let err = node_with("[tun]\noffload = \"yes\"\n").unwrap_err();
        assert!(err.to_string().contains("offload"), "{err}");
    }

    #[test]
    fn userspace_mode_and_local_listeners() {
        let c = node_with(
            "[tun]\nmode = \"userspace\"\n[proxy]\nsocks5 = \"127.0.0.1:1080\"\nhttp = \"[::1]:8080\"\n[[forwards]]\nlisten = \"127.0.0.1:15432\"\ntarget = \"198.19.4.20:5432\"\n",
        )
        .unwrap();
        assert_eq!(c.tun.mode, TunMode::Userspace);
        assert_eq!(c.forwards[0].target.to_string(), "198.19.4.20:5432");
        assert_eq!(node_with("").unwrap().tun.mode, TunMode::Tun);
        for (text, key) in [
            ("[tun]\nmode = \"kernel\"\n", "mode"),
            ("[proxy]\nsocks5 = \"0.0.0.0:1080\"\n", "proxy.socks5"),
            ("[proxy]\nhttp = \"198.18.0.2:8080\"\n", "proxy.http"),
            (
                "[[forwards]]\nlisten = \"0.0.0.0:1\"\ntarget = \"198.19.0.1:1\"\n",
                "forwards[0].listen",
            ),
            (
                "[[forwards]]\nlisten = \"127.0.0.1:1\"\ntarget = \"db\"\n",
                "not a target with a port",
            ),
        ] {
            let err = node_with(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_key_in_table_names_key_file_and_line() {
        let err = node_with("[tun]\nname = \"tern0\"\n  nmae = \"x\"\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownKey {
                file: file(),
                at: Some(Position { line: 7, col: 3 }),
                key: "tun.nmae".into(),
                expected: "expected one of `name`, `mtu`, `offload`, `mode`, `accept_routes`"
                    .into(),
            }
        );
        let text = err.to_string();
        assert!(
            text.starts_with("/etc/tern/node.toml:7:3: unknown key `tun.nmae`"),
            "{text}"
        );

        let err =
            node_with("[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\nport = 1\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, at: Some(Position { line: 7, .. }), .. } if key == "lighthouses.port"),
            "{err:?}"
        );

        let err = lighthouse(&format!("{MINIMAL_NODE}[registry]\nexpire = \"1m\"\n")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "registry.expire"),
            "{err:?}"
        );

        // A whole unknown table, and a dotted key.
        let err = node_with("[tunnel]\nmtu = 1400\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "tunnel"),
            "{err:?}"
        );
        let err = node(&format!("tun.colour = 1\n{MINIMAL_NODE}")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "tun.colour"),
            "{err:?}"
        );

        // Node-only tables are unknown to the lighthouse and vice versa.
        let err = lighthouse(&format!("{MINIMAL_NODE}[tun]\nmtu = 1400\n")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "tun"),
            "{err:?}"
        );
        let err = node_with("[registry]\nexpiry = \"1m\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "registry"),
            "{err:?}"
        );
    }

    #[test]
    fn missing_keys_are_named() {
        let err = node("[pki]\nca = \"a\"\nkey = \"k\"\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::Missing {
                file: file(),
                key: "pki.cert".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "/etc/tern/node.toml: missing required key `pki.cert`; add it"
        );
        let err = node("[tun]\nmtu = 1400\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::Missing {
                file: file(),
                key: "pki".into()
            }
        );
        let err = node_with("[[lighthouses]]\nname = \"lh\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Missing { key, .. } if key == "lighthouses.endpoint"),
            "{err:?}"
        );
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let err = node_with("[peers]\nkeepalive = \"25 seconds\"\n").unwrap_err();
        match &err {
            ConfigError::BadValue {
                at, key, message, ..
            } => {
                assert_eq!(*at, Some(Position { line: 6, col: 13 }));
                assert_eq!(key, "peers.keepalive");
                assert!(message.contains("bad duration"), "{message}");
            }
            other => panic!("expected BadValue, got {other:?}"),
        }
        assert!(err.to_string().contains("node.toml:6:13"), "{err}");

        // A bare number has no unit: refused with a hint at the string form.
        let err = node_with("[peers]\nidle_timeout = 300\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key, message, .. }
                if key == "peers.idle_timeout" && message.contains("\"25s\"")),
            "{err:?}"
        );
        let err = lighthouse(&format!("{MINIMAL_NODE}[registry]\nexpiry = \"\"\n")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key, .. } if key == "registry.expiry"),
            "{err:?}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = node_with("[listen]\naddr = \"198.18.0.1\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key, message, .. }
                if key == "listen.addr" && message.contains("address:port")),
            "{err:?}"
        );
        let err = node_with("[tun]\nmtu = \"big\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key, .. } if key == "tun.mtu"),
            "{err:?}"
        );
        let err = node_with("[tun]\nmtu = 70000\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key, .. } if key == "tun.mtu"),
            "{err:?}"
        );
    }

    #[test]
    fn single_bracket_lighthouses_gets_a_hint() {
        let err = node_with("[lighthouses]\nendpoint = \"198.18.0.1:4242\"\n").unwrap_err();
        match &err {
            ConfigError::BadValue {
                key, message, at, ..
            } => {
                assert_eq!(key, "lighthouses");
                assert_eq!(*at, Some(Position { line: 5, col: 1 }));
                assert!(message.contains("[[lighthouses]]"), "{message}");
            }
            other => panic!("expected BadValue, got {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_carry_the_position() {
        let err = node("[pki\n").unwrap_err();
        assert!(!err.to_string().contains('\n'), "one line: {err}");
        assert!(
            matches!(
                &err,
                ConfigError::Syntax {
                    at: Some(Position { line: 1, .. }),
                    ..
                }
            ),
            "{err:?}"
        );
        let err = node(&format!("{MINIMAL_NODE}ca = \"again\"\n")).unwrap_err();
        assert!(
            matches!(
                &err,
                ConfigError::Syntax {
                    at: Some(Position { line: 5, .. }),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("/etc/tern/node.toml:5:"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let text = format!("{MINIMAL_NODE}[api]\nsocket = \"../run/tern.sock\"\n");
        let config = NodeConfig::parse(&text, Path::new("/etc/tern/node.toml")).unwrap();
        assert_eq!(config.pki.ca, PathBuf::from("/etc/tern/ca.crt"));
        assert_eq!(config.pki.cert, PathBuf::from("/etc/tern/node.crt"));
        assert_eq!(config.pki.key, PathBuf::from("/etc/tern/node.key"));
        assert_eq!(
            config.api.socket,
            Some(PathBuf::from("/etc/tern/../run/tern.sock"))
        );

        let config = NodeConfig::parse(&text, Path::new("conf/node.toml")).unwrap();
        assert_eq!(config.pki.ca, PathBuf::from("conf/ca.crt"));

        // A bare file name has an empty parent: paths stay relative to the
        // working directory, which is also the file's directory.
        let config = NodeConfig::parse(&text, Path::new("node.toml")).unwrap();
        assert_eq!(config.pki.ca, PathBuf::from("ca.crt"));
    }

    #[test]
    fn absolute_paths_are_kept() {
        let text = "[pki]\nca = \"/srv/pki/ca.crt\"\ncert = \"/srv/pki/n.crt\"\n\
                    key = \"/srv/pki/n.key\"\n[api]\nsocket = \"/run/t.sock\"\n";
        let config = NodeConfig::parse(text, Path::new("/etc/tern/node.toml")).unwrap();
        assert_eq!(config.pki.ca, PathBuf::from("/srv/pki/ca.crt"));
        assert_eq!(config.pki.cert, PathBuf::from("/srv/pki/n.crt"));
        assert_eq!(config.pki.key, PathBuf::from("/srv/pki/n.key"));
        assert_eq!(config.api.socket, Some(PathBuf::from("/run/t.sock")));
    }

    #[test]
    fn tun_name_rules() {
        for good in ["t", "tern0", "a.b-c_d", "123456789012345"] {
            let config = node_with(&format!("[tun]\nname = \"{good}\"\n")).unwrap();
            assert_eq!(config.tun.name, good);
        }
        for bad in [
            "",
            "1234567890123456",
            "tern 0",
            "tern/0",
            "tern:0",
            "tërn",
            ".",
            "..",
        ] {
            let key = invalid_key(node_with(&format!("[tun]\nname = \"{bad}\"\n")));
            assert_eq!(key, "tun.name", "{bad:?}");
        }
        let err = node_with("[tun]\nname = \"tern/0\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/tern/node.toml: invalid `tun.name`: \"tern/0\" contains '/'; \
             use only letters, digits, '_', '.' and '-'"
        );
    }

    #[test]
    fn mtu_range() {
        for good in [576, 1280, 1420, 9000] {
            assert_eq!(
                node_with(&format!("[tun]\nmtu = {good}\n"))
                    .unwrap()
                    .tun
                    .mtu,
                good
            );
        }
        for bad in [0, 575, 9001, 65535] {
            assert_eq!(
                invalid_key(node_with(&format!("[tun]\nmtu = {bad}\n"))),
                "tun.mtu"
            );
        }
    }

    #[test]
    fn log_level() {
        for good in LOG_LEVELS {
            assert_eq!(
                node_with(&format!("[log]\nlevel = \"{good}\"\n"))
                    .unwrap()
                    .log
                    .level,
                good
            );
        }
        let err = node_with("[log]\nlevel = \"verbose\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("use one of error, warn, info, debug, trace"),
            "{err}"
        );
        assert_eq!(invalid_key(node_with("[log]\nlevel = \"\"\n")), "log.level");
    }

    #[test]
    fn lighthouse_entries() {
        let two = "[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\n\
                   [[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\nname = \"lh\"\n";
        let err = node_with(two).unwrap_err();
        assert_eq!(
            err,
            ConfigError::Invalid {
                file: file(),
                key: "lighthouses[1].endpoint".into(),
                message: "198.18.0.1:4242 is listed twice (also lighthouses[0]); \
                          remove the duplicate entry"
                    .into(),
            }
        );
        let distinct = "[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\n\
                        [[lighthouses]]\nendpoint = \"198.18.0.1:4243\"\n";
        assert_eq!(node_with(distinct).unwrap().lighthouses.len(), 2);

        for bad in ["0.0.0.0:4242", "198.18.0.1:0", "[::]:4242"] {
            let text = format!("[[lighthouses]]\nendpoint = \"{bad}\"\n");
            assert_eq!(
                invalid_key(node_with(&text)),
                "lighthouses[0].endpoint",
                "{bad}"
            );
        }
        let text = "[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\nname = \" \"\n";
        assert_eq!(invalid_key(node_with(text)), "lighthouses[0].name");

        let v6 = "[[lighthouses]]\nendpoint = \"[2001:db8::1]:4242\"\n";
        assert_eq!(
            node_with(v6).unwrap().lighthouses[0].endpoint,
            "[2001:db8::1]:4242".parse().unwrap()
        );
        // An IPv4-mapped literal is the IPv4 address, and a duplicate of it.
        let mapped = "[[lighthouses]]\nendpoint = \"[::ffff:198.18.0.1]:4242\"\n";
        assert_eq!(
            node_with(mapped).unwrap().lighthouses[0].endpoint,
            "198.18.0.1:4242".parse().unwrap()
        );
        let twice = format!("{mapped}[[lighthouses]]\nendpoint = \"198.18.0.1:4242\"\n");
        assert_eq!(invalid_key(node_with(&twice)), "lighthouses[1].endpoint");
    }

    #[test]
    fn duration_rules() {
        assert_eq!(
            invalid_key(node_with("[peers]\nkeepalive = \"1500ms\"\n")),
            "peers.keepalive"
        );
        assert_eq!(
            invalid_key(node_with("[peers]\nkeepalive = \"65536s\"\n")),
            "peers.keepalive"
        );
        assert_eq!(
            node_with("[peers]\nkeepalive = \"65535s\"\n")
                .unwrap()
                .peers
                .keepalive,
            Duration::from_secs(65535)
        );
        assert_eq!(
            invalid_key(node_with("[peers]\nidle_timeout = \"0s\"\n")),
            "peers.idle_timeout"
        );
        let err = lighthouse(&format!("{MINIMAL_NODE}[registry]\nexpiry = \"0s\"\n")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "registry.expiry"),
            "{err:?}"
        );
    }

    #[test]
    fn lighthouse_needs_a_fixed_port() {
        let err =
            lighthouse(&format!("{MINIMAL_NODE}[listen]\naddr = \"0.0.0.0:0\"\n")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "listen.addr"),
            "{err:?}"
        );
        // A node may use an ephemeral port: the lighthouse reports what it sees.
        let config = node_with("[listen]\naddr = \"0.0.0.0:0\"\n").unwrap();
        assert_eq!(config.listen.addr.port(), 0);
    }

    #[test]
    fn empty_paths_are_refused() {
        let text = "[pki]\nca = \"\"\ncert = \"n.crt\"\nkey = \"n.key\"\n";
        assert_eq!(invalid_key(node(text)), "pki.ca");
        assert_eq!(
            invalid_key(node_with("[api]\nsocket = \"\"\n")),
            "api.socket"
        );
    }

    #[test]
    fn positions_count_characters() {
        let text = "a\nbé = 1\n";
        assert_eq!(position(text, 0), Position { line: 1, col: 1 });
        assert_eq!(position(text, 2), Position { line: 2, col: 1 });
        // "é" is two bytes but one column.
        assert_eq!(position(text, 5), Position { line: 2, col: 3 });
        assert_eq!(position(text, 6), Position { line: 2, col: 4 });
        assert_eq!(position(text, 999), Position { line: 3, col: 1 });
    }

    #[test]
    fn example_node_config_parses() {
        let text = include_str!("../../config/node.toml");
        let config = NodeConfig::parse(text, Path::new("/etc/tern/node.toml")).unwrap();
        assert_eq!(config.pki.ca, PathBuf::from("/etc/tern/ca.crt"));
        assert_eq!(config.pki.cert, PathBuf::from("/etc/tern/node.crt"));
        assert_eq!(config.pki.key, PathBuf::from("/etc/tern/node.key"));
        assert_eq!(config.listen.addr, "0.0.0.0:4242".parse().unwrap());
        assert_eq!(
            config.lighthouses[0].endpoint,
            "198.18.0.1:4242".parse().unwrap()
        );
        assert_eq!(config.tun, TunConfig::default());
        assert_eq!(config.log, LogConfig::default());
        assert_eq!(config.peers, PeersConfig::default());
        assert!(config.api.socket.is_some());
        assert_eq!(config.dns.domain, "tern");
        assert_eq!(config.dns.listen, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(config.dns.configure_system, Some(true));
    }

    #[test]
    fn dns_keys_are_checked_and_zones_made_canonical() {
        let c = node_with("[dns]\ndomain = \"Mesh.Example.\"\n").unwrap();
        assert_eq!(c.dns.domain, "mesh.example");
        let gw = |extra: &str| {
            node_with(&format!(
                "[gateway]\nsubnets = [\"198.19.0.0/24\"]\n[[gateway.dns]]\nzone = \"Internal\"\n{extra}"
            ))
        };
        let c = gw("resolver = \"198.19.0.2\"\n").unwrap();
        let dns = &c.gateway.unwrap().dns[0];
        assert_eq!(dns.zone, "internal");
        assert_eq!(dns.resolver, "198.19.0.2:53".parse().unwrap());
        for (text, says) in [
            ("[dns]\ndomain = \"bad domain\"\n", "dns.domain"),
            ("[dns]\nlisten = [\"0.0.0.0:53\"]\n", "dns.listen[0]"),
        ] {
            let err = node_with(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        for (extra, says) in [
            ("resolver = \"dns.internal\"\n", "resolver"),
            ("resolver = \"0.0.0.0:53\"\n", "gateway.dns[0].resolver"),
            (
                "resolver = \"198.19.0.2\"\ngroups = []\n",
                "lets nobody ask",
            ),
            ("", "resolver"),
        ] {
            let err = gw(extra).unwrap_err().to_string();
            assert!(err.contains(says), "{extra}: {err}");
        }
    }

    #[test]
    fn example_gateway_config_parses() {
        let text = include_str!("../../config/gateway.toml");
        let config = NodeConfig::parse(text, Path::new("/etc/tern/gateway.toml")).unwrap();
        let gw = config.gateway.expect("[gateway]");
        assert_eq!(gw.subnets, vec!["198.19.0.0/24".parse().unwrap()]);
        assert!(gw.masquerade);
        assert_eq!(gw.dns.len(), 1);
        assert_eq!(gw.dns[0].zone, "internal");
        assert_eq!(gw.dns[0].resolver, "198.19.0.2:53".parse().unwrap());
        assert_eq!(gw.dns[0].groups, Some(vec!["ci".to_string()]));
        assert_eq!(config.firewall.inbound.len(), 3);
        assert_eq!(
            config.firewall.inbound[0].local_cidr,
            Some("198.19.0.10/32".parse().unwrap())
        );
    }

    #[test]
    fn example_runner_config_parses() {
        let text = include_str!("../../config/runner.toml");
        let config = NodeConfig::parse(text, Path::new("/etc/tern/runner.toml")).unwrap();
        let runner = config.runner.expect("[runner]");
        assert_eq!(runner.labels, vec!["linux", "vpc-a"]);
        assert_eq!(runner.allow_groups, vec!["ci", "deploy"]);
        assert_eq!(runner.concurrency, 2);
        for key in [
            "labels =",
            "allow_groups =",
            "concurrency =",
            "work_dir =",
            "max_job_duration =",
            "keep_workspaces =",
            "audit_log =",
        ] {
            assert!(
                text.lines().any(|l| l.trim_start().starts_with(key)),
                "config/runner.toml lacks {key}"
            );
        }
    }

    #[test]
    fn firewall_rules_parse_and_bad_ones_name_the_key() {
        let base = "[pki]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
        let ok = format!("{base}[firewall]\nlog = true\n[[firewall.inbound]]\nproto = \"tcp\"\nport = 22\ngroups = [\"ci\"]\n[[firewall.inbound]]\nproto = \"udp\"\nport = \"8000-8100\"\nhost = \"b\"\naction = \"reject\"\n");
        let config = node(&ok).unwrap();
        assert_eq!(config.firewall.inbound.len(), 2);
        assert_eq!(
            config.firewall.inbound[0].port,
            crate::policy::PortRange {
                first: 22,
                last: 22
            }
        );
        assert_eq!(
            config.firewall.inbound[1].action,
            crate::policy::Action::Reject
        );
        for (bad, key) in [
            (
                "[[firewall.inbound]]\nproto = \"sctp\"\n",
                "firewall.inbound",
            ),
            (
                "[[firewall.inbound]]\nport = \"1-2-3\"\nproto = \"tcp\"\n",
                "firewall.inbound",
            ),
            (
                "[[firewall.inbound]]\nproto = \"icmp\"\nport = \"22\"\n",
                "firewall.inbound[0].port",
            ),
            ("[[firewall.inbound]]\nprot = \"tcp\"\n", "prot"),
            (
                "[gateway]\nsubnets = [\"198.19.0.1/24\"]\n",
                "gateway.subnets[0]",
            ),
            (
                "[[routes]]\nsubnet = \"198.19.0.0/24\"\nvia = \"\"\n",
                "routes[0].via",
            ),
        ] {
            let err = node(&format!("{base}{bad}")).unwrap_err().to_string();
            assert!(err.contains(key), "{bad:?}: {err}");
        }
    }

    #[test]
    fn example_lighthouse_config_parses() {
        let text = include_str!("../../config/lighthouse.toml");
        let config = LighthouseConfig::parse(text, Path::new("/etc/tern/lighthouse.toml")).unwrap();
        assert_eq!(config.pki.ca, PathBuf::from("/etc/tern/ca.crt"));
        assert_eq!(config.listen.addr.port(), DEFAULT_PORT);
        assert_eq!(config.log, LogConfig::default());
        assert_eq!(config.registry, RegistryConfig::default());
        assert!(config.api.socket.is_some());
    }

    #[test]
    fn a_node_may_leave_out_its_cert_and_key_to_enroll_and_a_lighthouse_may_enroll() {
        let node =
            NodeConfig::parse("[pki]\nca = \"ca.crt\"\n", Path::new("/etc/tern/ci.toml")).unwrap();
        assert!(node.pki.enrolls());
        let half = NodeConfig::parse(
            "[pki]\nca = \"ca.crt\"\ncert = \"c.crt\"\n",
            Path::new("n.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(half.contains("missing required key `pki.key`"), "{half}");
        let lh = LighthouseConfig::parse(
            "[pki]\nca = \"ca.crt\"\ncert = \"l.crt\"\nkey = \"l.key\"\n[enroll]\nissuer_cert = \"i.crt\"\nissuer_key = \"i.key\"\n",
            Path::new("/etc/tern/lh.toml"),
        )
        .unwrap();
        let enroll = lh.enroll.unwrap();
        assert_eq!(enroll.store, PathBuf::from("/etc/tern/lighthouse.db"));
        assert!(enroll.pool.is_empty(), "the issuer's whole pool");
        let base = "[pki]\nca = \"ca.crt\"\ncert = \"l.crt\"\nkey = \"l.key\"\n[enroll]\nissuer_cert = \"i.crt\"\nissuer_key = \"i.key\"\n";
        let narrowed = LighthouseConfig::parse(
            &format!("{base}pool = [\"100.64.100.128/25\"]\n"),
            Path::new("l.toml"),
        )
        .unwrap();
        assert_eq!(
            narrowed.enroll.unwrap().pool,
            ["100.64.100.128/25".parse::<ipnet::Ipv4Net>().unwrap()]
        );
        for (bad, why) in [
            (
                "pool = [\"100.64.100.129/25\"]",
                "did you mean 100.64.100.128/25",
            ),
            ("pool = [\"nonsense\"]", "pool"),
            ("pool = \"100.64.100.0/24\"", "pool"),
        ] {
            let err = LighthouseConfig::parse(&format!("{base}{bad}\n"), Path::new("l.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(enroll.issuer_key, PathBuf::from("/etc/tern/i.key"));
        assert!(
            LighthouseConfig::parse("[pki]\nca = \"ca.crt\"\n", Path::new("l.toml")).is_err(),
            "a lighthouse needs its own cert"
        );
    }

    #[test]
    fn api_group_is_a_plain_name() {
        let ok = NodeConfig::parse(
            &format!("{MINIMAL_NODE}[api]\ngroup = \"ci\"\n"),
            Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(ok.api.group.as_deref(), Some("ci"));
        for bad in ["", "a b", "x:y", "a\\n"] {
            let err = NodeConfig::parse(
                &format!("{MINIMAL_NODE}[api]\ngroup = \"{bad}\"\n"),
                Path::new("n.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("api.group"), "{bad:?}: {err}");
        }
    }

    /// Every key of the node example is a key the node knows, and vice
    /// versa: the examples must document every key (see STYLE.md).
    #[test]
    fn examples_document_every_key() {
        let node_text = include_str!("../../config/node.toml");
        for key in [
            "[pki]",
            "ca =",
            "cert =",
            "key =",
            "[listen]",
            "addr =",
            "[[lighthouses]]",
            "endpoint =",
            "name =",
            "[tun]",
            "mtu =",
            "[api]",
            "socket =",
            "[log]",
            "level =",
            "[peers]",
            "keepalive =",
            "idle_timeout =",
            "[firewall]",
            "log =",
            "tcp_timeout =",
            "udp_timeout =",
            "icmp_timeout =",
            "[[firewall.inbound]]",
            "[[firewall.outbound]]",
            "proto =",
            "port =",
            "host =",
            "groups =",
            "cidr =",
            "action =",
            "[[routes]]",
            "subnet =",
            "via =",
            "offload =",
            "relay_after =",
            "# group =",
            "mode =",
            "[proxy]",
            "socks5 =",
            "http =",
            "[[forwards]]",
            "listen =",
            "target =",
            "[[services]]",
            "upstream =",
            "bearer_token_file =",
            "caller_name_header =",
            "caller_groups_header =",
            "[relay]",
            "packets_per_sec =",
            "transport =",
            "[dns]",
            "domain =",
            "configure_system =",
            "[flows]",
            "record =",
            "ship =",
            "# path =",
            "rotate_size_mb =",
            "rotate_keep =",
            "queue =",
        ] {
            assert!(
                node_text.lines().any(|l| l.trim_start().starts_with(key)),
                "config/node.toml lacks {key}"
            );
        }
        let gw_text = include_str!("../../config/gateway.toml");
        for key in [
            "[gateway]",
            "subnets =",
            "masquerade =",
            "local_cidr =",
            "[[gateway.dns]]",
            "zone =",
            "resolver =",
            "queries_per_sec =",
        ] {
            assert!(
                gw_text.lines().any(|l| l.trim_start().starts_with(key)),
                "config/gateway.toml lacks {key}"
            );
        }
        let lh_text = include_str!("../../config/lighthouse.toml");
        for key in [
            "[pki]",
            "ca =",
            "cert =",
            "key =",
            "[listen]",
            "addr =",
            "[api]",
            "socket =",
            "[admin]",
            "port =",
            "groups =",
            "read_groups =",
            "[log]",
            "level =",
            "[registry]",
            "expiry =",
            "[relay]",
            "enabled =",
            "packets_per_sec =",
            "# group =",
            "# [enroll]",
            "# issuer_cert =",
            "# issuer_key =",
            "# pool =",
            "# store =",
            "# [[enroll.renew]]",
            "# [[enroll.oidc]]",
            "# issuer =",
            "# audience =",
            "# jwks =",
            "# [[enroll.oidc.rules]]",
            "# claims =",
            "# groups =",
            "# cert_ttl =",
            "# [store]",
            "# url =",
            "[flows]",
            "retain =",
            "# password_file =",
        ] {
            assert!(
                lh_text.lines().any(|l| l.trim_start().starts_with(key)),
                "config/lighthouse.toml lacks {key}"
            );
        }
    }

    #[test]
    fn the_commented_oidc_example_parses_and_bad_providers_are_named() {
        // Uncomment the example's [enroll] and [[enroll.oidc]] part.
        let text = include_str!("../../config/lighthouse.toml");
        let mut uncommented =
            String::from("[pki]\nca = \"ca.crt\"\ncert = \"l.crt\"\nkey = \"l.key\"\n");
        let mut on = false;
        for line in text.lines() {
            if line.starts_with("# [enroll]") {
                on = true;
            }
            if on {
                if let Some(rest) = line.strip_prefix("# ") {
                    let keyish = rest.starts_with('[')
                        || rest
                            .split_once(" = ")
                            .is_some_and(|(k, _)| !k.contains(' '));
                    if keyish {
                        uncommented.push_str(rest);
                        uncommented.push('\n');
                    }
                }
            }
        }
        let config = LighthouseConfig::parse(&uncommented, Path::new("/etc/tern/lighthouse.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let enroll = config.enroll.unwrap();
        assert_eq!(enroll.oidc.len(), 1);
        assert_eq!(enroll.renew.len(), 1);
        assert_eq!(
            enroll.renew[0].issuer_key,
            PathBuf::from("/etc/tern/gw-issuer.key")
        );
        let gh = &enroll.oidc[0];
        assert!(gh.jwks_is_url());
        assert_eq!(gh.rules.len(), 2);
        assert_eq!(gh.rules[0].cert_ttl, Some(Duration::from_secs(900)));
        assert_eq!(gh.rules[1].cert_ttl, None);
        assert_eq!(gh.rules[1].claims["repository"], "acme/*");

        let base = "[pki]\nca = \"ca.crt\"\ncert = \"l.crt\"\nkey = \"l.key\"\n[enroll]\nissuer_cert = \"i.crt\"\nissuer_key = \"i.key\"\n[[enroll.oidc]]\nissuer = \"https://x\"\naudience = \"tern\"\n";
        let parse = |rest: &str| {
            LighthouseConfig::parse(
                &format!("{base}{rest}"),
                Path::new("/etc/tern/lighthouse.toml"),
            )
        };
        // A file path is resolved beside the config.
        let ok = parse("jwks = \"keys/jwks.json\"\n[[enroll.oidc.rules]]\nclaims = { repository = \"a/b\" }\ngroups = [\"ci\"]\n").unwrap();
        assert_eq!(ok.enroll.unwrap().oidc[0].jwks, "/etc/tern/keys/jwks.json");
        let key_of = |r: Result<LighthouseConfig, ConfigError>| match r {
            Err(ConfigError::Invalid { key, message, .. }) => (key, message),
            other => panic!("expected Invalid, got {other:?}"),
        };
        let (key, message) = key_of(parse("jwks = \"j.json\"\n[[enroll.oidc.rules]]\nclaims = { repository = \"*\" }\ngroups = [\"ci\"]\n"));
        assert_eq!(key, "enroll.oidc[0].rules[0].claims");
        assert!(message.contains("any job anywhere"), "{message}");
        let (key, _) = key_of(parse(
            "jwks = \"j.json\"\n[[enroll.oidc.rules]]\nclaims = {}\ngroups = [\"ci\"]\n",
        ));
        assert_eq!(key, "enroll.oidc[0].rules[0].claims");
        assert!(matches!(
            parse("jwks = \"j.json\"\n"),
            Err(ConfigError::Missing { key, .. }) if key == "enroll.oidc.rules"
        ));
        let (key, message) = key_of(parse("jwks = \"http://keys.example/jwks\"\n[[enroll.oidc.rules]]\nclaims = { repository = \"a/b\" }\ngroups = [\"ci\"]\n"));
        assert_eq!(key, "enroll.oidc[0].jwks");
        assert!(message.contains("https"), "{message}");
        assert!(parse("jwks = \"http://127.0.0.1:8080/jwks\"\n[[enroll.oidc.rules]]\nclaims = { repository = \"a/b\" }\ngroups = [\"ci\"]\n").is_ok());
        let (key, _) = key_of(parse("jwks = \"j.json\"\n[[enroll.oidc.rules]]\nclaims = { repository = \"a/b\" }\ngroups = []\n"));
        assert_eq!(key, "enroll.oidc[0].rules[0].groups");
        assert!(http_url_is_loopback("http://[::1]:80/x"));
        assert!(http_url_is_loopback("http://localhost/x"));
        assert!(!http_url_is_loopback("http://127.0.0.1.evil.test/x"));
    }

    /// Fragments of plausible config text, to reach deeper than random bytes.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("[pki]\n".to_string()),
            Just("[tun]\n".to_string()),
            Just("[peers]\n".to_string()),
            Just("[registry]\n".to_string()),
            Just("[[lighthouses]]\n".to_string()),
            Just("ca = \"ca.crt\"\ncert = \"c\"\nkey = \"k\"\n".to_string()),
            Just("endpoint = \"198.18.0.1:4242\"\n".to_string()),
            "[a-z_.]{1,12} = \"[ -~]{0,12}\"\n",
            "[a-z_.]{1,12} = [0-9]{1,6}\n",
            "[a-z_]{1,12} = \\{ [a-z]{1,5} = [0-9]{1,3} \\}\n",
            "\\PC{0,20}",
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = NodeConfig::parse(&text, Path::new("x/node.toml"));
            let _ = LighthouseConfig::parse(&text, Path::new("x/lighthouse.toml"));
        }

        #[test]
        fn parse_never_panics_on_config_like_text(parts in proptest::collection::vec(fragment(), 0..12)) {
            let text = parts.concat();
            let _ = NodeConfig::parse(&text, Path::new("node.toml"));
            let _ = LighthouseConfig::parse(&text, Path::new("lighthouse.toml"));
        }
    }
}
