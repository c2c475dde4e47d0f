//! Running a whole job on a runner: a fresh workspace, the steps in order
//! (each through [`crate::step::run_step`]), the protocol messages the
//! caller streams, the job's time limit, and the audit record.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::pipeline::Pipeline;
use crate::protocol::{ArtifactsSummary, JobResult, Message, MAX_CHUNK};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::archive::{self, ArchiveError, ChunkWriter};
use crate::scheduler::Caller;
use crate::step::{run_step, Chunk, StepEnd, StepSpec};

/// One job as the runner got it.
pub struct JobSpec<'a> {
    pub id: &'a str,
    pub runner: &'a str,
    pub caller: &'a Caller,
    pub pipeline: &'a Pipeline,
    /// `--env` from the caller, over the pipeline's env.
    pub extra_env: &'a BTreeMap<String, String>,
    /// `--secret` values, by name: environment only, masked everywhere.
    pub secrets: &'a BTreeMap<String, String>,
    pub work_dir: &'a Path,
    pub max_duration: Duration,
    pub keep_workspace: bool,
    pub grace: Duration,
    /// The upload could not be unpacked: the job fails with this, no step runs.
    pub upload_error: Option<String>,
    /// What the upload put in the workspace.
    pub uploaded: Option<Transfer>,
}

/// Files moved in or out of a job's workspace.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Transfer {
    pub files: u64,
    pub bytes: u64,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    pub job_id: String,
    pub caller: Caller,
    pub pipeline: String,
    pub pipeline_sha256: String,
    pub steps: Vec<AuditStep>,
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    pub result: JobResult,
    pub exit_code: i32,
    /// Why it was refused or could not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload: Option<Transfer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Transfer>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditStep {
    pub name: String,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sha256 the audit log records for a pipeline: of its canonical JSON.
pub fn pipeline_sha256(pipeline: &Pipeline) -> String {
    let json = serde_json::to_vec(pipeline).unwrap_or_default();
    format!("{:x}", Sha256::digest(&json))
}

/// The environment of a step: the pipeline's, the step's, `--env`, the
/// secrets, and the runner's own `TERN_*` variables (which win).
fn step_env(job: &JobSpec<'_>, step: usize, workspace: &Path) -> BTreeMap<String, String> {
    let mut env = job.pipeline.env.clone();
    if let Some(s) = job.pipeline.steps.get(step) {
        env.extend(s.env.clone());
    }
    env.extend(job.extra_env.clone());
    env.extend(job.secrets.clone());
    env.insert("TERN_JOB_ID".into(), job.id.to_string());
    env.insert("TERN_RUNNER".into(), job.runner.to_string());
    env.insert("TERN_CALLER".into(), job.caller.name.clone());
    env.insert("TERN_CALLER_GROUPS".into(), job.caller.groups.join(","));
    env.insert("TERN_PIPELINE".into(), job.pipeline.name.clone());
    env.insert("TERN_STEP".into(), step.to_string());
    env.insert(
        "TERN_WORKSPACE".into(),
        workspace.to_string_lossy().into_owned(),
    );
    env
}

