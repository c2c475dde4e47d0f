//! `tern run`: hands a pipeline to a runner across the mesh and shows its
//! output live, as if the steps ran here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tern_node_core::node::RunnersResult;
use tern_runner::pipeline::{Pipeline, RESERVED_ENV_PREFIX};
use tern_runner::protocol::{
    check_greeting, Submit, CALLER_GREETING, GREETING_LEN, GREETING_TIMEOUT, RUNNER_GREETING,
    RUNNER_PORT,
};
use tern_shared::cert::RUNNER_GROUP;
use tern_shared::control::RunnerSelector;
use tern_shared::exit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::daemon::api_socket;
use crate::io::api::{self, ApiRequest};
use crate::io::proxy::ByteStream;
use tern_runner::client::{drive, Session};
use tern_runner::scheduler::Caller;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("runner").required(true).args(["on", "node"])))]
pub struct RunArgs {
    /// The pipeline file (see config/pipeline.toml).
    pub pipeline: PathBuf,
    /// Run on the least busy runner with this label (found through the
    /// lighthouses; only runners whose certificate carries the `runner`
    /// group are believed).
    #[arg(long, value_name = "LABEL")]
    pub on: Option<String>,
    /// Run on this runner: its certificate name, or its overlay address.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Where the job's artifacts land. Default ./tern-artifacts/JOB_ID.
    #[arg(long, value_name = "DIR")]
    pub artifacts_dir: Option<PathBuf>,
    /// The local node's config file, whose [api] socket says where to ask
    /// the daemon for runners (with --on, or --node NAME).
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The daemon's API socket, instead of --config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Extra environment for every step, `K=V` (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// A secret for the steps' environment, read from this process's
    /// environment variable of the same name; masked as *** in all output
    /// (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secret: Vec<String>,
}

fn fail(code: u8, message: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("tern run: {message}");
    Ok(ExitCode::from(code))
}

/// Exit codes: 0 all steps passed; a failing step's own code; and the
/// documented ones in [`tern_shared::exit`].
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let text = match std::fs::read_to_string(&args.pipeline) {
        Ok(t) => t,
        Err(e) => {
            return fail(
                exit::BAD_PIPELINE,
                format!("reading {}: {e}", args.pipeline.display()),
            )
        }
    };
    let pipeline = match Pipeline::parse(&text, &args.pipeline) {
        Ok(p) => p,
        Err(e) => return fail(exit::BAD_PIPELINE, e),
    };
    let workspace = std::env::current_dir()?;
    if let Err(e) = pipeline.check_uploads(&workspace) {
        return fail(exit::BAD_PIPELINE, e.located(&args.pipeline, &text));
    }
    let mut env = BTreeMap::new();
    for kv in &args.env {
        let Some((k, v)) = kv.split_once('=') else {
            return fail(
                exit::BAD_PIPELINE,
                format!("--env {kv:?}: write it as NAME=VALUE"),
            );
        };
        if !valid_env_name(k) {
            return fail(
                exit::BAD_PIPELINE,
                format!("--env {k:?}: names are letters, digits and _, not starting with a digit, and not {RESERVED_ENV_PREFIX}*"),
            );
        }
        env.insert(k.to_string(), v.to_string());
    }
    let mut secrets = BTreeMap::new();
    for name in &args.secret {
        if !valid_env_name(name) {
            return fail(
                exit::BAD_PIPELINE,
                format!("--secret {name:?} is not a variable name"),
            );
        }
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => {
                secrets.insert(name.clone(), v);
            }
            _ => {
                return fail(
                    exit::BAD_PIPELINE,
                    format!("--secret {name}: set {name} in the environment of `tern run`"),
                )
            }
        }
    }
    let submit = Submit {
        pipeline: serde_json::to_value(&pipeline)?,
        env,
        secrets,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stream = match connect(&args).await {
            Ok(s) => s,
            Err((code, message)) => return fail(code, message),
        };
        let session = Session {
            pipeline: &pipeline,
            workspace,
            artifacts_dir: args.artifacts_dir.clone(),
        };
        drive(stream, submit, session).await.map(ExitCode::from)
    })
}

