//! The admin gRPC services. Each handler converts proto requests to domain types, calls
//! the registry, and converts back; errors map to status codes in `error.rs`.

mod audit;
mod configs;
mod identities;
mod nodes;
mod page;
mod releases;
mod requests;
mod rollouts;
pub(crate) mod views;

pub(crate) use audit::AuditApi;
pub(crate) use configs::ConfigsApi;
pub(crate) use identities::{EnrollmentApi, IdentitiesApi};
pub(crate) use nodes::NodesApi;
pub(crate) use page::Pager;
pub(crate) use releases::ReleasesApi;
pub(crate) use requests::Requests;
pub(crate) use rollouts::RolloutsApi;

use aviary_certs::Identity;
use tonic::{Request, Status};

use crate::listener::PeerInfo;

/// The verified caller of a request.
fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| Status::unauthenticated("no verified client identity"))
}
