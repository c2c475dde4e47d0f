//! The Tern node: the tokio shell in `io` around the sans-IO core
//! (`tern-node-core`) and the runner (`tern-runner`), the command-line front
//! ends in `cli`. The binary `tern` is a thin `main.rs`.

pub mod cli;
pub mod io;

pub use tern_udp::daemon::init_logging;