/// Finds the runner and opens the job connection: `--node ADDRESS`
/// directly; `--on LABEL` and `--node NAME` through the lighthouses (asked
/// by the local daemon), checking each candidate's verified certificate
/// before anything is sent.
async fn connect(args: &RunArgs) -> Result<Box<dyn ByteStream>, (u8, String)> {
    if let Some(ip) = args
        .node
        .as_deref()
        .and_then(|n| n.parse::<Ipv4Addr>().ok())
    {
        return dial(args, ip).await.map_err(|e| (exit::UNAVAILABLE, e));
    }
    let selector = match (&args.on, &args.node) {
        (Some(label), _) => RunnerSelector::Label(label.clone()),
        (None, Some(name)) => RunnerSelector::Name(name.clone()),
        (None, None) => return Err((exit::BAD_PIPELINE, "give --on LABEL or --node NAME".into())),
    };
    let what = match &selector {
        RunnerSelector::Label(l) => format!("with label {l:?}"),
        RunnerSelector::Name(n) => format!("named {n:?}"),
    };
    let socket = api_socket(&args.socket, &args.config)
        .map_err(|e| (exit::UNAVAILABLE, format!("{e:#}")))?;
    let request = ApiRequest::FindRunners {
        selector: selector.clone(),
    };
    let found: RunnersResult = api::ask(&socket, &request)
        .await
        .map_err(|e| {
            (
                exit::UNAVAILABLE,
                format!("asking the local daemon for runners: {e:#}"),
            )
        })?
        .map_err(|e| (exit::UNAVAILABLE, format!("finding runners {what}: {e}")))?;
    if found.runners.is_empty() {
        return Err((
            exit::UNAVAILABLE,
            format!(
                "no runner {what} is registered with the lighthouses ({} of {} answered)",
                found.answered, found.asked
            ),
        ));
    }
    let mut tried = Vec::new();
    for runner in &found.runners {
        let stream = match dial(args, runner.overlay_ip).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tern run: skipping {}: {e}", runner.name);
                tried.push(format!(
                    "{} ({}): unreachable",
                    runner.name, runner.overlay_ip
                ));
                continue;
            }
        };
        // The connection made the session: the daemon has verified the
        // runner's certificate; believe only that, not the lighthouse.
        let request = ApiRequest::Peer {
            overlay_ip: runner.overlay_ip,
        };
        let identity = api::ask::<Option<Caller>>(&socket, &request)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let verdict = match (&identity, &selector) {
            (None, _) => Err("its certificate is not known to the local daemon".to_string()),
            (Some(id), RunnerSelector::Label(_)) if !id.groups.iter().any(|g| g == RUNNER_GROUP) => Err(format!(
                "its certificate ({}) lacks the '{RUNNER_GROUP}' group, so its label is not believed",
                id.name
            )),
            (Some(id), RunnerSelector::Name(n)) if &id.name != n => Err(format!(
                "its certificate is named {:?}, not {n:?}",
                id.name
            )),
            (Some(id), _) => Ok(id),
        };
        match verdict {
            Ok(id) => {
                let load = runner.load.map_or_else(String::new, |l| {
                    format!(
                        ": {} running, {} queued, {} at once",
                        l.running, l.queued, l.concurrency
                    )
                });
                println!("runner {} ({}){load}", id.name, runner.overlay_ip);
                return Ok(stream);
            }
            Err(why) => {
                eprintln!(
                    "tern run: skipping {} ({}): {why}",
                    runner.name, runner.overlay_ip
                );
                tried.push(format!("{} ({}): {why}", runner.name, runner.overlay_ip));
            }
        }
    }
    Err((
        exit::UNAVAILABLE,
        format!("no usable runner {what}: {}", tried.join("; ")),
    ))
}

/// Opens the job connection, always through the local daemon (its API
/// socket): the daemon dials the runner inside the mesh, from its
/// userspace stack or from a socket bound to its TUN device, so the job
/// and its secrets never follow whatever route this shell's network has
/// for the overlay. Then the greetings: nothing of the job is sent before
/// the other end has answered as a Tern runner.
async fn dial(args: &RunArgs, ip: Ipv4Addr) -> Result<Box<dyn ByteStream>, String> {
    let addr = SocketAddrV4::new(ip, RUNNER_PORT);
    let socket = api_socket(&args.socket, &args.config).map_err(|e| {
        format!("tern run reaches runners through the local node; give its --config or --socket ({e:#})")
    })?;
    api::ask::<api::RouteReply>(&socket, &ApiRequest::Route { ip })
        .await
        .map_err(|e| {
            format!("tern run reaches runners only through the local node (give its --config or --socket): {e:#}")
        })?
        .map_err(|e| format!("cannot reach the runner at {addr}: {e}"))?;
    let mut stream = match tokio::time::timeout(DIAL_TIMEOUT, api::dial(&socket, addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("cannot reach the runner at {addr}: {e:#}")),
        Err(_) => {
            return Err(format!(
                "no answer from the runner at {addr} within {} s",
                DIAL_TIMEOUT.as_secs()
            ))
        }
    };
    greet(&mut stream)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(Box::new(stream))
}

/// Sends the caller's greeting and checks the runner's.
async fn greet(stream: &mut tokio::net::UnixStream) -> Result<(), String> {
    stream
        .write_all(CALLER_GREETING)
        .await
        .map_err(|e| format!("sending the greeting: {e}"))?;
    let mut got = Vec::with_capacity(GREETING_LEN);
    let read = async {
        let mut byte = [0u8; GREETING_LEN];
        while got.len() < GREETING_LEN {
            let n = stream.read(&mut byte[..GREETING_LEN - got.len()]).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&byte[..n]);
        }
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(GREETING_TIMEOUT, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("reading the runner's greeting: {e}")),
        Err(_) => {
            return Err(format!(
                "no greeting within {} s: not a Tern runner (is another service listening on port {RUNNER_PORT}?)",
                GREETING_TIMEOUT.as_secs()
            ))
        }
    }
    check_greeting(&got, RUNNER_GREETING).map_err(|e| e.to_string())
}

/// How long reaching a runner may take (a first handshake, a relay).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

fn valid_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(RESERVED_ENV_PREFIX)
}
