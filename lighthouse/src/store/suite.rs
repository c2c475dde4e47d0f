//! The test suite every store passes (SQLite and PostgreSQL alike), through
//! [`EnrollStore`] alone: tokens and their uses, leases, OIDC replay marks,
//! the issuance log, revocations — and what must hold when two connections
//! (two lighthouses) race.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tern_lighthouse_core::enroll::{
    EnrollStore, NewToken, TokenIdPrefix, TokenRefusal, TokenRevokeRefusal,
};
use tern_shared::testing::TestCa;

use super::StoreError;

const NOW: u64 = 1_700_000_000;

/// Fresh connections to one empty store.
pub(crate) trait Backend {
    type Store: EnrollStore<Error = StoreError> + Into<super::AnyStore> + Send + 'static;
    fn connect(&self) -> Self::Store;
}

fn token(hash: &str, uses: u32, expires: u64) -> NewToken {
    NewToken {
        hash: hash.to_string(),
        groups: vec!["ci".into(), "deploy".into()],
        uses,
        expires,
        cert_ttl: 900,
    }
}

fn pool(cidr: &str) -> Vec<Ipv4Net> {
    vec![cidr.parse().unwrap()]
}

pub(crate) fn tokens_are_spent_once_and_refused_with_their_reason(b: &impl Backend) {
    let mut s = b.connect();
    s.create_token(&token("aa11", 2, NOW + 60), NOW).unwrap();
    s.create_token(&token("bb22", 1, NOW - 1), NOW - 100)
        .unwrap();
    let grant = s.peek_token("aa11", NOW).unwrap().unwrap();
    assert_eq!(grant.groups, ["ci", "deploy"]);
    assert_eq!(grant.cert_ttl, 900);
    assert!(s.use_token("aa11", NOW).unwrap().is_ok());
    assert!(s.use_token("aa11", NOW).unwrap().is_ok());
    assert_eq!(s.use_token("aa11", NOW).unwrap(), Err(TokenRefusal::UsedUp));
    assert_eq!(
        s.peek_token("aa11", NOW).unwrap(),
        Err(TokenRefusal::UsedUp)
    );
    assert_eq!(
        s.use_token("bb22", NOW).unwrap(),
        Err(TokenRefusal::Expired)
    );
    assert_eq!(
        s.peek_token("cc33", NOW).unwrap(),
        Err(TokenRefusal::Unknown)
    );
    let listed = s.list_tokens(NOW).unwrap();
    let ids: Vec<(&str, u32, bool)> = listed
        .iter()
        .map(|t| (t.id.as_str(), t.uses_left, t.expired))
        .collect();
    assert_eq!(ids, [("bb22", 1, true), ("aa11", 0, false)], "oldest first");
}

pub(crate) fn a_token_is_revoked_by_a_unique_prefix_of_its_id(b: &impl Backend) {
    let mut s = b.connect();
    let (one, two, other) = (
        "0123456789abcdef00".to_string(),
        "0123456789abffff11".to_string(),
        "fedcba9876543210aa".to_string(),
    );
    for h in [&one, &two, &other] {
        s.create_token(&token(h, 1, NOW + 60), NOW).unwrap();
    }
    let prefix = |p: &str| TokenIdPrefix::parse(p).unwrap();
    assert_eq!(
        s.revoke_token(&prefix("0123456789ab")).unwrap(),
        Err(TokenRevokeRefusal::Ambiguous {
            id: "0123456789ab".into(),
            count: 2
        })
    );
    assert_eq!(
        s.revoke_token(&prefix("fedcba98")).unwrap(),
        Ok("fedcba987654".to_string())
    );
    assert_eq!(
        s.use_token(&other, NOW).unwrap(),
        Err(TokenRefusal::Unknown)
    );
    assert!(matches!(
        s.revoke_token(&prefix("99999999")).unwrap(),
        Err(TokenRevokeRefusal::Unknown(_))
    ));
    assert!(s.use_token(&one, NOW).unwrap().is_ok(), "the others stay");
}

