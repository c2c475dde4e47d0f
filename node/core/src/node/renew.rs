//! `[pki] renew`: a long-lived node (a runner, or a gateway under an issuer
//! that delegates its subnets and zones) whose certificate a lighthouse's
//! issuer signed asks a lighthouse for a fresh one at two thirds of its
//! lifetime, inside the session that certificate authenticated; the answer
//! is verified here like any certificate, must be for the same key, name,
//! address, groups, subnets and zones, and goes to the shell
//! ([`NodeEvent::Renewed`]) to be written and swapped in. Asked again every
//! [`RENEW_RETRY`] until it succeeds or the certificate expires.

use std::time::{Duration, Instant};

use tern_shared::cert::VerifiedCert;
use tern_shared::control::{ControlMessage, RenewOutcome};

use super::{NodeCore, NodeEvent};

/// How long after asking (or a refusal) the node asks again.
pub const RENEW_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(super) struct Renewal {
    enabled: bool,
    /// When our certificate is due for renewal (Unix seconds): two thirds
    /// into its life.
    due_unix: u64,
    /// The request in flight (its id) and when it left.
    asked: Option<(u32, Instant)>,
    /// The certificate was renewed into one we handed to the shell; nothing
    /// more is asked until the shell swaps it in (a new `due_unix`).
    handed_over: bool,
}

/// Two thirds into the life of `cert` (Unix seconds).
pub fn renewal_due(cert: &VerifiedCert) -> u64 {
    let body = &cert.cert().body;
    body.not_before + body.not_after.saturating_sub(body.not_before) * 2 / 3
}

impl NodeCore {
    /// Turns `[pki] renew` on for the certificate this node runs with.
    pub fn enable_renewal(&mut self, own_cert: &VerifiedCert) {
        self.renewal = Renewal {
            enabled: true,
            due_unix: renewal_due(own_cert),
            asked: None,
            handed_over: false,
        };
    }

    /// When the next renewal request is due (for [`NodeCore::poll_timeout`]).
    pub(super) fn renewal_deadline(&self, now: Instant) -> Option<Instant> {
        let r = &self.renewal;
        if !r.enabled || r.handed_over {
            return None;
        }
        if let Some((_, at)) = r.asked {
            return Some(at + RENEW_RETRY);
        }
        let unix = self.mesh.unix_time(now);
        Some(now + Duration::from_secs(r.due_unix.saturating_sub(unix)))
    }

    pub(super) fn drive_renewal(&mut self, now: Instant) {
        let r = &self.renewal;
        if !r.enabled || r.handed_over || self.mesh.unix_time(now) < r.due_unix {
            return;
        }
        if r.asked
            .is_some_and(|(_, at)| now.saturating_duration_since(at) < RENEW_RETRY)
        {
            return;
        }
        let Some((peer, ip)) = self.registered_lighthouses().first().copied() else {
            return; // asked once a lighthouse is up
        };
        let id = self.request_id();
        tracing::info!(lighthouse = %ip, "asking for a renewed certificate ([pki] renew)");
        self.send_control(peer, ip, &ControlMessage::RenewRequest { id }, now);
        self.renewal.asked = Some((id, now));
    }

