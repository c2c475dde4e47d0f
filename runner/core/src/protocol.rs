//! The runner's job protocol: what `tern run` and a runner say to each other
//! over one TCP connection across the mesh. Sans-IO: frames are built and
//! parsed from bytes; the shells own the sockets.
//!
//! A frame is `length (u32, big-endian) | type (u8) | payload`, the length
//! counting type and payload, at most [`MAX_FRAME`]. Output and file chunks
//! carry raw bytes; everything else carries JSON.
//!
//! The conversation opens with greetings, fixed lines that name the
//! protocol and its version ([`CALLER_GREETING`], [`RUNNER_GREETING`]):
//! the caller sends nothing of the job, let alone a secret, and trusts no
//! frame length, before the other end has shown it is a Tern runner.
//!
//! ```text
//! client                                  runner
//! "TERN-JOB/1 CALL\n"               ──▶
//!                                  ◀──    "TERN-JOB/1 HERE\n"
//! Submit {pipeline, env, secrets}  ──▶
//!                                  ◀──    Denied {reason}            (and closes)
//!                                  ◀──    Accepted {job_id}
//! UploadChunk* UploadDone          ──▶    (a tar stream, unpacked into the
//!                                          job's workspace while it waits)
//!                                  ◀──    Queued {position}*         (while waiting)
//!                                  ◀──    Started {job_id, runner}
//!                                  ◀──    StepStarted / Output* / StepFinished, per step
//!                                  ◀──    ArtifactChunk* ArtifactsDone {summary}
//!                                          (only when the pipeline lists artifacts)
//!                                  ◀──    Finished {result, exit_code}
//! Cancel (any time)                ──▶
//! ```
//!
//! Uploads and artifacts are tar streams (`tern::io::archive` packs and
//! unpacks them; neither side ever writes outside its directory).
//!
//! Secrets are masked by the runner before output leaves it ([`Masker`]):
//! their values never travel back, nor reach the audit log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest frame (type and payload).
pub const MAX_FRAME: usize = 1 << 20;

/// Largest raw chunk (output, upload, artifact) a sender puts in one frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// How often a runner says it is alive while a job runs.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long `tern run` waits for any word from a running job's runner.
pub const RUNNER_SILENCE: std::time::Duration = std::time::Duration::from_secs(7);

/// The TCP port runners listen on, on their overlay address.
pub const RUNNER_PORT: u16 = 4245;

/// What a caller sends first: the protocol and its version.
pub const CALLER_GREETING: &[u8; GREETING_LEN] = b"TERN-JOB/1 CALL\n";
/// What a runner answers before anything else is sent.
pub const RUNNER_GREETING: &[u8; GREETING_LEN] = b"TERN-JOB/1 HERE\n";
/// Both greetings' length.
pub const GREETING_LEN: usize = 16;
/// How long either side waits for the other's greeting.
pub const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the other end's greeting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GreetingError {
    #[error("it speaks Tern's job protocol {0}, not TERN-JOB/1; run the same Tern release on both sides")]
    Version(String),
    #[error(
        "it is not a Tern runner: it answered {0:?} (is another service listening on this port?)"
    )]
    NotTern(String),
    #[error("it closed the connection after {0:?} without greeting like a Tern runner")]
    Closed(String),
}

/// Checks the greeting `got` (what arrived, up to [`GREETING_LEN`] bytes;
/// fewer if the other end closed) against `expected`.
pub fn check_greeting(got: &[u8], expected: &[u8; GREETING_LEN]) -> Result<(), GreetingError> {
    if got == expected {
        return Ok(());
    }
    let shown: String = String::from_utf8_lossy(got)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string();
    let role = &expected[GREETING_LEN - 5..];
    if got.len() == GREETING_LEN && got.starts_with(b"TERN-JOB/") && got.ends_with(role) {
        let version = shown.split(' ').next().unwrap_or_default().to_string();
        return Err(GreetingError::Version(version));
    }
    if got.len() < GREETING_LEN {
        return Err(GreetingError::Closed(shown));
    }
    Err(GreetingError::NotTern(shown))
}

/// Which of a step's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobResult {
    Succeeded,
    /// A step failed; `exit_code` is its exit code.
    Failed,
    TimedOut,
    Cancelled,
    /// The runner could not run it (workspace, spawn): see the message.
    Error,
}

/// What the runner packed as artifacts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsSummary {
    pub files: u64,
    pub bytes: u64,
    /// Entries left out (missing, or links pointing outside), with why.
    pub skipped: Vec<String>,
    /// Packing stopped with this error; what arrived may be incomplete.
    pub error: Option<String>,
}