/// Runs the job's steps in its workspace and streams what happens to `out`
/// (StepStarted, Output, StepFinished, then Finished). Returns the audit
/// record. `cancel` turning true stops the running step and skips the rest.
pub async fn run_job(
    job: JobSpec<'_>,
    out: mpsc::Sender<Message>,
    cancel: watch::Receiver<bool>,
) -> AuditRecord {
    let started_unix_ms = unix_ms();
    let started = tokio::time::Instant::now();
    let mut record = AuditRecord {
        job_id: job.id.to_string(),
        caller: job.caller.clone(),
        pipeline: job.pipeline.name.clone(),
        pipeline_sha256: pipeline_sha256(job.pipeline),
        steps: Vec::new(),
        started_unix_ms,
        ended_unix_ms: 0,
        result: JobResult::Succeeded,
        exit_code: 0,
        message: None,
        upload: job.uploaded,
        artifacts: None,
    };
    let workspace = job.work_dir.join(job.id);
    if let Err(e) = std::fs::create_dir_all(&workspace) {
        record.result = JobResult::Error;
        record.exit_code = -1;
        record.message = Some(format!(
            "creating the workspace {}: {e}",
            workspace.display()
        ));
        return finish(record, &out, &workspace, job.keep_workspace).await;
    }
    if let Some(why) = &job.upload_error {
        record.result = JobResult::Error;
        record.exit_code = -1;
        record.message = Some(why.clone());
        return finish(record, &out, &workspace, job.keep_workspace).await;
    }
    let limit = job.pipeline.timeout.min(job.max_duration);
    let secrets: Vec<String> = job.secrets.values().cloned().collect();
    for (index, step) in job.pipeline.steps.iter().enumerate() {
        if *cancel.borrow() {
            record.result = JobResult::Cancelled;
            break;
        }
        let left = limit.saturating_sub(started.elapsed());
        let timeout = step.timeout.map_or(left, |t| t.min(left));
        let _ = out
            .send(Message::StepStarted {
                index: index as u32,
                name: step.name.clone(),
            })
            .await;
        let dir = match &step.working_directory {
            Some(d) => workspace.join(d),
            None => workspace.clone(),
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            record.result = JobResult::Error;
            record.message = Some(format!("creating {}: {e}", dir.display()));
            break;
        }
        let env = step_env(&job, index, &workspace);
        let (chunks_tx, mut chunks_rx) = mpsc::channel::<Chunk>(64);
        let forward = {
            let out = out.clone();
            tokio::spawn(async move {
                while let Some(c) = chunks_rx.recv().await {
                    let _ = out
                        .send(Message::Output {
                            index: index as u32,
                            stream: c.stream,
                            data: c.data,
                        })
                        .await;
                }
            })
        };
        let spec = StepSpec {
            shell: &step.shell,
            script: &step.run,
            workspace: &dir,
            env: &env,
            timeout: Some(timeout),
        };
        let ran = run_step(spec, &secrets, chunks_tx, cancel.clone(), job.grace).await;
        let _ = forward.await;
        let (end, took) = match ran {
            Ok(r) => r,
            Err(e) => {
                record.result = JobResult::Error;
                record.message = Some(format!(
                    "starting step {:?} ({}): {e}",
                    step.name, step.shell
                ));
                break;
            }
        };
        let code = match end {
            StepEnd::Exited(c) => Some(c),
            StepEnd::TimedOut | StepEnd::Cancelled => None,
        };
        let _ = out
            .send(Message::StepFinished {
                index: index as u32,
                exit_code: code.unwrap_or(-1),
                duration_ms: took.as_millis() as u64,
            })
            .await;
        record.steps.push(AuditStep {
            name: step.name.clone(),
            exit_code: code,
            duration_ms: took.as_millis() as u64,
        });
        match end {
            StepEnd::Exited(0) => {}
            StepEnd::Exited(c) if step.continue_on_error => {
                tracing::debug!(step = %step.name, code = c, "step failed; continue_on_error");
            }
            StepEnd::Exited(c) => {
                record.result = JobResult::Failed;
                record.exit_code = c;
                break;
            }
            StepEnd::TimedOut => {
                record.result = JobResult::TimedOut;
                record.exit_code = i32::from(tern_shared::exit::TIMED_OUT);
                break;
            }
            StepEnd::Cancelled => {
                record.result = JobResult::Cancelled;
                record.exit_code = i32::from(tern_shared::exit::CANCELLED);
                break;
            }
        }
    }
    if record.result == JobResult::Cancelled {
        record.exit_code = i32::from(tern_shared::exit::CANCELLED);
    } else if !job.pipeline.artifacts.is_empty() {
        // Also after a failure: test reports and logs are what one needs then.
        record.artifacts = send_artifacts(&workspace, &job.pipeline.artifacts, &out).await;
    }
    finish(record, &out, &workspace, job.keep_workspace).await
}

