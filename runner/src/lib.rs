//! `tern-runner`: pipelines run inside the private network for callers in
//! the mesh.
//!
//! - [`pipeline`]: the pipeline file (`config/pipeline.toml`): steps,
//!   uploads, artifacts, secrets; parsed with the line of every error.
//! - [`job`]: the job protocol between `tern run` and a runner (greetings,
//!   frames, exit codes).
//! - [`scheduler`]: who may run pipelines here, and the queue that keeps at
//!   most `concurrency` jobs running.
//!
//! These parts take bytes in and give bytes out; only
//! [`pipeline::Pipeline::check_uploads`] reads the file system (the CI
//! workspace's uploads). The processes, sockets and archives are in
//! `tern-node`'s `io` for now.

pub mod job;
pub mod pipeline;
pub mod scheduler;
