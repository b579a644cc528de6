//! `aviary.v1.Enrollment` (the one call a peer without a client certificate may make)
//! and `aviary.v1.Identities` (enrollment requests, bootstrap tokens and node labels, for
//! admins).

use std::collections::BTreeMap;
use std::sync::Arc;

use aviary_certs::CheckedCsr;
use aviary_proto::v1 as pb;
use pb::enrollment_server::Enrollment;
use pb::identities_server::Identities;
use tonic::{Request, Response, Status};

use super::caller;
use super::views::timestamp;
use crate::admission::TokenBucket;
use crate::authority::EnrollSettings;
use crate::enrollment::{
    Decision, EnrollmentRecord, TokenRecord, MAX_TOKEN_TTL_MS, MAX_TOKEN_USES,
};
use crate::error::bad_field;
use crate::listener::PeerInfo;
use crate::registry::{EnrollAttempt, EnrollOutcome, Registry, Verdict};

/// How long a pending gateway is told to wait before asking again.
const RETRY_AFTER_SECONDS: u32 = 5;

/// Implements `aviary.v1.Enrollment`.
pub(crate) struct EnrollmentApi {
    registry: Arc<Registry>,
    settings: Arc<EnrollSettings>,
    budget: TokenBucket,
}

impl EnrollmentApi {
    /// Enrolls into `registry`.
    pub(crate) fn new(registry: Arc<Registry>, settings: Arc<EnrollSettings>) -> EnrollmentApi {
        let rate = settings.rate.max(0.1);
        EnrollmentApi {
            registry,
            budget: TokenBucket::new(rate, rate * 2.0),
            settings,
        }
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        // Before any work: this call is open to peers nobody has authenticated.
        if !self.budget.try_take() {
            metrics::counter!("aviary_enrollments_shed_total").increment(1);
            return Err(Status::resource_exhausted(
                "too many enrollment requests; retry with backoff",
            ));
        }
        let address = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.addr.to_string())
            .unwrap_or_default();
        let req = req.into_inner();
        aviary_certs::validate_name("node id", &req.node_id)
            .map_err(|e| bad_field("node_id", e.to_string()))?;
        let csr = CheckedCsr::parse(&req.csr).map_err(|e| bad_field("csr", e.to_string()))?;
        let claimed: BTreeMap<String, String> = req.labels.into_iter().collect();
        crate::selector::validate_labels(&claimed)?;
        if req.token.len() > 256 {
            return Err(bad_field("token", "longer than 256 bytes"));
        }
        let attempt = EnrollAttempt {
            node_id: req.node_id,
            csr,
            token: (!req.token.is_empty()).then_some(req.token),
            claimed,
            address,
        };
        let authority = self.settings.authority.current();
        let outcome = self
            .registry
            .enroll(attempt, &authority.issuer, self.settings.ttl)
            .await?;
        Ok(Response::new(match outcome {
            EnrollOutcome::Pending => pb::EnrollResponse {
                state: pb::EnrollState::Pending as i32,
                retry_after_seconds: RETRY_AFTER_SECONDS,
                ..Default::default()
            },
            EnrollOutcome::Issued(issued) => pb::EnrollResponse {
                state: pb::EnrollState::Issued as i32,
                certificate_pem: issued.pem,
                ca_bundle_pem: authority.bundle.pem.clone(),
                retry_after_seconds: 0,
            },
        }))
    }
}

/// Implements `aviary.v1.Identities`.
pub(crate) struct IdentitiesApi {
    registry: Arc<Registry>,
    authority: Arc<crate::authority::Authority>,
}

impl IdentitiesApi {
    /// Serves the identities of `registry` and the CA status of `authority`.
    pub(crate) fn new(
        registry: Arc<Registry>,
        authority: Arc<crate::authority::Authority>,
    ) -> IdentitiesApi {
        IdentitiesApi {
            registry,
            authority,
        }
    }
}

#[tonic::async_trait]
impl Identities for IdentitiesApi {
    async fn list_enrollments(
        &self,
        _req: Request<pb::ListEnrollmentsRequest>,
    ) -> Result<Response<pb::ListEnrollmentsResponse>, Status> {
        let enrollments = self
            .registry
            .enrollments()
            .into_iter()
            .map(enrollment)
            .collect();
        Ok(Response::new(pb::ListEnrollmentsResponse { enrollments }))
    }