/// Packs the pipeline's `artifacts` from the workspace and streams them
/// (ArtifactChunk*, ArtifactsDone). Missing paths are reported, not fatal.
async fn send_artifacts(
    workspace: &Path,
    paths: &[PathBuf],
    out: &mpsc::Sender<Message>,
) -> Option<Transfer> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let (root, paths) = (workspace.to_path_buf(), paths.to_vec());
    let packing = tokio::task::spawn_blocking(move || {
        let mut sink = ChunkWriter::new(tx, MAX_CHUNK);
        let summary = archive::pack(&root, &paths, true, &mut sink)?;
        sink.finish().map_err(|source| ArchiveError::Io {
            path: root.clone(),
            source,
        })?;
        Ok::<_, ArchiveError>(summary)
    });
    while let Some(chunk) = rx.recv().await {
        if out.send(Message::ArtifactChunk(chunk)).await.is_err() {
            break;
        }
    }
    drop(rx);
    let (summary, transfer) = match packing.await {
        Ok(Ok(s)) => (
            ArtifactsSummary {
                files: s.files,
                bytes: s.bytes,
                skipped: s.skipped,
                error: None,
            },
            Some(Transfer {
                files: s.files,
                bytes: s.bytes,
            }),
        ),
        Ok(Err(e)) => (
            ArtifactsSummary {
                error: Some(e.to_string()),
                ..ArtifactsSummary::default()
            },
            None,
        ),
        Err(e) => (
            ArtifactsSummary {
                error: Some(e.to_string()),
                ..ArtifactsSummary::default()
            },
            None,
        ),
    };
    let _ = out.send(Message::ArtifactsDone(summary)).await;
    transfer
}

async fn finish(
    mut record: AuditRecord,
    out: &mpsc::Sender<Message>,
    workspace: &PathBuf,
    keep: bool,
) -> AuditRecord {
    if !keep {
        let _ = std::fs::remove_dir_all(workspace);
    }
    record.ended_unix_ms = unix_ms();
    let _ = out
        .send(Message::Finished {
            result: record.result,
            exit_code: record.exit_code,
            message: record.message.clone(),
        })
        .await;
    record
}

/// Appends one record to the audit log and syncs it to disk before
/// returning: a job's record survives whatever happens next.
pub fn append_audit(path: &Path, record: &AuditRecord) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(&line)?;
    file.sync_data()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"
