//! Enrollment's records and rules: requests waiting for an admin, bootstrap tokens, and
//! how a node came by its certificate. The registry holds them and commits every change
//! with its audit event (`registry/identities.rs`); the API turns them into proto.
//!
//! Invariants:
//! * A token's secret exists only in the answer that created it; the store keeps its
//!   SHA-256, compared in constant time. An unknown id and a wrong secret are refused
//!   with the same words, so guessing learns nothing.
//! * A request is bound to one key: an accept or a reject is for the key an admin saw.

use std::collections::BTreeMap;

use ring::rand::SecureRandom;

use crate::hex::{decode as unhex, encode as hex};

/// Pending requests kept at most: a flood of requests cannot grow the store without bound.
pub(crate) const MAX_REQUESTS: usize = 10_000;
/// Tokens kept at most.
pub(crate) const MAX_TOKENS: usize = 10_000;
/// A token lives at most a year.
pub(crate) const MAX_TOKEN_TTL_MS: u64 = 365 * 86_400_000;
/// A token enrolls at most this many nodes.
pub(crate) const MAX_TOKEN_USES: u32 = 1_000_000;

/// What an admin decided about a request.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub(crate) enum Decision {
    /// Nobody decided yet.
    Pending,
    /// The key may enroll, with these labels.
    Accepted {
        /// Labels the node gets.
        labels: BTreeMap<String, String>,
        /// The admin who accepted.
        by: String,
    },
    /// The key is refused.
    Rejected {
        /// The admin who rejected.
        by: String,
        /// Why.
        reason: String,
    },
}

/// A gateway's request to join, by node id.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct EnrollmentRecord {
    /// The node id it asks for.
    pub node_id: String,
    /// The requested key (`aviary_certs::key_fingerprint`).
    pub key_fingerprint: String,
    /// Labels it would like (never applied).
    pub claimed_labels: BTreeMap<String, String>,
    /// Peer address of the request.
    pub address: String,
    /// Unix ms of the request.
    pub requested_ms: u64,
    /// The admin's decision.
    pub decision: Decision,
}

/// A bootstrap token as stored: its secret only hashed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TokenRecord {
    /// Public id (16 hex digits), the first part of the token.
    pub id: String,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
    /// Labels every node it enrolls gets.
    pub labels: BTreeMap<String, String>,
    /// Nodes it may enroll.
    pub max_uses: u32,
    /// Nodes it enrolled.
    pub uses: u32,
    /// Unix ms of creation.
    pub created_ms: u64,
    /// Unix ms after which it is refused.
    pub expires_ms: u64,
    /// Refused from revocation on.
    pub revoked: bool,
    /// The admin who made it.
    pub created_by: String,
}

/// How a node came by the certificate it holds from this control plane: the policy it
/// re-enrolls under after its certificate expired.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub(crate) enum EnrolledVia {
    /// A bootstrap token: it re-enrolls with the token while the token is good, and
    /// through approval after.
    Token {
        /// The token id.
        id: String,
    },
    /// An admin's accept of its key: that key re-enrolls without a new accept; another
    /// key waits for one.
    Approval {
        /// The admin.
        by: String,
    },
}

impl std::fmt::Display for EnrolledVia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnrolledVia::Token { id } => write!(f, "token/{id}"),
            EnrolledVia::Approval { by } => write!(f, "approval/{by}"),
        }
    }
}

/// A node's certificate from this control plane.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Enrolled {
    /// The enrollment policy.
    #[serde(flatten)]
    pub via: EnrolledVia,
    /// The certified key.
    pub key_fingerprint: String,
    /// Serial of the newest certificate, hex.
    pub serial: String,
    /// `ca_fingerprint` of the CA that issued it.
    #[serde(default)]
    pub ca: String,
    /// When it was issued (Unix ms).
    #[serde(default)]
    pub issued_ms: u64,
    /// Its end of validity (Unix ms).
    pub not_after_ms: u64,
    /// Older certificates of the node that have not expired yet (a revocation lists
    /// them too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<IssuedSerial>,
}

/// One certificate the control plane issued.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct IssuedSerial {
    /// Serial, hex.
    pub serial: String,
    /// End of validity (Unix ms).
    pub not_after_ms: u64,
}

impl Enrolled {
    /// Takes a renewal: the current certificate joins the older ones, and those
    /// expired by `now_ms` are forgotten.
    pub(crate) fn renewed(
        &mut self,
        fingerprint: String,
        issued: &aviary_certs::Issued,
        now_ms: u64,
    ) {
        let (serial, not_after_ms) = (issued.serial.clone(), issued.not_after_ms);
        self.ca = issued.ca.clone();
        self.issued_ms = now_ms;
        let old = IssuedSerial {
            serial: std::mem::replace(&mut self.serial, serial),
            not_after_ms: std::mem::replace(&mut self.not_after_ms, not_after_ms),
        };
        self.previous.push(old);
        self.previous.retain(|s| s.not_after_ms > now_ms);
        self.key_fingerprint = fingerprint;
    }

