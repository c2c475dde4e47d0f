//! `tern forward LOCAL_ADDR:PORT=TARGET:PORT ...`: local ports whose
//! connections the running node carries to targets in the mesh (a peer's
//! overlay address, an address a gateway routes, or a name the node
//! resolves at each connection: a mesh name or one under a gateway's
//! zone, or `service:NAME`, the nodes offering a `[[services]]` entry), so `psql`, `kubectl` or `git` reach them unmodified, without
//! root in userspace mode.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::daemon::api_socket;
use crate::io::api::{self, ApiRequest};
use crate::io::proxy;
use tern_shared::dns::ForwardTarget;

#[derive(Args)]
pub struct ForwardArgs {
    /// LOCAL_ADDR:PORT=TARGET:PORT, e.g. 127.0.0.1:15432=198.19.4.20:5432
    /// or 127.0.0.1:18080=api.internal:8080, or LOCAL_ADDR:PORT=service:NAME
    /// for a `[[services]]` entry, spread over the nodes offering it
    /// (repeatable). Local addresses must be loopback.
    #[arg(required = true, value_name = "LOCAL=TARGET")]
    pub forwards: Vec<String>,
    /// The node's config file: its [api] socket says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// One `LOCAL=TARGET` argument.
pub fn parse_spec(spec: &str) -> Result<(SocketAddr, ForwardTarget), String> {
    let Some((local, target)) = spec.split_once('=') else {
        return Err(format!(
            "{spec:?}: write LOCAL_ADDR:PORT=TARGET:PORT, e.g. 127.0.0.1:15432=198.19.4.20:5432"
        ));
    };
    let local: SocketAddr = local.trim().parse().map_err(|_| {
        format!("{spec:?}: {local:?} is not a local address with a port, e.g. 127.0.0.1:15432")
    })?;
    if !local.ip().is_loopback() {
        return Err(format!(
            "{spec:?}: {local} is not a loopback address; forwards serve this machine only, e.g. 127.0.0.1:{}",
            local.port()
        ));
    }
    let target: ForwardTarget = target
        .trim()
        .parse()
        .map_err(|e: String| format!("{spec:?}: {e}"))?;
    Ok((local, target))
}

pub fn run(args: ForwardArgs) -> anyhow::Result<ExitCode> {
    let mut specs = Vec::new();
    for spec in &args.forwards {
        match parse_spec(spec) {
            Ok(s) => specs.push(s),
            Err(e) => {
                eprintln!("tern forward: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let socket = api_socket(&args.socket, &args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Every target must have somewhere to go before anything listens.
        for (_, target) in &specs {
            let problem = match target {
                ForwardTarget::Addr(a) => {
                    let request = ApiRequest::Route { ip: *a.ip() };
                    api::ask::<api::RouteReply>(&socket, &request)
                        .await?
                        .err()
                        .map(|e| e.to_string())
                }
                // A name must resolve now (it is resolved again for each
                // connection).
                ForwardTarget::Name { host, .. } => {
                    let request = ApiRequest::Resolve {
                        name: host.clone(),
                        rtype: "A".into(),
                    };
                    match api::ask::<api::ResolveReply>(&socket, &request).await? {
                        Ok(r) if r.records.iter().any(|r| r.rtype == "A") => None,
                        Ok(r) => Some(format!("{} ({}, from {})", host, r.rcode, r.source)),
                        Err(e) => Some(e.to_string()),
                    }
                }
                // Some node must offer it to this one now (which one is
                // chosen again for each connection).
                ForwardTarget::Service { name } => {
                    let request = ApiRequest::Services { name: name.clone() };
                    match api::ask::<api::ServicesReply>(&socket, &request).await? {
                        Ok(reply) => crate::io::balance::allowed_offers(&reply, name)
                            .err()
                            .map(|e| e.to_string()),
                        Err(e) => Some(e.to_string()),
                    }
                }
            };
            if let Some(e) = problem {
                eprintln!("tern forward: {target}: {e}");
                return Ok(ExitCode::from(1));
            }
        }
        let mut tasks = Vec::new();
        for (local, target) in specs {
            let listener = match proxy::bind(local, "tern forward").await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(1));
                }
            };
            println!("forwarding {local} → {target} through the mesh");
            let socket = socket.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, from)) = listener.accept().await else {
                        continue;
                    };
                    let (socket, target) = (socket.clone(), target.clone());
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let remote = match &target {
                            ForwardTarget::Addr(a) => api::dial(&socket, *a).await,
                            ForwardTarget::Name { host, port } => {
                                api::dial_name(&socket, host, *port).await
                            }
                            ForwardTarget::Service { name } => {
                                api::dial_service(&socket, name).await
                            }
                        };
                        match remote {
                            Ok(remote) => proxy::splice(stream, remote).await,
                            Err(e) => eprintln!("tern forward: {from} → {target}: {e:#}"),
                        }
                    });
                }
            }));
        }
        println!(
            "forwarding until Ctrl-C (the forwards end with this command; for forwards that \
             live as long as the node, put [[forwards]] in its config)"
        );
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        for t in tasks {
            t.abort();
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let (l, t) =
            parse_spec("127.0.0.1:15432=198.19.4.20:5432").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.to_string(), "127.0.0.1:15432");
        assert_eq!(t.to_string(), "198.19.4.20:5432");
        for (bad, says) in [
            ("127.0.0.1:1", "write LOCAL_ADDR:PORT=TARGET:PORT"),
            ("0.0.0.0:1=198.19.0.1:1", "not a loopback address"),
            ("127.0.0.1=198.19.0.1:1", "not a local address"),
            ("127.0.0.1:1=db", "not a target with a port"),
            ("127.0.0.1:1=198.19.0.1:0", "needs a port"),
        ] {
            let err = parse_spec(bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,80}") {
            let _ = parse_spec(&s);
        }
    }
}
