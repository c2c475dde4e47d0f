//! `tern up`, `tern status` and `tern ping`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern_shared::exit;

use anyhow::Context;
use clap::Args;

use crate::io::{self, api};

#[derive(Args)]
pub struct UpArgs {
    /// The node's config file (see config/node.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// No TUN device and no root: an in-process TCP/IP stack (the same as
    /// `[tun] mode = "userspace"`).
    #[arg(long)]
    pub userspace: bool,
    /// Enroll with a one-time token (`tern-lighthouse token create`): the
    /// config's pki section names only the CA; the key is made in memory and never
    /// written, the certificate comes from a lighthouse's issuer. Also read
    /// from TERN_ENROLL_TOKEN, which keeps it off the command line.
    #[arg(
        long,
        value_name = "TOKEN",
        env = ENROLL_TOKEN_ENV,
        hide_env_values = true,
        conflicts_with = "enroll_oidc"
    )]
    pub enroll_token: Option<String>,
    /// Enroll with the CI provider's OIDC ID token (no stored secret): read
    /// from --oidc-token-file, else the TERN_OIDC_TOKEN variable, else asked
    /// of GitHub Actions (the job needs `permissions: id-token: write`).
    /// The lighthouse checks it against its enroll.oidc rules.
    #[arg(long)]
    pub enroll_oidc: bool,
    /// The audience to ask GitHub Actions for (the lighthouse's enroll.oidc
    /// audience).
    #[arg(long, value_name = "AUD", requires = "enroll_oidc")]
    pub oidc_audience: Option<String>,
    /// A file holding the ID token, instead of the variable or GitHub.
    #[arg(long, value_name = "FILE", requires = "enroll_oidc")]
    pub oidc_token_file: Option<PathBuf>,
    /// Run the node in the background and return only once a TCP
    /// connection to HOST:PORT through the mesh succeeded (an IPv4 address,
    /// a peer's or one a gateway routes; or a name the node resolves: a
    /// mesh name, or one under a gateway's zone), or to a node offering
    /// the service `service:NAME` (a `[[services]]` entry this node may
    /// call). Exit codes in --help.
    #[arg(long, value_name = "HOST:PORT")]
    pub wait_for: Option<String>,
    /// How long --wait-for may take, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_wait, requires = "wait_for")]
    pub wait_timeout: std::time::Duration,
    /// While every lighthouse that answers refuses the enrollment because
    /// its store is unavailable (its database down or failing over; nothing
    /// is spent), keep asking this long, e.g. 30s; then exit 75. 0s: ask
    /// once.
    #[arg(long, default_value = "10s", value_parser = parse_wait, value_name = "DURATION")]
    pub enroll_patience: std::time::Duration,
    /// Where the background node writes its log (with --wait-for). Default:
    /// a file in the temporary directory, named in the output.
    #[arg(long, requires = "wait_for")]
    pub log_file: Option<PathBuf>,
    /// How the node logs to stderr: text (for a person) or json (one object
    /// a line, for a log pipeline). Overrides `[log] format`.
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<tern_shared::ops::LogFormat>,
}

/// Where `tern up` also finds `--enroll-token`'s value.
pub const ENROLL_TOKEN_ENV: &str = "TERN_ENROLL_TOKEN";

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    tern_shared::duration::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct DownArgs {
    /// The node's config file: its [api] socket says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// `tern down`: the node deregisters from its lighthouses and stops.
pub fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    let path = api_socket(&args.socket, &args.config)?;
    // The daemon may stop before its answer is written: what counts is
    // that its socket goes away (it deregistered on the way out).
    let answer = runtime()?.block_on(api::call(&path, &api::ApiRequest::Shutdown));
    if let Ok(reply) = &answer {
        if let Err(refusal) = api::decode::<serde_json::Value>(reply.clone())? {
            anyhow::bail!("the daemon refused: {refusal}");
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if path.exists() {
        return Err(answer.err().unwrap_or_else(|| {
            anyhow::anyhow!("the node at {} did not stop within 10 s", path.display())
        }));
    }
    println!("the node left the mesh");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct StatusArgs {
    /// The node's config file: its [api] socket (or TUN name) says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PingArgs {
    /// The peer: its overlay address, or its certificate name (looked up
    /// through the lighthouses when it is not in the table yet).
    pub peer: String,
    /// The node's config file: its [api] socket (or TUN name) says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// How many pings.
    #[arg(long, short = 'n', default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
    /// Time between pings, e.g. "1s" or "200ms".
    #[arg(long, short, default_value = "1s", value_parser = parse_interval)]
    pub interval: std::time::Duration,
    /// Print each answer as a JSON line.
    #[arg(long)]
    pub json: bool,
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = tern_shared::duration::parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{text:?}: use 10ms to 1h"));
    }
    Ok(d)
}

pub(crate) fn api_socket(
    socket: &Option<PathBuf>,
    config: &Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => {
            let config = io::load_node_config(c)?;
            api::socket_path_for(&config)
        }
        (None, None) => api::default_socket_path(),
    })
}

