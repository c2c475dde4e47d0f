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
    /// connection to HOST:PORT through the mesh succeeded (an IPv4 address:
    /// a peer's, or one a gateway routes). Exit codes in --help.
    #[arg(long, value_name = "HOST:PORT")]
    pub wait_for: Option<String>,
    /// How long --wait-for may take, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_wait, requires = "wait_for")]
    pub wait_timeout: std::time::Duration,
    /// Where the background node writes its log (with --wait-for). Default:
    /// a file in the temporary directory, named in the output.
    #[arg(long, requires = "wait_for")]
    pub log_file: Option<PathBuf>,
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
        if let Some(err) = reply.get("error") {
            anyhow::bail!("the daemon refused: {err}");
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
    let path = api_socket(&args.socket, &args.config)?;
    let rt = runtime()?;
    let mut answered = 0;
    let mut peer = args.peer.clone();
    for i in 0..args.count {
        if i > 0 {
            std::thread::sleep(args.interval);
        }
        let request = api::ApiRequest::Ping { peer: peer.clone() };
        let mut reply = rt.block_on(api::call(&path, &request))?;
        if reply.get("error").is_some() && peer.parse::<std::net::Ipv4Addr>().is_err() {
            // A name not in the table yet: the lighthouses know registered
            // nodes by their certificate names. Their answer is a hint; the
            // ping's answer comes from the peer whose certificate we verify.
            let found = rt.block_on(api::call(
                &path,
                &api::ApiRequest::FindRunners {
                    selector: tern_shared::control::RunnerSelector::Name(peer.clone()),
                },
            ))?;
            match found["runners"][0]["overlay_ip"].as_str() {
                Some(ip) => {
                    peer = ip.to_string();
                    reply = rt.block_on(api::call(
                        &path,
                        &api::ApiRequest::Ping { peer: peer.clone() },
                    ))?;
                }
                None if found.get("error").is_none() => {
                    eprintln!(
                        "tern ping: no node named {:?} is registered with the lighthouses",
                        args.peer
                    );
                    return Ok(ExitCode::from(exit::NO_PATH));
                }
                None => {}
            }
        }
        if let Some(err) = reply.get("error") {
            anyhow::bail!("cannot ping {}: {}", args.peer, err.as_str().unwrap_or("?"));
        }
        if reply["unknown"] == true {
            eprintln!(
                "tern ping: no lighthouse knows {}: no node with that address is registered",
                reply["overlay_ip"].as_str().unwrap_or(&peer)
            );
            return Ok(ExitCode::from(exit::NO_PATH));
        }
        if reply["rtt_ms"].is_number() {
            answered += 1;
        }
        if args.json {
            println!("{reply}");
        } else {
            println!("{}", describe_ping(&reply));
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

fn describe_ping(r: &serde_json::Value) -> String {
    let who = match r["name"].as_str() {
        Some(name) => format!("{name} ({})", r["overlay_ip"].as_str().unwrap_or("?")),
        None => r["overlay_ip"].as_str().unwrap_or("?").to_string(),
    };
    let Some(rtt) = r["rtt_ms"].as_f64() else {
        return format!(
            "no answer from {who} within {} s",
            tern_node_core::node::PING_TIMEOUT.as_secs()
        );
    };
    let path = match r["path"].as_str() {
        Some("direct") => format!("direct to {}", r["endpoint"].as_str().unwrap_or("?")),
        Some("relayed") => format!("relayed via {}", r["relay"].as_str().unwrap_or("?")),
        other => other.unwrap_or("unknown path").to_string(),
    };
    format!("answer from {who}: {rtt:.3} ms, {path}")
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
        let Ok(target) = target.parse::<std::net::SocketAddrV4>() else {
            eprintln!("tern up: --wait-for {target:?}: give an IPv4 address and port, e.g. 198.19.0.10:5432");
            return Ok(ExitCode::from(2));
        };
        return super::ready::up_and_wait(
            &socket,
            config.api.group.as_deref(),
            target,
            args.wait_timeout,
            args.log_file,
        );
    }
    crate::init_logging(&config.log.level);
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
    match runtime.block_on(io::run(&args.config, args.userspace, credential.as_ref())) {
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
    if let Some(err) = reply.get("error") {
        anyhow::bail!("the daemon refused: {err}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print_status(&reply, &path);
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn print_status(s: &serde_json::Value, path: &Path) {
    let str_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    println!(
        "node {} {}  (api {})",
        str_of(&s["name"]),
        str_of(&s["overlay_ip"]),
        path.display()
    );
    println!("lighthouses:");
    for lh in s["lighthouses"].as_array().into_iter().flatten() {
        println!(
            "  {:<22} {:<16} {:<14} observed {}{}",
            str_of(&lh["endpoint"]),
            str_of(&lh["name"]),
            if lh["registered"].as_bool() == Some(true) {
                "registered"
            } else {
                "not registered"
            },
            str_of(&lh["observed"]),
            if lh["relay"].as_bool() == Some(true) {
                ", relays"
            } else {
                ""
            },
        );
    }
    println!(
        "peers:\n  {:<16} {:<15} {:<11} {:<30} {:>9} {:>10} {:>12} {:>12}",
        "NAME", "OVERLAY IP", "ROLE", "PATH", "RTT", "HANDSHAKE", "RX BYTES", "TX BYTES"
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        let hs = p["last_handshake_secs"]
            .as_f64()
            .map(|x| format!("{x:.0}s ago"))
            .unwrap_or_else(|| "never".into());
        let path = match p["path"].as_str() {
            Some("direct") => format!("direct {}", str_of(&p["endpoint"])),
            Some("relayed") => format!("relayed via {}", str_of(&p["relay"])),
            _ => "probing".to_string(),
        };
        let rtt = p["rtt_ms"]
            .as_f64()
            .map(|x| format!("{x:.2}ms"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<16} {:<15} {:<11} {:<30} {:>9} {:>10} {:>12} {:>12}",
            str_of(&p["name"]),
            str_of(&p["overlay_ip"]),
            str_of(&p["role"]),
            path,
            rtt,
            hs,
            str_of(&p["rx_bytes"]),
            str_of(&p["tx_bytes"]),
        );
    }
    let routes = s["routes"].as_array().cloned().unwrap_or_default();
    if !routes.is_empty() {
        println!(
            "routes:\n  {:<18} {:<10} {:<24} {:<12} KERNEL ROUTE",
            "SUBNET", "VIA", "GATEWAYS", "ACTIVE"
        );
        for r in &routes {
            let gateways: Vec<String> = r["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect();
            // Asked for ([[routes]], accepted), or why not.
            let kernel = match (r["kernel_route"].as_bool(), r["refused"].as_str()) {
                _ if s["mode"] == "userspace" => "- (userspace mode)".to_string(),
                (Some(true), _) => "yes".to_string(),
                (_, Some(why)) => format!("no: {why}"),
                _ => "no ([[routes]] or [tun] accept_routes)".to_string(),
            };
            println!(
                "  {:<18} {:<10} {:<24} {:<12} {kernel}",
                str_of(&r["subnet"]),
                str_of(&r["via"]),
                if gateways.is_empty() {
                    "-".to_string()
                } else {
                    gateways.join(",")
                },
                str_of(&r["active"]),
            );
        }
    }
    if let Some(subnets) = s["gateway_subnets"].as_array().filter(|a| !a.is_empty()) {
        let list: Vec<String> = subnets.iter().map(str_of).collect();
        println!("gateway for: {}", list.join(", "));
    }
    let fw = &s["firewall"];
    println!(
        "firewall: {} inbound / {} outbound rules, {} flows",
        str_of(&fw["inbound_rules"]),
        str_of(&fw["outbound_rules"]),
        str_of(&fw["flows"])
    );
    if let Some(denied) = fw["denied"].as_object().filter(|d| !d.is_empty()) {
        let list: Vec<String> = denied.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  denied: {}", list.join(" "));
    }
    let counters = s["mesh_counters"]
        .as_object()
        .into_iter()
        .flatten()
        .chain(s["node_counters"].as_object().into_iter().flatten())
        .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
        // What a healthy mesh does when peers meet: shown in --json only.
        .filter(|(k, _)| !matches!(k.as_str(), "repeated_handshakes" | "crossed_handshakes"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>();
    if !counters.is_empty() {
        println!("drops and errors: {}", counters.join(" "));
    }
}
