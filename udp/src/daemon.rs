//! What both daemons' shells share besides the UDP socket: logging, the
//! wall clock, the seed for session indexes, and how many reads one
//! wake-up may take before the event loop looks at its timers again.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tern_shared::identity::Identity;
use tern_shared::ops::LogFormat;

/// Receives per wake-up before a loop looks at its timers and API again.
pub const READS_PER_WAKEUP: usize = 16;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seed for session indexes: not secret, only distinct per run.
pub fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}

/// Sets the log level while running (SIGHUP), once logging is set up.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LOG_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

/// Logs go to stderr at `level` in `format`; `RUST_LOG` overrides the level.
/// The level can be changed later with [`set_log_level`] (unless `RUST_LOG`
/// is set). JSON lines carry the timestamp, level, target, the event's
/// fields (`message` among them) at the top level, and the spans the event
/// is in (`spans`: e.g. the peer's name) — the same fields the text shows.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour for a person at a terminal only.
    let ansi = tern_shared::show::colour_logs(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let builder = builder.with_ansi(ansi).with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                keep_level_handle(move |filter| handle.reload(filter).map_err(|e| e.to_string()));
            }
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                keep_level_handle(move |filter| handle.reload(filter).map_err(|e| e.to_string()));
            }
        }
    }
}

fn keep_level_handle(
    reload: impl Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync + 'static,
) {
    let _ = LOG_LEVEL.set(Box::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| format!("[log] level {level:?}: {e}"))?;
        reload(filter)
    }));
}

/// Changes the log level of [`init_logging`]'s logger (an error names the
/// bad level). `None`, changing nothing, when `RUST_LOG` is set (the
/// operator's word over the file's) or logging is not set up.
pub fn set_log_level(level: &str) -> Option<Result<(), String>> {
    LOG_LEVEL
        .get()
        .filter(|_| std::env::var_os("RUST_LOG").is_none())
        .map(|set| set(level))
}

/// Reads the CA, certificate and key files named in `[pki]` and checks them
/// against each other (both daemons start so).
pub fn load_identity(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, String> {
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p).map_err(|e| format!("reading {what} {}: {e}", p.display()))
    };
    let ca_text = read(ca, "CA file [pki] ca =")?;
    let cert_text = read(cert, "certificate [pki] cert =")?;
    let key_text = read(key, "key [pki] key =")?;
    Identity::from_pem(&ca_text, &cert_text, &key_text, unix_now()).map_err(|e| {
        format!(
            "checking identity (ca {}, cert {}, key {}): {e}",
            ca.display(),
            cert.display(),
            key.display()
        )
    })
}
