//! `tern resolve NAME [--type A|AAAA|SRV|TXT] [--json]`: what the running
//! node answers for a name — from a certificate (mesh names), from a
//! gateway's resolver through the mesh (names under its zones), or from the
//! system's resolvers — who gave the answer, and how long it took.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::daemon::api_socket;
use crate::io::api::{self, ApiRequest, ResolveReply, StatusReply};

#[derive(Args)]
pub struct ResolveArgs {
    /// The name, e.g. gw-1.tern, db.internal or web.default.svc.cluster.local.
    pub name: String,
    /// The record type: A, AAAA, SRV, TXT, CNAME, MX, ...
    #[arg(long = "type", short = 't', default_value = "A", value_name = "TYPE")]
    pub rtype: String,
    /// Print the answer as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The node's config file: its [api] socket says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

pub fn run(args: ResolveArgs) -> anyhow::Result<ExitCode> {
    if let Err(e) = tern_node_core::dns::record_type(&args.rtype) {
        eprintln!("tern resolve: {e}");
        return Ok(ExitCode::from(2));
    }
    let socket = api_socket(&args.socket, &args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let request = ApiRequest::Resolve {
        name: args.name.clone(),
        rtype: args.rtype.clone(),
    };
    let reply = match runtime.block_on(api::ask::<ResolveReply>(&socket, &request))? {
        Ok(r) => r,
        Err(refusal) => {
            eprintln!("tern resolve: {}: {refusal}", args.name);
            return Ok(ExitCode::from(tern_shared::exit::NO_PATH));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&reply)?);
    } else {
        for r in &reply.records {
            println!("{}\t{}\t{}\t{}", r.name, r.ttl, r.rtype, r.data);
        }
        println!(
            "{} ({}) from {} in {:.1} ms",
            reply.name, reply.rcode, reply.source, reply.elapsed_ms
        );
    }
    if reply.rcode == "NOERROR" {
        return Ok(ExitCode::SUCCESS);
    }
    // Say which zones the mesh knows, when the name is under none of them.
    if !args.json && reply.source.starts_with("upstream") {
        let status = runtime.block_on(api::ask::<StatusReply>(&socket, &ApiRequest::Status))?;
        if let Ok(status) = status {
            let zones: Vec<&String> = status.status.dns.zones.keys().collect();
            eprintln!(
                "tern resolve: {} lies under no zone a gateway advertises ({}), so the system's resolver was asked",
                args.name,
                if zones.is_empty() {
                    "none is advertised".to_string()
                } else {
                    tern_shared::show::list(zones).to_string()
                }
            );
        }
    }
    Ok(ExitCode::from(1))
}
