//! `tern up` and `tern status`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::io::{self, api};

#[derive(Args)]
pub struct UpArgs {
    /// The node's config file (see config/node.toml).
    #[arg(long, short)]
    pub config: PathBuf,
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

pub fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let config = io::load_node_config(&args.config)?;
    crate::init_logging(&config.log.level);
    runtime()?.block_on(io::run(&args.config))?;
    Ok(ExitCode::SUCCESS)
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let path = match (&args.socket, &args.config) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => {
            let config = io::load_node_config(c)?;
            api::socket_path(config.api.socket.as_deref(), &config.tun.name)
        }
        (None, None) => api::socket_path(None, "tern0"),
    };
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
            "  {:<22} {:<16} {:<14} observed {}",
            str_of(&lh["endpoint"]),
            str_of(&lh["name"]),
            if lh["registered"].as_bool() == Some(true) {
                "registered"
            } else {
                "not registered"
            },
            str_of(&lh["observed"]),
        );
    }
    println!(
        "peers:\n  {:<16} {:<15} {:<11} {:<22} {:>10} {:>12} {:>12}",
        "NAME", "OVERLAY IP", "ROLE", "ENDPOINT", "HANDSHAKE", "RX BYTES", "TX BYTES"
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        let hs = p["last_handshake_secs"]
            .as_f64()
            .map(|x| format!("{x:.0}s ago"))
            .unwrap_or_else(|| "never".into());
        println!(
            "  {:<16} {:<15} {:<11} {:<22} {:>10} {:>12} {:>12}",
            str_of(&p["name"]),
            str_of(&p["overlay_ip"]),
            str_of(&p["role"]),
            str_of(&p["endpoint"]),
            hs,
            str_of(&p["rx_bytes"]),
            str_of(&p["tx_bytes"]),
        );
    }
    let routes = s["routes"].as_array().cloned().unwrap_or_default();
    if !routes.is_empty() {
        println!(
            "routes:\n  {:<18} {:<10} {:<24} ACTIVE",
            "SUBNET", "VIA", "GATEWAYS"
        );
        for r in &routes {
            let gateways: Vec<String> = r["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .map(str_of)
                .collect();
            println!(
                "  {:<18} {:<10} {:<24} {}",
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
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>();
    if !counters.is_empty() {
        println!("drops and errors: {}", counters.join(" "));
    }
}
