//! What the issuance log keeps of how a certificate was bought: for
//! people, a line (`token ID`, `oidc ISSUER rule N: ...`, `renewal`); for
//! the admin console and API, which token, and the OIDC ID token's claims
//! (bounded; the token itself and its signature are never kept).

/// How a certificate was bought, as the issuance log keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Issuance {
    /// For people: `token ID`, `oidc ISSUER rule N: claim=value ...` (the
    /// claims the rule matched), `renewal`.
    pub how: String,
    /// The id of the token that bought it (see [`crate::enroll::token_id`]).
    pub token: Option<String>,
    /// The claims of the OIDC ID token that bought it: those with a string,
    /// number or boolean value, at most [`MAX_KEPT_CLAIMS`], each value cut
    /// to [`MAX_CLAIM_LEN`] bytes (the signature and the token itself are
    /// never kept).
    pub claims: std::collections::BTreeMap<String, String>,
}

/// Claims kept per certificate, at most, and bytes per value.
pub const MAX_KEPT_CLAIMS: usize = 64;
pub const MAX_CLAIM_LEN: usize = 256;

impl Issuance {
    /// The claims as a JSON object (what the stores keep).
    pub fn claims_json(&self) -> String {
        serde_json::to_string(&self.claims).unwrap_or_else(|_| "{}".into())
    }

    /// The claims from a stored JSON object; none from anything else.
    pub fn claims_from_json(text: &str) -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(text).unwrap_or_default()
    }

    /// The claims of an ID token worth keeping (see [`Issuance::claims`]).
    pub fn kept_claims(
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> std::collections::BTreeMap<String, String> {
        claims
            .iter()
            .filter_map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                let mut end = text.len().min(MAX_CLAIM_LEN);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                Some((
                    k.chars().take(MAX_CLAIM_LEN).collect(),
                    text[..end].to_string(),
                ))
            })
            .take(MAX_KEPT_CLAIMS)
            .collect()
    }
}

impl From<&str> for Issuance {
    fn from(how: &str) -> Issuance {
        Issuance {
            how: how.to_string(),
            ..Issuance::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_claims_are_scalars_bounded_in_number_and_length() {
        let mut claims = serde_json::Map::new();
        claims.insert("repository".into(), "acme/app".into());
        claims.insert("run_id".into(), 42.into());
        claims.insert("ref_protected".into(), true.into());
        claims.insert("aud".into(), serde_json::json!(["a", "b"]));
        claims.insert("long".into(), "é".repeat(200).into());
        for i in 0..100 {
            claims.insert(format!("x{i:03}"), "y".into());
        }
        let kept = Issuance::kept_claims(&claims);
        assert_eq!(kept.len(), MAX_KEPT_CLAIMS);
        assert_eq!(kept["run_id"], "42");
        assert_eq!(kept["ref_protected"], "true");
        assert!(!kept.contains_key("aud"), "arrays are not kept");
        assert_eq!(
            kept["long"].len(),
            MAX_CLAIM_LEN,
            "cut on a character boundary"
        );
        let how = Issuance {
            claims: kept.clone(),
            ..Issuance::default()
        };
        assert_eq!(Issuance::claims_from_json(&how.claims_json()), kept);
        assert!(Issuance::claims_from_json("not json").is_empty());
    }
}
