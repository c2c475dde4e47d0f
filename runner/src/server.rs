//! The runner service: a TCP listener on the node's overlay address
//! ([`RUNNER_PORT`]). A caller is known by the verified certificate its
//! connection's overlay source address belongs to (asked of the event loop,
//! which owns the mesh), authorized by group, queued, and its job run and
//! streamed back. One task owns the queue.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::pipeline::Pipeline;
use crate::protocol::{
    check_greeting, FrameReader, JobResult, Message, CALLER_GREETING, GREETING_LEN,
    GREETING_TIMEOUT, RUNNER_GREETING, RUNNER_PORT,
};
use anyhow::Context;
use tern_shared::config::RunnerConfig;
use tern_shared::control::{RecentJob, RunnerLoad};

use crate::recent::RecentJobs;
use tern_shared::show::list;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::archive::{self, ChunkReader, Limits};
use crate::job::{append_audit, pipeline_sha256, run_job, AuditRecord, JobSpec, Transfer};
use crate::metrics::JobMetrics;
use crate::scheduler::{authorize, Admission, Caller, JobId, Scheduler};
use crate::step::KILL_GRACE;

/// A connection to the runner and the address it came from.
pub type Incoming = (Box<dyn crate::ByteStream>, SocketAddr);

/// Where the runner's connections come from.
pub enum Listener {
    /// A TCP listener on the overlay address (TUN mode).
    Kernel,
    /// Connections handed over by the node (its userspace stack's, to the
    /// runner's port).
    Streams(mpsc::Receiver<Incoming>),
}

enum Accept {
    Kernel(TcpListener),
    Streams(mpsc::Receiver<Incoming>),
}

/// "Who is this overlay address?", answered by the event loop from the mesh.
pub type IdentityQuery = (Ipv4Addr, oneshot::Sender<Option<Caller>>);

/// Most bytes of queued messages the runner writes to a caller at once.
const WRITE_BATCH: usize = 256 * 1024;

/// Largest submission (the pipeline, env and secrets).
const MAX_SUBMIT: usize = 1 << 20;

/// Bounds on an upload unpacked here, and on artifacts unpacked by
/// `tern run`: 4 GiB of file content, a million entries.
pub const TRANSFER_LIMITS: Limits = Limits {
    max_bytes: 4 << 30,
    max_entries: 1_000_000,
};

enum QueueEvent {
    Submit {
        reply: oneshot::Sender<(JobId, Admission, watch::Receiver<u32>)>,
    },
    Done(JobId),
}

/// Starts the runner: binds `overlay_ip:RUNNER_PORT` and serves until the
/// returned task is aborted. The receiver follows its load, for the
/// lighthouses.
pub async fn start(
    config: RunnerConfig,
    name: String,
    overlay_ip: Ipv4Addr,
    identities: mpsc::Sender<IdentityQuery>,
    listener: Listener,
) -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    watch::Receiver<RunnerLoad>,
    JobMetrics,
    watch::Receiver<Vec<RecentJob>>,
)> {
    let addr = SocketAddr::new(IpAddr::V4(overlay_ip), RUNNER_PORT);
    let mut listener = match listener {
        Listener::Kernel => Accept::Kernel(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the runner on {addr}"))?,
        ),
        Listener::Streams(conns) => Accept::Streams(conns),
    };
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating [runner] work_dir {}", config.work_dir.display()))?;
    tracing::info!(%addr, labels = %list(&config.labels), allow_groups = %list(&config.allow_groups), concurrency = config.concurrency, "runner up");
    let (queue_tx, queue_rx) = mpsc::channel::<QueueEvent>(64);
    let (load_tx, load_rx) = watch::channel(load(&Scheduler::new(config.concurrency)));
    tokio::spawn(queue_owner(config.concurrency, queue_rx, load_tx));
    let config = std::sync::Arc::new(config);
    let job_metrics = JobMetrics::new().context("the runner's metrics")?;
    let (recent, recent_rx) = RecentJobs::new();
    let reports = Reports {
        metrics: job_metrics.clone(),
        recent,
    };
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer): Incoming = match &mut listener {
                Accept::Kernel(l) => {
                    let Ok((stream, peer)) = l.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    // A caller that vanishes is noticed, and its job
                    // cancelled, in seconds.
                    keepalive(&stream);
                    (Box::new(stream), peer)
                }
                // The stack's connections keep themselves alive the same way.
                Accept::Streams(conns) => match conns.recv().await {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let config = config.clone();
            let identities = identities.clone();
            let queue = queue_tx.clone();
            let name = name.clone();
            let reports = reports.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(stream, peer, config, identities, queue, name, reports).await
                {
                    tracing::debug!(%peer, error = %e, "runner connection ended");
                }
            });
        }
    });
    Ok((task, load_rx, job_metrics, recent_rx))
}

