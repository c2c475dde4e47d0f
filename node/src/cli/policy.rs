//! `tern policy test|explain`: what the firewall and gateway rules of some
//! node configs decide for a caller and a destination, before a change
//! ships. Nothing runs: the configs, their certificates and the tests file
//! are read, and `tern_node_core::policy_check` decides with the firewall's
//! own code.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tern_node_core::policy_check::{answer, run_test, Answer, Asker, NodeUnderTest};
use tern_shared::cert::Cert;
use tern_shared::config::NodeConfig;
use tern_shared::policy_tests::{self, Destination, Expect, PolicyTest, TestCaller};

/// Exit code: a test failed (`test`), or the destination is denied
/// (`explain`).
const FAILED: u8 = 1;
/// Exit code: a config, certificate or tests file is wrong.
const BAD_INPUT: u8 = 2;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check a tests file's [[test]] assertions against the firewall and
    /// gateway rules of node configs, without running anything.
    #[command(
        after_help = "Exit codes: 0 every test passed; 1 a test failed (each is printed with the rule that decided it) or could not be decided (the message says what to add); 2 a config, certificate or the tests file is wrong (the message names the file and line)."
    )]
    Test(TestArgs),
    /// Say what node configs decide for one caller and destination, and
    /// which rule decides.
    #[command(
        after_help = "Exit codes: 0 allowed (all of it, for a range); 1 denied (some or all), or undecidable (the message says what to add); 2 a config, certificate or argument is wrong."
    )]
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct TestArgs {
    /// A node config whose rules decide (a gateway's, a node's); repeat for
    /// several. A test is checked at every config whose node owns or routes
    /// its destination, unless it names one with `node`.
    #[arg(long = "config", short = 'c', required = true, value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// The tests file: [[test]] entries with a caller (`groups`, or
    /// `cert`), `to` (`198.19.0.10:5432/tcp`, a subnet, a service or DNS
    /// name) and `expect = "allow"` or `"deny"`.
    pub tests: PathBuf,
    /// Print the deciding rule for every test, not only the failing ones.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// A node config whose rules decide; repeat for several.
    #[arg(long = "config", short = 'c', required = true, value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// The caller's groups (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', conflicts_with = "cert")]
    pub groups: Vec<String>,
    /// The caller's certificate name, for rules with `host`.
    #[arg(long, conflicts_with = "cert")]
    pub caller: Option<String>,
    /// The caller's overlay address, for rules with `cidr`.
    #[arg(long, conflicts_with = "cert")]
    pub from: Option<Ipv4Addr>,
    /// The caller's certificate: its name, address and groups.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Only the config with this file name (without .toml) or certificate
    /// name decides.
    #[arg(long)]
    pub node: Option<String>,
    /// Where the caller goes: 198.19.0.10:5432/tcp, 198.19.0.0/24/icmp,
    /// a service's name or a name in a gateway's DNS zone.
    pub destination: String,
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Test(args) => test(args),
        PolicyCommand::Explain(args) => explain(args),
    }
}

fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let nodes = match load_nodes(&args.configs) {
        Ok(n) => n,
        Err(e) => return Ok(bad_input(e)),
    };
    let text = match std::fs::read_to_string(&args.tests)
        .with_context(|| format!("reading tests file {}", args.tests.display()))
    {
        Ok(t) => t,
        Err(e) => return Ok(bad_input(e)),
    };
    let tests = match policy_tests::parse(&text, &args.tests) {
        Ok(t) => t,
        Err(e) => return Ok(bad_input(e.into())),
    };
    let file = args.tests.display().to_string();
    let mut out = Output::default();
    let mut callers: HashMap<PathBuf, Asker> = HashMap::new();
    let (mut passed, mut failed) = (0usize, 0usize);
    for t in &tests {
        let asker = match asker_of(t, &mut callers) {
            Ok(a) => a,
            Err(e) => return Ok(bad_input(e.context(format!("{file}:{}", t.line)))),
        };
        let a = run_test(&nodes, &asker, t);
        let got = a.verdict();
        let ok = got == Some(t.expect);
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        if ok && !args.explain {
            continue;
        }
        let status = if ok { "PASS" } else { "FAIL" };
        let outcome = match (&a, got) {
            (Answer::Undecidable(_), _) => "could not be decided".to_string(),
            (_, Some(v)) if ok => v.to_string(),
            (_, Some(v)) => format!("expected {}, got {v}", t.expect),
            (_, None) => format!(
                "expected {}, but parts are allowed and parts denied",
                t.expect
            ),
        };
        out.line(format!(
            "{status}  {} ({file}:{}): {asker} to {}: {outcome}",
            t.name, t.line, t.to_text
        ));
        out.answer(&a, &nodes);
    }
    out.line(format!(
        "{} tests: {passed} passed, {failed} failed",
        tests.len()
    ));
    out.flush();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED)
    })
}

fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let nodes = match load_nodes(&args.configs) {
        Ok(n) => n,
        Err(e) => return Ok(bad_input(e)),
    };
    let to = match Destination::parse(&args.destination) {
        Ok(d) => d,
        Err(e) => return Ok(bad_input(anyhow::anyhow!(e))),
    };
    let asker = match &args.cert {
        Some(path) => match asker_from_cert(path) {
            Ok(a) => a,
            Err(e) => return Ok(bad_input(e)),
        },
        None => {
            let mut groups: Vec<String> = args
                .groups
                .iter()
                .map(|g| g.trim().to_string())
                .filter(|g| !g.is_empty())
                .collect();
            groups.sort();
            groups.dedup();
            Asker {
                name: args.caller.clone(),
                groups,
                address: args.from,
            }
        }
    };
    let a = answer(&nodes, &asker, &to, args.node.as_deref());
    let verdict = match a.verdict() {
        Some(Expect::Allow) => "allowed",
        Some(Expect::Deny) => "denied",
        None if matches!(a, Answer::Undecidable(_)) => "undecidable",
        None => "allowed in part, denied in part",
    };
    let mut out = Output::default();
    out.line(format!("{asker} to {}: {verdict}", args.destination.trim()));
    out.answer(&a, &nodes);
    out.flush();
    Ok(if a.verdict() == Some(Expect::Allow) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED)
    })
}

/// What the command prints, written at the end in one go (a closed pipe,
/// as with `| head`, ends the output, not the command).
#[derive(Default)]
struct Output(String);

impl Output {
    fn line(&mut self, line: String) {
        self.0.push_str(&line);
        self.0.push('\n');
    }

    fn answer(&mut self, a: &Answer, nodes: &[NodeUnderTest]) {
        match a {
            Answer::Decided(parts) => {
                for p in parts {
                    self.line(format!("      {}", p.describe(nodes)));
                }
            }
            Answer::Undecidable(why) => self.line(format!("      {why}")),
        }
    }

    fn flush(self) {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(self.0.as_bytes())
            .and_then(|()| stdout.flush());
    }
}

fn bad_input(e: anyhow::Error) -> ExitCode {
    eprintln!("tern policy: {e:#}");
    ExitCode::from(BAD_INPUT)
}

/// Each config, read and checked as `tern up` reads it, with its
/// certificate's name and address when the certificate can be read.
fn load_nodes(paths: &[PathBuf]) -> anyhow::Result<Vec<NodeUnderTest>> {
    let mut nodes = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let config = NodeConfig::parse(&text, path)?;
        let cert = node_identity(&config);
        let (inbound_lines, _) = policy_tests::firewall_rule_lines(&text);
        let label = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let stem = path
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| label.clone());
        nodes.push(NodeUnderTest::new(label, stem, config, cert, inbound_lines));
    }
    Ok(nodes)
}

/// The node's certificate name and overlay address, or why they are
/// unknown.
fn node_identity(config: &NodeConfig) -> Result<(String, Ipv4Addr), String> {
    if config.pki.enrolls() {
        return Err("it enrolls, so its address is given at enrollment".into());
    }
    let cert = read_cert(&config.pki.cert).map_err(|e| format!("{e:#}"))?;
    let ip = overlay_ip(&cert).ok_or_else(|| {
        format!(
            "{} carries no IPv4 overlay address",
            config.pki.cert.display()
        )
    })?;
    Ok((cert.body.name.clone(), ip))
}

fn read_cert(path: &Path) -> anyhow::Result<Cert> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading certificate {}", path.display()))?;
    Cert::from_pem(&text).with_context(|| format!("certificate {}", path.display()))
}

fn overlay_ip(cert: &Cert) -> Option<Ipv4Addr> {
    cert.body.ips.iter().find_map(|n| match n {
        ipnet::IpNet::V4(n) => Some(n.addr()),
        ipnet::IpNet::V6(_) => None,
    })
}

/// The caller a certificate describes. It is read, not verified: a test
/// may describe a caller whose certificate has expired.
fn asker_from_cert(path: &Path) -> anyhow::Result<Asker> {
    let cert = read_cert(path)?;
    let mut groups = cert.body.groups.clone();
    groups.sort();
    Ok(Asker {
        name: Some(cert.body.name.clone()),
        groups,
        address: overlay_ip(&cert),
    })
}

fn asker_of(t: &PolicyTest, cache: &mut HashMap<PathBuf, Asker>) -> anyhow::Result<Asker> {
    match &t.caller {
        TestCaller::Described { name, groups, from } => Ok(Asker {
            name: name.clone(),
            groups: groups.clone(),
            address: *from,
        }),
        TestCaller::Cert(path) => {
            if let Some(a) = cache.get(path) {
                return Ok(a.clone());
            }
            let a = asker_from_cert(path)?;
            cache.insert(path.clone(), a.clone());
            Ok(a)
        }
    }
}