/// Two lighthouses spend one single-use token at once: one wins.
pub(crate) fn a_single_use_token_raced_on_two_connections_is_spent_once(b: &impl Backend) {
    for round in 0..10 {
        let hash = format!("race{round}");
        b.connect()
            .create_token(&token(&hash, 1, NOW + 60), NOW)
            .unwrap();
        let mut stores: Vec<_> = (0..2).map(|_| b.connect()).collect();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let handles: Vec<_> = stores
            .drain(..)
            .map(|mut s| {
                let (hash, barrier) = (hash.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    s.use_token(&hash, NOW).unwrap().is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(wins, 1, "round {round}");
    }
}

pub(crate) fn addresses_are_leased_round_robin_and_never_twice(b: &impl Backend) {
    let mut s = b.connect();
    let p = pool("100.64.100.0/29"); // six hosts
    let mut got = Vec::new();
    for i in 0..6 {
        got.push(
            s.lease(&p, &format!("n{i}"), NOW + 60, NOW)
                .unwrap()
                .unwrap(),
        );
    }
    let distinct: BTreeSet<Ipv4Addr> = got.iter().copied().collect();
    assert_eq!(distinct.len(), 6, "{got:?}");
    assert_eq!(s.lease(&p, "n6", NOW + 60, NOW).unwrap(), None, "exhausted");
    // Given back (its certificate never went out): free again.
    s.release_lease(got[2], "n2").unwrap();
    assert_eq!(s.lease(&p, "n7", NOW + 60, NOW).unwrap(), Some(got[2]));
    // Only a lease still held by that name is given back.
    s.release_lease(got[3], "somebody-else").unwrap();
    assert_eq!(s.lease(&p, "n8", NOW + 60, NOW).unwrap(), None);
    // Expired: free again, the longest-free first.
    let later = NOW + 61;
    let next = s.lease(&p, "n9", later + 60, later).unwrap().unwrap();
    assert!(distinct.contains(&next));
}

/// Two lighthouses lease from one pool at once: every address once.
pub(crate) fn leases_raced_on_two_connections_never_share_an_address(b: &impl Backend) {
    let p = pool("100.64.100.0/28"); // fourteen hosts
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let mut s = b.connect();
            let (p, barrier) = (p.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..8)
                    .filter_map(|i| s.lease(&p, &format!("t{t}-{i}"), NOW + 60, NOW).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let all: Vec<Ipv4Addr> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let distinct: BTreeSet<Ipv4Addr> = all.iter().copied().collect();
    assert_eq!(all.len(), 14, "every host leased once: {all:?}");
    assert_eq!(distinct.len(), 14, "{all:?}");
}

pub(crate) fn an_oidc_token_is_used_once_until_it_expires(b: &impl Backend) {
    let mut s = b.connect();
    assert!(!s.oidc_token_used("jti-1", NOW).unwrap());
    assert!(s.use_oidc_token("jti-1", NOW + 300, NOW).unwrap());
    assert!(s.oidc_token_used("jti-1", NOW).unwrap());
    assert!(
        !b.connect().use_oidc_token("jti-1", NOW + 300, NOW).unwrap(),
        "replayed at another lighthouse"
    );
    // Past its expiry the mark goes (the token itself is refused as expired).
    assert!(!s.oidc_token_used("jti-1", NOW + 301).unwrap());
    assert!(s.use_oidc_token("jti-1", NOW + 900, NOW + 301).unwrap());
}

pub(crate) fn issued_certificates_and_revocations_are_kept_in_order(b: &impl Backend) {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let a = ca.node("ci-a", "100.64.100.1/10", &["ci"], &[], 600);
    let c = ca.node("ci-c", "100.64.100.3/10", &["ci"], &[], 600);
    let mut s = b.connect();
    s.record_issued(&a.cert, &"token 0123456789ab".into(), NOW)
        .unwrap();
    s.record_issued(&c.cert, &"oidc github".into(), NOW)
        .unwrap();
    let (fa, fc) = (a.cert.fingerprint(), c.cert.fingerprint());
    assert_eq!(
        s.issued(&fa).unwrap(),
        Some(("ci-a".to_string(), a.cert.body.not_after))
    );
    assert_eq!(
        s.issued_named("ci-c", NOW).unwrap(),
        vec![(fc, c.cert.body.not_after)]
    );
    assert!(s
        .issued_named("ci-c", c.cert.body.not_after + 1)
        .unwrap()
        .is_empty());
    assert!(s.revoke(&fa, "ci-a", a.cert.body.not_after, NOW).unwrap());
    assert!(
        !b.connect()
            .revoke(&fa, "ci-a", a.cert.body.not_after, NOW)
            .unwrap(),
        "already"
    );
    assert!(s.revoke(&fc, "ci-c", u64::MAX, NOW).unwrap());
    let list = s.revocations(NOW).unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].0 < list[1].0, "versions grow: {list:?}");
    assert_eq!(list[0].1.fingerprint, fa);
    // Kept until the certificate would have expired anyway; "forever" stays.
    let later = b.connect().revocations(a.cert.body.not_after + 1).unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].1.fingerprint, fc);
    assert_eq!(later[0].1.not_after, i64::MAX as u64, "forever, as stored");
}