/// What the client sends first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    /// The pipeline, as parsed and validated by the client (the runner
    /// validates it again).
    pub pipeline: serde_json::Value,
    /// `--env K=V`, added to the pipeline's env.
    pub env: BTreeMap<String, String>,
    /// `--secret NAME`: the values, sent only as environment to the job.
    pub secrets: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    // Client → runner.
    Submit(Submit),
    UploadChunk(Vec<u8>),
    UploadDone,
    Cancel,
    // Runner → client.
    Denied {
        reason: String,
    },
    /// Authorized: the upload may follow.
    Accepted {
        job_id: String,
    },
    Queued {
        position: u32,
    },
    Started {
        job_id: String,
        runner: String,
    },
    StepStarted {
        index: u32,
        name: String,
    },
    Output {
        index: u32,
        stream: Stream,
        data: Vec<u8>,
    },
    StepFinished {
        index: u32,
        exit_code: i32,
        duration_ms: u64,
    },
    ArtifactChunk(Vec<u8>),
    ArtifactsDone(ArtifactsSummary),
    /// Runner → client, every [`HEARTBEAT`] while a job runs: a silence of
    /// [`RUNNER_SILENCE`] means the runner is gone, whatever TCP says.
    Heartbeat,
    Finished {
        result: JobResult,
        exit_code: i32,
        message: Option<String>,
    },
}

const T_SUBMIT: u8 = 1;
const T_UPLOAD_CHUNK: u8 = 2;
const T_UPLOAD_DONE: u8 = 3;
const T_CANCEL: u8 = 4;
const T_DENIED: u8 = 10;
const T_QUEUED: u8 = 11;
const T_STARTED: u8 = 12;
const T_STEP_STARTED: u8 = 13;
const T_OUTPUT: u8 = 14;
const T_STEP_FINISHED: u8 = 15;
const T_ARTIFACT_CHUNK: u8 = 16;
const T_ARTIFACTS_DONE: u8 = 17;
const T_FINISHED: u8 = 18;
const T_ACCEPTED: u8 = 19;
const T_HEARTBEAT: u8 = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {what} frame: {detail}")]
    Malformed { what: &'static str, detail: String },
}

fn malformed(what: &'static str, detail: impl ToString) -> JobError {
    JobError::Malformed {
        what,
        detail: detail.to_string(),
    }
}

#[derive(Serialize, Deserialize)]
struct DeniedBody {
    reason: String,
}
#[derive(Serialize, Deserialize)]
struct QueuedBody {
    position: u32,
}
#[derive(Serialize, Deserialize)]
struct AcceptedBody {
    job_id: String,
}
#[derive(Serialize, Deserialize)]
struct StartedBody {
    job_id: String,
    runner: String,
}
#[derive(Serialize, Deserialize)]
struct StepStartedBody {
    index: u32,
    name: String,
}
#[derive(Serialize, Deserialize)]
struct StepFinishedBody {
    index: u32,
    exit_code: i32,
    duration_ms: u64,
}
#[derive(Serialize, Deserialize)]
struct FinishedBody {
    result: JobResult,
    exit_code: i32,
    message: Option<String>,
}

