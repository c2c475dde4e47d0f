//! `tern services`: who offers which `[[services]]` entry, and whether
//! this node's certificate may call it; `tern kubeconfig SERVICE`: a
//! kubeconfig for a `kind = "kubernetes"` service through the mesh, with
//! no credential in it (the node offering the service holds that).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tern_shared::control::ServiceEntry;
use tern_shared::services::authorize;

use super::daemon::{api_socket, runtime};
use crate::io::api;

#[derive(Args)]
pub struct ServicesArgs {
    /// Only this service.
    pub name: Option<String>,
    /// The node's config file: its [api] socket (or TUN name) says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KubeconfigArgs {
    /// The service (`[[services]] name`, of kind kubernetes).
    pub service: String,
    /// Write the kubeconfig here (mode 0600) instead of standard output.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// The namespace kubectl uses by default.
    #[arg(long, short)]
    pub namespace: Option<String>,
    /// Where the node's local forward to the service listens, when there
    /// is one (userspace mode, or several nodes offering the service):
    /// a loopback address and port. Default: a free port on 127.0.0.1.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// The node's config file: its [api] socket (or TUN name) says where to ask.
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

use crate::io::api::ServicesReply as Offers;

fn ask(
    socket: &Option<PathBuf>,
    config: &Option<PathBuf>,
    name: &str,
) -> anyhow::Result<(Offers, api::StatusReply)> {
    let path = api_socket(socket, config)?;
    let rt = runtime()?;
    let reply = rt.block_on(api::call(
        &path,
        &api::ApiRequest::Services {
            name: name.to_string(),
        },
    ))?;
    let offers = match api::decode::<Offers>(reply)? {
        Ok(o) => o,
        Err(refusal) => anyhow::bail!("the node could not ask: {refusal}"),
    };
    let status = match api::decode::<api::StatusReply>(
        rt.block_on(api::call(&path, &api::ApiRequest::Status))?,
    )? {
        Ok(s) => s,
        Err(refusal) => anyhow::bail!("the daemon refused: {refusal}"),
    };
    Ok((offers, status))
}

pub fn services(args: ServicesArgs) -> anyhow::Result<ExitCode> {
    let (offers, _) = ask(
        &args.socket,
        &args.config,
        args.name.as_deref().unwrap_or(""),
    )?;
    if args.json {
        let list: Vec<serde_json::Value> = offers
            .services
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        "allowed".into(),
                        authorize(&e.service.groups, &offers.my_groups)
                            .is_ok()
                            .into(),
                    );
                }
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "services": list,
                "asked": offers.asked,
                "answered": offers.answered,
                "incomplete": offers.incomplete,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<10} {:<16} {:<21} {:<20} YOU",
        "SERVICE", "KIND", "NODE", "ADDRESS", "GROUPS"
    );
    for e in &offers.services {
        let you = match authorize(&e.service.groups, &offers.my_groups) {
            Ok(()) => "allowed".to_string(),
            Err(_) => "not in its groups".to_string(),
        };
        let groups = if e.service.groups.is_empty() {
            "any".to_string()
        } else {
            e.service.groups.join(",")
        };
        println!(
            "{:<20} {:<10} {:<16} {:<21} {:<20} {you}",
            e.service.name,
            e.service.kind,
            e.node_name,
            format!("{}:{}", e.node, e.service.port),
            groups
        );
    }
    if offers.answered < offers.asked {
        eprintln!(
            "({} of {} lighthouses answered)",
            offers.answered, offers.asked
        );
    }
    if offers.incomplete {
        eprintln!("(more services than one answer holds: ask for one by name)");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn kubeconfig(args: KubeconfigArgs) -> anyhow::Result<ExitCode> {
    let (offers, status) = ask(&args.socket, &args.config, &args.service)?;
    let kubernetes: Vec<&ServiceEntry> = offers
        .services
        .iter()
        .filter(|e| e.service.name == args.service)
        .collect();
    if kubernetes.is_empty() {
        anyhow::bail!(
            "no node offers a service named {:?} ({} of {} lighthouses answered); `tern services` lists what is offered",
            args.service,
            offers.answered,
            offers.asked
        );
    }
    let Some(entry) = kubernetes.iter().find(|e| {
        e.service.kind == "kubernetes" && authorize(&e.service.groups, &offers.my_groups).is_ok()
    }) else {
        let e = kubernetes[0];
        if e.service.kind != "kubernetes" {
            anyhow::bail!(
                "{:?} is a service of kind {}, not kubernetes",
                args.service,
                e.service.kind
            );
        }
        let why = authorize(&e.service.groups, &offers.my_groups)
            .err()
            .unwrap_or_default();
        anyhow::bail!("{:?}: {why}", args.service);
    };
    let offering = kubernetes
        .iter()
        .filter(|e| authorize(&e.service.groups, &offers.my_groups).is_ok())
        .count();
    // The overlay address when it is this host's and one node offers the
    // service; else the node's own forward, which spreads connections
    // over the nodes and passes over one that stopped.
    let forward = status.mode == tern_shared::config::TunMode::Userspace
        || offering > 1
        || args.listen.is_some();
    let (server, via) = if forward {
        let request = api::ApiRequest::Forward {
            target: format!(
                "{}{}",
                tern_shared::dns::SERVICE_TARGET_PREFIX,
                args.service
            ),
            listen: args.listen,
        };
        let path = api_socket(&args.socket, &args.config)?;
        let reply = match runtime()?.block_on(api::ask::<api::ForwardReply>(&path, &request))? {
            Ok(r) => r,
            Err(refusal) => anyhow::bail!(
                "the node would not forward to {:?}: {refusal}",
                args.service
            ),
        };
        (
            format!("http://{}", reply.listen),
            format!(
                "the node's forward at {} to the {offering} node(s) offering {}",
                reply.listen, args.service
            ),
        )
    } else {
        (
            format!("http://{}:{}", entry.node, entry.service.port),
            format!("{} on {}", args.service, entry.node_name),
        )
    };
    let text = kubeconfig_text(&args.service, &server, &via, args.namespace.as_deref());
    match &args.out {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("writing {}", path.display()))?;
            f.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {} (server {server}, {via}): kubectl --kubeconfig {} get pods",
                path.display(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A kubeconfig whose server is the service through the mesh (WireGuard
/// encrypts it; the node offering it adds the credential): `server`, the
/// offering node's overlay address or this node's forward (`via` says
/// which), and whose user carries nothing.
fn kubeconfig_text(service: &str, server: &str, via: &str, namespace: Option<&str>) -> String {
    let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let name = format!("tern-{service}");
    let namespace = namespace
        .map(|ns| format!("    namespace: {}\n", quote(ns)))
        .unwrap_or_default();
    format!(
        "# Written by `tern kubeconfig {service}`: the API server through the mesh,\n\
         # {via}; the node offering it authenticates for you. No credential here.\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {n}\n  cluster:\n    server: {server}\n\
         contexts:\n\
         - name: {n}\n  context:\n    cluster: {n}\n    user: {n}\n{namespace}\
         current-context: {n}\n\
         users:\n\
         - name: {n}\n  user: {{}}\n",
        via = via.replace('\n', " "),
        n = quote(&name),
        server = quote(server),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfigs_carry_no_credential_and_quote_what_they_name() {
        let text = kubeconfig_text(
            "k8s",
            "http://100.64.0.30:6443",
            "k8s on gw-1\nkind: x",
            Some("staging: x"),
        );
        assert!(text.contains("# k8s on gw-1 kind: x;"), "{text}");
        assert!(
            text.contains("server: \"http://100.64.0.30:6443\""),
            "{text}"
        );
        assert!(text.contains("namespace: \"staging: x\""), "{text}");
        assert!(text.contains("user: {}"), "{text}");
        assert!(
            !text.contains("token") && !text.contains("client-key"),
            "{text}"
        );
    }
}
