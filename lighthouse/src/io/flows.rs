//! Flow records into the store, on a thread of their own (the event loop
//! never waits for the database): batches the core took from nodes come
//! through a bounded channel; while it is full they stay in the core,
//! which then stops acknowledging new ones, so nodes keep theirs and send
//! them again. Records older than `[flows] retain` are deleted once a
//! minute.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tern_lighthouse_core::lighthouse::{FlowBatch, LighthouseCore};
use tern_shared::store::StoreLocation;

use crate::store::AnyStore;

/// Batches waiting for the store, at most.
const BATCHES_WAITING: usize = 512;
/// How often old records are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What the writer did, for the status and metrics.
#[derive(Debug, Default)]
pub struct FlowStoreCounters {
    pub stored: AtomicU64,
    /// Records a store error lost (logged).
    pub failed: AtomicU64,
    pub pruned: AtomicU64,
}

/// The writer thread and the way to it; dropped, it writes what it holds
/// and is joined.
pub struct FlowStore {
    tx: Option<SyncSender<FlowBatch>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<FlowStoreCounters>,
}

impl FlowStore {
    pub fn start(
        location: StoreLocation,
        password_file: Option<PathBuf>,
        retain: Duration,
    ) -> anyhow::Result<FlowStore> {
        let (tx, rx) = sync_channel::<FlowBatch>(BATCHES_WAITING);
        let counters = Arc::new(FlowStoreCounters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("flow-records".into())
            .spawn(move || {
                let mut writer = Writer {
                    location,
                    password_file,
                    store: None,
                    last_warning: None,
                    counters: c,
                };
                let mut next_prune = Instant::now();
                loop {
                    match rx.recv_timeout(PRUNE_EVERY) {
                        Ok(batch) => writer.insert(&batch),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    if Instant::now() >= next_prune {
                        writer.prune(retain);
                        next_prune = Instant::now() + PRUNE_EVERY;
                    }
                }
            })
            .context("starting the flow record writer")?;
        Ok(FlowStore {
            tx: Some(tx),
            thread: Some(thread),
            counters,
        })
    }

    /// Hands the core's batches to the writer while it has room.
    pub fn take(&self, core: &mut LighthouseCore) {
        let Some(tx) = &self.tx else {
            return;
        };
        while let Some(batch) = core.poll_flow_batch() {
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                    core.return_flow_batch(batch);
                    return;
                }
            }
        }
    }
}

impl FlowStore {
    /// The lighthouse stops: the batches it acknowledged are written
    /// before the writer ends.
    pub fn finish(mut self, core: &mut LighthouseCore) {
        if let Some(tx) = self.tx.take() {
            while let Some(batch) = core.poll_flow_batch() {
                if tx.send(batch).is_err() {
                    break;
                }
            }
        }
    }

    /// Records stored, lost to a store error, and deleted as too old.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.counters.stored.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
            self.counters.pruned.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FlowStore {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    location: StoreLocation,
    password_file: Option<PathBuf>,
    store: Option<AnyStore>,
    last_warning: Option<Instant>,
    counters: Arc<FlowStoreCounters>,
}

impl Writer {
    fn store(&mut self) -> Option<&mut AnyStore> {
        if self.store.is_none() {
            match crate::store::open(&self.location, self.password_file.as_deref()) {
                Ok(s) => self.store = Some(s),
                Err(e) => {
                    self.warn("cannot open the store for flow records", &format!("{e:#}"));
                    return None;
                }
            }
        }
        self.store.as_mut()
    }

    fn warn(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30))
        {
            self.last_warning = Some(now);
            tracing::warn!(store = %self.location, error = %e, "{what}");
        }
    }

    fn insert(&mut self, batch: &FlowBatch) {
        let now_ms = unix_ms();
        let result = match self.store() {
            Some(s) => s.insert_flows(batch, now_ms),
            None => {
                self.counters
                    .failed
                    .fetch_add(batch.flows.len() as u64, Ordering::Relaxed);
                return;
            }
        };
        match result {
            Ok(n) => {
                self.counters.stored.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .failed
                    .fetch_add(batch.flows.len() as u64, Ordering::Relaxed);
                self.warn("storing flow records failed; they are lost", &e);
            }
        }
    }

    fn prune(&mut self, retain: Duration) {
        let before = unix_ms().saturating_sub(retain.as_millis() as u64);
        let result = match self.store() {
            Some(s) => s.prune_flows(before),
            None => return,
        };
        match result {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(deleted = n, "flow records past [flows] retain deleted");
                }
                self.counters.pruned.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self.warn("deleting old flow records failed", &e),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