/// `tern ping`: exit 0 when at least one answer came back, 68 when no
/// lighthouse knows the peer, 1 otherwise.
pub fn ping(args: PingArgs) -> anyhow::Result<ExitCode> {
    use tern_node_core::node::{PingResult, RunnersResult};
    let path = api_socket(&args.socket, &args.config)?;
    let rt = runtime()?;
    let mut answered = 0;
    let mut peer = args.peer.clone();
    let ping = |peer: &str| {
        let request = api::ApiRequest::Ping {
            peer: peer.to_string(),
        };
        rt.block_on(api::call(&path, &request))
    };
    for i in 0..args.count {
        if i > 0 {
            std::thread::sleep(args.interval);
        }
        let mut reply = ping(&peer)?;
        if reply.get("error").is_some() && peer.parse::<std::net::Ipv4Addr>().is_err() {
            // A name not in the table yet: the lighthouses know registered
            // nodes by their certificate names. Their answer is a hint; the
            // ping's answer comes from the peer whose certificate we verify.
            let request = api::ApiRequest::FindRunners {
                selector: tern_shared::control::RunnerSelector::Name(peer.clone()),
            };
            let found = rt.block_on(api::ask::<RunnersResult>(&path, &request))?;
            match found.as_ref().map(|f| f.runners.first()) {
                Ok(Some(runner)) => {
                    peer = runner.overlay_ip.to_string();
                    reply = ping(&peer)?;
                }
                Ok(None) => {
                    eprintln!(
                        "tern ping: no node named {:?} is registered with the lighthouses",
                        args.peer
                    );
                    return Ok(ExitCode::from(exit::NO_PATH));
                }
                Err(_) => {}
            }
        }
        let result: PingResult = match api::decode(reply.clone())? {
            Ok(result) => result,
            Err(refusal) => anyhow::bail!("cannot ping {}: {refusal}", args.peer),
        };
        if result.unknown {
            eprintln!(
                "tern ping: no lighthouse knows {}: no node with that address is registered",
                result.overlay_ip
            );
            return Ok(ExitCode::from(exit::NO_PATH));
        }
        if result.rtt_ms.is_some() {
            answered += 1;
        }
        if args.json {
            println!("{reply}");
        } else {
            println!("{}", describe_ping(&result));
        }
    }
    if !args.json {
        println!("{answered} of {} answered", args.count);
    }
    Ok(if answered > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe_ping(r: &tern_node_core::node::PingResult) -> String {
    use tern_mesh::PathKind;
    let who = match &r.name {
        Some(name) => format!("{name} ({})", r.overlay_ip),
        None => r.overlay_ip.to_string(),
    };
    let Some(rtt) = r.rtt_ms else {
        return format!(
            "no answer from {who} within {} s",
            tern_node_core::node::PING_TIMEOUT.as_secs()
        );
    };
    let at = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "?".to_string(), |a| a.to_string());
    let path = match r.path {
        Some(PathKind::Direct) => format!("direct to {}", at(r.endpoint)),
        Some(PathKind::Relayed) => format!("relayed via {}", at(r.relay)),
        Some(PathKind::Probing) => "probing".to_string(),
        None => "unknown path".to_string(),
    };
    let over = match r.transport {
        Some(t) => format!(" over {t}"),
        None => String::new(),
    };
    format!("answer from {who}: {rtt:.3} ms, {path}{over}")
}

pub fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let mut config = io::load_node_config(&args.config)?;
    if args.userspace {
        config.tun.mode = tern_shared::config::TunMode::Userspace;
    }
    let socket = api::socket_path_for(&config);
    if let Some(code) = super::ready::refuse_taken_socket(&socket) {
        return Ok(code);
    }
    if let Some(target) = &args.wait_for {
        let target = match target.parse::<tern_shared::dns::ForwardTarget>() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tern up: --wait-for {e}");
                return Ok(ExitCode::from(2));
            }
        };
        return super::ready::up_and_wait(
            &socket,
            config.api.group.as_deref(),
            target,
            args.wait_timeout,
            args.log_file,
        );
    }
    crate::init_logging(
        &config.log.level,
        args.log_format.unwrap_or(config.log.format),
    );
    let runtime = runtime()?;
    let credential = if let Some(token) = &args.enroll_token {
        Some(io::join::Credential::Token(token.clone()))
    } else if args.enroll_oidc {
        match runtime.block_on(io::join::oidc_token(
            args.oidc_token_file.as_deref(),
            args.oidc_audience.as_deref(),
        )) {
            Ok(token) => Some(io::join::Credential::Oidc(token)),
            Err(e) => return exit_for(e),
        }
    } else {
        None
    };
    let enrollment = credential.map(|credential| io::join::Enrollment {
        credential,
        patience: args.enroll_patience,
    });
    match runtime.block_on(io::run(&args.config, args.userspace, enrollment.as_ref())) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => exit_for(e),
    }
}

