//! `tern run`: hands a pipeline to a runner across the mesh and shows its
//! output live, as if the steps ran here.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tern_shared::job::{exit, FrameReader, JobResult, Message, Stream, Submit, RUNNER_PORT};
use tern_shared::pipeline::{Pipeline, RESERVED_ENV_PREFIX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline file (see config/pipeline.toml).
    pub pipeline: PathBuf,
    /// The runner: its overlay address.
    #[arg(long)]
    pub node: String,
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
/// documented ones in [`tern_shared::job::exit`].
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
        return fail(exit::BAD_PIPELINE, e);
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
    let Ok(ip) = args.node.parse::<Ipv4Addr>() else {
        return fail(
            exit::BAD_PIPELINE,
            format!(
                "--node {:?}: give the runner's overlay address, e.g. 100.64.0.20",
                args.node
            ),
        );
    };
    let submit = Submit {
        pipeline: serde_json::to_value(&pipeline)?,
        env,
        secrets,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(drive(
        SocketAddr::from((ip, RUNNER_PORT)),
        submit,
        &pipeline,
    ))
}

fn valid_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(RESERVED_ENV_PREFIX)
}

/// Per step and stream, bytes until the end of a line.
#[derive(Default)]
struct Lines {
    partial: HashMap<(u32, bool), Vec<u8>>,
}

impl Lines {
    fn push(&mut self, key: (u32, bool), data: &[u8], mut emit: impl FnMut(&[u8])) {
        let buf = self.partial.entry(key).or_default();
        buf.extend_from_slice(data);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            emit(&line[..line.len() - 1]);
        }
    }

    fn flush(&mut self, step: u32, mut emit: impl FnMut(&[u8])) {
        for err in [false, true] {
            if let Some(rest) = self.partial.remove(&(step, err)) {
                if !rest.is_empty() {
                    emit(&rest);
                }
            }
        }
    }
}

async fn drive(addr: SocketAddr, submit: Submit, pipeline: &Pipeline) -> anyhow::Result<ExitCode> {
    let github = std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true");
    let stream = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return fail(
                exit::NO_RUNNER,
                format!("cannot reach the runner at {addr}: {e}"),
            )
        }
        Err(_) => {
            return fail(
                exit::NO_RUNNER,
                format!("no answer from the runner at {addr} within 10 s"),
            )
        }
    };
    stream.set_nodelay(true)?;
    crate::io::runner::keepalive(&stream);
    let (mut read, mut write) = stream.into_split();
    write.write_all(&Message::Submit(submit).encode()?).await?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Lines::default();
    let mut cancelled = false;
    let stdout = std::io::stdout();
    loop {
        while let Some(msg) = reader.next_message()? {
            let mut out = stdout.lock();
            match msg {
                Message::Denied { reason } => {
                    return fail(exit::DENIED, format!("denied: {reason}"))
                }
                Message::Queued { position } => {
                    let _ = writeln!(out, "queued (position {position})");
                }
                Message::Started { job_id, runner } => {
                    let _ = writeln!(out, "job {job_id} started on {runner}");
                }
                Message::StepStarted { name, .. } => {
                    if github {
                        let _ = writeln!(out, "::group::{name}");
                    }
                    let _ = writeln!(out, "▶ {name}");
                }
                Message::Output {
                    index,
                    stream,
                    data,
                } => {
                    let name = step_name(pipeline, index);
                    // Masked by the runner: secret values never travel back.
                    let err = stream == Stream::Stderr;
                    lines.push((index, err), &data, |line| {
                        let _ = writeln!(out, "[{name}] {}", String::from_utf8_lossy(line));
                    });
                }
                Message::StepFinished {
                    index,
                    exit_code,
                    duration_ms,
                } => {
                    let name = step_name(pipeline, index);
                    lines.flush(index, |line| {
                        let _ = writeln!(out, "[{name}] {}", String::from_utf8_lossy(line));
                    });
                    let mark = if exit_code == 0 { "✓" } else { "✗" };
                    let _ = writeln!(
                        out,
                        "{mark} {name} (exit {exit_code}, {:.1} s)",
                        duration_ms as f64 / 1000.0
                    );
                    if github {
                        let _ = writeln!(out, "::endgroup::");
                    }
                }
                Message::Finished {
                    result,
                    exit_code,
                    message,
                } => {
                    if let Some(m) = message {
                        eprintln!("tern run: {m}");
                    }
                    let code = match result {
                        JobResult::Succeeded => exit::SUCCESS,
                        JobResult::Failed => u8::try_from(exit_code.clamp(1, 255)).unwrap_or(1),
                        JobResult::TimedOut => exit::TIMED_OUT,
                        JobResult::Cancelled => exit::CANCELLED,
                        JobResult::Error => exit::RUNNER_LOST,
                    };
                    let _ = writeln!(
                        out,
                        "job {}: {result:?}",
                        if code == 0 { "passed" } else { "ended" }
                    );
                    return Ok(ExitCode::from(code));
                }
                Message::ArtifactChunk(_) | Message::ArtifactsDone => {}
                Message::Submit(_)
                | Message::UploadChunk(_)
                | Message::UploadDone
                | Message::Cancel => {
                    return fail(exit::RUNNER_LOST, "the runner spoke out of turn");
                }
            }
        }
        tokio::select! {
            n = read.read(&mut buf) => {
                match n {
                    Ok(0) | Err(_) => {
                        let code = if cancelled { exit::CANCELLED } else { exit::RUNNER_LOST };
                        return fail(code, "the runner went away before the job ended");
                    }
                    Ok(n) => reader.push(&buf[..n]),
                }
            }
            _ = sigint.recv(), if !cancelled => {
                cancelled = true;
                eprintln!("tern run: cancelling the job");
                let _ = write.write_all(&Message::Cancel.encode()?).await;
            }
            _ = sigterm.recv(), if !cancelled => {
                cancelled = true;
                eprintln!("tern run: cancelling the job");
                let _ = write.write_all(&Message::Cancel.encode()?).await;
            }
        }
    }
}

fn step_name(pipeline: &Pipeline, index: u32) -> String {
    pipeline
        .steps
        .get(index as usize)
        .map_or_else(|| format!("step {index}"), |s| s.name.clone())
}
