//! Command-line front ends. Each module parses its arguments with clap and
//! turns errors into messages that say what is wrong and what to do.

pub mod cert;
pub mod daemon;
pub mod demo;
pub mod forward;
pub mod policy;
pub mod ready;
pub mod resolve;
pub mod run;
pub mod services;