impl Message {
    /// The frame for this message, appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), JobError> {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let json = |out: &mut Vec<u8>, ty: u8, v: &dyn erased::Json| -> Result<(), JobError> {
            out.push(ty);
            v.write(out).map_err(|e| malformed("outgoing", e))
        };
        match self {
            Message::Submit(s) => json(out, T_SUBMIT, s)?,
            Message::UploadChunk(d) => {
                out.push(T_UPLOAD_CHUNK);
                out.extend_from_slice(d);
            }
            Message::UploadDone => out.push(T_UPLOAD_DONE),
            Message::Cancel => out.push(T_CANCEL),
            Message::Denied { reason } => json(
                out,
                T_DENIED,
                &DeniedBody {
                    reason: reason.clone(),
                },
            )?,
            Message::Queued { position } => json(
                out,
                T_QUEUED,
                &QueuedBody {
                    position: *position,
                },
            )?,
            Message::Started { job_id, runner } => json(
                out,
                T_STARTED,
                &StartedBody {
                    job_id: job_id.clone(),
                    runner: runner.clone(),
                },
            )?,
            Message::StepStarted { index, name } => json(
                out,
                T_STEP_STARTED,
                &StepStartedBody {
                    index: *index,
                    name: name.clone(),
                },
            )?,
            Message::Output {
                index,
                stream,
                data,
            } => {
                out.push(T_OUTPUT);
                out.extend_from_slice(&index.to_be_bytes());
                out.push(match stream {
                    Stream::Stdout => 1,
                    Stream::Stderr => 2,
                });
                out.extend_from_slice(data);
            }
            Message::StepFinished {
                index,
                exit_code,
                duration_ms,
            } => json(
                out,
                T_STEP_FINISHED,
                &StepFinishedBody {
                    index: *index,
                    exit_code: *exit_code,
                    duration_ms: *duration_ms,
                },
            )?,
            Message::ArtifactChunk(d) => {
                out.push(T_ARTIFACT_CHUNK);
                out.extend_from_slice(d);
            }
            Message::ArtifactsDone(summary) => json(out, T_ARTIFACTS_DONE, summary)?,
            Message::Heartbeat => out.push(T_HEARTBEAT),
            Message::Accepted { job_id } => json(
                out,
                T_ACCEPTED,
                &AcceptedBody {
                    job_id: job_id.clone(),
                },
            )?,
            Message::Finished {
                result,
                exit_code,
                message,
            } => json(
                out,
                T_FINISHED,
                &FinishedBody {
                    result: *result,
                    exit_code: *exit_code,
                    message: message.clone(),
                },
            )?,
        }
        let len = out.len() - start - 4;
        if len > MAX_FRAME {
            out.truncate(start);
            return Err(JobError::TooLarge(len));
        }
        out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, JobError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Parses one frame's type and payload (without the length prefix).
    pub fn decode(frame: &[u8]) -> Result<Message, JobError> {
        let Some((&ty, body)) = frame.split_first() else {
            return Err(JobError::Empty);
        };
        fn json<T: for<'de> Deserialize<'de>>(
            what: &'static str,
            body: &[u8],
        ) -> Result<T, JobError> {
            serde_json::from_slice(body).map_err(|e| malformed(what, e))
        }
        let no_body = |what: &'static str, m: Message| {
            if body.is_empty() {
                Ok(m)
            } else {
                Err(malformed(what, "unexpected payload"))
            }
        };
        Ok(match ty {
            T_SUBMIT => Message::Submit(json("submit", body)?),
            T_UPLOAD_CHUNK => Message::UploadChunk(body.to_vec()),
            T_UPLOAD_DONE => no_body("upload-done", Message::UploadDone)?,
            T_CANCEL => no_body("cancel", Message::Cancel)?,
            T_DENIED => {
                let b: DeniedBody = json("denied", body)?;
                Message::Denied { reason: b.reason }
            }
            T_QUEUED => {
                let b: QueuedBody = json("queued", body)?;
                Message::Queued {
                    position: b.position,
                }
            }
            T_STARTED => {
                let b: StartedBody = json("started", body)?;
                Message::Started {
                    job_id: b.job_id,
                    runner: b.runner,
                }
            }
            T_STEP_STARTED => {
                let b: StepStartedBody = json("step-started", body)?;
                Message::StepStarted {
                    index: b.index,
                    name: b.name,
                }
            }
            T_OUTPUT => {
                if body.len() < 5 {
                    return Err(malformed("output", "shorter than its header"));
                }
                let index = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let stream = match body[4] {
                    1 => Stream::Stdout,
                    2 => Stream::Stderr,
                    other => return Err(malformed("output", format!("stream {other}"))),
                };
                Message::Output {
                    index,
                    stream,
                    data: body[5..].to_vec(),
                }
            }
            T_STEP_FINISHED => {
                let b: StepFinishedBody = json("step-finished", body)?;
                Message::StepFinished {
                    index: b.index,
                    exit_code: b.exit_code,
                    duration_ms: b.duration_ms,
                }
            }
            T_ARTIFACT_CHUNK => Message::ArtifactChunk(body.to_vec()),
            T_ARTIFACTS_DONE => Message::ArtifactsDone(json("artifacts-done", body)?),
            T_HEARTBEAT => no_body("heartbeat", Message::Heartbeat)?,
            T_ACCEPTED => {
                let b: AcceptedBody = json("accepted", body)?;
                Message::Accepted { job_id: b.job_id }
            }
            T_FINISHED => {
                let b: FinishedBody = json("finished", body)?;
                Message::Finished {
                    result: b.result,
                    exit_code: b.exit_code,
                    message: b.message,
                }
            }
            other => return Err(JobError::UnknownType(other)),
        })
    }
}

/// Serialization behind a trait object, so `encode_into` can share one
/// helper for every JSON body.
mod erased {
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
            serde_json::to_writer(out, self)
        }
    }
}

