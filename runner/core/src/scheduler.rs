//! The runner's sans-IO core: who may run pipelines here, and the queue that
//! keeps at most `concurrency` jobs running while the rest wait and learn
//! their place in line. The shell (sockets, processes, workspaces) drives it.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use tern_shared::config::RunnerConfig;

/// A caller as the mesh knows it: from the verified certificate its
/// connection's overlay source address is bound to, never from anything the
/// caller says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub name: String,
    pub groups: Vec<String>,
    /// Hex SHA-256 of the caller's certificate.
    pub fingerprint: String,
}

impl Caller {
    /// The caller a verified certificate names.
    pub fn from_cert(cert: &tern_shared::cert::VerifiedCert) -> Caller {
        Caller {
            name: cert.name().to_string(),
            groups: cert.groups().to_vec(),
            fingerprint: cert.fingerprint().to_string(),
        }
    }
}

/// Why a caller may not run pipelines here: the groups it carries and the
/// ones that would do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{name} may not run pipelines here: its certificate carries {}, and this runner allows only members of {}",
    if carries.is_empty() { "no groups".to_string() } else { format!("the groups {}", carries.join(", ")) },
    allowed.join(", ")
)]
pub struct NotAllowed {
    pub name: String,
    pub carries: Vec<String>,
    pub allowed: Vec<String>,
}

/// A caller may run pipelines here if its certificate carries one of the
/// allowed groups. The refusal says which groups would do.
pub fn authorize(config: &RunnerConfig, caller: &Caller) -> Result<(), NotAllowed> {
    if caller
        .groups
        .iter()
        .any(|g| config.allow_groups.iter().any(|a| a == g))
    {
        return Ok(());
    }
    Err(NotAllowed {
        name: caller.name.clone(),
        carries: caller.groups.clone(),
        allowed: config.allow_groups.clone(),
    })
}

/// Jobs are numbered by the scheduler.
pub type JobId = u64;

/// What became of a submitted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start it now.
    Start,
    /// It waits; `position` 1 is next.
    Queued { position: u32 },
}

/// At most `concurrency` jobs run; the rest wait, first come first served.
#[derive(Debug)]
pub struct Scheduler {
    concurrency: usize,
    running: BTreeSet<JobId>,
    waiting: VecDeque<JobId>,
    next_id: JobId,
}

impl Scheduler {
    pub fn new(concurrency: u32) -> Self {
        Scheduler {
            concurrency: concurrency.max(1) as usize,
            running: BTreeSet::new(),
            waiting: VecDeque::new(),
            next_id: 1,
        }
    }

    /// A new job: its id and whether it starts now.
    pub fn submit(&mut self) -> (JobId, Admission) {
        let id = self.next_id;
        self.next_id += 1;
        if self.running.len() < self.concurrency && self.waiting.is_empty() {
            self.running.insert(id);
            (id, Admission::Start)
        } else {
            self.waiting.push_back(id);
            (
                id,
                Admission::Queued {
                    position: self.waiting.len() as u32,
                },
            )
        }
    }

    /// A job ended (finished, failed, cancelled, or its caller left while it
    /// waited). Returns the jobs that start now; the others' positions moved
    /// (see [`Scheduler::positions`]).
    pub fn done(&mut self, id: JobId) -> Vec<JobId> {
        if !self.running.remove(&id) {
            self.waiting.retain(|w| *w != id);
        }
        let mut started = Vec::new();
        while self.running.len() < self.concurrency {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            self.running.insert(next);
            started.push(next);
        }
        started
    }

    /// Every waiting job and its place in line (1 is next).
    pub fn positions(&self) -> Vec<(JobId, u32)> {
        self.waiting
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i as u32 + 1))
            .collect()
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn config(groups: &[&str]) -> RunnerConfig {
        RunnerConfig {
            labels: vec!["linux".into()],
            allow_groups: groups.iter().map(|g| g.to_string()).collect(),
            concurrency: 2,
            work_dir: PathBuf::from("/tmp/jobs"),
            max_job_duration: Duration::from_secs(3600),
            keep_workspaces: false,
            audit_log: PathBuf::from("/tmp/audit.jsonl"),
        }
    }

    fn caller(groups: &[&str]) -> Caller {
        Caller {
            name: "ci-7".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            fingerprint: "ab".repeat(32),
        }
    }

    #[test]
    fn only_members_of_an_allowed_group_may_run() {
        let c = config(&["ci", "deploy"]);
        assert!(authorize(&c, &caller(&["deploy"])).is_ok());
        assert!(authorize(&c, &caller(&["web", "ci"])).is_ok());
        let err = authorize(&c, &caller(&["web"])).unwrap_err().to_string();
        assert!(
            err.contains("ci-7") && err.contains("web") && err.contains("ci, deploy"),
            "{err}"
        );
        let err = authorize(&c, &caller(&[])).unwrap_err().to_string();
        assert!(err.contains("no groups"), "{err}");
    }

    #[test]
    fn two_at_once_the_rest_in_line_with_their_positions() {
        let mut s = Scheduler::new(2);
        let (a, first) = s.submit();
        let (b, second) = s.submit();
        assert_eq!((first, second), (Admission::Start, Admission::Start));
        let (c, third) = s.submit();
        let (d, _) = s.submit();
        let (e, fifth) = s.submit();
        assert_eq!(third, Admission::Queued { position: 1 });
        assert_eq!(fifth, Admission::Queued { position: 3 });
        assert_eq!(s.positions(), vec![(c, 1), (d, 2), (e, 3)]);
        // d's caller leaves while waiting: e moves up.
        assert!(s.done(d).is_empty());
        assert_eq!(s.positions(), vec![(c, 1), (e, 2)]);
        assert_eq!(s.done(a), vec![c]);
        assert_eq!(s.positions(), vec![(e, 1)]);
        assert_eq!(s.done(b), vec![e]);
        assert_eq!((s.running(), s.waiting()), (2, 0));
    }

    proptest! {
        #[test]
        fn never_more_than_concurrency_and_everyone_runs(
            concurrency in 1u32..5,
            ops in proptest::collection::vec(any::<bool>(), 1..200),
        ) {
            let mut s = Scheduler::new(concurrency);
            let mut running: Vec<JobId> = Vec::new();
            let mut submitted = 0;
            let mut started = 0;
            for submit in ops {
                if submit || running.is_empty() {
                    submitted += 1;
                    let (id, adm) = s.submit();
                    if adm == Admission::Start {
                        running.push(id);
                        started += 1;
                    }
                } else {
                    let id = running.remove(0);
                    for next in s.done(id) {
                        running.push(next);
                        started += 1;
                    }
                }
                prop_assert!(s.running() <= concurrency as usize);
                prop_assert_eq!(s.running(), running.len());
            }
            while let Some(id) = running.first().copied() {
                running.remove(0);
                for next in s.done(id) {
                    running.push(next);
                    started += 1;
                }
            }
            prop_assert_eq!(started, submitted, "every job ran");
        }
    }
}
