//! Running one pipeline step on a runner: a shell in the job's workspace, in
//! its own process group, with a clean environment; its output read as it
//! comes, masked, and handed on in order; stopped whole (the group, not just
//! the shell) on cancel or timeout.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::protocol::{Masker, Stream, MAX_CHUNK};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

/// `PATH` a job gets: the environment is otherwise only what the pipeline
/// declares, the secrets and the runner's `TERN_*` variables.
pub const JOB_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a step's process group has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// A chunk of a step's output, already masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub data: Vec<u8>,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    /// The shell exited with this code (128 + n when killed by signal n).
    Exited(i32),
    TimedOut,
    Cancelled,
}

/// What runs: the step's shell command line (e.g. `bash -eo pipefail`) gets
/// `-c SCRIPT`.
pub struct StepSpec<'a> {
    pub shell: &'a str,
    pub script: &'a str,
    pub workspace: &'a Path,
    pub env: &'a BTreeMap<String, String>,
    pub timeout: Option<Duration>,
}

/// Runs one step to its end. Output goes to `out` as it arrives (stdout and
/// stderr each in order), masked with `masker`'s secrets. `cancel` turning
/// true stops the step: SIGTERM to its process group, SIGKILL after
/// `grace`; the step returns only when no process of the group is left.
pub async fn run_step(
    spec: StepSpec<'_>,
    secrets: &[String],
    out: mpsc::Sender<Chunk>,
    mut cancel: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<(StepEnd, Duration)> {
    let mut words = spec.shell.split_whitespace();
    let program = words.next().unwrap_or("bash");
    let mut cmd = std::process::Command::new(program);
    cmd.args(words)
        .arg("-c")
        .arg(spec.script)
        .current_dir(spec.workspace)
        .env_clear()
        .env("PATH", JOB_PATH)
        .env("HOME", spec.workspace)
        .envs(spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let started = Instant::now();
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pump = |reader: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, stream: Stream| {
        let out = out.clone();
        let mut masker = Masker::new(secrets);
        tokio::spawn(async move {
            let Some(mut reader) = reader else {
                return;
            };
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = masker.push(&buf[..n]);
                        if !data.is_empty() && out.send(Chunk { stream, data }).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let rest = masker.finish();
            if !rest.is_empty() {
                let _ = out.send(Chunk { stream, data: rest }).await;
            }
        })
    };
    let out_task = pump(
        stdout.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        Stream::Stdout,
    );
    let err_task = pump(
        stderr.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        Stream::Stderr,
    );
    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let end = tokio::select! {
        status = child.wait() => {
            let status = status?;
            use std::os::unix::process::ExitStatusExt;
            StepEnd::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        _ = sleep_until_opt(deadline) => StepEnd::TimedOut,
        _ = wait_true(&mut cancel) => StepEnd::Cancelled,
    };
    // Whatever ended the step, nothing of its group outlives it: a shell
    // that exited may have left background children behind.
    if let Some(pgid) = pgid {
        stop_group(pgid, grace).await;
    }
    let _ = child.wait().await;
    let _ = out_task.await;
    let _ = err_task.await;
    Ok((end, started.elapsed()))
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_true(cancel: &mut watch::Receiver<bool>) {
    loop {
        if *cancel.borrow() {
            return;
        }
        if cancel.changed().await.is_err() {
            // The sender is gone: nobody can cancel any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Whether any live process of the group is left. Zombies do not count: an
/// orphaned one waits for an init that may never reap it, but runs nothing.
pub fn group_alive(pgid: Pid) -> bool {
    if killpg(pgid, None).is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and ')'.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid.as_raw()) && state != Some("Z") && state != Some("X")
    })
}

/// SIGTERM to the group, then SIGKILL after `grace` if anything is left;
/// returns when the group is gone (or after a bounded wait past SIGKILL).
async fn stop_group(pgid: Pid, grace: Duration) {
    if !group_alive(pgid) {
        return;
    }
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while group_alive(pgid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if group_alive(pgid) {
        let _ = killpg(pgid, Signal::SIGKILL);
        for _ in 0..250 {
            if !group_alive(pgid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    async fn run(
        script: &str,
        env: &[(&str, &str)],
        secrets: &[&str],
        timeout: Option<Duration>,
        cancel_after: Option<Duration>,
    ) -> (StepEnd, Vec<Chunk>) {
        let dir = tempfile::tempdir().unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let (tx, mut rx) = mpsc::channel(64);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        if let Some(after) = cancel_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = cancel_tx.send(true);
            });
        } else {
            std::mem::forget(cancel_tx);
        }
        let collector = tokio::spawn(async move {
            let mut chunks = Vec::new();
            while let Some(c) = rx.recv().await {
                chunks.push(c);
            }
            chunks
        });
        let spec = StepSpec {
            shell: "bash -eo pipefail",
            script,
            workspace: dir.path(),
            env: &env,
            timeout,
        };
        let (end, _) = run_step(spec, &secrets, tx, cancel_rx, Duration::from_millis(500))
            .await
            .unwrap();
        (end, collector.await.unwrap())
    }

    fn text(chunks: &[Chunk], stream: Stream) -> String {
        chunks
            .iter()
            .filter(|c| c.stream == stream)
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn exit_codes_output_order_and_a_clean_environment() {
        let (end, chunks) = run(
            "for i in $(seq 1 500); do echo line $i; done; echo oops >&2; echo \"v=$VISIBLE home=$HOME user=${USER:-none}\"; exit 3",
            &[("VISIBLE", "yes")],
            &[],
            None,
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(3));
        let out = text(&chunks, Stream::Stdout);
        let expected: String = (1..=500).map(|i| format!("line {i}\n")).collect();
        assert!(out.starts_with(&expected), "stdout in order");
        assert!(out.contains("v=yes home=/"), "{out}");
        assert!(
            out.contains("user=none"),
            "the runner's own environment does not leak: {out}"
        );
        assert_eq!(text(&chunks, Stream::Stderr), "oops\n");
        // bash -eo pipefail: a failing command ends the step with its code.
        let (end, _) = run("false | true; echo unreachable", &[], &[], None, None).await;
        assert_eq!(end, StepEnd::Exited(1));
    }

    #[tokio::test]
    async fn secrets_never_leave_unmasked() {
        let (end, chunks) = run(
            "printf 'tok'; printf 'en=%s\\n' \"$TOKEN\"; echo \"$TOKEN\" >&2",
            &[("TOKEN", "hunter2-very-secret")],
            &["hunter2-very-secret"],
            None,
            None,
        )
        .await;
        assert_eq!(end, StepEnd::Exited(0));
        assert_eq!(text(&chunks, Stream::Stdout), "token=***\n");
        assert_eq!(text(&chunks, Stream::Stderr), "***\n");
    }

    #[tokio::test]
    async fn cancel_and_timeout_stop_the_whole_process_group() {
        for (timeout, cancel, want) in [
            (None, Some(Duration::from_millis(300)), StepEnd::Cancelled),
            (Some(Duration::from_millis(300)), None, StepEnd::TimedOut),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let pidfile = dir.path().join("pids");
            // A background grandchild that ignores SIGTERM, and the shell
            // waiting on it: only the group kill after the grace ends it.
            let script = format!(
                "(trap '' TERM; sleep 60) & echo $! > {p}; echo $$ >> {p}; wait",
                p = pidfile.display()
            );
            let (end, _) = run(&script, &[], &[], timeout, cancel).await;
            assert_eq!(end, want);
            let pids = std::fs::read_to_string(&pidfile).unwrap();
            for pid in pids.split_whitespace() {
                let pid: i32 = pid.parse().unwrap();
                let alive = nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
                    && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| s.contains(") Z "))
                        .unwrap_or(true);
                assert!(!alive, "process {pid} of the step survived ({want:?})");
            }
        }
    }
}