/// The admin API's issuance log: newest first, a page at a time, each
/// record once, whatever the page size.
pub(crate) fn the_issuance_log_pages_newest_first_each_record_once(b: &impl Backend) {
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let mut s = b.connect();
    let mut made = Vec::new();
    for i in 0..7u64 {
        let n = ca.node(
            &format!("ci-{i}"),
            &format!("100.64.100.{}/10", i + 1),
            &["ci"],
            &[],
            600,
        );
        // Two at each second: the fingerprint breaks the tie.
        s.record_issued(
            &n.cert,
            &tern_lighthouse_core::enroll::Issuance::from(format!("token {i}").as_str()),
            NOW + i / 2,
        )
        .unwrap();
        made.push(n.cert.fingerprint().to_string());
    }
    let mut any: super::AnyStore = b.connect().into();
    let (mut seen, mut before) = (Vec::new(), None::<(i64, String)>);
    for _ in 0..10 {
        let page = any
            .issued_page(before.as_ref().map(|(a, f)| (*a, f.as_str())), 3)
            .unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        before = Some((last.at, last.fingerprint.clone()));
        seen.extend(page.into_iter().map(|r| (r.at, r.fingerprint)));
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first, none twice: {seen:?}"
    );
    let mut fps: Vec<String> = seen.into_iter().map(|(_, f)| f).collect();
    fps.sort();
    made.sort();
    assert_eq!(fps, made);
    // Which token, and the OIDC claims, come back as they went in; a page
    // of nodes' records is one query; the last hour's count.
    let n = ca.node("ci-oidc", "100.64.100.99/10", &["ci"], &[], 600);
    let how = tern_lighthouse_core::enroll::Issuance {
        how: "oidc https://token.actions.example rule 0: repository=acme/app".into(),
        token: None,
        claims: [
            ("repository".to_string(), "acme/app".to_string()),
            ("run_id".to_string(), "4242".to_string()),
        ]
        .into(),
    };
    s.record_issued(&n.cert, &how, NOW + 100).unwrap();
    let fp = n.cert.fingerprint().to_string();
    let got = any.issued_records(&[fp.clone(), made[0].clone()]).unwrap();
    assert_eq!(got.len(), 2);
    let oidc = got.iter().find(|r| r.fingerprint == fp).unwrap();
    assert_eq!(
        tern_lighthouse_core::enroll::Issuance::claims_from_json(&oidc.claims),
        how.claims
    );
    let token = got.iter().find(|r| r.fingerprint == made[0]).unwrap();
    assert_eq!((token.token.as_str(), token.claims.as_str()), ("", "{}"));
    assert_eq!(any.issued_since((NOW + 100) as i64).unwrap(), 1);
    assert_eq!(any.issued_since(NOW as i64).unwrap(), 8);
}

