//! The one place that decides who may call what: a tower layer in front of every gRPC
//! service, keyed by the request path and the peer's certificate identity.
//!
//! | path prefix                                   | who                        |
//! |-----------------------------------------------|----------------------------|
//! | `/aviary.v1.Fleet/`                           | edge certificates          |
//! | other `/aviary.v1.*/`                         | admin certificates         |
//! | health, reflection v1alpha and v1             | any authenticated peer     |
//! | `/aviary.v1.Enrollment/`                      | anyone, certificate or not |
//!
//! Enrollment is the only call a peer without a client certificate may make (the
//! gateway has none yet); it is rate-limited where it is served. Revoked nodes are
//! refused everywhere. Every refusal is PERMISSION_DENIED and audited.

use std::sync::Arc;
use std::task::{Context, Poll};

use aviary_certs::Identity;
use tonic::codegen::BoxFuture;
use tower::{Layer, Service};

use crate::admission::TokenBucket;
use crate::audit::NewEvent;
use crate::journal::Journal;
use crate::listener::PeerInfo;

/// Answers whether a node is revoked (the registry does; tests may not need one).
pub(crate) trait Revocations: Send + Sync + 'static {
    /// True when `node_id` is revoked.
    fn is_revoked(&self, node_id: &str) -> bool;
}

/// Installs `Auth` around the router.
#[derive(Clone)]
pub(crate) struct AuthLayer {
    revocations: Arc<dyn Revocations>,
    journal: Arc<Journal>,
    audit_budget: Arc<TokenBucket>,
}

impl AuthLayer {
    /// Checks callers against `revocations` and audits refusals in `journal`:
    /// at most 5 a second (bursts of 20), so one certificate cannot flood the log; the
    /// rest are counted (`aviary_refusals_unaudited_total`).
    pub(crate) fn new(revocations: Arc<dyn Revocations>, journal: Arc<Journal>) -> AuthLayer {
        AuthLayer {
            revocations,
            journal,
            audit_budget: Arc::new(TokenBucket::new(5.0, 20.0)),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            revocations: self.revocations.clone(),
            journal: self.journal.clone(),
            audit_budget: self.audit_budget.clone(),
        }
    }
}

/// The authorisation middleware (see the module docs).
#[derive(Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    revocations: Arc<dyn Revocations>,
    journal: Arc<Journal>,
    audit_budget: Arc<TokenBucket>,
}

enum Role {
    Edge,
    Admin,
    Anyone,
    Unauthenticated,
}

fn required_role(path: &str) -> Role {
    if path.starts_with("/aviary.v1.Enrollment/") {
        Role::Unauthenticated
    } else if path.starts_with("/aviary.v1.Fleet/") {
        Role::Edge
    } else if path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
    {
        Role::Anyone
    } else {
        Role::Admin
    }
}

/// `Ok` when `identity` (`None`: no client certificate) may call `path`, else the reason.
pub(crate) fn authorize(
    path: &str,
    identity: Option<&Identity>,
    revocations: &dyn Revocations,
) -> Result<(), String> {
    let role = required_role(path);
    let identity = match (identity, &role) {
        (_, Role::Unauthenticated) => return Ok(()),
        (None, _) => return Err(format!("{path} needs a client certificate")),
        (Some(identity), _) => identity,
    };
    if let Identity::Edge(id) = identity {
        if revocations.is_revoked(id) {
            return Err(format!("node {id} is revoked"));
        }
    }
    match (role, identity) {
        (Role::Anyone | Role::Unauthenticated, _)
        | (Role::Edge, Identity::Edge(_))
        | (Role::Admin, Identity::Admin(_)) => Ok(()),
        (Role::Edge, other) => Err(format!(
            "{other} may not open a fleet stream: edge certificates only"
        )),
        (Role::Admin, other) => Err(format!(
            "{other} may not call {path}: admin certificates only"
        )),
    }
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let (actor, verdict) = match req.extensions().get::<PeerInfo>() {
            Some(peer) => (
                peer.identity
                    .as_ref()
                    .map_or_else(|| format!("peer/{}", peer.addr), ToString::to_string),
                authorize(&path, peer.identity.as_ref(), self.revocations.as_ref()),
            ),
            // Only reachable if a listener without mTLS were ever wired in: refuse.
            None => (
                "unknown".to_owned(),
                Err("no verified client identity".to_owned()),
            ),
        };
        match verdict {
            Ok(()) => {
                // The service that was polled ready is the one that must be called.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(reason) => {
                tracing::info!(%actor, %path, %reason, "call refused");
                metrics::counter!("aviary_calls_refused_total").increment(1);
                let journal = self.journal.clone();
                let audit = self.audit_budget.try_take();
                if !audit {
                    metrics::counter!("aviary_refusals_unaudited_total").increment(1);
                }
                let event = NewEvent::new(actor, "auth.denied", path, reason.clone());
                Box::pin(async move {
                    if audit {
                        if let Err(e) = journal.audit(event, false).await {
                            tracing::warn!(error = %e, "could not audit refused call");
                        }
                    }
                    Ok(tonic::Status::permission_denied(reason).into_http())
                })
            }
        }
    }
}