fn load(scheduler: &Scheduler) -> RunnerLoad {
    let clamp = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    RunnerLoad {
        running: clamp(scheduler.running()),
        queued: clamp(scheduler.waiting()),
        concurrency: clamp(scheduler.concurrency()),
    }
}

/// The one owner of the queue: admits jobs and tells waiting ones their
/// position (and when to start: position 0).
async fn queue_owner(
    concurrency: u32,
    mut events: mpsc::Receiver<QueueEvent>,
    load_tx: watch::Sender<RunnerLoad>,
) {
    let mut scheduler = Scheduler::new(concurrency);
    let mut positions: HashMap<JobId, watch::Sender<u32>> = HashMap::new();
    while let Some(event) = events.recv().await {
        match event {
            QueueEvent::Submit { reply } => {
                let (id, admission) = scheduler.submit();
                let start = match admission {
                    Admission::Start => 0,
                    Admission::Queued { position } => position,
                };
                let (tx, rx) = watch::channel(start);
                positions.insert(id, tx);
                let _ = reply.send((id, admission, rx));
            }
            QueueEvent::Done(id) => {
                positions.remove(&id);
                for started in scheduler.done(id) {
                    if let Some(tx) = positions.get(&started) {
                        let _ = tx.send(0);
                    }
                }
                for (waiting, position) in scheduler.positions() {
                    if let Some(tx) = positions.get(&waiting) {
                        let _ = tx.send(position);
                    }
                }
            }
        }
        load_tx.send_if_modified(|old| {
            let new = load(&scheduler);
            std::mem::replace(old, new) != new
        });
    }
}

async fn send(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &Message,
) -> anyhow::Result<()> {
    let bytes = msg.encode()?;
    stream.write_all(&bytes).await?;
    Ok(())
}

type CallerRead = tokio::io::ReadHalf<Box<dyn crate::ByteStream>>;
type CallerWrite = tokio::io::WriteHalf<Box<dyn crate::ByteStream>>;

