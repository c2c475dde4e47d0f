//! Renewing a node's certificate (`[pki] renew` on the node): what the
//! enrollment thread decides when a node asks, in the session its current
//! certificate authenticated, for a fresh one. Sans-IO: the store is the
//! trait the shell implements.

use ipnet::IpNet;
use tern_shared::cert::{self, Cert, CertBody, VerifiedCert};

use crate::enroll::{store_down, EnrollStore, Enroller, Refusal};

/// Why a renewal was refused, and whether the store was down (the node may
/// ask again shortly) or the answer is final for this certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewRefusal {
    pub why: String,
    pub store_unavailable: bool,
}

impl From<Refusal> for RenewRefusal {
    fn from(r: Refusal) -> RenewRefusal {
        RenewRefusal {
            why: r.why,
            store_unavailable: r.store_unavailable,
        }
    }
}

impl Enroller {
    /// A fresh certificate for `current` (which the session proved the node
    /// holds): the same key, name, addresses, groups, subnets and zones,
    /// valid from `now` for as long as `current` was (at most the issuer's
    /// longest lifetime, and not past the issuer). Only a certificate one
    /// of this lighthouse's issuers signed (`[enroll]`'s or one of
    /// `[[enroll.renew]]`), and not revoked; its address lease is extended
    /// (or taken, if free) and the new certificate recorded, in one step of
    /// the store.
    pub fn renew<S: EnrollStore + ?Sized>(
        &self,
        current: &VerifiedCert,
        store: &mut S,
        now: u64,
    ) -> Result<Cert, RenewRefusal> {
        let (issuer_cert, issuer_key) = std::iter::once((&self.issuer, &self.key))
            .chain(self.renewing.iter().map(|(cert, key)| (cert, key)))
            .find(|(cert, _)| current.issuer_fingerprint() == Some(cert.fingerprint()))
            .ok_or_else(|| {
                refused(format!(
                    "this certificate was not signed by this lighthouse's issuer {:?} (nor one of [[enroll.renew]]); renew it where it was signed",
                    self.issuer.body.name
                ))
            })?;
        let issuer = &issuer_cert.body;
        let fingerprint = current.fingerprint();
        let revoked = store
            .revocations(now)
            .map_err(|e| RenewRefusal::from(store_down("read the revocations", e)))?
            .iter()
            .any(|(_, r)| {
                r.fingerprint == fingerprint || r.fingerprint == issuer_cert.fingerprint()
            });
        if revoked {
            return Err(refused(
                "this certificate is revoked; it cannot be renewed (ask an admin for a new one)"
                    .into(),
            ));
        }
        let old = &current.cert().body;
        let lifetime = old
            .not_after
            .saturating_sub(old.not_before)
            .min(issuer.max_lifetime);
        let not_after = now.saturating_add(lifetime).min(issuer.not_after);
        if not_after <= old.not_after {
            return Err(refused(format!(
                "the issuer {:?} cannot sign past this certificate's expiry (it expires {}); renew the issuer",
                issuer.name,
                cert::format_unix_time(issuer.not_after)
            )));
        }
        let body = CertBody {
            not_before: now,
            not_after,
            ..old.clone()
        };
        let renewed = cert::sign_under_issuer(issuer_cert, issuer_key, body, now)
            .map_err(|e| refused(format!("the issuer refused: {e}")))?;
        let ip = old
            .ips
            .iter()
            .find_map(|n| match n {
                IpNet::V4(n) => Some(n.addr()),
                IpNet::V6(_) => None,
            })
            .ok_or_else(|| refused("the certificate has no IPv4 address".into()))?;
        let held = store
            .renew_for(ip, &old.name, not_after, &renewed, &"renewal".into(), now)
            .map_err(|e| RenewRefusal::from(store_down("extend the address lease", e)))?;
        if !held {
            return Err(refused(format!(
                "{ip} is leased to another node now; this certificate cannot be renewed (enroll again, or ask an admin)"
            )));
        }
        Ok(renewed)
    }
}

fn refused(why: String) -> RenewRefusal {
    RenewRefusal {
        why,
        store_unavailable: false,
    }
}
