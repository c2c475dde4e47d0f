//! Load on the lighthouse's admin console for the benchmarks, over its
//! Unix API socket (plain HTTP/1.1, as `curl --unix-socket` speaks it):
//! a page fetched with its time to first byte and to its last byte, and
//! consoles that watch a live view (server-sent events) and count the
//! updates they get. Every wait is bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One page fetched: its status, when its first byte came and its last,
/// and its length.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub status: u16,
    pub first_byte: Duration,
    pub full: Duration,
    pub bytes: usize,
}

/// `GET path` on the lighthouse's API socket, timed from the request's
/// first byte written.
pub fn timed_get(socket: &Path, path: &str) -> Result<Fetched, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lighthouse\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET {path}: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut answer = Vec::new();
    let mut first_byte = None;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| start.elapsed());
                answer.extend_from_slice(&buf[..n]);
            }
            Err(e) => return Err(format!("GET {path}: {e}")),
        }
    }
    let full = start.elapsed();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP answer"))?;
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    Ok(Fetched {
        status,
        first_byte: first_byte.unwrap_or(full),
        full,
        bytes: body,
    })
}

/// The median and the 90th percentile.
pub fn median_p90(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    (at(0.5), at(0.9))
}

/// Consoles watching live views, each a thread reading an event stream.
pub struct Watchers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<u64, String>>>,
}

impl Watchers {
    /// One watcher per entry of `views` (`overview`, `nodes`, with a query
    /// after it if wanted); returns once each has had its first update (the
    /// view as it is), or why not within 10 s.
    pub fn start(socket: &Path, views: &[&str]) -> Result<Watchers, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for view in views {
            let (socket, path) = (PathBuf::from(socket), format!("/events?view={view}"));
            let (stop, ready) = (stop.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                watch(&socket, &path, &stop, &ready)
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in views {
            let left = deadline.saturating_duration_since(Instant::now());
            ready_rx
                .recv_timeout(left)
                .map_err(|_| "a console's live view sent nothing within 10 s".to_string())?;
        }
        Ok(Watchers { stop, threads })
    }

    /// Stops them; the updates each got (after its first).
    pub fn stop(self) -> Result<Vec<u64>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().map_err(|_| "a watcher panicked".to_string())?)
            .collect()
    }
}

fn watch(
    socket: &Path,
    path: &str,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<()>,
) -> Result<u64, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connecting: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: lighthouse\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut updates, mut tail) = (0u64, String::new());
    let mut first = true;
    // At most an hour, whatever happens.
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("{path}: the lighthouse closed the stream")),
            Ok(n) => {
                tail.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(at) = tail.find("event: update") {
                    tail.drain(..at + "event: update".len());
                    if first {
                        first = false;
                        let _ = ready.send(());
                    } else {
                        updates += 1;
                    }
                }
                // Keep only what could begin the next marker.
                let keep = tail.len().saturating_sub(16);
                let keep = (0..=keep)
                    .rev()
                    .find(|i| tail.is_char_boundary(*i))
                    .unwrap_or(0);
                tail.drain(..keep);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    Ok(updates)
}
