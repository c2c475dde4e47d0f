//! What the runner counts for the node's Prometheus endpoint: jobs by how
//! they ended, and how long they ran. Written where a job's audit record is
//! (every job ends in exactly one), read by the node at each scrape; the
//! metrics are shared handles (atomics inside), so nothing is copied.

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use tern_runner_core::protocol::JobResult;

use crate::job::AuditRecord;

/// Every value of `tern_runner_jobs_total`'s `result` label.
pub const RESULTS: [&str; 6] = [
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "error",
    "refused",
];

/// Upper bounds of the job-duration histogram, in seconds: CI jobs run from
/// seconds to an hour.
const DURATION_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

#[derive(Clone)]
pub struct JobMetrics {
    jobs: IntCounterVec,
    duration: Histogram,
}

impl JobMetrics {
    /// Fails only if a name or the bucket list were not valid (a bug).
    pub fn new() -> Result<JobMetrics, prometheus::Error> {
        let jobs = IntCounterVec::new(
            Opts::new(
                "tern_runner_jobs_total",
                "Jobs this runner ended, by result (refused: the caller's groups may not run here).",
            ),
            &["result"],
        )?;
        for result in RESULTS {
            jobs.with_label_values(&[result]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "tern_runner_job_duration_seconds",
                "How long jobs ran, from their first step to their end (refused ones not counted).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        Ok(JobMetrics { jobs, duration })
    }

    /// A job ended; `record` is its audit record.
    pub fn ended(&self, record: &AuditRecord) {
        let result = match record.result {
            JobResult::Succeeded => "succeeded",
            JobResult::Failed => "failed",
            JobResult::TimedOut => "timed_out",
            JobResult::Cancelled => "cancelled",
            JobResult::Error => "error",
        };
        self.jobs.with_label_values(&[result]).inc();
        if record.started_unix_ms > 0 && record.ended_unix_ms >= record.started_unix_ms {
            self.duration
                .observe((record.ended_unix_ms - record.started_unix_ms) as f64 / 1000.0);
        }
    }

    /// A caller was refused by the runner's policy.
    pub fn refused(&self) {
        self.jobs.with_label_values(&["refused"]).inc();
    }

    /// The metrics, for an exposition.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.jobs.clone()), Box::new(self.duration.clone())]
    }
}
