//! Node identities in the registry: admins' decisions on enrollment requests, bootstrap
//! tokens, and the labels an admin sets (enrolling itself is in `enroll.rs`). Every change commits with
//! its audit event, like every other mutation (compute → persist → publish).

use std::collections::{BTreeMap, HashMap};

use aviary_certs::Identity;

use super::Registry;
use crate::audit::{now_ms, NewEvent};
use crate::enrollment::{Decision, EnrollmentRecord, Token, TokenRecord, MAX_TOKENS};
use crate::error::ControlPlaneError;
use crate::store::Change;

/// Enrollment requests and tokens, as loaded and kept current.
#[derive(Debug, Default)]
pub(super) struct Enrollments {
    pub(super) requests: HashMap<String, EnrollmentRecord>,
    pub(super) tokens: HashMap<String, TokenRecord>,
}

/// What an admin decides about a request.
pub(crate) enum Verdict {
    /// Let the key enroll with these labels (if it is still the key the admin saw).
    Accept {
        /// Labels the node gets.
        labels: BTreeMap<String, String>,
        /// The key the admin checked, if given.
        fingerprint: Option<String>,
    },
    /// Refuse the key.
    Reject {
        /// Why.
        reason: String,
    },
}

impl Registry {
    /// An admin's decision on the pending request of `node_id`.
    pub(crate) async fn decide(
        &self,
        actor: &Identity,
        node_id: &str,
        verdict: Verdict,
    ) -> Result<EnrollmentRecord, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let mut request = self
            .state()
            .enrollment
            .requests
            .get(node_id)
            .cloned()
            .ok_or_else(|| ControlPlaneError::NotFound(format!("enrollment request {node_id}")))?;
        if request.decision != Decision::Pending {
            return Err(ControlPlaneError::FailedPrecondition(format!(
                "the request of {node_id} was already decided"
            )));
        }
        let (action, detail) = match verdict {
            Verdict::Accept {
                labels,
                fingerprint,
            } => {
                if fingerprint.is_some_and(|f| f != request.key_fingerprint) {
                    return Err(ControlPlaneError::FailedPrecondition(format!(
                        "the request of {node_id} is now for key {}: list it again",
                        request.key_fingerprint
                    )));
                }
                crate::selector::validate_labels(&labels)?;
                let detail = format!("key {}, labels {labels:?}", request.key_fingerprint);
                request.decision = Decision::Accepted {
                    labels,
                    by: actor.to_string(),
                };
                ("enroll.accepted", detail)
            }
            Verdict::Reject { reason } => {
                let detail = format!("key {}: {reason}", request.key_fingerprint);
                request.decision = Decision::Rejected {
                    by: actor.to_string(),
                    reason,
                };
                ("enroll.rejected", detail)
            }
        };
        self.commit(Change {
            enrollments: vec![request.clone()],
            events: vec![NewEvent::new(
                actor.to_string(),
                action,
                format!("node/{node_id}"),
                detail,
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        self.state()
            .enrollment
            .requests
            .insert(node_id.to_owned(), request.clone());
        Ok(request)
    }

    /// Makes a bootstrap token; returns it with its secret (shown once).
    pub(crate) async fn create_token(
        &self,
        actor: &Identity,
        labels: BTreeMap<String, String>,
        max_uses: u32,
        ttl_ms: u64,
    ) -> Result<(TokenRecord, String), ControlPlaneError> {
        crate::selector::validate_labels(&labels)?;
        let _writer = self.writer.lock().await;
        if self.state().enrollment.tokens.len() >= MAX_TOKENS {
            return Err(ControlPlaneError::ResourceExhausted(format!(
                "{MAX_TOKENS} tokens exist: revoke some first"
            )));
        }
        let token = Token::mint()
            .map_err(|_| ControlPlaneError::Unavailable("no randomness for a token".into()))?;
        let now = now_ms();
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.digest(),
            labels,
            max_uses,
            uses: 0,
            created_ms: now,
            expires_ms: now.saturating_add(ttl_ms),
            revoked: false,
            created_by: actor.to_string(),
        };
        let detail = format!(
            "labels {:?}, {max_uses} uses, expires {} (Unix ms)",
            record.labels, record.expires_ms
        );
        self.commit(Change {
            tokens: vec![record.clone()],
            events: vec![NewEvent::new(
                actor.to_string(),
                "enroll.token_created",
                format!("token/{}", record.id),
                detail,
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        self.state()
            .enrollment
            .tokens
            .insert(record.id.clone(), record.clone());
        Ok((record, token.reveal()))
    }

    /// Refuses every later use of token `id`.
    pub(crate) async fn revoke_token(
        &self,
        actor: &Identity,
        id: &str,
    ) -> Result<TokenRecord, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let mut record = self
            .state()
            .enrollment
            .tokens
            .get(id)
            .cloned()
            .ok_or_else(|| ControlPlaneError::NotFound(format!("token {id}")))?;
        record.revoked = true;
        self.commit(Change {
            tokens: vec![record.clone()],
            events: vec![NewEvent::new(
                actor.to_string(),
                "enroll.token_revoked",
                format!("token/{id}"),
                format!("after {} of {} uses", record.uses, record.max_uses),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        self.state()
            .enrollment
            .tokens
            .insert(id.to_owned(), record.clone());
        Ok(record)
    }

    /// Sets the selector labels of `node_id`; returns its new desired revision.
    pub(crate) async fn set_labels(
        &self,
        actor: &Identity,
        node_id: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<u64, ControlPlaneError> {
        crate::selector::validate_labels(&labels)?;
        let _writer = self.writer.lock().await;
        let (record, revision) = {
            let st = self.state();
            let entry = st
                .nodes
                .get(node_id)
                .ok_or_else(|| ControlPlaneError::NotFound(format!("node {node_id}")))?;
            let mut record = entry.record.clone();
            if record.labels == labels {
                return Ok(entry.current.revision);
            }
            let revision = st.revision + 1;
            record.label_revision = revision;
            record.labels = labels;
            if record.claimed_labels == record.labels {
                record.claimed_labels.clear();
            }
            (record, revision)
        };
        self.commit(Change {
            nodes: vec![record.clone()],
            revision: Some(revision),
            events: vec![NewEvent::new(
                actor.to_string(),
                "nodes.label",
                format!("node/{node_id}"),
                format!("labels {:?}", record.labels),
            )],
            durable: true,
            ..Default::default()
        })
        .await?;
        self.install_record(record, Some(revision));
        Ok(self
            .state()
            .nodes
            .get(node_id)
            .map_or(revision, |e| e.current.revision))
    }

    /// Every enrollment request, oldest first.
    pub(crate) fn enrollments(&self) -> Vec<EnrollmentRecord> {
        let mut all: Vec<_> = self.state().enrollment.requests.values().cloned().collect();
        all.sort_by(|a, b| (a.requested_ms, &a.node_id).cmp(&(b.requested_ms, &b.node_id)));
        all
    }

    /// Every token, newest first.
    pub(crate) fn tokens(&self) -> Vec<TokenRecord> {
        let mut all: Vec<_> = self.state().enrollment.tokens.values().cloned().collect();
        all.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        all
    }

    /// Revoked nodes, by id, with their certificates that have not expired.
    pub(crate) fn revocations(&self) -> Vec<(String, Vec<crate::enrollment::IssuedSerial>)> {
        let now = now_ms();
        let mut all: Vec<_> = self
            .state()
            .nodes
            .values()
            .filter(|e| e.record.revoked)
            .map(|e| {
                let serials = e
                    .record
                    .enrolled
                    .as_ref()
                    .map(|en| en.live_serials(now))
                    .unwrap_or_default();
                (e.record.node_id.clone(), serials)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Nodes (not revoked) by the CA of their certificate: on `issuing`, on an older
    /// one (their ids), and with certificates made offline.
    pub(crate) fn ca_census(&self, issuing: &str) -> (usize, Vec<String>, usize) {
        let (mut current, mut older, mut offline) = (0, Vec::new(), 0);
        for e in self.state().nodes.values().filter(|e| !e.record.revoked) {
            match &e.record.enrolled {
                Some(en) if en.ca == issuing => current += 1,
                Some(_) => older.push(e.record.node_id.clone()),
                None => offline += 1,
            }
        }
        older.sort();
        (current, older, offline)
    }
}
