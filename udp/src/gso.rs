//! The rule for a GSO run, without sockets or buffers: datagrams to one
//! destination, each `segment` bytes but the last, which may be shorter and
//! then ends the run; at most the socket's segment limit and
//! [`crate::MAX_GSO_BYTES`] in all. Both the lighthouse's [`crate::SendBatch`]
//! and the node's data path (which seals straight into its run buffer) keep
//! their runs with it.

use std::net::SocketAddr;

/// One run being gathered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsoRun {
    pub dst: SocketAddr,
    /// The size of every datagram but the last.
    pub segment: usize,
    /// Datagrams in the run.
    pub count: usize,
    /// Bytes in the run.
    pub bytes: usize,
    /// The last datagram was shorter than `segment`: nothing may follow.
    closed: bool,
}

impl GsoRun {
    /// A run holding one datagram of `len` bytes.
    pub fn start(dst: SocketAddr, len: usize) -> GsoRun {
        GsoRun {
            dst,
            segment: len,
            count: 1,
            bytes: len,
            closed: false,
        }
    }

    /// Whether a datagram of `len` bytes to `dst` may join the run.
    pub fn joins(&self, dst: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.dst == dst
            && !self.closed
            && len <= self.segment
            && self.count < max_segments
            && self.bytes + len <= crate::MAX_GSO_BYTES
    }

    /// Adds a datagram of `len` bytes (one [`GsoRun::joins`] allowed).
    pub fn add(&mut self, len: usize) {
        self.count += 1;
        self.bytes += len;
        self.closed = len < self.segment;
    }

    /// The segment size for the GSO send: `None` for a lone datagram.
    pub fn segment_size(&self) -> Option<usize> {
        (self.count > 1).then_some(self.segment)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], port))
    }

    #[test]
    fn equal_datagrams_to_one_destination_join_and_a_shorter_one_ends_the_run() {
        let mut run = GsoRun::start(addr(1), 1400);
        assert_eq!(run.segment_size(), None, "a lone datagram is sent as is");
        assert!(run.joins(addr(1), 1400, 64));
        run.add(1400);
        assert!(!run.joins(addr(2), 1400, 64), "another destination");
        assert!(!run.joins(addr(1), 1401, 64), "a longer datagram");
        assert!(run.joins(addr(1), 600, 64));
        run.add(600);
        assert!(
            !run.joins(addr(1), 600, 64),
            "nothing follows a shorter one"
        );
        assert_eq!(run.segment_size(), Some(1400));
        assert_eq!((run.count, run.bytes), (3, 3400));
    }

    #[test]
    fn a_run_stops_at_the_segment_limit_and_the_byte_limit() {
        let mut run = GsoRun::start(addr(1), 1000);
        for _ in 1..4 {
            run.add(1000);
        }
        assert!(!run.joins(addr(1), 1000, 4), "four segments at most");
        let mut big = GsoRun::start(addr(1), 60_000);
        assert!(!big.joins(addr(1), 60_000, 64), "past MAX_GSO_BYTES");
        big.add(5_000);
        assert_eq!(big.bytes, 65_000);
    }

    proptest! {
        /// Whatever the datagrams, a run the rule builds is one GSO send
        /// the kernel splits back into exactly them: one destination, all
        /// `segment` bytes but a shorter last, within both limits.
        #[test]
        fn runs_split_back_into_their_datagrams(
            datagrams in proptest::collection::vec((0u16..3, 1usize..3000), 1..200),
            max_segments in 1usize..70,
        ) {
            let mut runs: Vec<(GsoRun, Vec<usize>)> = Vec::new();
            for (port, len) in datagrams {
                let dst = addr(port);
                match runs.last_mut() {
                    Some((run, lens)) if run.joins(dst, len, max_segments) => {
                        run.add(len);
                        lens.push(len);
                    }
                    _ => runs.push((GsoRun::start(dst, len), vec![len])),
                }
            }
            for (run, lens) in runs {
                prop_assert_eq!(run.count, lens.len());
                prop_assert!(run.count <= max_segments.max(1));
                prop_assert_eq!(run.bytes, lens.iter().sum::<usize>());
                prop_assert!(run.count == 1 || run.bytes <= crate::MAX_GSO_BYTES);
                let (last, rest) = lens.split_last().unwrap();
                prop_assert!(rest.iter().all(|&l| l == run.segment));
                prop_assert!(*last <= run.segment);
            }
        }
    }
}
