//! `aviary.v1.Fleet`: the edge daemons' bidirectional stream (xDS-style ACK/NACK).

mod codec;
mod hello;
mod renewal;
mod service;
mod session;
mod tracker;
mod transfer;

pub(crate) use hello::health_records as check_health;

use std::sync::Arc;
use std::time::Duration;

use aviary_proto::resource::Resource;
use tokio_util::sync::CancellationToken;

use crate::admission::TokenBucket;
use crate::audit::NewEvent;
use crate::catalog::Catalog;
use crate::deltas::Deltas;
use crate::journal::Journal;
use crate::registry::Registry;

pub(crate) use service::FleetService;

/// Tuning of the fleet stream.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    /// New streams admitted per second (token bucket rate).
    pub admission_rate: f64,
    /// Streams admitted at once (token bucket size).
    pub admission_burst: f64,
    /// Streams are ended after this age (±10% jitter) so replicas rebalance.
    pub max_stream_age: Duration,
    /// How long a new stream may take to send its Hello.
    pub hello_timeout: Duration,
    /// Largest EdgeMessage accepted; larger ones end the stream with RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// A stream whose peer does not take a message for this long is dropped.
    pub send_timeout: Duration,
}

/// What every fleet session shares.
pub(crate) struct Fleet {
    registry: Arc<Registry>,
    journal: Arc<Journal>,
    catalog: Arc<Catalog>,
    deltas: Arc<Deltas>,
    admission: TokenBucket,
    settings: FleetSettings,
    /// Issues renewed node certificates.
    identity: Arc<crate::authority::EnrollSettings>,
    shutdown: CancellationToken,
}

impl Fleet {
    /// Builds the shared state of the fleet service.
    pub(crate) fn new(
        registry: Arc<Registry>,
        journal: Arc<Journal>,
        catalog: Arc<Catalog>,
        deltas: Arc<Deltas>,
        settings: FleetSettings,
        identity: Arc<crate::authority::EnrollSettings>,
        shutdown: CancellationToken,
    ) -> Arc<Fleet> {
        Arc::new(Fleet {
            identity,
            admission: TokenBucket::new(settings.admission_rate, settings.admission_burst),
            registry,
            journal,
            catalog,
            deltas,
            settings,
            shutdown,
        })
    }

    /// Audits a node's refusal of `revision` of `resource`.
    async fn audit_nack(&self, node_id: &str, resource: &Resource, revision: u64, error: &str) {
        let what = match resource {
            Resource::Weights => "weights".to_owned(),
            Resource::Module(m) => format!("module {m}"),
            Resource::Config(m) => format!("config of {m}"),
        };
        let event = NewEvent::new(
            format!("edge/{node_id}"),
            "fleet.nack",
            format!("node/{node_id}"),
            format!("{what} revision {revision} refused: {error}"),
        );
        if let Err(e) = self.journal.audit(event, false).await {
            tracing::warn!(error = %e, "could not audit nack");
        }
    }
}

/// ±10% around `age`, so streams opened together do not all end together.
pub(super) fn jittered(age: Duration) -> Duration {
    age.mul_f64(0.9 + 0.2 * fastrand::f64())
}
