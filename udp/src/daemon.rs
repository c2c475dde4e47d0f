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

/// How long before its certificate expires a daemon warns, and how long a
/// certificate must live for the warning to apply (a 30-minute CI
/// certificate is not warned about when it starts).
const EXPIRY_WARNINGS: [(u64, &str); 2] = [(7 * 86_400, "7 days"), (86_400, "1 day")];

/// Warnings before this daemon's certificate expires: at 7 days and at 1
/// day left, each once per certificate (a new certificate starts afresh),
/// and only for a certificate that lives at least twice that long.
#[derive(Debug, Default)]
pub struct ExpiryWarnings {
    given: usize,
}

impl ExpiryWarnings {
    /// Logs the warning now due, if any; returns whether it did.
    pub fn check(&mut self, cert: &tern_shared::cert::VerifiedCert, now_unix: u64) -> bool {
        let body = &cert.cert().body;
        let lifetime = body.not_after.saturating_sub(body.not_before);
        let left = body.not_after.saturating_sub(now_unix);
        let mut warned = false;
        while let Some(&(before, said)) = EXPIRY_WARNINGS.get(self.given) {
            if left > before {
                break;
            }
            self.given += 1;
            if lifetime >= 2 * before && !warned {
                tracing::warn!(
                    name = cert.name(),
                    until = %tern_shared::cert::format_unix_time(body.not_after),
                    "this daemon's certificate expires in less than {said}: sign a new one and send SIGHUP (or set [pki] renew where its issuer renews)"
                );
                warned = true;
            }
        }
        warned
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod expiry_tests {
    use super::*;
    use tern_shared::testing::{TestCa, TEST_NOW};

    #[test]
    fn warnings_come_once_at_seven_days_and_at_one_day() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        // Valid from TEST_NOW - 3600 for 30 days.
        let node = ca.node("gw", "100.64.0.9/10", &[], &[], 30 * 86_400);
        let cert = node.verified(&ca.pool());
        let end = TEST_NOW + 30 * 86_400;
        let mut w = ExpiryWarnings::default();
        assert!(!w.check(&cert, TEST_NOW), "a month left");
        assert!(w.check(&cert, end - 7 * 86_400 + 1), "under 7 days");
        assert!(!w.check(&cert, end - 6 * 86_400), "once");
        assert!(w.check(&cert, end - 3600), "under a day");
        assert!(!w.check(&cert, end - 60), "once");
    }

    #[test]
    fn a_short_lived_certificate_is_not_warned_about() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        // A CI job's certificate: 30 minutes.
        let node = ca.node("ci-1", "100.64.0.9/10", &[], &[], 1800);
        let cert = node.verified(&ca.pool());
        let mut w = ExpiryWarnings::default();
        assert!(!w.check(&cert, TEST_NOW));
        assert!(!w.check(&cert, TEST_NOW + 1700));
    }
}
