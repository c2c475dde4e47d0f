//! `tern`: the Tern node daemon and its command-line interface.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

use tern_node::cli;

#[derive(Parser)]
#[command(name = "tern", version, about = "Tern overlay mesh node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create CAs, node keys and certificates; print and verify them.
    #[command(subcommand)]
    Cert(cli::cert::CertCommand),
    /// Run the node in the foreground (needs root or CAP_NET_ADMIN for the TUN device, none with --userspace).
    #[command(
        after_help = "Exit codes: 0 stopped by SIGINT/SIGTERM (with --wait-for: the target answered, the node runs on in the background); 1 bad config, identity or environment (the message says which); 73 another node already runs on this config's API socket (nothing was started); 76 a lighthouse said this node's certificate is revoked (the node stopped); with --enroll-token or --enroll-oidc: 77 the lighthouse refused the enrollment (token unknown, used up or expired; OIDC token from another issuer or audience, expired, badly signed or matching no rule; or beyond its issuer; or no lighthouse enrolls at all), 75 store unavailable (the lighthouses that answered could not reach their store, e.g. its database is down, for all of --enroll-patience, default 10s; nothing was spent: the same credential may be tried again), 69 no lighthouse answered, 78 --enroll-oidc found no ID token; with --wait-for also: 69 no lighthouse registration in time, 68 no path to the target (no gateway routes it), 70 the target refused, 71 denied by policy (the gateway or peer in front of the target says its firewall does not let this node in; the message names the rule), 124 no answer in time."
    )]
    Up(cli::daemon::UpArgs),
    /// Stop the running node: it deregisters from its lighthouses and leaves.
    Down(cli::daemon::DownArgs),
    /// Show the running node's lighthouses and peers.
    Status(cli::daemon::StatusArgs),
    /// Measure the round trip to a peer over the mesh, and say which path it took.
    #[command(
        after_help = "Exit codes: 0 at least one answer came back; 68 no lighthouse knows that address or name (said at once); 1 no answer, or the node could not be asked."
    )]
    Ping(cli::daemon::PingArgs),
    /// Run a pipeline on a runner across the mesh, streaming its output.
    #[command(
        after_help = "Exit codes: 0 when every step passed (or failed with continue_on_error); otherwise the failing step's own code; 65 bad pipeline or arguments (nothing was sent); 69 no runner with that label or name reachable; 74 the job passed but its artifacts could not be written here; 75 runner lost mid-job; 77 denied by the runner; 124 timed out; 130 cancelled (SIGINT/SIGTERM)."
    )]
    Run(cli::run::RunArgs),
    /// Forward local ports to targets in the mesh through the running node.
    Forward(cli::forward::ForwardArgs),
    /// Resolve a name as the running node does: mesh names, gateways' zones, the system's resolvers.
    #[command(
        after_help = "Exit codes: 0 the name resolved (NOERROR); 1 it did not (NXDOMAIN, SERVFAIL, REFUSED: the message says who answered); 2 bad arguments; 68 no answer at all (no gateway serves the name's zone and no resolver answered)."
    )]
    Resolve(cli::resolve::ResolveArgs),
    /// List the `[[services]]` nodes offer through the mesh, and whether this node may call them.
    Services(cli::services::ServicesArgs),
    /// Write a kubeconfig for a kubernetes service through the mesh (no credential in it).
    Kubeconfig(cli::services::KubeconfigArgs),
    /// Check firewall and gateway rules before a change ships: tests of who may reach what, and why.
    #[command(subcommand)]
    Policy(cli::policy::PolicyCommand),
    /// Try Tern in one command, without root or config: a throwaway mesh on this machine's loopback.
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Cert(cmd) => cli::cert::run(cmd),
        Command::Up(args) => cli::daemon::up(args),
        Command::Down(args) => cli::daemon::down(args),
        Command::Status(args) => cli::daemon::status(args),
        Command::Ping(args) => cli::daemon::ping(args),
        Command::Run(args) => cli::run::run(args),
        Command::Forward(args) => cli::forward::run(args),
        Command::Resolve(args) => cli::resolve::run(args),
        Command::Services(args) => cli::services::services(args),
        Command::Kubeconfig(args) => cli::services::kubeconfig(args),
        Command::Policy(cmd) => cli::policy::run(cmd),
        Command::Demo(args) => cli::demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
