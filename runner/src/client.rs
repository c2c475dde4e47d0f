//! `tern run`'s side of a job: submits the pipeline over a connection to a
//! runner (already greeted), sends the upload once the runner accepts,
//! shows the output live with step prefixes (grouped under GitHub
//! Actions), unpacks the artifacts, cancels on SIGINT/SIGTERM, and ends
//! with the job's exit code (`tern_shared::exit`).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use tern_shared::exit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::archive::{self, ArchiveError, ChunkReader, ChunkWriter, Summary};
use crate::pipeline::Pipeline;
use crate::protocol::{
    ArtifactsSummary, FrameReader, JobResult, Message, Stream, Submit, MAX_CHUNK, RUNNER_SILENCE,
};
use crate::server::TRANSFER_LIMITS;

/// Says why the job ended this way and gives its exit code.
fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("tern run: {message}");
    code
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
pub struct Session<'a> {
    pub pipeline: &'a Pipeline,
    /// The CI workspace `upload` paths are relative to.
    pub workspace: PathBuf,
    /// Where the artifacts land; default `./tern-artifacts/<job id>`.
    pub artifacts_dir: Option<PathBuf>,
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
    mut write: tokio::io::WriteHalf<Box<dyn crate::ByteStream>>,
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

/// The conversation's state on this side.
struct Client<'a> {
    session: Session<'a>,
    /// Buffered, and flushed after each batch of frames: live, without a
    /// system call per line.
    out: std::io::BufWriter<std::io::Stdout>,
    lines: Lines,
    github: bool,
    job_id: String,
    control: mpsc::Sender<Message>,
    /// Held until the runner accepts: the upload starts only then.
    upload_tx: Option<mpsc::Sender<Vec<u8>>>,
    upload: Option<tokio::task::JoinHandle<Result<Summary, ArchiveError>>>,
    upload_failed: bool,
    artifacts: Option<ArtifactSink>,
    artifacts_failed: bool,
    /// Once the job runs, the runner speaks at least every HEARTBEAT; this
    /// long without a word, it is gone (even when TCP has not noticed).
    running: bool,
    cancelled: bool,
}

/// Runs the job over `stream` and gives its exit code: 0 when every step
/// passed, a failing step's own code, or one of `tern_shared::exit`'s.
pub async fn drive(
    stream: Box<dyn crate::ByteStream>,
    submit: Submit,
    session: Session<'_>,
) -> anyhow::Result<u8> {
    let (mut read, write) = tokio::io::split(stream);
    let (control, control_rx) = mpsc::channel::<Message>(4);
    let (upload_tx, upload_rx) = mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::spawn(write_frames(write, control_rx, upload_rx));
    control.send(Message::Submit(submit)).await?;
    let mut client = Client {
        session,
        out: std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()),
        lines: Lines::default(),
        github: std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true"),
        job_id: String::from("job"),
        control,
        upload_tx: Some(upload_tx),
        upload: None,
        upload_failed: false,
        artifacts: None,
        artifacts_failed: false,
        running: false,
        cancelled: false,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_word = tokio::time::Instant::now();
    let code = 'job: loop {
        while let Some(msg) = reader.next_message()? {
            if let Some(code) = client.on_message(msg).await {
                break 'job code;
            }
        }
        let _ = client.out.flush();
        let gone = |client: &Client| {
            if client.cancelled {
                exit::CANCELLED
            } else {
                exit::RUNNER_LOST
            }
        };
        tokio::select! {
            n = read.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    break 'job fail(gone(&client), "the runner went away before the job ended");
                }
                Ok(n) => {
                    last_word = tokio::time::Instant::now();
                    reader.push(&buf[..n]);
                }
            },
            _ = tokio::time::sleep_until(last_word + RUNNER_SILENCE), if client.running => {
                break 'job fail(gone(&client), format!("no word from the runner for {} s: it is gone", RUNNER_SILENCE.as_secs()));
            }
            done = async {
                match client.upload.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if client.upload.is_some() => {
                client.upload = None;
                let done = done.map_err(|e| anyhow::anyhow!("the upload task failed: {e}"))?;
                client.uploaded(done).await;
            }
            _ = sigint.recv(), if !client.cancelled => client.cancel().await,
            _ = sigterm.recv(), if !client.cancelled => client.cancel().await,
        }
    };
    writer.abort();
    Ok(code)
}

