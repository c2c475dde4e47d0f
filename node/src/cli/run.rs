//! `tern run`: hands a pipeline to a runner across the mesh and shows its
//! output live, as if the steps ran here.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tern_runner::job::{
    check_greeting, FrameReader, JobResult, Message, Stream, Submit, CALLER_GREETING, GREETING_LEN,
    GREETING_TIMEOUT, MAX_CHUNK, RUNNER_GREETING, RUNNER_PORT, RUNNER_SILENCE,
};
use tern_runner::pipeline::{Pipeline, RESERVED_ENV_PREFIX};
use tern_shared::cert::RUNNER_GROUP;
use tern_shared::control::{RunnerInfo, RunnerSelector};
use tern_shared::exit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::daemon::api_socket;
use crate::io::api::{self, ApiRequest};
use crate::io::archive::{self, ArchiveError, ChunkReader, ChunkWriter, Summary};
use crate::io::proxy::ByteStream;
use crate::io::runner::TRANSFER_LIMITS;
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
/// documented ones in [`tern_runner::job::exit`].
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
        drive(stream, submit, session).await
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
    let ask = |request: ApiRequest| {
        let socket = socket.clone();
        async move { api::call(&socket, &request).await }
    };
    let reply = ask(ApiRequest::FindRunners {
        selector: selector.clone(),
    })
    .await
    .map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("asking the local daemon for runners: {e:#}"),
        )
    })?;
    if let Some(e) = reply.get("error").and_then(|e| e.as_str()) {
        return Err((exit::UNAVAILABLE, format!("finding runners {what}: {e}")));
    }
    let found: RunnersFound = serde_json::from_value(reply).map_err(|e| {
        (
            exit::UNAVAILABLE,
            format!("the daemon's answer did not parse: {e}"),
        )
    })?;
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
        let identity = ask(ApiRequest::Peer {
            overlay_ip: runner.overlay_ip,
        })
        .await
        .ok()
        .and_then(|v| serde_json::from_value::<Option<Caller>>(v).ok())
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