/// An enrollment failure exits with its documented code; anything else is
/// an ordinary error.
fn exit_for(e: anyhow::Error) -> anyhow::Result<ExitCode> {
    match e.downcast_ref::<io::join::Exit>() {
        Some(exit) => {
            eprintln!("error: {}", exit.message);
            Ok(ExitCode::from(exit.code))
        }
        None => Err(e),
    }
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let path = api_socket(&args.socket, &args.config)?;
    let reply = runtime()?.block_on(api::call(&path, &api::ApiRequest::Status))?;
    if args.json {
        // As the daemon said it: scripts read this.
        if let Some(err) = reply.get("error") {
            anyhow::bail!("the daemon refused: {err}");
        }
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        match api::decode::<api::StatusReply>(reply)? {
            Ok(status) => print_status(&status, &path),
            Err(refusal) => anyhow::bail!("the daemon refused: {refusal}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The peers table of `tern status`.
fn print_peers(s: &tern_node_core::node::NodeStatus) {
    use tern_mesh::PathKind;
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    println!(
        "peers:\n  {:<16} {:<15} {:<11} {:<30} {:>9} {:>10} {:>12} {:>12}",
        "NAME", "OVERLAY IP", "ROLE", "PATH", "RTT", "HANDSHAKE", "RX BYTES", "TX BYTES"
    );
    for p in &s.peers {
        let hs = p
            .last_handshake_secs
            .map(|x| format!("{x:.0}s ago"))
            .unwrap_or_else(|| "never".into());
        let path = match p.path {
            PathKind::Direct => format!("direct {}", dash(p.endpoint.map(|e| e.to_string()))),
            PathKind::Relayed => {
                // Through a lighthouse reached over TCP, the relayed path is too.
                let over_tcp = s.lighthouses.iter().any(|lh| {
                    Some(lh.endpoint) == p.relay
                        && lh
                            .transport
                            .as_deref()
                            .is_some_and(|t| t.starts_with("tcp"))
                });
                format!(
                    "relayed via {} ({})",
                    dash(p.relay.map(|r| r.to_string())),
                    if over_tcp { "tcp" } else { "udp" }
                )
            }
            PathKind::Probing => "probing".to_string(),
        };
        let rtt = p
            .rtt_ms
            .map(|x| format!("{x:.2}ms"))
            .unwrap_or_else(|| "-".into());
        let role = serde_json::to_value(p.role)
            .ok()
            .and_then(|r| r.as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "  {:<16} {:<15} {:<11} {:<30} {:>9} {:>10} {:>12} {:>12}",
            p.name,
            p.overlay_ip.to_string(),
            role,
            path,
            rtt,
            hs,
            p.rx_bytes,
            p.tx_bytes,
        );
    }
}

fn print_status(reply: &api::StatusReply, path: &Path) {
    let s = &reply.status;
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    println!("node {} {}  (api {})", s.name, s.overlay_ip, path.display());
    println!("lighthouses:");
    for lh in &s.lighthouses {
        println!(
            "  {:<22} {:<16} {:<14} observed {}{}, over {}",
            lh.endpoint.to_string(),
            dash(lh.name.clone()),
            if lh.registered {
                "registered"
            } else {
                "not registered"
            },
            dash(lh.observed.map(|o| o.to_string())),
            if lh.relay { ", relays" } else { "" },
            lh.transport.as_deref().unwrap_or("udp"),
        );
    }
    if s.awaiting_revocations {
        println!(
            "waiting for a lighthouse's revocation list: no session with another node opens until it is in"
        );
    }
    print_peers(s);
    if let Some(r) = &s.relaying {
        println!(
            "relaying for others ([relay]): {} data messages ({} bytes), {} handshakes forwarded; refused: {} from no session of a pair, {} to a node without a session here, {} not handed to this node, {} over budget",
            r.forwarded_data,
            r.forwarded_bytes,
            r.forwarded_handshake_initiation + r.forwarded_handshake_response,
            r.refused_unregistered_sender,
            r.refused_unregistered_target,
            r.refused_not_introduced,
            r.refused_rate_limited,
        );
    }
    if !s.routes.is_empty() {
        println!(
            "routes:\n  {:<18} {:<10} {:<24} {:<12} KERNEL ROUTE",
            "SUBNET", "VIA", "GATEWAYS", "ACTIVE"
        );
        for r in &s.routes {
            // Asked for ([[routes]], accepted), or why not.
            let kernel = match (r.kernel_route, &r.refused) {
                _ if reply.mode == tern_shared::config::TunMode::Userspace => {
                    "- (userspace mode)".to_string()
                }
                (true, _) => "yes".to_string(),
                (false, Some(why)) => format!("no: {why}"),
                (false, None) => "no ([[routes]] or [tun] accept_routes)".to_string(),
            };
            println!(
                "  {:<18} {:<10} {:<24} {:<12} {kernel}",
                r.subnet.to_string(),
                dash(r.via.clone()),
                if r.gateways.is_empty() {
                    "-".to_string()
                } else {
                    r.gateways.join(",")
                },
                dash(r.active.clone()),
            );
        }
    }
    if !s.gateway_subnets.is_empty() {
        println!(
            "gateway for: {}",
            tern_shared::show::list(&s.gateway_subnets)
        );
    }
    let dns = &s.dns;
    if !dns.zones.is_empty() || !dns.serving.is_empty() {
        let zones: Vec<String> = dns
            .zones
            .iter()
            .map(|(z, gws)| format!("{z} via {}", gws.join(",")))
            .collect();
        println!(
            "dns: names *.{}; zones: {}{}",
            dns.domain,
            if zones.is_empty() {
                "-".to_string()
            } else {
                zones.join("; ")
            },
            if dns.serving.is_empty() {
                String::new()
            } else {
                format!("; answers for: {}", dns.serving.join(", "))
            }
        );
    } else {
        println!("dns: names *.{}; no gateway advertises a zone", dns.domain);
    }
    let fw = &s.firewall;
    println!(
        "firewall: {} inbound / {} outbound rules, {} flows",
        fw.inbound_rules, fw.outbound_rules, fw.flows
    );
    if !fw.denied.is_empty() {
        let list: Vec<String> = fw.denied.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  denied: {}", list.join(" "));
    }
    let flows = &s.flows;
    if flows.recorded > 0 || flows.dropped > 0 {
        println!(
            "  flow records: {} made, {} sent to a lighthouse, {} waiting, {} dropped",
            flows.recorded, flows.shipped, flows.waiting, flows.dropped
        );
    }
    let as_map = |v: serde_json::Value| v.as_object().cloned().unwrap_or_default();
    let counters = as_map(serde_json::to_value(&s.mesh_counters).unwrap_or_default())
        .into_iter()
        .chain(as_map(
            serde_json::to_value(&s.node_counters).unwrap_or_default(),
        ))
        .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
        // What a healthy mesh does when peers meet: shown in --json only.
        .filter(|(k, _)| !matches!(k.as_str(), "repeated_handshakes" | "crossed_handshakes"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>();
    if !counters.is_empty() {
        println!("drops and errors: {}", counters.join(" "));
    }
}