impl Client<'_> {
    /// One message from the runner; the exit code when the job is over.
    async fn on_message(&mut self, msg: Message) -> Option<u8> {
        match msg {
            Message::Denied { reason } => {
                return Some(fail(exit::REFUSED, format!("denied: {reason}")))
            }
            Message::Accepted { job_id } => self.accepted(job_id),
            Message::Queued { position } => {
                let _ = writeln!(self.out, "queued (position {position})");
            }
            Message::Heartbeat => {}
            Message::Started { job_id, runner } => {
                self.running = true;
                self.job_id = job_id;
                let _ = writeln!(self.out, "job {} started on {runner}", self.job_id);
            }
            Message::StepStarted { name, .. } => {
                if self.github {
                    let _ = writeln!(self.out, "::group::{name}");
                }
                let _ = writeln!(self.out, "▶ {name}");
            }
            Message::Output {
                index,
                stream,
                data,
            } => {
                let name = step_name(self.session.pipeline, index);
                // Masked by the runner: secret values never travel back.
                let err = stream == Stream::Stderr;
                let out = &mut self.out;
                self.lines
                    .push((index, err), &data, |line| print_line(out, &name, line));
            }
            Message::StepFinished {
                index,
                exit_code,
                duration_ms,
            } => self.step_finished(index, exit_code, duration_ms),
            Message::ArtifactChunk(data) => self.artifact_chunk(data).await,
            Message::ArtifactsDone(summary) => self.artifacts_done(summary).await,
            Message::Finished {
                result,
                exit_code,
                message,
            } => return Some(self.finished(result, exit_code, message)),
            Message::Submit(_)
            | Message::UploadChunk(_)
            | Message::UploadDone
            | Message::Cancel => {
                return Some(fail(exit::RUNNER_LOST, "the runner spoke out of turn"));
            }
        }
        None
    }

    /// The runner took the job: the upload starts (without uploads the
    /// sender drops here, which sends UploadDone).
    fn accepted(&mut self, job_id: String) {
        self.job_id = job_id;
        let Some(tx) = self.upload_tx.take() else {
            return;
        };
        let pipeline = self.session.pipeline;
        if pipeline.upload.is_empty() {
            return;
        }
        let (root, paths) = (self.session.workspace.clone(), pipeline.upload.clone());
        self.upload = Some(tokio::task::spawn_blocking(move || {
            let mut sink = ChunkWriter::new(tx, MAX_CHUNK);
            let summary = archive::pack(&root, &paths, false, &mut sink)?;
            sink.finish().map_err(|source| ArchiveError::Io {
                path: root.clone(),
                source,
            })?;
            Ok(summary)
        }));
    }

    fn step_finished(&mut self, index: u32, exit_code: i32, duration_ms: u64) {
        let name = step_name(self.session.pipeline, index);
        let out = &mut self.out;
        self.lines.flush(index, |line| print_line(out, &name, line));
        let mark = if exit_code == 0 { "✓" } else { "✗" };
        let _ = writeln!(
            self.out,
            "{mark} {name} (exit {exit_code}, {:.1} s)",
            duration_ms as f64 / 1000.0
        );
        if self.github {
            let _ = writeln!(self.out, "::endgroup::");
        }
    }

    /// The upload ended: what went, or why not (which cancels the job).
    async fn uploaded(&mut self, done: Result<Summary, ArchiveError>) {
        match done {
            Ok(summary) => {
                let _ = writeln!(
                    self.out,
                    "uploaded {} files, {}",
                    summary.files,
                    megabytes(summary.bytes)
                );
                for skipped in &summary.skipped {
                    eprintln!("tern run: upload left out {skipped}");
                }
            }
            Err(e) => {
                eprintln!("tern run: upload failed: {e}; cancelling the job");
                self.upload_failed = true;
                self.cancelled = true;
                let _ = self.control.send(Message::Cancel).await;
            }
        }
    }

    async fn cancel(&mut self) {
        self.cancelled = true;
        eprintln!("tern run: cancelling the job");
        let _ = self.control.send(Message::Cancel).await;
    }

    /// A piece of the artifacts' archive: unpacked as it arrives, into the
    /// artifacts directory made at the first piece.
    async fn artifact_chunk(&mut self, data: Vec<u8>) {
        if self.artifacts.is_none() && !self.artifacts_failed {
            let dir = self.session.artifacts_dir.clone().unwrap_or_else(|| {
                PathBuf::from("tern-artifacts").join(self.job_id.replace(['/', '\\'], "_"))
            });
            match std::fs::create_dir_all(&dir) {
                Ok(()) => {
                    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
                    let into = dir.clone();
                    let task = tokio::task::spawn_blocking(move || {
                        archive::unpack(ChunkReader::new(rx), &into, TRANSFER_LIMITS)
                    });
                    self.artifacts = Some(ArtifactSink {
                        chunks: Some(tx),
                        task,
                        dir,
                    });
                }
                Err(e) => {
                    eprintln!("tern run: artifacts: creating {}: {e}", dir.display());
                    self.artifacts_failed = true;
                }
            }
        }
        if let Some(sink) = self.artifacts.as_mut() {
            if let Some(tx) = &sink.chunks {
                // A refused archive stops the unpacker; its error is
                // reported at ArtifactsDone.
                if tx.send(data).await.is_err() {
                    sink.chunks = None;
                }
            }
        }
    }

    async fn artifacts_done(&mut self, summary: ArtifactsSummary) {
        let _ = self.out.flush();
        if let Some(mut sink) = self.artifacts.take() {
            sink.chunks = None;
            match sink.task.await {
                Ok(Ok(got)) => drop(writeln!(
                    self.out,
                    "artifacts: {} files, {} in {}",
                    got.files,
                    megabytes(got.bytes),
                    sink.dir.display()
                )),
                Ok(Err(e)) => {
                    eprintln!("tern run: artifacts refused: {e}");
                    self.artifacts_failed = true;
                }
                Err(e) => {
                    eprintln!("tern run: artifacts: {e}");
                    self.artifacts_failed = true;
                }
            }
        }
        for skipped in &summary.skipped {
            eprintln!("tern run: artifact left out by the runner: {skipped}");
        }
        if let Some(e) = summary.error {
            eprintln!("tern run: the runner could not pack the artifacts: {e}");
            self.artifacts_failed = true;
        }
    }

    /// The job's end: its exit code.
    fn finished(&mut self, result: JobResult, exit_code: i32, message: Option<String>) -> u8 {
        if let Some(m) = message {
            eprintln!("tern run: {m}");
        }
        let mut code = match result {
            JobResult::Succeeded => exit::SUCCESS,
            JobResult::Failed => u8::try_from(exit_code.clamp(1, 255)).unwrap_or(1),
            JobResult::TimedOut => exit::TIMED_OUT,
            JobResult::Cancelled if self.upload_failed => exit::BAD_PIPELINE,
            JobResult::Cancelled => exit::CANCELLED,
            JobResult::Error => exit::RUNNER_LOST,
        };
        if code == exit::SUCCESS && self.artifacts_failed {
            code = exit::ARTIFACTS;
        }
        let _ = writeln!(
            self.out,
            "job {}: {result:?}",
            if code == 0 { "passed" } else { "ended" }
        );
        let _ = self.out.flush();
        code
    }
}

fn step_name(pipeline: &Pipeline, index: u32) -> String {
    pipeline
        .steps
        .get(index as usize)
        .map_or_else(|| format!("step {index}"), |s| s.name.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
