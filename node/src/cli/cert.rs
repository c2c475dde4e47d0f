//! `tern cert`: make a CA, node keys and node certificates; print and verify
//! certificates. Everything here runs offline; the CA key never needs to touch
//! a networked machine.

use anyhow::{anyhow, bail, Context as _};
use ipnet::{IpNet, Ipv4Net};
use std::fs::{self, OpenOptions, Permissions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_shared::cert::{self, CaPool, Cert, CertBody, CertKind, Fingerprint};
use tern_shared::duration::{parse_duration, DurationError};
use tern_shared::keys::{CaSecretKey, NodePublicKey, NodeSecretKey};

const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

#[derive(clap::Subcommand, Debug)]
pub enum CertCommand {
    /// Create a CA: an Ed25519 key and its self-signed certificate.
    Ca(CaArgs),
    /// Create a node key pair (X25519, also the node's WireGuard key).
    Keygen(KeygenArgs),
    /// Write the public key of an existing node key, for `tern cert sign
    /// --in-pub` (a new certificate for the same key: renewing a gateway's
    /// certificate without touching its key).
    Pubkey(PubkeyArgs),
    /// Sign a node certificate with the CA.
    Sign(SignArgs),
    /// Print the certificates in a file.
    Print(PrintArgs),
    /// Verify a node certificate against a CA file; exit 1 if it is invalid.
    Verify(VerifyArgs),
}

#[derive(clap::Args, Debug)]
pub struct CaArgs {
    /// The CA's name, 1-64 characters from A-Z a-z 0-9 . _ -
    #[arg(long)]
    name: String,
    /// How long the CA is valid, e.g. 8760h or 365d.
    #[arg(long, default_value = "8760h", value_parser = parse_duration_arg)]
    duration: Duration,
    /// Overlay networks every node certificate must fall inside (default: any).
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    ips: Vec<IpNet>,
    /// The only groups node certificates may carry (default: any).
    #[arg(long, value_delimiter = ',', value_name = "GROUP,...")]
    groups: Vec<String>,
    /// DNS zones node certificates' zones must lie under (default: any).
    #[arg(long, value_delimiter = ',', value_name = "ZONE,...")]
    dns_zones: Vec<String>,
    /// Where to write the CA certificate.
    #[arg(long)]
    out_crt: PathBuf,
    /// Where to write the CA private key (mode 0600). Keep it offline.
    #[arg(long)]
    out_key: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
pub struct PubkeyArgs {
    /// The node's private key (only read).
    #[arg(long)]
    key: PathBuf,
    /// Where to write its public key.
    #[arg(long)]
    out_pub: PathBuf,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the node private key (mode 0600).
    #[arg(long)]
    out_key: PathBuf,
    /// Where to write the node public key, for `tern cert sign --in-pub`.
    #[arg(long)]
    out_pub: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("node_key").required(true).args(["in_pub", "out_key"])))]
pub struct SignArgs {
    /// Make an issuer instead of a node certificate: signed by the root CA,
    /// it signs short-lived node certificates (a lighthouse's [enroll]),
    /// only with addresses from --ips, groups from --groups, names starting
    /// with --name-prefix and lifetimes up to --max-duration; with
    /// --subnets/--dns-zones it may delegate those to nodes it signs
    /// (gateways whose certificates the lighthouse renews).
    #[arg(long, requires_all = ["ips", "max_duration"], conflicts_with_all = ["ip", "in_pub"])]
    issuer: bool,
    /// The issuer's address pool(s), e.g. 100.64.100.0/24 (with --issuer).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CIDR,...",
        requires = "issuer"
    )]
    ips: Vec<Ipv4Net>,
    /// The longest lifetime the issuer may sign, e.g. 1h (with --issuer).
    #[arg(long, value_parser = parse_duration_arg, requires = "issuer")]
    max_duration: Option<Duration>,
    /// Names the issuer signs must start with this (with --issuer). Default "ci-".
    #[arg(long, default_value = "ci-", requires = "issuer")]
    name_prefix: String,
    /// The CA certificate (a file with several CAs is fine: the one matching
    /// --ca-key is used); or an issuer certificate, to sign a node under it.
    #[arg(long)]
    ca_crt: PathBuf,
    /// The CA private key.
    #[arg(long)]
    ca_key: PathBuf,
    /// The node's name, 1-64 characters from A-Z a-z 0-9 . _ -
    #[arg(long)]
    name: String,
    /// The node's overlay address with the mesh prefix, e.g. 100.64.0.5/10.
    /// Without the prefix, the CA's network holding the address gives it.
    #[arg(
        long,
        value_name = "IP/PREFIX",
        required_unless_present = "issuer",
        value_parser = parse_node_ip
    )]
    ip: Option<NodeIp>,
    /// Groups the node belongs to (firewall rules match on them).
    #[arg(long, value_delimiter = ',', value_name = "GROUP,...")]
    groups: Vec<String>,
    /// Private subnets the node may route for the mesh (with --issuer: the
    /// subnets its nodes' subnets must lie inside).
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    subnets: Vec<IpNet>,
    /// DNS zones the node may answer for as a gateway ([[gateway.dns]]),
    /// e.g. internal,svc.cluster.local (with --issuer: the zones its nodes'
    /// zones must lie under).
    #[arg(long, value_delimiter = ',', value_name = "ZONE,...")]
    dns_zones: Vec<String>,
    /// How long the certificate is valid (default: until 1 second before the CA expires).
    #[arg(long, value_parser = parse_duration_arg)]
    duration: Option<Duration>,
    /// The node's public key, from `tern cert keygen`.
    #[arg(long)]
    in_pub: Option<PathBuf>,
    /// Generate the key here (mode 0600) instead of reading --in-pub (an
    /// issuer's key is always generated here).
    #[arg(long, required_if_eq("issuer", "true"))]
    out_key: Option<PathBuf>,
    /// Where to write the node certificate.
    #[arg(long)]
    out_crt: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
}