/// One caller's connection: greetings, who it is, its submission, the
/// runner's decision, its place in the queue, the upload, the job.
async fn serve(
    stream: Box<dyn crate::ByteStream>,
    peer: SocketAddr,
    config: std::sync::Arc<RunnerConfig>,
    identities: mpsc::Sender<IdentityQuery>,
    queue: mpsc::Sender<QueueEvent>,
    runner_name: String,
    reports: Reports,
) -> anyhow::Result<()> {
    let metrics = &reports.metrics;
    let (mut read, mut write) = tokio::io::split(stream);
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (ip, caller, submit) = greet_and_submission(
        &mut read,
        &mut write,
        peer,
        &identities,
        &mut reader,
        &mut buf,
    )
    .await?;
    let Some((caller, pipeline)) = admit(&config, ip, caller, &submit, &mut write).await? else {
        metrics.refused();
        return Ok(());
    };
    // Accepted: a place in the queue, a job id, a workspace.
    let (reply_tx, reply_rx) = oneshot::channel();
    queue
        .send(QueueEvent::Submit { reply: reply_tx })
        .await
        .ok();
    let (id, _admission, position) = reply_rx.await.context("the runner's queue is gone")?;
    let done = DoneGuard {
        id,
        queue: queue.clone(),
    };
    let job_id = format!("{runner_name}-{}-{id}", std::process::id());
    let workspace = config.work_dir.join(&job_id);
    let _workspace_guard = WorkspaceGuard {
        path: workspace.clone(),
        keep: config.keep_workspaces,
    };
    std::fs::create_dir_all(&workspace)
        .with_context(|| format!("creating the workspace {}", workspace.display()))?;
    let listed = reports
        .recent
        .accepted(&job_id, &caller.name, &pipeline.name, unix_secs());
    send(
        &mut write,
        &Message::Accepted {
            job_id: job_id.clone(),
        },
    )
    .await?;
    // From here one task reads the caller: the upload, Cancel, or its leaving.
    let (cancel_tx, mut cancel_rx) = watch::channel(false);
    let (chunks_tx, chunks_rx) = mpsc::channel::<Vec<u8>>(8);
    let unpacking = (!pipeline.upload.is_empty()).then(|| {
        let into = workspace.clone();
        tokio::task::spawn_blocking(move || {
            archive::unpack(ChunkReader::new(chunks_rx), &into, TRANSFER_LIMITS)
        })
    });
    let _watcher = AbortOnDrop(tokio::spawn(watch_caller(
        read, reader, buf, chunks_tx, cancel_tx,
    )));
    if !wait_for_turn(position, &mut cancel_rx, &mut write).await? {
        return Ok(()); // the caller left or cancelled while waiting
    }
    let limit = pipeline.timeout.min(config.max_job_duration);
    let (upload_error, uploaded) = match unpacking {
        Some(unpacking) => wait_for_upload(unpacking, limit, &mut cancel_rx).await,
        None => (None, None),
    };
    listed.started(unix_secs());
    send(
        &mut write,
        &Message::Started {
            job_id: job_id.clone(),
            runner: runner_name.clone(),
        },
    )
    .await?;
    let (msg_tx, msg_rx) = mpsc::channel::<Message>(256);
    let extra_env: BTreeMap<String, String> = submit.env;
    let secrets: BTreeMap<String, String> = submit.secrets;
    let work_dir: PathBuf = config.work_dir.clone();
    let job = JobSpec {
        id: &job_id,
        runner: &runner_name,
        caller: &caller,
        pipeline: &pipeline,
        extra_env: &extra_env,
        secrets: &secrets,
        work_dir: &work_dir,
        max_duration: config.max_job_duration,
        keep_workspace: config.keep_workspaces,
        grace: KILL_GRACE,
        upload_error,
        uploaded,
    };
    // Alive, every few seconds, for as long as the job runs.
    let heartbeat = {
        let tx = msg_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::protocol::HEARTBEAT).await;
                if tx.send(Message::Heartbeat).await.is_err() {
                    break;
                }
            }
        })
    };
    let job = async {
        let record = run_job(job, msg_tx, cancel_rx).await;
        heartbeat.abort();
        record
    };
    let (record, ()) = tokio::join!(job, write_messages(&mut write, msg_rx));
    metrics.ended(&record);
    listed.ended(&record.result, record.exit_code, unix_secs());
    if let Err(e) = append_audit(&config.audit_log, &record) {
        tracing::error!(error = %e, path = %config.audit_log.display(), "audit log write failed");
    }
    tracing::info!(job = %job_id, caller = %caller.name, result = ?record.result, "job ended");
    drop(done);
    Ok(())
}