    /// True before a sixth of the current certificate's lifetime has passed.
    pub(crate) fn too_early(&self, now_ms: u64) -> bool {
        let life = self.not_after_ms.saturating_sub(self.issued_ms);
        now_ms < self.issued_ms.saturating_add(life / 6)
    }

    /// Every certificate of the node still within its validity at `now_ms`.
    pub(crate) fn live_serials(&self, now_ms: u64) -> Vec<IssuedSerial> {
        std::iter::once(IssuedSerial {
            serial: self.serial.clone(),
            not_after_ms: self.not_after_ms,
        })
        .chain(self.previous.iter().cloned())
        .filter(|s| s.not_after_ms > now_ms)
        .collect()
    }
}

/// A bootstrap token as given to gateways: `avt1_<id>_<secret>`, both hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    /// The public id.
    pub id: String,
    secret: [u8; 32],
}

/// The one refusal for a token that does not check out, whatever the reason inside.
pub(crate) const INVALID_TOKEN: &str = "invalid enrollment token";

impl Token {
    /// A fresh token.
    pub(crate) fn mint() -> Result<Token, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rng.fill(&mut id)?;
        rng.fill(&mut secret)?;
        Ok(Token {
            id: hex(&id),
            secret,
        })
    }

    /// Parses what a gateway sent; `None` for anything not shaped like a token.
    pub(crate) fn parse(text: &str) -> Option<Token> {
        let rest = text.strip_prefix("avt1_")?;
        let (id, secret) = rest.split_once('_')?;
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes = unhex(secret)?;
        Some(Token {
            id: id.to_ascii_lowercase(),
            secret: bytes.try_into().ok()?,
        })
    }

    /// The text to hand out (shown once).
    pub(crate) fn reveal(&self) -> String {
        format!("avt1_{}_{}", self.id, hex(&self.secret))
    }

    /// SHA-256 of the secret, as stored.
    pub(crate) fn digest(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, &self.secret).as_ref())
    }
}

/// Why a token was refused, for the audit log (the caller only hears `INVALID_TOKEN`).
pub(crate) fn check_token(
    record: Option<&TokenRecord>,
    token: &Token,
    now_ms: u64,
) -> Result<(), String> {
    let Some(record) = record else {
        return Err(format!("token {}: unknown", token.id));
    };
    let digest = token.digest();
    // Constant time: the comparison must not tell how much of a guess was right.
    let same = digest.len() == record.secret_sha256.len()
        && digest
            .bytes()
            .zip(record.secret_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(format!("token {}: wrong secret", token.id));
    }
    if record.revoked {
        return Err(format!("token {}: revoked", token.id));
    }
    if now_ms >= record.expires_ms {
        return Err(format!("token {}: expired", token.id));
    }
    if record.uses >= record.max_uses {
        return Err(format!(
            "token {}: all {} uses taken",
            token.id, record.max_uses
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(token: &Token) -> TokenRecord {
        TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.digest(),
            labels: BTreeMap::new(),
            max_uses: 2,
            uses: 0,
            created_ms: 0,
            expires_ms: 1_000,
            revoked: false,
            created_by: "admin/a".into(),
        }
    }

    #[test]
    fn a_token_round_trips_and_is_refused_past_uses_ttl_revocation_and_tampering(
    ) -> Result<(), ring::error::Unspecified> {
        let token = Token::mint()?;
        let text = token.reveal();
        assert_eq!(Token::parse(&text), Some(token.clone()));
        let mut r = record(&token);
        assert_eq!(check_token(Some(&r), &token, 10), Ok(()));
        assert!(check_token(None, &token, 10).is_err());
        assert!(check_token(Some(&r), &token, 1_000).is_err(), "expired");
        r.uses = 2;
        assert!(check_token(Some(&r), &token, 10).is_err(), "used up");
        r.uses = 0;
        r.revoked = true;
        assert!(check_token(Some(&r), &token, 10).is_err(), "revoked");
        r.revoked = false;
        // One flipped digit of the secret.
        let last = text
            .chars()
            .last()
            .map_or('0', |c| if c == '0' { '1' } else { '0' });
        let tampered = format!("{}{last}", &text[..text.len() - 1]);
        let tampered = Token::parse(&tampered).ok_or(ring::error::Unspecified)?;
        assert!(check_token(Some(&r), &tampered, 10).is_err(), "tampered");
        for bad in [
            "",
            "avt1_",
            "avt1_zz_00",
            &text[..text.len() - 1],
            "avt2_x_y",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
        Ok(())
    }
}
