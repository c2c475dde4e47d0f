//! Certificates for tests: a CA and node certs made in memory. Panics on
//! error, which is what a test wants.

use crate::cert::{
    self_sign_ca, sign_issuer, sign_node, sign_under_issuer, CaPool, Cert, CertBody, CertKind,
    Fingerprint, VerifiedCert,
};
use crate::keys::{CaSecretKey, NodeSecretKey};

/// Unix time used as "now" by tests that need a fixed clock.
pub const TEST_NOW: u64 = 1_800_000_000;

pub struct TestCa {
    pub cert: Cert,
    pub key: CaSecretKey,
}

/// A node's certificate and key, plus the pool that verifies it.
pub struct TestNode {
    pub cert: Cert,
    pub key: NodeSecretKey,
}

impl TestCa {
    /// A CA valid from a day before [`TEST_NOW`] to a year after, with constraints.
    pub fn new(name: &str, ips: &[&str], groups: &[&str]) -> TestCa {
        let key = CaSecretKey::generate();
        let body = CertBody {
            kind: CertKind::Ca,
            name: name.to_string(),
            ips: ips.iter().map(|s| parse_net(s)).collect(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            subnets: vec![],
            dns_zones: vec![],
            not_before: TEST_NOW - 86_400,
            not_after: TEST_NOW + 365 * 86_400,
            public_key: key.public_bytes(),
            issuer: Fingerprint([0; 32]),
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: None,
        };
        let cert = self_sign_ca(body, &key).unwrap_or_else(|e| panic!("test CA: {e}"));
        TestCa { cert, key }
    }

    pub fn pool(&self) -> CaPool {
        CaPool::new(vec![self.cert.clone()]).unwrap_or_else(|e| panic!("test pool: {e}"))
    }

    /// A node cert valid from an hour before [`TEST_NOW`] for `lifetime_secs` after it.
    pub fn node(
        &self,
        name: &str,
        ip: &str,
        groups: &[&str],
        subnets: &[&str],
        lifetime_secs: u64,
    ) -> TestNode {
        self.node_with_zones(name, ip, groups, subnets, &[], lifetime_secs)
    }

    /// [`TestCa::node`] whose certificate also carries DNS zones.
    pub fn node_with_zones(
        &self,
        name: &str,
        ip: &str,
        groups: &[&str],
        subnets: &[&str],
        zones: &[&str],
        lifetime_secs: u64,
    ) -> TestNode {
        let key = NodeSecretKey::generate();
        let body = CertBody {
            kind: CertKind::Node,
            name: name.to_string(),
            ips: vec![parse_net(ip)],
            groups: groups.iter().map(|s| s.to_string()).collect(),
            subnets: subnets.iter().map(|s| parse_net(s)).collect(),
            dns_zones: zones.iter().map(|z| z.to_string()).collect(),
            not_before: TEST_NOW - 3600,
            not_after: TEST_NOW + lifetime_secs,
            public_key: key.public_bytes(),
            issuer: Fingerprint([0; 32]),
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: None,
        };
        let cert = sign_node(&self.cert, &self.key, body, TEST_NOW)
            .unwrap_or_else(|e| panic!("test node cert: {e}"));
        TestNode { cert, key }
    }
}

impl TestCa {
    /// `node`'s certificate signed again for the same key, name, address
    /// and groups, valid from `not_before` for `lifetime_secs` (a renewal).
    pub fn resign(&self, node: &TestNode, not_before: u64, lifetime_secs: u64) -> TestNode {
        let mut body = node.cert.body.clone();
        body.not_before = not_before;
        body.not_after = not_before + lifetime_secs;
        let cert = sign_node(&self.cert, &self.key, body, not_before)
            .unwrap_or_else(|e| panic!("test node cert: {e}"));
        TestNode {
            cert,
            key: node.key.clone(),
        }
    }
}

/// An issuer under a [`TestCa`] (a lighthouse's enrollment key).
pub struct TestIssuer {
    pub cert: Cert,
    pub key: CaSecretKey,
}

impl TestCa {
    /// An issuer for `pool`, `groups`, names starting with `prefix`, at
    /// most `max_lifetime` seconds each.
    pub fn issuer(
        &self,
        name: &str,
        pool: &str,
        groups: &[&str],
        prefix: &str,
        max_lifetime: u64,
    ) -> TestIssuer {
        self.delegating_issuer(name, pool, groups, prefix, max_lifetime, &[], &[])
    }