/// What a connection reports to: the metrics, and the newest jobs.
#[derive(Clone)]
struct Reports {
    metrics: JobMetrics,
    recent: RecentJobs,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Greetings first (a caller that does not speak the job protocol gets
/// nothing from us and is read no further), then who is calling (only a
/// peer's own overlay address names a peer), then its submission.
async fn greet_and_submission(
    read: &mut CallerRead,
    write: &mut CallerWrite,
    peer: SocketAddr,
    identities: &mpsc::Sender<IdentityQuery>,
    reader: &mut FrameReader,
    buf: &mut [u8],
) -> anyhow::Result<(Ipv4Addr, Option<Caller>, crate::protocol::Submit)> {
    let mut greeting = [0u8; GREETING_LEN];
    tokio::time::timeout(GREETING_TIMEOUT, read.read_exact(&mut greeting))
        .await
        .context("no greeting from the caller")??;
    if let Err(e) = check_greeting(&greeting, CALLER_GREETING) {
        anyhow::bail!("the caller's greeting: {e}");
    }
    write.write_all(RUNNER_GREETING).await?;
    let IpAddr::V4(ip) = peer.ip() else {
        anyhow::bail!("not an IPv4 overlay address");
    };
    let (tx, rx) = oneshot::channel();
    identities.send((ip, tx)).await.ok();
    let caller = rx.await.ok().flatten();
    let submit = loop {
        if let Some(m) = reader.next_message()? {
            break m;
        }
        if reader.pending() > MAX_SUBMIT {
            anyhow::bail!("submission too large");
        }
        let n = tokio::time::timeout(Duration::from_secs(30), read.read(buf)).await??;
        if n == 0 {
            anyhow::bail!("caller left before submitting");
        }
        reader.push(&buf[..n]);
    };
    let Message::Submit(submit) = submit else {
        anyhow::bail!("the first message was not a submission");
    };
    Ok((ip, caller, submit))
}

/// The runner's decision on a submission: a caller from the mesh, a
/// pipeline that parses and holds, a caller the runner allows (refusals
/// are audited). `None` once the caller was told why not.
async fn admit(
    config: &RunnerConfig,
    ip: Ipv4Addr,
    caller: Option<Caller>,
    submit: &crate::protocol::Submit,
    write: &mut CallerWrite,
) -> anyhow::Result<Option<(Caller, Pipeline)>> {
    let Some(caller) = caller else {
        let why = format!("{ip} is not a peer of this runner's mesh");
        send(write, &Message::Denied { reason: why }).await?;
        return Ok(None);
    };
    let pipeline: Pipeline = match serde_json::from_value(submit.pipeline.clone()) {
        Ok(p) => p,
        Err(e) => {
            let why = format!("the pipeline does not parse: {e}");
            send(write, &Message::Denied { reason: why }).await?;
            return Ok(None);
        }
    };
    if let Err(e) = pipeline.validate() {
        send(
            write,
            &Message::Denied {
                reason: e.to_string(),
            },
        )
        .await?;
        return Ok(None);
    }
    if let Err(why) = authorize(config, &caller).map_err(|e| e.to_string()) {
        tracing::warn!(caller = %caller.name, "runner refused: {why}");
        let record = AuditRecord {
            job_id: String::new(),
            caller,
            pipeline: pipeline.name.clone(),
            pipeline_sha256: pipeline_sha256(&pipeline),
            steps: Vec::new(),
            started_unix_ms: 0,
            ended_unix_ms: 0,
            result: JobResult::Error,
            exit_code: i32::from(tern_shared::exit::REFUSED),
            message: Some(why.clone()),
            upload: None,
            artifacts: None,
        };
        if let Err(e) = append_audit(&config.audit_log, &record) {
            tracing::error!(error = %e, path = %config.audit_log.display(), "audit log write failed");
        }
        send(write, &Message::Denied { reason: why }).await?;
        return Ok(None);
    }
    Ok(Some((caller, pipeline)))
}

/// Reads the caller for as long as the job lives: upload chunks to the
/// unpacker, Cancel, or its leaving (which cancels whatever runs or waits).
async fn watch_caller(
    mut read: CallerRead,
    mut reader: FrameReader,
    mut buf: Vec<u8>,
    chunks_tx: mpsc::Sender<Vec<u8>>,
    cancel_tx: watch::Sender<bool>,
) {
    let mut chunks = Some(chunks_tx);
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => reader.push(&buf[..n]),
        }
        loop {
            match reader.next_message() {
                Ok(Some(Message::UploadChunk(data))) => {
                    // A refused or finished unpack drops the rest.
                    if let Some(tx) = &chunks {
                        if tx.send(data).await.is_err() {
                            chunks = None;
                        }
                    }
                }
                Ok(Some(Message::UploadDone)) => chunks = None,
                Ok(Some(Message::Cancel)) => {
                    let _ = cancel_tx.send(true);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "bad frame from the caller; cancelling");
                    let _ = cancel_tx.send(true);
                    return;
                }
            }
        }
    }
    let _ = cancel_tx.send(true);
}

