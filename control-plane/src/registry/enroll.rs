//! Enrollment in the registry: one Enroll call planned against the node's record, its
//! request and the token it brings, then committed with its audit event. The policies
//! are in `crate::enrollment`.

use std::collections::BTreeMap;
use std::time::Duration;

use aviary_certs::{CheckedCsr, Issued, NodeIssuer};

use super::sessions::refresh;
use super::{Entry, Registry};
use crate::audit::{now_ms, NewEvent};
use crate::enrollment::{
    check_token, Decision, Enrolled, EnrolledVia, EnrollmentRecord, Token, TokenRecord,
    INVALID_TOKEN, MAX_REQUESTS,
};
use crate::error::ControlPlaneError;
use crate::node::NodeRecord;
use crate::store::Change;

/// One Enroll call, checked at the boundary.
pub(crate) struct EnrollAttempt {
    /// The node id asked for.
    pub node_id: String,
    /// The request, its proof of possession verified.
    pub csr: CheckedCsr,
    /// The bootstrap token as sent, if any.
    pub token: Option<String>,
    /// Labels the gateway would like (never applied).
    pub claimed: BTreeMap<String, String>,
    /// Peer address.
    pub address: String,
}

/// What an Enroll call gets.
#[derive(Debug)]
pub(crate) enum EnrollOutcome {
    /// Waiting for an admin.
    Pending,
    /// A certificate.
    Issued(Issued),
}

enum Plan {
    Issue {
        labels: BTreeMap<String, String>,
        via: EnrolledVia,
        token: Option<TokenRecord>,
        from_request: bool,
    },
    Wait(Option<EnrollmentRecord>),
    Refuse {
        public: String,
        audit: String,
    },
}