    /// An issuer as [`TestCa::issuer`] that also delegates `subnets` and
    /// DNS `zones` (for gateways it signs).
    #[allow(clippy::too_many_arguments)]
    pub fn delegating_issuer(
        &self,
        name: &str,
        pool: &str,
        groups: &[&str],
        prefix: &str,
        max_lifetime: u64,
        subnets: &[&str],
        zones: &[&str],
    ) -> TestIssuer {
        let key = CaSecretKey::generate();
        let body = CertBody {
            kind: CertKind::Issuer,
            name: name.to_string(),
            ips: vec![parse_net(pool)],
            groups: groups.iter().map(|s| s.to_string()).collect(),
            subnets: subnets.iter().map(|s| parse_net(s)).collect(),
            dns_zones: zones.iter().map(|z| z.to_string()).collect(),
            not_before: TEST_NOW - 86_400,
            not_after: TEST_NOW + 30 * 86_400,
            public_key: key.public_bytes(),
            issuer: Fingerprint([0; 32]),
            name_prefix: prefix.to_string(),
            max_lifetime,
            chain: None,
        };
        let cert = sign_issuer(&self.cert, &self.key, body, TEST_NOW)
            .unwrap_or_else(|e| panic!("test issuer: {e}"));
        TestIssuer { cert, key }
    }
}

impl TestIssuer {
    fn body(
        &self,
        name: &str,
        ip: &str,
        groups: &[&str],
        lifetime_secs: u64,
        key: &NodeSecretKey,
    ) -> CertBody {
        CertBody {
            kind: CertKind::Node,
            name: name.to_string(),
            ips: vec![parse_net(ip)],
            groups: groups.iter().map(|s| s.to_string()).collect(),
            subnets: vec![],
            dns_zones: vec![],
            not_before: TEST_NOW - 60,
            not_after: TEST_NOW - 60 + lifetime_secs,
            public_key: key.public_bytes(),
            issuer: self.cert.fingerprint(),
            name_prefix: String::new(),
            max_lifetime: 0,
            chain: Some(Box::new(self.cert.clone())),
        }
    }

    /// A node cert within the issuer's constraints.
    pub fn node(&self, name: &str, ip: &str, groups: &[&str], lifetime_secs: u64) -> TestNode {
        let key = NodeSecretKey::generate();
        let body = self.body(name, ip, groups, lifetime_secs, &key);
        let cert = sign_under_issuer(&self.cert, &self.key, body, TEST_NOW)
            .unwrap_or_else(|e| panic!("test issued cert: {e}"));
        TestNode { cert, key }
    }

    /// A gateway's cert within the issuer's constraints, routing `subnets`
    /// and answering for `zones` (inside what the issuer delegates).
    pub fn gateway(
        &self,
        name: &str,
        ip: &str,
        subnets: &[&str],
        zones: &[&str],
        lifetime_secs: u64,
    ) -> TestNode {
        let key = NodeSecretKey::generate();
        let body = CertBody {
            subnets: subnets.iter().map(|s| parse_net(s)).collect(),
            dns_zones: zones.iter().map(|z| z.to_string()).collect(),
            ..self.body(name, ip, &[], lifetime_secs, &key)
        };
        let cert = sign_under_issuer(&self.cert, &self.key, body, TEST_NOW)
            .unwrap_or_else(|e| panic!("test issued gateway cert: {e}"));
        TestNode { cert, key }
    }

    /// A node cert signed with the issuer's key whatever its constraints
    /// say: what a thief of the key could make. Peers must refuse it.
    pub fn forge(&self, name: &str, ip: &str, groups: &[&str], lifetime_secs: u64) -> TestNode {
        let key = NodeSecretKey::generate();
        let body = self.body(name, ip, groups, lifetime_secs, &key);
        let signature = self.key.sign(&crate::cert::signed_bytes(&body));
        TestNode {
            cert: Cert { body, signature },
            key,
        }
    }
}

impl TestNode {
    pub fn verified(&self, pool: &CaPool) -> VerifiedCert {
        pool.verify(&self.cert, TEST_NOW)
            .unwrap_or_else(|e| panic!("test node verify: {e}"))
    }
}

fn parse_net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap_or_else(|e| panic!("bad net {s}: {e}"))
}

/// A firewall that lets every peer in to this node's own address (tests of
/// everything but the firewall).
pub fn open_firewall() -> crate::policy::FirewallConfig {
    use crate::policy::{Action, FirewallConfig, PortRange, Proto, RuleConfig};
    FirewallConfig {
        inbound: vec![RuleConfig {
            proto: Proto::Any,
            port: PortRange::ANY,
            host: None,
            groups: vec![],
            cidr: None,
            local_cidr: None,
            action: Action::Allow,
        }],
        ..FirewallConfig::default()
    }
}
