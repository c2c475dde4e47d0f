//! The Tern node: the tokio shell in `io` around the sans-IO core
//! (`tern-node-core`) and the runner (`tern-runner`), the command-line front
//! ends in `cli`. The binary `tern` is a thin `main.rs`.

pub mod cli;
pub mod io;

/// Logs go to stderr; `RUST_LOG` overrides the config's level.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour for a person at a terminal only: a log file or the journal
    // would keep the escape codes as text.
    let ansi = tern_shared::show::colour_logs(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}
