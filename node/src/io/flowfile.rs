//! `[flows] path`: flow records as JSON lines, written by a thread of their
//! own so that the event loop never waits for the disk. The loop hands
//! records over through a bounded channel; when it is full they are
//! dropped and counted (the core logs and ships the count). The file is
//! mode 0600, rotated past `rotate_size_mb` (`PATH.1` the newest of
//! `rotate_keep` old files).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::thread::JoinHandle;

use anyhow::Context;
use tern_shared::flows::{FlowEntry, FlowView, FlowsConfig};

/// Batches of records waiting for the writer, at most.
const BATCHES_WAITING: usize = 256;
/// Written lines reach the file within this long (one write for many
/// records, not one each).
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The writer thread and the way to it. Dropped: the thread writes what
/// it holds, closes the file and is joined.
pub struct FlowFile {
    tx: Option<SyncSender<Vec<FlowEntry>>>,
    thread: Option<JoinHandle<()>>,
}

impl FlowFile {
    /// Opens (creates, mode 0600) the file and starts the writer. `node`
    /// names this node in each line.
    pub fn start(config: &FlowsConfig, node: &str) -> anyhow::Result<Option<FlowFile>> {
        let Some(path) = config.path.clone() else {
            return Ok(None);
        };
        let file = open(&path).with_context(|| format!("[flows] path {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut writer = Writer {
            path,
            out: BufWriter::new(file),
            size,
            max: config.rotate_size_mb.saturating_mul(1 << 20),
            keep: config.rotate_keep,
            node: node.to_string(),
        };
        let (tx, rx) = sync_channel::<Vec<FlowEntry>>(BATCHES_WAITING);
        let thread = std::thread::Builder::new()
            .name("tern-flows".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                let mut unflushed: Option<std::time::Instant> = None;
                loop {
                    let wait = unflushed.map_or(FLUSH_EVERY * 3600, |t| {
                        (t + FLUSH_EVERY).saturating_duration_since(std::time::Instant::now())
                    });
                    match rx.recv_timeout(wait) {
                        Ok(batch) => {
                            writer.write(&batch);
                            unflushed.get_or_insert_with(std::time::Instant::now);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    if unflushed.is_some_and(|t| t.elapsed() >= FLUSH_EVERY) {
                        if let Err(e) = writer.out.flush() {
                            tracing::warn!(error = %e, path = %writer.path.display(), "flow records: write failed");
                        }
                        unflushed = None;
                    }
                }
                let _ = writer.out.flush();
            })
            .context("starting the flow record writer")?;
        Ok(Some(FlowFile {
            tx: Some(tx),
            thread: Some(thread),
        }))
    }

    /// Hands records to the writer; returns how many were dropped (its
    /// queue full).
    pub fn send(&self, entries: Vec<FlowEntry>) -> u64 {
        let Some(tx) = &self.tx else {
            return entries.len() as u64;
        };
        match tx.try_send(entries) {
            Ok(()) => 0,
            Err(TrySendError::Full(v) | TrySendError::Disconnected(v)) => v.len() as u64,
        }
    }
}

impl Drop for FlowFile {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max: u64,
    keep: u32,
    node: String,
}

impl Writer {
    fn write(&mut self, batch: &[FlowEntry]) {
        for e in batch {
            let mut line = match serde_json::to_vec(&FlowView::new(&self.node, e)) {
                Ok(l) => l,
                Err(_) => continue,
            };
            line.push(b'\n');
            if self.size > 0 && self.size + line.len() as u64 > self.max {
                if let Err(e) = self.rotate() {
                    tracing::warn!(error = %e, path = %self.path.display(), "flow records: rotation failed; writing on");
                }
            }
            if let Err(e) = self.out.write_all(&line) {
                tracing::warn!(error = %e, path = %self.path.display(), "flow records: write failed");
                return;
            }
            self.size += line.len() as u64;
        }
    }

    /// `PATH` becomes `PATH.1`, `PATH.1` `PATH.2`, …; the oldest goes.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.out = BufWriter::new(open(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

/// Opens for appending, created 0600; an existing file is made 0600.
fn open(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tern_shared::cert::Fingerprint;
    use tern_shared::flows::FlowEnd;

    fn entry(seq: u64) -> FlowEntry {
        FlowEntry {
            seq,
            start_ms: 1_800_000_000_000,
            end_ms: 1_800_000_001_500,
            caller: "ci-1".into(),
            fingerprint: Fingerprint([3; 32]),
            groups: vec!["ci".into()],
            src: Ipv4Addr::new(100, 64, 0, 5),
            src_port: 40000,
            dst: Ipv4Addr::new(198, 19, 0, 10),
            dst_port: 5432,
            dst_port_last: 5432,
            proto: 6,
            allowed: true,
            rule: Some(1),
            reason: FlowEnd::Closed,
            bytes_in: 100,
            packets_in: 2,
            bytes_out: 300,
            packets_out: 3,
        }
    }

    #[test]
    fn lines_are_json_the_file_is_private_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        let config = FlowsConfig {
            path: Some(path.clone()),
            rotate_size_mb: 1,
            rotate_keep: 2,
            ..FlowsConfig::default()
        };
        let file = FlowFile::start(&config, "gw-1").unwrap().unwrap();
        // About 400 bytes a line: 3 MiB of lines makes two rotations and more.
        for batch in 0..80u64 {
            assert_eq!(
                file.send((0..100).map(|i| entry(batch * 100 + i)).collect()),
                0
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(file);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(dir.path().join("flows.jsonl.1").exists());
        assert!(dir.path().join("flows.jsonl.2").exists());
        assert!(!dir.path().join("flows.jsonl.3").exists(), "two kept");
        assert!(
            std::fs::metadata(dir.path().join("flows.jsonl.1"))
                .unwrap()
                .len()
                <= 1 << 20
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let last: FlowView = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last.node, "gw-1");
        assert_eq!(last.caller, "ci-1");
        assert_eq!(last.start, "2027-01-15T08:00:00.000Z");
        assert_eq!(
            (last.dst_port, last.verdict.as_str(), last.rule),
            (5432, "allow", Some(1))
        );
        assert_eq!(last.reason, FlowEnd::Closed);
    }
}