/// `[pki] renew`, decided by the enroller against the store: the same
/// certificate for longer, its lease extended and the renewal recorded;
/// refused for an address another node holds, a revoked certificate, and
/// one another issuer signed.
pub(crate) fn a_certificate_is_renewed_with_its_lease(b: &impl Backend) {
    use tern_lighthouse_core::enroll::Enroller;
    use tern_shared::testing::TEST_NOW;
    let mut s = b.connect();
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &[]);
    let issuer = ca.issuer("lh-issuer", "100.64.100.0/24", &["gw"], "gw-", 7 * 86_400);
    let enroller = Enroller::new(issuer.cert.clone(), issuer.key.clone(), 10).unwrap();
    let gw = issuer.node("gw-1", "100.64.100.7/10", &["gw"], 3_600);
    let current = gw.verified(&ca.pool());
    let now = TEST_NOW + 2_400;
    let renewed = enroller.renew(&current, &mut s, now).unwrap();
    assert_eq!(renewed.body.public_key, current.public_key());
    assert_eq!(renewed.body.name, "gw-1");
    assert_eq!(renewed.body.ips, current.cert().body.ips);
    assert_eq!(renewed.body.groups, ["gw"]);
    assert_eq!(renewed.body.not_before, now);
    assert_eq!(renewed.body.not_after, now + 3_600, "as long as it was");
    assert!(
        s.issued(&renewed.fingerprint()).unwrap().is_some(),
        "recorded"
    );
    // The lease runs until the renewed certificate's end: nobody else gets
    // the address meanwhile.
    let only = pool("100.64.100.7/32");
    assert_eq!(
        s.lease(&only, "gw-other", now + 7_200, now + 3_500)
            .unwrap(),
        None
    );
    // Renewed again later (its own lease), fine.
    assert!(enroller.renew(&current, &mut s, now + 600).is_ok());

    // An address another node holds: refused, nothing recorded.
    let taken = pool("100.64.100.9/32");
    let far = TEST_NOW + 86_400;
    assert!(s
        .lease(&taken, "gw-9-old", far, TEST_NOW)
        .unwrap()
        .is_some());
    let gw9 = issuer.node("gw-9", "100.64.100.9/10", &["gw"], 3_600);
    let err = enroller
        .renew(&gw9.verified(&ca.pool()), &mut s, now)
        .unwrap_err();
    assert!(err.why.contains("leased to another node"), "{}", err.why);
    assert!(!err.store_unavailable);

    // Revoked: refused.
    s.revoke(&current.fingerprint(), "gw-1", current.not_after(), now)
        .unwrap();
    let err = enroller.renew(&current, &mut s, now).unwrap_err();
    assert!(err.why.contains("revoked"), "{}", err.why);

    // A gateway under an issuer that delegates its subnet and zone, one
    // that only renews ([[enroll.renew]]): the renewal routes and answers
    // for the same.
    let delegating = ca.delegating_issuer(
        "gw-issuer",
        "100.64.102.0/24",
        &[],
        "gw-",
        86_400,
        &["198.19.0.0/16"],
        &["internal"],
    );
    let enroller = Enroller::new(issuer.cert.clone(), issuer.key.clone(), 10)
        .unwrap()
        .with_renewing(delegating.cert.clone(), delegating.key.clone())
        .unwrap();
    let routing = delegating
        .gateway(
            "gw-2",
            "100.64.102.2/10",
            &["198.19.1.0/24"],
            &["db.internal"],
            120,
        )
        .verified(&ca.pool());
    let renewed = enroller.renew(&routing, &mut s, TEST_NOW + 30).unwrap();
    assert_eq!(renewed.body.subnets, routing.subnets());
    assert_eq!(renewed.body.dns_zones, routing.dns_zones());
    assert_eq!(renewed.body.not_after, TEST_NOW + 30 + 120);
    ca.pool()
        .verify(&renewed, TEST_NOW + 30)
        .expect("the renewed gateway verifies");
    // That issuer revoked: nothing it signed is renewed.
    s.revoke(
        &delegating.cert.fingerprint(),
        "gw-issuer",
        delegating.cert.body.not_after,
        TEST_NOW + 31,
    )
    .unwrap();
    let err = enroller.renew(&routing, &mut s, TEST_NOW + 32).unwrap_err();
    assert!(err.why.contains("revoked"), "{}", err.why);

    // Another issuer's certificate: refused.
    let other = ca.issuer("other", "100.64.101.0/24", &["gw"], "gw-", 86_400);
    let stranger = other.node("gw-5", "100.64.101.5/10", &["gw"], 3_600);
    let err = enroller
        .renew(&stranger.verified(&ca.pool()), &mut s, now)
        .unwrap_err();
    assert!(
        err.why.contains("not signed by this lighthouse's issuer"),
        "{}",
        err.why
    );
}