#[derive(serde::Deserialize)]
struct RunnersFound {
    runners: Vec<RunnerInfo>,
    asked: usize,
    answered: usize,
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
    let reply = api::call(&socket, &ApiRequest::Route { ip })
        .await
        .map_err(|e| {
            format!("tern run reaches runners only through the local node (give its --config or --socket): {e:#}")
        })?;
    if let Some(e) = reply.get("error").and_then(|e| e.as_str()) {
        return Err(format!("cannot reach the runner at {addr}: {e}"));
    }
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

/// Per step and stream, bytes until the end of a line.
#[derive(Default)]
struct Lines {
    partial: HashMap<(u32, bool), Vec<u8>>,
}

impl Lines {
    /// Emits every complete line in what arrived (without its newline);
    /// keeps the rest for the next chunk.
    fn push(&mut self, key: (u32, bool), data: &[u8], mut emit: impl FnMut(&[u8])) {
        let held = self.partial.entry(key).or_default();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data) {
            if held.is_empty() {
                emit(&data[start..end]);
            } else {
                held.extend_from_slice(&data[start..end]);
                emit(held);
                held.clear();
            }
            start = end + 1;
        }
        held.extend_from_slice(&data[start..]);
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

/// One output line with its step prefix (bytes that are not UTF-8 shown
/// as U+FFFD).
fn print_line(out: &mut impl Write, step: &str, line: &[u8]) {
    let _ = out.write_all(b"[");
    let _ = out.write_all(step.as_bytes());
    let _ = out.write_all(b"] ");
    let _ = match std::str::from_utf8(line) {
        Ok(_) => out.write_all(line),
        Err(_) => out.write_all(String::from_utf8_lossy(line).as_bytes()),
    };
    let _ = out.write_all(b"\n");
}

/// What the conversation with the runner needs besides the connection.
struct Session<'a> {
    pipeline: &'a Pipeline,
    /// The CI workspace `upload` paths are relative to.
    workspace: PathBuf,
    artifacts_dir: Option<PathBuf>,
}

/// Artifacts being unpacked as they arrive.
struct ArtifactSink {
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    task: tokio::task::JoinHandle<Result<Summary, ArchiveError>>,
    dir: PathBuf,
}

/// The one writer of the connection: control messages first, upload
/// chunks in between, `UploadDone` when the upload channel closes.
async fn write_frames(
    mut write: tokio::io::WriteHalf<Box<dyn ByteStream>>,
    mut control: mpsc::Receiver<Message>,
    mut upload: mpsc::Receiver<Vec<u8>>,
) -> anyhow::Result<()> {
    let mut uploading = true;
    loop {
        tokio::select! {
            biased;
            m = control.recv() => match m {
                Some(m) => write.write_all(&m.encode()?).await?,
                None => return Ok(()),
            },
            c = upload.recv(), if uploading => match c {
                Some(chunk) => write.write_all(&Message::UploadChunk(chunk).encode()?).await?,
                None => {
                    uploading = false;
                    write.write_all(&Message::UploadDone.encode()?).await?;
                }
            },
        }
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

async fn drive(
    stream: Box<dyn ByteStream>,
    submit: Submit,
    session: Session<'_>,
) -> anyhow::Result<ExitCode> {
    let pipeline = session.pipeline;
    let github = std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true");
    let (mut read, write) = tokio::io::split(stream);
    let (control, control_rx) = mpsc::channel::<Message>(4);
    let (upload_tx, upload_rx) = mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::spawn(write_frames(write, control_rx, upload_rx));
    control.send(Message::Submit(submit)).await?;
    // Held until the runner accepts: the upload starts only then.
    let mut upload_tx = Some(upload_tx);
    let mut upload: Option<tokio::task::JoinHandle<Result<Summary, ArchiveError>>> = None;
    let mut upload_failed = false;
    let mut artifacts: Option<ArtifactSink> = None;
    let mut artifacts_failed = false;
    let mut job_id = String::from("job");
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Lines::default();
    let mut cancelled = false;
    // Once the job runs, the runner speaks at least every HEARTBEAT; this
    // long without a word, it is gone (even when TCP has not noticed).
    let mut running = false;
    let mut last_word = tokio::time::Instant::now();
    // Buffered, and flushed after each batch of frames: live, without a
    // system call per line.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    loop {
        while let Some(msg) = reader.next_message()? {
            match msg {
                Message::Denied { reason } => {
                    writer.abort();
                    return fail(exit::REFUSED, format!("denied: {reason}"));
                }
                Message::Accepted { job_id: id } => {
                    job_id = id;
                    if let Some(tx) = upload_tx.take() {
                        if !pipeline.upload.is_empty() {
                            let (root, paths) =
                                (session.workspace.clone(), pipeline.upload.clone());
                            upload = Some(tokio::task::spawn_blocking(move || {
                                let mut sink = ChunkWriter::new(tx, MAX_CHUNK);
                                let summary = archive::pack(&root, &paths, false, &mut sink)?;
                                sink.finish().map_err(|source| ArchiveError::Io {
                                    path: root.clone(),
                                    source,
                                })?;
                                Ok(summary)
                            }));
                        }
                        // Without uploads the sender drops here: UploadDone.
                    }
                }
                Message::Queued { position } => {
                    let _ = writeln!(out, "queued (position {position})");
                }
                Message::Heartbeat => {}
                Message::Started { job_id: id, runner } => {
                    running = true;
                    job_id = id;
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
                        print_line(&mut out, &name, line)
                    });
                }
                Message::StepFinished {
                    index,
                    exit_code,
                    duration_ms,
                } => {
                    let name = step_name(pipeline, index);
                    lines.flush(index, |line| print_line(&mut out, &name, line));
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
                Message::ArtifactChunk(data) => {
                    if artifacts.is_none() && !artifacts_failed {
                        let dir = session.artifacts_dir.clone().unwrap_or_else(|| {
                            PathBuf::from("tern-artifacts").join(job_id.replace(['/', '\\'], "_"))
                        });
                        match std::fs::create_dir_all(&dir) {
                            Ok(()) => {
                                let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
                                let into = dir.clone();
                                let task = tokio::task::spawn_blocking(move || {
                                    archive::unpack(ChunkReader::new(rx), &into, TRANSFER_LIMITS)
                                });
                                artifacts = Some(ArtifactSink {
                                    chunks: Some(tx),
                                    task,
                                    dir,
                                });
                            }
                            Err(e) => {
                                eprintln!("tern run: artifacts: creating {}: {e}", dir.display());
                                artifacts_failed = true;
                            }
                        }
                    }
                    if let Some(sink) = artifacts.as_mut() {
                        if let Some(tx) = &sink.chunks {
                            // A refused archive stops the unpacker; its
                            // error is reported at ArtifactsDone.
                            if tx.send(data).await.is_err() {
                                sink.chunks = None;
                            }
                        }
                    }
                }
                Message::ArtifactsDone(summary) => {
                    let _ = out.flush();
                    if let Some(mut sink) = artifacts.take() {
                        sink.chunks = None;
                        match sink.task.await {
                            Ok(Ok(got)) => drop(writeln!(
                                out,
                                "artifacts: {} files, {} in {}",
                                got.files,
                                megabytes(got.bytes),
                                sink.dir.display()
                            )),
                            Ok(Err(e)) => {
                                eprintln!("tern run: artifacts refused: {e}");
                                artifacts_failed = true;
                            }
                            Err(e) => {
                                eprintln!("tern run: artifacts: {e}");
                                artifacts_failed = true;
                            }
                        }
                    }
                    for skipped in &summary.skipped {
                        eprintln!("tern run: artifact left out by the runner: {skipped}");
                    }
                    if let Some(e) = summary.error {
                        eprintln!("tern run: the runner could not pack the artifacts: {e}");
                        artifacts_failed = true;
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
                    let mut code = match result {
                        JobResult::Succeeded => exit::SUCCESS,
                        JobResult::Failed => u8::try_from(exit_code.clamp(1, 255)).unwrap_or(1),
                        JobResult::TimedOut => exit::TIMED_OUT,
                        JobResult::Cancelled if upload_failed => exit::BAD_PIPELINE,
                        JobResult::Cancelled => exit::CANCELLED,
                        JobResult::Error => exit::RUNNER_LOST,
                    };
                    if code == exit::SUCCESS && artifacts_failed {
                        code = exit::ARTIFACTS;
                    }
                    let _ = writeln!(
                        out,
                        "job {}: {result:?}",
                        if code == 0 { "passed" } else { "ended" }
                    );
                    let _ = out.flush();
                    writer.abort();
                    return Ok(ExitCode::from(code));
                }
                Message::Submit(_)
                | Message::UploadChunk(_)
                | Message::UploadDone
                | Message::Cancel => {
                    writer.abort();
                    return fail(exit::RUNNER_LOST, "the runner spoke out of turn");
                }
            }
        }
        let _ = out.flush();
        tokio::select! {
            n = read.read(&mut buf) => {
                match n {
                    Ok(0) | Err(_) => {
                        let code = if cancelled { exit::CANCELLED } else { exit::RUNNER_LOST };
                        return fail(code, "the runner went away before the job ended");
                    }
                    Ok(n) => {
                        last_word = tokio::time::Instant::now();
                        reader.push(&buf[..n]);
                    }
                }
            }
            _ = tokio::time::sleep_until(last_word + RUNNER_SILENCE), if running => {
                let code = if cancelled { exit::CANCELLED } else { exit::RUNNER_LOST };
                return fail(code, format!("no word from the runner for {} s: it is gone", RUNNER_SILENCE.as_secs()));
            }
            done = async {
                match upload.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if upload.is_some() => {
                upload = None;
                match done {
                    Ok(Ok(summary)) => {
                        let _ = writeln!(out, "uploaded {} files, {}", summary.files, megabytes(summary.bytes));
                        for skipped in &summary.skipped {
                            eprintln!("tern run: upload left out {skipped}");
                        }
                    }
                    Ok(Err(e)) => {
                        eprintln!("tern run: upload failed: {e}; cancelling the job");
                        upload_failed = true;
                        cancelled = true;
                        let _ = control.send(Message::Cancel).await;
                    }
                    Err(e) => anyhow::bail!("the upload task failed: {e}"),
                }
            }
            _ = sigint.recv(), if !cancelled => {
                cancelled = true;
                eprintln!("tern run: cancelling the job");
                let _ = control.send(Message::Cancel).await;
            }
            _ = sigterm.recv(), if !cancelled => {
                cancelled = true;
                eprintln!("tern run: cancelling the job");
                let _ = control.send(Message::Cancel).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut lines = Lines::default();
        let mut got = Vec::new();
        for c in chunks {
            lines.push((0, false), c, |l| got.push(l.to_vec()));
        }
        lines.flush(0, |l| got.push(l.to_vec()));
        got
    }

    #[test]
    fn lines_join_across_chunks_and_the_last_unterminated_one_is_kept() {
        assert_eq!(
            lines_of(&[b"a\nb", b"c", b"\n\nd"]),
            vec![b"a".to_vec(), b"bc".to_vec(), b"".to_vec(), b"d".to_vec()]
        );
        let mut out = Vec::new();
        print_line(&mut out, "build", b"ok \xff");
        assert_eq!(out, "[build] ok \u{fffd}\n".as_bytes());
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_lines(
            text in "[ab\n]{0,80}",
            cuts in proptest::collection::vec(0usize..80, 0..8),
        ) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&bytes[at..c]);
                at = c;
            }
            chunks.push(&bytes[at..]);
            let mut expected: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            if expected.last().is_some_and(|l| l.is_empty()) {
                expected.pop();
            }
            prop_assert_eq!(lines_of(&chunks), expected);
        }
    }
}