/// Splits a byte stream into frames. Feed what the socket gave with
/// [`FrameReader::push`], then take messages with [`FrameReader::next_message`]
/// until it returns `Ok(None)`. A length over [`MAX_FRAME`] is an error at
/// once, before any of the frame is buffered.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn next_message(&mut self) -> Result<Option<Message>, JobError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_FRAME {
            return Err(JobError::TooLarge(len));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let msg = Message::decode(&avail[4..4 + len]);
        self.start += 4 + len;
        if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        msg.map(Some)
    }
}

/// Replaces every occurrence of the secret values in a byte stream with
/// `***`, also when a value is split across the chunks the stream arrives
/// in: bytes that could be the start of a value are held back until the
/// next chunk (or [`Masker::finish`]) shows what follows.
#[derive(Debug, Clone)]
pub struct Masker {
    secrets: Vec<Vec<u8>>,
    first_bytes: [bool; 256],
    held: Vec<u8>,
}

/// What a masked secret becomes.
pub const MASK: &[u8] = b"***";

impl Masker {
    /// Empty values are ignored (they would match everywhere).
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Self {
        let mut list: Vec<Vec<u8>> = secrets
            .iter()
            .map(|s| s.as_ref().to_vec())
            .filter(|s| !s.is_empty())
            .collect();
        // Longest first: a value that contains another is masked whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
        list.dedup();
        let mut first_bytes = [false; 256];
        for s in &list {
            first_bytes[s[0] as usize] = true;
        }
        Masker {
            secrets: list,
            first_bytes,
            held: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Masks `chunk`, returning what may be sent now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return chunk.to_vec();
        }
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(chunk);
        self.scan(&data, false)
    }

    /// The end of the stream: what was held back, masked knowing nothing
    /// follows.
    pub fn finish(&mut self) -> Vec<u8> {
        let data = std::mem::take(&mut self.held);
        self.scan(&data, true)
    }

