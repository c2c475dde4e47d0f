//! A runner's recent jobs, as it tells its lighthouses (so that the admin
//! console and API can show them): a `u8` count (at most
//! [`MAX_RECENT_JOBS`]), then per job its id, its caller's certificate
//! name and its pipeline's name (each a label: `u8` length, UTF-8, cut to
//! [`MAX_JOB_TEXT`] bytes by the sender), when it started and ended (Unix
//! seconds, `u64`; 0: still running), its state (`u8`) and exit code
//! (`i32`).

use serde::Serialize;

use super::{put_label, read_label, ControlError, ControlMessage};
use crate::codec::Reader;

/// Jobs in one message, at most: the newest.
pub const MAX_RECENT_JOBS: usize = 6;
/// Bytes of a job's id, caller or pipeline name kept.
pub const MAX_JOB_TEXT: usize = 48;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecentJobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Error,
}

impl RecentJobState {
    const ALL: [RecentJobState; 7] = [
        RecentJobState::Queued,
        RecentJobState::Running,
        RecentJobState::Succeeded,
        RecentJobState::Failed,
        RecentJobState::TimedOut,
        RecentJobState::Cancelled,
        RecentJobState::Error,
    ];

    fn code(self) -> u8 {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as u8
    }

    /// As people read it.
    pub fn as_str(self) -> &'static str {
        match self {
            RecentJobState::Queued => "queued",
            RecentJobState::Running => "running",
            RecentJobState::Succeeded => "succeeded",
            RecentJobState::Failed => "failed",
            RecentJobState::TimedOut => "timed out",
            RecentJobState::Cancelled => "cancelled",
            RecentJobState::Error => "error",
        }
    }
}

/// One of a runner's recent jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentJob {
    pub job_id: String,
    /// The certificate name of the node that submitted it.
    pub caller: String,
    pub pipeline: String,
    /// Unix seconds.
    pub started: u64,
    /// Unix seconds; none while it runs.
    pub ended: Option<u64>,
    pub state: RecentJobState,
    pub exit_code: i32,
}

/// `text` cut to [`MAX_JOB_TEXT`] bytes on a character boundary.
pub fn job_text(text: &str) -> String {
    let mut end = text.len().min(MAX_JOB_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

pub(super) fn put_body(msg: &ControlMessage, out: &mut Vec<u8>) -> Result<(), ControlError> {
    let ControlMessage::RunnerJobs { jobs, .. } = msg else {
        return Err(ControlError::Malformed);
    };
    if jobs.len() > MAX_RECENT_JOBS {
        return Err(ControlError::Malformed);
    }
    out.push(jobs.len() as u8);
    for j in jobs {
        for text in [&j.job_id, &j.caller, &j.pipeline] {
            if text.len() > MAX_JOB_TEXT {
                return Err(ControlError::Malformed);
            }
            put_label(out, text)?;
        }
        out.extend_from_slice(&j.started.to_be_bytes());
        out.extend_from_slice(&j.ended.unwrap_or(0).to_be_bytes());
        out.push(j.state.code());
        out.extend_from_slice(&j.exit_code.to_be_bytes());
    }
    Ok(())
}

pub(super) fn read_body(id: u32, r: &mut Reader<'_>) -> Result<ControlMessage, ControlError> {
    let n = r.u8().ok_or(ControlError::Malformed)? as usize;
    if n > MAX_RECENT_JOBS {
        return Err(ControlError::Malformed);
    }
    let mut jobs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut text = || -> Result<String, ControlError> {
            let t = read_label(r)?;
            if t.len() > MAX_JOB_TEXT {
                return Err(ControlError::Malformed);
            }
            Ok(t)
        };
        let (job_id, caller, pipeline) = (text()?, text()?, text()?);
        let started = r.u64().ok_or(ControlError::Malformed)?;
        let ended = r.u64().ok_or(ControlError::Malformed)?;
        let state = *RecentJobState::ALL
            .get(r.u8().ok_or(ControlError::Malformed)? as usize)
            .ok_or(ControlError::Malformed)?;
        let exit_code = r.u32().ok_or(ControlError::Malformed)? as i32;
        jobs.push(RecentJob {
            job_id,
            caller,
            pipeline,
            started,
            ended: (ended != 0).then_some(ended),
            state,
            exit_code,
        });
    }
    Ok(ControlMessage::RunnerJobs { id, jobs })
}