/// The suite as `#[test]`s for a backend expression.
pub(crate) fn a_use_and_its_record_are_one_step(b: &impl Backend) {
    let mut s = b.connect();
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci"]);
    let first = ca.node("ci-1", "100.64.100.1/10", &["ci"], &[], 600);
    let second = ca.node("ci-2", "100.64.100.2/10", &["ci"], &[], 600);
    s.create_token(&token("cc33", 1, NOW + 60), NOW).unwrap();
    assert!(s
        .use_token_for("cc33", &first.cert, &"token".into(), NOW)
        .unwrap()
        .is_ok());
    assert!(s.issued(&first.cert.fingerprint()).unwrap().is_some());
    // Used up: refused, and nothing recorded.
    assert_eq!(
        s.use_token_for("cc33", &second.cert, &"token".into(), NOW)
            .unwrap(),
        Err(TokenRefusal::UsedUp)
    );
    assert!(s.issued(&second.cert.fingerprint()).unwrap().is_none());
    // The same for an OIDC token's one enrollment.
    assert!(s
        .use_oidc_token_for("iss jti-9", NOW + 60, &second.cert, &"oidc".into(), NOW)
        .unwrap());
    assert!(s.issued(&second.cert.fingerprint()).unwrap().is_some());
    let third = ca.node("ci-3", "100.64.100.3/10", &["ci"], &[], 600);
    assert!(!s
        .use_oidc_token_for("iss jti-9", NOW + 60, &third.cert, &"oidc".into(), NOW)
        .unwrap());
    assert!(s.issued(&third.cert.fingerprint()).unwrap().is_none());
}

/// Flow records: kept once per node and sequence number, found by each
/// filter, joined to the issuance log's claims, pruned by age.
pub(crate) fn flow_records_are_kept_once_found_by_filter_and_pruned(b: &impl Backend) {
    use tern_lighthouse_core::flows::FlowQuery;
    use tern_lighthouse_core::lighthouse::FlowBatch;
    use tern_shared::flows::{FlowEnd, FlowEntry};
    let mut s = b.connect();
    let ca = TestCa::new("ca", &["100.64.0.0/10"], &["ci"]);
    let job = ca.node("ci-job-7", "100.64.100.7/10", &["ci"], &[], 600);
    let other = ca.node("dev-1", "100.64.0.9/10", &["ci"], &[], 600);
    let how = tern_lighthouse_core::enroll::Issuance {
        how: "oidc https://token.actions.example rule 0".into(),
        token: None,
        claims: [
            ("repository".to_string(), "acme/app".to_string()),
            ("run_id".to_string(), "4242".to_string()),
        ]
        .into(),
    };
    s.record_issued(&job.cert, &how, NOW).unwrap();
    let entry =
        |seq: u64, who: &tern_shared::testing::TestNode, port: u16, allowed: bool, end_ms: u64| {
            FlowEntry {
                seq,
                start_ms: end_ms - 500,
                end_ms,
                caller: who.cert.body.name.clone(),
                fingerprint: who.cert.fingerprint(),
                groups: vec!["ci".into()],
                src: Ipv4Addr::new(100, 64, 100, 7),
                src_port: 40000,
                dst: Ipv4Addr::new(198, 19, 0, 10),
                dst_port: port,
                dst_port_last: if allowed { port } else { port + 10 },
                proto: 6,
                allowed,
                rule: allowed.then_some(1),
                reason: if allowed {
                    FlowEnd::Closed
                } else {
                    FlowEnd::Denied
                },
                bytes_in: if seq == u64::MAX { u64::MAX } else { 1200 },
                packets_in: 3,
                bytes_out: 4000,
                packets_out: 4,
            }
        };
    let ms = NOW * 1000;
    let batch = FlowBatch {
        node: "gw-1".into(),
        node_fingerprint: tern_shared::cert::Fingerprint([9; 32]),
        dropped: 5,
        flows: vec![
            entry(u64::MAX, &job, 5432, true, ms + 1000),
            entry(2, &job, 22, false, ms + 2000),
            entry(3, &other, 8080, true, ms - 3_600_000),
        ],
    };
    let mut any: super::AnyStore = s.into();
    assert_eq!(any.insert_flows(&batch, ms).unwrap(), 3);
    assert_eq!(
        any.insert_flows(&batch, ms).unwrap(),
        0,
        "sent again: kept once"
    );
    let q = |f: &dyn Fn(&mut FlowQuery)| {
        let mut q = FlowQuery {
            limit: 100,
            ..FlowQuery::default()
        };
        f(&mut q);
        q
    };
    let all = any.flows(&q(&|_| {}), ms).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].entry, batch.flows[1], "newest first, as it went in");
    assert_eq!(all[1].entry.seq, u64::MAX);
    assert_eq!(
        all[1].entry.bytes_in,
        i64::MAX as u64,
        "counts beyond i64 are capped"
    );
    let enrolled = all[0].enrollment.as_ref().unwrap();
    assert_eq!(enrolled["claims"]["repository"], "acme/app");
    assert!(all[2].enrollment.is_none(), "dev-1 was not issued here");
    let mut count = |f: &dyn Fn(&mut FlowQuery)| any.flows(&q(f), ms + 10_000).unwrap().len();
    assert_eq!(count(&|q| q.name = Some("ci-job-7".into())), 2);
    assert_eq!(
        count(&|q| q.fingerprint = Some(job.cert.fingerprint().to_string()[..10].into())),
        2
    );
    assert_eq!(
        count(&|q| q.claim = Some(("repository".into(), "acme/app".into()))),
        2
    );
    assert_eq!(
        count(&|q| q.claim = Some(("run_id".into(), "4242".into()))),
        2
    );
    assert_eq!(
        count(&|q| q.claim = Some(("repository".into(), "acme/other".into()))),
        0
    );
    assert_eq!(
        count(&|q| q.dest = Some(("198.19.0.0/24".parse().unwrap(), Some(5432)))),
        1
    );
    assert_eq!(
        count(&|q| q.dest = Some(("198.19.0.0/24".parse().unwrap(), Some(25)))),
        1,
        "within a refusal's ports"
    );
    assert_eq!(
        count(&|q| q.dest = Some(("198.19.1.0/24".parse().unwrap(), None))),
        0
    );
    assert_eq!(count(&|q| q.denied = true), 1);
    assert_eq!(
        count(&|q| q.since = Some(std::time::Duration::from_secs(10))),
        2
    );
    assert_eq!(count(&|q| q.node = Some("gw-2".into())), 0);
    assert_eq!(count(&|q| q.limit = 1), 1);
    let sources = any.flow_sources().unwrap();
    assert_eq!((sources[0].node.as_str(), sources[0].dropped), ("gw-1", 5));
    assert_eq!(any.prune_flows(ms).unwrap(), 1);
    assert_eq!(any.flows(&q(&|_| {}), ms).unwrap().len(), 2);
}