name = "three steps"
[env]
GREETING = "hello"
[[steps]]
name = "first"
run = "echo $GREETING from $TERN_CALLER; pwd"
[[steps]]
name = "allowed to fail"
run = "echo token=$TOKEN; exit 4"
continue_on_error = true
[[steps]]
name = "in a subdirectory"
working_directory = "sub/dir"
run = "pwd; exit 7"
[[steps]]
name = "never runs"
run = "echo no"
"#;

    fn caller() -> Caller {
        Caller {
            name: "ci-7".into(),
            groups: vec!["ci".into()],
            fingerprint: "ab".repeat(32),
        }
    }

    async fn run(
        pipeline: &Pipeline,
        work: &Path,
        cancel_after: Option<Duration>,
    ) -> (AuditRecord, Vec<Message>) {
        let caller = caller();
        let extra = BTreeMap::new();
        let secrets: BTreeMap<String, String> =
            [("TOKEN".to_string(), "s3cr3t-value".to_string())].into();
        let (tx, mut rx) = mpsc::channel(256);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        if let Some(after) = cancel_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = cancel_tx.send(true);
            });
        } else {
            std::mem::forget(cancel_tx);
        }
        let collect = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(m) = rx.recv().await {
                all.push(m);
            }
            all
        });
        let record = run_job(
            JobSpec {
                id: "job-1",
                runner: "runner-1",
                caller: &caller,
                pipeline,
                extra_env: &extra,
                secrets: &secrets,
                work_dir: work,
                max_duration: Duration::from_secs(60),
                keep_workspace: false,
                upload_error: None,
                uploaded: None,
                grace: Duration::from_millis(300),
            },
            tx,
            cancel_rx,
        )
        .await;
        (record, collect.await.unwrap())
    }

    fn output_of(messages: &[Message], step: u32) -> String {
        messages
            .iter()
            .filter_map(|m| match m {
                Message::Output { index, data, .. } if *index == step => {
                    Some(String::from_utf8_lossy(data).into_owned())
                }
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn steps_run_in_order_and_the_failing_one_decides() {
        let pipeline = Pipeline::parse(PIPELINE, Path::new("p.toml")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let (record, messages) = run(&pipeline, work.path(), None).await;
        assert_eq!(record.result, JobResult::Failed);
        assert_eq!(record.exit_code, 7, "the failing step's code");
        let codes: Vec<Option<i32>> = record.steps.iter().map(|s| s.exit_code).collect();
        assert_eq!(
            codes,
            vec![Some(0), Some(4), Some(7)],
            "the fourth never ran"
        );
        let first = output_of(&messages, 0);
        assert!(first.starts_with("hello from ci-7\n"), "{first}");
        assert!(
            first.contains("/job-1"),
            "runs in the job's workspace: {first}"
        );
        assert_eq!(output_of(&messages, 1), "token=***\n", "secrets masked");
        assert!(output_of(&messages, 2)
            .trim_end()
            .ends_with("/job-1/sub/dir"));
        assert!(matches!(
            messages.last(),
            Some(Message::Finished {
                result: JobResult::Failed,
                exit_code: 7,
                ..
            })
        ));
        assert!(!work.path().join("job-1").exists(), "workspace removed");
        // The audit record never holds the secret.
        let audit = work.path().join("audit/audit.jsonl");
        append_audit(&audit, &record).unwrap();
        let text = std::fs::read_to_string(&audit).unwrap();
        assert!(!text.contains("s3cr3t-value"));
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["caller"]["name"], "ci-7");
        assert_eq!(line["result"], "failed");
        assert_eq!(line["pipeline_sha256"].as_str().unwrap().len(), 64);
    }

    #[tokio::test]
    async fn cancel_stops_the_job_and_skips_the_rest() {
        let text = "name = \"long\"\n[[steps]]\nname = \"sleepy\"\nrun = \"echo started; sleep 30\"\n[[steps]]\nname = \"after\"\nrun = \"echo after\"\n";
        let pipeline = Pipeline::parse(text, Path::new("p.toml")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let (record, messages) =
            run(&pipeline, work.path(), Some(Duration::from_millis(300))).await;
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(record.result, JobResult::Cancelled);
        assert_eq!(record.exit_code, 130);
        assert_eq!(record.steps.len(), 1);
        assert_eq!(output_of(&messages, 1), "");
    }

    /// On tokio's paused clock a five-minute step meets its 2 s limit at
    /// once in real time: the timeout path, exactly, without waiting.
    #[tokio::test(start_paused = true)]
    async fn a_step_over_its_time_limit_is_stopped_on_a_fake_clock() {
        let text = "name = \"slow\"\n[[steps]]\nname = \"slow\"\nrun = \"echo begun; exec sleep 300\"\ntimeout = \"2s\"\n[[steps]]\nname = \"after\"\nrun = \"echo after\"\n";
        let pipeline = Pipeline::parse(text, Path::new("p.toml")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let (real, virtual_start) = (std::time::Instant::now(), tokio::time::Instant::now());
        let (record, messages) = run(&pipeline, work.path(), None).await;
        assert_eq!(record.result, JobResult::TimedOut);
        assert_eq!(record.exit_code, 124);
        assert_eq!(record.steps.len(), 1, "the rest is skipped");
        assert_eq!(record.steps[0].exit_code, None);
        assert!(virtual_start.elapsed() >= Duration::from_secs(2));
        assert!(real.elapsed() < Duration::from_secs(30));
        assert_eq!(output_of(&messages, 1), "");
    }

    #[tokio::test]
    async fn artifacts_come_back_after_a_failed_step_and_missing_ones_are_named() {
        let text = "name = \"a\"\nartifacts = [\"out\", \"nope.log\"]\n[[steps]]\nname = \"make\"\nrun = \"mkdir -p out; echo report > out/r.txt; exit 3\"\n";
        let pipeline = Pipeline::parse(text, Path::new("p.toml")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let (record, messages) = run(&pipeline, work.path(), None).await;
        assert_eq!(record.result, JobResult::Failed);
        let tar: Vec<u8> = messages
            .iter()
            .filter_map(|m| match m {
                Message::ArtifactChunk(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let done = messages.iter().find_map(|m| match m {
            Message::ArtifactsDone(s) => Some(s.clone()),
            _ => None,
        });
        let done = done.expect("ArtifactsDone sent");
        assert_eq!(done.files, 1);
        assert!(
            done.skipped.iter().any(|s| s.contains("nope.log")),
            "{done:?}"
        );
        assert!(
            matches!(messages.last(), Some(Message::Finished { .. })),
            "Finished comes last"
        );
        let into = tempfile::tempdir().unwrap();
        let limits = archive::Limits {
            max_bytes: 1 << 20,
            max_entries: 100,
        };
        archive::unpack(std::io::Cursor::new(tar), into.path(), limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(into.path().join("out/r.txt")).unwrap(),
            "report\n"
        );
        assert_eq!(record.artifacts.map(|a| a.files), Some(1));
    }
}