/// Waits for the job's turn, telling the caller its place. False when the
/// caller left or cancelled meanwhile.
async fn wait_for_turn(
    mut position: watch::Receiver<u32>,
    cancel_rx: &mut watch::Receiver<bool>,
    write: &mut CallerWrite,
) -> anyhow::Result<bool> {
    loop {
        let p = *position.borrow_and_update();
        if p == 0 {
            return Ok(true);
        }
        send(write, &Message::Queued { position: p }).await?;
        tokio::select! {
            changed = position.changed() => changed?,
            _ = cancel_rx.wait_for(|c| *c) => return Ok(false),
        }
    }
}

/// The upload must be complete before the first step: the unpacker ends
/// at the archive's end (or refuses it); a caller that stalls gets the
/// job's whole time limit, no more. Why it failed, or what came.
async fn wait_for_upload(
    mut unpacking: tokio::task::JoinHandle<Result<archive::Summary, archive::ArchiveError>>,
    limit: Duration,
    cancel_rx: &mut watch::Receiver<bool>,
) -> (Option<String>, Option<Transfer>) {
    tokio::select! {
        done = &mut unpacking => match done {
            Ok(Ok(summary)) => (
                None,
                Some(Transfer {
                    files: summary.files,
                    bytes: summary.bytes,
                }),
            ),
            Ok(Err(e)) => (Some(format!("the upload was refused: {e}")), None),
            Err(e) => (Some(format!("the upload failed: {e}")), None),
        },
        _ = cancel_rx.wait_for(|c| *c) => (None, None),
        _ = tokio::time::sleep(limit) => (
            Some(format!("the upload did not finish within {} s", limit.as_secs())),
            None,
        ),
    }
}

/// The job's messages to the caller: whatever is queued goes out in one
/// write (fewer, fuller segments through the tunnel when a step prints
/// fast, no delay when it does not).
async fn write_messages(write: &mut CallerWrite, mut msg_rx: mpsc::Receiver<Message>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(m) = msg_rx.recv().await {
        batch.clear();
        let mut next = Some(m);
        while let Some(m) = next.take() {
            if let Err(e) = m.encode_into(&mut batch) {
                tracing::error!(error = %e, "job message did not encode");
            }
            if batch.len() < WRITE_BATCH {
                next = msg_rx.try_recv().ok();
            }
        }
        if write.write_all(&batch).await.is_err() {
            // The caller is gone; the watcher cancels the job.
            while msg_rx.recv().await.is_some() {}
            break;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes a job's workspace however its connection ends (unless
/// `keep_workspaces`).
struct WorkspaceGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkspaceGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// TCP keepalive every second after a second of silence, given up after 3
/// unanswered: a runner that vanishes (its daemon, and with it the tunnel,
/// gone) cannot say goodbye, so this is how its loss is noticed within
/// seconds even while a step prints nothing.
pub fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// Frees the job's place in the queue however the connection ends.
struct DoneGuard {
    id: JobId,
    queue: mpsc::Sender<QueueEvent>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let queue = self.queue.clone();
        let id = self.id;
        tokio::spawn(async move {
            let _ = queue.send(QueueEvent::Done(id)).await;
        });
    }
}