    async fn accept_enrollment(
        &self,
        req: Request<pb::AcceptEnrollmentRequest>,
    ) -> Result<Response<pb::EnrollmentRequest>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        let verdict = Verdict::Accept {
            labels: req.labels.into_iter().collect(),
            fingerprint: (!req.key_fingerprint.is_empty()).then_some(req.key_fingerprint),
        };
        let r = self.registry.decide(&actor, &req.node_id, verdict).await?;
        Ok(Response::new(enrollment(r)))
    }

    async fn reject_enrollment(
        &self,
        req: Request<pb::RejectEnrollmentRequest>,
    ) -> Result<Response<pb::EnrollmentRequest>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        let reason = if req.reason.is_empty() {
            "rejected".to_owned()
        } else {
            req.reason.chars().take(256).collect()
        };
        let r = self
            .registry
            .decide(&actor, &req.node_id, Verdict::Reject { reason })
            .await?;
        Ok(Response::new(enrollment(r)))
    }

    async fn create_enroll_token(
        &self,
        req: Request<pb::CreateEnrollTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollTokenResponse>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        if req.max_uses == 0 || req.max_uses > MAX_TOKEN_USES {
            return Err(bad_field(
                "max_uses",
                format!("must be 1 to {MAX_TOKEN_USES}"),
            ));
        }
        let ttl_ms = req.ttl_seconds.saturating_mul(1000);
        if ttl_ms == 0 || ttl_ms > MAX_TOKEN_TTL_MS {
            return Err(bad_field("ttl_seconds", "must be 1 s to 365 days"));
        }
        let (record, secret) = self
            .registry
            .create_token(
                &actor,
                req.labels.into_iter().collect(),
                req.max_uses,
                ttl_ms,
            )
            .await?;
        Ok(Response::new(pb::CreateEnrollTokenResponse {
            token: Some(token(record)),
            secret,
        }))
    }

    async fn list_enroll_tokens(
        &self,
        _req: Request<pb::ListEnrollTokensRequest>,
    ) -> Result<Response<pb::ListEnrollTokensResponse>, Status> {
        let tokens = self.registry.tokens().into_iter().map(token).collect();
        Ok(Response::new(pb::ListEnrollTokensResponse { tokens }))
    }

    async fn revoke_enroll_token(
        &self,
        req: Request<pb::RevokeEnrollTokenRequest>,
    ) -> Result<Response<pb::EnrollToken>, Status> {
        let actor = caller(&req)?;
        let id = req.into_inner().id;
        let record = self.registry.revoke_token(&actor, &id).await?;
        Ok(Response::new(token(record)))
    }

    async fn set_node_labels(
        &self,
        req: Request<pb::SetNodeLabelsRequest>,
    ) -> Result<Response<pb::SetNodeLabelsResponse>, Status> {
        let actor = caller(&req)?;
        let req = req.into_inner();
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let desired_revision = self
            .registry
            .set_labels(&actor, &req.node_id, labels.clone())
            .await?;
        Ok(Response::new(pb::SetNodeLabelsResponse {
            labels: labels.into_iter().collect(),
            desired_revision,
        }))
    }

    async fn list_revocations(
        &self,
        _req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let revocations = self
            .registry
            .revocations()
            .into_iter()
            .map(|(node_id, serials)| pb::Revocation {
                node_id,
                serials: serials
                    .into_iter()
                    .map(|s| pb::RevokedSerial {
                        serial: s.serial,
                        not_after: Some(timestamp(s.not_after_ms)),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListRevocationsResponse { revocations }))
    }

    async fn get_ca_status(
        &self,
        _req: Request<pb::GetCaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        let authority = self.authority.current();
        let issuing = authority.issuer.ca_fingerprint().to_owned();
        let (current, older, offline) = self.registry.ca_census(&issuing);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::CaStatus {
            issuing_ca: issuing,
            trusted_cas: authority.cas.clone(),
            nodes_on_issuing_ca: count(current),
            nodes_on_older_ca: count(older.len()),
            nodes_made_offline: count(offline),
            older_ca_nodes: older.into_iter().take(100).collect(),
        }))
    }
}

fn enrollment(r: EnrollmentRecord) -> pb::EnrollmentRequest {
    let (decision, labels, decided_by) = match r.decision {
        Decision::Pending => (
            pb::EnrollmentDecision::Pending,
            BTreeMap::new(),
            String::new(),
        ),
        Decision::Accepted { labels, by } => (pb::EnrollmentDecision::Accepted, labels, by),
        Decision::Rejected { by, .. } => (pb::EnrollmentDecision::Rejected, BTreeMap::new(), by),
    };
    pb::EnrollmentRequest {
        node_id: r.node_id,
        key_fingerprint: r.key_fingerprint,
        claimed_labels: r.claimed_labels.into_iter().collect(),
        address: r.address,
        requested: Some(timestamp(r.requested_ms)),
        decision: decision as i32,
        labels: labels.into_iter().collect(),
        decided_by,
    }
}

fn token(t: TokenRecord) -> pb::EnrollToken {
    pb::EnrollToken {
        id: t.id,
        labels: t.labels.into_iter().collect(),
        max_uses: t.max_uses,
        uses: t.uses,
        created: Some(timestamp(t.created_ms)),
        expires: Some(timestamp(t.expires_ms)),
        revoked: t.revoked,
        created_by: t.created_by,
    }
}