    /// A lighthouse's answer: a certificate that verifies and renews ours
    /// exactly (key, name, address, groups, subnets, zones) goes to the shell.
    pub(super) fn renew_reply(&mut self, id: u32, outcome: RenewOutcome, now: Instant) {
        if self.renewal.asked.map(|(i, _)| i) != Some(id) {
            return; // an answer to a request we no longer wait for
        }
        let cert = match outcome {
            RenewOutcome::Refused(why) => {
                tracing::warn!(reason = %why, retry_in = ?RENEW_RETRY, "certificate renewal refused");
                return;
            }
            RenewOutcome::Renewed(bytes) => bytes,
        };
        let unix = self.mesh.unix_time(now);
        let renewed = match self.mesh.ca().verify_bytes(&cert, unix) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(reason = %e, "the renewed certificate does not verify; kept the running one");
                return;
            }
        };
        let own = self.mesh.own_cert();
        let same = renewed.public_key() == own.public_key()
            && renewed.name() == own.name()
            && renewed.overlay_ip() == own.overlay_ip()
            && renewed.overlay_net() == own.overlay_net()
            && renewed.groups() == own.groups()
            && renewed.subnets() == own.subnets()
            && renewed.dns_zones() == own.dns_zones()
            && renewed.not_after() > own.not_after();
        if !same {
            tracing::warn!("the lighthouse's renewed certificate is not a renewal of ours (another key, name, address, groups, subnets or zones, or no later expiry); kept the running one");
            return;
        }
        self.renewal.handed_over = true;
        self.renewal.asked = None;
        self.events.push(NodeEvent::Renewed(renewed));
    }

    /// The shell swapped the renewed certificate in (or gave up on it):
    /// the next renewal is due two thirds into `cert`'s life.
    pub fn renewal_done(&mut self, cert: &VerifiedCert) {
        if self.renewal.enabled {
            self.renewal.due_unix = renewal_due(cert);
            self.renewal.handed_over = false;
            self.renewal.asked = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::node::tests::node_as;
    use tern_shared::testing::{TestCa, TEST_NOW};

    #[test]
    fn renewal_is_due_two_thirds_into_the_life() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        // Valid from TEST_NOW - 3600 for 3600 + 5400 seconds.
        let me = ca.node("me", "100.64.0.5/10", &[], &[], 5_400);
        let cert = me.verified(&ca.pool());
        assert_eq!(renewal_due(&cert), TEST_NOW - 3_600 + 6_000);
    }

    #[test]
    fn only_a_true_renewal_of_ours_reaches_the_shell() {
        let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
        let me = ca.node("me", "100.64.0.5/10", &["gw"], &[], 86_400);
        let mut core = node_as(&ca, &me);
        let now = Instant::now();
        core.enable_renewal(&me.verified(&ca.pool()));
        core.renewal.asked = Some((7, now));
        let renewed = ca.resign(&me, TEST_NOW, 2 * 86_400);
        let other_key = ca.node("me", "100.64.0.5/10", &["gw"], &[], 2 * 86_400);
        let other_ip = ca.node("me", "100.64.0.6/10", &["gw"], &[], 2 * 86_400);
        let foreign = TestCa::new("x", &["100.64.0.0/10"], &[]).resign(&me, TEST_NOW, 2 * 86_400);
        let renewed_event = |core: &mut NodeCore| {
            let mut got = None;
            while let Some(e) = core.poll_event() {
                if let NodeEvent::Renewed(c) = e {
                    got = Some(c);
                }
            }
            got
        };
        for (why, bytes) in [
            ("another key", other_key.cert.encode()),
            ("another address", other_ip.cert.encode()),
            ("another CA", foreign.cert.encode()),
            ("garbage", vec![1, 2, 3]),
        ] {
            core.renew_reply(7, RenewOutcome::Renewed(bytes), now);
            assert!(
                renewed_event(&mut core).is_none(),
                "{why} must not reach the shell"
            );
        }
        core.renew_reply(7, RenewOutcome::Refused("no".into()), now);
        assert!(renewed_event(&mut core).is_none());
        // An answer to another request: ignored.
        core.renew_reply(8, RenewOutcome::Renewed(renewed.cert.encode()), now);
        assert!(renewed_event(&mut core).is_none());
        core.renew_reply(7, RenewOutcome::Renewed(renewed.cert.encode()), now);
        let got = renewed_event(&mut core).expect("the renewal reaches the shell");
        assert_eq!(got.not_after(), TEST_NOW + 2 * 86_400);
        // Nothing more is asked until the shell is done with it.
        assert!(core.renewal_deadline(now).is_none());
        core.renewal_done(&got);
        assert!(core.renewal_deadline(now).is_some());
    }
}