macro_rules! store_suite {
    ($backend:expr) => {
        #[test]
        fn flow_records_are_kept_once_found_by_filter_and_pruned() {
            if let Some(b) = $backend {
                $crate::store::suite::flow_records_are_kept_once_found_by_filter_and_pruned(&b);
            }
        }
        #[test]
        fn a_certificate_is_renewed_with_its_lease() {
            if let Some(b) = $backend {
                $crate::store::suite::a_certificate_is_renewed_with_its_lease(&b);
            }
        }
        #[test]
        fn a_use_and_its_record_are_one_step() {
            if let Some(b) = $backend {
                $crate::store::suite::a_use_and_its_record_are_one_step(&b);
            }
        }
        #[test]
        fn tokens_are_spent_once_and_refused_with_their_reason() {
            if let Some(b) = $backend {
                $crate::store::suite::tokens_are_spent_once_and_refused_with_their_reason(&b);
            }
        }
        #[test]
        fn a_token_is_revoked_by_a_unique_prefix_of_its_id() {
            if let Some(b) = $backend {
                $crate::store::suite::a_token_is_revoked_by_a_unique_prefix_of_its_id(&b);
            }
        }
        #[test]
        fn a_single_use_token_raced_on_two_connections_is_spent_once() {
            if let Some(b) = $backend {
                $crate::store::suite::a_single_use_token_raced_on_two_connections_is_spent_once(&b);
            }
        }
        #[test]
        fn addresses_are_leased_round_robin_and_never_twice() {
            if let Some(b) = $backend {
                $crate::store::suite::addresses_are_leased_round_robin_and_never_twice(&b);
            }
        }
        #[test]
        fn leases_raced_on_two_connections_never_share_an_address() {
            if let Some(b) = $backend {
                $crate::store::suite::leases_raced_on_two_connections_never_share_an_address(&b);
            }
        }
        #[test]
        fn an_oidc_token_is_used_once_until_it_expires() {
            if let Some(b) = $backend {
                $crate::store::suite::an_oidc_token_is_used_once_until_it_expires(&b);
            }
        }
        #[test]
        fn the_issuance_log_pages_newest_first_each_record_once() {
            if let Some(b) = $backend {
                $crate::store::suite::the_issuance_log_pages_newest_first_each_record_once(&b);
            }
        }
        #[test]
        fn issued_certificates_and_revocations_are_kept_in_order() {
            if let Some(b) = $backend {
                $crate::store::suite::issued_certificates_and_revocations_are_kept_in_order(&b);
            }
        }
    };
}
pub(crate) use store_suite;
