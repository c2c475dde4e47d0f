//! `tern-runner`: pipelines run inside the private network for callers in
//! the mesh. The sans-IO parts (pipeline model, job protocol, scheduler)
//! are `tern-runner-core`, re-exported here; this crate adds the IO:
//!
//! - [`server`]: the runner service (listener, queue, one connection per
//!   caller).
//! - [`job`]: one job on the runner: a fresh workspace, the steps, the
//!   audit record. [`step`]: one step's process group.
//! - [`archive`]: the tar streams for uploads and artifacts.
//! - [`client`]: `tern run`'s side of a job.
//! - [`recent`]: the runner's newest jobs, for its lighthouses.

pub use tern_runner_core::{pipeline, protocol, scheduler};

pub mod archive;
pub mod client;
pub mod job;
pub mod metrics;
pub mod recent;
pub mod server;
pub mod step;

/// A byte stream a job travels over: a TCP connection through the mesh
/// (kernel or userspace stack), or the daemon's API socket.
pub trait ByteStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ByteStream for T {}