    fn scan(&mut self, data: &[u8], at_end: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            if !self.first_bytes[data[i] as usize] {
                out.push(data[i]);
                i += 1;
                continue;
            }
            let rest = &data[i..];
            // A longer value may still match once more bytes arrive: wait
            // for them rather than mask a shorter one inside it.
            if !at_end
                && self
                    .secrets
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                self.held = rest.to_vec();
                return out;
            }
            if let Some(s) = self.secrets.iter().find(|s| rest.starts_with(s)) {
                out.extend_from_slice(MASK);
                i += s.len();
                continue;
            }
            out.push(data[i]);
            i += 1;
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn greetings_tell_a_runner_from_another_service_and_another_version() {
        assert_eq!(check_greeting(RUNNER_GREETING, RUNNER_GREETING), Ok(()));
        assert_eq!(check_greeting(CALLER_GREETING, CALLER_GREETING), Ok(()));
        assert_eq!(
            check_greeting(CALLER_GREETING, RUNNER_GREETING),
            Err(GreetingError::NotTern("TERN-JOB/1 CALL".into()))
        );
        let http = check_greeting(b"HTTP/1.0 400 Bad", RUNNER_GREETING).unwrap_err();
        assert!(http.to_string().contains("not a Tern runner"), "{http}");
        assert!(http.to_string().contains("HTTP/1.0 400"), "{http}");
        assert_eq!(
            check_greeting(b"TERN-JOB/2 HERE\n", RUNNER_GREETING),
            Err(GreetingError::Version("TERN-JOB/2".into()))
        );
        assert_eq!(
            check_greeting(b"SSH-2", RUNNER_GREETING),
            Err(GreetingError::Closed("SSH-2".into()))
        );
        assert_eq!(
            check_greeting(b"", RUNNER_GREETING),
            Err(GreetingError::Closed(String::new()))
        );
    }
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Submit(Submit {
                pipeline: serde_json::json!({"name": "deploy", "steps": []}),
                env: [("A".to_string(), "1".to_string())].into(),
                secrets: [("TOKEN".to_string(), "s3cr3t".to_string())].into(),
            }),
            Message::UploadChunk(vec![0, 1, 2, 255]),
            Message::UploadDone,
            Message::Cancel,
            Message::Denied {
                reason: "caller is in none of the groups deploy".into(),
            },
            Message::Queued { position: 3 },
            Message::Started {
                job_id: "j-1".into(),
                runner: "runner-1".into(),
            },
            Message::StepStarted {
                index: 0,
                name: "build".into(),
            },
            Message::Output {
                index: 2,
                stream: Stream::Stderr,
                data: b"line\n".to_vec(),
            },
            Message::StepFinished {
                index: 2,
                exit_code: -9,
                duration_ms: 1234,
            },
            Message::ArtifactChunk(vec![9; 100]),
            Message::ArtifactsDone(ArtifactsSummary {
                files: 2,
                bytes: 10,
                skipped: vec!["x: not found".into()],
                error: None,
            }),
            Message::Accepted {
                job_id: "r-1".into(),
            },
            Message::Heartbeat,
            Message::Finished {
                result: JobResult::Failed,
                exit_code: 3,
                message: None,
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_byte_at_a_time_reader() {
        let mut wire = Vec::new();
        for m in samples() {
            m.encode_into(&mut wire).unwrap();
        }
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        for b in &wire {
            reader.push(std::slice::from_ref(b));
            while let Some(m) = reader.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, samples(), "same messages, same order");
        assert_eq!(reader.pending(), 0);
    }

    #[test]
    fn oversized_and_unknown_frames_are_errors() {
        let mut reader = FrameReader::new();
        reader.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(
            reader.next_message(),
            Err(JobError::TooLarge(MAX_FRAME + 1))
        );
        assert_eq!(Message::decode(&[99]), Err(JobError::UnknownType(99)));
        assert_eq!(Message::decode(&[]), Err(JobError::Empty));
        assert!(matches!(
            Message::decode(&[T_QUEUED, b'{']),
            Err(JobError::Malformed { what: "queued", .. })
        ));
        assert!(matches!(
            Message::decode(&[T_OUTPUT, 0, 0, 0, 1, 7]),
            Err(JobError::Malformed { what: "output", .. })
        ));
        assert!(matches!(
            Message::decode(&[T_CANCEL, 1]),
            Err(JobError::Malformed { what: "cancel", .. })
        ));
        let big = Message::UploadChunk(vec![0; MAX_FRAME]);
        assert_eq!(big.encode(), Err(JobError::TooLarge(MAX_FRAME + 1)));
    }

    #[test]
    fn secrets_are_masked_across_chunk_boundaries() {
        let mut m = Masker::new(&["hunter2", "s3cr3t-long", "s3cr3t"]);
        let mut out = Vec::new();
        for chunk in [
            &b"user: hun"[..],
            b"ter2, token s3",
            b"cr3t-lo",
            b"ng and s3cr3t",
            b"!",
        ] {
            out.extend(m.push(chunk));
        }
        out.extend(m.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "user: ***, token *** and ***!"
        );
        // A prefix left at the end is not a secret and comes out as is.
        let mut m = Masker::new(&["hunter2"]);
        let mut out = m.push(b"say hunt");
        assert_eq!(out, b"say ");
        out.extend(m.finish());
        assert_eq!(out, b"say hunt");
        // No secrets: untouched, nothing held.
        let mut m = Masker::new::<&str>(&[""]);
        assert!(m.is_empty());
        assert_eq!(m.push(b"abc"), b"abc");
    }

    proptest! {
        #[test]
        fn garbage_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut reader = FrameReader::new();
            reader.push(&bytes);
            for _ in 0..100 {
                match reader.next_message() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let _ = Message::decode(&bytes);
        }

        /// A whole conversation, cut anywhere by the network, reads back
        /// whole and in order.
        #[test]
        fn a_conversation_cut_anywhere_arrives_in_order(
            cuts in proptest::collection::vec(0usize..4000, 0..12),
        ) {
            let sent = samples();
            let mut bytes = Vec::new();
            for m in &sent {
                m.encode_into(&mut bytes).unwrap_or_else(|e| panic!("{e}"));
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            cuts.push(bytes.len());
            let mut reader = FrameReader::new();
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts {
                reader.push(&bytes[at..c]);
                at = c;
                while let Some(m) = reader.next_message().unwrap_or_else(|e| panic!("{e}")) {
                    got.push(m);
                }
            }
            prop_assert_eq!(got, sent);
        }

        #[test]
        fn typed_garbage_never_panics(ty in 0u8..24, rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut frame = vec![ty];
            frame.extend(rest);
            let _ = Message::decode(&frame);
        }

        #[test]
        fn masking_is_the_same_whatever_the_chunking(
            text in "[a-c ]{0,60}",
            secret in "[a-c]{1,4}",
            cuts in proptest::collection::vec(0usize..60, 0..6),
        ) {
            let whole = {
                let mut m = Masker::new(&[secret.as_str()]);
                let mut out = m.push(text.as_bytes());
                out.extend(m.finish());
                out
            };
            let mut m = Masker::new(&[secret.as_str()]);
            let mut out = Vec::new();
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= text.len()).collect();
            cuts.sort_unstable();
            let mut prev = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                out.extend(m.push(&text.as_bytes()[prev..c]));
                prev = c;
            }
            out.extend(m.finish());
            prop_assert_eq!(&out, &whole);
            // And the secret never survives.
            prop_assert!(!out.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }
}
