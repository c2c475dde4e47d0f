//! The runner's newest jobs, for its lighthouses (and through them the
//! admin console): each job from its acceptance to its end, newest first,
//! at most [`MAX_RECENT_JOBS`], published on a watch channel the daemon
//! forwards. Texts are cut to what the control message carries.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tern_shared::control::{job_text, RecentJob, RecentJobState, MAX_RECENT_JOBS};
use tokio::sync::watch;

use crate::protocol::JobResult;

/// The newest jobs, shared by every connection's task.
#[derive(Clone)]
pub struct RecentJobs {
    jobs: Arc<Mutex<VecDeque<RecentJob>>>,
    tx: Arc<watch::Sender<Vec<RecentJob>>>,
}

impl RecentJobs {
    pub fn new() -> (RecentJobs, watch::Receiver<Vec<RecentJob>>) {
        let (tx, rx) = watch::channel(Vec::new());
        (
            RecentJobs {
                jobs: Arc::new(Mutex::new(VecDeque::new())),
                tx: Arc::new(tx),
            },
            rx,
        )
    }

    /// A job accepted (waiting for its turn); the guard marks it ended
    /// (cancelled) if it is dropped before [`JobGuard::ended`].
    pub fn accepted(&self, job_id: &str, caller: &str, pipeline: &str, now: u64) -> JobGuard {
        self.update(|jobs| {
            jobs.push_front(RecentJob {
                job_id: job_text(job_id),
                caller: job_text(caller),
                pipeline: job_text(pipeline),
                started: now,
                ended: None,
                state: RecentJobState::Queued,
                exit_code: 0,
            });
            jobs.truncate(MAX_RECENT_JOBS);
        });
        JobGuard {
            recent: self.clone(),
            job_id: job_text(job_id),
            done: false,
        }
    }

    fn update(&self, f: impl FnOnce(&mut VecDeque<RecentJob>)) {
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        f(&mut jobs);
        let now: Vec<RecentJob> = jobs.iter().cloned().collect();
        self.tx.send_if_modified(|seen| {
            let changed = *seen != now;
            *seen = now;
            changed
        });
    }

    fn set(&self, job_id: &str, f: impl FnOnce(&mut RecentJob)) {
        self.update(|jobs| {
            if let Some(j) = jobs.iter_mut().find(|j| j.job_id == job_id) {
                f(j);
            }
        });
    }
}

/// One job in the list, until it ends.
pub struct JobGuard {
    recent: RecentJobs,
    job_id: String,
    done: bool,
}

impl JobGuard {
    /// Its steps begin (`now`: Unix seconds).
    pub fn started(&self, now: u64) {
        self.recent.set(&self.job_id, |j| {
            j.state = RecentJobState::Running;
            j.started = now;
        });
    }

    /// It ended so.
    pub fn ended(mut self, result: &JobResult, exit_code: i32, now: u64) {
        let state = match result {
            JobResult::Succeeded => RecentJobState::Succeeded,
            JobResult::Failed => RecentJobState::Failed,
            JobResult::TimedOut => RecentJobState::TimedOut,
            JobResult::Cancelled => RecentJobState::Cancelled,
            JobResult::Error => RecentJobState::Error,
        };
        self.finish(state, exit_code, now);
    }

    fn finish(&mut self, state: RecentJobState, exit_code: i32, now: u64) {
        self.done = true;
        self.recent.set(&self.job_id, |j| {
            j.state = state;
            j.exit_code = exit_code;
            j.ended = Some(now.max(j.started));
        });
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if !self.done {
            // The caller left (or the connection failed) before the end.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.finish(RecentJobState::Cancelled, 0, now);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_bounded_and_a_dropped_job_is_cancelled() {
        let (recent, rx) = RecentJobs::new();
        let first = recent.accepted("r-1-1", "ci-a", "build", 100);
        first.started(101);
        assert_eq!(rx.borrow()[0].state, RecentJobState::Running);
        first.ended(&JobResult::Failed, 3, 105);
        let gone = recent.accepted("r-1-2", "ci-b", &"p".repeat(200), 110);
        drop(gone);
        let jobs = rx.borrow().clone();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].job_id, "r-1-2", "newest first");
        assert_eq!(jobs[0].state, RecentJobState::Cancelled);
        assert_eq!(jobs[0].pipeline.len(), tern_shared::control::MAX_JOB_TEXT);
        assert_eq!(
            (jobs[1].state, jobs[1].exit_code, jobs[1].ended),
            (RecentJobState::Failed, 3, Some(105))
        );
        for i in 0..10 {
            recent
                .accepted(&format!("r-1-{}", i + 3), "ci", "x", 120)
                .ended(&JobResult::Succeeded, 0, 121);
        }
        assert_eq!(rx.borrow().len(), MAX_RECENT_JOBS);
        assert_eq!(rx.borrow()[0].job_id, "r-1-12");
    }
}