/// `tern cert sign --issuer`: an issuing certificate under the root CA,
/// with a fresh Ed25519 key written to --out-key.
fn sign_issuer(args: SignArgs, ca: Cert, ca_key: CaSecretKey) -> anyhow::Result<ExitCode> {
    if ca.body.kind != CertKind::Ca {
        anyhow::bail!("an issuer is signed by a root CA, not by another issuer; pass the root's --ca-crt and --ca-key");
    }
    let out_key = args
        .out_key
        .as_ref()
        .ok_or_else(|| anyhow!("--issuer needs --out-key for the issuer's new key"))?;
    let max = args
        .max_duration
        .ok_or_else(|| anyhow!("--issuer needs --max-duration, e.g. 1h"))?;
    let now = now_unix()?;
    let not_after = match args.duration {
        Some(d) => now
            .checked_add(whole_seconds(d)?)
            .ok_or_else(|| anyhow!("--duration is too long"))?,
        None => ca.body.not_after.saturating_sub(1),
    };
    let key = CaSecretKey::generate();
    let body = CertBody {
        kind: CertKind::Issuer,
        name: args.name,
        ips: args.ips.iter().map(|n| IpNet::V4(n.trunc())).collect(),
        groups: args.groups,
        subnets: args.subnets,
        dns_zones: args.dns_zones,
        not_before: now,
        not_after,
        public_key: key.public_bytes(),
        issuer: Fingerprint::ZERO,
        name_prefix: args.name_prefix,
        max_lifetime: whole_seconds(max)?,
        chain: None,
    };
    let cert = cert::sign_issuer(&ca, &ca_key, body, now).context("refusing to sign")?;
    write_file(out_key, &key.to_pem(), SECRET_MODE, args.force)?;
    write_file(&args.out_crt, &cert.to_pem(), PUBLIC_MODE, args.force)?;
    println!(
        "signed issuer {:?}: pool {}, groups {}, names {}*, at most {} s each{}; valid until {}, fingerprint {}\n  certificate: {}\n  private key: {}",
        cert.body.name,
        join_or(cert.body.ips.iter(), "-"),
        join_or(cert.body.groups.iter(), "(none)"),
        cert.body.name_prefix,
        cert.body.max_lifetime,
        delegation(&cert.body),
        cert::format_unix_time(cert.body.not_after),
        cert.fingerprint(),
        args.out_crt.display(),
        out_key.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// What an issuer delegates, for `sign --issuer`'s summary: nothing for
/// one that delegates nothing.
fn delegation(b: &CertBody) -> String {
    let mut out = String::new();
    if !b.subnets.is_empty() {
        out += &format!(", delegating subnets {}", join_or(b.subnets.iter(), "-"));
    }
    if !b.dns_zones.is_empty() {
        out += &format!(", delegating DNS zones {}", b.dns_zones.join(","));
    }
    out
}

#[derive(clap::Args, Debug)]
pub struct PrintArgs {
    /// A certificate file; every certificate in it is printed.
    file: PathBuf,
    /// One JSON object per certificate, one per line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The trusted CA certificate(s).
    #[arg(long)]
    ca: PathBuf,
    /// The node certificate to verify.
    file: PathBuf,
}

pub fn run(cmd: CertCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertCommand::Ca(args) => ca(args),
        CertCommand::Keygen(args) => keygen(args),
        CertCommand::Pubkey(args) => pubkey(args),
        CertCommand::Sign(args) => sign(args),
        CertCommand::Print(args) => print(args),
        CertCommand::Verify(args) => verify(args),
    }
}

fn ca(args: CaArgs) -> anyhow::Result<ExitCode> {
    check_outputs(&[&args.out_crt, &args.out_key], args.force)?;
    let now = now_unix()?;
    let not_after = now
        .checked_add(whole_seconds(args.duration)?)
        .ok_or_else(|| anyhow!("--duration is too long"))?;
    let key = CaSecretKey::generate();
    let body = CertBody {
        kind: CertKind::Ca,
        name: args.name,
        ips: args.ips,
        groups: args.groups,
        subnets: Vec::new(),
        dns_zones: args.dns_zones,
        not_before: now,
        not_after,
        public_key: key.public_bytes(),
        issuer: Fingerprint::ZERO,
        name_prefix: String::new(),
        max_lifetime: 0,
        chain: None,
    };
    let cert = cert::self_sign_ca(body, &key).context("cannot create the CA")?;
    write_file(&args.out_key, &key.to_pem(), SECRET_MODE, args.force)?;
    write_file(&args.out_crt, &cert.to_pem(), PUBLIC_MODE, args.force)?;
    println!(
        "created CA {:?} valid until {}, fingerprint {}\n  certificate: {}\n  private key: {} (keep it offline)",
        cert.body.name,
        cert::format_unix_time(cert.body.not_after),
        cert.fingerprint(),
        args.out_crt.display(),
        args.out_key.display(),
    );
    Ok(ExitCode::SUCCESS)
}

fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    check_outputs(&[&args.out_key, &args.out_pub], args.force)?;
    let key = NodeSecretKey::generate();
    write_file(&args.out_key, &key.to_pem(), SECRET_MODE, args.force)?;
    write_file(
        &args.out_pub,
        &key.public().to_pem(),
        PUBLIC_MODE,
        args.force,
    )?;
    println!(
        "created node key {} and public key {}",
        args.out_key.display(),
        args.out_pub.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn pubkey(args: PubkeyArgs) -> anyhow::Result<ExitCode> {
    check_outputs(&[&args.out_pub], args.force)?;
    let key = NodeSecretKey::from_pem(&read_text(&args.key)?)
        .map_err(|e| anyhow!("{} is not a node private key: {e}", args.key.display()))?;
    write_file(
        &args.out_pub,
        &key.public().to_pem(),
        PUBLIC_MODE,
        args.force,
    )?;
    println!(
        "wrote the public key of {} to {}",
        args.key.display(),
        args.out_pub.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn sign(args: SignArgs) -> anyhow::Result<ExitCode> {
    let mut outputs = vec![args.out_crt.as_path()];
    if let Some(out_key) = &args.out_key {
        outputs.push(out_key);
    }
    check_outputs(&outputs, args.force)?;

    let ca_key = CaSecretKey::from_pem(&read_text(&args.ca_key)?)
        .with_context(|| format!("cannot load CA key {}", args.ca_key.display()))?;
    let cas = Cert::all_from_pem(&read_text(&args.ca_crt)?)
        .with_context(|| format!("cannot load CA certificate {}", args.ca_crt.display()))?;
    let ca = cas
        .into_iter()
        .find(|c| {
            matches!(c.body.kind, CertKind::Ca | CertKind::Issuer)
                && c.body.public_key == ca_key.public_bytes()
        })
        .ok_or_else(|| {
            anyhow!(
                "the CA key {} does not belong to any CA or issuer certificate in {}; pass the matching --ca-crt and --ca-key",
                args.ca_key.display(),
                args.ca_crt.display()
            )
        })?;
    if args.issuer {
        return sign_issuer(args, ca, ca_key);
    }

    let (public, new_key) = match &args.in_pub {
        Some(path) => {
            let public = NodePublicKey::from_pem(&read_text(path)?)
                .with_context(|| format!("cannot load node public key {}", path.display()))?;
            (public, None)
        }
        None => {
            let key = NodeSecretKey::generate();
            (key.public(), Some(key))
        }
    };

    let now = now_unix()?;
    let not_after = match args.duration {
        Some(d) => now
            .checked_add(whole_seconds(d)?)
            .ok_or_else(|| anyhow!("--duration is too long"))?,
        // Under an issuer: as long as it allows.
        None if ca.body.kind == CertKind::Issuer => now
            .saturating_add(ca.body.max_lifetime)
            .min(ca.body.not_after),
        None => ca.body.not_after.saturating_sub(1),
    };
    let ip = match args.ip {
        Some(NodeIp::Net(net)) => net,
        Some(NodeIp::Bare(addr)) => prefix_from_ca(addr, &ca)?,
        None => bail!("--ip is required for a node certificate"),
    };
    let body = CertBody {
        kind: CertKind::Node,
        name: args.name,
        ips: vec![IpNet::V4(ip)],
        groups: args.groups,
        subnets: args.subnets,
        dns_zones: args.dns_zones,
        not_before: now,
        not_after,
        public_key: public.0,
        issuer: Fingerprint::ZERO,
        name_prefix: String::new(),
        max_lifetime: 0,
        chain: None,
    };
    let cert = if ca.body.kind == CertKind::Issuer {
        cert::sign_under_issuer(&ca, &ca_key, body, now)
    } else {
        cert::sign_node(&ca, &ca_key, body, now)
    }
    .context("refusing to sign")?;

    if let (Some(path), Some(key)) = (&args.out_key, &new_key) {
        write_file(path, &key.to_pem(), SECRET_MODE, args.force)?;
    }
    write_file(&args.out_crt, &cert.to_pem(), PUBLIC_MODE, args.force)?;
    println!(
        "signed {:?} ({}) valid until {}, fingerprint {}\n  certificate: {}",
        cert.body.name,
        ip,
        cert::format_unix_time(cert.body.not_after),
        cert.fingerprint(),
        args.out_crt.display(),
    );
    if let Some(path) = &args.out_key {
        println!("  private key: {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print(args: PrintArgs) -> anyhow::Result<ExitCode> {
    let certs = Cert::all_from_pem(&read_text(&args.file)?)
        .with_context(|| format!("cannot read certificates from {}", args.file.display()))?;
    let mut out = String::new();
    for (i, cert) in certs.iter().enumerate() {
        if args.json {
            out.push_str(&serde_json::to_string(&cert_json(cert))?);
            out.push('\n');
        } else {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&cert_text(cert));
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let cas = Cert::all_from_pem(&read_text(&args.ca)?)
        .with_context(|| format!("cannot load CA certificates from {}", args.ca.display()))?;
    let pool = CaPool::new(cas)
        .with_context(|| format!("cannot trust the CA certificates in {}", args.ca.display()))?;
    let certs = match Cert::all_from_pem(&read_text(&args.file)?) {
        Ok(certs) => certs,
        Err(err) => {
            eprintln!("invalid: {err}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let now = now_unix()?;
    let several = certs.len() > 1;
    let mut all_valid = true;
    for cert in &certs {
        match pool.verify(cert, now) {
            Ok(v) => println!(
                "valid: {} ip={} groups={} subnets={}{} expires={} fingerprint={}",
                v.name(),
                v.overlay_net(),
                join_or(v.groups().iter(), "-"),
                join_or(v.subnets().iter(), "-"),
                if v.dns_zones().is_empty() {
                    String::new()
                } else {
                    format!(" dns_zones={}", v.dns_zones().join(","))
                },
                cert::format_unix_time(v.not_after()),
                v.fingerprint(),
            ),
            Err(err) => {
                all_valid = false;
                if several {
                    eprintln!("invalid: {}: {err}", cert.body.name);
                } else {
                    eprintln!("invalid: {err}");
                }
            }
        }
    }
    Ok(if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cert_text(cert: &Cert) -> String {
    let b = &cert.body;
    let none = match b.kind {
        CertKind::Ca => "(unconstrained)",
        CertKind::Node | CertKind::Issuer => "(none)",
    };
    let extra = match (&b.kind, &b.chain) {
        (CertKind::Issuer, _) => format!(
            "name prefix: {}\nmax lifetime: {} s\n",
            if b.name_prefix.is_empty() {
                "(any)"
            } else {
                &b.name_prefix
            },
            b.max_lifetime
        ),
        (_, Some(chain)) => format!(
            "issued by:   {} (issuer {})\n",
            chain.body.name,
            chain.fingerprint()
        ),
        _ => String::new(),
    };
    let issuer = if b.issuer == Fingerprint::ZERO {
        "(self-signed)".to_string()
    } else {
        b.issuer.to_string()
    };
    format!(
        "kind:        {}\n\
         name:        {}\n\
         ips:         {}\n\
         groups:      {}\n\
         subnets:     {}\n\
         dns zones:   {}\n\
         not before:  {}\n\
         not after:   {}\n\
         public key:  {}\n\
         issuer:      {}\n\
         {}fingerprint: {}\n",
        b.kind,
        b.name,
        join_or(b.ips.iter(), none),
        join_or(b.groups.iter(), none),
        join_or(b.subnets.iter(), "(none)"),
        join_or(b.dns_zones.iter(), none),
        cert::format_unix_time(b.not_before),
        cert::format_unix_time(b.not_after),
        hex(&b.public_key),
        issuer,
        extra,
        cert.fingerprint(),
    )
}

fn cert_json(cert: &Cert) -> serde_json::Value {
    let b = &cert.body;
    let strings = |items: &[IpNet]| items.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    serde_json::json!({
        "kind": b.kind.to_string(),
        "name": b.name,
        "ips": strings(&b.ips),
        "groups": b.groups,
        "subnets": strings(&b.subnets),
        "dns_zones": b.dns_zones,
        "not_before": cert::format_unix_time(b.not_before),
        "not_after": cert::format_unix_time(b.not_after),
        "not_before_unix": b.not_before,
        "not_after_unix": b.not_after,
        "public_key": hex(&b.public_key),
        "issuer": b.issuer.to_string(),
        "name_prefix": (b.kind == CertKind::Issuer).then_some(&b.name_prefix),
        "max_lifetime_secs": (b.kind == CertKind::Issuer).then_some(b.max_lifetime),
        "issued_by": b.chain.as_ref().map(|c| c.body.name.clone()),
        "fingerprint": cert.fingerprint().to_string(),
    })
}

/// `--ip` as given: with the mesh prefix, or a bare address whose prefix
/// comes from the CA.
#[derive(Debug, Clone, Copy)]
enum NodeIp {
    Net(Ipv4Net),
    Bare(Ipv4Addr),
}

fn parse_node_ip(s: &str) -> Result<NodeIp, String> {
    if let Ok(net) = s.parse() {
        return Ok(NodeIp::Net(net));
    }
    s.parse().map(NodeIp::Bare).map_err(|_| {
        format!("{s:?} is not an IPv4 address with the mesh prefix, e.g. 100.64.0.5/10")
    })
}

/// The node's address with the prefix of the one CA network that holds it
/// (a CA made with `--ips 100.64.0.0/10` gives `/10`). An issuer's
/// networks are its address pool, not the mesh, so they give none.
fn prefix_from_ca(addr: Ipv4Addr, ca: &Cert) -> anyhow::Result<Ipv4Net> {
    let holding: Vec<Ipv4Net> = ca
        .body
        .ips
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) if n.contains(&addr) => Some(n.trunc()),
            _ => None,
        })
        .collect();
    match holding.as_slice() {
        [net] if ca.body.kind == CertKind::Ca => {
            let ip = Ipv4Net::new(addr, net.prefix_len())?;
            eprintln!(
                "note: --ip {addr} has no prefix; took /{} from the CA's network {net}: {ip}",
                net.prefix_len()
            );
            Ok(ip)
        }
        _ => bail!("--ip {addr}: give the mesh prefix too, e.g. {addr}/10"),
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, DurationError> {
    parse_duration(s)
}

fn whole_seconds(d: Duration) -> anyhow::Result<u64> {
    if d.as_secs() == 0 {
        bail!("--duration must be at least 1s");
    }
    Ok(d.as_secs())
}

fn now_unix() -> anyhow::Result<u64> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is set before 1970")?
        .as_secs())
}

fn join_or<T: std::fmt::Display>(items: impl Iterator<Item = T>, empty: &str) -> String {
    let joined = items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    if joined.is_empty() {
        empty.to_string()
    } else {
        joined
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Refuses before anything is written, so a refused command leaves no
/// half-made set of files behind.
fn check_outputs(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    for (i, path) in paths.iter().enumerate() {
        if paths[..i].contains(path) {
            bail!("{} is given as two different outputs", path.display());
        }
        if !force && path.symlink_metadata().is_ok() {
            bail!(already_exists(path));
        }
    }
    Ok(())
}

/// Creates `path` with `mode` (refusing an existing file unless `force`) and
/// writes `contents`. The mode is set before writing, so an overwritten
/// world-readable file never holds a secret.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!(already_exists(path))
        } else {
            anyhow!(err).context(format!("cannot create {}", path.display()))
        }
    })?;
    file.set_permissions(Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn already_exists(path: &Path) -> String {
    format!(
        "{} already exists; pass --force to overwrite it",
        path.display()
    )
}