impl Registry {
    /// Answers one Enroll call (see `enrollment.rs` for the policies). Refusals are
    /// audited with their real reason; the caller hears a plain one.
    pub(crate) async fn enroll(
        &self,
        attempt: EnrollAttempt,
        issuer: &NodeIssuer,
        ttl: Duration,
    ) -> Result<EnrollOutcome, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let now = now_ms();
        let node_id = attempt.node_id.clone();
        let actor = format!("peer/{}", attempt.address);
        let target = format!("node/{node_id}");
        let plan = self.plan_enrollment(&attempt, now);
        let (labels, via, token, from_request) = match plan {
            Plan::Refuse { public, audit } => {
                metrics::counter!("aviary_enrollments_refused_total").increment(1);
                let event = NewEvent::new(actor, "enroll.refused", target, audit);
                self.journal.audit(event, false).await?;
                return Err(ControlPlaneError::PermissionDenied(public));
            }
            Plan::Wait(None) => return Ok(EnrollOutcome::Pending),
            Plan::Wait(Some(request)) => {
                let detail = format!(
                    "key {}, claims labels {:?}",
                    request.key_fingerprint, request.claimed_labels
                );
                self.commit(Change {
                    enrollments: vec![request.clone()],
                    events: vec![NewEvent::new(actor, "enroll.requested", target, detail)],
                    durable: true,
                    ..Default::default()
                })
                .await?;
                self.state()
                    .enrollment
                    .requests
                    .insert(node_id.clone(), request);
                return Ok(EnrollOutcome::Pending);
            }
            Plan::Issue {
                labels,
                via,
                token,
                from_request,
            } => (labels, via, token, from_request),
        };
        let issued = issuer.issue(&node_id, &attempt.csr, ttl)?;
        let (record, revision) = {
            let st = self.state();
            let mut record = st
                .nodes
                .get(&node_id)
                .map(|e| e.record.clone())
                .unwrap_or_else(|| NodeRecord {
                    node_id: node_id.clone(),
                    ..Default::default()
                });
            let mut revision = None;
            if record.labels != labels || !st.nodes.contains_key(&node_id) {
                let next = st.revision + 1;
                record.label_revision = next;
                revision = Some(next);
            }
            record.labels = labels;
            record.enrolled = Some(Enrolled {
                via: via.clone(),
                key_fingerprint: attempt.csr.fingerprint.clone(),
                serial: issued.serial.clone(),
                ca: issued.ca.clone(),
                issued_ms: now,
                not_after_ms: issued.not_after_ms,
                previous: Vec::new(),
            });
            (record, revision)
        };
        let detail = format!(
            "{via}: key {}, serial {}, labels {:?}, valid until {} (Unix ms)",
            attempt.csr.fingerprint, issued.serial, record.labels, issued.not_after_ms
        );
        self.commit(Change {
            nodes: vec![record.clone()],
            tokens: token.iter().cloned().collect(),
            forget_enrollments: if from_request {
                vec![node_id.clone()]
            } else {
                Vec::new()
            },
            revision,
            events: vec![NewEvent::new(actor, "enroll.issued", target, detail)],
            durable: true,
            ..Default::default()
        })
        .await?;
        metrics::counter!("aviary_enrollments_issued_total").increment(1);
        self.install_record(record, revision);
        let mut st = self.state();
        if let Some(token) = token {
            st.enrollment.tokens.insert(token.id.clone(), token);
        }
        if from_request {
            st.enrollment.requests.remove(&node_id);
        }
        Ok(EnrollOutcome::Issued(issued))
    }

    fn plan_enrollment(&self, attempt: &EnrollAttempt, now: u64) -> Plan {
        let st = self.state();
        let node_id = &attempt.node_id;
        let fingerprint = &attempt.csr.fingerprint;
        let existing = st.nodes.get(node_id).map(|e| &e.record);
        if existing.is_some_and(|r| r.revoked) {
            let why = format!("node {node_id} is revoked");
            return Plan::Refuse {
                public: why.clone(),
                audit: why,
            };
        }
        let enrolled = existing.and_then(|r| r.enrolled.as_ref());
        if let Some(text) = &attempt.token {
            let Some(token) = Token::parse(text) else {
                return Plan::Refuse {
                    public: INVALID_TOKEN.into(),
                    audit: "malformed token".into(),
                };
            };
            let record = st.enrollment.tokens.get(&token.id);
            if let Err(why) = check_token(record, &token, now) {
                return Plan::Refuse {
                    public: INVALID_TOKEN.into(),
                    audit: why,
                };
            }
            let via = EnrolledVia::Token {
                id: token.id.clone(),
            };
            // A token enrolls a new node, or re-enrolls one it enrolled: taking over a
            // node that came in another way needs an admin.
            if existing.is_some() && enrolled.map(|e| &e.via) != Some(&via) {
                let why = format!(
                    "node {node_id} is already registered; a token cannot take it over \
                     (an admin can accept its request instead)"
                );
                return Plan::Refuse {
                    public: why.clone(),
                    audit: format!("token {}: {why}", token.id),
                };
            }
            let Some(mut record) = record.cloned() else {
                return Plan::Refuse {
                    public: INVALID_TOKEN.into(),
                    audit: "unknown token".into(),
                };
            };
            record.uses += 1;
            return Plan::Issue {
                labels: record.labels.clone(),
                via,
                token: Some(record),
                from_request: false,
            };
        }
        // An accepted key stays accepted: it re-enrolls without a new accept.
        if let (Some(node), Some(e)) = (existing, enrolled) {
            if matches!(e.via, EnrolledVia::Approval { .. }) && &e.key_fingerprint == fingerprint {
                return Plan::Issue {
                    labels: node.labels.clone(),
                    via: e.via.clone(),
                    token: None,
                    from_request: false,
                };
            }
        }
        match st.enrollment.requests.get(node_id) {
            Some(r) if &r.key_fingerprint == fingerprint => match &r.decision {
                Decision::Pending => Plan::Wait(None),
                Decision::Accepted { labels, by } => Plan::Issue {
                    labels: labels.clone(),
                    via: EnrolledVia::Approval { by: by.clone() },
                    token: None,
                    from_request: true,
                },
                Decision::Rejected { .. } => {
                    let why =
                        format!("the enrollment of node {node_id} with this key was rejected");
                    Plan::Refuse {
                        public: why.clone(),
                        audit: why,
                    }
                }
            },
            other => {
                if other.is_none() && st.enrollment.requests.len() >= MAX_REQUESTS {
                    return Plan::Refuse {
                        public: "too many enrollment requests are waiting; try later".into(),
                        audit: format!("{MAX_REQUESTS} requests already waiting"),
                    };
                }
                Plan::Wait(Some(EnrollmentRecord {
                    node_id: node_id.clone(),
                    key_fingerprint: fingerprint.clone(),
                    claimed_labels: attempt.claimed.clone(),
                    address: attempt.address.clone(),
                    requested_ms: now,
                    decision: Decision::Pending,
                }))
            }
        }
    }

    /// Puts a committed node record in place and republishes what it should have.
    pub(super) fn install_record(&self, record: NodeRecord, revision: Option<u64>) {
        let ttl = self.ttl_seconds;
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(rev) = revision {
            st.revision = st.revision.max(rev);
        }
        let entry = st
            .nodes
            .entry(record.node_id.clone())
            .or_insert_with(|| Entry::new(ttl));
        entry.record = record;
        refresh(entry, &st.rules, &st.rollouts, &st.configs, ttl);
        let update = super::views::weights_of(entry);
        drop(guard);
        let _ = self.weights.send(update);
    }
}
