//! `tern-runner-core`: the runner's parts that take bytes in and give
//! bytes out (only [`pipeline::Pipeline::check_uploads`] reads the file
//! system: the CI workspace's uploads).
//!
//! - [`pipeline`]: the pipeline file (`config/pipeline.toml`): steps,
//!   uploads, artifacts, secrets; parsed with the line of every error.
//! - [`protocol`]: the job protocol between `tern run` and a runner
//!   (greetings, frames, output masking).
//! - [`scheduler`]: who may run pipelines here, and the queue that keeps at
//!   most `concurrency` jobs running.

pub mod pipeline;
pub mod protocol;
pub mod scheduler;
